"""The fused backbone: VLM block i, DINOv2 block i, MVFuser i, layer by layer, then an FPN.

``FusedBackbone`` is a composition: the VLM image tower (``vlm``), the DINOv2 tower, one
MVFuser per layer (``adapter``) and the FPN. The towers expose a small protocol (below);
the 24 fused layers run as one ``lax.scan`` over their stacked parameters (see
``nn/stack.py``), rematerialised per layer when ``remat`` is set. The original
subclasses the VLM tower, so its parameters sit at the top of ``backbone.*`` next to
``dinov2``, ``adapter`` and ``fpn{1,2,3,4}``; ``flatten_children`` gives our ``vlm``
attribute the same place in every per-layer name, and a released checkpoint's keys load by
rule. One subclass per VLM:

* ``MFuserBackbone`` (CLIP ViT-L/14-336): devinxzhang/MFuser models/backbones/clip/models.py
  ``CLIPVisionTransformer``. The only variant with ``adapter_proj{1,2,3}``: DINOv2 tokens go
  through proj1 into the fuser, its DINOv2 half back through proj2, and proj3 maps the last
  DINOv2 tokens onto CLIP's before ``ln_post``/``proj``.
* ``MFuserEVABackbone`` (EVA02-CLIP-L/14-336): models/backbones/eva_clip/eva_vit_model.py
  ``EVAVisionTransformer.extract_feats``. Patch 14 for both towers (2 x 1297 tokens at 512
  px), no projections; the embeddings are ``head(norm(eva) + dinov2.norm(dino))``.
* ``MFuserSiglipBackbone`` (SigLIP-L/16-384): models/backbones/siglip/modeling_siglip.py
  ``SiglipVisionTransformer.forward``. No class token on the SigLIP side (1025 + 1024
  tokens), no projections (the original builds adapter_proj1/2/3 but never calls them), and
  the modified attention-pooling head gives the global and per-pixel embeddings.

Every variant returns ``(features, global_embedding, pixel_embeddings)``: four NHWC maps
(patch strides / 4, 2, 1, x2 — pixel strides 4, 8, 16, 32 at patch 16) with
``vlm_width + dino_dim`` channels, the global embedding (B, 1, E) and the pixel embeddings
(B, h, w, E) that are aligned with the text embeddings.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from mfuser_jax.towers.clip.model import CLIPVisionTransformer
from mfuser_jax.towers.dinov2.model import DinoVisionTransformer
from mfuser_jax.towers.eva02.model import EVAVisionTransformer
from mfuser_jax.nn.layers import GELU, torch_conv_transpose, torch_linear
from mfuser_jax.model.mvfuser import MVFuser
from mfuser_jax.towers.siglip.model import SiglipVisionTransformer
from mfuser_jax.nn.stack import LayerStack, emit_group, scan_layers

__all__ = ["FusedBackbone", "MFuserBackbone", "MFuserEVABackbone", "MFuserSiglipBackbone",
           "VisionTower", "normalize_for_clip", "normalize_for_dinov2", "normalize_for_siglip"]

# Pixel statistics in 0..255 units, as the reference's data pipeline and backbones use them.
CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
SIGLIP_MEAN = SIGLIP_STD = (0.5 * 255,) * 3


def normalize_for_clip(images: jax.Array) -> jax.Array:
    """uint8/float pixels in 0..255 (NHWC) -> CLIP-normalised float32 (the data pipeline's
    normalisation in the reference; EVA02-CLIP uses the same statistics)."""
    x = images.astype(jnp.float32)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def _renormalize(clip_normalized: jax.Array, mean, std) -> jax.Array:
    # The reference un-normalises the CLIP-normalised batch and normalises it again per tower.
    pixels = clip_normalized * jnp.asarray(CLIP_STD) + jnp.asarray(CLIP_MEAN)
    return (pixels - jnp.asarray(mean)) / jnp.asarray(std)


def normalize_for_dinov2(clip_normalized: jax.Array) -> jax.Array:
    """Re-normalise a CLIP-normalised input with ImageNet statistics, as the reference does."""
    return _renormalize(clip_normalized, IMAGENET_MEAN, IMAGENET_STD)


def normalize_for_siglip(clip_normalized: jax.Array) -> jax.Array:
    """Re-normalise a CLIP-normalised input with SigLIP's mean = std = 0.5."""
    return _renormalize(clip_normalized, SIGLIP_MEAN, SIGLIP_STD)


