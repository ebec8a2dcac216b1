"""CLIP weights: HF transformers names -> OpenAI names, split into towers, MFuser's resize.

OpenAI's ``ViT-L-14-336px.pt`` is a TorchScript archive (``read_state_dict`` reads it) whose
keys are the names our modules use (``mfuser_jax.towers.clip.model``) with a ``visual.`` prefix for
the image tower. HF ``CLIPModel`` checkpoints are renamed by ``hf_to_openai``.

Typical use::

    sd = read_state_dict("ViT-L-14-336px.pt")
    visual_sd, text_sd = split_openai(sd, context_length=10)
    visual_sd = resize_for_mfuser(visual_sd, patch_size=16, img_size=512)
    # or in one step: visual_sd, text_sd = mfuser_clip_state_dicts(sd)
    load_torch_state_dict(clip_vision_tower, visual_sd)
    load_torch_state_dict(clip_text_tower, text_sd)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mfuser_jax.weights.state_dict import _to_numpy
from mfuser_jax.weights.torch_io import WeightFileError, truncate_positions
from mfuser_jax.ops.resize import resize

__all__ = [
    "check_openai_clip",
    "hf_to_openai",
    "is_hf_clip",
    "mfuser_clip_state_dicts",
    "resize_for_mfuser",
    "split_openai",
]

# Scalars the OpenAI archive stores beside the weights (build_model deletes them too).
_OPENAI_META = ("input_resolution", "context_length", "vocab_size")
_TEXT_TOP = ("token_embedding.weight", "positional_embedding", "text_projection")
_TEXT_PREFIXES = ("transformer.", "ln_final.")

# Per-block renames, HF -> OpenAI (q/k/v are packed separately).
_BLOCK_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_HF_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_HF_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_HF_BLOCK = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_IGNORED = ("position_ids",)


def is_hf_clip(sd: Mapping[str, Any]) -> bool:
    """True when ``sd`` uses HF transformers' CLIPModel names."""
    return any(k.startswith(("text_model.", "vision_model.")) for k in sd)


