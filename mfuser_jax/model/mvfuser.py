"""MVFuser: the Mamba-style token mixer that fuses DINOv2 and CLIP tokens (and text with
visual tokens inside the text enhancer).

Ported from devinxzhang/MFuser, models/backbones/eva_clip/adapter_module.py (class
MVFuser), with the gated RMSNorm of state-spaces/mamba (mamba_ssm/ops/triton/
layernorm_gated.py, ``rms_norm_ref`` with norm_before_gate=True, group_size=None).

Computation for tokens h (batch, length, d_model), d_inner = expand * d_model and
half = d_inner // 2:

    x, z = split(in_proj(h))                       # half channels each, no bias
    x = silu(depthwise_conv_k(x))                  # 'same' padding, no conv bias
    z = silu(depthwise_conv_k(z))                  # the second ("spatial") branch
    dt, B, C = split(x_proj(x))                    # dt_rank, d_state, d_state
    dt = dt_proj(dt)                               # Linear WITH its bias ...
    y = selective_scan(x, dt, -exp(A_log), B, C, D,
                       delta_bias=dt_proj.bias,    # ... and the bias once more,
                       delta_softplus=True)        # as the original does
    y = rmsnorm(y) * norm.weight * silu(z)         # eps 1e-5, norm before gate
    out = dropout(out_proj(y)) * scale             # scale init 0.001

The double use of ``dt_proj.bias`` is deliberate: released checkpoints were trained so.
Attribute names are the original's, so ``mfuser_jax.weights.load_torch_state_dict``
loads its state dict by rule (depthwise Conv1d weight (C, 1, k) -> kernel (k, 1, C)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mfuser_jax.nn.layers import (DepthwiseConv1d, torch_default_init, torch_linear,
                                      uniform_init)
from mfuser_jax.nn.stack import dropout_stream
from mfuser_jax.ops.selective_scan import selective_scan

__all__ = ["MVFuser", "RMSNormGated"]

class RMSNormGated(nnx.Module):
    """mamba_ssm's gated RMSNorm (group_size=None, norm_before_gate=True, no bias):
    ``x / sqrt(mean(x^2) + eps) * weight * silu(z)``, computed in float32.

    The gate is applied AFTER normalising (norm_before_gate=True); mamba2's other mode
    normalises ``x * silu(z)`` instead and gives different numbers.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((hidden_size,), jnp.float32))

    def __call__(self, x: jax.Array, z: jax.Array | None = None) -> jax.Array:
        x = x.astype(jnp.float32)
        rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        out = x * rstd * self.weight[...].astype(jnp.float32)
        if z is not None:
            out = out * jax.nn.silu(z.astype(jnp.float32))
        return out


class MVFuser(nnx.Module):
    """Selective-scan token mixer; input and output (batch, length, d_model).

    Args:
      d_model: token width.
      d_state: SSM state size per channel (the original's default is 8, but every use in
        MFuser passes 16; so does our default).
      d_conv: depthwise convolution width ('same' padding).
      expand: d_inner = expand * d_model; the scan runs over d_inner // 2 channels.
      dt_rank: rank of the delta projection; "auto" = ceil(d_model / 16).
      dt_min, dt_max, dt_init_floor: range of the initial step sizes (log-uniform).
      proj_drop: dropout on the output projection.
      scan_backend: backend of ``mfuser_jax.ops.selective_scan.selective_scan``.
      dtype: compute dtype of the projections and convolutions; the scan, the norm and
        the softplus run in float32. The output has this dtype.
      rngs: parameter init and the "dropout" stream.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 3,
        expand: int = 1,
        *,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        proj_drop: float = 0.1,
        scan_backend: str = "auto",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        if self.d_inner % 2:
            raise ValueError(f"MVFuser needs an even d_inner = expand * d_model, got {self.d_inner}")
        half = self.d_inner // 2
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend
        self.dtype = dtype

        def linear(din, dout):  # mamba's projections have no bias
            return torch_linear(din, dout, use_bias=False, dtype=dtype, rngs=rngs)

        self.in_proj = linear(d_model, self.d_inner)
        self.x_proj = linear(half, self.dt_rank + 2 * d_state)

        # dt_proj: weight U(+-dt_rank^-0.5); bias = softplus^-1(dt), dt log-uniform in
        # [dt_min, dt_max] clamped below at dt_init_floor (mamba's "random" dt init).
        def dt_bias_init(key, shape, dtype=jnp.float32):
            u = jax.random.uniform(key, shape, jnp.float32)
            dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = jnp.maximum(dt, dt_init_floor)
            return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

        self.dt_proj = nnx.Linear(
            self.dt_rank,
            half,
            use_bias=True,
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=uniform_init(self.dt_rank**-0.5),
            bias_init=dt_bias_init,
            rngs=rngs,
        )

        # S4D-real init: A = -(1..d_state) for every channel; D skip = 1.
        self.A_log = nnx.Param(
            jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (half, d_state)))
        )
        self.D = nnx.Param(jnp.ones((half,), jnp.float32))
        self.out_proj = linear(half, d_model)
        # A fuser inside a LayerStack is built without a dropout stream and gets its key
        # per call; a lone fuser (the text enhancer's) draws from its own stream.
        self.proj_drop = nnx.Dropout(proj_drop, rngs=dropout_stream(rngs))

        # The original builds these with bias=conv_bias//2 == True//2 == 0: no bias.
        # PyTorch's padding='same' pads (k-1)//2 before and the rest after.
        pad = ((d_conv - 1) // 2, d_conv - 1 - (d_conv - 1) // 2)

        def depthwise():
            return DepthwiseConv1d(half, d_conv, padding=pad, use_bias=False, dtype=dtype,
                                   kernel_init=torch_default_init, rngs=rngs)

        self.conv1d_x = depthwise()
        self.conv1d_z = depthwise()
        self.norm = RMSNormGated(half, eps=1e-5)
        self.scale = nnx.Param(jnp.asarray(0.001, jnp.float32))

    def __call__(self, hidden_states: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """``key``: the output dropout's key for this call (default: the dropout stream)."""
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(
                f"MVFuser expects (batch, length, {self.d_model}), got {hidden_states.shape}"
            )
        batch, length, _ = hidden_states.shape
        half = self.d_inner // 2
        xz = self.in_proj(hidden_states)  # (b, l, d_inner), channels-last throughout
        x, z = xz[..., :half], xz[..., half:]
        x = jax.nn.silu(self.conv1d_x(x))
        z = jax.nn.silu(self.conv1d_z(z))

        x_dbl = self.x_proj(x)
        dt, B, C = jnp.split(x_dbl, [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        dt = self.dt_proj(dt)  # the Linear adds dt_proj.bias here ...

        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        to_bdl = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731  (b, l, c) -> (b, c, l)
        y = selective_scan(
            to_bdl(x).astype(jnp.float32),  # float32 u: y reaches the norm in float32
            to_bdl(dt),
            A,
            to_bdl(B),
            to_bdl(C),
            self.D[...].astype(jnp.float32),
            None,
            self.dt_proj.bias[...].astype(jnp.float32),  # ... and the scan adds it again
            True,
            backend=self.scan_backend,
        )
        assert y.shape == (batch, half, length), y.shape
        y = self.norm(to_bdl(y), z)
        out = self.out_proj(y.astype(self.dtype))
        out = self.proj_drop(out, rngs=key)
        return (out * self.scale[...]).astype(self.dtype)