class VisionTower(Protocol):
    """What the fused backbone asks of an image tower (CLIP, EVA02, SigLIP, DINOv2)."""

    blocks: LayerStack

    def grid_size(self, height: int, width: int) -> tuple[int, int]: ...
    def prepare_tokens(self, images: jax.Array) -> jax.Array: ...
    def layer_inputs(self, key: jax.Array | None) -> Any: ...   # per-layer scan inputs
    def block_aux(self, grid: tuple[int, int]) -> Any: ...       # shared by all blocks
    @staticmethod
    def block(layer: nnx.Module, x: jax.Array, layer_input: Any = None, aux: Any = None
              ) -> jax.Array: ...


class _MaxPool2x2(nnx.Module):
    def __call__(self, x):
        return nnx.max_pool(x, (2, 2), strides=(2, 2))


class _Identity(nnx.Module):
    def __call__(self, x):
        return x


def _identity(x):
    return x


class FusedBackbone(nnx.Module):
    """A VLM tower and DINOv2 fused by per-layer MVFusers, then the FPN.

    ``__call__(images, key=None)`` takes CLIP-normalised NHWC images; ``key`` drives drop
    path and the fusers' dropout in train mode. ``remat``: recompute each fused layer in the
    backward pass, keeping only the two token streams between layers. ``scan``: False runs
    the same stacked layers in an unrolled Python loop (every layer compiled separately, and
    XLA keeps every layer's activations whatever ``remat`` says). The sizes have no defaults
    here or in the subclasses: ``models.variants.build_towers`` passes the model config's.
    """

    flatten_children = ("vlm",)

    def __init__(self, vlm: nnx.Module, *, image_size, patch_size, layers, width, dino_dim,
                 dino_heads, dino_mlp_ratio, dino_init_values, out_indices, d_state, d_conv,
                 expand, scan_backend, remat=False, scan=True, projections=False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if len(out_indices) != 4 or max(out_indices) >= layers:
            raise ValueError(f"out_indices {tuple(out_indices)} must name 4 of the {layers} layers")
        self.out_indices = tuple(int(i) for i in out_indices)
        self.remat = bool(remat)
        self.scan = bool(scan)
        self.vlm = vlm
        self.dinov2 = DinoVisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=dino_dim, depth=layers,
            num_heads=dino_heads, mlp_ratio=dino_mlp_ratio, init_values=dino_init_values,
            dtype=dtype, rngs=rngs,
        )
        self.adapter = LayerStack(
            lambda r: MVFuser(width, d_state=d_state, d_conv=d_conv, expand=expand,
                              scan_backend=scan_backend, dtype=dtype, rngs=r),
            layers, rngs=rngs)
        self.projections = bool(projections)
        if projections:  # CLIP only: DINOv2 tokens in through proj1, back through proj2
            # Plain nn.Linear in the original (init_weights only loads the CLIP file):
            # torch's default init.
            linear = lambda i, o, r: torch_linear(i, o, dtype=dtype, rngs=r)  # noqa: E731
            self.adapter_proj1 = LayerStack(lambda r: linear(dino_dim, width, r), layers,
                                            rngs=rngs)
            self.adapter_proj2 = LayerStack(lambda r: linear(width, dino_dim, r), layers,
                                            rngs=rngs)
            self.adapter_proj3 = linear(dino_dim, width, rngs)
        fpn_dim = width + dino_dim
        # Plain nn.ConvTranspose2d in the original, never re-initialised: torch's default init.
        up = lambda: torch_conv_transpose(fpn_dim, fpn_dim, 2, stride=2, dtype=dtype, rngs=rngs)  # noqa: E731
        # SyncBatchNorm in the reference: under jit a batch sharded over devices is reduced
        # globally, so plain BatchNorm here has SyncBN's statistics. PyTorch momentum 0.1.
        self.fpn1 = nnx.List([
            up(), nnx.BatchNorm(fpn_dim, momentum=0.9, epsilon=1e-5, dtype=jnp.float32, rngs=rngs),
            GELU(), up(),
        ])
        self.fpn2 = nnx.List([up()])
        self.fpn3 = _Identity()
        self.fpn4 = _MaxPool2x2()

    @property
    def num_layers(self) -> int:
        return len(self.adapter)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return self.vlm.grid_size(height, width)

    def _run_layers(self, vlm_x, dino_x, grid, key):
        """All fused layers; returns the last tokens of both towers and the four maps
        [DINOv2 patches, VLM patches] (channels-last) taken after the ``out_indices`` layers."""
        vlm, dino, n = self.vlm, self.dinov2, self.num_layers
        keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
        xs = (vlm.layer_inputs(keys[0]), dino.layer_inputs(keys[1]),
              None if key is None else jax.random.split(keys[2], n))
        stacks = (vlm.blocks, dino.blocks, self.adapter)
        if self.projections:
            stacks += (self.adapter_proj1, self.adapter_proj2)
        aux = vlm.block_aux(grid)
        n_patches = grid[0] * grid[1]

        def layer(layers, carry, x):
            vlm_x, dino_x = carry
            vlm_in, dino_in, fuser_key = x
            vlm_x = vlm.block(layers[0], vlm_x, vlm_in, aux)
            dino_x = dino.block(layers[1], dino_x, dino_in)
            into, back = layers[3:5] if self.projections else (_identity, _identity)
            n_dino = dino_x.shape[1]
            fused = layers[2](jnp.concatenate([into(dino_x).astype(vlm_x.dtype), vlm_x], axis=1),
                              key=fuser_key)
            return (vlm_x + fused[:, n_dino:].astype(vlm_x.dtype),
                    dino_x + back(fused[:, :n_dino]).astype(dino_x.dtype))

        def feature_map(carry):
            vlm_x, dino_x = carry
            b = dino_x.shape[0]
            return jnp.concatenate([
                dino_x[:, 1:].reshape(b, *grid, -1),
                vlm_x[:, vlm_x.shape[1] - n_patches:].reshape(b, *grid, -1).astype(dino_x.dtype),
            ], axis=-1)

        group = emit_group(self.out_indices, n)
        (vlm_x, dino_x), maps = scan_layers(
            layer, stacks, (vlm_x, dino_x), xs, remat=self.remat, unroll=not self.scan,
            group=group, emit=feature_map)
        return vlm_x, dino_x, [maps[(i + 1) // group - 1] for i in self.out_indices]

    def _fpn(self, maps):
        features = []
        for stage, x in zip((self.fpn1, self.fpn2, [self.fpn3], [self.fpn4]), maps):
            for op in stage:
                x = op(x)
            features.append(x)
        return features

    def __call__(self, images: jax.Array, *, key: jax.Array | None = None):
        b, height, width_px, _ = images.shape
        grid = self.grid_size(height, width_px)
        dino_x = self.dinov2.prepare_tokens(normalize_for_dinov2(images))
        vlm_x, dino_x, maps = self._run_layers(self.vlm_tokens(images), dino_x, grid, key)
        global_embedding, pixel_embeddings = self.embeddings(vlm_x, dino_x)
        return (self._fpn(maps), global_embedding,
                pixel_embeddings.reshape(b, *grid, pixel_embeddings.shape[-1]))

    def vlm_tokens(self, images: jax.Array) -> jax.Array:
        """The VLM tower's first tokens for CLIP-normalised images."""
        return self.vlm.prepare_tokens(images)

    def embeddings(self, vlm_x: jax.Array, dino_x: jax.Array):
        """(global (B, 1, E), per-patch (B, h*w, E)) float32 from the last tokens."""
        raise NotImplementedError


class MFuserBackbone(FusedBackbone):
    """DINOv2-L + CLIP ViT-L fused by per-layer MVFusers (the CLIP variant).

    The only variant with ``adapter_proj{1,2,3}``; the embeddings are CLIP's
    ``ln_post``/``proj`` of clip tokens + proj3(DINOv2 tokens) (dim ``output_dim``).
    """

    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int,
                 heads: int, output_dim: int, drop_path_rate: float, dtype=jnp.float32,
                 rngs: nnx.Rngs, **fusion):
        clip = CLIPVisionTransformer(
            input_resolution=image_size, patch_size=patch_size, width=width, layers=layers,
            heads=heads, output_dim=output_dim, drop_path_rate=drop_path_rate,
            dtype=dtype, rngs=rngs,
        )
        super().__init__(clip, image_size=image_size, patch_size=patch_size, layers=layers,
                         width=width, projections=True, dtype=dtype, rngs=rngs,
                         **fusion)

    def embeddings(self, clip_x, dino_x):
        tokens = clip_x.astype(jnp.float32) + self.adapter_proj3(dino_x).astype(jnp.float32)
        emb = self.vlm.embed(tokens)  # ln_post, proj
        return emb[:, :1], emb[:, 1:]


class MFuserEVABackbone(FusedBackbone):
    """DINOv2-L/14 + EVA02-CLIP-L/14 fused by per-layer MVFusers (the EVA02 variant).

    Both towers keep patch 14 (the DINOv2 kernel is not resized): at 512 px a 36 x 36 grid,
    1297 tokens each. Embeddings: EVA's ``head(norm(eva) + dinov2.norm(dino))``.
    """

    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int,
                 heads: int, mlp_ratio: float, output_dim: int, pt_hw_seq_len: int,
                 dtype=jnp.float32, rngs: nnx.Rngs, **fusion):
        eva = EVAVisionTransformer(
            img_size=image_size, patch_size=patch_size, embed_dim=width, depth=layers,
            num_heads=heads, mlp_ratio=mlp_ratio, output_dim=output_dim,
            pt_hw_seq_len=pt_hw_seq_len, dtype=dtype, rngs=rngs,
        )
        super().__init__(eva, image_size=image_size, patch_size=patch_size, layers=layers,
                         width=width, dtype=dtype, rngs=rngs, **fusion)

    def embeddings(self, eva_x, dino_x):
        tokens = (self.vlm.norm(eva_x.astype(jnp.float32))
                  + self.dinov2.norm(dino_x.astype(jnp.float32)))
        emb = self.vlm.head(tokens).astype(jnp.float32)
        return emb[:, :1], emb[:, 1:]


