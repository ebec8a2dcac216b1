"""The registry of the pretrained towers MFuser fuses (one folder each under towers/).

``towers/<name>/`` holds a tower's model (``model.py``), the conversion of its official
weight files (``convert.py``), its tokenizer where it has one (``tokenizer.py``), a VLM's
fused backbone (``fusion.py``) and the spec tying them together (``spec.py``, see
``towers/spec.py``). ``config.model.vlm`` names a vision-language model (CLIP, EVA02-CLIP,
SigLIP) and ``config.model.vfm`` a vision foundation model (DINOv2, DINOv3); the model, the
converters, the configs and the command lines ask the spec and never branch on the name.

The registry is its own module, not the package's __init__: importing a tower's model
(``towers/dinov2/model.py``) must not import every spec, whose fused backbones import the
model layer above the towers. Adding a tower: one folder, and one line below registering
its spec. The reference (devinxzhang/MFuser) has one segmentor file and one config
per VLM (mfuser_clip.py, mfuser_eva_clip.py, mfuser_siglip.py) and DINOv2 only.
"""

from __future__ import annotations

from mfuser_jax.towers.spec import VFMSpec, VLMSpec

__all__ = ["VFMSpec", "VLMSpec", "get_vfm", "get_vlm", "register", "unregister", "vfm_names",
           "vlm_names"]

_VLMS: dict[str, VLMSpec] = {}
_VFMS: dict[str, VFMSpec] = {}


def _table(spec) -> dict:
    if isinstance(spec, VLMSpec):
        return _VLMS
    if isinstance(spec, VFMSpec):
        return _VFMS
    raise TypeError(f"register takes a VLMSpec or a VFMSpec, not {type(spec).__name__}")


def register(spec):
    """Add ``spec`` under ``spec.name`` (a second tower of the same kind and name: error)."""
    table = _table(spec)
    if spec.name in table:
        raise ValueError(f"a tower named {spec.name!r} is already registered")
    table[spec.name] = spec
    return spec


def unregister(spec) -> None:
    """Remove a registered tower (tests register toy towers and remove them afterwards)."""
    del _table(spec)[spec.name]


def vlm_names() -> tuple[str, ...]:
    """The registered VLM names, in registration order (the built-in ones first)."""
    return tuple(_VLMS)


def vfm_names() -> tuple[str, ...]:
    """The registered VFM names, in registration order (the built-in ones first)."""
    return tuple(_VFMS)


def get_vlm(name: str) -> VLMSpec:
    """The VLM registered as ``name``; an unknown name is a ValueError listing the known."""
    try:
        return _VLMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"vlm={name!r}: choose one of {vlm_names()}") from None


def get_vfm(name: str) -> VFMSpec:
    """The VFM registered as ``name``; an unknown name is a ValueError listing the known."""
    try:
        return _VFMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"vfm={name!r}: choose one of {vfm_names()}") from None


# The built-in towers, in the order names are listed in messages.
from mfuser_jax.towers.clip.spec import SPEC as _CLIP  # noqa: E402
from mfuser_jax.towers.dinov2.spec import SPEC as _DINOV2  # noqa: E402
from mfuser_jax.towers.dinov3.spec import SPEC as _DINOV3  # noqa: E402
from mfuser_jax.towers.eva02.spec import SPEC as _EVA02  # noqa: E402
from mfuser_jax.towers.siglip.spec import SPEC as _SIGLIP  # noqa: E402

for _spec in (_DINOV2, _DINOV3, _CLIP, _EVA02, _SIGLIP):
    register(_spec)
