#!/usr/bin/env python
"""Benchmarks for mfuser-jax: one command, one table at the end, JSON under --out.

    python scripts/benchmark.py                    # every section at full size (meant for a GPU)
    python scripts/benchmark.py --smoke            # tiny shapes, a CPU sanity run
    python scripts/benchmark.py --sections scan --out results/

Sections (SECTIONS registry; each is ``(args, env) -> list[dict]``, one dict per table row):

* ``scan``: every selective-scan backend vs the lax.scan reference (time, temporaries, error).
* ``mvfuser_vs_attention``: MVFuser vs one self-attention layer of the same width over the same
  concatenated DINOv2 + CLIP tokens, 512..1024 px crops (L = 2050..8194): time and compiled
  temporaries; growth rows compare the largest to the smallest crop.
* ``train_step``: the full MFuser-CLIP-L training step (random weights, bfloat16, AdamW) at
  512 px for ``--train-cases`` batch:remat pairs: step time, images/s, MFU (analytic model
  FLOPs from mfuser_jax.flops / time / the bf16 matmul peak measured here), HFU (with remat's
  recomputation), compiled temporaries, peak device memory, analytic vs XLA FLOPs.
* ``sliding_window``: 2048x1024 images/s with mfuser_jax.evaluate.SlidingWindowPredictor
  (crop 512, stride 341).
* ``step_memory``: compile only, from shapes (no weights, fits a CPU box): XLA temporaries and
  compile time of the configs/gta2cs.py train step and its parts for ``--memory-cases``
  batch:dtype:remat triples.

``--budget-s`` caps each section (remaining cases are listed as skipped); an interrupt
(SIGINT, e.g. ``timeout -s INT``) ends the run but keeps and writes the rows measured so far.
Timings are device-synchronised (block_until_ready), warmed up, and the median of many runs.
The import path avoids grain / ml_collections / tensorflow_datasets (absent on the GPU image):
the model config is configs/base.py's, as plain nested dicts (configs.base.plain_model_config).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

# ---------------------------------------------------------------------------------------------
# shared measurement helpers


def time_fn(fn, *args, min_runs=5, max_runs=50, budget_s=2.0):
    """Median wall time (ms) of a jitted call, synchronised on its outputs, after one warm-up
    (which also compiles). The number of runs adapts to the call's cost within a time budget."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    runs = int(max(min_runs, min(max_runs, budget_s / max(first, 1e-6))))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), runs


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


def environment():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    dev = jax.devices()[0]
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        jax=jax.__version__, backend=jax.default_backend(), device=getattr(dev, "device_kind", str(dev)),
        n_devices=jax.device_count(), python=platform.python_version(), commit=commit,
        command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
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
        from mfuser_jax.models.layers import dot_product_attention

        b, l, w = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, l, 3, self.heads, w // self.heads), 3, axis=2)
        out = dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                    implementation=self.implementation)
        return self.proj(out.reshape(b, l, w))


def bench_mvfuser_vs_attention(args, env):
    from flax import nnx

    from mfuser_jax.flops import mvfuser_flops
    from mfuser_jax.models.mvfuser import MVFuser

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
# section: full MFuser-CLIP-L training step; section: sliding-window evaluation

_MODELS = {}


def _model_config(args):
    """configs/base.py's MFuser-CLIP-L (--smoke: its tiny model) as plain Fields, in bfloat16
    at full size; remat off (each train_step case sets its own)."""
    from configs.base import plain_model_config

    cfg = plain_model_config("tiny" if args.smoke else "large", "clip")
    if not args.smoke:
        cfg.dtype = "bfloat16"
    cfg.remat = False
    cfg.attn_implementation = args.attn
    cfg.mvfuser.scan_backend = args.scan_backend
    return cfg


def _build_model(args):
    """Random-weight MFuser (built once per run and shared by the sections)."""
    from flax import nnx

    from mfuser_jax.models.mfuser import MFuser

    key = (args.smoke, args.scan_backend, args.attn)
    if key not in _MODELS:
        cfg = _model_config(args)
        t0 = time.perf_counter()
        _MODELS[key] = (cfg, MFuser(cfg, rngs=nnx.Rngs(0)))
        print(f"  built the model in {time.perf_counter() - t0:.1f} s", flush=True)
    return _MODELS[key]


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


