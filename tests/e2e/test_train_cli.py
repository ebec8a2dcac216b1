"""User errors of the CLIs: one short message naming the path, non-zero exit, no traceback."""

import os
import subprocess
import sys

import pytest

from tests.support import REPO


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("argv,needle", [
    (["scripts/train.py", "--config", "configs/gta2cs.py", "--workdir", "{tmp}/w",
      "--config.data_root={tmp}/no_such_data"], "data root not found: {tmp}/no_such_data"),
    (["scripts/train.py", "--config", "configs/demo.py", "--workdir", "{tmp}/w",
      "--config.model.pretrained={tmp}/no_weights"],
     "pretrained weights not found: {tmp}/no_weights"),
    (["scripts/eval.py", "--config", "configs/demo.py", "--workdir", "{tmp}/empty"],
     "no checkpoints in {tmp}/empty/checkpoints"),
    (["scripts/predict.py", "--config", "configs/demo.py", "--workdir", "{tmp}/empty",
      "--images", "{tmp}/no_images", "--out", "{tmp}/out"], "no such image or folder"),
    (["scripts/train.py", "--config", "configs/gta2cs.py:vlm=llava", "--workdir",
      "{tmp}/w"], "vlm='llava': choose one of ('clip', 'eva02', 'siglip')"),
])
def test_user_errors(tmp_path, argv, needle):
    tmp = str(tmp_path)
    out = _run(*[a.format(tmp=tmp) for a in argv])
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert needle.format(tmp=tmp) in out.stderr
    assert len(out.stderr.strip().splitlines()) < 25
    if "scripts/train.py" in argv:
        assert not os.path.exists(os.path.join(tmp, "w", "checkpoints"))
    if "convert" in needle or "pretrained" in needle:
        assert "scripts/convert_weights.py" in out.stderr
