"""JAX conveniences of training: --compile_only with its memory analysis, the persistent
compile cache a second process loads from, and a profiler trace of chosen steps."""

import glob
import os
import subprocess
import sys

import pytest

from tests.support import REPO
from tests.toy import fake_train_iter, register_toy, toy_config

register_toy()
from mfuser_jax.run import train as T  # noqa: E402
from mfuser_jax.process import COMPILE_CACHE_DIR  # noqa: E402


def test_compile_only_reports_memory_and_a_second_process_loads_it_from_the_cache(tmp_path):
    # the toy step compiles in well under JAX's 1 s caching threshold: cache everything here
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's shared cache would take precedence
    cmd = [sys.executable, "scripts/train.py", "--config", "tests/toy_config.py",
           "--compile_only", "--workdir", str(tmp_path)]
    runs = [subprocess.run(cmd + ["--config.compile_cache=workdir"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        assert "temporaries" in run.stdout and "arguments" in run.stdout
    assert "compile cache" not in runs[0].stdout
    assert "(loaded from the compile cache)" in runs[1].stdout
    assert os.listdir(tmp_path / COMPILE_CACHE_DIR)
    assert not os.path.exists(tmp_path / "checkpoints")  # compiling trains nothing


def test_profile_steps_writes_a_trace_of_those_steps(tmp_path):
    logs = []
    T.train_and_evaluate(toy_config(total_steps=3, profile_steps="2,3", **{"data.eval": ()}),
                         str(tmp_path), train_iter_fn=fake_train_iter, log=logs.append)
    traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert any(line.startswith("profile of steps 2-3 in") for line in logs)


@pytest.mark.parametrize("spec", ["3,2", "0", "a,b", "1,2,3"])
def test_bad_profile_steps_is_one_clear_error_before_anything_is_written(tmp_path, spec):
    with pytest.raises(T.UserError, match="profile_steps"):
        T.train_and_evaluate(toy_config(profile_steps=spec), str(tmp_path / "w"),
                             train_iter_fn=fake_train_iter, log=lambda s: None)
    assert not os.path.exists(tmp_path / "w")
