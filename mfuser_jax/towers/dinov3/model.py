"""DINOv3 vision transformer (ViT-L/16 as released, ``dinov3_vitl16``) in Flax NNX.

Ported from facebookresearch/dinov3 (dinov3/models/vision_transformer.py, layers/
rope_position_encoding.py, layers/attention.py, layers/block.py, layers/layer_scale.py,
layers/patch_embed.py, layers/ffn_layers.py) with the configuration of
dinov3/hub/backbones.py ``dinov3_vitl16``: patch 16, embed 1024, depth 24, 16 heads, plain
GELU MLP of ratio 4, 4 storage (register) tokens, LayerScale 1e-5, LayerNorm eps 1e-5
("layernormbf16"), qkv bias with the key third masked (``mask_k_bias``), RoPE base 100 with
coordinates normalised per axis ("separate") and float32 tables, one final norm for every
token (``untie_cls_and_patch_norms`` is off for every released ViT).

A drop-in alternative to ``mfuser_jax.towers.dinov2.model.DinoVisionTransformer``: the same
stepping protocol (``prepare_tokens``, ``blocks``, ``layer_inputs``, ``block_aux``,
``block``, ``norm``, ``grid_size``) and the same precision rules. Differences a caller
must know: the token sequence is ``[cls, 4 storage tokens, patches]``
(``num_prefix_tokens`` = 5), there is no learned position table (any grid works, no
resizing), and every block needs the RoPE tables of the patch grid: ``block_aux(grid)``,
passed to ``block`` as ``aux``.

Attribute names are the official state dict's (cls_token, storage_tokens, mask_token,
patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2,
ls2.gamma}, norm), so ``mfuser_jax.towers.dinov3.convert`` output loads with
``mfuser_jax.weights.load_torch_state_dict`` by rule. The official buffers are not state
here: the RoPE periods are recomputed from ``rope_base`` (the converter checks the file's),
and the k-bias mask is the fixed pattern ``mask_k_bias`` implies (the converter folds the
file's mask into ``qkv.bias``).

RoPE coordinate augmentation: the released ViT-L was built with ``rescale_coords=2``,
which the official module applies only in training mode (a random log-uniform factor in
[1/2, 2] on the patch coordinates); shift and jitter are off. Here every augmentation
defaults to off (``rope_*_coords=None``), the eval behaviour, because MFuser keeps the VFM
frozen. Set ``rope_rescale_coords=2.0`` to train as the official does: it then acts when
``__call__`` (or ``block_aux``) gets a key, never without one.

Precision: parameters float32; the patch projection, qkv/proj and MLP matmuls run in
``dtype``; layer norms, the RoPE tables and their application, attention logits/softmax and
the residual stream stay float32 (the official applies RoPE in the tables' dtype, float32
for the released models, and casts back).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfuser_jax.nn.layers import dot_product_attention, uniform_init
from mfuser_jax.nn.stack import DropPath, LayerStack, scan_layers
# DINOv3's layer scale, MLP and norms are DINOv2's (the official layers/ share them)
from mfuser_jax.towers.dinov2.model import LayerScale, Mlp, layer_norm, pair

__all__ = [
    "DinoV3VisionTransformer",
    "LayerScale",
    "LinearKMaskedBias",
    "Mlp",
    "PatchEmbed",
    "RopePositionEmbedding",
    "SelfAttention",
    "SelfAttentionBlock",
    "rope_periods",
]

NORMALIZE_COORDS = ("separate", "min", "max")


def _linear(din, dout, dtype, rngs, *, use_bias=True, cls=nnx.Linear):
    # init_weights_vit: trunc_normal(std=0.02) weights, zero biases.
    return cls(
        din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs,
    )


# --------------------------------------------------------------------------------------
# Rotary position embedding


def rope_periods(head_dim: int, base: float = 100.0) -> np.ndarray:
    """(head_dim // 4,) float32 periods ``base ** (2 i / (head_dim // 2))``, as the official
    ``RopePositionEmbedding._init_weights`` computes them in float32."""
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head dim divisible by 4, got {head_dim}")
    n = head_dim // 4
    exponents = np.float32(2) * np.arange(n, dtype=np.float32) / np.float32(head_dim // 2)
    return (np.float32(base) ** exponents).astype(np.float32)


def _log_uniform(key, shape, limit: float) -> jax.Array:
    """exp(U(-log limit, log limit)): a factor in [1/limit, limit]."""
    r = math.log(limit)
    return jnp.exp(jax.random.uniform(key, shape, jnp.float32, -r, r))


class RopePositionEmbedding(nnx.Module):
    """Axial RoPE without learned state: (sin, cos) tables (h*w, head_dim) for a patch grid.

    Patch centres ((i + 0.5) / n per axis for "separate"; divided by min(h, w) or max(h, w)
    for "min"/"max") are mapped to [-1, 1]; the angles 2 pi c / period of the row
    coordinate fill the first head_dim / 4 entries, the column's the next, and the half is
    repeated (``tile(2)``), matching ``rope_rotate_half``. Optional training augmentations
    (official order: shift, jitter, rescale) act only when a key is given.
    """

    def __init__(self, embed_dim: int, *, num_heads: int, base: float = 100.0,
                 normalize_coords: str = "separate", shift_coords: float | None = None,
                 jitter_coords: float | None = None, rescale_coords: float | None = None):
        if embed_dim % (4 * num_heads):
            raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 * num_heads "
                             f"({4 * num_heads}) for axial RoPE")
        if normalize_coords not in NORMALIZE_COORDS:
            raise ValueError(f"normalize_coords must be one of {NORMALIZE_COORDS}, "
                             f"got {normalize_coords!r}")
        self.head_dim = embed_dim // num_heads
        self.base = float(base)
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords

    @property
    def periods(self) -> np.ndarray:
        return rope_periods(self.head_dim, self.base)

    @property
    def augments(self) -> bool:
        return any(v is not None for v in
                   (self.shift_coords, self.jitter_coords, self.rescale_coords))

    def coords(self, grid: tuple[int, int], key: jax.Array | None = None) -> jax.Array:
        """(h*w, 2) float32 patch-centre coordinates (row, col), row-major over the grid."""
        h, w = (int(g) for g in grid)
        if self.normalize_coords == "separate":
            dh, dw = h, w
        else:
            dh = dw = (min if self.normalize_coords == "min" else max)(h, w)
        ch = np.arange(0.5, h, dtype=np.float32) / np.float32(dh)
        cw = np.arange(0.5, w, dtype=np.float32) / np.float32(dw)
        c = np.stack(np.meshgrid(ch, cw, indexing="ij"), axis=-1).reshape(h * w, 2)
        coords = jnp.asarray(np.float32(2.0) * c - np.float32(1.0))
        if key is None or not self.augments:
            return coords
        k_shift, k_jitter, k_rescale = jax.random.split(key, 3)
        if self.shift_coords is not None:
            coords = coords + jax.random.uniform(
                k_shift, (1, 2), jnp.float32, -self.shift_coords, self.shift_coords)
        if self.jitter_coords is not None:
            coords = coords * _log_uniform(k_jitter, (1, 2), self.jitter_coords)
        if self.rescale_coords is not None:
            coords = coords * _log_uniform(k_rescale, (1, 1), self.rescale_coords)
        return coords

    def __call__(self, grid: tuple[int, int], key: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """(sin, cos), each (h*w, head_dim) float32 (the official returns them in this order)."""
        coords = self.coords(grid, key)
        angles = 2 * math.pi * coords[:, :, None] / jnp.asarray(self.periods)  # (hw, 2, d/4)
        angles = angles.reshape(angles.shape[0], -1)
        angles = jnp.concatenate([angles, angles], axis=-1)  # tile(2): (hw, d)
        return jnp.sin(angles), jnp.cos(angles)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def _apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array, prefix: int) -> jax.Array:
    """RoPE on the patch tokens of x (B, N, heads, d), float32; the first ``prefix`` tokens
    (cls, storage) pass through. Returns x's dtype."""
    patches = x[:, prefix:].astype(jnp.float32)
    s, c = sin[None, :, None, :], cos[None, :, None, :]
    patches = (patches * c + _rotate_half(patches) * s).astype(x.dtype)
    return jnp.concatenate([x[:, :prefix], patches], axis=1)


# --------------------------------------------------------------------------------------
# Layers


class PatchEmbed(nnx.Module):
    """(B, H, W, C) images -> (B, H/p * W/p, D) tokens with a stride-p convolution."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.img_size = pair(img_size)
        self.patch_size = pair(patch_size)
        self.patches_resolution = (
            self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]
        )
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        # reset_parameters: weight and bias U(+-sqrt(k)), k = 1 / (in_chans * p_h^2).
        bound = math.sqrt(1.0 / (in_chans * self.patch_size[0] ** 2))
        # VALID padding drops a remainder smaller than a patch, as the stride-p Conv2d does.
        self.proj = nnx.Conv(
            in_chans, embed_dim, kernel_size=self.patch_size, strides=self.patch_size,
            padding="VALID", dtype=dtype, param_dtype=jnp.float32,
            kernel_init=uniform_init(bound), bias_init=uniform_init(bound), rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


class LinearKMaskedBias(nnx.Linear):
    """A qkv ``nnx.Linear`` whose bias is multiplied by (1, 0, 1) over its (q, k, v) thirds.

    The official ``LinearKMaskedBias`` keeps the mask as a buffer that ``init_weights``
    fills with that pattern; checkpoints store it, and the converter folds it into the
    bias. The key bias is kept as a parameter (official layout) but never reaches the
    output. It is
    not a no-op to drop the mask: RoPE rotates k after the bias, so an unmasked key bias
    would add a position-dependent term to the logits.
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        o = self.out_features
        if o % 3:
            raise ValueError(f"a k-masked qkv projection needs 3 * dim outputs, got {o}")
        mask = np.ones((o,), np.float32)
        mask[o // 3: 2 * o // 3] = 0.0
        bias = self.bias[...] * mask
        inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias),
                                                  dtype=self.dtype)
        y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                             precision=self.precision)
        return y + bias


