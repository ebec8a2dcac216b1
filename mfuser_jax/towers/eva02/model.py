"""EVA02-CLIP image tower (EVAVisionTransformer, as MFuser builds EVA02-CLIP-L/14-336), Flax NNX.

Ported from devinxzhang/MFuser models/backbones/eva_clip/eva_vit_model.py (Attention with
``subln``, SwiGLU, Block, EVAVisionTransformer) and rope.py (VisionRotaryEmbeddingFast), with
the configuration of model.py ``_build_vision_tower`` for EVA02-CLIP-L-14-336.json: qkv_bias,
subln, naiveswiglu, rope with interpolated frequencies, every LayerNorm eps 1e-6, no layer
scale, no post-norm, CLS pooling (``norm`` then ``head``).

Attribute names are the original state dict's (patch_embed.proj, cls_token, pos_embed,
blocks.N.{norm1, attn.{q_proj, k_proj, v_proj, q_bias, v_bias, inner_attn_ln, proj}, norm2,
mlp.{w1, w2, ffn_ln, w3}}, norm, head), so ``mfuser_jax.towers.eva02.convert.eva02_state_dicts``
output loads with ``load_torch_state_dict`` by rule. The rotary tables are not parameters:
they are computed from the patch grid (the original's persistent ``freqs_cos``/``freqs_sin``
buffers are dropped when loading, and recomputed, exactly as the original loader does).

The text tower of EVA02-CLIP is open_clip's TextTransformer, i.e.
``mfuser_jax.towers.clip.model.CLIPTextContextEncoder(context_length=13, activation="gelu")``.

Layout: images NHWC (already normalised with the OpenAI CLIP mean/std), tokens (B, N, D).
Parameters float32; ``dtype`` is the compute dtype; layer norms, softmax and the rotary
embedding run in float32.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfuser_jax.nn.layers import dot_product_attention, torch_linear
from mfuser_jax.nn.stack import LayerStack, scan_layers
from mfuser_jax.ops.resize import resize

__all__ = ["EVAVisionTransformer", "eva_rope_table", "rotate_half"]

_LN_EPS = 1e-6  # model.py: norm_layer = partial(LayerNorm, eps=1e-6) for the EVA tower


def _eva_layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=_LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32,
                         rngs=rngs)


def _ln(ln: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    # normalise in float32, hand back the input dtype (open_clip's LayerNorm cast)
    return ln(x.astype(jnp.float32)).astype(x.dtype)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------------------
# Rotary position embedding


def eva_rope_table(
    grid: tuple[int, int], head_dim: int, pt_seq_len: int = 16, theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (rows * cols, head_dim) float32, of VisionRotaryEmbeddingFast.

    dim = head_dim // 2 per axis; freqs = 1 / theta**(arange(0, dim, 2) / dim); per axis
    t = arange(n) / n * pt_seq_len (``intp_freq``: the pretraining positions squeezed onto
    the current grid); each angle repeated pairwise ('... n -> ... (n r)', r=2); the row
    table fills the first half of the channels, the column table the second half
    (``broadcat``), rows flattened row-major like the patch tokens. For a square grid this
    is exactly the original's buffer; a non-square grid uses its own n on each axis.
    Computed in float32 in torch's order of operations.
    """
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for 2-D rope, got {head_dim}")
    f32 = np.float32
    dim = head_dim // 2
    freqs = f32(1.0) / (f32(theta) ** (np.arange(0, dim, 2, dtype=f32)[: dim // 2] / f32(dim)))

    def axis(n):
        t = (np.arange(n, dtype=f32) / f32(n)) * f32(pt_seq_len)
        return np.repeat(t[:, None] * freqs[None, :], 2, axis=-1)  # (n, dim), pairs repeated

    rows, cols = int(grid[0]), int(grid[1])
    fh, fw = axis(rows), axis(cols)
    table = np.concatenate(
        [np.broadcast_to(fh[:, None, :], (rows, cols, dim)),
         np.broadcast_to(fw[None, :, :], (rows, cols, dim))],
        axis=-1,
    ).reshape(rows * cols, head_dim)
    return np.cos(table).astype(f32), np.sin(table).astype(f32)


def rotate_half(x: jax.Array) -> jax.Array:
    """EVA's rotate_half on INTERLEAVED pairs: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def _apply_rope(t: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """t (B, N, H, d): rotate all tokens but the first (the class token), in float32."""
    out_dtype = t.dtype
    patches = t[:, 1:].astype(jnp.float32)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    patches = patches * c + rotate_half(patches) * s
    return jnp.concatenate([t[:, :1], patches.astype(out_dtype)], axis=1)


# --------------------------------------------------------------------------------------
# Blocks


class Attention(nnx.Module):
    """EVA attention with ``subln``: separate q/k/v Linears without bias, q_bias and v_bias
    Params (k has no bias), rope on q and k of the patch tokens, ``inner_attn_ln`` on the
    heads' output before ``proj``. Scale head_dim**-0.5.

    ``attn_implementation``: the core's path (``layers.dot_product_attention``): None
    (explicit einsums, logits and softmax in float32) until ``set_attn_implementation``.
    """

    def __init__(self, dim: int, num_heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_implementation = None
        self.dtype = dtype
        lin = dict(dtype=dtype, rngs=rngs)
        self.q_proj = torch_linear(dim, dim, use_bias=False, **lin)
        self.k_proj = torch_linear(dim, dim, use_bias=False, **lin)
        self.v_proj = torch_linear(dim, dim, use_bias=False, **lin)
        self.q_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.inner_attn_ln = _eva_layer_norm(dim, rngs)
        self.proj = torch_linear(dim, dim, **lin)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        x = x.astype(self.dtype)
        q = (self.q_proj(x) + self.q_bias[...].astype(self.dtype)).reshape(b, n, h, d)
        k = self.k_proj(x).reshape(b, n, h, d)
        v = (self.v_proj(x) + self.v_bias[...].astype(self.dtype)).reshape(b, n, h, d)
        cos, sin = rope
        if cos.shape != (n - 1, d):
            raise ValueError(f"rope table {cos.shape} does not fit {n - 1} patch tokens x {d}")
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        out = dot_product_attention(q, k, v, implementation=self.attn_implementation)
        out = _ln(self.inner_attn_ln, out.reshape(b, n, c))
        return self.proj(out)


class SwiGLU(nnx.Module):
    """w3(ffn_ln(silu(w1 x) * w2 x)) (``naiveswiglu`` with ``subln``)."""

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.w1 = torch_linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.w2 = torch_linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.ffn_ln = _eva_layer_norm(hidden, rngs)
        self.w3 = torch_linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(self.w1(x)) * self.w2(x)
        return self.w3(_ln(self.ffn_ln, hidden))


class Block(nnx.Module):
    """Pre-norm block without layer scale or drop path (EVA02-CLIP-L's drop_path_rate is 0)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, *, dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.norm1 = _eva_layer_norm(dim, rngs)
        self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = _eva_layer_norm(dim, rngs)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        x = x + self.attn(_ln(self.norm1, x), rope)
        x = x + self.mlp(_ln(self.norm2, x))
        return x


class PatchEmbed(nnx.Module):
    """``proj``: Conv(3 -> D, kernel = stride = patch, with bias), NHWC."""

    def __init__(self, patch_size: int, embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        p = int(patch_size)
        self.proj = nnx.Conv(
            3, embed_dim, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=True,
            dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.proj(images)


# --------------------------------------------------------------------------------------
# Tower


class EVAVisionTransformer(nnx.Module):
    """EVA02-CLIP ViT image tower, steppable block by block for MFuser's fused backbone.

    Defaults are EVA02-CLIP-L/14-336 (width 1024, 24 layers, 16 heads, SwiGLU hidden
    int(1024 * 2.6667) = 2730, output 768); MFuser builds it with ``img_size=512`` (36 x 36
    grid, 1297 tokens) and loads weights converted by
    ``mfuser_jax.towers.eva02.convert.eva02_state_dicts``.

    ``pos_embed`` (1, 1 + rows*cols, D) is stored for the ``img_size // patch_size`` grid
    and bicubically resized (torch F.interpolate, align_corners=False) at run time if an
    input's grid differs. The rotary tables are computed for each input's grid
    (``rope(grid)``), with t = arange(n) / n * pt_hw_seq_len per axis.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 336,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 2.6667,
        output_dim: int = 768,
        pt_hw_seq_len: int = 16,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.img_size = _pair(img_size)
        self.patch_size = int(patch_size)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.output_dim = output_dim
        self.pt_hw_seq_len = int(pt_hw_seq_len)
        self.dtype = dtype
        self.patch_grid = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.patch_embed = PatchEmbed(self.patch_size, embed_dim, dtype=dtype, rngs=rngs)
        n_pos = 1 + self.patch_grid[0] * self.patch_grid[1]
        # trunc_normal_(std=.02) in the original; overwritten by the checkpoint anyway
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, embed_dim), jnp.float32))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, n_pos, embed_dim), jnp.float32))
        self.blocks = LayerStack(
            lambda r: Block(embed_dim, num_heads, mlp_ratio, dtype=dtype, rngs=r),
            depth, rngs=rngs)
        self.norm = _eva_layer_norm(embed_dim, rngs)
        self.head = torch_linear(embed_dim, output_dim, dtype=dtype, rngs=rngs)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) for an input of height x width pixels."""
        return height // self.patch_size, width // self.patch_size

    def position_embedding(self, grid: tuple[int, int]) -> jax.Array:
        """(1 + rows*cols, D) float32: class position, then the spatial ones resized to grid."""
        pos = self.pos_embed[...][0]
        spatial = pos[1:].reshape(*self.patch_grid, self.embed_dim)
        if tuple(grid) != self.patch_grid:
            spatial = resize(spatial, tuple(grid), axes=(0, 1), mode="bicubic")
        return jnp.concatenate([pos[:1], spatial.reshape(-1, self.embed_dim)], axis=0)

    def prepare_tokens(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, 3), CLIP-normalised -> tokens (B, 1 + rows*cols, D) in ``dtype``."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {images.shape}")
        x = self.patch_embed(images.astype(self.dtype))  # (B, rows, cols, D)
        b, gh, gw, c = x.shape
        x = x.reshape(b, gh * gw, c)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, c))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding((gh, gw)).astype(x.dtype)[None]

    def rope(self, grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
        """(cos, sin), each (rows*cols, head_dim) float32, for a patch grid (rows, cols)."""
        cos, sin = eva_rope_table(grid, self.head_dim, self.pt_hw_seq_len)
        return jnp.asarray(cos), jnp.asarray(sin)

    def layer_inputs(self, key=None, grid=None):
        return None  # no drop path: nothing differs between layers but the weights

    def block_aux(self, grid: tuple[int, int]):
        """What every block of one call shares: the grid's rope table."""
        return self.rope(grid)

    @staticmethod
    def block(layer: Block, x: jax.Array, layer_input=None, aux=None) -> jax.Array:
        """One block of the stack on tokens (B, 1 + rows*cols, D); ``aux`` = (cos, sin)."""
        return layer(x, aux)

    def forward_tokens(self, images: jax.Array) -> jax.Array:
        """All blocks: (B, H, W, 3) -> last tokens (B, 1 + rows*cols, D), before ``norm``."""
        x = self.prepare_tokens(images)
        rope = self.block_aux(self.grid_size(images.shape[1], images.shape[2]))
        x, _ = scan_layers(lambda layers, t, _: layers[0](t, rope),
                           (self.blocks,), x)
        return x

    def __call__(self, images: jax.Array) -> jax.Array:
        """EVA-CLIP's encode_image: head(norm(x)[:, 0]) -> (B, output_dim) float32."""
        x = _ln(self.norm, self.forward_tokens(images))[:, 0]
        return self.head(x).astype(jnp.float32)
