"""The registry of the pretrained towers MFuser fuses (one folder each under towers/).

``towers/<name>/`` holds a tower's model (``model.py``), the conversion of its official
weight files (``convert.py``), its tokenizer where it has one (``tokenizer.py``), a VLM's
fused backbone (``fusion.py``) and the spec tying them together (``spec.py``, see
``towers/spec.py``). ``config.model.vlm`` names a vision-language model (CLIP, EVA02-CLIP,
SigLIP) and ``config.model.vfm`` a vision foundation model (DINOv2, DINOv3); the model, the
converters, the configs and the command lines ask the spec and never branch on the name.

The registry is its own module, not the package's __init__: importing a tower's model
(``towers/dinov2/model.py``) must not import every spec, whose fused backbones import the
model layer above the towers. Adding a tower: one folder, and one line below in each of
``_BUILT_IN_*`` and ``_built_in_specs``. The reference (devinxzhang/MFuser) has one
segmentor file and one config per VLM (mfuser_clip.py, mfuser_eva_clip.py,
mfuser_siglip.py) and DINOv2 only.
"""

from __future__ import annotations

from mfuser_jax.towers.clip.config import CONFIG as _CLIP_CONFIG
from mfuser_jax.towers.dinov2.config import CONFIG as _DINOV2_CONFIG
from mfuser_jax.towers.dinov3.config import CONFIG as _DINOV3_CONFIG
from mfuser_jax.towers.eva02.config import CONFIG as _EVA02_CONFIG
from mfuser_jax.towers.siglip.config import CONFIG as _SIGLIP_CONFIG
from mfuser_jax.towers.spec import TowerConfig, VFMSpec, VLMSpec

__all__ = ["VFMSpec", "VLMSpec", "get_vfm", "get_vlm", "register", "unregister", "vfm_config",
           "vfm_names", "vlm_config", "vlm_names"]

# The built-in towers, one line each, in the order names are listed in messages: their
# config sections (plain data, towers/<name>/config.py) are read here; their specs, which
# import the towers' models, on first use (``_built_in_specs``). So loading a config file,
# and refusing a mistaken one, imports no JAX (0.3 s instead of 3.7 s for scripts/train.py).
_BUILT_IN_VLMS = {"clip": _CLIP_CONFIG, "eva02": _EVA02_CONFIG, "siglip": _SIGLIP_CONFIG}
_BUILT_IN_VFMS = {"dinov2": _DINOV2_CONFIG, "dinov3": _DINOV3_CONFIG}

_VLMS: dict[str, VLMSpec] = {}
_VFMS: dict[str, VFMSpec] = {}
_EXTRA_VLMS: dict[str, VLMSpec] = {}  # registered at run time (tests' toy towers)
_EXTRA_VFMS: dict[str, VFMSpec] = {}
_loaded = False


def _built_in_specs() -> None:
    """Import the built-in specs (and with them the towers' models), once."""
    global _loaded
    if _loaded:
        return
    from mfuser_jax.towers.clip.spec import SPEC as clip
    from mfuser_jax.towers.dinov2.spec import SPEC as dinov2
    from mfuser_jax.towers.dinov3.spec import SPEC as dinov3
    from mfuser_jax.towers.eva02.spec import SPEC as eva02
    from mfuser_jax.towers.siglip.spec import SPEC as siglip

    _VLMS.update(clip=clip, eva02=eva02, siglip=siglip)
    _VFMS.update(dinov2=dinov2, dinov3=dinov3)
    _loaded = True


def _extra(spec) -> dict:
    if isinstance(spec, VLMSpec):
        return _EXTRA_VLMS
    if isinstance(spec, VFMSpec):
        return _EXTRA_VFMS
    raise TypeError(f"register takes a VLMSpec or a VFMSpec, not {type(spec).__name__}")


def register(spec):
    """Add ``spec`` under ``spec.name`` (a second tower of the same kind and name: error)."""
    extra = _extra(spec)
    built_in = _BUILT_IN_VLMS if extra is _EXTRA_VLMS else _BUILT_IN_VFMS
    if spec.name in extra or spec.name in built_in:
        raise ValueError(f"a tower named {spec.name!r} is already registered")
    extra[spec.name] = spec
    return spec


def unregister(spec) -> None:
    """Remove a tower registered with ``register`` (tests' toy towers, afterwards)."""
    del _extra(spec)[spec.name]


def vlm_names() -> tuple[str, ...]:
    """The registered VLM names, in registration order (the built-in ones first)."""
    return (*_BUILT_IN_VLMS, *_EXTRA_VLMS)


def vfm_names() -> tuple[str, ...]:
    """The registered VFM names, in registration order (the built-in ones first)."""
    return (*_BUILT_IN_VFMS, *_EXTRA_VFMS)


def vlm_config(name: str) -> TowerConfig:
    """The config section of VLM ``name`` without importing its model (an unknown name is
    a ValueError listing the known)."""
    if name in _EXTRA_VLMS:
        return _EXTRA_VLMS[name].config
    try:
        return _BUILT_IN_VLMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"vlm={name!r}: choose one of {vlm_names()}") from None


def vfm_config(name: str) -> TowerConfig:
    """The config section of VFM ``name`` without importing its model (an unknown name is
    a ValueError listing the known)."""
    if name in _EXTRA_VFMS:
        return _EXTRA_VFMS[name].config
    try:
        return _BUILT_IN_VFMS[name]
    except (KeyError, TypeError):
        raise ValueError(f"vfm={name!r}: choose one of {vfm_names()}") from None


def get_vlm(name: str) -> VLMSpec:
    """The VLM registered as ``name``; an unknown name is a ValueError listing the known."""
    vlm_config(name)  # the error for an unknown name
    if name in _EXTRA_VLMS:
        return _EXTRA_VLMS[name]
    _built_in_specs()
    return _VLMS[name]


def get_vfm(name: str) -> VFMSpec:
    """The VFM registered as ``name``; an unknown name is a ValueError listing the known."""
    vfm_config(name)
    if name in _EXTRA_VFMS:
        return _EXTRA_VFMS[name]
    _built_in_specs()
    return _VFMS[name]
