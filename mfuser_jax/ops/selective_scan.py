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
  "auto"        pallas on a GPU where its kernels compile and agree with the reference
                at a tiny shape (probed once per process, see ``auto_backend``),
                reference on a CPU, associative elsewhere.

The choice follows the platform a program is lowered for, not the machine that traces it:
"auto" and "pallas" stage one branch per platform (``lax.platform_dependent``) and the lowering
keeps the branch of its target. A train step lowered for "cuda" on a CPU machine (ahead-of-time
compilation, ``jax.export``, a compile cache filled on a login node) thus holds the Triton
kernels, and the same trace run on the CPU holds the lax.scan loop.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mfuser_jax.ops import selective_scan_pallas as _selective_scan_pallas
from mfuser_jax.ops.selective_scan_reference import discretize_delta, finish_output, scan_reference

__all__ = ["BACKENDS", "auto_backend", "portable_lowering", "selective_scan", "register_backend",
           "naive_associative_scan"]

ScanFn = Callable[..., jax.Array]
BACKENDS: dict[str, ScanFn] = {}


def register_backend(name: str):
    def wrap(fn: ScanFn) -> ScanFn:
        BACKENDS[name] = fn
        return fn

    return wrap


register_backend("reference")(scan_reference)
register_backend("pallas")(_selective_scan_pallas.pallas_selective_scan)


