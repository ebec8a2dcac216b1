"""The research workflow around the model (issue 24): the guards, prediction at the
evaluation protocol, the CLIs' one-line errors, test-time augmentation and the outputs a
segmentation user expects. One toy run (tests/test_train_toy.py) serves every test."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_train_toy import (fake_eval_iter, fake_train_iter, register_toy,
                                  toy_config)

register_toy()
from mfuser_jax import train as T  # noqa: E402
from mfuser_jax.errors import UserError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_workdir_guard_compares_image_size(tmp_path):
    """A 128 px workdir evaluated with a 64 px config ran silently (mIoU 3.6)."""
    sys.path.insert(0, REPO)
    from configs import demo
    from mfuser_jax.workdir import check_workdir_model, write_config
    (tmp_path / "checkpoints" / "600").mkdir(parents=True)
    write_config(str(tmp_path), demo.get_config())  # 128 px
    smaller = demo.get_config()
    smaller.model.image_size = 64
    with pytest.raises(UserError, match=r"model.image_size=128 there, 64 here"):
        check_workdir_model(smaller, str(tmp_path))
    check_workdir_model(demo.get_config(), str(tmp_path))  # the same size passes


def test_train_without_workdir_is_one_line():
    """It printed the whole --help and exited 1 (eval/predict: one line, exit 2)."""
    out = _run("scripts/train.py", "--config", "configs/demo.py")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "error: --workdir is required (except with --compile_only)"


def test_relative_config_found_from_another_folder(tmp_path):
    """`--config configs/demo.py` from another folder: the repository's configs/."""
    out = _run(os.path.join(REPO, "scripts", "eval.py"), "--config", "configs/demo.py",
               "--config.totl_steps=1", "--workdir", str(tmp_path), cwd=str(tmp_path))
    assert out.returncode == 2 and "did you mean config.total_steps" in out.stderr, out.stderr
    out = _run(os.path.join(REPO, "scripts", "eval.py"), "--config=configs/nope.py:vlm=clip",
               "--workdir", str(tmp_path), cwd=str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: config file not found: configs/nope.py (looked in "
                                  f"{tmp_path} and {REPO})")
