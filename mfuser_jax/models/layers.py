"""Building blocks with PyTorch's defaults, shared by the ported modules.

Each port mirrors a PyTorch original, so its layers need torch's initialisations and
epsilons rather than Flax's: nn.Linear's kaiming_uniform(a=sqrt(5)) weight and
U(+-1/sqrt(fan_in)) bias, nn.LayerNorm's eps 1e-5, nn.GELU's exact erf form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["DepthwiseConv1d", "GELU", "TiledConvTranspose", "check_attn_implementation",
           "dot_product_attention", "mmcv_conv_module_init", "padded_dot_product_attention",
           "set_attn_implementation", "torch_conv", "torch_conv_transpose",
           "torch_default_bias_init", "torch_default_init", "torch_layer_norm", "torch_linear",
           "torch_mha_in_proj_init", "uniform_init"]

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


def padded_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str,
                                 causal: bool = False, multiple: int = CUDNN_SEQ_MULTIPLE) -> jax.Array:
    """``jax.nn.dot_product_attention`` with the query and key/value token axes zero-padded to a
    multiple of ``multiple``; the true lengths go in as ``query_seq_lengths`` /
    ``key_value_seq_lengths`` (a key mask: no real query sees a padded key; padded queries are
    computed and sliced off). Padding sits at the end, so a causal mask keeps its meaning."""
    lq, lk = q.shape[1], k.shape[1]
    pad_q, pad_k = -lq % multiple, -lk % multiple
    scale = 1.0 / math.sqrt(q.shape[-1])
    if not pad_q and not pad_k:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            implementation=implementation)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731
    batch = q.shape[0]
    out = jax.nn.dot_product_attention(
        pad(q, pad_q), pad(k, pad_k), pad(v, pad_k), scale=scale, is_causal=causal,
        query_seq_lengths=jnp.full((batch,), lq, jnp.int32),
        key_value_seq_lengths=jnp.full((batch,), lk, jnp.int32),
        implementation=implementation)
    return out[:, :lq]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          implementation: str | None = None, causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for q (B, Lq, H, d), k and v (B, Lk, H, d).

    ``implementation`` None: explicit einsums with float32 logits and softmax (the numerics
    of the PyTorch originals in float32, and the safe choice in bfloat16); "xla":
    ``jax.nn.dot_product_attention``'s XLA path (same math); "cudnn": cuDNN's fused (flash)
    kernel on a GPU, bfloat16/float16 only, with the token axes padded to
    ``CUDNN_SEQ_MULTIPLE`` and masked (``padded_dot_product_attention``).
    """
    if implementation == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"attn_implementation='cudnn' needs bfloat16 or float16 activations, got "
                             f"{q.dtype}: set the model dtype to bfloat16 or use attn_implementation='xla'")
        return padded_dot_product_attention(q, k, v, implementation="cudnn", causal=causal)
    scale = 1.0 / math.sqrt(q.shape[-1])
    if implementation is not None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            implementation=implementation)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if causal:
        keep = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), dtype=bool))
        logits = jnp.where(keep, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def set_attn_implementation(module: nnx.Module, implementation: str | None) -> int:
    """Point every attention layer under ``module`` (those with an ``attn_implementation``
    attribute: the CLIP, EVA02, SigLIP and DINOv2 towers' attentions) at ``implementation``;
    returns how many were set. How a model build applies ``config.model.attn_implementation``
    without threading it through every tower constructor."""
    check_attn_implementation(implementation)
    count = 0
    for _, sub in nnx.iter_graph(module):
        if isinstance(sub, nnx.Module) and hasattr(sub, "attn_implementation"):
            sub.attn_implementation = implementation
            count += 1
    return count
