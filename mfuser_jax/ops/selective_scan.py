"""Mamba's selective scan (S6) with mamba_ssm's semantics and layout, several backends.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d, state n)
    y_t = <C_t, h_t> + D * u_t,   y = y * silu(z) if z is given

with delta <- softplus(delta + delta_bias) when asked. Layout as mamba_ssm's
``selective_scan_fn``: u, delta, z (batch, dim, length); A (dim, state);
B, C (batch, state, length); D, delta_bias (dim,). The recurrence always runs in float32;
the result has u's dtype. Ported from mamba_ssm's ``selective_scan_ref``
(state-spaces/mamba, mamba_ssm/ops/selective_scan_interface.py).

Backends share one signature (axlearn's ssm.py style):
  "reference"   lax.scan over the sequence: the readable definition, slow on GPU.
  "associative" lax.associative_scan, chunked and rematerialised to bound memory.
  "pallas"      fused kernel (GPU; interpret mode elsewhere).
  "auto"        pallas on GPU, associative elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["BACKENDS", "selective_scan", "register_backend"]

ScanFn = Callable[..., jax.Array]
BACKENDS: dict[str, ScanFn] = {}


def register_backend(name: str):
    def wrap(fn: ScanFn) -> ScanFn:
        BACKENDS[name] = fn
        return fn

    return wrap


def discretize_delta(delta, delta_bias, delta_softplus):
    """delta in float32 with the bias added and softplus applied as mamba_ssm does."""
    delta = delta.astype(jnp.float32)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(jnp.float32)[:, None]
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    return delta


def finish_output(y, u, D, z, out_dtype):
    """Skip connection and gate, shared by every backend: y + D*u, then * silu(z)."""
    if D is not None:
        y = y + u.astype(jnp.float32) * D.astype(jnp.float32)[:, None]
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(out_dtype)


@register_backend("reference")
def _scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    delta = discretize_delta(delta, delta_bias, delta_softplus)
    A = A.astype(jnp.float32)
    uf, Bf, Cf = (t.astype(jnp.float32) for t in (u, B, C))

    def step(h, inputs):  # h (batch, dim, state)
        delta_t, u_t, B_t, C_t = inputs  # (b, d), (b, d), (b, n), (b, n)
        h = jnp.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, C_t)

    h0 = jnp.zeros(u.shape[:2] + A.shape[-1:], jnp.float32)
    seq_first = lambda t: jnp.moveaxis(t, -1, 0)  # noqa: E731
    _, ys = jax.lax.scan(step, h0, (seq_first(delta), seq_first(uf), seq_first(Bf), seq_first(Cf)))
    return finish_output(jnp.moveaxis(ys, 0, -1), u, D, z, u.dtype)


def _default_backend() -> str:
    return "pallas" if jax.default_backend() == "gpu" and "pallas" in BACKENDS else "associative"


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    *,
    backend: str = "auto",
):
    """Selective scan; see the module docstring for shapes and semantics."""
    if backend == "auto":
        backend = _default_backend()
        if backend not in BACKENDS:
            backend = "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown selective_scan backend {backend!r}; choose from {sorted(BACKENDS)} or 'auto'")
    batch, dim, length = u.shape
    if A.shape[0] != dim or B.shape != (batch, A.shape[1], length) or C.shape != B.shape:
        raise ValueError(
            f"selective_scan shapes: u {u.shape}, A {A.shape}, B {B.shape}, C {C.shape}; "
            "expected A (dim, state) and B, C (batch, state, length)"
        )
    return BACKENDS[backend](u, delta, A, B, C, D, z, delta_bias, delta_softplus)
