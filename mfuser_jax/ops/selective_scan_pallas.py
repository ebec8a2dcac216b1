"""The "pallas" selective-scan backend: a fused, chunked scan with a fused backward.

Design (the chunked scheme of mamba_ssm's CUDA kernel, csrc/selective_scan/, restated for a
Pallas grid; no (batch, length, dim, state) tensor is ever written to memory):

forward
  1. ``_chunk_state_kernel``   grid (batch, channel tiles, chunks), all parallel: scan one chunk
     from a zero state -> the chunk's end state (b, chunk, d, n) and its summed delta (b, chunk, d)
     (the chunk's decay product is exp(A * sum delta)).
  2. ``_carry_kernel``         grid (batch, channel tiles): a short sequential pass over the chunks
     turning local end states into the state entering every chunk.
  3. ``_chunk_output_kernel``  grid (batch, channel tiles, chunks): rescan every chunk from its
     true entering state and write y with the D skip and the SiLU(z) gate fused in.
backward (jax.custom_vjp; residuals are the inputs plus the (b, chunk, d, n) entering states)
  4. ``_chunk_adjoint_kernel`` reverse scan of every chunk from a zero adjoint -> the adjoint
     each chunk sends to the state before it.
  5. ``_carry_kernel`` in reverse order -> the adjoint entering every chunk from its right.
  6. ``_chunk_grad_kernel``    per chunk, sub-blocks of SUB steps in reverse: recompute the
     sub-block's entering state from the chunk's, then its SUB states (unrolled, so they live in
     registers), then walk them backwards accumulating du, d(delta), dz, dB, dC, dA, dD.
  dB/dC are written as per-channel-tile partials (b, tiles, n, l) and dA/dD as per-chunk partials,
  summed by XLA afterwards (deterministic, no atomics).

delta_bias, softplus, the D skip and the gate are all applied inside the kernels, so inputs are
read once in their own dtype (bfloat16 stays bfloat16 in memory) and accumulated in float32.

GPU lowering: ``pallas_call``'s default GPU path, Triton. On Hopper with JAX 0.10-0.11 it is the
lowering that supports this kernel's shape of work (per-program register tiles, dynamic loops
with strided loads/stores, elementwise math and row reductions); Mosaic GPU targets
warpgroup/TMA pipelines and needs a newer, still-moving API. Block shapes are powers of two as
Triton requires: channels, state and chunk length are padded (padding is exact: padded channels
and state slots have A = B = C = 0 and stay zero; padded time steps sit at the end, where the
forward never reads them back and the zero-padded cotangent keeps their adjoint at zero).
Padding L to a chunk multiple (e.g. 2050 -> 2112) costs one copy of the sequence inputs on a
GPU; it is skipped when nothing needs padding.

On other platforms the same kernels run with ``interpret=True`` (chosen per lowering platform,
``platform_dependent_scan``), which is how the tests verify them; the tests also lower every
kernel for the cuda platform, so the Triton lowering itself is checked on CPU. Triton
compilation and GPU speed are not yet measured.

``unavailable_reason`` is the probe behind ``selective_scan(backend="auto")``: the Triton
lowering is deprecated since JAX 0.11 and needs compute capability >= 8.0, so "auto" compiles and
runs the kernels once at a tiny shape, compares them with the lax.scan reference, and falls back
to the associative backend if anything fails.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from mfuser_jax.ops.selective_scan_reference import scan_reference

__all__ = ["pallas_selective_scan", "unavailable_reason"]

# Channel tile: 32 channels x 16 states = 512 float32 state values per program (4 per thread at
# 4 warps). In mamba's (b, d, l) layout a step loads one column of the (32, chunk) u/delta/z
# tile (stride L); a 128-byte line holds 32 steps of one channel, so after the first step the
# following ones are served from L1/L2 and HBM sees each input about once. Chunk: 64 steps makes 33 chunks at L=2050, so
# batch 2 x 16 channel tiles x 33 chunks = 1056 programs still fill 132 SMs, while the saved
# states (b, chunks, d, n) stay at 1/64 of a (b, l, d, n) tensor. Sub-block: the backward keeps
# at most SUB recomputed states of one tile in registers at a time.
CHANNEL_TILE = 32
CHUNK = 64
SUB = 16
NUM_WARPS = 4


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _softplus(x):
    # mamba_ssm's threshold form; exact to float32 rounding and Triton-lowerable.
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _delta_at(delta_ref, bias, t, softplus):
    raw = delta_ref[0, :, t].astype(jnp.float32) + bias
    return raw, (_softplus(raw) if softplus else raw)


# ---------------------------------------------------------------------------------------------
# kernels; refs carry leading size-1 block dims (batch, chunk) indexed with 0.


def _chunk_state_kernel(u_ref, delta_ref, A_ref, B_ref, bias_ref, h_ref, dsum_ref, *, steps, softplus):
    A = A_ref[...].astype(jnp.float32)
    bias = bias_ref[...].astype(jnp.float32)

    def step(t, carry):
        h, dsum = carry
        _, delta = _delta_at(delta_ref, bias, t, softplus)
        u = u_ref[0, :, t].astype(jnp.float32)
        Bt = B_ref[0, :, t].astype(jnp.float32)
        h = jnp.exp(delta[:, None] * A) * h + (delta * u)[:, None] * Bt[None, :]
        return h, dsum + delta

    h, dsum = jax.lax.fori_loop(0, steps, step, (jnp.zeros(A.shape, jnp.float32), jnp.zeros(bias.shape, jnp.float32)))
    h_ref[0, 0] = h
    dsum_ref[0, 0] = dsum


def _carry_kernel(local_ref, dsum_ref, A_ref, out_ref, *, n_chunks, reverse):
    """Sequential over chunks: out[c] = value entering chunk c; next = exp(A*dsum[c])*cur + local[c].
    Forward: states flow left to right. Reverse: adjoints flow right to left with the same algebra."""
    A = A_ref[...].astype(jnp.float32)

    def step(i, h):
        c = n_chunks - 1 - i if reverse else i
        out_ref[0, c] = h
        return jnp.exp(A * dsum_ref[0, c][:, None]) * h + local_ref[0, c]

    jax.lax.fori_loop(0, n_chunks, step, jnp.zeros(A.shape, jnp.float32))


def _chunk_output_kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, h0_ref, *rest, steps, softplus, has_z):
    if has_z:
        z_ref, y_ref = rest
    else:
        (y_ref,) = rest
    A = A_ref[...].astype(jnp.float32)
    Dv = D_ref[...].astype(jnp.float32)
    bias = bias_ref[...].astype(jnp.float32)

    def step(t, h):
        _, delta = _delta_at(delta_ref, bias, t, softplus)
        u = u_ref[0, :, t].astype(jnp.float32)
        Bt = B_ref[0, :, t].astype(jnp.float32)
        Ct = C_ref[0, :, t].astype(jnp.float32)
        h = jnp.exp(delta[:, None] * A) * h + (delta * u)[:, None] * Bt[None, :]
        y = jnp.sum(h * Ct[None, :], axis=1) + Dv * u
        if has_z:
            zt = z_ref[0, :, t].astype(jnp.float32)
            y = y * zt * _sigmoid(zt)
        y_ref[0, :, t] = y.astype(y_ref.dtype)
        return h

    jax.lax.fori_loop(0, steps, step, h0_ref[0, 0])


def _gate(dy, z_ref, t, has_z):
    """Cotangent of the pre-gate output, plus what dz needs."""
    if not has_z:
        return dy, None, None
    z = z_ref[0, :, t].astype(jnp.float32)
    sig = _sigmoid(z)
    return dy * z * sig, z, sig


def _chunk_adjoint_kernel(delta_ref, A_ref, C_ref, bias_ref, dy_ref, *rest, steps, softplus, has_z):
    if has_z:
        z_ref, q_ref = rest
    else:
        z_ref, (q_ref,) = None, rest
    A = A_ref[...].astype(jnp.float32)
    bias = bias_ref[...].astype(jnp.float32)

    def step(i, lam_carry):  # lam_carry = a_{t+1} * lambda_{t+1}
        t = steps - 1 - i
        _, delta = _delta_at(delta_ref, bias, t, softplus)
        g, _, _ = _gate(dy_ref[0, :, t].astype(jnp.float32), z_ref, t, has_z)
        lam = C_ref[0, :, t].astype(jnp.float32)[None, :] * g[:, None] + lam_carry
        return jnp.exp(delta[:, None] * A) * lam

    q_ref[0, 0] = jax.lax.fori_loop(0, steps, step, jnp.zeros(A.shape, jnp.float32))


def _chunk_grad_kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, h0_ref, lam_ref, dy_ref, *rest,
                       steps, sub, softplus, has_z):
    if has_z:
        z_ref, du_ref, ddelta_ref, dz_ref, dB_ref, dC_ref, dA_ref, dD_ref = rest
    else:
        z_ref, dz_ref = None, None
        du_ref, ddelta_ref, dB_ref, dC_ref, dA_ref, dD_ref = rest
    A = A_ref[...].astype(jnp.float32)
    Dv = D_ref[...].astype(jnp.float32)
    bias = bias_ref[...].astype(jnp.float32)

    def load(t):
        raw, delta = _delta_at(delta_ref, bias, t, softplus)
        u = u_ref[0, :, t].astype(jnp.float32)
        Bt = B_ref[0, :, t].astype(jnp.float32)
        return raw, delta, u, Bt

    def fwd(t, h):
        _, delta, u, Bt = load(t)
        return jnp.exp(delta[:, None] * A) * h + (delta * u)[:, None] * Bt[None, :]

    h0 = h0_ref[0, 0]

    def sub_block(i, carry):  # sub-blocks in reverse order
        lam_carry, dA, dD = carry  # lam_carry: adjoint reaching the last state of this sub-block
        k = steps // sub - 1 - i
        # Entering state of sub-block k, recomputed from the chunk's entering state: costs
        # sub * k(k-1)/2 extra steps per chunk but keeps no per-step state outside registers.
        h = jax.lax.fori_loop(0, k * sub, fwd, h0)
        hs = [h]  # hs[s] = state before step k*sub + s; unrolled so they stay in registers
        for s in range(sub):
            hs.append(fwd(k * sub + s, hs[-1]))
        for s in reversed(range(sub)):
            t = k * sub + s
            raw, delta, u, Bt = load(t)
            Ct = C_ref[0, :, t].astype(jnp.float32)
            h_prev, h_t = hs[s], hs[s + 1]
            a = jnp.exp(delta[:, None] * A)
            dy = dy_ref[0, :, t].astype(jnp.float32)
            g, z, sig = _gate(dy, z_ref, t, has_z)
            if has_z:
                y_pre = jnp.sum(h_t * Ct[None, :], axis=1) + Dv * u
                dz_ref[0, :, t] = (dy * y_pre * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)
            lam = Ct[None, :] * g[:, None] + lam_carry
            lam_B = jnp.sum(lam * Bt[None, :], axis=1)
            lam_a_hprev = lam * a * h_prev
            ddelta = u * lam_B + jnp.sum(lam_a_hprev * A, axis=1)
            if softplus:
                ddelta = ddelta * _sigmoid(raw)
            du_ref[0, :, t] = (delta * lam_B + Dv * g).astype(du_ref.dtype)
            ddelta_ref[0, :, t] = ddelta.astype(ddelta_ref.dtype)
            dB_ref[0, 0, :, t] = jnp.sum(lam * (delta * u)[:, None], axis=0)
            dC_ref[0, 0, :, t] = jnp.sum(h_t * g[:, None], axis=0)
            dA = dA + lam_a_hprev * delta[:, None]
            dD = dD + g * u
            lam_carry = a * lam
        return lam_carry, dA, dD

    zeros = jnp.zeros(A.shape, jnp.float32)
    _, dA, dD = jax.lax.fori_loop(0, steps // sub, sub_block, (lam_ref[0, 0], zeros, jnp.zeros(Dv.shape, jnp.float32)))
    dA_ref[0, 0] = dA
    dD_ref[0, 0] = dD


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers on padded arrays: u, delta, z, dy (b, dp, lp); A (dp, np); B, C (b, np, lp);
# D, bias (dp,); dp, np, lp multiples of the tile sizes.


class _Cfg:
    """Static configuration (hashable: it is a custom_vjp non-differentiable argument)."""

    def __init__(self, softplus, has_z, chunk, sub, tile, interpret):
        self.softplus, self.has_z, self.chunk, self.sub, self.tile, self.interpret = (
            softplus, has_z, chunk, sub, tile, interpret)

    def _key(self):
        return (self.softplus, self.has_z, self.chunk, self.sub, self.tile, self.interpret)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Cfg) and self._key() == other._key()


def _compiler_params(cfg):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton

    # The class was renamed across JAX releases; without either, Pallas picks its defaults.
    params_cls = getattr(pl_triton, "CompilerParams", None) or getattr(pl_triton, "TritonCompilerParams", None)
    return None if params_cls is None else params_cls(num_warps=NUM_WARPS, num_stages=1)


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
    )


def _specs(cfg, n_state):
    T, dt = cfg.chunk, cfg.tile
    return dict(
        seq=pl.BlockSpec((1, dt, T), lambda b, d, c: (b, d, c)),  # u, delta, z, dy, y, du, ...
        A=pl.BlockSpec((dt, n_state), lambda b, d, c: (d, 0)),
        BC=pl.BlockSpec((1, n_state, T), lambda b, d, c: (b, 0, c)),
        vec=pl.BlockSpec((dt,), lambda b, d, c: (d,)),
        state=pl.BlockSpec((1, 1, dt, n_state), lambda b, d, c: (b, c, d, 0)),
        per_chunk=pl.BlockSpec((1, 1, dt), lambda b, d, c: (b, c, d)),
        partial_BC=pl.BlockSpec((1, 1, n_state, T), lambda b, d, c: (b, d, 0, c)),
    )


def _carry(local, dsum, A, cfg, reverse):
    b, n_chunks, dp, n = local.shape
    dt = cfg.tile
    return _call(
        functools.partial(_carry_kernel, n_chunks=n_chunks, reverse=reverse),
        (b, dp // dt),
        [pl.BlockSpec((1, n_chunks, dt, n), lambda i, d: (i, 0, d, 0)),
         pl.BlockSpec((1, n_chunks, dt), lambda i, d: (i, 0, d)),
         pl.BlockSpec((dt, n), lambda i, d: (d, 0))],
        pl.BlockSpec((1, n_chunks, dt, n), lambda i, d: (i, 0, d, 0)),
        jax.ShapeDtypeStruct(local.shape, jnp.float32),
        cfg,
    )(local, dsum, A)


def _forward(u, delta, A, B, C, D, z, bias, cfg):
    b, dp, lp = u.shape
    n = A.shape[1]
    T, dt = cfg.chunk, cfg.tile
    nc = lp // T
    grid = (b, dp // dt, nc)
    sp = _specs(cfg, n)
    f32 = jnp.float32
    h_local, dsum = _call(
        functools.partial(_chunk_state_kernel, steps=T, softplus=cfg.softplus), grid,
        [sp["seq"], sp["seq"], sp["A"], sp["BC"], sp["vec"]],
        [sp["state"], sp["per_chunk"]],
        [jax.ShapeDtypeStruct((b, nc, dp, n), f32), jax.ShapeDtypeStruct((b, nc, dp), f32)],
        cfg,
    )(u, delta, A, B, bias)
    h0 = _carry(h_local, dsum, A, cfg, reverse=False)
    ins = [u, delta, A, B, C, D, bias, h0] + ([z] if cfg.has_z else [])
    specs = [sp["seq"], sp["seq"], sp["A"], sp["BC"], sp["BC"], sp["vec"], sp["vec"], sp["state"]]
    y = _call(
        functools.partial(_chunk_output_kernel, steps=T, softplus=cfg.softplus, has_z=cfg.has_z), grid,
        specs + ([sp["seq"]] if cfg.has_z else []),
        sp["seq"],
        jax.ShapeDtypeStruct(u.shape, u.dtype),
        cfg,
    )(*ins)
    return y, (h0, dsum)


def _backward(u, delta, A, B, C, D, z, bias, h0, dsum, dy, cfg):
    b, dp, lp = u.shape
    n = A.shape[1]
    T, dt = cfg.chunk, cfg.tile
    nc, n_tiles = lp // T, dp // dt
    grid = (b, n_tiles, nc)
    sp = _specs(cfg, n)
    f32 = jnp.float32
    zs = [z] if cfg.has_z else []
    z_spec = [sp["seq"]] if cfg.has_z else []
    q = _call(
        functools.partial(_chunk_adjoint_kernel, steps=T, softplus=cfg.softplus, has_z=cfg.has_z), grid,
        [sp["seq"], sp["A"], sp["BC"], sp["vec"], sp["seq"]] + z_spec,
        sp["state"],
        jax.ShapeDtypeStruct((b, nc, dp, n), f32),
        cfg,
    )(delta, A, C, bias, dy, *zs)
    lam = _carry(q, dsum, A, cfg, reverse=True)
    seq_out = lambda dtype: jax.ShapeDtypeStruct(u.shape, dtype)  # noqa: E731
    out_shape = [seq_out(u.dtype), seq_out(delta.dtype)] + ([seq_out(z.dtype)] if cfg.has_z else []) + [
        jax.ShapeDtypeStruct((b, n_tiles, n, lp), f32),
        jax.ShapeDtypeStruct((b, n_tiles, n, lp), f32),
        jax.ShapeDtypeStruct((b, nc, dp, n), f32),
        jax.ShapeDtypeStruct((b, nc, dp), f32),
    ]
    out_specs = [sp["seq"], sp["seq"]] + z_spec + [sp["partial_BC"], sp["partial_BC"], sp["state"], sp["per_chunk"]]
    outs = _call(
        functools.partial(_chunk_grad_kernel, steps=T, sub=cfg.sub, softplus=cfg.softplus, has_z=cfg.has_z), grid,
        [sp["seq"], sp["seq"], sp["A"], sp["BC"], sp["BC"], sp["vec"], sp["vec"], sp["state"], sp["state"],
         sp["seq"]] + z_spec,
        out_specs,
        out_shape,
        cfg,
    )(u, delta, A, B, C, D, bias, h0, lam, dy, *zs)
    if cfg.has_z:
        du, ddelta, dz, dB_p, dC_p, dA_p, dD_p = outs
    else:
        (du, ddelta, dB_p, dC_p, dA_p, dD_p), dz = outs, None
    dB = jnp.sum(dB_p, axis=1).astype(B.dtype)
    dC = jnp.sum(dC_p, axis=1).astype(C.dtype)
    dA = jnp.sum(dA_p, axis=(0, 1)).astype(A.dtype)
    dD = jnp.sum(dD_p, axis=(0, 1)).astype(D.dtype)
    dbias = jnp.sum(ddelta.astype(f32), axis=(0, 2)).astype(bias.dtype)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _fused_scan(u, delta, A, B, C, D, z, bias, cfg):
    return _forward(u, delta, A, B, C, D, z, bias, cfg)[0]


def _fused_scan_fwd(u, delta, A, B, C, D, z, bias, cfg):
    y, (h0, dsum) = _forward(u, delta, A, B, C, D, z, bias, cfg)
    return y, (u, delta, A, B, C, D, z, bias, h0, dsum)


def _fused_scan_bwd(cfg, res, dy):
    return _backward(*res, dy, cfg)


_fused_scan.defvjp(_fused_scan_fwd, _fused_scan_bwd)


# Lowering platforms (jax.lax.platform_dependent's names) on which the kernels run compiled.
GPU_PLATFORMS = ("cuda", "rocm")


def platform_dependent_scan(branches, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                            delta_softplus=False):
    """``branches[p](u, ..., delta_softplus)`` for the platform p the program is lowered for:
    keys "gpu" (cuda and rocm), "cpu" (optional) and "default" (every other platform), each a
    scan with ``selective_scan``'s signature. Every branch is traced; the lowering keeps its
    platform's (``jax.lax.platform_dependent``), so the machine that traces does not decide."""
    has_z, softplus = z is not None, bool(delta_softplus)
    wrapped = {}  # one wrapper per function: platform_dependent merges identical branches

    def wrap(fn):
        if id(fn) not in wrapped:
            wrapped[id(fn)] = lambda *a: fn(*a[:6], a[6] if has_z else None, a[7], softplus)
        return wrapped[id(fn)]

    per_platform = {p: wrap(branches["gpu"]) for p in GPU_PLATFORMS}
    if "cpu" in branches:
        per_platform["cpu"] = wrap(branches["cpu"])
    f32 = jnp.float32
    dim = u.shape[1]
    args = (u, delta, A, B, C, jnp.zeros((dim,), f32) if D is None else D,
            jnp.zeros((), u.dtype) if z is None else z,
            jnp.zeros((dim,), f32) if delta_bias is None else delta_bias)
    return jax.lax.platform_dependent(*args, default=wrap(branches["default"]), **per_platform)


