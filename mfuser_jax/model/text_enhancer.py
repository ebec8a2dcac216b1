"""The text enhancer: MTEnhancer layers inside a ContextDecoder.

Ported from devinxzhang/MFuser, models/backbones/clip/models.py (Attention, MTEnhancer,
ContextDecoder). The class-name text embeddings (B, K, visual_dim) attend to each other,
then mix with the visual embeddings through an MVFuser run over
``[LN(text), visual, LN(text)]``: the scan is causal, so the text copy in front is read
before the visual tokens and the copy behind after them, and both ends are added back.

PyTorch ``nn.Sequential`` children are numbered, so the original's keys are
``memory_proj.0.weight``, ``mlp.3.bias``, ...; ``nnx.Sequential`` would name them
``memory_proj.layers.0...``, hence ``nnx.List`` here (parameter-free slots such as GELU
keep their index so the numbering matches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mfuser_jax.nn.layers import GELU, dot_product_attention, torch_layer_norm, torch_linear
from mfuser_jax.model.mvfuser import MVFuser

__all__ = ["Attention", "ContextDecoder", "MTEnhancer"]


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v projections (no bias by default) and an
    output projection with bias. The attention is ``layers.dot_product_attention`` (logits
    and softmax in float32; ``attn_implementation`` None until ``set_attn_implementation``).
    (The original also builds an ``attn_drop`` that its forward never applies; it has no
    parameters, so it is left out.)
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        *,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"Attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_implementation = None
        self.dtype = dtype
        self.q_proj = torch_linear(dim, dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = torch_linear(dim, dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = torch_linear(dim, dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = torch_linear(dim, dim, dtype=dtype, rngs=rngs)
        self.proj_drop = nnx.Dropout(proj_drop, rngs=rngs)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        if k.shape != v.shape:
            raise ValueError(f"Attention keys {k.shape} and values {v.shape} differ in shape")
        b, n, c = q.shape
        m = k.shape[1]
        h = self.num_heads
        q = self.q_proj(q).reshape(b, n, h, c // h)
        k = self.k_proj(k).reshape(b, m, h, c // h)
        v = self.v_proj(v).reshape(b, m, h, c // h)
        x = dot_product_attention(q, k, v, implementation=self.attn_implementation,
                                  scale=self.scale).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class MTEnhancer(nnx.Module):
    """One enhancer layer on text tokens x (B, K, d) with visual tokens (B, N, d):

        x = x + SelfAttn(LN1 x)
        m = MVFuser([LN2 x, visual, LN2 x]);  x = x + m[:, :K] + m[:, -K:]
        x = x + Dropout(MLP(LN3 x))            # Linear, GELU, Dropout, Linear

    The MVFuser is built as the original builds it, ``MVFuser(d_model, d_state=16)``:
    d_conv 3, expand 1, its own dropout 0.1 whatever ``dropout`` is.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dropout: float = 0.1,
        *,
        scan_backend: str = "auto",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.self_attn = Attention(d_model, nhead, proj_drop=dropout, dtype=dtype, rngs=rngs)
        self.cross_attn = MVFuser(d_model, d_state=16, scan_backend=scan_backend, dtype=dtype, rngs=rngs)
        self.norm1 = torch_layer_norm(d_model, rngs)
        self.norm2 = torch_layer_norm(d_model, rngs)
        self.norm3 = torch_layer_norm(d_model, rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.mlp = nnx.List(
            [
                torch_linear(d_model, 4 * d_model, dtype=dtype, rngs=rngs),
                GELU(),
                nnx.Dropout(dropout, rngs=rngs),
                torch_linear(4 * d_model, d_model, dtype=dtype, rngs=rngs),
            ]
        )

    def __call__(self, x: jax.Array, visual: jax.Array) -> jax.Array:
        k = x.shape[1]
        q = self.norm1(x)
        x = x + self.self_attn(q, q, q)
        t = self.norm2(x)
        mixed = self.cross_attn(jnp.concatenate([t, visual.astype(t.dtype), t], axis=1))
        x = x + mixed[:, :k] + mixed[:, -k:]
        h = self.norm3(x)
        for layer in self.mlp:
            h = layer(h)
        return x + self.dropout(h)


class ContextDecoder(nnx.Module):
    """Enhances class text embeddings with visual context.

    Call ``(text (B, K, visual_dim), visual (B, N, visual_dim)) -> (B, K, visual_dim)``;
    ``visual`` is [global; pixel] embeddings. memory_proj = LN, Linear, LN on visual;
    text_proj = LN, Linear on text; ``transformer_layers`` MTEnhancer layers;
    out_proj = LN, Linear. The residual stream is float32, matmuls run in ``dtype``.

    Initialisation follows the original's ``self.apply(_init_weights)``, which reaches
    every nn.Linear inside, the MVFusers' included: weight ~ N(0, 0.02) (timm's
    trunc_normal_ cuts at +-2 absolute, i.e. 100 sigma: a plain normal), bias 0 -- so the
    MVFusers' dt_proj bias starts at 0 here, not at softplus^-1(dt).
    """

    def __init__(
        self,
        transformer_width: int = 256,
        transformer_heads: int = 4,
        transformer_layers: int = 1,
        visual_dim: int = 768,
        dropout: float = 0.1,
        *,
        scan_backend: str = "auto",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.visual_dim = visual_dim
        self.memory_proj = nnx.List(
            [
                torch_layer_norm(visual_dim, rngs),
                torch_linear(visual_dim, transformer_width, dtype=dtype, rngs=rngs),
                torch_layer_norm(transformer_width, rngs),
            ]
        )
        self.text_proj = nnx.List(
            [
                torch_layer_norm(visual_dim, rngs),
                torch_linear(visual_dim, transformer_width, dtype=dtype, rngs=rngs),
            ]
        )
        self.decoder = nnx.List(
            [
                MTEnhancer(
                    transformer_width,
                    transformer_heads,
                    dropout,
                    scan_backend=scan_backend,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(transformer_layers)
            ]
        )
        self.out_proj = nnx.List(
            [
                torch_layer_norm(transformer_width, rngs),
                torch_linear(transformer_width, visual_dim, dtype=dtype, rngs=rngs),
            ]
        )
        self._init_weights(rngs)

    def _init_weights(self, rngs: nnx.Rngs) -> None:
        # LayerNorms already start at weight 1, bias 0; only the Linears change.
        for _, module in nnx.iter_modules(self):
            if isinstance(module, nnx.Linear):
                kernel = module.kernel[...]
                module.kernel[...] = 0.02 * jax.random.normal(rngs.params(), kernel.shape, kernel.dtype)
                if module.bias is not None:
                    module.bias[...] = jnp.zeros_like(module.bias[...])

    def __call__(self, text: jax.Array, visual: jax.Array) -> jax.Array:
        if text.ndim != 3 or visual.ndim != 3 or text.shape[-1] != self.visual_dim or (
            visual.shape[-1] != self.visual_dim or text.shape[0] != visual.shape[0]
        ):
            raise ValueError(
                f"ContextDecoder expects text (B, K, {self.visual_dim}) and visual "
                f"(B, N, {self.visual_dim}); got {text.shape} and {visual.shape}"
            )
        for layer in self.memory_proj:
            visual = layer(visual)
        x = text
        for layer in self.text_proj:
            x = layer(x)
        x = x.astype(jnp.float32)
        for layer in self.decoder:
            x = layer(x, visual)
        for layer in self.out_proj:
            x = layer(x)
        return x.astype(jnp.float32)
