"""Benchmarks for mfuser-jax: one command, one table at the end, JSON under --out.

The library behind ``scripts/benchmark.py`` (flags only there; see ``main``):

    python scripts/benchmark.py                    # every section at full size (meant for a GPU)
    python scripts/benchmark.py --smoke            # tiny shapes, a CPU sanity run
    python scripts/benchmark.py --sections scan --out results/

Sections (SECTIONS registry; each is ``(args, env) -> list[dict]``, one dict per table row):

* ``scan``: every selective-scan backend vs the lax.scan reference (time, temporaries, error).
* ``mvfuser_vs_attention``: MVFuser vs one self-attention layer of the same width over the same
  concatenated DINOv2 + CLIP tokens, 512..1024 px crops (L = 2050..8194): time and compiled
  temporaries; growth rows compare the largest to the smallest crop.
* ``train_step``: the training step itself, ``mfuser_jax.trainer.Trainer.step`` (the jitted,
  sharded step training runs: the config's optimizer, the non-finite guard, gradient
  accumulation when ``optim.grad_accum`` > 1) of configs/gta2cs.py's config, MFuser-CLIP-L at
  512 px with random weights in bfloat16, for ``--train-cases`` batch:remat pairs. The step is
  compiled once through ``Trainer.lower`` (compile time, temporaries, XLA FLOPs), then the
  Trainer's ``step`` is timed on one batch, the train state threaded through (its buffers are
  donated): step time, images/s, MFU (analytic model FLOPs from mfuser_jax.run.flops / time / the
  bf16 matmul peak measured here), HFU (with remat's recomputation of the fused layers), peak
  device memory, analytic vs XLA FLOPs, the first step's loss.
* ``sliding_window``: 2048x1024 images/s with mfuser_jax.run.evaluate.SlidingWindowPredictor
  (crop 512, stride 341).
* ``step_memory``: compile only, from shapes (no weights, fits a CPU box): XLA temporaries and
  compile time of the configs/gta2cs.py Trainer's step (``Trainer.lower``) and of its parts for
  ``--memory-cases`` batch:dtype:remat triples.

``--budget-s`` caps each section (remaining cases are listed as skipped); an interrupt
(SIGINT, e.g. ``timeout -s INT``) ends the run but keeps and writes the rows measured so far.
Timings are device-synchronised (block_until_ready), warmed up, and the median of many runs.

Imports: importing this module, and the scan, mvfuser_vs_attention and sliding_window sections,
need neither grain, ml_collections nor tensorflow_datasets (absent on the GPU image): their
model config is configs/base.py's preset, typed (mfuser_jax.model.config.ModelConfig).
``train_step`` and ``step_memory`` build the training config (configs/gta2cs.py), which is an
ml_collections ConfigDict: on the GPU image they need the ml_collections wheel carried in
``.whl/`` (scripts/fetch_wheels.sh; scripts/gpu_check.sh installs it). Nothing in mfuser_jax
imports this module: it is a program, like mfuser_jax/data/benchmark.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ---------------------------------------------------------------------------------------------
# shared measurement helpers


def time_calls(call, *, min_runs=5, max_runs=50, budget_s=2.0):
    """Median wall time (ms) of ``call()``, synchronised on what it returns, after one warm-up
    (which also compiles): ``(ms, runs)``. The number of runs adapts to the call's cost within
    a time budget. ``call`` may carry state from one call to the next (a train step)."""
    jax.block_until_ready(call())
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - t0
    runs = int(max(min_runs, min(max_runs, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), runs


def time_fn(fn, *args, min_runs=5, max_runs=50, budget_s=2.0):
    """``time_calls`` of ``fn(*args)``: a jitted call on the same (not donated) arguments."""
    return time_calls(lambda: fn(*args), min_runs=min_runs, max_runs=max_runs, budget_s=budget_s)


def temp_bytes(compiled):
    """Temporary memory (bytes) of a compiled executable from XLA's memory analysis, or None."""
    try:
        analysis = compiled.memory_analysis()
        return None if analysis is None else int(analysis.temp_size_in_bytes)
    except Exception:  # some backends do not implement memory analysis
        return None