def hf_to_openai(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Rename an HF ``CLIPModel`` state dict to OpenAI's names and layouts.

    q/k/v projections are stacked into ``in_proj_weight`` (3W, W) / ``in_proj_bias`` in
    q, k, v order (nn.MultiheadAttention's packing); fc1/fc2 -> c_fc/c_proj; the
    projection Linears become OpenAI's raw matrices, transposed ((W, E): ``x @ proj``);
    ``logit_scale`` is kept as OpenAI's file has it. Unknown keys raise WeightFileError.
    """
    if not is_hf_clip(sd):
        raise WeightFileError(
            "not an HF transformers CLIPModel state dict (no text_model.* / vision_model.* keys)"
        )
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in sd.items():
        if key.endswith(_HF_IGNORED):
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = _to_numpy(value)
            continue
        if key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = np.ascontiguousarray(_to_numpy(value).T)
            continue
        m = _HF_BLOCK.match(key)
        if m is None:
            unknown.append(key)
            continue
        tower, idx, name, kind = m.groups()
        prefix = ("" if tower == "text_model" else "visual.") + f"transformer.resblocks.{idx}."
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((prefix, kind, "qkv"), {})[name[-6]] = _to_numpy(value)
        elif name in _BLOCK_RENAMES:
            out[f"{prefix}{_BLOCK_RENAMES[name]}.{kind}"] = _to_numpy(value)
        else:
            unknown.append(key)
    for (prefix, kind, _), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightFileError(f"{prefix}: q/k/v {kind} incomplete (found {sorted(parts)})")
        out[f"{prefix}attn.in_proj_{kind}"] = np.concatenate([parts[c] for c in "qkv"], axis=0)
    if unknown:
        raise WeightFileError(
            "HF CLIP state dict has keys this converter does not know: "
            + ", ".join(sorted(unknown)[:10])
            + (" ..." if len(unknown) > 10 else "")
        )
    return out


def check_openai_clip(sd: Mapping[str, Any]) -> None:
    """Raise WeightFileError unless ``sd`` is an OpenAI-named CLIP ViT state dict."""
    required = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                "visual.proj", "token_embedding.weight", "positional_embedding",
                "text_projection")
    missing = [k for k in required if k not in sd]
    if missing:
        if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in sd):
            raise WeightFileError(
                "this is a ResNet CLIP checkpoint; MFuser needs a ViT CLIP such as ViT-L-14-336px.pt"
            )
        sample = ", ".join(sorted(sd)[:5])
        raise WeightFileError(
            "not a CLIP checkpoint: missing " + ", ".join(missing)
            + f" (found keys like: {sample}). Expected OpenAI's ViT-L-14-336px.pt (TorchScript) "
            "or an HF transformers CLIPModel state dict"
        )
    w = np.shape(sd["visual.conv1.weight"])
    if len(w) != 4 or w[1] != 3:
        raise WeightFileError(f"visual.conv1.weight has shape {w}; expected (width, 3, p, p)")


def _float32(value: Any) -> np.ndarray:
    a = _to_numpy(value)
    return a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a


def split_openai(
    sd: Mapping[str, Any], context_length: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(visual_sd, text_sd) for CLIPVisionTransformer and CLIPTextEncoder/ContextEncoder.

    The ``visual.`` prefix is stripped; OpenAI's metadata scalars and ``logit_scale`` are
    dropped. HF names are converted first. Floating arrays become float32, as MFuser's
    ``torch.jit.load(...).float()`` does (OpenAI's archives are float16; resizing must not
    round back to float16). ``context_length``: keep only the first positions of the text
    positional embedding (MFuser's text tower uses 10 of OpenAI's 77).
    """
    if is_hf_clip(sd):
        sd = hf_to_openai(sd)
    check_openai_clip(sd)
    visual, text, unknown = {}, {}, []
    for key, value in sd.items():
        if key.startswith("visual."):
            visual[key[len("visual."):]] = _float32(value)
        elif key in _TEXT_TOP or key.startswith(_TEXT_PREFIXES):
            text[key] = _float32(value)
        elif key in _OPENAI_META or key == "logit_scale":
            continue
        else:
            unknown.append(key)
    if unknown:
        raise WeightFileError("CLIP state dict has unexpected keys: " + ", ".join(sorted(unknown)))
    if context_length is not None:
        text["positional_embedding"] = truncate_positions(
            text["positional_embedding"], context_length, "text positional embedding")
    return visual, text


def resize_for_mfuser(
    visual_sd: Mapping[str, Any], patch_size: int = 16, img_size: int | Sequence[int] = 512
) -> dict[str, np.ndarray]:
    """Resize conv1 and the positional embedding as MFuser's CLIPVisionTransformer does.

    Both with torch's ``F.interpolate(mode="bilinear")`` default align_corners=False (no
    antialias): conv1.weight (W, 3, p, p) -> (W, 3, patch_size, patch_size); the spatial
    positions (square grid g x g) -> (img_h // patch_size, img_w // patch_size), class
    position unchanged. Arrays already the target size are left alone (MFuser resizes
    only on a shape mismatch).
    """
    out = {k: _float32(v) for k, v in visual_sd.items()}
    if "conv1.weight" not in out or "positional_embedding" not in out:
        raise WeightFileError(
            "resize_for_mfuser expects the image-tower dict from split_openai "
            "(keys conv1.weight and positional_embedding)"
        )
    h, w = (img_size, img_size) if np.isscalar(img_size) else tuple(img_size)
    grid = (int(h) // patch_size, int(w) // patch_size)
    conv = out["conv1.weight"]
    if conv.shape[-2:] != (patch_size, patch_size):
        out["conv1.weight"] = resize(conv, (patch_size, patch_size), axes=(2, 3))
    pos = out["positional_embedding"]
    n_spatial = pos.shape[0] - 1
    orig = int(math.isqrt(n_spatial))
    if orig * orig != n_spatial:
        raise WeightFileError(f"positional_embedding has {n_spatial} spatial rows, not a square grid")
    if (orig, orig) != grid:
        spatial = pos[1:].reshape(orig, orig, pos.shape[1])
        spatial = resize(spatial, grid, axes=(0, 1)).reshape(-1, pos.shape[1])
        out["positional_embedding"] = np.concatenate([pos[:1], spatial], axis=0)
    return out


def mfuser_clip_state_dicts(
    sd: Mapping[str, Any],
    patch_size: int = 16,
    img_size: int | Sequence[int] = 512,
    context_length: int = 10,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """OpenAI (or HF) CLIP weights -> (image tower, text tower) dicts as MFuser builds them.

    ``split_openai`` with the text positions cut to ``context_length`` (MFuser: 5 name
    tokens + 5 learnable contexts), then ``resize_for_mfuser`` on the image tower.
    """
    visual, text = split_openai(sd, context_length=context_length)
    return resize_for_mfuser(visual, patch_size=patch_size, img_size=img_size), text
