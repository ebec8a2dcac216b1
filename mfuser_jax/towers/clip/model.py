"""CLIP image and text towers (OpenAI layout) as MFuser runs them, in Flax NNX.

Ported from devinxzhang/MFuser models/backbones/clip/models.py (CLIPVisionTransformer,
CLIPTextEncoder, CLIPTextContextEncoder) and openai/CLIP clip/model.py. Attribute names are
OpenAI's (conv1, class_embedding, transformer.resblocks.N.attn.in_proj_weight, mlp.c_fc, ln_post,
proj, token_embedding, ln_final, text_projection ...), so an OpenAI state dict split by
``mfuser_jax.towers.clip.convert.split_openai`` loads with ``load_torch_state_dict`` by rule.

Layout: images NHWC (already CLIP-normalised), tokens (batch, length, width); PyTorch's
sequence-first layout inside nn.MultiheadAttention is not kept, the math is the same (its
port is ``layers.TorchMultiheadAttention``, the attention core ``layers.dot_product_attention``;
``layers.set_attn_implementation(tower, impl)`` picks the core's path).
Parameters are float32; ``dtype`` is the compute dtype; layer norms and the attention softmax
run in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfuser_jax.nn.layers import TorchMultiheadAttention, torch_layer_norm
from mfuser_jax.nn.stack import DropPath, LayerStack, scan_layers
from mfuser_jax.ops.resize import resize

__all__ = [
    "CLIPTextContextEncoder",
    "CLIPTextEncoder",
    "CLIPVisionTransformer",
    "ResidualAttentionBlock",
    "Transformer",
]



# --------------------------------------------------------------------------------------
# Transformer pieces shared by both towers


def _layer_norm(ln: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    # CLIP's LayerNorm subclass: normalise in float32, hand back the input dtype
    return ln(x.astype(jnp.float32)).astype(x.dtype)


_ACTIVATIONS = ("quick_gelu", "gelu")


class MLP(nnx.Module):
    """c_fc -> activation -> c_proj.

    ``activation``: "quick_gelu" (OpenAI CLIP was trained with it) or "gelu", torch's exact
    erf nn.GELU (open_clip / EVA-CLIP text towers).
    """

    def __init__(
        self, width: int, *, activation: str = "quick_gelu", dtype=jnp.float32, rngs: nnx.Rngs
    ):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        kw = dict(dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.c_fc = nnx.Linear(width, 4 * width, **kw)
        self.c_proj = nnx.Linear(4 * width, width, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.c_fc(x)
        if self.activation == "gelu":
            x = jax.nn.gelu(x, approximate=False)
        else:
            x = x * jax.nn.sigmoid(1.702 * x)  # QuickGELU
        return self.c_proj(x)


class ResidualAttentionBlock(nnx.Module):
    """x + drop_path(attn(ln_1 x)); x + drop_path(mlp(ln_2 x)).

    Drop path as MFuser really applies it: timm's ``drop_path`` draws one keep/drop per
    index of the *first* axis, and MFuser's blocks run sequence-first (L, N, D), so whole
    token positions are dropped, shared by every image of the batch (not per sample).
    Reproduced with a DropPath whose mask is broadcast over batch and channels
    (keep-probability rescaling included). ``eval()`` disables it; in ``train()`` it needs
    the 'dropout' RNG stream even though the tower is frozen (MFuser trains with 0.1).
    """

    def __init__(
        self, width: int, heads: int, drop_path: float = 0.0, causal: bool = False,
        *, activation: str = "quick_gelu", dtype=jnp.float32, rngs: nnx.Rngs,
    ):
        self.causal = causal
        self.ln_1 = torch_layer_norm(width, rngs)
        # OpenAI's in_proj init, N(0, width**-0.5), and Flax's default out_proj kernel
        # (the checkpoint overwrites both)
        self.attn = TorchMultiheadAttention(
            width, heads, in_proj_init=nnx.initializers.normal(width**-0.5),
            out_proj_init=nnx.initializers.lecun_normal(), dtype=dtype, rngs=rngs)
        self.ln_2 = torch_layer_norm(width, rngs)
        self.mlp = MLP(width, activation=activation, dtype=dtype, rngs=rngs)
        # rate 0 (frozen towers, text tower): no drop path, so no RNG state to carry.
        # Token positions are dropped for the whole batch: the mask broadcasts over (0, 2).
        self.drop_path = (DropPath(drop_path, broadcast_dims=(0, 2), rngs=rngs)
                          if drop_path > 0 else None)

    def __call__(self, x: jax.Array, *, key=None, drop_rate=None) -> jax.Array:
        """``key``/``drop_rate``: this call's drop-path key and rate (stacked layers); by
        default the block's own rate and dropout stream."""
        keys = (None, None) if key is None else tuple(jax.random.split(key))

        def drop(r, k):
            return r if self.drop_path is None else self.drop_path(r, rate=drop_rate, key=k)

        x = x + drop(self.attn(_layer_norm(self.ln_1, x), causal=self.causal), keys[0])
        x = x + drop(self.mlp(_layer_norm(self.ln_2, x)), keys[1])
        return x


