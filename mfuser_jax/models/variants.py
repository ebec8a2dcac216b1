"""What differs between MFuser's variants (config.vlm: "clip", "eva02", "siglip") and what
they share: the towers built from a model config (one path for the model and the weight
converters), which parameters train, and which train without weight decay.

Follows devinxzhang/MFuser's segmentors (mfuser_clip.py, mfuser_eva_clip.py,
mfuser_siglip.py) and their optimizer configs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfuser_jax.models.backbone import MFuserBackbone, MFuserEVABackbone, MFuserSiglipBackbone
from mfuser_jax.models.clip import CLIPTextContextEncoder
from mfuser_jax.models.siglip import SiglipTextTransformer
from mfuser_jax.models.siglip_tokenizer import SiglipTokenizer
from mfuser_jax.models.tokenizer import tokenize

__all__ = ["ENCODER_PREFIXES", "NO_DECAY_KEYS", "TRAINABLE_PREFIXES", "build_text_encoder",
           "build_towers", "is_pretrained_path", "is_trainable_path", "no_decay_filter_for",
           "pretrained_filter", "tower_config", "trainable_filter"]

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
# not read by mmcv). Our module paths spell the same names.
NO_DECAY_KEYS = {
    "clip": ("norm",),
    "eva02": ("norm", "level_embed", "query_embed"),
    "siglip": ("norm", "level_embed", "query_embed"),
}


def is_trainable_path(path: Sequence) -> bool:
    path = tuple(str(p) for p in path)
    return any(path[: len(prefix)] == prefix for prefix in TRAINABLE_PREFIXES)


def trainable_filter(path, value) -> bool:
    """nnx filter: the parameters the reference trains."""
    return isinstance(value, nnx.Param) and is_trainable_path(path)


# The converted-encoder checkpoint (convert/pretrained.py) holds every frozen parameter
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
    keys = NO_DECAY_KEYS[vlm]

    def no_decay(path, value) -> bool:
        name = ".".join(str(p) for p in path)
        return isinstance(value, nnx.Param) and any(k in name for k in keys)

    return no_decay


def tower_config(config):
    """``config[config.vlm]``: the section of the VLM towers (an unknown vlm: ValueError)."""
    if config.vlm not in NO_DECAY_KEYS:
        raise ValueError(f"vlm={config.vlm!r}: choose 'clip', 'eva02' or 'siglip'")
    return config[config.vlm]


def build_towers(config, dtype, rngs):
    """(fused backbone, text tower, tokenize(names) -> (K, token_length) ids) for config.vlm."""
    vlm, c, d, mv = config.vlm, tower_config(config), config.dinov2, config.mvfuser
    fusion = dict(
        image_size=config.image_size, patch_size=config.patch_size, width=c.width,
        layers=c.layers, heads=c.heads, dino_dim=d.embed_dim, dino_heads=d.num_heads,
        dino_mlp_ratio=d.mlp_ratio, dino_init_values=d.init_values,
        out_indices=config.out_indices, d_state=mv.d_state, d_conv=mv.d_conv,
        expand=mv.expand, scan_backend=mv.scan_backend,
        remat=bool(config.remat), scan=bool(config.scan_layers),
        dtype=dtype, rngs=rngs,
    )
    if vlm == "clip":
        backbone = MFuserBackbone(output_dim=c.output_dim, drop_path_rate=c.drop_path_rate,
                                  **fusion)
    elif vlm == "eva02":
        backbone = MFuserEVABackbone(output_dim=c.output_dim, mlp_ratio=c.mlp_ratio,
                                     pt_hw_seq_len=c.pt_hw_seq_len, **fusion)
    else:
        backbone = MFuserSiglipBackbone(intermediate_size=c.intermediate_size, **fusion)
    text = build_text_encoder(config, dtype=dtype, rngs=rngs)
    if vlm == "siglip":
        spm = SiglipTokenizer(_siglip_tokenizer_path(config))

        def tokenizer(names):
            return np.asarray(spm.tokenize(names, c.token_length))
    else:  # EVA02-CLIP uses OpenAI's BPE vocabulary too
        def tokenizer(names):
            return np.asarray(tokenize(names, context_length=c.token_length))
    return backbone, text, tokenizer


def build_text_encoder(config, *, dtype=jnp.float32, rngs: nnx.Rngs):
    """The variant's text tower with MFuser's positions (name tokens + learned contexts)."""
    vlm, c = config.vlm, tower_config(config)
    context_length = c.token_length + c.n_ctx
    if vlm == "siglip":
        return SiglipTextTransformer(
            context_length=context_length, vocab_size=c.vocab_size, hidden_size=c.text_width,
            num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
            intermediate_size=c.text_intermediate_size, dtype=dtype, rngs=rngs)
    return CLIPTextContextEncoder(  # CLIP: QuickGELU; EVA02-CLIP (open_clip): exact GELU
        context_length=context_length, vocab_size=c.vocab_size, width=c.text_width,
        heads=c.text_heads, layers=c.text_layers, embed_dim=c.output_dim,
        activation=c.text_activation, dtype=dtype, rngs=rngs)


def _siglip_tokenizer_path(config) -> str:
    """SigLIP's SentencePiece model: config.siglip.tokenizer, else <pretrained>/spiece.model
    (scripts/convert_weights.py copies it there)."""
    path = config.siglip.tokenizer or (
        os.path.join(config.pretrained, "spiece.model") if config.pretrained else "")
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            "the SigLIP variant needs SigLIP's SentencePiece vocabulary (spiece.model from "
            "google/siglip-large-patch16-384): pass it to scripts/convert_weights.py "
            "--siglip_tokenizer, or set --config.model.siglip.tokenizer=PATH"
            + (f" (looked for {path})" if path else ""))
    return path
