"""CLIP ViT-L/14-336 fused with the VFM: devinxzhang/MFuser models/backbones/clip/models.py
``CLIPVisionTransformer`` (its forward with the DINOv2 tower and the MVFusers).

The only variant with ``adapter_proj{1,2,3}``: VFM tokens go through proj1 into the fuser,
its VFM half back through proj2, and proj3 maps the last VFM tokens onto CLIP's before
``ln_post``/``proj``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mfuser_jax.model.backbone import FusedBackbone
from mfuser_jax.towers.clip.model import CLIPVisionTransformer

__all__ = ["MFuserBackbone"]


class MFuserBackbone(FusedBackbone):
    """A VFM + CLIP ViT-L fused by per-layer MVFusers (the CLIP variant).

    The only variant with ``adapter_proj{1,2,3}``; the embeddings are CLIP's
    ``ln_post``/``proj`` of clip tokens + proj3(VFM tokens) (dim ``output_dim``).
    """

    @classmethod
    def from_config(cls, c, **fusion):
        """From the VLM's config section ``c`` and what every variant shares."""
        return cls(width=c.width, layers=c.layers, heads=c.heads,
                   output_dim=c.output_dim, drop_path_rate=c.drop_path_rate, **fusion)

    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int, drop_path_rate: float, dtype=jnp.float32,
                 rngs: nnx.Rngs, **fusion):
        clip = CLIPVisionTransformer(
            input_resolution=image_size, patch_size=patch_size, width=width, layers=layers,
            heads=heads, output_dim=output_dim, drop_path_rate=drop_path_rate,
            dtype=dtype, rngs=rngs,
        )
        super().__init__(clip, layers=layers, width=width, projections=True, dtype=dtype,
                         rngs=rngs, **fusion)

    def embeddings(self, clip_x, dino_x):
        vfm_x = self.vfm_tokens_without_registers(dino_x)  # [class, patches], as CLIP's
        tokens = clip_x.astype(jnp.float32) + self.adapter_proj3(vfm_x).astype(jnp.float32)
        emb = self.vlm.embed(tokens)  # ln_post, proj
        return emb[:, :1], emb[:, 1:]