def pallas_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, *,
                          interpret: bool | None = None, chunk: int = CHUNK, sub: int = SUB,
                          channel_tile: int = CHANNEL_TILE):
    """Fused selective scan (same semantics as ``selective_scan``). ``interpret`` None: the
    compiled kernels where the program is lowered for a GPU (cuda, rocm), interpret mode on
    every other platform (``platform_dependent_scan``)."""
    if interpret is None:
        tiles = dict(chunk=chunk, sub=sub, channel_tile=channel_tile)
        return platform_dependent_scan(
            {"gpu": functools.partial(pallas_selective_scan, interpret=False, **tiles),
             "default": functools.partial(pallas_selective_scan, interpret=True, **tiles)},
            u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    n_state = A.shape[1]
    T = min(_next_pow2(chunk), _next_pow2(length))
    cfg = _Cfg(bool(delta_softplus), z is not None, T, min(_next_pow2(sub), T),
               min(_next_pow2(channel_tile), _next_pow2(dim)), bool(interpret))
    dp = -(-dim // cfg.tile) * cfg.tile
    np_ = _next_pow2(n_state)
    lp = -(-length // T) * T

    def pad(x, *widths):  # pad only where needed: on a GPU each pad is a copy
        widths = list(widths)
        if not any(widths):
            return x
        return jnp.pad(x, [(0, w) for w in widths])

    f32 = jnp.float32
    D = jnp.zeros((dim,), f32) if D is None else D
    delta_bias = jnp.zeros((dim,), f32) if delta_bias is None else delta_bias
    y = _fused_scan(
        pad(u, 0, dp - dim, lp - length),
        pad(delta, 0, dp - dim, lp - length),
        pad(A, dp - dim, np_ - n_state),
        pad(B, 0, np_ - n_state, lp - length),
        pad(C, 0, np_ - n_state, lp - length),
        pad(D, dp - dim),
        None if z is None else pad(z, 0, dp - dim, lp - length),
        pad(delta_bias, dp - dim),
        cfg,
    )
    return y[:, :dim, :length]


# Pallas's Triton lowering targets Ampere (sm_80) and newer.
MIN_COMPUTE_CAPABILITY = (8, 0)


def _compute_capability():
    """(major, minor) of the default device, or None where JAX does not report one (not CUDA)."""
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return None if cc is None else tuple(int(p) for p in str(cc).split(".")[:2])
    except ValueError:
        return None


def _probe_error(dtype) -> str | None:
    """Compile and run the forward and backward kernels (interpret off) at a tiny shape that still
    crosses a chunk boundary and pads the sequence; compare with the lax.scan reference."""
    b, d, l, n = 1, CHANNEL_TILE, CHUNK + 3, 16
    rng = np.random.default_rng(0)
    normal = lambda *s, scale=1.0: (scale * rng.normal(size=s)).astype(np.float32)  # noqa: E731
    inputs = [normal(b, d, l), normal(b, d, l, scale=0.5), -np.exp(normal(d, n)), normal(b, n, l),
              normal(b, n, l), normal(d), normal(b, d, l), normal(d, scale=0.5)]
    inputs = [x.astype(dtype) for x in inputs]  # numpy, not jnp: no tracers if a trace is open

    def value_and_grads(fn):
        def loss(*a):
            y = fn(*a[:7], a[7], True)
            return jnp.sum(y.astype(jnp.float32) * jnp.cos(jnp.arange(l, dtype=jnp.float32))), y
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8)), has_aux=True))

    fused = functools.partial(pallas_selective_scan, interpret=False)
    # Ahead-of-time compiled and called on host arrays: runs eagerly even inside an open trace.
    results = []
    for fn in (fused, scan_reference):
        compiled = value_and_grads(fn).lower(*inputs).compile()  # lowering/compile errors raise here
        results.append(jax.device_get(compiled(*inputs)))
    ((_, y), grads), ((_, y_ref), grads_ref) = results
    tol = 1e-3 if dtype == jnp.float32 else 5e-2
    for name, got, ref in [("y", y, y_ref)] + list(zip(("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "dbias"),
                                                       grads, grads_ref)):
        got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
        err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
        if not err <= tol:  # also catches NaN
            return f"{np.dtype(dtype).name} {name} differs from the lax.scan reference by {err:.2g} (relative)"
    return None


def unavailable_reason() -> str | None:
    """None when the fused kernels compile and compute correctly on the default device (a GPU),
    else one line saying why not. Costs a few small compiles; ``selective_scan.auto_backend``
    calls it once per process. Safe to call while a jit trace is open: the probe runs eagerly."""
    cc = _compute_capability()
    if cc is not None and cc < MIN_COMPUTE_CAPABILITY:
        return (f"compute capability {cc[0]}.{cc[1]} is below "
                f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}, the Triton lowering's minimum")
    try:
        for dtype in (jnp.float32, jnp.bfloat16):
            error = _probe_error(dtype)
            if error is not None:
                return error
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernel here
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return f"{type(e).__name__}: {first}"
    return None