def _combine(left, right):
    """Compose two affine maps h -> a*h + b (left first): the scan's associative operator."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def naive_associative_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """One lax.associative_scan over the whole sequence, materialising (B, D, L, N) decay and input
    tensors (and several more in the backward). Kept only as the memory/speed baseline that the
    chunked "associative" backend is measured against; not registered as a backend."""
    delta = discretize_delta(delta, delta_bias, delta_softplus)
    A = A.astype(jnp.float32)
    decay = jnp.exp(delta[..., None] * A[:, None, :])  # (b, d, l, n)
    inp = (delta * u.astype(jnp.float32))[..., None] * jnp.swapaxes(B.astype(jnp.float32), 1, 2)[:, None]
    _, h = jax.lax.associative_scan(_combine, (decay, inp), axis=2)
    y = jnp.einsum("bdln,bnl->bdl", h, C.astype(jnp.float32))
    return finish_output(y, u, D, z, u.dtype)


# Sequence chunk of the "associative" backend. Forward+backward temporaries scale with
# B*D*N*chunk (one chunk's decay/input/prefix tensors, rematerialised in the backward) plus
# B*D*N*L/chunk (the carried chunk-boundary states), so the memory optimum is near sqrt(L)
# (~45 at L=2050), while speed on a GPU wants few, large chunks: every chunk is one sequential
# lax.scan iteration (a few microseconds of launch overhead each) and the associative scan inside
# a chunk costs only log2(chunk) passes. 128 keeps the sequential part short (17 iterations at
# L=2050, 65 at 8194) and, measured with the compiled memory analysis on CPU at B=8, D=512,
# L=2050, N=16, stays well below 1/8 of the naive scan's temporaries (see the tests).
ASSOCIATIVE_CHUNK = 128


@register_backend("associative")
def _scan_associative(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *, chunk: int | None = None):
    chunk = ASSOCIATIVE_CHUNK if chunk is None else chunk
    batch, dim, length = u.shape
    chunk = min(chunk, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    # Padding goes after discretisation: delta 0 gives decay exp(0)=1 and input 0, so padded
    # steps carry the state through unchanged; they sit at the end and are sliced off anyway.
    delta = discretize_delta(delta, delta_bias, delta_softplus)
    A = A.astype(jnp.float32)
    du = delta * u.astype(jnp.float32)

    def chunked(t):  # (b, x, l) -> (chunks, b, x, chunk)
        t = jnp.pad(t.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)))
        return jnp.moveaxis(t.reshape(t.shape[0], t.shape[1], n_chunks, chunk), 2, 0)

    def body(h0, xs):  # h0 (b, d, n): the state entering this chunk
        delta_c, du_c, B_c, C_c = xs
        decay = jnp.exp(delta_c[..., None] * A[:, None, :])  # (b, d, chunk, n)
        inp = du_c[..., None] * jnp.swapaxes(B_c, 1, 2)[:, None]
        a_cum, b_cum = jax.lax.associative_scan(_combine, (decay, inp), axis=2)
        h = a_cum * h0[:, :, None, :] + b_cum
        return h[:, :, -1], jnp.einsum("bdtn,bnt->bdt", h, C_c)

    # Rematerialise each chunk in the backward: only the carried (b, d, n) states are saved.
    body = jax.checkpoint(body, prevent_cse=False)
    h0 = jnp.zeros((batch, dim, A.shape[1]), jnp.float32)
    _, ys = jax.lax.scan(body, h0, (chunked(delta), chunked(du), chunked(B), chunked(C)))
    y = jnp.moveaxis(ys, 0, 2).reshape(batch, dim, n_chunks * chunk)[:, :, :length]
    return finish_output(y, u, D, z, u.dtype)


def _platform() -> str:
    """The platform of the machine tracing (jax's default backend): "cpu", "gpu", "tpu"."""
    return jax.default_backend()


GPU_PLATFORMS = _selective_scan_pallas.GPU_PLATFORMS


def auto_backend(platform: str | None = None) -> str:
    """The backend ``backend="auto"`` runs on ``platform`` (a lowering platform: "cpu", "cuda",
    "rocm", "tpu", or "gpu"; None: this machine's). On this machine's GPU the decision is
    probed once per process.

    On a GPU, "pallas" where the fused kernels lower, compile and agree with the lax.scan
    reference at a tiny shape; otherwise "associative", with one warning naming the reason when
    a GPU was there but the kernels could not run on it (an unsupported card, a JAX without the
    Triton lowering, any lowering or compile error), so that a run never fails on the kernel.
    The probe needs the GPU: a machine without one that lowers a program for a GPU takes
    "pallas" (what a GPU that passes the probe runs). On a CPU "reference": the sequential loop
    does the least work, and a CPU gains nothing from the associative form's parallel passes
    (one full-size MVFuser, L=2050, on the 2-core development box: forward 0.41 s vs 1.51 s,
    forward+backward 1.9 s vs 3.9 s). Elsewhere "associative".
    """
    host = _platform()
    platform = host if platform is None else platform
    if platform == "cpu":
        return "reference"
    if platform not in GPU_PLATFORMS + ("gpu",):
        return "associative"
    if host != "gpu":
        return "pallas"
    return _gpu_decision()


@functools.cache
def _gpu_decision() -> str:
    """auto_backend on this machine's GPU: the probe, once per process."""
    reason = _selective_scan_pallas.unavailable_reason()
    if reason is None:
        return "pallas"
    warnings.warn(f"selective_scan backend 'auto': the Pallas kernel cannot run here ({reason}); "
                  "using the 'associative' backend", RuntimeWarning, stacklevel=3)
    return "associative"


auto_backend.cache_clear = _gpu_decision.cache_clear  # a fresh decision (tests)

_PORTABLE = [False]


@contextlib.contextmanager
def portable_lowering():
    """Programs traced inside hold no Pallas kernel: "auto" runs "associative" on GPUs and
    "pallas" is refused. For ``jax.export``, whose serialization refuses custom calls without a
    compatibility guarantee (the Triton kernels are such calls: their IR is read by the jaxlib
    that wrote it), and for modules lowered for several platforms at once (each branch is
    lowered for every platform there, and a Pallas kernel refuses a CPU lowering in JAX 0.10).
    Read while tracing: jit reuses a function's earlier trace, so trace a new function
    (closure) inside."""
    previous, _PORTABLE[0] = _PORTABLE[0], True
    try:
        yield
    finally:
        _PORTABLE[0] = previous


# Under differentiation, the branches of one platform_dependent share their residuals: every
# platform's program carries (as zeros) what any branch saves for its backward. The lax.scan
# reference saves every step's state, a (length, batch, channels, state) tensor (268 MB per
# full-size MVFuser), which a GPU program would then allocate too; inside "auto" it is
# rematerialised instead (its residuals are its inputs; the backward reruns the forward scan).
# The Pallas kernels save (batch, chunks, channels, state), the associative scan its chunk states.
_reference_remat = jax.checkpoint(scan_reference, static_argnums=(8,))


def _auto_branches() -> dict[str, ScanFn]:
    """platform_dependent_scan's branches for "auto": one function per backend name, so that
    platforms running the same backend share one branch."""
    names = {"cpu": auto_backend("cpu"), "default": auto_backend("tpu"),
             "gpu": "associative" if _PORTABLE[0] else auto_backend("cuda")}
    fns = {"pallas": functools.partial(BACKENDS["pallas"], interpret=False),
           "reference": _reference_remat}
    fns = {name: fns.get(name, BACKENDS[name]) for name in set(names.values())}
    return {k: fns[name] for k, name in names.items()}


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
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown selective_scan backend {backend!r}; choose from {sorted(BACKENDS)} or 'auto'")
    batch, dim, length = u.shape
    if A.shape[0] != dim or B.shape != (batch, A.shape[1], length) or C.shape != B.shape:
        raise ValueError(
            f"selective_scan shapes: u {u.shape}, A {A.shape}, B {B.shape}, C {C.shape}; "
            "expected A (dim, state) and B, C (batch, state, length)"
        )
    if backend == "pallas" and _PORTABLE[0]:
        raise ValueError("the 'pallas' selective_scan backend cannot be exported or lowered for "
                         "several platforms at once (Triton custom calls); use 'associative' or "
                         "'auto' there")
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "auto":
        return _selective_scan_pallas.platform_dependent_scan(_auto_branches(), *args)
    return BACKENDS[backend](*args)  # "pallas" chooses kernel or interpret mode per platform
