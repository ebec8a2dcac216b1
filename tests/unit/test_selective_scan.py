"""selective_scan backends against an independent float64 PyTorch restatement of mamba_ssm's
``selective_scan_ref`` (tests/refs/mvfuser.py; values and gradients), the associative
backend's memory bound, and bfloat16 handling. The Pallas kernels run in interpret mode
here (no GPU)."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.refs.mvfuser import selective_scan_ref

ss = importlib.import_module("mfuser_jax.ops.selective_scan")
ssp = importlib.import_module("mfuser_jax.ops.selective_scan_pallas")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b, d, l, n, seed, softplus=True):
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: (rng.normal(size=s) * scale).astype(np.float32)  # noqa: E731
    x = dict(
        u=f(b, d, l), delta=f(b, d, l, scale=0.5), A=-np.exp(f(d, n)), B=f(b, n, l), C=f(b, n, l),
        D=f(d), z=f(b, d, l), delta_bias=f(d, scale=0.5),
    )
    if not softplus:  # without softplus a negative step would make the recurrence explode
        x["delta"], x["delta_bias"] = np.abs(x["delta"]), np.abs(x["delta_bias"])
    return x


def reference_value_and_grads(inputs, weight, softplus):
    ts = {k: (None if v is None else torch.tensor(v, dtype=torch.float64, requires_grad=True)) for k, v in inputs.items()}
    y = selective_scan_ref(*(ts[k] for k in NAMES), softplus)
    loss = (y * torch.tensor(weight, dtype=torch.float64)).sum()
    live = [k for k in NAMES if ts[k] is not None]
    grads = torch.autograd.grad(loss, [ts[k] for k in live])
    return y.detach().numpy(), dict(zip(live, (g.numpy() for g in grads)))


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


# (batch, dim, length, state), with z, with delta_bias, softplus. 33 channels crosses the Pallas
# channel tile (padding); 37 and 1025 need sequence padding.
CASES = [
    ((2, 5, 37, 3), True, True, True),
    ((1, 3, 1, 4), False, False, False),
    ((2, 4, 2, 8), True, False, True),
    ((3, 33, 37, 16), False, True, False),
    ((1, 8, 1025, 4), False, True, True),
]

# Small Pallas tiles keep interpret-mode compiles short; the long case uses the real defaults
# through the registered backend, so the production configuration is exercised too.
SMALL_PALLAS = dict(chunk=16, sub=4)


def backend_fn(backend, length):
    if backend == "pallas" and length < 1025:
        return lambda *a: ssp.pallas_selective_scan(*a, **SMALL_PALLAS)
    return lambda *a: ss.selective_scan(*a, backend=backend)


@functools.cache
def case_reference(shape, with_z, with_bias, softplus):
    """Inputs, loss weight and float64 reference of one case, shared by the three backends."""
    b, d, l, n = shape
    inputs = make_inputs(b, d, l, n, seed=sum(shape), softplus=softplus)
    if not with_z:
        inputs["z"] = None
    if not with_bias:
        inputs["delta_bias"] = None
    weight = np.random.default_rng(1).normal(size=(b, d, l)).astype(np.float32)
    return inputs, weight, reference_value_and_grads(inputs, weight, softplus)


@pytest.mark.parametrize("backend", ["reference", "associative", "pallas"])
@pytest.mark.parametrize("shape,with_z,with_bias,softplus", CASES)
def test_values_and_gradients_match_float64_reference(backend, shape, with_z, with_bias, softplus):
    b, d, l, n = shape
    inputs, weight, (y_ref, g_ref) = case_reference(shape, with_z, with_bias, softplus)

    fn = backend_fn(backend, l)
    live = [k for k in NAMES if inputs[k] is not None]

    def loss(*args):
        kw = dict(zip(live, args))
        y = fn(*(kw.get(k) for k in NAMES), softplus)
        return jnp.sum(y * weight), y

    (_, y), grads = jax.value_and_grad(loss, argnums=tuple(range(len(live))), has_aux=True)(
        *(jnp.asarray(inputs[k]) for k in live))
    assert y.shape == (b, d, l) and y.dtype == jnp.float32
    assert rel_err(y, y_ref) < 1e-4
    for name, g in zip(live, grads):
        assert g.shape == inputs[name].shape, name
        assert rel_err(g, g_ref[name]) < 1e-3, (name, rel_err(g, g_ref[name]))


def test_auto_backend_and_unknown_backend():
    x = make_inputs(1, 4, 9, 2, seed=0)
    args = [jnp.asarray(x[k]) for k in NAMES]
    expected = ss.auto_backend()
    np.testing.assert_allclose(ss.selective_scan(*args, backend="auto"), ss.selective_scan(*args, backend=expected), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown selective_scan backend"):
        ss.selective_scan(*args, backend="nope")


@pytest.mark.parametrize("backend", ["reference", "associative", "pallas"])
def test_bfloat16_inputs_accumulate_in_float32(backend):
    # 300 steps: a bfloat16 running state would drift by many bfloat16 ulps; a float32 one
    # leaves only the final rounding of y to bfloat16 (relative 2^-8).
    x = make_inputs(2, 6, 300, 4, seed=3)
    bf = {k: jnp.asarray(v).astype(jnp.bfloat16) for k, v in x.items()}
    y = backend_fn(backend, 300)(*(bf[k] for k in NAMES), True)
    assert y.dtype == jnp.bfloat16
    ref = selective_scan_ref(*(torch.tensor(np.asarray(bf[k].astype(jnp.float32)), dtype=torch.float64) for k in NAMES), True).numpy()
    err = np.abs(np.asarray(y.astype(jnp.float32)) - ref)
    assert np.all(err <= 2.0 ** -8 * np.abs(ref) + 1e-6 * np.max(np.abs(ref))), float(np.max(err / (np.abs(ref) + 1e-6)))


def test_chunked_associative_memory_is_bounded():
    """Forward+backward temporaries at the training shape, from XLA's compiled memory analysis."""
    b, d, l, n = 8, 512, 2050, 16
    sd = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    args = (sd(b, d, l), sd(b, d, l), sd(d, n), sd(b, n, l), sd(b, n, l), sd(d), sd(b, d, l), sd(d))

    def temp_bytes(fn):
        loss = lambda *a: jnp.sum(fn(*a, True))  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=tuple(range(8)))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    naive = temp_bytes(ss.naive_associative_scan)
    chunked = temp_bytes(ss.BACKENDS["associative"])
    print(f"\nfwd+bwd temporaries at B={b} D={d} L={l} N={n}: naive associative {naive / 2**20:.1f} MiB, "
          f"chunked associative {chunked / 2**20:.1f} MiB, ratio {naive / chunked:.1f}")
    # The naive scan must really hold (B, D, L, N) float32 tensors, or the comparison is moot.
    assert naive >= b * d * l * n * 4
    assert chunked * 8 <= naive


