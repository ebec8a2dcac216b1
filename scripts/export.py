#!/usr/bin/env python
"""Export a checkpoint: the original PyTorch MFuser's .pth, or a StableHLO predictor.

  python scripts/export.py --workdir runs/gta2cs --to pth --out mfuser_gta.pth \\
      [--reference released.pth] [--step N] [--config configs/gta2cs.py]
  python scripts/export.py --workdir runs/gta2cs --to stablehlo \\
      --out mfuser_1024x2048.npz --height 1024 --width 2048 [--classes "road,car"] \\
      [--platforms cpu,cuda] [--step N]

--to pth writes the mmseg checkpoint ({"state_dict", "meta"}) that the original MFuser
loads with strict=True; --reference (the release a converted workdir came from) supplies
the keys the JAX model does not hold, so a converted release comes out unchanged.
--to stablehlo writes the sliding-window predictor (uint8 image (H, W, 3) -> scores
(H, W, K) float32) for one fixed size (default: one window, the evaluation crop), with
its weights, as one .npz that mfuser_jax.run.export.load_stablehlo runs without model code.
Without --config, the config W/config.json recorded (training and the release converter
write it); a model registered by its config file (not MFuser) needs that file.
"""

import _cli
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py[:arg] "
                                "(default: the workdir's config.json, as trained)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "training output folder holding checkpoints/")
flags.DEFINE_enum("to", None, ["pth", "stablehlo"], "what to write")
flags.DEFINE_string("out", None, "output file")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.DEFINE_string("reference", None, "pth: the released .pth the workdir was converted "
                    "from, for the keys the JAX model does not hold")
flags.DEFINE_integer("height", None, "stablehlo: image height (default: the evaluation crop)")
flags.DEFINE_integer("width", None, "stablehlo: image width (default: the evaluation crop)")
flags.DEFINE_string("classes", None, "stablehlo: comma-separated class names of the output "
                    "channels (default: the config's)")
flags.DEFINE_list("platforms", None, "stablehlo: platforms to lower for, e.g. cpu,cuda "
                  "(default: this machine's)")
flags.mark_flags_as_required(["workdir", "to", "out"])
FLAGS = flags.FLAGS

ONLY_FOR = {"pth": ("reference",), "stablehlo": ("height", "width", "classes", "platforms")}


def main(argv):
    del argv
    for target, names in ONLY_FOR.items():
        given = [f"--{n}" for n in names if FLAGS[n].present]
        if given and FLAGS.to != target:
            _cli.fail(f"{', '.join(given)} only apply to --to {target}")
    from mfuser_jax.run import export
    config = _cli.config_or_workdir(FLAGS.config, FLAGS.workdir)
    if FLAGS.to == "pth":
        _cli.run_main(export.export_pth, config, FLAGS.workdir, FLAGS.out, FLAGS.step,
                      FLAGS.reference)
    else:
        _cli.run_main(export.export_stablehlo, config, FLAGS.workdir, FLAGS.out,
                      FLAGS.step, height=FLAGS.height, width=FLAGS.width,
                      classes=FLAGS.classes, platforms=FLAGS.platforms)


if __name__ == "__main__":
    _cli.run_app(main)
