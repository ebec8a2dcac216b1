"""A run SIGKILLed after a checkpoint, restarted with the same command, logs the same
losses for the remaining steps as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import numpy as np

from tests.test_train_toy import fake_train_iter, register_toy, toy_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "test_train_toy.py")


def _train_lines(workdir):
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return [x for x in lines if "loss" in x]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    register_toy()
    from mfuser_jax.train import train_and_evaluate
    base_dir = str(tmp_path / "uninterrupted")
    train_and_evaluate(toy_config(total_steps=8, **{"data.eval": ()}), base_dir,
                       train_iter_fn=fake_train_iter)
    want = _train_lines(base_dir)

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