class MFuserSiglipBackbone(FusedBackbone):
    """DINOv2-L + SigLIP-L/16 fused by per-layer MVFusers (the SigLIP variant).

    Images CLIP-normalised NHWC (re-normalised per tower); embedding dim ``width`` (SigLIP
    has no projection). ``logit_scale`` and ``logit_bias`` are SigLIP's frozen scalars: the
    reference reads them from the SigLIP checkpoint (not from its own state dict) to turn
    the score map into logits for the score-map loss.
    """

    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int,
                 heads: int, intermediate_size: int, dtype=jnp.float32, rngs: nnx.Rngs,
                 **fusion):
        siglip = SiglipVisionTransformer(
            image_size=image_size, patch_size=patch_size, hidden_size=width,
            num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=intermediate_size, dtype=dtype, rngs=rngs,
        )
        super().__init__(siglip, image_size=image_size, patch_size=patch_size, layers=layers,
                         width=width, dtype=dtype, rngs=rngs, **fusion)
        # HF SiglipModel's initial values; the converted SigLIP weights overwrite them.
        self.logit_scale = nnx.Param(jnp.full((1,), math.log(10.0), jnp.float32))
        self.logit_bias = nnx.Param(jnp.full((1,), -10.0, jnp.float32))

    def vlm_tokens(self, images):
        return self.vlm.prepare_tokens(normalize_for_siglip(images))

    def embeddings(self, siglip_x, dino_x):
        tokens = (self.vlm.post_layernorm(siglip_x.astype(jnp.float32))
                  + self.dinov2.norm(dino_x[:, 1:].astype(jnp.float32)))
        global_embedding, local = self.vlm.head(tokens)
        return global_embedding.astype(jnp.float32), local.astype(jnp.float32)

    def score_logits(self, score_map: jax.Array) -> jax.Array:
        """Cosine score map -> logits, ``score * exp(logit_scale) + logit_bias``."""
        return (score_map.astype(jnp.float32) * jnp.exp(self.logit_scale[...][0])
                + self.logit_bias[...][0])