class SelfAttention(nnx.Module):
    """Multi-head self-attention with RoPE on the patch tokens. The official infers the
    prefix (cls, storage) count as tokens minus table rows; with ``num_prefix_tokens`` set
    (the tower sets it), tables of another grid are refused instead."""

    def __init__(self, dim, num_heads=16, qkv_bias=True, proj_bias=True, mask_k_bias=True, *,
                 num_prefix_tokens=None, dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.dtype = dtype
        # The towers' shared core (layers.dot_product_attention), XLA path as the DINOv2
        # tower; set_attn_implementation changes it.
        self.attn_implementation = "xla"
        masked = mask_k_bias and qkv_bias
        self.qkv = _linear(dim, 3 * dim, dtype, rngs, use_bias=qkv_bias,
                           cls=LinearKMaskedBias if masked else nnx.Linear)
        self.proj = _linear(dim, dim, dtype, rngs, use_bias=proj_bias)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        b, n, c = x.shape
        sin, cos = rope
        d = c // self.num_heads
        prefix = n - sin.shape[0]
        if (prefix < 0 or sin.shape[1:] != (d,) or cos.shape != sin.shape
                or self.num_prefix_tokens not in (None, prefix)):
            prefix_note = ("" if self.num_prefix_tokens is None
                           else f" ({self.num_prefix_tokens} prefix tokens + patches)")
            raise ValueError(f"RoPE tables {sin.shape}/{cos.shape} do not fit {n} tokens"
                             f"{prefix_note} of {self.num_heads} heads x {d}")
        # Output features of qkv are ordered (3, heads, head_dim), as the PyTorch reshape.
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = _apply_rope(q, sin, cos, prefix), _apply_rope(k, sin, cos, prefix)
        out = dot_product_attention(q, k, v, implementation=self.attn_implementation)
        return self.proj(out.reshape(b, n, c))


class SelfAttentionBlock(nnx.Module):
    """Pre-norm block with RoPE attention, layer scale and per-sample stochastic depth.

    As the DINOv2 tower: stochastic depth drops each sample's residual with probability
    ``drop_path`` and scales kept ones by 1/(1-p); the official block trains on a random
    batch subset instead (equal in expectation). The released ViT-L has drop_path 0.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, *, qkv_bias=True, proj_bias=True,
                 ffn_bias=True, mask_k_bias=True, init_values=None, drop_path=0.0,
                 layer_norm_eps=1e-5, num_prefix_tokens=None, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, layer_norm_eps, rngs)
        self.attn = SelfAttention(dim, num_heads, qkv_bias, proj_bias, mask_k_bias,
                                  num_prefix_tokens=num_prefix_tokens, dtype=dtype, rngs=rngs)
        self.ls1 = LayerScale(dim, init_values) if init_values else None
        self.norm2 = layer_norm(dim, layer_norm_eps, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias, dtype=dtype, rngs=rngs)
        self.ls2 = LayerScale(dim, init_values) if init_values else None
        self.drop_path_rate = float(drop_path)
        self.drop_path = (DropPath(drop_path, broadcast_dims=(1, 2), rngs=rngs)
                          if drop_path > 0.0 else None)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], *, key=None,
                 drop_rate=None) -> jax.Array:
        """``rope``: the grid's (sin, cos) tables. ``key``/``drop_rate``: the drop-path key
        and rate of this call (stacked layers); by default the block's own."""
        chex.assert_rank(x, 3)
        keys = (None, None) if key is None else tuple(jax.random.split(key))

        def drop(r, k):
            return r if self.drop_path is None else self.drop_path(r, rate=drop_rate, key=k)

        r = self.attn(self.norm1(x), rope)
        if self.ls1 is not None:
            r = self.ls1(r)
        x = x + drop(r, keys[0]).astype(x.dtype)
        r = self.mlp(self.norm2(x))
        if self.ls2 is not None:
            r = self.ls2(r)
        return x + drop(r, keys[1]).astype(x.dtype)


# --------------------------------------------------------------------------------------
# Tower


class DinoV3VisionTransformer(nnx.Module):
    """DINOv3 ViT. Defaults: ViT-L/16 as released (``dinov3_vitl16``, LVD-1689M or SAT-493M).

    Input images are NHWC floats, already normalised with the ImageNet mean/std (DINOv3's
    statistics too). ``img_size`` only records the nominal grid (``patch_embed``): there is
    no position table, and any image whose sides are at least a patch works.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        init_values=1e-5,
        layer_norm_eps=1e-5,
        drop_path_rate=0.0,
        *,
        in_chans=3,
        n_storage_tokens=4,
        rope_base=100.0,
        rope_normalize_coords="separate",
        rope_shift_coords=None,
        rope_jitter_coords=None,
        rope_rescale_coords=None,
        qkv_bias=True,
        proj_bias=True,
        ffn_bias=True,
        mask_k_bias=True,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.n_blocks = depth
        self.n_storage_tokens = int(n_storage_tokens)
        self.num_prefix_tokens = 1 + self.n_storage_tokens
        self.dtype = dtype
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim,
                                      dtype=dtype, rngs=rngs)
        self.patch_size = self.patch_embed.patch_size
        # init_weights: cls and storage tokens N(0, 0.02), mask token 0.
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, embed_dim)))
        if self.n_storage_tokens > 0:
            self.storage_tokens = nnx.Param(0.02 * jax.random.normal(
                rngs.params(), (1, self.n_storage_tokens, embed_dim)))
        else:
            self.storage_tokens = None
        self.rope_embed = RopePositionEmbedding(
            embed_dim, num_heads=num_heads, base=rope_base,
            normalize_coords=rope_normalize_coords, shift_coords=rope_shift_coords,
            jitter_coords=rope_jitter_coords, rescale_coords=rope_rescale_coords)
        # Stochastic depth: the official passes drop_path_rate to every block (no decay
        # rule); a stack holds one structure for every layer, so rates travel with the scan.
        self.drop_path_rates = (float(drop_path_rate),) * depth
        self.blocks = LayerStack(
            lambda r: SelfAttentionBlock(
                embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                ffn_bias=ffn_bias, mask_k_bias=mask_k_bias, init_values=init_values,
                drop_path=drop_path_rate, layer_norm_eps=layer_norm_eps,
                num_prefix_tokens=self.num_prefix_tokens, dtype=dtype, rngs=r),
            depth, rngs=rngs)
        self.norm = layer_norm(embed_dim, layer_norm_eps, rngs)
        self.mask_token = nnx.Param(jnp.zeros((1, embed_dim), jnp.float32))

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) for an input of height x width pixels."""
        return height // self.patch_size[0], width // self.patch_size[1]

    def prepare_tokens(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
        """(B, H, W, C) images -> (B, 1 + n_storage + h*w, D) float32 tokens:
        [cls, storage tokens, patches]. No position is added (RoPE acts in attention).

        ``masks`` (B, h*w) bool replaces masked patch tokens by ``mask_token``. (Without
        masks the official adds ``0 * mask_token`` to the cls token, which changes no value.)
        """
        chex.assert_rank(images, 4)
        b, hh, ww, c = images.shape
        if c != self.patch_embed.in_chans:
            raise ValueError(f"expected NHWC images with {self.patch_embed.in_chans} "
                             f"channels, got shape {images.shape}")
        grid = self.grid_size(hh, ww)
        if min(grid) < 1:
            raise ValueError(f"images {hh}x{ww} are smaller than a {self.patch_size} patch")
        x = self.patch_embed(images).astype(jnp.float32)
        if masks is not None:
            chex.assert_shape(masks, (b, grid[0] * grid[1]))
            x = jnp.where(masks[..., None], self.mask_token[...][None], x)
        prefix = [jnp.broadcast_to(self.cls_token[...], (b, 1, self.embed_dim))]
        if self.storage_tokens is not None:
            prefix.append(jnp.broadcast_to(self.storage_tokens[...],
                                           (b, self.n_storage_tokens, self.embed_dim)))
        return jnp.concatenate(prefix + [x], axis=1)

    def layer_inputs(self, key: jax.Array | None):
        """Per-layer scan inputs of ``block``: (drop-path keys, rates), or None when the
        tower has no drop path or no key is given (eval)."""
        if key is None or not any(self.drop_path_rates):
            return None
        return jax.random.split(key, self.n_blocks), jnp.asarray(self.drop_path_rates)

    def block_aux(self, grid: tuple[int, int], key: jax.Array | None = None):
        """What every block of one call shares: the grid's RoPE (sin, cos) tables, each
        (h*w, head_dim) float32. ``key`` draws the coordinate augmentations, if configured."""
        return self.rope_embed(grid, key)

    @staticmethod
    def block(layer: SelfAttentionBlock, x: jax.Array, layer_input=None, aux=None
              ) -> jax.Array:
        """One block of the stack; ``layer_input`` is its slice of ``layer_inputs``, ``aux``
        the ``block_aux`` tables (required: RoPE is every block's position signal)."""
        if aux is None:
            raise ValueError("DINOv3 blocks need the RoPE tables of the patch grid: pass "
                             "tower.block_aux(grid) as aux")
        if layer_input is None:
            return layer(x, aux)
        key, rate = layer_input
        return layer(x, aux, key=key, drop_rate=rate)

    def __call__(self, images: jax.Array, masks: jax.Array | None = None, *,
                 key: jax.Array | None = None, remat: bool = False) -> jax.Array:
        """Final layer-normed tokens (B, 1 + n_storage + h*w, D): token 0 is the class
        token, then the storage tokens, then the patches (HF's ``last_hidden_state``).
        ``key``: train-mode randomness (drop path, RoPE augmentation when configured)."""
        x = self.prepare_tokens(images, masks)
        grid = self.grid_size(images.shape[1], images.shape[2])
        drop_key, rope_key = (None, None) if key is None else tuple(jax.random.split(key))
        rope = self.block_aux(grid, rope_key)
        x, _ = scan_layers(lambda layers, t, xi: self.block(layers[0], t, xi, rope),
                           (self.blocks,), x, self.layer_inputs(drop_key), remat=remat)
        return self.norm(x)
