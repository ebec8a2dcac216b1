"""DINOv3 ViT weights -> the official-named state dict ``DinoV3VisionTransformer`` loads.

Two layouts are read, told apart by their keys:

* the official ``.pth`` (facebookresearch/dinov3, e.g. ``dinov3_vitl16_pretrain_lvd1689m-
  8aa4cbdd.pth``): already our names, plus buffers that are not state here;
* Hugging Face ``DINOv3ViTModel`` (``model.safetensors`` of facebook/dinov3-vitl16-*,
  with ``layer.N.``; transformers 5 names the same blocks ``model.layer.N.``). Renamed as
  the inverse of transformers' convert_dinov3_vit_to_hf.py: q/k/v_proj rows concatenated
  into ``attn.qkv``, o_proj -> attn.proj, layer_scaleK.lambda1 -> lsK.gamma, up/down_proj
  -> mlp.fc1/fc2, register_tokens -> storage_tokens, mask_token (1, 1, D) -> (1, D).

Buffers and unused parameters, checked or dropped:

* ``rope_embed.periods``: recomputed by the tower from ``rope_base`` in float32, as
  transformers recomputes them. The file's must agree to bfloat16 rounding: training
  computes the table in bfloat16 (the default ``pos_embed_rope_dtype``), and the official
  module uses whatever the file holds, so a bfloat16-rounded table makes the official
  model's angles differ from ours (and HF's) by up to 2^-9 relative. A larger difference
  means another RoPE (base or head count) and is an error.
* ``blocks.N.attn.qkv.bias_mask``: the official forward uses ``qkv.bias * bias_mask``, so
  the mask is folded into ``qkv.bias`` (whatever the file's pattern: (1, 0, 1), or all
  zeros, which leaves no qkv bias at all) and dropped. The tower then masks the key third
  itself (``mask_k_bias``), so the folded key third must be zero; a mask that lets a key
  bias through, or NaN (never initialised), is an error. HF has no key bias: the key third
  is filled with zeros, and an HF ``k_proj.bias`` is accepted only if zero (under RoPE a
  non-zero one would change the output).
* ``local_cls_norm.*`` (SAT-493M ViT-L, ``untie_global_and_local_cls_norm``): the official
  applies it only in training, to the local crops; never at inference. Dropped, as
  transformers' conversion drops it.

Anything else unknown, and every missing parameter, is reported in one ``WeightFileError``.
``load_dinov3_state_dict(path)`` reads a file (``.pth`` through torch, ``.safetensors``
through safetensors.numpy) and converts it::

    sd = load_dinov3_state_dict("dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")
    load_torch_state_dict(DinoV3VisionTransformer(img_size=512, rngs=...), sd)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mfuser_jax.weights.state_dict import _to_numpy
from mfuser_jax.weights.torch_io import WeightFileError, read_state_dict
from mfuser_jax.towers.dinov3.model import rope_periods

__all__ = [
    "BLOCK_KEYS",
    "TOP_KEYS",
    "hf_to_official",
    "is_hf_layout",
    "load_dinov3_state_dict",
    "to_official",
]

# The parameters of the official module (ViT-L/16 configuration: biases everywhere, layer
# scale, plain MLP). ``storage_tokens`` is absent when a model has none.
TOP_KEYS = ("cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias")
BLOCK_KEYS = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
    "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
    "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2.gamma",
)
_PERIODS = "rope_embed.periods"
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# HF DINOv3ViTModel names -> official names.
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "storage_tokens",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
_HF_IN_BLOCK = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.o_proj.weight": "attn.proj.weight",
    "attention.o_proj.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.up_proj.weight": "mlp.fc1.weight",
    "mlp.up_proj.bias": "mlp.fc1.bias",
    "mlp.down_proj.weight": "mlp.fc2.weight",
    "mlp.down_proj.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
_HF_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_HF_BLOCK = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")
_HF_QKV_KEY = re.compile(r"^attention\.([qkv]_proj)\.(weight|bias)$")


def is_hf_layout(state_dict: Mapping[str, Any]) -> bool:
    """True for HF ``DINOv3ViTModel`` names (``embeddings.*``, ``[model.]layer.N.*``)."""
    return any(k.startswith("embeddings.") or _HF_BLOCK.match(k) for k in state_dict)


def _hints(unknown: list[str]) -> list[str]:
    notes = []
    if any("gate_proj" in k or re.search(r"\.w[123]\.", k) for k in unknown):
        notes.append("a SwiGLU feed-forward (ViT-S+/H+/7B): only the plain-MLP DINOv3 ViTs "
                     "(S, B, L) are supported")
    if any(k in ("pos_embed", "embeddings.position_embeddings") for k in unknown):
        notes.append("a learned position table: this looks like DINOv2, not DINOv3")
    if any(k.startswith("cls_norm.") for k in unknown):
        notes.append("untied cls/patch norms, which no released DINOv3 ViT uses")
    return notes


def _error(source, layout, unknown, missing, problems=()) -> WeightFileError:
    lines = [f"{source}: does not fit the DINOv3 ViT tower ({layout} layout detected):"]
    lines += [f"  {p}" for p in problems]
    if unknown:
        lines.append(f"  unknown keys ({len(unknown)}):")
        lines += [f"    {k}" for k in sorted(unknown)]
        lines += [f"  note: {n}" for n in _hints(unknown)]
    if missing:
        lines.append(f"  missing keys ({len(missing)}):")
        lines += [f"    {k}" for k in missing]
    return WeightFileError("\n".join(lines))


def _depth(keys, pattern) -> int:
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def hf_to_official(state_dict: Mapping[str, Any], source: str = "state dict"
                   ) -> dict[str, np.ndarray]:
    """Rename an HF ``DINOv3ViTModel`` state dict to official names (numpy values).

    Unknown and missing keys (in HF names) raise one WeightFileError listing all of them.
    """
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    unknown, problems = [], []
    for key, value in state_dict.items():
        if key == "rope_embeddings.inv_freq":  # non-persistent in transformers; if saved
            out[_PERIODS] = (1.0 / _to_numpy(value).astype(np.float64)).astype(np.float32)
            continue
        if key in _HF_TOP:
            out[_HF_TOP[key]] = _to_numpy(value)
            continue
        m = _HF_BLOCK.match(key)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            if rest in _HF_IN_BLOCK:
                out[f"blocks.{layer}.{_HF_IN_BLOCK[rest]}"] = _to_numpy(value)
                continue
            q = _HF_QKV_KEY.match(rest)
            if q:
                qkv.setdefault((layer, q.group(2)), {})[_HF_QKV[q.group(1)]] = _to_numpy(value)
                continue
        unknown.append(key)
    depth = _depth(state_dict, _HF_BLOCK)
    prefix = next((p for p in ("layer.", "model.layer.")
                   if any(k.startswith(p) for k in state_dict)), "layer.")
    missing = []
    for layer in range(depth):
        for kind in ("weight", "bias"):
            parts = qkv.get((layer, kind), {})
            needed = (0, 1, 2) if kind == "weight" else (0, 2)  # HF has no key bias
            absent = [i for i in needed if i not in parts]
            if absent:
                missing += [f"{prefix}{layer}.attention.{'qkv'[i]}_proj.{kind}" for i in absent]
                continue
            if kind == "bias":
                k_bias = parts.get(1)
                if k_bias is not None and np.any(k_bias != 0):
                    problems.append(
                        f"{prefix}{layer}.attention.k_proj.bias is non-zero: the DINOv3 tower "
                        "masks the key bias (mask_k_bias), so this model would not be "
                        "reproduced")
                    continue
                parts[1] = np.zeros_like(parts[0])
            out[f"blocks.{layer}.attn.qkv.{kind}"] = np.concatenate(
                [parts[0], parts[1], parts[2]], axis=0)
    inverse_top = {v: k for k, v in _HF_TOP.items()}
    inverse_block = {v: k for k, v in _HF_IN_BLOCK.items()}
    for key in TOP_KEYS:
        if key not in out:
            missing.append(inverse_top[key])
    for layer in range(depth):
        for name in BLOCK_KEYS:
            if name in inverse_block and f"blocks.{layer}.{name}" not in out:
                missing.append(f"{prefix}{layer}.{inverse_block[name]}")
    if unknown or missing or problems:
        raise _error(source, "Hugging Face DINOv3ViTModel", unknown, missing, problems)
    tokens = out.get("storage_tokens")
    if tokens is not None and tokens.shape[1] == 0:  # num_register_tokens=0: empty (1, 0, D)
        del out["storage_tokens"]
    mask = out["mask_token"]
    if mask.ndim == 3:  # HF (1, 1, D) -> official (1, D)
        out["mask_token"] = mask.reshape(mask.shape[0], mask.shape[-1])
    return out


def _check_buffers(sd: dict[str, np.ndarray], num_heads: int | None, rope_base: float,
                   problems: list[str]) -> None:
    """Check and remove the official buffers (periods, bias masks) and local_cls_norm."""
    periods = sd.pop(_PERIODS, None)
    if periods is not None:
        periods = np.asarray(periods, np.float32).reshape(-1)
        head_dim = 4 * periods.shape[0]
        dim = sd["cls_token"].shape[-1] if "cls_token" in sd else None
        if num_heads is not None and dim is not None and head_dim * num_heads != dim:
            problems.append(f"{_PERIODS} has {periods.shape[0]} periods, i.e. head dim "
                            f"{head_dim}; num_heads={num_heads} at width {dim} needs "
                            f"{dim // num_heads} (wrong num_heads?)")
        else:
            want = rope_periods(head_dim, rope_base)
            # bfloat16 rounds to 8 significant bits: relative error at most 2^-9.
            if not np.allclose(periods, want, rtol=2.0 ** -8, atol=0):
                problems.append(
                    f"{_PERIODS} differs from the periods of rope_base={rope_base:g} (max "
                    f"relative difference {np.max(np.abs(periods / want - 1)):.3g}): "
                    "the checkpoint uses another RoPE configuration")
    for key in [k for k in sd if k.endswith(".attn.qkv.bias_mask")]:
        mask = np.asarray(sd.pop(key), np.float32)
        bias_key = key[: -len("_mask")]
        if bias_key not in sd:
            continue  # reported as missing
        if not np.isfinite(mask).all():
            problems.append(f"{key} is not finite (an uninitialised mask): the official "
                            "forward would give NaN")
            continue
        bias = np.asarray(sd[bias_key], np.float32)
        if bias.shape != mask.shape or bias.shape[0] % 3:
            problems.append(f"{key} {mask.shape} does not fit {bias_key} {bias.shape}")
            continue
        folded = bias * mask  # what LinearKMaskedBias adds
        o = folded.shape[0]
        if np.any(folded[o // 3: 2 * o // 3] != 0):
            problems.append(f"{key} lets a key bias through, which the tower masks "
                            "(mask_k_bias): this model would not be reproduced")
            continue
        sd[bias_key] = folded
    for key in [k for k in sd if k.startswith("local_cls_norm.")]:
        del sd[key]  # training-only (local crops), never used at inference


def to_official(state_dict: Mapping[str, Any], *, num_heads: int | None = 16,
                rope_base: float = 100.0, source: str = "state dict"
                ) -> dict[str, np.ndarray]:
    """Official-named parameters (numpy) from an official or HF DINOv3 ViT state dict.

    The layout is detected by keys; buffers are checked against ``num_heads`` (ViT-L: 16;
    None skips the head-count check) and ``rope_base`` and dropped (see the module
    docstring). Every unknown and missing key is reported in one WeightFileError; shapes
    are left to ``load_torch_state_dict``, which checks them against the module.
    """
    if not state_dict:
        raise WeightFileError(f"{source}: empty state dict, expected DINOv3 ViT weights")
    if is_hf_layout(state_dict):
        sd, layout = hf_to_official(state_dict, source), "Hugging Face DINOv3ViTModel"
    else:
        sd = {k: _to_numpy(v) for k, v in state_dict.items()}
        layout = "official facebookresearch/dinov3"
    problems: list[str] = []
    _check_buffers(sd, num_heads, rope_base, problems)
    depth = _depth(sd, _BLOCK)
    expected = set(TOP_KEYS) | {f"blocks.{i}.{n}" for i in range(depth) for n in BLOCK_KEYS}
    missing = [k for k in TOP_KEYS if k not in sd]
    missing += [f"blocks.{i}.{n}" for i in range(depth) for n in BLOCK_KEYS
                if f"blocks.{i}.{n}" not in sd]
    if depth == 0:
        missing.append("blocks.0.* (no transformer blocks at all)")
    unknown = [k for k in sd if k not in expected and k != "storage_tokens"]
    if unknown or missing or problems:
        raise _error(source, layout, unknown, missing, problems)
    return sd


def load_dinov3_state_dict(path: str | os.PathLike, *, num_heads: int | None = 16,
                           rope_base: float = 100.0) -> dict[str, np.ndarray]:
    """Read a DINOv3 ViT weight file (official .pth, or HF .safetensors/.bin) and return
    the official-named parameters ``DinoV3VisionTransformer`` loads (``to_official``)."""
    return to_official(read_state_dict(path), num_heads=num_heads, rope_base=rope_base,
                       source=os.fspath(path))
