"""MFuser, Cityscapes -> BDD100K (also Mapillary and ACDC when present).
Recipe: 20k steps, global batch 4, 512 crops.

  python scripts/train.py --config configs/cs2bdd.py --workdir runs/cs2bdd \
      --config.model.pretrained=weights/ --config.data_root=data
Argument: `configs/cs2bdd.py:vlm=clip,small_gpu=True` (see configs/base.py).
"""

from configs import base


def get_config(arg=None):
    return base.make_config("cityscapes", ("bdd100k", "mapillary", "acdc"), arg)