class Transformer(nnx.Module):
    """``resblocks``: a ``LayerStack`` of blocks (parameters stacked over layers, scanned);
    drop path grows linearly 0 -> drop_path_rate."""

    def __init__(
        self, width: int, layers: int, heads: int, causal: bool = False,
        drop_path_rate: float = 0.0, *, activation: str = "quick_gelu", dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.width = width
        self.layers = layers
        rates = np.linspace(0.0, drop_path_rate, layers) if layers > 1 else [0.0] * layers
        self.drop_path_rates = tuple(float(r) for r in rates)
        self.resblocks = LayerStack(
            lambda r: ResidualAttentionBlock(
                width, heads, float(drop_path_rate), causal, activation=activation,
                dtype=dtype, rngs=r),
            layers, rngs=rngs)

    def layer_inputs(self, key: jax.Array | None):
        """Per-layer scan inputs of ``block``: (drop-path keys, rates), or None without drop
        path or without a key (eval)."""
        if key is None or not any(self.drop_path_rates):
            return None
        return jax.random.split(key, self.layers), jnp.asarray(self.drop_path_rates)

    @staticmethod
    def block(layer: ResidualAttentionBlock, x: jax.Array, layer_input=None) -> jax.Array:
        if layer_input is None:
            return layer(x)
        key, rate = layer_input
        return layer(x, key=key, drop_rate=rate)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None,
                 remat: bool = False) -> jax.Array:
        x, _ = scan_layers(lambda layers, t, xi: self.block(layers[0], t, xi),
                           (self.resblocks,), x, self.layer_inputs(key), remat=remat)
        return x


# --------------------------------------------------------------------------------------
# Image tower


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


