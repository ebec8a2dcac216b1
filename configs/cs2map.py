"""MFuser, Cityscapes -> Mapillary (also ACDC, per condition, when present).
Recipe: 20k steps, global batch 4, 512 crops.

  python scripts/train.py --config configs/cs2map.py --workdir runs/cs2map \
      --config.model.pretrained=weights/ --config.data_root=data
Argument: `configs/cs2map.py:vlm=clip,small_gpu=True` (see configs/base.py).
"""

from configs import base


def get_config(arg=None):
    return base.make_config("cityscapes", ("mapillary", "acdc"), arg)
