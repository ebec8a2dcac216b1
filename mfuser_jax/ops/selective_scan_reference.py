"""The selective scan's readable definition (lax.scan over the sequence) and the input and
output steps every backend shares. Ported from mamba_ssm's ``selective_scan_ref``
(state-spaces/mamba, mamba_ssm/ops/selective_scan_interface.py); shapes and semantics as in
``mfuser_jax.ops.selective_scan``. Its own module so that the fused backend can check itself
against it without importing the dispatcher."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
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