class CLIPVisionTransformer(nnx.Module):
    """CLIP ViT image tower, steppable block by block for the fused MFuser backbone.

    Defaults are OpenAI's ViT-L/14-336; MFuser builds it with ``patch_size=16,
    input_resolution=512, drop_path_rate=0.1`` and loads weights resized by
    ``mfuser_jax.towers.clip.convert.resize_for_mfuser``.

    ``mfuser_class_token``: MFuser's ``prepare_tokens_with_masks`` puts ``class_embedding``
    in the token *and* adds it again to the class position (``cls_pos = pos[0] +
    class_embedding``), so its class token starts as ``2 * class_embedding + pos[0]``.
    True (default) reproduces that, as MFuser's checkpoints were trained; False is
    OpenAI/HF CLIP (``class_embedding + pos[0]``).

    The spatial positional embedding (stored for the ``input_resolution // patch_size``
    grid) is resized bilinearly (align_corners=False, as MFuser does at run time) whenever
    the input's patch grid differs, so non-square and other sizes work.
    """

    def __init__(
        self,
        input_resolution: int | Sequence[int] = 336,
        patch_size: int = 14,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        output_dim: int = 768,
        drop_path_rate: float = 0.0,
        *,
        mfuser_class_token: bool = True,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.input_resolution = _pair(input_resolution)
        self.patch_size = int(patch_size)
        self.width = width
        self.output_dim = output_dim
        self.mfuser_class_token = mfuser_class_token
        self.dtype = dtype
        self.spatial_size = (
            self.input_resolution[0] // patch_size,
            self.input_resolution[1] // patch_size,
        )
        scale = width**-0.5
        self.conv1 = nnx.Conv(
            3, width, kernel_size=(patch_size, patch_size), strides=(patch_size, patch_size),
            padding="VALID", use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )
        n_pos = self.spatial_size[0] * self.spatial_size[1] + 1
        self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (width,)))
        self.positional_embedding = nnx.Param(
            scale * jax.random.normal(rngs.params(), (n_pos, width))
        )
        self.ln_pre = torch_layer_norm(width, rngs)
        self.transformer = Transformer(
            width, layers, heads, causal=False, drop_path_rate=drop_path_rate, dtype=dtype,
            rngs=rngs,
        )
        self.ln_post = torch_layer_norm(width, rngs)
        self.proj = nnx.Param(scale * jax.random.normal(rngs.params(), (width, output_dim)))

    @property
    def num_layers(self) -> int:
        return len(self.transformer.resblocks)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) for an input of height x width pixels."""
        return height // self.patch_size, width // self.patch_size

    def position_embedding(self, grid: tuple[int, int]) -> jax.Array:
        """(1 + rows*cols, W) float32: class position then the spatial ones resized to grid."""
        pos = self.positional_embedding[...]
        cls_pos = pos[:1]
        if self.mfuser_class_token:
            cls_pos = cls_pos + self.class_embedding[...][None]
        spatial = pos[1:].reshape(*self.spatial_size, self.width)
        if tuple(grid) != self.spatial_size:
            spatial = resize(spatial, grid, axes=(0, 1))
        return jnp.concatenate([cls_pos, spatial.reshape(-1, self.width)], axis=0)

    def prepare_tokens(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, 3) -> tokens (B, 1 + h*w, W) after ln_pre, in ``dtype``."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {images.shape}")
        x = self.conv1(images.astype(self.dtype))  # (B, h, w, W)
        b, gh, gw, c = x.shape
        x = x.reshape(b, gh * gw, c)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, c))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embedding((gh, gw)).astype(x.dtype)[None]
        return _layer_norm(self.ln_pre, x)

    @property
    def blocks(self) -> LayerStack:
        return self.transformer.resblocks

    def layer_inputs(self, key: jax.Array | None, grid=None):
        return self.transformer.layer_inputs(key)

    def block_aux(self, grid):
        return None  # blocks share nothing but the call

    @staticmethod
    def block(layer: ResidualAttentionBlock, x: jax.Array, layer_input=None, aux=None):
        """One block of the stack (the fused backbone's protocol; ``aux`` is unused)."""
        return Transformer.block(layer, x, layer_input)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """ln_post then proj: (..., W) -> (..., output_dim) float32 (any tokens, not just CLS)."""
        x = _layer_norm(self.ln_post, tokens)
        return (x @ self.proj[...].astype(x.dtype)).astype(jnp.float32)

    def forward_tokens(self, images: jax.Array, *, key=None) -> jax.Array:
        """All blocks: (B, H, W, 3) -> last tokens (B, 1 + h*w, W), before ln_post."""
        return self.transformer(self.prepare_tokens(images), key=key)

    def __call__(self, images: jax.Array, *, key=None) -> jax.Array:
        """Pooled image embedding (B, output_dim): ln_post(CLS) @ proj, like HF image_embeds."""
        return self.embed(self.forward_tokens(images, key=key)[:, 0])


# --------------------------------------------------------------------------------------
# Text towers


class CLIPTextEncoder(nnx.Module):
    """CLIP text transformer: causal mask, EOT pooling at argmax of the token ids.

    ``positional_embedding`` is (context_length, width); inputs may be shorter (the first
    positions are used), as MFuser truncates OpenAI's 77 positions to its context length.
    ``activation="gelu"`` gives the open_clip / EVA02-CLIP text tower (exact nn.GELU).
    """

    def __init__(
        self,
        context_length: int = 77,
        vocab_size: int = 49408,
        width: int = 768,
        heads: int = 12,
        layers: int = 12,
        embed_dim: int = 768,
        *,
        activation: str = "quick_gelu",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.width = width
        self.embed_dim = embed_dim
        self.dtype = dtype
        self.token_embedding = nnx.Embed(
            vocab_size, width, dtype=dtype, param_dtype=jnp.float32,
            embedding_init=nnx.initializers.normal(0.02), rngs=rngs,
        )
        self.positional_embedding = nnx.Param(
            0.01 * jax.random.normal(rngs.params(), (context_length, width))
        )
        self.transformer = Transformer(
            width, layers, heads, causal=True, activation=activation, dtype=dtype, rngs=rngs,
        )
        self.ln_final = torch_layer_norm(width, rngs)
        self.text_projection = nnx.Param(
            width**-0.5 * jax.random.normal(rngs.params(), (width, embed_dim))
        )

    def _encode_embeddings(self, x: jax.Array, eot_index: jax.Array) -> jax.Array:
        """x (N, L, W) token embeddings -> (N, embed_dim) float32 at eot_index (N,)."""
        n, length, _ = x.shape
        if length > self.context_length:
            raise ValueError(
                f"sequence of {length} tokens is longer than context_length={self.context_length}"
            )
        x = x + self.positional_embedding[...][:length].astype(x.dtype)[None]
        x = self.transformer(x)
        x = x[jnp.arange(n), eot_index]
        x = _layer_norm(self.ln_final, x)
        return (x @ self.text_projection[...].astype(x.dtype)).astype(jnp.float32)

    def __call__(self, text: jax.Array) -> jax.Array:
        """text (N, L) int token ids -> (N, embed_dim) float32."""
        text = jnp.asarray(text)
        x = self.token_embedding(text).astype(self.dtype)
        return self._encode_embeddings(x, jnp.argmax(text, axis=-1))


class CLIPTextContextEncoder(CLIPTextEncoder):
    """The text tower with CoOp-style learnable context, as MFuser calls it.

    ``__call__(text, context)``: text (K, N1) token ids of the class names (MFuser: N1=5),
    context (B, N2, W) shared by all classes or (B, K, N2, W) per class (MFuser: (1, 5, 768),
    owned by the segmentor, not by this module). Sequence per class: [SOT], the N2 context
    vectors, then text tokens 1..N1-1 (N1+N2 positions, MFuser's context_length=10);
    pooled at argmax(text)+N2 (the EOT) -> ln_final -> text_projection; returns (B, K, E).
    Without ``context`` it is the plain CLIPTextEncoder.
    """

    def __init__(self, context_length: int = 10, *args, **kwargs):
        super().__init__(context_length, *args, **kwargs)

    def __call__(self, text: jax.Array, context: jax.Array | None = None) -> jax.Array:
        if context is None:
            return super().__call__(text)
        text = jnp.asarray(text)
        k, n1 = text.shape
        x_text = self.token_embedding(text).astype(self.dtype)  # (K, N1, W)
        c = x_text.shape[-1]
        context = context.astype(self.dtype)
        if context.ndim == 3:
            b, n2, _ = context.shape
            context = jnp.broadcast_to(context[:, None], (b, k, n2, c))
        elif context.ndim == 4:
            b, kc, n2, _ = context.shape
            if kc != k:
                raise ValueError(f"context has {kc} classes, text has {k}")
        else:
            raise ValueError(f"context must be (B, N2, W) or (B, K, N2, W), got {context.shape}")
        x_text = jnp.broadcast_to(x_text[None], (b, k, n1, c))
        x = jnp.concatenate([x_text[:, :, :1], context, x_text[:, :, 1:]], axis=2)
        eot = jnp.argmax(text, axis=-1) + n2  # (K,)
        eot = jnp.broadcast_to(eot[None], (b, k)).reshape(-1)
        out = self._encode_embeddings(x.reshape(b * k, n1 + n2, c), eot)
        return out.reshape(b, k, self.embed_dim)
