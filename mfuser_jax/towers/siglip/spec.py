"""SigLIP-L/16-384 as MFuser's VLM.

Follows devinxzhang/MFuser's models/segmentors/mfuser_siglip.py (MFuser_SIGLIP) and its
SigLIP configs: no projections (embedding dim = width; ``fusion.MFuserSiglipBackbone``), HF's SigLIP text tower, the SentencePiece tokenizer of
google/siglip-large-patch16-384 (not shipped: given to convert_weights.py and copied beside
the converted weights), weight decay 1e-5 with 'norm', 'level_embed' and 'query_embed' at
decay_mult 0, and the sigmoid-calibrated score-map logits (cosine * exp(logit_scale) +
logit_bias, temperature 1). Its releases lack logit_scale/logit_bias (the original reads
them from the SigLIP file) and hold never-called ``adapter_proj{1,2,3}`` and both towers'
``position_ids`` buffers (recomputed here).
"""

from __future__ import annotations

import numpy as np

from mfuser_jax.towers.siglip.convert import siglip_state_dicts
from mfuser_jax.towers.siglip.fusion import MFuserSiglipBackbone
from mfuser_jax.towers.siglip.model import SiglipTextTransformer
from mfuser_jax.towers.siglip.tokenizer import SiglipTokenizer
from mfuser_jax.towers.siglip.config import CONFIG
from mfuser_jax.towers.spec import VLMBuild, VLMRelease, VLMSpec, Weights

SCALARS = ("backbone.logit_scale", "backbone.logit_bias")


def build_text(c, *, context_length, dtype, rngs):
    return SiglipTextTransformer(
        context_length=context_length, vocab_size=c.vocab_size, hidden_size=c.text_width,
        num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads,
        intermediate_size=c.text_intermediate_size, dtype=dtype, rngs=rngs)


def sentencepiece_tokenizer(c, path):
    spm = SiglipTokenizer(path)

    def tokenizer(names):
        return np.asarray(spm.tokenize(names, c.token_length))

    return tokenizer


def score_logits(backbone, score_map, temperature):
    """The reference's SigLIP loss: sigmoid-calibrated logits at temperature 1."""
    del temperature
    return backbone.score_logits(score_map), 1.0


def convert_encoder(state_dict, *, img_size, patch_size, context_length):
    """siglip_vitl16_384.pth / HF SiglipModel -> (image tower, text tower, the frozen
    logit_scale/logit_bias as (1,) float32 backbone arrays)."""
    visual, text, scalars = siglip_state_dicts(state_dict, img_size=img_size,
                                               patch_size=patch_size,
                                               context_length=context_length)
    return visual, text, {k: np.asarray(v, np.float32).reshape(1) for k, v in scalars.items()}


def scalars_from(state_dict):
    """{"logit_scale", "logit_bias"} from a SigLIP weight file's state dict."""
    return siglip_state_dicts(state_dict)[2]


def unused_projections(model_config):
    # SiglipVisionTransformer builds Linear(1024 = the VFM's (DINOv2-L's) width, width) and back, as the
    # CLIP variant does, but its forward never calls them.
    c, d = model_config[model_config.vlm], model_config[model_config.vfm]
    w, d, n = int(c.width), int(d.embed_dim), int(c.layers)
    linears = [*((f"adapter_proj1.{i}", w, d) for i in range(n)),
               *((f"adapter_proj2.{i}", d, w) for i in range(n)), ("adapter_proj3", w, d)]
    shapes = {}
    for name, out_dim, in_dim in linears:
        shapes[f"backbone.{name}.weight"] = (out_dim, in_dim)
        shapes[f"backbone.{name}.bias"] = (out_dim,)
    return shapes


def release_buffers(model):
    """The buffers MFuser_SIGLIP's releases hold, as the JAX model computes them: the
    ``position_ids`` of both towers' embeddings (siglip/modeling_siglip.py
    SiglipVisionEmbeddings and SiglipTextEmbeddings, ``persistent=False``, but mmcv's saver
    writes every buffer), int64 ``arange(positions)`` of shape (1, positions)."""
    gh, gw = model.backbone.vlm.embeddings.grid
    n_text = int(model.text_encoder.context_length)
    return {
        "backbone.embeddings.position_ids": (
            np.arange(gh * gw, dtype=np.int64)[None],
            f"the position indices of a {gh}x{gw} patch grid (was the checkpoint trained "
            "at another image size than config.model.image_size?)"),
        "text_encoder.embeddings.position_ids": (
            np.arange(n_text, dtype=np.int64)[None],
            f"the position indices of {n_text} text positions"),
    }


SPEC = VLMSpec(
    name="siglip",
    title="SigLIP-L/16-384",
    config=CONFIG,
    build=VLMBuild(
        backbone=MFuserSiglipBackbone, text=build_text, tokenizer=sentencepiece_tokenizer,
        tokenizer_file="spiece.model",
        tokenizer_source="SigLIP's SentencePiece vocabulary (spiece.model from "
                         "google/siglip-large-patch16-384)",
        score_logits=score_logits),
    weights=Weights(
        convert=convert_encoder, file="siglip_vitl16_384.pth",
        help="SigLIP-L/16-384 weights (siglip_vitl16_384.pth or HF), for vlm=siglip"),
    release=VLMRelease(
        key="backbone.embeddings.patch_embedding.weight",
        unused=(r"backbone\.adapter_proj[123]\.",), zeros=unused_projections,
        recomputed=release_buffers, scalars=SCALARS, scalars_from=scalars_from),
)