@pytest.mark.parametrize("with_z,dtype", [(True, jnp.float32), (False, jnp.bfloat16)])
def test_pallas_kernels_lower_to_triton_for_gpu(with_z, dtype):
    """No GPU here, but Pallas lowers a kernel to Triton IR in Python at lowering time: lowering
    for the cuda platform catches ops or block shapes the Triton path rejects. The forward is
    three Triton kernels (chunk states, carry, output); forward+backward adds three more."""
    b, d, l, n = 2, 40, 200, 16  # 40 channels and 200 steps force channel and sequence padding
    sd = lambda *s: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    args = (sd(b, d, l), sd(b, d, l), sd(d, n), sd(b, n, l), sd(b, n, l), sd(d), sd(b, d, l), sd(d))
    fwd = lambda *a: ssp.pallas_selective_scan(*a[:6], a[6] if with_z else None, a[7], True, interpret=False)  # noqa: E731
    grad = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=tuple(range(8)))
    for fn, kernels in ((fwd, 3), (grad, 6)):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("custom_call @__gpu$xla.gpu.triton") == kernels


SMALL_ARGS = tuple(jax.ShapeDtypeStruct(s, jnp.float32)
                   for s in ((2, 40, 200), (2, 40, 200), (40, 16), (2, 16, 200), (2, 16, 200), (40,),
                             (2, 40, 200), (40,)))


def _lowered(fn, args, *platforms):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=platforms).as_text()


@pytest.mark.parametrize("backend,cpu_loops", [("auto", (1, 2)), ("pallas", (6, 13))])
def test_backend_follows_the_lowering_platform_not_the_host(backend, cpu_loops):
    """One trace on this CPU machine: lowered for cuda it holds the Triton kernels (3 forward,
    6 forward+backward), lowered for cpu none (auto: the lax.scan loop; pallas: interpret mode's
    loops). The host used to decide: a program lowered here for a GPU ran no kernel."""
    fwd = lambda *a: ss.selective_scan(*a, True, backend=backend)  # noqa: E731
    grad = jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=tuple(range(8)))
    for fn, kernels, loops in ((fwd, 3, cpu_loops[0]), (grad, 6, cpu_loops[1])):
        traced = jax.jit(fn).trace(*SMALL_ARGS)
        cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
        cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
        assert cuda.count("custom_call @__gpu$xla.gpu.triton") == kernels
        assert "stablehlo.while" not in cuda  # no other branch was lowered
        assert "triton" not in cpu and cpu.count("stablehlo.while") == loops


