"""CLIP ViT-L/14-336 (OpenAI) as MFuser's VLM: the paper's main variant.

Follows devinxzhang/MFuser's models/segmentors/mfuser_clip.py (MFuser_CLIP) and its CLIP
configs: the fused backbone with ``adapter_proj{1,2,3}`` (``fusion.MFuserBackbone``),
the CoOp text encoder (QuickGELU), OpenAI's BPE tokenizer with 5 name tokens + 5 learned
contexts, weight decay 1e-4 with only 'norm' at decay_mult 0, and the score map over the
loss temperature.
"""

from __future__ import annotations

import numpy as np

from mfuser_jax.towers.clip.convert import mfuser_clip_state_dicts
from mfuser_jax.towers.clip.fusion import MFuserBackbone
from mfuser_jax.towers.clip.model import CLIPTextContextEncoder
from mfuser_jax.towers.clip.tokenizer import tokenize
from mfuser_jax.towers.clip.config import CONFIG
from mfuser_jax.towers.spec import VLMBuild, VLMRelease, VLMSpec, Weights


def build_text(c, *, context_length, dtype, rngs):
    """CLIP's text tower with MFuser's positions (also EVA02-CLIP's, with exact GELU)."""
    return CLIPTextContextEncoder(
        context_length=context_length, vocab_size=c.vocab_size, width=c.text_width,
        heads=c.text_heads, layers=c.text_layers, embed_dim=c.output_dim,
        activation=c.text_activation, dtype=dtype, rngs=rngs)


def bpe_tokenizer(c, path):
    """OpenAI's BPE vocabulary (shipped in models/assets), ``c.token_length`` ids per name."""
    del path  # the vocabulary ships with the package

    def tokenizer(names):
        return np.asarray(tokenize(names, context_length=c.token_length))

    return tokenizer


def convert_encoder(state_dict, *, img_size, patch_size, context_length):
    """OpenAI TorchScript / HF CLIPModel weights -> (image tower, text tower, no extras)."""
    visual, text = mfuser_clip_state_dicts(state_dict, patch_size=patch_size, img_size=img_size,
                                           context_length=context_length)
    return visual, text, {}


SPEC = VLMSpec(
    name="clip",
    title="CLIP ViT-L/14-336",
    config=CONFIG,
    build=VLMBuild(backbone=MFuserBackbone, text=build_text, tokenizer=bpe_tokenizer,
                   analytic_flops=True),
    weights=Weights(convert=convert_encoder, file="ViT-L-14-336px.pt",
                    help="CLIP ViT-L/14-336 weights (OpenAI .pt or HF), for vlm=clip"),
    release=VLMRelease(key="backbone.conv1.weight"),
)
