"""DINOv2 weights: HF transformers names -> official names, MFuser's 14 -> 16 resize, checks.

The official checkpoint (``dinov2_vitl14_pretrain.pth``) already uses the names of
``mfuser_jax.towers.dinov2.model.DinoVisionTransformer``; HF ``Dinov2Model`` files are renamed by
``hf_to_official``. MFuser then resizes the patch kernel and the position embedding
(``resize_for_mfuser``) before loading with ``load_torch_state_dict``::

    sd = to_official(read_state_dict(path))            # HF or official, checked
    sd = resize_for_mfuser(sd, patch_size=16, img_size=512)
    load_torch_state_dict(DinoVisionTransformer(patch_size=16, img_size=512, rngs=...), sd)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mfuser_jax.weights.state_dict import _to_numpy
from mfuser_jax.weights.torch_io import WeightFileError
from mfuser_jax.ops.resize import resize

__all__ = [
    "REQUIRED_KEYS",
    "check_dinov2_state_dict",
    "hf_to_official",
    "is_dinov2_state_dict",
    "load_dinov2_state_dict",
    "resize_for_mfuser",
    "to_official",
]

# HF Dinov2Model -> official names. Both HF spellings are accepted: hub checkpoints
# (attention.attention.query, attention.output.dense) and transformers 5
# (attention.q_proj, attention.o_proj). A leading "dinov2." (task heads) is dropped.
_HF_RENAMES: list[tuple[str, str]] = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
    (r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)$",
     r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^layernorm\.(weight|bias)$", r"norm.\1"),
]
# q, k, v projections, merged into one qkv Linear (output rows ordered q, k, v).
_HF_QKV = re.compile(
    r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|([qkv])_proj)"
    r"\.(weight|bias)$"
)
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}

# Keys every supported DINOv2 checkpoint has (official names).
REQUIRED_KEYS = (
    "cls_token",
    "pos_embed",
    "mask_token",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "blocks.0.norm1.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.attn.proj.weight",
    "blocks.0.ls1.gamma",
    "blocks.0.mlp.fc1.weight",
    "blocks.0.mlp.fc2.weight",
    "norm.weight",
)


def _looks_hf(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.", "dinov2.embeddings."))
               for k in sd)


def hf_to_official(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Rename an HF ``Dinov2Model`` state dict to the official DINOv2 names (numpy values).

    Unknown keys (pooler, classifier heads) raise a WeightFileError naming them.
    """
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    unknown = []
    for key, value in state_dict.items():
        name = key[len("dinov2."):] if key.startswith("dinov2.") else key
        m = _HF_QKV.match(name)
        if m:
            layer, long_name, short_name, kind = m.groups()
            qkv.setdefault((layer, kind), {})[_QKV_ORDER[long_name or short_name]] = (
                _to_numpy(value))
            continue
        for pattern, template in _HF_RENAMES:
            new, n = re.subn(pattern, template, name)
            if n:
                out[new] = _to_numpy(value)
                break
        else:
            unknown.append(key)
    if unknown:
        raise WeightFileError(
            "not an HF Dinov2Model state dict: no official DINOv2 name for "
            f"{len(unknown)} keys: {', '.join(sorted(unknown)[:8])}"
            + (" ..." if len(unknown) > 8 else "")
        )
    for (layer, kind), parts in sorted(qkv.items()):
        if sorted(parts) != [0, 1, 2]:
            raise WeightFileError(
                f"HF DINOv2 layer {layer}: attention {kind} has only the "
                f"{', '.join('qkv'[i] for i in sorted(parts))} projection(s), need q, k and v")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(
            [parts[0], parts[1], parts[2]], axis=0)
    return out


def _unchunk(sd: Mapping[str, Any]) -> dict[str, Any]:
    """FSDP-chunked training checkpoints name blocks 'blocks.<chunk>.<index>.'."""
    if not any(re.match(r"^blocks\.\d+\.\d+\.", k) for k in sd):
        return dict(sd)
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}


def _missing_required(sd: Mapping[str, Any]) -> list[str]:
    return [k for k in REQUIRED_KEYS if k not in sd]


