"""SigLIP-L/16-384 fused with the VFM: devinxzhang/MFuser models/backbones/siglip/
modeling_siglip.py ``SiglipVisionTransformer.forward``.

No class token on the SigLIP side (1025 + 1024 tokens with DINOv2), no projections (the
original builds adapter_proj1/2/3 but never calls them), and the modified attention-pooling
head gives the global and per-pixel embeddings.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mfuser_jax.model.backbone import FusedBackbone, renormalize
from mfuser_jax.towers.siglip.model import SiglipVisionTransformer

__all__ = ["MFuserSiglipBackbone"]

SIGLIP_MEAN = SIGLIP_STD = (0.5 * 255,) * 3


class MFuserSiglipBackbone(FusedBackbone):
    """A VFM + SigLIP-L/16 fused by per-layer MVFusers (the SigLIP variant).

    Images CLIP-normalised NHWC (re-normalised per tower); embedding dim ``width`` (SigLIP
    has no projection). ``logit_scale`` and ``logit_bias`` are SigLIP's frozen scalars: the
    reference reads them from the SigLIP checkpoint (not from its own state dict) to turn
    the score map into logits for the score-map loss.
    """

    @classmethod
    def from_config(cls, c, **fusion):
        """From the VLM's config section ``c`` and what every variant shares."""
        return cls(width=c.width, layers=c.layers, heads=c.heads,
                   intermediate_size=c.intermediate_size, **fusion)

    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int,
                 heads: int, intermediate_size: int, dtype=jnp.float32, rngs: nnx.Rngs,
                 **fusion):
        siglip = SiglipVisionTransformer(
            image_size=image_size, patch_size=patch_size, hidden_size=width,
            num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=intermediate_size, dtype=dtype, rngs=rngs,
        )
        super().__init__(siglip, layers=layers, width=width, dtype=dtype, rngs=rngs, **fusion)
        # HF SiglipModel's initial values; the converted SigLIP weights overwrite them.
        self.logit_scale = nnx.Param(jnp.full((1,), math.log(10.0), jnp.float32))
        self.logit_bias = nnx.Param(jnp.full((1,), -10.0, jnp.float32))

    def vlm_tokens(self, images):
        return self.vlm.prepare_tokens(renormalize(images, SIGLIP_MEAN, SIGLIP_STD))

    def embeddings(self, siglip_x, dino_x):
        patches = dino_x[:, self.vfm.num_prefix_tokens:]  # SigLIP has no class token
        tokens = (self.vlm.post_layernorm(siglip_x.astype(jnp.float32))
                  + self.vfm.norm(patches.astype(jnp.float32)))
        global_embedding, local = self.vlm.head(tokens)
        return global_embedding.astype(jnp.float32), local.astype(jnp.float32)

    def score_logits(self, score_map: jax.Array) -> jax.Array:
        """Cosine score map -> logits, ``score * exp(logit_scale) + logit_bias``."""
        return (score_map.astype(jnp.float32) * jnp.exp(self.logit_scale[...][0])
                + self.logit_bias[...][0])
