"""Building blocks with PyTorch's defaults, shared by the ported modules.

Each port mirrors a PyTorch original, so its layers need torch's initialisations and
epsilons rather than Flax's: nn.Linear's kaiming_uniform(a=sqrt(5)) weight and
U(+-1/sqrt(fan_in)) bias, nn.LayerNorm's eps 1e-5, nn.GELU's exact erf form.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mfuser_jax.nn.stack import dropout_stream

__all__ = ["DepthwiseConv1d", "GELU", "TiledConvTranspose", "TorchMultiheadAttention",
           "check_attn_implementation", "dot_product_attention", "mmcv_conv_module_init",
           "padded_dot_product_attention", "set_attn_implementation", "torch_conv",
           "torch_conv_transpose", "torch_default_bias_init", "torch_default_init",
           "torch_layer_norm", "torch_linear", "torch_mha_in_proj_init", "uniform_init"]

# PyTorch's default Linear/Conv weight init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
# Flax's Linear (in, out) and Conv (kh, kw, in, out) kernels have torch's fan_in on axis -2.
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# mmcv 1.x ConvModule calls its own init_weights() in the constructor: kaiming_normal_
# (mode fan_out, nonlinearity relu; also without an activation), bias 0.
mmcv_conv_module_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

# nn.MultiheadAttention's in_proj_weight, torch layout (3E, E): xavier_uniform_ (its bias is
# 0, and its out_proj keeps nn.Linear's default weight with a zero bias).
torch_mha_in_proj_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                           in_axis=1, out_axis=0)


def uniform_init(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_default_bias_init(fan_in: int):
    """nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return uniform_init(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def torch_linear(din: int, dout: int, *, use_bias: bool = True, dtype=jnp.float32,
                 rngs: nnx.Rngs, kernel_init=None, bias_init=None) -> nnx.Linear:
    """``nn.Linear(din, dout)``: PyTorch's default init unless told, float32 parameters,
    ``dtype`` compute."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init or torch_default_init,
        bias_init=bias_init or torch_default_bias_init(din),
        rngs=rngs,
    )


def torch_conv(din: int, dout: int, kernel_size: int, *, padding=0, use_bias: bool = True,
               dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
    """``nn.Conv2d(din, dout, kernel_size, padding=padding)`` with its default init."""
    return nnx.Conv(
        din, dout, (kernel_size, kernel_size), padding=((padding, padding), (padding, padding)),
        use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=torch_default_init,
        bias_init=torch_default_bias_init(din * kernel_size * kernel_size), rngs=rngs,
    )


class TiledConvTranspose(nnx.ConvTranspose):
    """A 2-D ``nnx.ConvTranspose`` whose kernel equals its stride (no padding): every input
    pixel writes its own k x k output tile, so the layer is one matmul and a reshape. Same
    parameters and outputs as the convolution; it exists for the backward pass: XLA's CPU
    backend runs the kernel gradient of a strided transposed convolution through a generic
    loop (the FPN's 2048-channel 2x2/2 layers took ~25 min per image that way; as a matmul,
    seconds), and a GPU is as fast either way."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        b, h, w, _ = inputs.shape
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
        # transpose_kernel=False correlates the stride-dilated input with the kernel, so
        # output tap d of a tile takes kernel tap k-1-d: flip both spatial axes.
        y = jnp.einsum("bhwc,ijco->bhiwjo", x, kernel[::-1, ::-1], precision=self.precision)
        y = y.reshape(b, h * kh, w * kw, -1)
        return y if bias is None else y + bias


class DepthwiseConv1d(nnx.Conv):
    """A channels-last depthwise 1-D ``nnx.Conv`` (stride 1, no dilation) computed as k
    shifted multiply-adds. Same parameters ((k, 1, channels) kernel) and outputs as the
    convolution; it exists for the backward pass: XLA's CPU backend turns the kernel
    gradient of a grouped convolution into a dense (k, C, C) convolution run by a generic
    loop (6 s per MVFuser conv at C=512, L=2050: most of a full-size CPU step), while this
    form's gradients are elementwise products and sums."""

    def __init__(self, channels: int, kernel_size: int, *, padding: tuple[int, int],
                 use_bias: bool = False, dtype=jnp.float32, kernel_init=torch_default_init,
                 rngs: nnx.Rngs):
        super().__init__(channels, channels, (kernel_size,), padding=(tuple(padding),),
                         feature_group_count=channels, use_bias=use_bias, dtype=dtype,
                         param_dtype=jnp.float32, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        (k,), ((lo, hi),) = self.kernel_size, self.padding
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
        length = x.shape[-2]
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(lo, hi), (0, 0)])
        # a correlation, as nnx.Conv and torch's Conv1d compute: output t takes inputs
        # t - lo ... t - lo + k - 1
        y = sum(x[..., i:i + length, :] * kernel[i, 0] for i in range(k))
        return y if bias is None else y + bias


