"""MFuser, GTA5 + SYNTHIA -> Cityscapes, BDD100K, Mapillary (and ACDC when present).

Multi-source training (the setting SoMA reports): every example comes from GTA5 with
probability 0.5 and from SYNTHIA with 0.5 (data.mix_ratios), with rare-class sampling
inside each source over its own statistics. Batches stay a pure function of
(seed, step, process), so runs resume exactly as single-source ones.

  python scripts/train.py --config configs/gtasyn2cs.py --workdir runs/gtasyn2cs
Mix Cityscapes in as well: --config.data.train=gta+synthia+cityscapes
--config.data.mix_ratios='(0.4,0.3,0.3)' (and drop it from data.eval).
Argument: `configs/gtasyn2cs.py:vlm=clip,small_gpu=True` (see configs/base.py).
"""

from configs import base


def get_config(arg=None):
    c = base.make_config("gta+synthia", ("cityscapes", "bdd100k", "mapillary", "acdc"), arg)
    c.data.mix_ratios = (0.5, 0.5)
    return c
