#!/usr/bin/env python
"""Benchmarks for mfuser-jax: one command, one table at the end, JSON under --out.

    python scripts/benchmark.py                    # every section at full size (meant for a GPU)
    python scripts/benchmark.py --smoke            # tiny shapes, a CPU sanity run
    python scripts/benchmark.py --sections scan --out results/

Every section is a function ``(args, env) -> list[dict]`` registered in SECTIONS; each dict is
one table row (a "section" and "case" key plus measurements). New sections (MVFuser vs
attention, the training step, sliding-window evaluation) plug in the same way.
Timings are device-synchronised (block_until_ready), warmed up, and the median of many runs.
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
    rows = []
    for b in batches:
        for l in lengths:
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
                    row["fwd_ms"], row["fwd_runs"] = time_fn(fwd, *inputs, budget_s=args.budget_s)
                    row["fwd_bwd_ms"], row["fwd_bwd_runs"] = time_fn(grads, *inputs, budget_s=args.budget_s)
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


SECTIONS = {"scan": bench_scan}


# ---------------------------------------------------------------------------------------------


def print_table(rows):
    cols = ["case", "fwd_ms", "fwd_bwd_ms", "fwd_temp_MiB", "fwd_bwd_temp_MiB", "floor_ms", "fwd_x_floor",
            "rel_err_vs_reference", "grad_rel_err_vs_reference", "error"]
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
    parser.add_argument("--budget-s", type=float, default=2.0, help="time budget per measurement")
    args = parser.parse_args(argv)
    env = environment()
    env["copy_bandwidth_Bps"] = copy_bandwidth(64 * 2**20 if args.smoke else 1024 * 2**20)
    print(f"{env['device']} ({env['backend']}), JAX {env['jax']}, commit {env['commit']}, "
          f"copy bandwidth {env['copy_bandwidth_Bps'] / 1e9:.1f} GB/s", flush=True)
    all_rows = []
    for name in args.sections.split(","):
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {list(SECTIONS)}")
        print(f"[{name}]", flush=True)
        rows = SECTIONS[name](args, env)
        all_rows += rows
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump(dict(env=env, smoke=args.smoke, rows=rows), f, indent=1)
    print()
    print_table(all_rows)


if __name__ == "__main__":
    main()
