"""MFuser, GTA5 -> BDD100K (also ACDC, per condition, when present).
Recipe: 20k steps, global batch 4, 512 crops.

  python scripts/train.py --config configs/gta2bdd.py --workdir runs/gta2bdd \
      --config.model.pretrained=weights/ --config.data_root=data
Argument: `configs/gta2bdd.py:vlm=clip,small_gpu=True` (see configs/base.py).
"""

from configs import base


def get_config(arg=None):
    return base.make_config("gta", ("bdd100k", "acdc"), arg)
