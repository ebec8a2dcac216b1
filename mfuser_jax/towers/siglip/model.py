"""SigLIP image and text towers (SigLIP-L/16-384, as MFuser runs them), in Flax NNX.

Ported from devinxzhang/MFuser models/backbones/siglip/modeling_siglip.py, itself a copy of
HF transformers' SigLIP: SiglipVisionEmbeddings, SiglipTextEmbeddings (with MFuser's CoOp
context), SiglipAttention, SiglipMLP, SiglipEncoderLayer, SiglipMultiheadAttentionPoolingHead
(with MFuser's per-token branch), SiglipVisionTransformer and SiglipTextTransformer.
Attribute names are HF's (embeddings.patch_embedding, encoder.layers.N.self_attn.q_proj,
post_layernorm, head.probe, head.attention.in_proj_weight, final_layer_norm ...), so an HF
``SiglipModel`` state dict split by ``mfuser_jax.towers.siglip.convert.siglip_state_dicts`` loads
with ``load_torch_state_dict`` by rule.

SigLIP differs from CLIP where it matters here: no class token (the image tower pools with
an attention probe), tanh-approximated GELU, LayerNorm eps 1e-6, no causal mask and no
attention mask in the text tower (MFuser passes none), and the pooled text embedding is
the last token's, whatever token sits there.

Layout: images NHWC (normalised with SigLIP's mean = std = 0.5), tokens (B, N, D).
Parameters float32; ``dtype`` is the compute dtype; layer norms and softmax run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mfuser_jax.nn.layers import (
    TorchMultiheadAttention,
    dot_product_attention,
    torch_linear,
)
from mfuser_jax.nn.stack import LayerStack, scan_layers
from mfuser_jax.ops.resize import resize

__all__ = ["SiglipTextTransformer", "SiglipVisionTransformer"]

_LN_EPS = 1e-6


def _layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=_LN_EPS, dtype=jnp.float32, param_dtype=jnp.float32,
                         rngs=rngs)


def _ln(ln: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    # normalise in float32, hand back the input dtype
    return ln(x.astype(jnp.float32)).astype(x.dtype)


class SiglipAttention(nnx.Module):
    """Multi-head self-attention with separate q/k/v/out projections (all with bias)."""

    def __init__(self, dim: int, heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.num_heads = heads
        self.attn_implementation = None  # the core's path: see layers.set_attn_implementation
        self.dtype = dtype
        lin = dict(dtype=dtype, rngs=rngs)
        self.q_proj = torch_linear(dim, dim, **lin)
        self.k_proj = torch_linear(dim, dim, **lin)
        self.v_proj = torch_linear(dim, dim, **lin)
        self.out_proj = torch_linear(dim, dim, **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        x = x.astype(self.dtype)
        q, k, v = (p(x).reshape(b, n, self.num_heads, -1)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = dot_product_attention(q, k, v, implementation=self.attn_implementation)
        return self.out_proj(out.reshape(b, n, c))


class SiglipMLP(nnx.Module):
    """fc1 -> GELU (tanh approximation, HF's gelu_pytorch_tanh) -> fc2."""

    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = torch_linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = torch_linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class SiglipEncoderLayer(nnx.Module):
    """Pre-norm block: x + attn(layer_norm1 x); x + mlp(layer_norm2 x)."""

    def __init__(self, dim: int, heads: int, hidden: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.self_attn = SiglipAttention(dim, heads, dtype=dtype, rngs=rngs)
        self.layer_norm1 = _layer_norm(dim, rngs)
        self.mlp = SiglipMLP(dim, hidden, dtype=dtype, rngs=rngs)
        self.layer_norm2 = _layer_norm(dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(_ln(self.layer_norm1, x)).astype(x.dtype)
        return x + self.mlp(_ln(self.layer_norm2, x)).astype(x.dtype)


class SiglipEncoder(nnx.Module):
    """``layers``: a ``LayerStack`` of encoder layers (stacked parameters, scanned)."""

    def __init__(self, dim: int, layers: int, heads: int, hidden: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.layers = LayerStack(
            lambda r: SiglipEncoderLayer(dim, heads, hidden, dtype=dtype, rngs=r),
            layers, rngs=rngs)

    def __call__(self, x: jax.Array, *, remat: bool = False) -> jax.Array:
        x, _ = scan_layers(lambda layers, t, _: layers[0](t), (self.layers,), x, remat=remat)
        return x


class SiglipMultiheadAttentionPoolingHead(nnx.Module):
    """The attention-pooling head as MFuser modified it: besides HF's learnt-probe branch
    (``global``), every token queries the same attention (``local``); both then go through
    the same residual layernorm + MLP. Returns (global (B, 1, D), local (B, N, D))."""

    def __init__(self, dim: int, heads: int, hidden: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.probe = nnx.Param(jax.random.normal(rngs.params(), (1, 1, dim), jnp.float32))
        # torch.nn.MultiheadAttention(batch_first=True): the probe and every token query
        # the tokens
        self.attention = TorchMultiheadAttention(dim, heads, dtype=dtype, rngs=rngs)
        self.layernorm = _layer_norm(dim, rngs)
        self.mlp = SiglipMLP(dim, hidden, dtype=dtype, rngs=rngs)

    def _residual_mlp(self, x: jax.Array) -> jax.Array:
        return x + self.mlp(_ln(self.layernorm, x)).astype(x.dtype)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        probe = jnp.broadcast_to(self.probe[...], (x.shape[0], 1, x.shape[-1]))
        global_state = self._residual_mlp(self.attention(probe, x))
        local_state = self._residual_mlp(self.attention(x, x))
        return global_state, local_state


class SiglipVisionEmbeddings(nnx.Module):
    def __init__(self, dim: int, image_size: int, patch_size: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.patch_embedding = nnx.Conv(
            3, dim, kernel_size=(patch_size, patch_size), strides=(patch_size, patch_size),
            padding="VALID", dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.position_embedding = nnx.Embed(self.grid[0] * self.grid[1], dim,
                                            param_dtype=jnp.float32, rngs=rngs)


class SiglipVisionTransformer(nnx.Module):
    """SigLIP ViT image tower, steppable layer by layer for the fused MFuser backbone.

    Defaults are SigLIP-L/16-384; MFuser builds it with ``image_size=512`` (a 32 x 32 grid,
    1024 tokens, no class token) and loads weights resized by
    ``mfuser_jax.towers.siglip.convert.siglip_state_dicts``. The position table is stored for the
    ``image_size // patch_size`` grid and resized bilinearly (as MFuser's loader resizes it)
    when an input's grid differs.
    """

    def __init__(self, image_size: int = 384, patch_size: int = 16, hidden_size: int = 1024,
                 num_hidden_layers: int = 24, num_attention_heads: int = 16,
                 intermediate_size: int = 4096, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.patch_size = int(patch_size)
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.embeddings = SiglipVisionEmbeddings(hidden_size, image_size, patch_size,
                                                 dtype=dtype, rngs=rngs)
        self.encoder = SiglipEncoder(hidden_size, num_hidden_layers, num_attention_heads,
                                     intermediate_size, dtype=dtype, rngs=rngs)
        self.post_layernorm = _layer_norm(hidden_size, rngs)
        self.head = SiglipMultiheadAttentionPoolingHead(
            hidden_size, num_attention_heads, intermediate_size, dtype=dtype, rngs=rngs)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (rows, cols) for an input of height x width pixels."""
        return height // self.patch_size, width // self.patch_size

    def prepare_tokens(self, images: jax.Array) -> jax.Array:
        """images (B, H, W, 3), SigLIP-normalised -> patch tokens (B, rows*cols, D)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {images.shape}")
        emb = self.embeddings
        x = emb.patch_embedding(images.astype(self.dtype))
        b, gh, gw, c = x.shape
        pos = emb.position_embedding.embedding[...].reshape(*emb.grid, c)
        if (gh, gw) != emb.grid:
            pos = resize(pos, (gh, gw), axes=(0, 1))
        return x.reshape(b, gh * gw, c) + pos.reshape(1, gh * gw, c).astype(x.dtype)

    @property
    def blocks(self) -> LayerStack:
        return self.encoder.layers

    def layer_inputs(self, key=None, grid=None):
        return None  # no drop path

    def block_aux(self, grid):
        return None  # blocks share nothing but the call

    @staticmethod
    def block(layer: SiglipEncoderLayer, x: jax.Array, layer_input=None, aux=None):
        return layer(x)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(last_hidden_state (B, N, D) after post_layernorm, pooler_output (B, D)) float32,
        as HF's SiglipVisionModel."""
        x = self.encoder(self.prepare_tokens(images))
        x = _ln(self.post_layernorm, x)
        pooled, _ = self.head(x)
        return x.astype(jnp.float32), pooled[:, 0].astype(jnp.float32)


class SiglipTextEmbeddings(nnx.Module):
    def __init__(self, dim: int, vocab_size: int, positions: int, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(vocab_size, dim, param_dtype=jnp.float32, rngs=rngs)
        self.position_embedding = nnx.Embed(positions, dim, param_dtype=jnp.float32, rngs=rngs)


class SiglipTextTransformer(nnx.Module):
    """SigLIP text tower with MFuser's CoOp context.

    ``__call__(input_ids (K, N1))`` -> (K, D): HF's pooler_output (last token after
    ``final_layer_norm``, then ``head``). With ``context`` (B, N2, D) shared by the classes
    or (B, K, N2, D) per class, the N2 context vectors are inserted after token 0 of every
    name ([tok0, context, tok1 ...], MFuser's SiglipTextEmbeddings) -> (B, K, D).
    ``context_length`` is the number of stored positions (MFuser: 10 = 5 + 5).
    """

    def __init__(self, context_length: int = 64, vocab_size: int = 32000,
                 hidden_size: int = 1024, num_hidden_layers: int = 24,
                 num_attention_heads: int = 16, intermediate_size: int = 4096, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.context_length = context_length
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.embeddings = SiglipTextEmbeddings(hidden_size, vocab_size, context_length,
                                               rngs=rngs)
        self.encoder = SiglipEncoder(hidden_size, num_hidden_layers, num_attention_heads,
                                     intermediate_size, dtype=dtype, rngs=rngs)
        self.final_layer_norm = _layer_norm(hidden_size, rngs)
        self.head = torch_linear(hidden_size, hidden_size, dtype=dtype, rngs=rngs)

    def _encode(self, x: jax.Array) -> jax.Array:
        n = x.shape[1]
        if n > self.context_length:
            raise ValueError(f"{n} tokens exceed the {self.context_length} stored positions")
        pos = self.embeddings.position_embedding.embedding[...][:n]
        x = self.encoder((x + pos[None]).astype(self.dtype))
        last = _ln(self.final_layer_norm, x[:, -1])
        return self.head(last).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, context: jax.Array | None = None) -> jax.Array:
        input_ids = jnp.asarray(input_ids)
        tokens = self.embeddings.token_embedding.embedding[...][input_ids]  # (K, N1, D)
        if context is None:
            return self._encode(tokens)
        k, n1, d = tokens.shape
        context = context.astype(tokens.dtype)
        if context.ndim == 3:
            context = jnp.broadcast_to(context[:, None], (context.shape[0], k) + context.shape[1:])
        elif context.ndim != 4 or context.shape[1] != k:
            raise ValueError(f"context must be (B, N2, D) or (B, {k}, N2, D), got {context.shape}")
        b = context.shape[0]
        tokens = jnp.broadcast_to(tokens[None], (b, k, n1, d))
        x = jnp.concatenate([tokens[:, :, :1], context, tokens[:, :, 1:]], axis=2)
        return self._encode(x.reshape(b * k, -1, d)).reshape(b, k, -1)