def copy_bandwidth(n_bytes):
    """Measured device memory bandwidth (bytes/s): a large elementwise read+write."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1.0)  # one read and one write per element; a bare copy may be elided
    ms, _ = time_fn(f, x, min_runs=10, budget_s=1.0)
    return 2 * n_bytes / (ms * 1e-3)


def environment(argv=None):
    """Where the numbers come from: date, JAX, backend, device, Python, commit, command."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    dev = jax.devices()[0]
    argv = sys.argv[1:] if argv is None else list(argv)
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        jax=jax.__version__, backend=jax.default_backend(), device=getattr(dev, "device_kind", str(dev)),
        n_devices=jax.device_count(), python=platform.python_version(), commit=commit,
        command=" ".join(["scripts/benchmark.py"] + argv),
    )


# ---------------------------------------------------------------------------------------------
# section: selective scan


def _scan_inputs(b, d, l, n, key=0):
    ks = jax.random.split(jax.random.key(key), 8)
    normal = lambda k, *s: jax.random.normal(k, s, jnp.float32)  # noqa: E731
    return (normal(ks[0], b, d, l), 0.5 * normal(ks[1], b, d, l), -jnp.exp(normal(ks[2], d, n)),
            normal(ks[3], b, n, l), normal(ks[4], b, n, l), normal(ks[5], d), normal(ks[6], b, d, l),
            0.5 * normal(ks[7], d))


def _scan_variants():
    ss = importlib.import_module("mfuser_jax.ops.selective_scan")
    variants = {name: fn for name, fn in ss.BACKENDS.items()}
    variants["naive_associative"] = ss.naive_associative_scan  # the unchunked baseline
    return variants


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def bench_scan(args, env):
    variants = _scan_variants()
    if args.scan_backends:
        variants = {k: v for k, v in variants.items() if k in args.scan_backends.split(",")}
    if args.smoke:
        batches, lengths, d, n = (1, 2), (130,), 32, 4
    else:
        batches, lengths, d, n = (2, 8), (2050, 8194), 512, 16
    bw = env["copy_bandwidth_Bps"]
    deadline = _deadline(args)
    rows = args.rows
    for b in batches:
        for l in lengths:
            if time.perf_counter() > deadline:
                rows.append(_skip_row("scan", f"B={b} D={d} L={l} N={n}"))
                continue
            inputs = _scan_inputs(b, d, l, n)
            # bytes the op must move at the least: u, delta, B, C in and y out (float32)
            floor_ms = 1e3 * 4 * (3 * b * d * l + 2 * b * n * l) / bw
            ref_out = None
            for name, fn in variants.items():
                row = dict(section="scan", case=f"{name} B={b} D={d} L={l} N={n}", backend=name, B=b, D=d, L=l, N=n,
                           floor_ms=floor_ms)
                try:  # compile once; the same executable is timed and memory-analysed
                    fwd = jax.jit(lambda *a, fn=fn: fn(*a[:7], a[7], True)).lower(*inputs).compile()
                    grads = jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a[:7], a[7], True)),
                                             argnums=tuple(range(8)))).lower(*inputs).compile()
                    row["fwd_ms"], row["fwd_runs"] = time_fn(fwd, *inputs, budget_s=args.measure_s)
                    row["fwd_bwd_ms"], row["fwd_bwd_runs"] = time_fn(grads, *inputs, budget_s=args.measure_s)
                except Exception as e:  # keep the other measurements if one backend cannot run here
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    rows.append(row)
                    continue
                row["fwd_temp_MiB"] = (temp_bytes(fwd) or 0) / 2**20
                row["fwd_bwd_temp_MiB"] = (temp_bytes(grads) or 0) / 2**20
                row["fwd_x_floor"] = row["fwd_ms"] / floor_ms
                # correctness against the first variant (the lax.scan reference) on the same inputs:
                # output and the worst of the eight gradients
                out, gs = fwd(*inputs), grads(*inputs)
                if ref_out is None:
                    ref_out = (out, gs)
                row["rel_err_vs_reference"] = _rel_err(out, ref_out[0])
                row["grad_rel_err_vs_reference"] = max(_rel_err(g, r) for g, r in zip(gs, ref_out[1]))
                rows.append(row)
                print(f"  {row['case']}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms", flush=True)
    return rows


