"""The same global batch on 8 fake CPU devices, and on two jax.distributed processes on
localhost, gives the same losses as one device (rel < 1e-4); their evaluations (windows
spread over 8 devices; images split over 2 processes) equal a one-device evaluation of the
same checkpoint."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.toy import SCRIPT, fake_train_iter, register_toy, toy_config

STEPS = 5


def _losses(workdir):
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return np.array([[x["loss"], x["ce"]] for x in lines if "loss" in x])


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    register_toy()
    from mfuser_jax.run.train import train_and_evaluate
    workdir = str(tmp_path_factory.mktemp("one_device"))
    train_and_evaluate(toy_config(total_steps=STEPS, **{"data.eval": ()}), workdir,
                       train_iter_fn=fake_train_iter)
    losses = _losses(workdir)
    assert losses.shape == (STEPS, 2)
    return losses


def _env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=os.environ.get("XLA_FLAGS", "")  # the suite's settings, then ours
                + f" --xla_force_host_platform_device_count={devices}")


def test_eight_devices_match_one(tmp_path, single_device_losses):
    workdir = str(tmp_path / "eight")
    out = subprocess.run([sys.executable, SCRIPT, "--workdir", workdir, "--steps",
                          str(STEPS)], env=_env(8), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'data': 8" in out.stdout
    np.testing.assert_allclose(_losses(workdir), single_device_losses, rtol=1e-4)
    # evaluation with each chunk of 8 windows spread over the 8 devices equals a
    # one-device evaluation of the same checkpoint
    _assert_eval_reproduced(workdir)


def _assert_eval_reproduced(workdir):
    from mfuser_jax.run.evaluate import evaluate_checkpoint
    from tests.toy import fake_eval_iter
    report = json.load(open(os.path.join(workdir, "eval", f"synthetic_toy_step{STEPS}.json")))
    single = evaluate_checkpoint(toy_config(total_steps=STEPS), workdir,
                                 eval_iter_fn=fake_eval_iter, log=lambda s: None)
    assert single["synthetic_toy"] == pytest.approx(report["miou"], abs=1e-9)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, single_device_losses):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = str(tmp_path / "two_proc")
    procs = [subprocess.Popen(
        [sys.executable, SCRIPT, "--workdir", workdir, "--steps", str(STEPS),
         "--coordinator", f"localhost:{port}", "--num_processes", "2",
         "--process_id", str(i)], env=_env(2), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    assert "'data': 4" in outs[0][0] and "2 process(es)" in outs[0][0]
    np.testing.assert_allclose(_losses(workdir), single_device_losses, rtol=1e-4)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "5"]
    # evaluation split over the processes (confusion matrices summed) equals a
    # single-process evaluation of the checkpoint they wrote together
    _assert_eval_reproduced(workdir)
