"""MFuser on your own dataset and classes (the generic folder layout).

  python scripts/prepare_data.py folder --root data/mine          # data/mine/classes.txt
  python scripts/train.py --config configs/custom.py:root=data/mine --workdir runs/mine \
      --config.model.pretrained=pretrained/mfuser_clip_l
  python scripts/eval.py --config configs/custom.py:root=data/mine --workdir runs/mine
  python scripts/predict.py --config configs/custom.py:root=data/mine --workdir runs/mine \
      --images photos/ --out preds/

Arguments (comma-separated after the file name):
  root=DIR        the dataset folder: DIR/images/<split>/..., DIR/labels/<split>/...
  classes=FILE    the class list (default DIR/classes.txt; format in
                  mfuser_jax/data/custom.py): it sizes the text queries, the decoder's
                  class head and the prediction palette
  train=SPLIT     training split (default train); eval=SPLIT (default val)
  vlm=..., size=..., small_gpu=...   as in configs/base.py
The recipe is the paper's (20k steps, batch 4, 512 crops, rare-class sampling over the
statistics prepare_data.py writes); override any field on the command line.
"""

import os

from configs import base


def get_config(arg=None):
    args = base.parse_arg(arg, root="", classes="", train="train", eval="val", **base.ARGS)
    if not args.root and not args.classes:
        raise base.ConfigError("configs/custom.py needs root=DIR (the dataset folder) "
                               "and/or classes=FILE, e.g. configs/custom.py:root=data/mine")
    root = args.root or os.path.dirname(args.classes) or "."
    classes = args.classes or os.path.join(root, "classes.txt")
    from mfuser_jax.data.custom import ClassFileError, read_class_file
    try:
        cl = read_class_file(classes)
    except ClassFileError as e:
        raise base.ConfigError(str(e)) from None
    c = base.get_base_config(args)
    c.model.class_names = cl.names
    c.model.num_classes = len(cl)
    c.model.palette = cl.palette              # prediction and report colours
    crop = c.model.image_size
    c.data = base.data_config(f"folder:{args.train}", (f"folder:{args.eval}",),
                              crop_size=crop)
    c.data.folder.update(dict(root=root, classes=classes, label_ids=cl.label_ids,
                              ignore_index=cl.ignore_index))
    c.evaluation.crop_size = crop             # 512 for the full-size model
    c.evaluation.stride = (crop * 2) // 3
    return c