def torch_conv_transpose(din: int, dout: int, kernel_size: int, *, stride: int,
                         dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.ConvTranspose:
    """``nn.ConvTranspose2d(din, dout, kernel_size, stride)`` (no padding) with its default
    init. Torch takes the fan from its weight's dim 1, i.e. ``dout * k * k``: axis -1 of
    Flax's (kh, kw, in, out) kernel. Kernel == stride (the FPN's 2x2/2) runs as a matmul
    (``TiledConvTranspose``)."""
    fan_in = dout * kernel_size * kernel_size
    layer = TiledConvTranspose if kernel_size == stride else nnx.ConvTranspose
    return layer(
        din, dout, (kernel_size, kernel_size), strides=(stride, stride), padding="VALID",
        dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                                      in_axis=-1, out_axis=-2),
        bias_init=torch_default_bias_init(fan_in), rngs=rngs,
    )


def torch_layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """nn.LayerNorm(dim): eps 1e-5 (flax's default is 1e-6); float32 in and out."""
    return nnx.LayerNorm(dim, epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                         rngs=rngs)


class GELU(nnx.Module):
    """Exact (erf) GELU, as torch's nn.GELU(); jax.nn.gelu defaults to the tanh form.
    A module so it can fill a Sequential slot."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x, approximate=False)


ATTN_IMPLEMENTATIONS = (None, "xla", "cudnn")


def check_attn_implementation(implementation) -> None:
    if implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be None, 'xla' or 'cudnn', got {implementation!r}")


# cuDNN's fused attention refused 1025 tokens on an H100 ("Unsupported sequence length"; JAX
# also rejects odd lengths in its backward), so the cudnn path pads both token axes to a
# multiple of this, cuDNN's tile, and masks the padding by length. 1025 -> 1088 costs ~13% more
# attention FLOPs. Which multiples cuDNN accepts here is not yet measured on a GPU.
CUDNN_SEQ_MULTIPLE = 64


def _mask_4d(mask) -> jax.Array:
    """A boolean attention mask with leading axes added up to (B, H, Lq, Lk)."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_ or mask.ndim > 4:
        raise ValueError(f"the attention mask must be boolean and broadcastable to "
                         f"(B, heads, Lq, Lk), got {mask.dtype} {mask.shape}")
    return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def padded_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                 implementation: str, causal: bool = False, mask=None,
                                 scale: float | None = None,
                                 multiple: int = CUDNN_SEQ_MULTIPLE) -> jax.Array:
    """``jax.nn.dot_product_attention`` with the query and key/value token axes zero-padded to a
    multiple of ``multiple``; the true lengths go in as ``query_seq_lengths`` /
    ``key_value_seq_lengths`` (a key mask: no real query sees a padded key; padded queries are
    computed and sliced off). Padding sits at the end, so a causal mask keeps its meaning. A
    ``mask`` (``dot_product_attention``'s) is broadcast to the token axes and padded with True:
    the lengths already hide padded keys, and padded query rows never end up fully masked."""
    lq, lk = q.shape[1], k.shape[1]
    pad_q, pad_k = -lq % multiple, -lk % multiple
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = None if mask is None else _mask_4d(mask)
    if not pad_q and not pad_k:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, mask=mask,
                                            implementation=implementation)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731
    if mask is not None:  # cuDNN takes it as a bias of the full padded (Lq, Lk) shape
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (lq, lk))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, pad_k)), constant_values=True)
    batch = q.shape[0]
    out = jax.nn.dot_product_attention(
        pad(q, pad_q), pad(k, pad_k), pad(v, pad_k), scale=scale, is_causal=causal, mask=mask,
        query_seq_lengths=jnp.full((batch,), lq, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), lk, jnp.int32),
        implementation=implementation)
    return out[:, :lq]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          implementation: str | None = None, causal: bool = False,
                          mask=None, scale: float | None = None,
                          dropout: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """softmax(q k^T * scale + masking) v for q (B, Lq, H, d), k and v (B, Lk, H, d): the one
    attention core of every tower and head (``set_attn_implementation`` picks the path).

    ``implementation`` None: explicit einsums with float32 logits and softmax (the numerics
    of the PyTorch originals in float32, and the safe choice in bfloat16); "xla":
    ``jax.nn.dot_product_attention``'s XLA path (same math); "cudnn": cuDNN's fused (flash)
    kernel on a GPU, bfloat16/float16 only, with the token axes padded to
    ``CUDNN_SEQ_MULTIPLE`` and masked (``padded_dot_product_attention``).

    ``scale``: 1/sqrt(d) unless given. ``causal``: query i sees keys j <= i.

    ``mask``: boolean, True where a query may attend a key (JAX's convention; torch's boolean
    ``attn_mask`` is its negation), broadcastable to (B, H, Lq, Lk); fewer axes get leading
    ones. None blocks with -inf, so a fully blocked row is NaN, as in PyTorch; "xla" and
    "cudnn" block with a large finite negative, so such a row averages every value instead
    (the mask decoder unblocks full rows first, so the paths agree there). With "cudnn" the
    mask is passed on to ``jax.nn.dot_product_attention``, which hands it to cuDNN as an
    additive bias (broadcast and padded to the padded token axes; not yet measured on a GPU).

    ``dropout``: attention dropout, applied to the float32 probabilities (B, H, Lq, Lk).
    Only the einsum path exposes them, so None and "xla" both run the einsums when it is
    given (the same math); "cudnn" raises ValueError.
    """
    if implementation == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attn_implementation='cudnn' needs bfloat16 or float16 "
                             f"activations, got {q.dtype}: set the model dtype to bfloat16 "
                             f"or use attn_implementation='xla'")
        if dropout is not None:
            raise ValueError("attention dropout needs attn_implementation None or 'xla' "
                             "(cuDNN's kernel does not expose the probabilities)")
        return padded_dot_product_attention(q, k, v, implementation="cudnn", causal=causal,
                                            mask=mask, scale=scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if implementation is not None and dropout is None:
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, implementation=implementation,
            mask=None if mask is None else _mask_4d(mask))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if causal:
        keep = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), dtype=bool))
        logits = jnp.where(keep, logits, -jnp.inf)
    if mask is not None:
        logits = jnp.where(_mask_4d(mask), logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


class TorchMultiheadAttention(nnx.Module):
    """``torch.nn.MultiheadAttention(embed_dim, num_heads, dropout)`` (biases on, no
    add_bias_kv, kdim = vdim = embed_dim), batch-first: (B, L, E) in and out; torch's
    sequence-first default changes no arithmetic. Ported from torch/nn/modules/activation.py
    and torch/nn/functional.py (multi_head_attention_forward, _in_projection_packed).

    The parameters keep torch's names and layout, so state dicts load by rule:
    ``in_proj_weight`` (3E, E) and ``in_proj_bias`` (3E,) are raw Params with the q, k, v
    rows in that order, ``out_proj`` is a Linear. The projections follow
    ``_in_projection_packed``: one matmul when query, key and value are the same array, q
    apart and k/v packed when key is value, else three.

    Initialisation is torch's at construction unless told: ``in_proj_init`` xavier_uniform_
    (``torch_mha_in_proj_init``), ``out_proj_init`` nn.Linear's default weight, both biases
    0 (CLIP passes OpenAI's). ``dropout`` is torch's attention dropout on the probabilities
    (0: none, and no Dropout module). The attention itself is ``dot_product_attention`` with
    ``attn_implementation`` (None here; ``set_attn_implementation`` sets it for a model).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, *,
                 in_proj_init=torch_mha_in_proj_init, out_proj_init=torch_default_init,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.attn_implementation = None
        self.dtype = dtype
        self.in_proj_weight = nnx.Param(
            in_proj_init(rngs.params(), (3 * embed_dim, embed_dim), jnp.float32))
        self.in_proj_bias = nnx.Param(jnp.zeros((3 * embed_dim,), jnp.float32))
        self.out_proj = torch_linear(embed_dim, embed_dim, dtype=dtype, rngs=rngs,
                                     kernel_init=out_proj_init,
                                     bias_init=nnx.initializers.zeros_init())
        self.attn_drop = (nnx.Dropout(dropout, rngs=dropout_stream(rngs)) if dropout
                          else None)

    def __call__(self, query: jax.Array, key: jax.Array | None = None,
                 value: jax.Array | None = None, *, attn_mask=None, causal: bool = False,
                 deterministic: bool | None = None) -> jax.Array:
        """query (B, Lq, E); key and value (B, Lk, E), by default the query (and value the
        key). ``attn_mask``: torch's boolean convention, True = may NOT attend, shaped
        (Lq, Lk) or broadcastable to (B, heads, Lq, Lk) (torch's 3-D (B * heads, Lq, Lk)
        layout is not taken: reshape it)."""
        key = query if key is None else key
        value = key if value is None else value
        e, h = self.embed_dim, self.num_heads
        w = self.in_proj_weight[...].astype(self.dtype)
        bias = self.in_proj_bias[...].astype(self.dtype)

        def project(x, first, count):  # rows first*E ... (first+count)*E of the packing
            rows = slice(first * e, (first + count) * e)
            y = x.astype(self.dtype) @ w[rows].T + bias[rows]
            return [t.reshape(*x.shape[:2], h, e // h) for t in jnp.split(y, count, axis=-1)]

        if key is query and value is query:
            q, k, v = project(query, 0, 3)
        elif value is key:
            (q,), (k, v) = project(query, 0, 1), project(key, 1, 2)
        else:
            (q,), (k,), (v,) = project(query, 0, 1), project(key, 1, 1), project(value, 2, 1)
        mask = None
        if attn_mask is not None:
            attn_mask = jnp.asarray(attn_mask)
            if attn_mask.dtype != jnp.bool_ or attn_mask.ndim == 3:
                raise ValueError(f"attn_mask must be boolean, (Lq, Lk) or 4-D, got "
                                 f"{attn_mask.dtype} {attn_mask.shape}")
            mask = ~attn_mask
        dropout = None
        if self.attn_drop is not None and not (
                self.attn_drop.deterministic if deterministic is None else deterministic):
            dropout = lambda p: self.attn_drop(p, deterministic=False)  # noqa: E731
        out = dot_product_attention(q, k, v, implementation=self.attn_implementation,
                                    causal=causal, mask=mask, dropout=dropout)
        return self.out_proj(out.reshape(*query.shape[:2], e))


def set_attn_implementation(module: nnx.Module, implementation: str | None) -> int:
    """Point every attention layer under ``module`` (those with an ``attn_implementation``
    attribute: ``TorchMultiheadAttention`` in CLIP, SigLIP's pooling head, the pixel decoder
    and the mask decoder; the DINOv2, EVA02 and SigLIP towers' attentions; the text
    enhancer's) at ``implementation``; returns how many were set. A stacked layer's module
    serves every layer and counts once. How a model build applies
    ``config.model.attn_implementation``, and how a tower built alone picks its path."""
    check_attn_implementation(implementation)
    count = 0
    for _, sub in nnx.iter_graph(module):
        if isinstance(sub, nnx.Module) and hasattr(sub, "attn_implementation"):
            sub.attn_implementation = implementation
            count += 1
    return count
