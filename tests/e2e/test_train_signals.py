"""Ctrl-C during training: an interrupted evaluation is abandoned and its step saved, a
second Ctrl-C would end the process at once; the CLIs' exit codes; console step lines stay
short. (Ctrl-C in a training subprocess, then resume: tests/e2e/test_train_resume.py.)"""

import json
import os
import signal

import pytest

from tests.support import scripts_cli
from tests.toy import fake_eval_images, fake_train_iter, register_toy, toy_config

register_toy()
from mfuser_jax.run import train as T  # noqa: E402
from mfuser_jax.monitoring import format_loss_parts, format_step_line  # noqa: E402


def _lines(workdir, key):
    return [x for x in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
            if key in x]


def test_ctrl_c_during_evaluation_abandons_it_and_resume_evaluates(tmp_path):
    config = toy_config(total_steps=4, eval_every=2, checkpoint_every=100)
    workdir = str(tmp_path)
    calls, handlers = [], []

    def eval_iter_ctrl_c_once(config, name, **kw):
        calls.append(name)
        if len(calls) == 1:
            try:
                os.kill(os.getpid(), signal.SIGINT)
            finally:  # after a first Ctrl-C, a second one would end the process at once
                handlers.append(signal.getsignal(signal.SIGINT))
        return iter(fake_eval_images(n=1))  # one image shape: one compilation

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(T.Preempted, match="step 2") as e:
        T.train_and_evaluate(config, workdir, train_iter_fn=fake_train_iter,
                             eval_iter_fn=eval_iter_ctrl_c_once)
    assert e.value.signum == signal.SIGINT and handlers == [signal.SIG_DFL]
    assert signal.getsignal(signal.SIGINT) is before
    # step 2 had no periodic checkpoint: the interrupted evaluation's step is saved
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    assert not os.path.exists(os.path.join(workdir, "eval", "synthetic_toy_step2.json"))

    T.train_and_evaluate(config, workdir, train_iter_fn=fake_train_iter,
                         eval_iter_fn=eval_iter_ctrl_c_once)
    assert [x["step"] for x in _lines(workdir, "miou")] == [2, 4]
    assert len(calls) == 3


def test_cli_exit_codes_for_stops(capsys):
    _cli = scripts_cli()

    def raises(e):
        raise e

    for exc, code, err in [
            (T.Preempted("SIGTERM: checkpoint of step 2 saved", signal.SIGTERM), 143,
             "SIGTERM: checkpoint of step 2 saved"),
            (T.Preempted("interrupted (Ctrl-C): ...", signal.SIGINT), 130,
             "interrupted (Ctrl-C): ..."),
            (KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C)"),  # eval, predict
            (T.TrainingDiverged("non-finite loss"), 3, "error: non-finite loss"),
            (T.UserError("no checkpoints in W"), 2, "error: no checkpoints in W")]:
        with pytest.raises(SystemExit) as e:
            _cli.run_main(raises, exc)
        assert e.value.code == code
        assert capsys.readouterr().err == err + "\n"


def test_step_lines_fit_the_console():
    line = format_step_line(19999, 20000, 1234.56789, 1e-4, 12345.6, 200 * 3600.0)
    assert len(line) <= 120 and line.startswith("step 19999/20000 | loss 1234.5679")
    assert format_step_line(7, 20000, 1.5, 1e-4, None, None).startswith(
        "step     7/20000 | loss   1.5000 | lr 1.00e-04 | compiling")
    assert "|   125.0 s/img | ETA" in format_step_line(2, 2, 1.5, 1e-4, 0.008, 0.0)  # not 0.0 img/s
    # MFuser logs ~30 parts (9 decoder layers x 3 + score map): wrapped, none lost
    parts = {f"d{i}.loss_{k}": 10.0 * i + 0.123456 for i in range(9)
             for k in ("cls", "mask", "dice")}
    text = format_loss_parts(parts)
    assert all(len(ln) <= 120 for ln in text.splitlines()) and len(text.splitlines()) > 1
    assert text.split() == [w for k, v in parts.items() for w in (k, f"{v:.4f}")]
