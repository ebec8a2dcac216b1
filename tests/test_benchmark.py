"""scripts/benchmark.py in --smoke mode: every section runs end to end and writes its JSON.
No timing assertions (CPU timings are noise); the rows must carry their measurements."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")


def _load():
    spec = importlib.util.spec_from_file_location("mfuser_benchmark_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(out, section):
    with open(os.path.join(out, f"{section}.json")) as f:
        data = json.load(f)
    assert data["smoke"] is True and data["env"]["jax"]
    return data["rows"]


def test_benchmark_imports_no_data_stack():
    # The GPU image has no grain / ml_collections / tensorflow_datasets: the benchmark and the
    # model path it builds must not import them.
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('b', {SCRIPT!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "import mfuser_jax.models.mfuser, mfuser_jax.evaluate, mfuser_jax.flops, optax\n"
            "cfg = mfuser_jax.flops.plain_model_config()\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in "
            "('grain', 'ml_collections', 'tensorflow_datasets', 'tensorflow')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_smoke_scan_and_mvfuser_vs_attention(tmp_path, capsys):
    bench = _load()
    bench.main(["--smoke", "--out", str(tmp_path), "--sections", "scan,mvfuser_vs_attention",
                "--measure-s", "0.01", "--scan-backends", "reference,associative"])
    scan = _rows(tmp_path, "scan")
    assert {r["backend"] for r in scan} == {"reference", "associative"}
    assert all(r["rel_err_vs_reference"] < 1e-4 for r in scan)
    rows = _rows(tmp_path, "mvfuser_vs_attention")
    timed = [r for r in rows if "fwd_ms" in r]
    assert {r["layer"] for r in timed} == {"mvfuser", "attention"} and len(timed) == 4
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and "error" not in r for r in timed)
    growth = [r for r in rows if "fwd_growth" in r]
    assert len(growth) == 2 and all(r["token_growth"] == 34 / 10 for r in growth)
    assert "mvfuser growth" in capsys.readouterr().out  # the final table


def test_section_budget_skips(tmp_path):
    bench = _load()
    bench.main(["--smoke", "--out", str(tmp_path), "--sections", "mvfuser_vs_attention",
                "--budget-s", "1e-9"])
    rows = _rows(tmp_path, "mvfuser_vs_attention")
    assert rows and all(r["error"].startswith("skipped") for r in rows)


@pytest.mark.slow
def test_smoke_train_step_and_sliding_window(tmp_path):
    # One model build and one compile of the full training step (remat on): ~1.5 min on 2 cores.
    bench = _load()
    bench.main(["--smoke", "--out", str(tmp_path), "--sections", "train_step,sliding_window",
                "--measure-s", "0.01", "--train-cases", "2:1"])
    (row,) = _rows(tmp_path, "train_step")
    assert "error" not in row, row
    assert row["step_ms"] > 0 and row["images_per_s"] > 0 and 0 < row["MFU"] < row["HFU"]
    assert row["analytic_TFLOP"] > 0 and row["xla_TFLOP"] > 0
    (sw,) = _rows(tmp_path, "sliding_window")
    assert "error" not in sw, sw
    assert sw["images_per_s"] > 0 and sw["runs"] >= 3
