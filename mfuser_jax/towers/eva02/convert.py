"""EVA02-CLIP weights (EVA02_CLIP_L_336_psz14_s6B.pt) -> our image and text towers, as MFuser
loads them.

The file is a torch.save'd state dict (possibly inside 'model' / 'module' / 'state_dict', which
``read_state_dict`` unwraps) with keys ``visual.*`` (EVAVisionTransformer), ``text.*`` (open_clip
TextTransformer, OpenAI names) and ``logit_scale``, maybe behind a ``module.`` prefix. What
MFuser's loader (eva_clip/factory.py ``load_state_dict`` / ``load_checkpoint`` and utils.py
``resize_evaclip_pos_embed``) does, done here on numpy arrays:

- drop the rotary ``freqs_cos`` / ``freqs_sin`` buffers (recomputed from the grid; our
  ``EVAVisionTransformer.rope``), ``logit_scale`` and ``text.logit_scale``;
- resize ``visual.pos_embed``'s square grid (24 x 24 at 336 px) to the new grid (36 x 36 at
  512 px) with torch's bicubic F.interpolate(align_corners=False) in float32, class
  position kept, a float16 table rounded back to float16 (the original's arithmetic);
- resize the patch kernel bicubically if the patch size changes (14 -> 14 is the identity);
- cut ``text.positional_embedding`` to the text context length (MFuser: 13 of 77).

Typical use::

    visual_sd, text_sd = read_eva02_clip("EVA02_CLIP_L_336_psz14_s6B.pt")
    load_torch_state_dict(EVAVisionTransformer(img_size=512, rngs=...), visual_sd)
    load_torch_state_dict(CLIPTextContextEncoder(13, activation="gelu", rngs=...), text_sd)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mfuser_jax.weights.state_dict import _to_numpy
from mfuser_jax.weights.torch_io import WeightFileError, read_state_dict, truncate_positions
from mfuser_jax.ops.resize import resize

__all__ = ["eva02_state_dicts", "is_eva02_clip", "read_eva02_clip"]

_WRAPPERS = ("model", "module", "state_dict")
_REQUIRED = (
    "visual.patch_embed.proj.weight",
    "visual.cls_token",
    "visual.pos_embed",
    "visual.blocks.0.attn.q_proj.weight",
    "visual.blocks.0.attn.q_bias",
    "visual.blocks.0.mlp.w3.weight",
    "text.token_embedding.weight",
    "text.positional_embedding",
    "text.text_projection",
)
# old open_clip layout: text tower keys at top level (model.py convert_to_custom_text_state_dict)
_OLD_TEXT = ("text_projection", "positional_embedding", "token_embedding", "transformer",
             "ln_final")
_DROPPED_SUFFIXES = ("freqs_cos", "freqs_sin")
_DROPPED_KEYS = ("logit_scale", "text.logit_scale", "text.attn_mask")


def _unwrap(sd: Mapping[str, Any]) -> dict[str, Any]:
    """A nested checkpoint dict -> the state dict; strip a 'module.' prefix (DDP)."""
    for key in _WRAPPERS:
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "visual.pos_embed" in sd and not any(k.startswith("text.") for k in sd):
        sd = {("text." + k if k.startswith(_OLD_TEXT) else k): v for k, v in sd.items()}
    return sd


def is_eva02_clip(sd: Mapping[str, Any]) -> bool:
    """True when ``sd`` (flat, or wrapped / 'module.'-prefixed) is an EVA02-CLIP state dict."""
    sd = _unwrap(sd)
    return all(k in sd for k in _REQUIRED)


def _float32(value: Any) -> np.ndarray:
    a = _to_numpy(value)
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def _describe_mismatch(sd: Mapping[str, Any]) -> str:
    missing = [k for k in _REQUIRED if k not in sd]
    hint = ""
    if "visual.conv1.weight" in sd or "visual.positional_embedding" in sd:
        hint = (" This looks like an OpenAI/open_clip CLIP checkpoint: convert it with "
                "mfuser_jax.towers.clip.convert instead.")
    elif "pos_embed" in sd and "blocks.0.attn.qkv.weight" in sd:
        hint = " This looks like a DINOv2/timm ViT: convert it with mfuser_jax.towers.dinov2.convert."
    sample = ", ".join(sorted(sd)[:5])
    return (
        "not an EVA02-CLIP checkpoint (expected EVA02_CLIP_L_336_psz14_s6B.pt: visual.* keys of "
        "EVAVisionTransformer with q_proj/q_bias/SwiGLU w1-w3 and text.* keys of the text "
        f"transformer); missing {', '.join(missing)} (found keys like: {sample}).{hint}"
    )


def _interpolate_like_original(tokens: np.ndarray, orig: int, grid: tuple) -> np.ndarray:
    """The (orig*orig, D) position rows resized to ``grid`` by torch's own bicubic kernel
    in float32, laid out as resize_evaclip_pos_embed lays them out (utils.py of the
    original: reshape to (1, g, g, D), permute to NCHW). Not ops.resize: its float64 result
    rounds to float16 one step away from torch's float32 one for about 1 in 800 entries of
    the full-size table, and a float32 restatement cannot follow the compiler's fused
    multiply-adds in torch's weights and sums. Reading the EVA02 .pt file needs torch anyway.
    This is torch's CPU kernel; the original ran the GPU's, which computes in float32 too
    but may contract other multiply-adds (not measured here).
    """
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise WeightFileError(
            "resizing EVA02's visual.pos_embed as the original does needs PyTorch (the CPU "
            "build is enough)") from e
    d = tokens.shape[-1]
    x = torch.from_numpy(np.ascontiguousarray(tokens, np.float32)).reshape(1, orig, orig, d)
    with torch.no_grad():
        out = F.interpolate(x.permute(0, 3, 1, 2), size=tuple(grid), mode="bicubic",
                            align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(-1, d).numpy().copy()


def eva02_state_dicts(
    sd: Mapping[str, Any],
    *,
    img_size: int | Sequence[int] = 512,
    patch_size: int = 14,
    context_length: int = 13,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(visual_sd, text_sd) for EVAVisionTransformer and CLIPTextContextEncoder.

    Prefixes are stripped, floating arrays become float32 (before resizing; a float16
    ``pos_embed`` is resized by torch in float32 and rounded back to float16, as the
    original's is), the rotary
    buffers and logit scales dropped, ``pos_embed`` and the patch kernel resized to
    ``img_size // patch_size`` / ``patch_size`` (bicubic, align_corners=False, class position
    kept) and the text positions cut to ``context_length``. WeightFileError if ``sd`` is not
    EVA02-CLIP or holds keys of neither tower.
    """
    sd = _unwrap(sd)
    if not all(k in sd for k in _REQUIRED):
        raise WeightFileError(_describe_mismatch(sd))
    pos_dtype = _to_numpy(sd["visual.pos_embed"]).dtype
    visual: dict[str, np.ndarray] = {}
    text: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in sd.items():
        if key in _DROPPED_KEYS or key.endswith(_DROPPED_SUFFIXES):
            continue
        if key.startswith("visual."):
            visual[key[len("visual."):]] = _float32(value)
        elif key.startswith("text."):
            text[key[len("text."):]] = _float32(value)
        else:
            unknown.append(key)
    if unknown:
        raise WeightFileError(
            "EVA02-CLIP state dict has keys outside visual.* / text.*: "
            + ", ".join(sorted(unknown)[:10]) + (" ..." if len(unknown) > 10 else "")
        )

    h, w = (img_size, img_size) if np.isscalar(img_size) else tuple(img_size)
    grid = (int(h) // patch_size, int(w) // patch_size)
    pos = visual["pos_embed"]
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise WeightFileError(f"visual.pos_embed has shape {pos.shape}; expected (1, 1 + g*g, D)")
    n_spatial = pos.shape[1] - 1
    orig = math.isqrt(n_spatial)
    if orig * orig != n_spatial:
        raise WeightFileError(f"visual.pos_embed has {n_spatial} spatial rows, not a square grid")
    if (orig, orig) != grid:
        spatial = _interpolate_like_original(pos[0, 1:], orig, grid)
        if pos_dtype == np.float16:
            # The original interpolates the tensor as stored (the EVA-CLIP releases appear
            # to be float16; MFuser loads them onto the GPU, whose kernel computes a float16
            # input in float32 and rounds once), then copies it into the float32 parameter.
            spatial = spatial.astype(np.float16).astype(np.float32)
        visual["pos_embed"] = np.concatenate([pos[0, :1], spatial], axis=0)[None]
    kernel = visual["patch_embed.proj.weight"]
    if kernel.shape[-2:] != (patch_size, patch_size):
        visual["patch_embed.proj.weight"] = resize(
            kernel, (patch_size, patch_size), axes=(2, 3), mode="bicubic"
        )

    text["positional_embedding"] = truncate_positions(
        text["positional_embedding"], context_length, "text.positional_embedding")
    return visual, text


def read_eva02_clip(
    path: str | os.PathLike,
    *,
    img_size: int | Sequence[int] = 512,
    patch_size: int = 14,
    context_length: int = 13,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read an EVA02-CLIP weight file and convert it with ``eva02_state_dicts``."""
    sd = read_state_dict(path)  # unwraps 'state_dict' / 'model' / 'module' checkpoints
    try:
        return eva02_state_dicts(
            sd, img_size=img_size, patch_size=patch_size, context_length=context_length
        )
    except WeightFileError as e:
        raise WeightFileError(f"{os.fspath(path)}: {e}") from e
