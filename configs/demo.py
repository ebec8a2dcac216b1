"""Demo: the embedded synthetic street scenes, a tiny MFuser, a few minutes on a CPU.

  python scripts/train.py --config configs/demo.py --workdir runs/demo
  python scripts/eval.py --config configs/demo.py --workdir runs/demo
  python scripts/predict.py --config configs/demo.py --workdir runs/demo \\
      --images some/folder --out runs/demo/pred

Random weights (no downloads, no converted checkpoints): it exercises the whole pipeline
(model, losses, data, sharding, checkpoints, evaluation) rather than reproducing the paper.
Budget: at most about 10 minutes on 2 CPU cores.
"""

from configs import base


def get_config(arg=None):
    args = base.parse_arg(arg, **{**base.ARGS, "size": "tiny"})
    c = base.get_base_config(args)
    crop = c.model.image_size = 8 * c.model.patch_size  # 8x8 patches (128 px at patch 16)
    c.data = base.data_config("synthetic", ("synthetic_real",), crop_size=crop)
    c.data.rcs.enabled = False                     # no class statistics for synthetic data
    c.data.synthetic.num_train = 512
    c.data.synthetic.num_eval = 16
    c.data.synthetic.image_size = (128, 256)
    c.total_steps = 600
    c.batch_size = 8
    c.log_every = 20
    c.checkpoint_every = 200
    c.eval_every = 300
    # No pretrained encoders to preserve: a larger lr and a short warm-up.
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-5
    c.optim.warmup_steps = 20
    c.evaluation.crop_size = crop
    c.evaluation.stride = (crop * 2) // 3
    c.evaluation.crop_batch = 8
    return c
