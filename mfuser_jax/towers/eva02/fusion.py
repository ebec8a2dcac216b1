"""EVA02-CLIP-L/14-336 fused with the VFM: devinxzhang/MFuser models/backbones/eva_clip/
eva_vit_model.py ``EVAVisionTransformer.extract_feats``.

Patch 14 for both towers (2 x 1297 tokens at 512 px with DINOv2), no projections; the
embeddings are ``head(norm(eva) + vfm.norm(vfm))``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mfuser_jax.model.backbone import FusedBackbone
from mfuser_jax.towers.eva02.model import EVAVisionTransformer

__all__ = ["MFuserEVABackbone"]


class MFuserEVABackbone(FusedBackbone):
    """VFM-L/14 + EVA02-CLIP-L/14 fused by per-layer MVFusers (the EVA02 variant).

    Both towers keep patch 14 (the VFM kernel is not resized): at 512 px a 36 x 36 grid,
    1297 tokens each. Embeddings: EVA's ``head(norm(eva) + vfm.norm(dino))``.
    """

    @classmethod
    def from_config(cls, c, **fusion):
        """From the VLM's config section ``c`` and what every variant shares."""
        return cls(width=c.width, layers=c.layers, heads=c.heads,
                   output_dim=c.output_dim, mlp_ratio=c.mlp_ratio,
                   pt_hw_seq_len=c.pt_hw_seq_len, **fusion)

    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int,
                 heads: int, mlp_ratio: float, output_dim: int, pt_hw_seq_len: int,
                 dtype=jnp.float32, rngs: nnx.Rngs, **fusion):
        eva = EVAVisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=width, depth=layers,
            num_heads=heads, mlp_ratio=mlp_ratio, output_dim=output_dim,
            pt_hw_seq_len=pt_hw_seq_len, dtype=dtype, rngs=rngs,
        )
        super().__init__(eva, layers=layers, width=width, dtype=dtype, rngs=rngs, **fusion)

    def embeddings(self, eva_x, dino_x):
        tokens = (self.vlm.norm(eva_x.astype(jnp.float32))
                  + self.vfm.norm(
                      self.vfm_tokens_without_registers(dino_x).astype(jnp.float32)))
        emb = self.vlm.head(tokens).astype(jnp.float32)
        return emb[:, :1], emb[:, 1:]
