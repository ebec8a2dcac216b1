"""MFuser, GTA5 -> Cityscapes (paper setting; also BDD100K, Mapillary and ACDC when present).
Recipe: 20k steps, global batch 4, 512 crops.

  python scripts/train.py --config configs/gta2cs.py --workdir runs/gta2cs \
      --config.model.pretrained=weights/ --config.data_root=data
Argument: `configs/gta2cs.py:vlm=clip,small_gpu=True` (see configs/base.py).
"""

from configs import base


def get_config(arg=None):
    return base.make_config("gta", ("cityscapes", "bdd100k", "mapillary", "acdc"), arg)
