"""DINOv2 vision transformer (the VFM tower of MFuser) in Flax NNX.

Ported from facebookresearch/dinov2 dinov2/models/vision_transformer.py and the copy MFuser
uses (devinxzhang/MFuser models/backbones/dino_v2.py, dino_layers/). Attribute names follow
the official module (patch_embed.proj, cls_token, pos_embed, mask_token, blocks.N.{norm1,
attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm) so that
``mfuser_jax.weights.load_torch_state_dict`` loads ``dinov2_vitl14_pretrain.pth`` directly.
Only the variant MFuser uses is built: one class token, no register tokens, MLP feed-forward,
unchunked blocks (``block_chunks=0``), interpolation offset 0.1 without antialiasing.

The fused backbone steps this tower block by block, so it exposes ``prepare_tokens``,
``blocks`` (a ``LayerStack``: parameters stacked over layers, scanned), ``block`` and
``norm`` besides ``__call__``.

Precision: parameters float32; the patch projection, qkv/proj and MLP matmuls run in
``dtype``; layer norms, attention logits/softmax and the residual stream stay float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfuser_jax.nn.layers import dot_product_attention
from mfuser_jax.nn.stack import DropPath, LayerStack, scan_layers
from mfuser_jax.ops.resize import resize

__all__ = [
    "Attention",
    "Block",
    "DinoVisionTransformer",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
]


def pair(v) -> tuple[int, int]:
    if isinstance(v, Sequence):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _linear(din, dout, dtype, rngs, *, use_bias=True):
    # init_weights_vit_timm: trunc_normal(std=0.02) weights, zero biases.
    return nnx.Linear(
        din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs,
    )


def layer_norm(dim, eps, rngs):
    # Two-pass variance (PyTorch's): DINOv2 ViT-L carries a few very large activations, for
    # which E[x^2] - E[x]^2 in float32 loses digits.
    return nnx.LayerNorm(
        dim, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
        use_fast_variance=False, rngs=rngs,
    )


class PatchEmbed(nnx.Module):
    """(B, H, W, C) images -> (B, H/p * W/p, D) tokens with a stride-p convolution."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.img_size = pair(img_size)
        self.patch_size = pair(patch_size)
        self.patches_resolution = (
            self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]
        )
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        # VALID padding drops a remainder smaller than a patch, as the stride-p Conv2d does.
        self.proj = nnx.Conv(
            in_chans, embed_dim, kernel_size=self.patch_size, strides=self.patch_size,
            padding="VALID", dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


class Attention(nnx.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=True, proj_bias=True, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dtype = dtype
        # The towers' shared core (layers.dot_product_attention); "xla" is
        # jax.nn.dot_product_attention's XLA path, this tower's computation before the core
        # existed (logits and softmax in float32). set_attn_implementation changes it.
        self.attn_implementation = "xla"
        self.qkv = _linear(dim, 3 * dim, dtype, rngs, use_bias=qkv_bias)
        self.proj = _linear(dim, dim, dtype, rngs, use_bias=proj_bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        # Output features of qkv are ordered (3, heads, head_dim), as the PyTorch reshape.
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = dot_product_attention(q, k, v, implementation=self.attn_implementation)
        return self.proj(out.reshape(b, n, c))


class LayerScale(nnx.Module):
    def __init__(self, dim, init_values=1e-5):
        self.gamma = nnx.Param(jnp.full((dim,), init_values, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...]


class Mlp(nnx.Module):
    def __init__(self, in_features, hidden_features, *, bias=True, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.fc1 = _linear(in_features, hidden_features, dtype, rngs, use_bias=bias)
        self.fc2 = _linear(hidden_features, in_features, dtype, rngs, use_bias=bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # nn.GELU is exact


class Block(nnx.Module):
    """Pre-norm transformer block with layer scale and per-sample stochastic depth.

    Stochastic depth drops each sample's residual with probability ``drop_path`` and scales
    kept ones by 1/(1-p) (DropPath). The official block switches to an equivalent-in-
    expectation batch-subset scheme above p = 0.1 when training; the random pattern differs,
    the expectation does not. MFuser keeps DINOv2 frozen with drop_path 0.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, *, qkv_bias=True, proj_bias=True,
                 ffn_bias=True, init_values=None, drop_path=0.0, layer_norm_eps=1e-6,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, layer_norm_eps, rngs)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, dtype=dtype, rngs=rngs)
        self.ls1 = LayerScale(dim, init_values) if init_values else None
        self.norm2 = layer_norm(dim, layer_norm_eps, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias, dtype=dtype, rngs=rngs)
        self.ls2 = LayerScale(dim, init_values) if init_values else None
        self.drop_path_rate = float(drop_path)
        # A (B, 1, 1) mask broadcast over tokens and channels is exactly DropPath. As in
        # PyTorch (nn.Identity), none at rate 0: the frozen tower holds no RNG state.
        self.drop_path = (DropPath(drop_path, broadcast_dims=(1, 2), rngs=rngs)
                          if drop_path > 0.0 else None)

    def __call__(self, x: jax.Array, *, key=None, drop_rate=None) -> jax.Array:
        """``key``/``drop_rate``: the drop-path key and rate of this call (stacked layers);
        by default the block's own rate and dropout stream."""
        chex.assert_rank(x, 3)
        keys = (None, None) if key is None else tuple(jax.random.split(key))

        def drop(r, k):
            return r if self.drop_path is None else self.drop_path(r, rate=drop_rate, key=k)

        r = self.attn(self.norm1(x))
        if self.ls1 is not None:
            r = self.ls1(r)
        x = x + drop(r, keys[0]).astype(x.dtype)
        r = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            r = self.ls2(r)
        return x + drop(r, keys[1]).astype(x.dtype)


class DinoVisionTransformer(nnx.Module):
    """DINOv2 ViT. Defaults: ViT-L/14 at 518 px (``dinov2_vitl14_pretrain.pth``).

    MFuser builds it with ``patch_size=16, img_size=512`` (32x32 + 1 tokens) and loads the
    checkpoint through ``mfuser_jax.towers.dinov2.convert.resize_for_mfuser``.
    Input images are NHWC floats, already normalised with the ImageNet mean/std.
    """

    def __init__(
        self,
        img_size=518,
        patch_size=14,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        init_values=1e-5,
        layer_norm_eps=1e-6,
        drop_path_rate=0.0,
        *,
        in_chans=3,
        qkv_bias=True,
        proj_bias=True,
        ffn_bias=True,
        interpolate_offset=0.1,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.n_blocks = depth
        self.num_tokens = 1
        self.num_prefix_tokens = 1  # the class token; this DINOv2 has no registers
        self.interpolate_offset = interpolate_offset
        self.dtype = dtype
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      dtype=dtype, rngs=rngs)
        self.patch_size = self.patch_embed.patch_size
        n = self.patch_embed.num_patches
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, embed_dim)))
        self.pos_embed = nnx.Param(
            nnx.initializers.truncated_normal(0.02)(rngs.params(), (1, n + 1, embed_dim))
        )
        self.mask_token = nnx.Param(jnp.zeros((1, embed_dim), jnp.float32))
        # Stochastic depth decay rule: rate i of linspace(0, drop_path_rate, depth). A stack
        # holds one structure for every layer, so the rates travel with the scan.
        self.drop_path_rates = tuple(float(r) for r in np.linspace(0.0, drop_path_rate, depth))
        self.blocks = LayerStack(
            lambda r: Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                            proj_bias=proj_bias, ffn_bias=ffn_bias, init_values=init_values,
                            drop_path=drop_path_rate, layer_norm_eps=layer_norm_eps,
                            dtype=dtype, rngs=r),
            depth, rngs=rngs)
        self.norm = layer_norm(embed_dim, layer_norm_eps, rngs)

    def interpolate_pos_encoding(self, grid_hw: tuple[int, int],
                                 image_hw: tuple[int, int]) -> jax.Array:
        """The (1, 1 + h*w, D) position embedding for a (h, w) patch grid, float32.

        As the official code: the stored table is used as is only when the token count
        matches and the image is square; otherwise the patch part is resized bicubic
        (PyTorch's kernel, no antialias) with scale factors (h + 0.1) / M, (w + 0.1) / M, and
        those scale factors, not the size ratio, set the sampling positions.
        """
        pos = self.pos_embed[...].astype(jnp.float32)
        n_stored = pos.shape[1] - 1
        h0, w0 = grid_hw
        if h0 * w0 == n_stored and image_hw[0] == image_hw[1]:
            return pos
        m = math.isqrt(n_stored)
        if m * m != n_stored:
            raise ValueError(f"pos_embed holds {n_stored} patch positions, not a square grid")
        if self.interpolate_offset:
            sh = float(h0 + self.interpolate_offset) / m
            sw = float(w0 + self.interpolate_offset) / m
            size = (math.floor(m * sh), math.floor(m * sw))  # PyTorch's output size rule
            scales = (sh, sw)
        else:
            size, scales = (h0, w0), None
        if size != (h0, w0):
            raise ValueError(f"position embedding resized to {size}, expected {(h0, w0)}")
        grid = pos[0, 1:].reshape(m, m, -1)
        grid = resize(grid, size, axes=(0, 1), mode="bicubic", scale_factor=scales)
        return jnp.concatenate([pos[:, :1], grid.reshape(1, h0 * w0, -1)], axis=1)

    def prepare_tokens(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
        """(B, H, W, C) images -> (B, 1 + h*w, D) float32 tokens: patches, cls, positions.

        ``masks`` (B, h*w) bool replaces masked patch tokens by ``mask_token``.
        """
        chex.assert_rank(images, 4)
        b, hh, ww, c = images.shape
        if c != self.patch_embed.in_chans:
            raise ValueError(f"expected NHWC images with {self.patch_embed.in_chans} "
                             f"channels, got shape {images.shape}")
        ph, pw = self.patch_size
        grid = (hh // ph, ww // pw)
        x = self.patch_embed(images).astype(jnp.float32)
        if masks is not None:
            chex.assert_shape(masks, (b, grid[0] * grid[1]))
            x = jnp.where(masks[..., None], self.mask_token[...][None], x)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, self.embed_dim))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.interpolate_pos_encoding(grid, (hh, ww))

    def layer_inputs(self, key: jax.Array | None):
        """Per-layer scan inputs of ``block``: (drop-path keys, rates), or None when the
        tower has no drop path or no key is given (eval)."""
        if key is None or not any(self.drop_path_rates):
            return None
        return jax.random.split(key, self.n_blocks), jnp.asarray(self.drop_path_rates)

    def block_aux(self, grid):
        return None

    @staticmethod
    def block(layer: Block, x: jax.Array, layer_input=None, aux=None) -> jax.Array:
        """One block of the stack; ``layer_input`` is its slice of ``layer_inputs``."""
        if layer_input is None:
            return layer(x)
        key, rate = layer_input
        return layer(x, key=key, drop_rate=rate)

    def __call__(self, images: jax.Array, masks: jax.Array | None = None, *,
                 key: jax.Array | None = None, remat: bool = False) -> jax.Array:
        """Final layer-normed tokens (B, 1 + h*w, D); token 0 is the class token.
        ``key``: drop-path randomness in train mode (when drop_path_rate > 0)."""
        x = self.prepare_tokens(images, masks)
        x, _ = scan_layers(lambda layers, t, xi: self.block(layers[0], t, xi), (self.blocks,),
                           x, self.layer_inputs(key), remat=remat)
        return self.norm(x)