def _deadline(args):
    return time.perf_counter() + (args.budget_s if args.budget_s > 0 else float("inf"))


def _skip_row(section, case):
    return dict(section=section, case=case, error="skipped: section time budget spent")


def _err(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


# ---------------------------------------------------------------------------------------------
# section: MVFuser vs a self-attention layer of the same width over the concatenated tokens


class _SelfAttention(nnx.Module):
    """The quadratic alternative to MVFuser: one multi-head self-attention layer (qkv + out
    projections) over the same concatenated DINOv2 + CLIP tokens, through the model's
    attention core (``--attn``'s path; logits and softmax in float32)."""

    def __init__(self, width, heads, *, implementation, dtype, rngs):
        self.heads, self.implementation = heads, implementation
        self.qkv = nnx.Linear(width, 3 * width, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        from mfuser_jax.nn.layers import dot_product_attention

        b, l, w = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, l, 3, self.heads, w // self.heads), 3, axis=2)
        out = dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                    implementation=self.implementation)
        return self.proj(out.reshape(b, l, w))


def bench_mvfuser_vs_attention(args, env):
    from flax import nnx

    from mfuser_jax.run.flops import mvfuser_flops
    from mfuser_jax.model.mvfuser import MVFuser

    if args.smoke:
        width, heads, crops, batch, dtype = 32, 2, (32, 64), 2, jnp.float32
    else:
        width, heads, crops, batch, dtype = 1024, 16, (512, 640, 768, 896, 1024), 2, jnp.bfloat16
    deadline = _deadline(args)
    models = {"mvfuser": MVFuser(width, scan_backend=args.scan_backend, dtype=dtype, rngs=nnx.Rngs(0)),
              "attention": _SelfAttention(width, heads, implementation=args.attn, dtype=dtype,
                                          rngs=nnx.Rngs(0))}
    rows = args.rows
    for crop in crops:
        length = 2 * ((crop // 16) ** 2 + 1)  # DINOv2 + CLIP tokens, class token each
        x = jax.random.normal(jax.random.key(1), (batch, length, width), dtype)
        for name, module in models.items():
            case = f"{name} crop={crop} L={length} W={width} B={batch}"
            if time.perf_counter() > deadline:
                rows.append(_skip_row("mvfuser_vs_attention", case))
                continue
            module.eval()
            graphdef, state, rest = nnx.split(module, nnx.Param, ...)  # grads w.r.t. params only
            row = dict(section="mvfuser_vs_attention", case=case, layer=name, crop=crop, L=length)
            try:
                call = lambda s, x, g=graphdef, r=rest: nnx.merge(g, s, r)(x)  # noqa: E731
                fwd = jax.jit(call).lower(state, x).compile()
                loss = lambda s, x, call=call: jnp.sum(call(s, x).astype(jnp.float32))  # noqa: E731
                bwd = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
                row["fwd_ms"], _ = time_fn(fwd, state, x, budget_s=args.measure_s)
                row["fwd_bwd_ms"], _ = time_fn(bwd, state, x, budget_s=args.measure_s)
                row["fwd_temp_MiB"] = (temp_bytes(fwd) or 0) / 2**20
                row["fwd_bwd_temp_MiB"] = (temp_bytes(bwd) or 0) / 2**20
                if name == "mvfuser":
                    f = mvfuser_flops(length, width)
                    row["analytic_GFLOP"] = batch * (f["matmul"] + f["scan"]) / 1e9
                else:
                    row["analytic_GFLOP"] = batch * (8 * length * width * width
                                                     + 4 * length * length * width) / 1e9
            except Exception as e:
                row["error"] = _err(e)
            rows.append(row)
            print(f"  {case}: fwd {row.get('fwd_ms', float('nan')):.3f} ms, "
                  f"fwd+bwd {row.get('fwd_bwd_ms', float('nan')):.3f} ms", flush=True)
    # growth from the smallest to the largest crop (goal: MVFuser <= 4.5x for 4x tokens)
    for name in models:
        done = [r for r in rows if r.get("layer") == name and "fwd_ms" in r]
        if len(done) >= 2:
            a, b = done[0], done[-1]
            rows.append(dict(section="mvfuser_vs_attention", case=f"{name} growth L={a['L']}->{b['L']}",
                             fwd_growth=b["fwd_ms"] / a["fwd_ms"],
                             fwd_bwd_growth=b["fwd_bwd_ms"] / a["fwd_bwd_ms"],
                             token_growth=b["L"] / a["L"]))
    return rows


# ---------------------------------------------------------------------------------------------
# the model and the training config the model sections share

_MODELS = {}


def _model_config(args):
    """configs/base.py's MFuser-CLIP-L (--smoke: its tiny model), the typed ModelConfig
    preset, in bfloat16 at full size, random weights (no pretrained folder); remat off (each
    train_step case sets its own)."""
    from mfuser_jax.model.config import ModelConfig

    cfg = ModelConfig.preset("tiny" if args.smoke else "large", "clip")
    return cfg.replace(dtype=cfg.dtype if args.smoke else "bfloat16", remat=False,
                       pretrained="", attn_implementation=args.attn,
                       mvfuser=cfg.mvfuser.replace(scan_backend=args.scan_backend))


def _build_model(args):
    """Random-weight MFuser, built the way training builds one (models.factory.init_model:
    structure from shapes, then one jitted constructor run), once per run and shared by the
    sections (a train step that failed after consuming its weights drops it)."""
    from mfuser_jax.model.factory import init_model

    key = _model_key(args)
    if key not in _MODELS:
        cfg = _model_config(args)
        t0 = time.perf_counter()
        _MODELS[key] = (cfg, init_model(cfg, seed=0))
        print(f"  built the model in {time.perf_counter() - t0:.1f} s", flush=True)
    return _MODELS[key]


def _model_key(args):
    return (args.smoke, args.scan_backend, args.attn)


def _drop_model_if_consumed(args):
    """Forgets the shared model when a failed train step consumed (donated) some of its
    weights; the next user builds it again."""
    cached = _MODELS.get(_model_key(args))
    if cached is not None and any(x.is_deleted() for x in jax.tree.leaves(nnx.state(cached[1]))
                                  if isinstance(x, jax.Array)):
        del _MODELS[_model_key(args)]


def _train_config(args, model_cfg=None, *, batch, remat, dtype=None):
    """configs/gta2cs.py's training config (an ml_collections ConfigDict: the optimizer,
    seed, schedule, mesh the Trainer reads), tiny with --smoke, no pretrained weights. Its
    model section is ``model_cfg`` when given (the model the section built), else the
    config's own; ``batch``, ``remat`` (and ``dtype``) per case; --attn, --scan-backend and
    --grad-accum applied."""
    from configs import gta2cs
    from configs.base import config_dict

    config = gta2cs.get_config("size=tiny" if args.smoke else None)
    if model_cfg is not None:
        config.model = config_dict(model_cfg.to_dict())
    config.model.pretrained = ""
    config.model.remat = bool(remat)
    if dtype is not None:
        config.model.dtype = dtype
    config.model.attn_implementation = args.attn
    config.model.mvfuser.scan_backend = args.scan_backend
    config.batch_size = int(batch)
    if args.grad_accum:
        config.optim.grad_accum = int(args.grad_accum)
    return config


@contextlib.contextmanager
def _training_precision(config):
    """The process-wide matmul precision training sets (config.matmul_precision, through
    process.apply_matmul_precision), restored afterwards so that later sections are not
    affected. Tracing, compiling and calling the step all happen inside."""
    from mfuser_jax.process import apply_matmul_precision

    before = jax.config.jax_default_matmul_precision
    apply_matmul_precision(config)
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", before)


def _config_err(e):
    """``_err``, with the way out where ml_collections is missing (the GPU image)."""
    if isinstance(e, ModuleNotFoundError) and e.name == "ml_collections":
        return (f"{_err(e)} (the training config is an ml_collections ConfigDict: carry its "
                "wheel in .whl/, see scripts/fetch_wheels.sh)")
    return _err(e)


class _CompileWatch:
    """Counts JAX traces and compilations while active: a timed train step that traces or
    compiles again (instead of running what Trainer.lower compiled) shows up as > 0."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/backend_compile_duration")

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)
        return self

    def _on(self, event, duration, **kwargs):
        if event in self.EVENTS:
            self.count += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._on)


# ---------------------------------------------------------------------------------------------
# section: full MFuser-CLIP-L training step (mfuser_jax.trainer.Trainer.step)


def matmul_peak(n, dtype=jnp.bfloat16):
    """Measured matmul throughput (FLOP/s) of one n x n x n product in ``dtype``."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    ms, _ = time_fn(f, a, b, min_runs=10, budget_s=1.0)
    return 2 * n**3 / (ms * 1e-3)


def _peak_memory_bytes():
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        stats = {}
    return stats.get("peak_bytes_in_use")


def _random_batch(batch, size, num_classes):
    """A host batch as the data pipeline yields it: uint8 images, int32 labels."""
    rng = np.random.default_rng(batch)
    return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, num_classes, (batch, size, size), dtype=np.int32)}


def _time_trainer_step(trainer, batch, row, args):
    """Times ``trainer.step`` (what the training loop calls) on ``batch`` from a fresh train
    state, the state threaded from call to call; fills ``row``; returns the last state."""
    state = [trainer.init_state()]
    metrics = []

    def call():
        state[0], m = trainer.step(state[0], batch)
        metrics.append(m)
        del metrics[1:-1]  # keep the first step's and the latest step's
        return state[0].params, m

    with _CompileWatch() as watch:
        row["step_ms"], row["runs"] = time_calls(call, min_runs=3, max_runs=20,
                                                 budget_s=args.measure_s)
    row["traces_while_timing"] = watch.count
    row["steps"] = state[0].step
    row["loss"] = float(metrics[0]["loss"])  # the first step's, from the initial state
    row["last_step_finite"] = bool(metrics[-1]["finite"])
    return state[0]


def bench_train_step(args, env):
    from mfuser_jax import sharding as shd
    from mfuser_jax.run.flops import train_step_flops
    from mfuser_jax.trainer import Trainer

    deadline = _deadline(args)  # the model build and the peak measurement count too
    model_cfg, model = _build_model(args)
    size = int(model_cfg.image_size)
    peak = env.setdefault("bf16_matmul_peak_FLOPs", matmul_peak(512 if args.smoke else 8192))
    print(f"  measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    cases = [(int(b), bool(int(r))) for b, r in (c.split(":") for c in args.train_cases.split(","))]
    if args.smoke:
        cases = [(b, r) for b, r in cases if b <= 2] or [(2, False)]
    rows = args.rows
    for batch, remat in cases:
        case = f"MFuser-CLIP {size}px {model_cfg.dtype} B={batch} remat={remat}"
        if args.grad_accum and args.grad_accum > 1:
            case += f" accum={args.grad_accum}"
        if time.perf_counter() > deadline:
            rows.append(_skip_row("train_step", case))
            continue
        row = dict(section="train_step", case=case, batch=batch, remat=remat, image=size)
        rows.append(row)  # filled in place: an interrupted case keeps its compile time
        try:
            model_cfg, model = _build_model(args)  # built again after a failed step
            config = _train_config(args, model_cfg, batch=batch, remat=remat)
            row["grad_accum"] = int(config.optim.get("grad_accum", 1))
            # What config.model.remat does at build time, on the shared model (read at trace
            # time, so it is set before the Trainer takes the model's graph).
            model.set_layer_execution(remat=remat)
            with _training_precision(config):
                mesh = shd.make_mesh(config.get("mesh", None))
                trainer = Trainer(config, model, mesh)
                t0 = time.perf_counter()
                compiled = trainer.lower(batch, size).compile()  # what trainer.step runs
                row["compile_s"] = time.perf_counter() - t0
                row["temp_MiB"] = (temp_bytes(compiled) or 0) / 2**20
                try:
                    cost = compiled.cost_analysis()
                    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                    row["xla_TFLOP"] = float(cost["flops"]) / 1e12
                except Exception:
                    pass
                compiled = None
                data = _random_batch(batch, size, int(model_cfg.num_classes))
                state = _time_trainer_step(trainer, data, row, args)
            trainer.merged_model(state)  # the model keeps weights: its own were donated
        except Exception as e:
            row["error"] = _config_err(e)
            print(f"  {case}: {row['error']}", flush=True)
            _drop_model_if_consumed(args)
            continue
        finally:
            trainer = state = None
        flops = train_step_flops(model_cfg, batch, (size, size), remat=remat)
        row["images_per_s"] = batch / (row["step_ms"] * 1e-3)
        row["analytic_TFLOP"] = flops["model"] / 1e12
        row["MFU"] = flops["model"] / (row["step_ms"] * 1e-3) / peak
        row["HFU"] = flops["executed"] / (row["step_ms"] * 1e-3) / peak
        peak_mem = _peak_memory_bytes()  # the process's peak so far (None on CPU)
        row["peak_mem_MiB"] = None if peak_mem is None else peak_mem / 2**20
        if "xla_TFLOP" in row:
            row["analytic_vs_xla"] = flops["executed"] / (row["xla_TFLOP"] * 1e12)
        print(f"  {case}: {row['step_ms']:.1f} ms/step, {row['images_per_s']:.2f} img/s, "
              f"MFU {row['MFU']:.3f}, compile {row['compile_s']:.0f} s, "
              f"first loss {row['loss']:.4f}", flush=True)
    cached = _MODELS.get(_model_key(args))
    if cached is not None:  # the shared model as built, for the sections after this one
        cached[1].set_layer_execution(remat=bool(cached[0].remat))
    return rows


# ---------------------------------------------------------------------------------------------
# section: sliding-window evaluation


def bench_sliding_window(args, env):
    from mfuser_jax.run.evaluate import SlidingWindowPredictor

    cfg, model = _build_model(args)
    crop = int(cfg.image_size)
    h, w = (2 * crop, 4 * crop) if args.smoke else (1024, 2048)
    stride = crop * 2 // 3 if args.smoke else 341
    row = dict(section="sliding_window", case=f"{h}x{w} crop={crop} stride={stride} "
               f"crop_batch={args.crop_batch} {cfg.dtype}")
    args.rows.append(row)  # filled in place: an interrupted run keeps the compile time
    try:
        predictor = SlidingWindowPredictor(model, crop=crop, stride=stride, crop_batch=args.crop_batch)
        image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        t0 = time.perf_counter()
        predictor(image)  # compile + first run
        row["first_call_s"] = time.perf_counter() - t0
        times = []
        deadline = time.perf_counter() + max(args.measure_s, 1e-3)
        while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 20):
            t0 = time.perf_counter()
            predictor(image)  # returns a host numpy array: synchronised
            times.append(time.perf_counter() - t0)
        row["image_ms"] = 1e3 * statistics.median(times)
        row["images_per_s"] = 1e3 / row["image_ms"]
        row["runs"] = len(times)
    except Exception as e:
        row["error"] = _err(e)
    print(f"  {row['case']}: {row.get('images_per_s', float('nan')):.3f} images/s", flush=True)
    return args.rows


# ---------------------------------------------------------------------------------------------
# section: memory and compile time of the paper-config train step and its parts (compile only)


def bench_step_memory(args, env):
    """XLA's working memory (temporaries) and compile time of the configs/gta2cs.py
    Trainer's step and of its parts, from shapes alone: no weights, no data, so it runs
    anywhere (compiled for this machine's backend). One Trainer per case over a model built
    from shapes (what ``scripts/train.py --compile_only`` compiles). Parts, through the
    Trainer's own split of the model (trainable params, batch statistics, the rest):
    backbone forward; backbone forward + backward; everything after the backbone (text,
    enhancer, score map, tqdm head, losses) forward + backward. Then the whole step,
    ``Trainer.lower(batch, crop).compile()``: loss and gradients, the config's optimizer,
    the non-finite guard (and gradient accumulation when configured)."""
    from mfuser_jax import sharding as shd
    from mfuser_jax.model.factory import build_model
    from mfuser_jax.trainer import Trainer

    rows = args.rows
    deadline = _deadline(args)
    for spec in args.memory_cases.split(","):
        batch, dtype, remat = spec.split(":")
        batch, remat = int(batch), bool(int(remat))
        case = f"{'tiny' if args.smoke else 'MFuser-CLIP-L'} B={batch} {dtype} remat={remat}"
        if args.grad_accum and args.grad_accum > 1:
            case += f" accum={args.grad_accum}"
        if time.perf_counter() > deadline:
            rows.append(_skip_row("step_memory", case))
            continue
        row = dict(section="step_memory", case=case, batch=batch, dtype=dtype, remat=remat)
        rows.append(row)  # filled in place: an interrupted case keeps its parts
        try:
            cfg = _train_config(args, batch=batch, remat=remat, dtype=dtype)
            size = int(cfg.data.crop_size)
            with _training_precision(cfg):
                model = nnx.eval_shape(lambda: build_model(cfg.model,
                                                           rngs=nnx.Rngs(int(cfg.seed))))
                trainer = Trainer(cfg, model, shd.make_mesh(cfg.get("mesh", None)))
                params, batch_stats, rest = (trainer.init_params, trainer.init_batch_stats,
                                             trainer.rest)
                # the backbone's input: normalised float images, as MFuser.forward passes them
                images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
                labels = jax.ShapeDtypeStruct((batch, size, size), jnp.int32)
                key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

                # the frozen state is an argument too: closed-over shapes cannot be computed with
                def merged(params, batch_stats, rest):
                    m = trainer.merge(params, batch_stats, rest)
                    m.train()
                    return m

                def backbone_forward(params, batch_stats, rest, images, key):
                    return merged(params, batch_stats, rest).backbone(images, key=key)

                def backbone_grad(params, batch_stats, rest, images, key):
                    total = lambda p: sum(  # noqa: E731
                        jnp.sum(x.astype(jnp.float32))
                        for x in jax.tree.leaves(backbone_forward(p, batch_stats, rest, images, key)))
                    return jax.grad(total)(params)

                outputs = jax.eval_shape(backbone_forward, params, batch_stats, rest, images, key)

                def decode_and_loss_grad(params, batch_stats, rest, outputs, labels, key):
                    def total(p):
                        m = merged(p, batch_stats, rest)
                        return m.loss_of_outputs(m.decode(*outputs), labels, key)[0]
                    return jax.grad(total)(params)

                state = (params, batch_stats, rest)
                parts = [("backbone fwd", backbone_forward, (*state, images, key)),
                         ("backbone fwd+bwd", backbone_grad, (*state, images, key)),
                         ("decode+loss fwd+bwd", decode_and_loss_grad,
                          (*state, outputs, labels, key))]
                for name, fn, fn_args in parts:
                    t0 = time.perf_counter()
                    compiled = jax.jit(fn).lower(*fn_args).compile()
                    row[f"{name} compile_s"] = time.perf_counter() - t0
                    row[f"{name} temp_GiB"] = (temp_bytes(compiled) or 0) / 2**30
                t0 = time.perf_counter()
                lowered = trainer.lower(batch, size)  # the Trainer's jitted step
                t1 = time.perf_counter()
                compiled = lowered.compile()
                row["step trace_s"] = t1 - t0
                row["step compile_s"] = time.perf_counter() - t1
                mem = compiled.memory_analysis()
                row["step temp_GiB"] = int(mem.temp_size_in_bytes) / 2**30
                row["step arguments_GiB"] = int(mem.argument_size_in_bytes) / 2**30
        except Exception as e:
            row["error"] = _config_err(e)
        print(f"  {case}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                       if isinstance(v, float)), flush=True)
    return rows


SECTIONS = {"scan": bench_scan, "mvfuser_vs_attention": bench_mvfuser_vs_attention,
            "train_step": bench_train_step, "sliding_window": bench_sliding_window,
            "step_memory": bench_step_memory}


# ---------------------------------------------------------------------------------------------


def print_table(rows):
    cols = ["case", "fwd_ms", "fwd_bwd_ms", "fwd_temp_MiB", "fwd_bwd_temp_MiB", "floor_ms", "fwd_x_floor",
            "rel_err_vs_reference", "grad_rel_err_vs_reference", "fwd_growth", "fwd_bwd_growth",
            "token_growth", "step_ms", "image_ms", "images_per_s", "MFU", "HFU", "temp_MiB",
            "peak_mem_MiB", "analytic_vs_xla", "compile_s", "loss", "error"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}"
        return "" if v is None else str(v)

    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for i, line in enumerate(table):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def build_parser():
    """The command line of scripts/benchmark.py."""
    parser = argparse.ArgumentParser(prog="scripts/benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: a quick CPU check that everything runs")
    parser.add_argument("--out", help="folder for <section>.json results")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {list(SECTIONS)}")
    parser.add_argument("--scan-backends", default="", help="comma-separated subset of scan backends")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="cap on each section's time (s; 0 = none): cases left when it is spent "
                             "are listed as skipped (a case already started runs to its end)")
    parser.add_argument("--measure-s", type=float, default=2.0, help="time budget per timing")
    parser.add_argument("--scan-backend", default="auto", help="MVFuser scan backend in the model sections")
    parser.add_argument("--attn", default="xla", choices=("xla", "cudnn"),
                        help="every attention of the model (towers and heads) and of the "
                             "mvfuser_vs_attention baseline (cudnn: GPU, bfloat16)")
    parser.add_argument("--train-cases", default="2:0,4:0,8:0,2:1,4:1,8:1",
                        help="train_step cases, comma-separated batch:remat (remat 0/1)")
    parser.add_argument("--grad-accum", type=int, default=0,
                        help="train_step and step_memory: optim.grad_accum micro-batches per step "
                             "(0: the config's, 1 in configs/gta2cs.py)")
    parser.add_argument("--crop-batch", type=int, default=6, help="sliding-window crops per model call")
    parser.add_argument("--memory-cases", default="1:float32:1,2:float32:1,4:float32:1,2:bfloat16:1,2:float32:0",
                        help="step_memory cases, comma-separated batch:dtype:remat (remat 0/1)")
    return parser


def main(argv=None):
    """Runs the chosen sections, writes <section>.json under --out after each, prints the
    table; returns every row."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = args.sections.split(",")
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {list(SECTIONS)}")
    env = environment(argv)
    env["copy_bandwidth_Bps"] = copy_bandwidth(64 * 2**20 if args.smoke else 1024 * 2**20)
    # What scan_backend="auto" runs here (on a GPU: after probing the Pallas kernel; a fallback
    # warns with the reason).
    env["scan_auto_backend"] = importlib.import_module("mfuser_jax.ops.selective_scan").auto_backend()
    print(f"{env['device']} ({env['backend']}), JAX {env['jax']}, commit {env['commit']}, "
          f"copy bandwidth {env['copy_bandwidth_Bps'] / 1e9:.1f} GB/s, "
          f"scan 'auto' = {env['scan_auto_backend']}", flush=True)
    all_rows = []
    for name in names:
        print(f"[{name}]", flush=True)
        args.rows = []  # sections append here, so an interrupted section keeps its rows
        interrupted = False
        try:
            rows = SECTIONS[name](args, env)
        except KeyboardInterrupt:  # `timeout -s INT` in scripts/gpu_check.sh: keep what we have
            rows, interrupted = args.rows, True
            rows.append(dict(section=name, case="(interrupted)", error="interrupted: time limit"))
        all_rows += rows
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump(dict(env=env, smoke=args.smoke, rows=rows), f, indent=1)
        if interrupted:
            break
    print()
    print_table(all_rows)
    return all_rows
