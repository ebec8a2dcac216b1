"""The fused backbone: VLM block i, VFM block i, MVFuser i, layer by layer, then an FPN.

``FusedBackbone`` is a composition: the VLM image tower (``vlm``), the VFM tower (DINOv2 or
DINOv3, at the attribute of its name: ``dinov2``, ``dinov3``), one MVFuser per layer
(``adapter``) and the FPN. The towers expose a small protocol (``VisionTower``); the fused
layers run as one ``lax.scan`` over their stacked parameters (see ``nn/stack.py``),
rematerialised per layer when ``remat`` is set. The original subclasses the VLM tower, so
its parameters sit at the top of ``backbone.*`` next to ``dinov2``, ``adapter`` and
``fpn{1,2,3,4}``; ``flatten_children`` gives our ``vlm`` attribute the same place in every
per-layer name, and a released checkpoint's keys load by rule.

Each VLM subclasses it in its tower folder (``towers/<vlm>/fusion.py``): how its first
tokens are made and how the last tokens of both towers become the global and per-pixel
embeddings. Every variant returns ``(features, global_embedding, pixel_embeddings)``: four
NHWC maps (patch strides / 4, 2, 1, x2 — pixel strides 4, 8, 16, 32 at patch 16) with
``vlm_width + vfm_dim`` channels, the global embedding (B, 1, E) and the pixel embeddings
(B, h, w, E) that are aligned with the text embeddings.

Register tokens (DINOv3 has 4, DINOv2 none) sit between the VFM's class token and its
patches. They are carried in the fused sequence (the MVFuser scans them with the class
token, as the VFM's own blocks attend to them) and left out of everything spatial: the FPN
maps take the patch tokens only, and the embeddings see ``[class, patches]``
(``vfm_tokens_without_registers``), the layout the VLM side has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from mfuser_jax.nn.layers import GELU, torch_conv_transpose, torch_linear
from mfuser_jax.model.mvfuser import MVFuser
from mfuser_jax.nn.stack import LayerStack, emit_group, scan_layers

__all__ = ["FusedBackbone", "VisionTower", "normalize_for_clip", "renormalize"]

# Pixel statistics in 0..255 units, as the reference's data pipeline and backbones use them.
CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)


def normalize_for_clip(images: jax.Array) -> jax.Array:
    """uint8/float pixels in 0..255 (NHWC) -> CLIP-normalised float32 (the data pipeline's
    normalisation in the reference; EVA02-CLIP uses the same statistics)."""
    x = images.astype(jnp.float32)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def renormalize(clip_normalized: jax.Array, mean, std) -> jax.Array:
    """A CLIP-normalised input normalised again with a tower's own statistics (0..255
    units), as the reference does per tower: un-normalise, then normalise."""
    pixels = clip_normalized * jnp.asarray(CLIP_STD) + jnp.asarray(CLIP_MEAN)
    return (pixels - jnp.asarray(mean)) / jnp.asarray(std)


class VisionTower(Protocol):
    """What the fused backbone asks of an image tower (CLIP, EVA02, SigLIP, DINOv2, DINOv3).
    A VFM tower also has ``num_prefix_tokens`` (class + register tokens) and ``norm``."""

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
    """A VLM tower and a VFM tower fused by per-layer MVFusers, then the FPN.

    ``__call__(images, key=None)`` takes CLIP-normalised NHWC images; ``key`` drives drop
    path and the fusers' dropout in train mode. ``vfm(rngs)`` builds the VFM tower (at the
    fused depth and the VLM's patch size), kept at the attribute ``vfm_name``; ``vfm_dim``
    is its width and ``vfm_mean``/``vfm_std`` its pixel statistics. ``remat``: recompute
    each fused layer in the backward pass, keeping only the two token streams between
    layers. ``scan``: False runs the same stacked layers in an unrolled Python loop (every
    layer compiled separately, and XLA keeps every layer's activations whatever ``remat``
    says). The sizes have no defaults here or in the subclasses: ``model.variants.
    build_backbone`` passes the model config's.
    """

    flatten_children = ("vlm",)

    def __init__(self, vlm: nnx.Module, *, vfm: Callable[[nnx.Rngs], nnx.Module],
                 vfm_name: str, vfm_dim: int, vfm_mean, vfm_std, layers, width,
                 out_indices, d_state, d_conv, expand, scan_backend, remat=False, scan=True,
                 projections=False, dtype=jnp.float32, rngs: nnx.Rngs):
        if len(out_indices) != 4 or max(out_indices) >= layers:
            raise ValueError(f"out_indices {tuple(out_indices)} must name 4 of the {layers} layers")
        self.out_indices = tuple(int(i) for i in out_indices)
        self.remat = bool(remat)
        self.scan = bool(scan)
        self.vlm = vlm
        self.vfm_name = vfm_name
        self.vfm_mean, self.vfm_std = tuple(vfm_mean), tuple(vfm_std)
        setattr(self, vfm_name, vfm(rngs))  # the original's attribute name (backbone.dinov2)
        dino_dim = vfm_dim
        self.adapter = LayerStack(
            lambda r: MVFuser(width, d_state=d_state, d_conv=d_conv, expand=expand,
                              scan_backend=scan_backend, dtype=dtype, rngs=r),
            layers, rngs=rngs)
        self.projections = bool(projections)
        if projections:  # CLIP only: VFM tokens in through proj1, back through proj2
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
    def vfm(self) -> nnx.Module:
        """The VFM tower (DINOv2 at ``dinov2``, DINOv3 at ``dinov3``)."""
        return getattr(self, self.vfm_name)

    def vfm_tokens_without_registers(self, vfm_x: jax.Array) -> jax.Array:
        """``[class, patches]`` of the VFM's tokens: its register tokens (if any) left out."""
        n = self.vfm.num_prefix_tokens
        if n == 1:
            return vfm_x
        return jnp.concatenate([vfm_x[:, :1], vfm_x[:, n:]], axis=1)

    @property
    def num_layers(self) -> int:
        return len(self.adapter)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return self.vlm.grid_size(height, width)

    def _run_layers(self, vlm_x, dino_x, grid, key):
        """All fused layers; returns the last tokens of both towers and the four maps
        [VFM patches, VLM patches] (channels-last) taken after the ``out_indices`` layers."""
        vlm, dino, n = self.vlm, self.vfm, self.num_layers
        n_prefix = dino.num_prefix_tokens
        keys = (None,) * 3 if key is None else tuple(jax.random.split(key, 3))
        xs = (vlm.layer_inputs(keys[0]), dino.layer_inputs(keys[1]),
              None if key is None else jax.random.split(keys[2], n))
        stacks = (vlm.blocks, dino.blocks, self.adapter)
        if self.projections:
            stacks += (self.adapter_proj1, self.adapter_proj2)
        aux, vfm_aux = vlm.block_aux(grid), dino.block_aux(grid)  # e.g. rotary tables
        n_patches = grid[0] * grid[1]

        def layer(layers, carry, x):
            vlm_x, dino_x = carry
            vlm_in, dino_in, fuser_key = x
            vlm_x = vlm.block(layers[0], vlm_x, vlm_in, aux)
            dino_x = dino.block(layers[1], dino_x, dino_in, vfm_aux)
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
                dino_x[:, n_prefix:].reshape(b, *grid, -1),  # patches only: no registers
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
        dino_x = self.vfm.prepare_tokens(renormalize(images, self.vfm_mean, self.vfm_std))
        vlm_x, dino_x, maps = self._run_layers(self.vlm_tokens(images), dino_x, grid, key)
        global_embedding, pixel_embeddings = self.embeddings(vlm_x, dino_x)
        return (self._fpn(maps), global_embedding,
                pixel_embeddings.reshape(b, *grid, pixel_embeddings.shape[-1]))

    def vlm_tokens(self, images: jax.Array) -> jax.Array:
        """The VLM tower's first tokens for CLIP-normalised images."""
        return self.vlm.prepare_tokens(images)

    def embeddings(self, vlm_x: jax.Array, dino_x: jax.Array):
        """(global (B, 1, E), per-patch (B, h*w, E)) float32 from the last tokens of both
        towers (the VFM's with its registers; ``vfm_tokens_without_registers`` drops them)."""
        raise NotImplementedError
