"""The fused backbone: CLIP block i, DINOv2 block i, MVFuser i, layer by layer, then an FPN.

Ported from MFuser's ``CLIPVisionTransformer`` (devinxzhang/MFuser,
models/backbones/clip/models.py), which owns the CLIP tower's own parameters at top level
(conv1, transformer.resblocks, ln_post, proj, ...) next to ``dinov2``, ``adapter``,
``adapter_proj{1,2,3}`` and ``fpn{1,2,3,4}``. Subclassing our CLIP tower keeps exactly those
parameter names, so a released checkpoint's ``backbone.*`` keys load by rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mfuser_jax.models.clip import CLIPVisionTransformer
from mfuser_jax.models.dinov2 import DinoVisionTransformer
from mfuser_jax.models.layers import GELU
from mfuser_jax.models.mvfuser import MVFuser

__all__ = ["FPN_OUTPUT_STRIDES", "MFuserBackbone", "normalize_for_clip", "normalize_for_dinov2"]

# Pixel statistics in 0..255 units, as the reference's data pipeline and backbone use them.
CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
FPN_OUTPUT_STRIDES = (4, 8, 16, 32)


def normalize_for_clip(images: jax.Array) -> jax.Array:
    """uint8/float pixels in 0..255 (NHWC) -> CLIP-normalised float32."""
    x = images.astype(jnp.float32)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def normalize_for_dinov2(clip_normalized: jax.Array) -> jax.Array:
    """Re-normalise a CLIP-normalised input with ImageNet statistics, as the reference does."""
    pixels = clip_normalized * jnp.asarray(CLIP_STD) + jnp.asarray(CLIP_MEAN)
    return (pixels - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


class _MaxPool2x2(nnx.Module):
    def __call__(self, x):
        return nnx.max_pool(x, (2, 2), strides=(2, 2))


class _Identity(nnx.Module):
    def __call__(self, x):
        return x


class MFuserBackbone(CLIPVisionTransformer):
    """Two frozen towers fused by per-layer MVFusers; returns FPN maps and CLIP embeddings.

    ``__call__(images)`` with CLIP-normalised NHWC images returns ``(features, global_embedding,
    pixel_embeddings)``: four NHWC maps at strides 4, 8, 16, 32 with
    ``clip_width + dino_dim`` channels, the CLS embedding (B, 1, output_dim) and the pixel
    embeddings (B, h, w, output_dim) used for text alignment.
    """

    def __init__(
        self,
        *,
        image_size: int = 512,
        patch_size: int = 16,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        output_dim: int = 768,
        drop_path_rate: float = 0.1,
        dino_dim: int = 1024,
        dino_heads: int = 16,
        dino_mlp_ratio: float = 4.0,
        dino_init_values: float = 1e-5,
        out_indices: Sequence[int] = (7, 11, 15, 23),
        d_state: int = 16,
        d_conv: int = 3,
        expand: int = 1,
        scan_backend: str = "auto",
        remat: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            input_resolution=image_size, patch_size=patch_size, width=width, layers=layers,
            heads=heads, output_dim=output_dim, drop_path_rate=drop_path_rate,
            dtype=dtype, rngs=rngs,
        )
        if len(out_indices) != 4 or max(out_indices) >= layers:
            raise ValueError(f"out_indices {tuple(out_indices)} must name 4 of the {layers} layers")
        self.out_indices = tuple(int(i) for i in out_indices)
        self.remat = remat
        self.dinov2 = DinoVisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=dino_dim, depth=layers,
            num_heads=dino_heads, mlp_ratio=dino_mlp_ratio, init_values=dino_init_values,
            dtype=dtype, rngs=rngs,
        )
        linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)  # noqa: E731
        self.adapter = nnx.List([
            MVFuser(width, d_state=d_state, d_conv=d_conv, expand=expand,
                    scan_backend=scan_backend, dtype=dtype, rngs=rngs)
            for _ in range(layers)
        ])
        self.adapter_proj1 = nnx.List([linear(dino_dim, width) for _ in range(layers)])
        self.adapter_proj2 = nnx.List([linear(width, dino_dim) for _ in range(layers)])
        self.adapter_proj3 = linear(dino_dim, width)

        fpn_dim = width + dino_dim
        up = lambda: nnx.ConvTranspose(  # noqa: E731
            fpn_dim, fpn_dim, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
            param_dtype=jnp.float32, rngs=rngs,
        )
        # SyncBatchNorm in the reference: under jit a batch sharded over devices is reduced
        # globally, so plain BatchNorm here has SyncBN's statistics. PyTorch momentum 0.1.
        self.fpn1 = nnx.List([
            up(), nnx.BatchNorm(fpn_dim, momentum=0.9, epsilon=1e-5, dtype=jnp.float32, rngs=rngs),
            GELU(), up(),
        ])
        self.fpn2 = nnx.List([up()])
        self.fpn3 = _Identity()
        self.fpn4 = _MaxPool2x2()

    def _fused_layer(self, index: int, clip_x: jax.Array, dino_x: jax.Array):
        clip_x = self.block(index, clip_x)
        dino_x = self.dinov2.blocks[index](dino_x)
        n_dino = dino_x.shape[1]
        fused = self.adapter[index](
            jnp.concatenate([self.adapter_proj1[index](dino_x).astype(clip_x.dtype), clip_x], axis=1)
        )
        dino_x = dino_x + self.adapter_proj2[index](fused[:, :n_dino]).astype(dino_x.dtype)
        clip_x = clip_x + fused[:, n_dino:].astype(clip_x.dtype)
        return clip_x, dino_x

    def __call__(self, images: jax.Array):
        b, height, width_px, _ = images.shape
        gh, gw = self.grid_size(height, width_px)
        dino_x = self.dinov2.prepare_tokens(normalize_for_dinov2(images))
        clip_x = self.prepare_tokens(images)

        layer = type(self)._fused_layer
        if self.remat:
            layer = nnx.remat(layer, static_argnums=(1,))
        maps = []
        for i in range(len(self.adapter)):
            clip_x, dino_x = layer(self, i, clip_x, dino_x)
            if i in self.out_indices:
                maps.append(jnp.concatenate([
                    dino_x[:, 1:].reshape(b, gh, gw, -1),
                    clip_x[:, 1:].reshape(b, gh, gw, -1).astype(dino_x.dtype),
                ], axis=-1))

        features = []
        for stage, x in zip((self.fpn1, self.fpn2, [self.fpn3], [self.fpn4]), maps):
            for op in stage:
                x = op(x)
            features.append(x)

        tokens = clip_x.astype(jnp.float32) + self.adapter_proj3(dino_x).astype(jnp.float32)
        embeddings = self.embed(tokens)  # ln_post, proj
        global_embedding = embeddings[:, :1]
        pixel_embeddings = embeddings[:, 1:].reshape(b, gh, gw, -1)
        return features, global_embedding, pixel_embeddings
