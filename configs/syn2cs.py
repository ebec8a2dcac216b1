"""MFuser, SYNTHIA -> Cityscapes (also BDD100K and Mapillary when present).
Recipe: 20k steps, global batch 4, 512 crops.

  python scripts/train.py --config configs/syn2cs.py --workdir runs/syn2cs \
      --config.model.pretrained=weights/ --config.data_root=data
Argument: `configs/syn2cs.py:vlm=clip,small_gpu=True` (see configs/base.py).
"""

from configs import base


def get_config(arg=None):
    return base.make_config("synthia", ("cityscapes", "bdd100k", "mapillary"), arg)