def is_dinov2_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for an official-named or HF-named DINOv2 ViT state dict (no registers)."""
    sd = state_dict
    if _looks_hf(sd):
        try:
            sd = hf_to_official(sd)
        except WeightFileError:
            return False
    sd = _unchunk(sd)
    return not _missing_required(sd) and "register_tokens" not in sd


def _describe(sd: Mapping[str, Any]) -> str:
    keys = list(sd)
    if any(k.startswith(("visual.", "transformer.resblocks.", "text_model.", "vision_model."))
           or k in ("positional_embedding", "text_projection", "logit_scale") for k in keys):
        return "it looks like a CLIP checkpoint"
    if any(k.startswith(("backbone.", "decode_head.")) for k in keys):
        return "it looks like a full segmentation checkpoint, not the DINOv2 backbone alone"
    return f"its first keys are {', '.join(keys[:5])}"


def check_dinov2_state_dict(state_dict: Mapping[str, Any], source: str = "state dict") -> None:
    """Raise WeightFileError (what was expected, which keys are missing) unless DINOv2."""
    if not state_dict:
        raise WeightFileError(f"{source}: empty state dict, expected DINOv2 ViT weights")
    if "register_tokens" in state_dict:
        raise WeightFileError(
            f"{source}: DINOv2 with register tokens (dinov2_vit*_reg) is not supported; "
            "MFuser uses dinov2_vitl14_pretrain.pth (no registers)")
    missing = _missing_required(state_dict)
    if missing:
        raise WeightFileError(
            f"{source}: not a DINOv2 ViT checkpoint ({_describe(state_dict)}). Expected the "
            "official DINOv2 names (dinov2_vitl14_pretrain.pth) or HF Dinov2Model names; "
            f"missing {len(missing)} of the required keys: {', '.join(missing)}")


def to_official(state_dict: Mapping[str, Any], source: str = "state dict") -> dict[str, Any]:
    """Official-named DINOv2 state dict from an official, chunked or HF one; checked."""
    sd = hf_to_official(state_dict) if _looks_hf(state_dict) else dict(state_dict)
    sd = _unchunk(sd)
    check_dinov2_state_dict(sd, source)
    return sd


def resize_for_mfuser(
    state_dict: Mapping[str, Any], patch_size: int = 16, img_size: int = 512
) -> dict[str, Any]:
    """Resize the patch kernel and position embedding as MFuser does before loading.

    Restates devinxzhang/MFuser models/backbones/clip/models.py (CLIPVisionTransformer
    __init__): the patch-position grid M x M (37 for ViT-L/14 at 518) is resized to
    (img_size // patch_size)^2 with ``F.interpolate(mode='bicubic', align_corners=False)``
    (antialias off, output given by size), the class position kept; the (D, 3, 14, 14)
    patch kernel is resized to (patch_size, patch_size) the same way. Plain bicubic
    resampling of a kernel does not preserve its response (the sum over a larger patch
    grows); MFuser does exactly this, so we do too. MFuser resizes the kernel only inside
    its "grid size differs" branch; here each is resized when its own size differs, which
    is the same for every checkpoint MFuser can load. Computed in float64 with numpy,
    returned as float32. Other keys pass through unchanged (HF or chunked names are first
    normalised by ``to_official``).
    """
    sd = to_official(state_dict)
    pos = _to_numpy(sd["pos_embed"])
    n_extra = 1
    old = math.isqrt(pos.shape[1] - n_extra)
    if old * old != pos.shape[1] - n_extra:
        raise WeightFileError(f"pos_embed {pos.shape}: patch positions are not a square grid")
    new = img_size // patch_size
    if old != new:
        grid = pos[0, n_extra:].reshape(old, old, -1)
        grid = resize(grid, (new, new), axes=(0, 1), mode="bicubic")
        sd["pos_embed"] = np.concatenate(
            [pos[:, :n_extra].astype(np.float32), grid.reshape(1, new * new, -1)], axis=1)
    kernel = _to_numpy(sd["patch_embed.proj.weight"])
    if kernel.shape[-2:] != (patch_size, patch_size):
        sd["patch_embed.proj.weight"] = resize(
            kernel, (patch_size, patch_size), axes=(2, 3), mode="bicubic")
    return sd


def load_dinov2_state_dict(path, patch_size: int = 16, img_size: int = 512):
    """Read a DINOv2 weight file (official .pth or HF .safetensors/.bin), MFuser-resized."""
    from mfuser_jax.weights.torch_io import read_state_dict

    sd = to_official(read_state_dict(path), source=str(path))
    return resize_for_mfuser(sd, patch_size=patch_size, img_size=img_size)