def test_portable_lowering_holds_no_kernel():
    # A module for cpu and cuda at once lowers each branch for both; Pallas kernels cannot be
    # lowered for a CPU, so "auto" takes the associative scan on the GPU there.
    fn = lambda *a: ss.selective_scan(*a, True)  # noqa: E731
    with ss.portable_lowering():
        text = _lowered(fn, SMALL_ARGS, "cpu", "cuda")
        with pytest.raises(ValueError, match="several platforms at once"):
            _lowered(lambda *a: ss.selective_scan(*a, True, backend="pallas"), SMALL_ARGS, "cpu", "cuda")
    assert "triton" not in text
    with pytest.raises(ValueError, match="Only interpret mode is supported on CPU"):
        # why the context exists (JAX 0.10); a new function, as jit reuses traces
        _lowered(lambda *a: ss.selective_scan(*a, True), SMALL_ARGS, "cpu", "cuda")


# ---------------------------------------------------------------------------------------------
# backend="auto": the Pallas probe and the fallback (forced here: there is no GPU)


@pytest.fixture
def fresh_auto(monkeypatch):
    """auto_backend's per-process decision cleared, the platform reported as a GPU, and the probe
    counted."""
    calls = []
    probe = ssp.unavailable_reason

    def counted(**kw):
        calls.append(kw)
        return probe(**kw)

    ss.auto_backend.cache_clear()
    monkeypatch.setattr(ss, "_platform", lambda: "gpu")
    monkeypatch.setattr(ssp, "unavailable_reason", counted)
    yield calls
    ss.auto_backend.cache_clear()


def _auto_and_associative():
    x = make_inputs(1, 4, 9, 2, seed=0)
    args = [jnp.asarray(x[k]) for k in NAMES]
    return ss.selective_scan(*args, backend="auto"), ss.selective_scan(*args, backend="associative")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the compile failure is forced by a CPU")
def test_auto_falls_back_once_when_the_kernel_cannot_compile(fresh_auto):
    # "GPU" claimed, but the probe's non-interpret compile really fails on this CPU: that error
    # must become one warning and the associative backend, decided once.
    # What "auto" runs on the (claimed) GPU shows in its cuda lowering; on the CPU device it
    # really runs on, it takes the cpu branch.
    with pytest.warns(RuntimeWarning, match=r"Pallas kernel cannot run here \(.*interpret.*'associative'") as rec:
        y_auto, _ = _auto_and_associative()
        text = _lowered(lambda *a: ss.selective_scan(*a, True), SMALL_ARGS, "cuda")  # in a trace: no new probe
    assert len([w for w in rec if "Pallas" in str(w.message)]) == 1 and len(fresh_auto) == 1
    assert ss.auto_backend("cuda") == "associative"
    # the associative scan's (batch, dim, chunk, state) decays (chunk 128 of L=200), no kernel
    assert "triton" not in text and "tensor<2x40x128x16xf32>" in text
    x = make_inputs(1, 4, 9, 2, seed=0)
    np.testing.assert_array_equal(y_auto, ss.selective_scan(*(jnp.asarray(x[k]) for k in NAMES),
                                                            backend="reference"))


@pytest.mark.parametrize("cc,expected", [((7, 5), "associative"), ((9, 0), "pallas")])
def test_auto_checks_compute_capability_before_compiling(fresh_auto, monkeypatch, cc, expected):
    monkeypatch.setattr(ssp, "_compute_capability", lambda: cc)
    monkeypatch.setattr(ssp, "_probe_error", lambda dtype: None)  # a card that compiles
    if expected == "associative":
        with pytest.warns(RuntimeWarning, match=r"compute capability 7\.5 is below 8\.0"):
            assert ss.auto_backend() == "associative"
    else:
        assert ss.auto_backend() == "pallas"
    # this machine's decision and the one its cuda lowerings take: one probe
    assert ss.auto_backend("cuda") == ss.auto_backend("gpu") == expected
    assert ss.auto_backend("cpu") == "reference" and len(fresh_auto) == 1


def test_probe_rejects_a_kernel_that_computes_wrong(monkeypatch):
    # A kernel 1% off is caught by the comparison with the lax.scan reference, and the probe runs
    # eagerly while a jit trace is open, as it does when model code calls selective_scan.
    # (The real kernels' numbers are checked in interpret mode above.)
    wrong = lambda *a, interpret=None: 1.01 * ss.BACKENDS["reference"](*a)  # noqa: E731
    monkeypatch.setattr(ssp, "pallas_selective_scan", wrong)
    reasons = []
    jax.jit(lambda x: (reasons.append(ssp.unavailable_reason()), x)[1])(jnp.zeros(()))
    assert reasons[0].startswith("float32 y differs from the lax.scan reference by 0.01"), reasons
