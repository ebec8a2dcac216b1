"""What differs between MFuser's variants and what they share: the towers built from a model
config (one path for the model and the weight converters), which parameters train, and
which train without weight decay.

What differs is asked of the towers' specs (``mfuser_jax.towers``: ``config.vlm`` and
``config.vfm`` name them); what is shared lives here. Follows devinxzhang/MFuser's
segmentors (mfuser_clip.py, mfuser_eva_clip.py, mfuser_siglip.py) and their optimizer
configs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from mfuser_jax.towers.registry import get_vfm, get_vlm

__all__ = ["ENCODER_PREFIXES", "TRAINABLE_PREFIXES", "build_backbone", "build_text_encoder",
           "build_tokenizer", "build_towers", "is_pretrained_path", "is_trainable_path",
           "no_decay_filter_for", "pretrained_filter", "tokenizer_path", "tower_config",
           "trainable_filter", "vfm_config", "vfm_fusion_args", "vfm_spec", "vlm_spec"]

# What the reference leaves trainable: in the backbone only the adapters (MVFusers and
# proj1/2/3) and the FPN; everything in the two image towers and the text tower is frozen.
TRAINABLE_PREFIXES = (
    ("backbone", "adapter"),
    ("backbone", "adapter_proj1"),
    ("backbone", "adapter_proj2"),
    ("backbone", "adapter_proj3"),
    ("backbone", "fpn1"),
    ("backbone", "fpn2"),
    ("contexts",),
    ("gamma",),
    ("context_decoder",),
    ("decode_head",),
)
# Weight decay as the reference's optimizer config sets it: mmcv's DefaultOptimizerConstructor
# gives decay_mult 0 to parameters whose full name contains one of these custom_keys and
# full weight decay to everything else — biases, BatchNorm/GroupNorm scales, gamma, A_log
# and D included (its bias/norm multipliers default to 1; mamba's _no_weight_decay tags are
# not read by mmcv). Our module paths spell the same names. Each VLM's spec holds its keys
# (``TowerConfig.no_decay_keys``).


def is_trainable_path(path: Sequence) -> bool:
    path = tuple(str(p) for p in path)
    return any(path[: len(prefix)] == prefix for prefix in TRAINABLE_PREFIXES)


def trainable_filter(path, value) -> bool:
    """nnx filter: the parameters the reference trains."""
    return isinstance(value, nnx.Param) and is_trainable_path(path)


# The converted-encoder checkpoint (model/pretrained.py) holds every frozen parameter
# under these: the towers of the fused backbone (the VLM image tower's at its top level,
# next to the trainable adapters and FPN) and the text tower.
ENCODER_PREFIXES = ("backbone", "text_encoder")


def is_pretrained_path(path: Sequence) -> bool:
    path = tuple(str(p) for p in path)
    return bool(path) and path[0] in ENCODER_PREFIXES and not is_trainable_path(path)


def pretrained_filter(path, value) -> bool:
    """nnx filter: the frozen encoder parameters ``load_pretrained`` fills from the
    converted-encoder checkpoint (so a model built for loading need not compute them)."""
    return isinstance(value, nnx.Param) and is_pretrained_path(path)


def no_decay_filter_for(vlm: str):
    """nnx filter: the parameters the reference trains without weight decay."""
    keys = get_vlm(vlm).config.no_decay_keys

    def no_decay(path, value) -> bool:
        name = ".".join(str(p) for p in path)
        return isinstance(value, nnx.Param) and any(k in name for k in keys)

    return no_decay


def vlm_spec(config):
    """The spec of ``config.vlm`` (an unknown vlm: ValueError listing the registered)."""
    return get_vlm(config.vlm)


def vfm_spec(config):
    """The spec of ``config.vfm`` (an unknown vfm: ValueError listing the registered)."""
    return get_vfm(config.vfm)


def tower_config(config):
    """``config[config.vlm]``: the section of the VLM towers (an unknown vlm: ValueError)."""
    vlm_spec(config)
    return config[config.vlm]


def vfm_config(config):
    """``config[config.vfm]``: the section of the VFM tower (an unknown vfm: ValueError)."""
    vfm_spec(config)
    return config[config.vfm]


def vfm_fusion_args(spec, c, *, image_size, patch_size, layers, dtype=jnp.float32) -> dict:
    """The ``FusedBackbone`` arguments that bring the VFM of ``spec`` (section ``c``): its
    builder (at the fused depth and the model's patch size), name, width and statistics."""

    def build_vfm(rngs):
        return spec.build.tower(c, image_size=image_size, patch_size=patch_size,
                                layers=layers, dtype=dtype, rngs=rngs)

    return dict(vfm=build_vfm, vfm_name=spec.name, vfm_dim=c.embed_dim,
                vfm_mean=spec.build.mean, vfm_std=spec.build.std)


def build_backbone(config, dtype, rngs):
    """The fused backbone of config.vlm and config.vfm: the VLM image tower and the VFM at
    the model config's sizes, the MVFusers and the FPN. Also what the encoder converter
    builds."""
    c, mv = tower_config(config), config.mvfuser
    vfm = vfm_fusion_args(vfm_spec(config), vfm_config(config), image_size=config.image_size,
                          patch_size=config.patch_size, layers=c.layers, dtype=dtype)
    return vlm_spec(config).build.backbone.from_config(
        c, image_size=config.image_size, patch_size=config.patch_size, **vfm,
        out_indices=config.out_indices, d_state=mv.d_state, d_conv=mv.d_conv,
        expand=mv.expand, scan_backend=mv.scan_backend, remat=bool(config.remat),
        scan=bool(config.scan_layers), dtype=dtype, rngs=rngs,
    )


def build_text_encoder(config, *, dtype=jnp.float32, rngs: nnx.Rngs):
    """The variant's text tower with MFuser's positions (name tokens + learned contexts)."""
    c = tower_config(config)
    return vlm_spec(config).build.text(c, context_length=c.token_length + c.n_ctx,
                                       dtype=dtype, rngs=rngs)


def build_tokenizer(config):
    """tokenize(names) -> (K, token_length) ids for config.vlm."""
    spec = vlm_spec(config)
    return spec.build.tokenizer(tower_config(config), tokenizer_path(config))


def build_towers(config, dtype, rngs):
    """(fused backbone, text tower, tokenize(names) -> (K, token_length) ids) for config.vlm."""
    backbone = build_backbone(config, dtype, rngs)
    text = build_text_encoder(config, dtype=dtype, rngs=rngs)
    return backbone, text, build_tokenizer(config)


def tokenizer_path(config) -> str | None:
    """The file the VLM's tokenizer reads (``VLMBuild.tokenizer_file``, e.g. SigLIP's
    spiece.model): config[vlm].tokenizer, else <pretrained>/<file> (scripts/convert_weights.py
    copies it there). None for a VLM that needs none; FileNotFoundError when it is missing."""
    spec = vlm_spec(config)
    if not spec.build.tokenizer_file:
        return None
    path = config[spec.name].tokenizer or (
        os.path.join(config.pretrained, spec.build.tokenizer_file) if config.pretrained else "")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"the {spec.name} variant needs {spec.build.tokenizer_source}: pass it to "
            f"scripts/convert_weights.py --{spec.tokenizer_flag}, or set "
            f"--config.model.{spec.name}.tokenizer=PATH"
            + (f" (looked for {path})" if path else ""))
    return path