def bench_train_step(args, env):
    import optax
    from flax import nnx

    from mfuser_jax.flops import train_step_flops

    deadline = _deadline(args)  # the model build and the peak measurement count too
    cfg, model = _build_model(args)
    size = int(cfg.image_size)
    peak = env.setdefault("bf16_matmul_peak_FLOPs", matmul_peak(512 if args.smoke else 8192))
    print(f"  measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    cases = [(int(b), bool(int(r))) for b, r in (c.split(":") for c in args.train_cases.split(","))]
    if args.smoke:
        cases = [(b, r) for b, r in cases if b <= 2] or [(2, False)]
    tx = optax.adamw(1e-4, weight_decay=1e-4)
    model.train()
    trainable = nnx.All(nnx.Param, model.trainable_filter)
    opt_state = tx.init(nnx.state(model, trainable))

    def make_step(graphdef):  # a fresh function per graphdef: jit caches traces by function
        def step(params, batch_stats, opt_state, rest, images, labels, key):
            def loss_fn(params):
                m = nnx.merge(graphdef, params, batch_stats, rest, copy=True)
                total, _ = m.loss(images, labels, key)
                return total.astype(jnp.float32), nnx.state(m, nnx.BatchStat)

            (total, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, new_opt = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_bs, new_opt, total
        return step

    rows = args.rows
    for batch, remat in cases:
        case = f"MFuser-CLIP {size}px {cfg.dtype} B={batch} remat={remat}"
        if time.perf_counter() > deadline:
            rows.append(_skip_row("train_step", case))
            continue
        row = dict(section="train_step", case=case, batch=batch, remat=remat, image=size)
        model.backbone.remat = remat  # read at trace time: one model serves both settings
        graphdef, params, batch_stats, rest = nnx.split(model, trainable, nnx.BatchStat, ...)
        images = jax.random.randint(jax.random.key(2), (batch, size, size, 3), 0, 256).astype(jnp.uint8)
        labels = jax.random.randint(jax.random.key(3), (batch, size, size), 0, int(cfg.num_classes))
        args_ = (params, batch_stats, opt_state, rest, images, labels, jax.random.key(4))
        try:
            t0 = time.perf_counter()
            compiled = jax.jit(make_step(graphdef)).lower(*args_).compile()
            row["compile_s"] = time.perf_counter() - t0
            row["step_ms"], row["runs"] = time_fn(compiled, *args_, min_runs=3, max_runs=20,
                                                  budget_s=args.measure_s)
        except Exception as e:
            row["error"] = _err(e)
            rows.append(row)
            print(f"  {case}: {row['error']}", flush=True)
            continue
        flops = train_step_flops(cfg, batch, (size, size), remat=remat)
        row["images_per_s"] = batch / (row["step_ms"] * 1e-3)
        row["analytic_TFLOP"] = flops["model"] / 1e12
        row["MFU"] = flops["model"] / (row["step_ms"] * 1e-3) / peak
        row["HFU"] = flops["executed"] / (row["step_ms"] * 1e-3) / peak
        row["temp_MiB"] = (temp_bytes(compiled) or 0) / 2**20
        peak_mem = _peak_memory_bytes()  # the process's peak so far (None on CPU)
        row["peak_mem_MiB"] = None if peak_mem is None else peak_mem / 2**20
        try:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            row["xla_TFLOP"] = float(cost["flops"]) / 1e12
            row["analytic_vs_xla"] = flops["executed"] / float(cost["flops"])
        except Exception:
            pass
        rows.append(row)
        print(f"  {case}: {row['step_ms']:.1f} ms/step, {row['images_per_s']:.2f} img/s, "
              f"MFU {row['MFU']:.3f}, compile {row['compile_s']:.0f} s", flush=True)
    model.backbone.remat = bool(cfg.remat)
    return rows


def bench_sliding_window(args, env):
    from mfuser_jax.evaluate import SlidingWindowPredictor

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


# section: memory and compile time of the paper-config train step and its parts (compile only)

def bench_step_memory(args, env):
    """XLA's working memory (temporaries) and compile time of the configs/gta2cs.py train
    step and of its parts, from shapes alone: no weights, no data, so it runs anywhere
    (compiled for this machine's backend). Parts: backbone forward; backbone forward +
    backward; everything after the backbone (text, enhancer, score map, tqdm head, losses)
    forward + backward; the whole train step with AdamW and the NaN guard."""
    from flax import nnx

    from configs import gta2cs
    from mfuser_jax.models.factory import build_model
    from mfuser_jax.train import compile_train_step

    rows = args.rows
    deadline = _deadline(args)
    for spec in args.memory_cases.split(","):
        batch, dtype, remat = spec.split(":")
        batch, remat = int(batch), bool(int(remat))
        case = f"{'tiny' if args.smoke else 'MFuser-CLIP-L'} B={batch} {dtype} remat={remat}"
        if time.perf_counter() > deadline:
            rows.append(_skip_row("step_memory", case))
            continue
        cfg = gta2cs.get_config("size=tiny" if args.smoke else None)
        cfg.model.pretrained, cfg.batch_size = "", batch
        cfg.model.dtype, cfg.model.remat = dtype, remat
        size = int(cfg.data.crop_size)
        model = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0)))
        graphdef, trainable, rest = nnx.split(model, model.trainable_filter, ...)
        images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
        labels = jax.ShapeDtypeStruct((batch, size, size), jnp.int32)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)

        # the frozen state is an argument too: closed-over shapes cannot be computed with
        def merged(trainable, rest):
            m = nnx.merge(graphdef, trainable, rest, copy=True)
            m.train()
            return m

        def backbone_forward(trainable, rest, images, key):
            return merged(trainable, rest).backbone(images, key=key)

        def backbone_grad(trainable, rest, images, key):
            total = lambda t: sum(jnp.sum(x.astype(jnp.float32))  # noqa: E731
                                  for x in jax.tree.leaves(backbone_forward(t, rest, images, key)))
            return jax.grad(total)(trainable)

        outputs = jax.eval_shape(backbone_forward, trainable, rest, images, key)

        def decode_and_loss_grad(trainable, rest, outputs, labels, key):
            def total(t):
                m = merged(t, rest)
                return m.loss_of_outputs(m.decode(*outputs), labels, key)[0]
            return jax.grad(total)(trainable)

        parts = [("backbone fwd", backbone_forward, (trainable, rest, images, key)),
                 ("backbone fwd+bwd", backbone_grad, (trainable, rest, images, key)),
                 ("decode+loss fwd+bwd", decode_and_loss_grad,
                  (trainable, rest, outputs, labels, key))]
        row = dict(section="step_memory", case=case, batch=batch, dtype=dtype, remat=remat)
        rows.append(row)  # filled in place: an interrupted case keeps its parts
        try:
            for name, fn, fn_args in parts:
                t0 = time.perf_counter()
                compiled = jax.jit(fn).lower(*fn_args).compile()
                row[f"{name} compile_s"] = time.perf_counter() - t0
                row[f"{name} temp_GiB"] = (temp_bytes(compiled) or 0) / 2**30
            step = compile_train_step(cfg, log=lambda line: None)  # what --compile_only runs
            row["step compile_s"] = step["compile_s"]
            row["step temp_GiB"] = step["temp_bytes"] / 2**30
            row["step arguments_GiB"] = step["argument_bytes"] / 2**30
        except Exception as e:
            row["error"] = _err(e)
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
            "peak_mem_MiB", "analytic_vs_xla", "compile_s", "error"]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument("--crop-batch", type=int, default=6, help="sliding-window crops per model call")
    parser.add_argument("--memory-cases", default="1:float32:1,2:float32:1,4:float32:1,2:bfloat16:1,2:float32:0",
                        help="step_memory cases, comma-separated batch:dtype:remat (remat 0/1)")
    args = parser.parse_args(argv)
    env = environment()
    env["copy_bandwidth_Bps"] = copy_bandwidth(64 * 2**20 if args.smoke else 1024 * 2**20)
    # What scan_backend="auto" runs here (on a GPU: after probing the Pallas kernel; a fallback
    # warns with the reason).
    env["scan_auto_backend"] = importlib.import_module("mfuser_jax.ops.selective_scan").auto_backend()
    print(f"{env['device']} ({env['backend']}), JAX {env['jax']}, commit {env['commit']}, "
          f"copy bandwidth {env['copy_bandwidth_Bps'] / 1e9:.1f} GB/s, "
          f"scan 'auto' = {env['scan_auto_backend']}", flush=True)
    all_rows = []
    for name in args.sections.split(","):
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {list(SECTIONS)}")
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


if __name__ == "__main__":
    main()
