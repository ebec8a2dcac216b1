"""A run SIGKILLed after a checkpoint, or stopped with Ctrl-C, restarted with the same
command, logs the same losses for the remaining steps as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.toy import SCRIPT, fake_train_iter, register_toy, toy_config


def _train_lines(workdir):
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return [x for x in lines if "loss" in x]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Training lines of the runner's `--steps 8 --no_eval` run, uninterrupted."""
    register_toy()
    from mfuser_jax.run.train import train_and_evaluate
    base_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    train_and_evaluate(toy_config(total_steps=8, **{"data.eval": ()}), base_dir,
                       train_iter_fn=fake_train_iter)
    return _train_lines(base_dir)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    want = uninterrupted
    workdir = str(tmp_path / "killed")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, SCRIPT, "--workdir", workdir, "--steps", "8", "--no_eval"]
    killed = subprocess.run(cmd + ["--kill_at", "6", "--kill_after_ckpt", "4"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [x["step"] for x in _train_lines(workdir)] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    got = _train_lines(workdir)
    assert [x["step"] for x in got] == list(range(1, 9))   # lines after step 4 redone once
    np.testing.assert_allclose([x["loss"] for x in got], [x["loss"] for x in want],
                               rtol=1e-6)
    np.testing.assert_allclose([x["ce"] for x in got[4:]], [x["ce"] for x in want[4:]],
                               rtol=1e-6)
    # and a third start finds the run finished
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_ctrl_c_saves_the_step_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    workdir = str(tmp_path)
    cmd = [sys.executable, SCRIPT, "--workdir", workdir, "--steps", "8", "--no_eval"]
    out = subprocess.run(cmd + ["--sigint_at", "5"], env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 130, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    # Ctrl-C came while batch 5 was fetched: that step (the 6th) is finished and saved
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
    assert out.stderr.strip().splitlines()[-1] == (
        f"interrupted (Ctrl-C): checkpoint of step 6 saved in {workdir}/checkpoints; "
        "rerun the same command to resume")
    steps = [ln for ln in out.stdout.splitlines() if ln.startswith("step")]
    assert len(steps) == 6 and all(len(ln) <= 120 for ln in steps), steps
    assert not any(" ce " in ln for ln in steps)  # loss parts: metrics.jsonl only

    from mfuser_jax.run.train import train_and_evaluate  # the same command, in-process
    train_and_evaluate(toy_config(total_steps=8, **{"data.eval": ()}), workdir,
                       train_iter_fn=fake_train_iter)
    got = _train_lines(workdir)
    assert [x["step"] for x in got] == list(range(1, 9))
    for key in ("loss", "ce"):
        np.testing.assert_allclose([x[key] for x in got], [x[key] for x in uninterrupted],
                                   rtol=1e-6)
