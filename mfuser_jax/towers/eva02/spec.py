"""EVA02-CLIP-L/14-336 as MFuser's VLM.

Follows devinxzhang/MFuser's models/segmentors/mfuser_eva_clip.py (MFuser_EVA_CLIP) and its
EVA02 configs: rotary attention, SwiGLU and sub-LN in the image tower
(``fusion.MFuserEVABackbone``), patch 14 in both towers (36 x 36 tokens at 512 px),
open_clip's text tower (exact GELU) with 8 learned contexts, OpenAI's BPE tokenizer, weight
decay 1e-5 with 'norm', 'level_embed' and 'query_embed' at decay_mult 0. Its releases hold
the rotary tables and the text tower's causal mask as buffers (recomputed here) and an
unused ``random_text``.
"""

from __future__ import annotations

import numpy as np

from mfuser_jax.towers.clip.spec import bpe_tokenizer, build_text
from mfuser_jax.towers.eva02.convert import eva02_state_dicts
from mfuser_jax.towers.eva02.fusion import MFuserEVABackbone
from mfuser_jax.towers.eva02.config import CONFIG
from mfuser_jax.towers.spec import VLMBuild, VLMRelease, VLMSpec, Weights


def convert_encoder(state_dict, *, img_size, patch_size, context_length):
    """EVA02_CLIP_L_336_psz14_s6B.pt -> (image tower, text tower, no extras)."""
    visual, text = eva02_state_dicts(state_dict, img_size=img_size, patch_size=patch_size,
                                     context_length=context_length)
    return visual, text, {}


def release_buffers(model):
    """The buffers MFuser_EVA_CLIP's releases hold, as the JAX model computes them:

    * the rotary tables ``backbone.rope.freqs_{cos,sin}`` and one copy per block (persistent
      buffers of eva_clip/rope.py's VisionRotaryEmbeddingFast, shared by the blocks);
    * ``text_encoder.attn_mask``: the text tower's additive causal mask (eva_clip/
      transformer.py TextTransformer, ``persistent=False``, but mmcv's saver writes every
      buffer), float32 with -inf above the diagonal; the JAX tower masks causally itself.
    """
    size = int(model.config.image_size)
    grid = model.backbone.grid_size(size, size)
    cos, sin = (np.array(t, np.float32) for t in model.backbone.vlm.rope(grid))  # writable
    rope = (f"the rotary table of a {grid[0]}x{grid[1]} patch grid (was the checkpoint "
            "trained at another image size than config.model.image_size?)")
    buffers = {}
    for prefix in ["backbone.", *(f"backbone.blocks.{i}.attn." for i in
                                  range(int(model.config[model.vlm].layers)))]:
        buffers[prefix + "rope.freqs_cos"] = (cos, rope)
        buffers[prefix + "rope.freqs_sin"] = (sin, rope)
    n = int(model.text_encoder.context_length)
    mask = np.triu(np.full((n, n), -np.inf, np.float32), 1)  # build_attention_mask's
    buffers["text_encoder.attn_mask"] = (
        mask, f"the causal mask of {n} text positions (-inf above the diagonal, 0 elsewhere)")
    return buffers


def random_text(model_config):
    # MFuser_EVA_CLIP: nn.Parameter(torch.randn(num_classes, 768)), 768 whatever the size
    return {"random_text": (int(model_config.num_classes), 768)}


SPEC = VLMSpec(
    name="eva02",
    title="EVA02-CLIP-L/14-336",
    config=CONFIG,
    # EVA02-CLIP uses OpenAI's BPE vocabulary and CLIP's text tower (exact GELU) too
    build=VLMBuild(backbone=MFuserEVABackbone, text=build_text, tokenizer=bpe_tokenizer),
    weights=Weights(
        convert=convert_encoder, file="EVA02_CLIP_L_336_psz14_s6B.pt",
        help="EVA02-CLIP-L/14-336 weights (EVA02_CLIP_L_336_psz14_s6B.pt), for vlm=eva02"),
    release=VLMRelease(
        key="backbone.patch_embed.proj.weight",
        # MFuser_EVA_CLIP creates this parameter and never reads it
        unused=(r"random_text$",), zeros=random_text, recomputed=release_buffers),
)
