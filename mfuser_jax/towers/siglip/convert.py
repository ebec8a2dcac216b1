"""SigLIP weights (siglip_vitl16_384.pth or an HF SiglipModel file) -> our towers, as MFuser
loads them.

The reference's ``siglip_vitl16_384.pth`` is an HF ``SiglipModel`` state dict saved with
torch.save: ``vision_model.*``, ``text_model.*``, ``logit_scale``, ``logit_bias`` — the names
of HF's safetensors files too. What MFuser's loaders (modeling_siglip.py
``SiglipVisionTransformer.init_weights`` / ``SiglipTextTransformer.init_weights``) do, done
here on numpy arrays:

- strip the tower prefixes;
- resize the vision position table's square grid (24 x 24 at 384 px) to the new grid
  (32 x 32 at 512 px) with bilinear F.interpolate (align_corners=False), and the patch
  kernel bilinearly if the patch size changes;
- cut the text position table to the text context length (MFuser: 10 of 64);
- keep ``logit_scale`` and ``logit_bias`` (frozen; the SigLIP score-map loss uses them).

Typical use::

    vision_sd, text_sd, scalars = siglip_state_dicts(read_state_dict("siglip_vitl16_384.pth"))
    load_torch_state_dict(SiglipVisionTransformer(image_size=512, rngs=...), vision_sd)
    load_torch_state_dict(SiglipTextTransformer(context_length=10, rngs=...), text_sd)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from mfuser_jax.weights.state_dict import _to_numpy
from mfuser_jax.weights.torch_io import WeightFileError, truncate_positions
from mfuser_jax.ops.resize import resize

__all__ = ["is_hf_siglip", "siglip_state_dicts"]

_VISION, _TEXT = "vision_model.", "text_model."
_REQUIRED = (
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    "vision_model.head.probe",
    "text_model.embeddings.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight",
    "text_model.head.weight",
    "logit_scale",
    "logit_bias",
)
_IGNORED_SUFFIXES = ("position_ids",)  # buffers of older transformers versions


def is_hf_siglip(sd: Mapping[str, Any]) -> bool:
    """True when ``sd`` has the keys of an HF SiglipModel."""
    return all(k in sd for k in _REQUIRED)


def _describe(sd: Mapping[str, Any]) -> str:
    missing = [k for k in _REQUIRED if k not in sd]
    hint = ""
    if any(k.startswith("visual.") for k in sd):
        hint = " (this looks like a CLIP/EVA02-CLIP file: use --clip or --eva02)"
    elif any(k.startswith(("blocks.", "dinov2.")) for k in sd):
        hint = " (this looks like a DINOv2 file: use --dinov2)"
    return (f"not a SigLIP (HF SiglipModel) state dict: missing {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}{hint}")


def siglip_state_dicts(sd: Mapping[str, Any], *, img_size: int = 512, patch_size: int = 16,
                       context_length: int = 10):
    """(vision_sd, text_sd, scalars) for SiglipVisionTransformer, SiglipTextTransformer and
    the frozen {"logit_scale", "logit_bias"} (float32 (1,)). WeightFileError if ``sd`` is
    not SigLIP."""
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not is_hf_siglip(sd):
        raise WeightFileError(_describe(sd))
    vision, text, unknown = {}, {}, []
    for key, value in sd.items():
        if key.endswith(_IGNORED_SUFFIXES) or key in ("logit_scale", "logit_bias"):
            continue
        value = _to_numpy(value).astype(np.float32)
        if key.startswith(_VISION):
            vision[key[len(_VISION):]] = value
        elif key.startswith(_TEXT):
            text[key[len(_TEXT):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise WeightFileError("SigLIP state dict has keys outside vision_model.* / text_model.*: "
                              + ", ".join(sorted(unknown)[:10]))

    pos = vision["embeddings.position_embedding.weight"]
    orig = math.isqrt(pos.shape[0])
    if orig * orig != pos.shape[0]:
        raise WeightFileError(f"vision position table has {pos.shape[0]} rows, not a square grid")
    grid = (img_size // patch_size, img_size // patch_size)
    if (orig, orig) != grid:
        spatial = resize(pos.reshape(orig, orig, -1), grid, axes=(0, 1), mode="bilinear")
        vision["embeddings.position_embedding.weight"] = spatial.reshape(-1, pos.shape[1])
    kernel = vision["embeddings.patch_embedding.weight"]
    if kernel.shape[-2:] != (patch_size, patch_size):
        vision["embeddings.patch_embedding.weight"] = resize(
            kernel, (patch_size, patch_size), axes=(2, 3), mode="bilinear")

    text["embeddings.position_embedding.weight"] = truncate_positions(
        text["embeddings.position_embedding.weight"], context_length, "text position table")
    scalars = {k: _to_numpy(sd[k]).astype(np.float32).reshape(1) for k in
               ("logit_scale", "logit_bias")}
    return vision, text, scalars
