"""mfuser_jax/benchmark.py (scripts/benchmark.py's library) in --smoke mode: every section
runs end to end and writes its JSON, and the train_step section times the Trainer's own step.
No timing assertions (CPU timings are noise); the rows must carry their measurements."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from mfuser_jax.run import benchmark as bench
from tests.support import REPO as ROOT
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")


def _rows(out, section):
    with open(os.path.join(out, f"{section}.json")) as f:
        data = json.load(f)
    assert data["smoke"] is True and data["env"]["jax"]
    return data["rows"]


def test_benchmark_imports_no_data_stack():
    # The GPU image has no grain / ml_collections / tensorflow_datasets: the script, the
    # library and the model path its scan / MVFuser / sliding-window sections build must not
    # import them (train_step and step_memory build the ml_collections training config).
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('b', {SCRIPT!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "assert m.main.__module__ == 'mfuser_jax.run.benchmark'\n"
            "import mfuser_jax.model.mfuser, mfuser_jax.run.evaluate, mfuser_jax.run.flops, optax\n"
            "import mfuser_jax.trainer, mfuser_jax.model.factory, mfuser_jax.process\n"
            "from configs.base import plain_model_config\n"
            "cfg = plain_model_config()\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in "
            "('grain', 'ml_collections', 'tensorflow_datasets', 'tensorflow')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_gpu_check_smoke_runs_end_to_end(tmp_path):
    # scripts/gpu_check.sh --smoke, as the device call runs it (package report, scan tests, each
    # section in its own process under its limit), with the two quick sections; train_step and
    # sliding_window run in-process in the slow test below.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "SECTIONS": "scan,mvfuser_vs_attention",
           "BENCH_EXTRA": "--measure-s 0.01 --scan-backends reference,associative"}
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--smoke"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    versions = (tmp_path / "versions.txt").read_text()
    assert "\njax " in versions and "\nflax " in versions and "backend cpu" in versions
    log = (tmp_path / "check.log").read_text()
    assert "1 passed" in log and "mvfuser growth" in log  # the scan test; the section's table
    scan = _rows(tmp_path, "scan")
    assert {r["backend"] for r in scan} == {"reference", "associative"}
    assert all(r["rel_err_vs_reference"] < 1e-4 for r in scan)
    rows = _rows(tmp_path, "mvfuser_vs_attention")
    timed = [r for r in rows if "fwd_ms" in r]
    assert {r["layer"] for r in timed} == {"mvfuser", "attention"} and len(timed) == 4
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and "error" not in r for r in timed)
    growth = [r for r in rows if "fwd_growth" in r]
    assert len(growth) == 2 and all(r["token_growth"] == 34 / 10 for r in growth)
    assert len(list(tmp_path.iterdir())) <= 8  # what the device tool brings back
    with open(tmp_path / "scan.json") as f:
        assert json.load(f)["env"]["scan_auto_backend"] == "reference"  # a CPU


def _device_env():
    spec = importlib.util.spec_from_file_location("mfuser_device_env", os.path.join(ROOT, "scripts", "device_env.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_device_env_reports_missing_packages():
    dev = _device_env()
    lines, missing = dev.report(required={"numpy": "x", "mfuser_no_such_module": "the model"},
                                optional={"mfuser_no_such_extra": "data", "pytest": "tests"})
    assert missing == ["mfuser_no_such_module"]
    assert "mfuser_no_such_module: MISSING (needed by the model)" in lines
    assert "mfuser_no_such_extra: absent (needed by data)" in lines
    assert any(line.startswith("pytest ") and "absent" not in line for line in lines)


def test_device_env_installs_a_carried_wheel_only_where_missing(tmp_path):
    import zipfile

    dev = _device_env()
    wheels = tmp_path / "whl"
    wheels.mkdir()
    info = "mfuser_carried_pkg-0.1.dist-info"
    with zipfile.ZipFile(wheels / "mfuser_carried_pkg-0.1-py3-none-any.whl", "w") as z:
        z.writestr("mfuser_carried_pkg/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: mfuser-carried-pkg\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/top_level.txt", "mfuser_carried_pkg\n")
        z.writestr(f"{info}/RECORD", "")
    assert dev.wheel_modules(str(wheels / "mfuser_carried_pkg-0.1-py3-none-any.whl")) == ["mfuser_carried_pkg"]
    target = tmp_path / "site"
    try:
        report = dev.install_missing_wheels(str(wheels), str(target))
        assert report == ["wheel mfuser_carried_pkg-0.1-py3-none-any.whl: installed"]
        assert importlib.import_module("mfuser_carried_pkg").VALUE == 42
        # now importable: a second pass leaves it alone
        assert "not needed" in dev.install_missing_wheels(str(wheels), str(target))[0]
    finally:
        sys.modules.pop("mfuser_carried_pkg", None)
        while str(target) in sys.path:
            sys.path.remove(str(target))


def test_benchmark_is_a_program_nothing_in_the_package_imports():
    # mfuser_jax/run/benchmark.py sits beside train.py and lowering.py as a program:
    # no module of the package imports it.
    pattern = re.compile(r"mfuser_jax\.run\.benchmark\b"
                         r"|from mfuser_jax\.run import [^\n]*\bbenchmark\b"
                         r"|from \.+ import [^\n]*\bbenchmark\b|from \.benchmark\b")
    package = os.path.join(ROOT, "mfuser_jax")
    for folder, _, files in os.walk(package):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != os.path.join(package, "run", "benchmark.py"):
                with open(path) as f:
                    assert not pattern.search(f.read()), path


def test_train_config_is_the_paper_config_with_the_flags_applied():
    # What the train_step and step_memory sections give the Trainer: configs/gta2cs.py's
    # training config (its optimizer), the case's batch / remat / dtype, the flags.
    from configs import gta2cs

    args = bench.build_parser().parse_args(["--smoke", "--attn", "xla", "--scan-backend",
                                            "associative", "--grad-accum", "2"])
    model_cfg = bench._model_config(args)
    config = bench._train_config(args, model_cfg, batch=4, remat=True)
    paper = gta2cs.get_config("size=tiny")
    assert config.optim.grad_accum == 2 and paper.optim.grad_accum == 1
    assert {k: v for k, v in config.optim.items() if k != "grad_accum"} == \
        {k: v for k, v in paper.optim.items() if k != "grad_accum"}
    assert config.total_steps == paper.total_steps and config.seed == paper.seed
    assert config.batch_size == 4 and config.model.remat is True
    assert config.model.pretrained == "" and config.model.mvfuser.scan_backend == "associative"
    assert config.model.image_size == model_cfg.image_size == paper.model.image_size
    shapes = bench._train_config(args, batch=1, remat=False, dtype="bfloat16")
    assert shapes.model.dtype == "bfloat16" and shapes.model.remat is False
    assert shapes.optim.grad_accum == 2


def test_section_budget_skips(tmp_path):
    bench.main(["--smoke", "--out", str(tmp_path), "--sections", "mvfuser_vs_attention",
                "--budget-s", "1e-9"])
    rows = _rows(tmp_path, "mvfuser_vs_attention")
    assert rows and all(r["error"].startswith("skipped") for r in rows)


@pytest.mark.slow
def test_smoke_train_step_is_the_trainers_step_and_sliding_window(tmp_path, monkeypatch):
    # One model build and one compile of the Trainer's step (remat on): ~1.5 min on 2 cores.
    # Every timed call is Trainer.step (spied), from a fresh train state, on the program
    # Trainer.lower compiled (no trace or compile while timing); the row's loss is the
    # first step's.
    from mfuser_jax.trainer import Trainer

    calls = []
    step = Trainer.step

    def spied(self, state, batch):
        new_state, metrics = step(self, state, batch)
        calls.append((state.step, float(metrics["loss"]), batch["image"].shape))
        return new_state, metrics

    monkeypatch.setattr(Trainer, "step", spied)
    bench.main(["--smoke", "--out", str(tmp_path), "--sections", "train_step,sliding_window",
                "--measure-s", "0.01", "--train-cases", "2:1"])
    (row,) = _rows(tmp_path, "train_step")
    assert "error" not in row, row
    assert row["step_ms"] > 0 and row["images_per_s"] > 0 and 0 < row["MFU"] < row["HFU"]
    assert row["analytic_TFLOP"] > 0 and row["xla_TFLOP"] > 0
    size = row["image"]
    assert [c[0] for c in calls] == list(range(row["steps"])) and row["steps"] == row["runs"] + 2
    assert all(c[2] == (2, size, size, 3) for c in calls)
    assert row["loss"] == calls[0][1] and math.isfinite(row["loss"]) and row["last_step_finite"]
    assert row["traces_while_timing"] == 0 and row["grad_accum"] == 1
    (sw,) = _rows(tmp_path, "sliding_window")
    assert "error" not in sw, sw
    assert sw["images_per_s"] > 0 and sw["runs"] >= 3
