"""atomic_write: the one way result files are written (config, eval JSON/PNG, labels,
predictions, exports, checkpoints)."""

import os

import pytest

from mfuser_jax.errors import UserError
from mfuser_jax.files import atomic_write, partial_path


def test_partial_path_keeps_folder_and_extension():
    assert partial_path("a/b/c.png") == "a/b/c.part.png"
    assert partial_path("W/config.json") == "W/config.part.json"


def test_targets_appear_together_and_only_when_complete(tmp_path):
    mask, overlay = tmp_path / "new" / "x_mask.png", tmp_path / "new" / "x_overlay.jpg"
    with atomic_write(mask, overlay) as (tmp_mask, tmp_overlay):
        open(tmp_mask, "w").write("m")
        assert not mask.exists()  # nothing is visible under the real name while writing
        open(tmp_overlay, "w").write("o")
    assert mask.read_text() == "m" and overlay.read_text() == "o"
    assert sorted(os.listdir(tmp_path / "new")) == ["x_mask.png", "x_overlay.jpg"]


def test_a_failure_keeps_the_old_file_and_removes_the_temporaries(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as (tmp,):
            open(tmp, "w").write("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


def test_os_errors_name_the_target(tmp_path):
    (tmp_path / "file").write_text("")
    target = tmp_path / "file" / "out.json"  # its folder is a file: cannot be created
    with pytest.raises(UserError, match=r"cannot write .*file/out\.json"):
        with atomic_write(target) as (tmp,):
            open(tmp, "w").write("x")

    class WeightError(Exception):
        pass

    with pytest.raises(WeightError, match="cannot write"):
        with atomic_write(target, error=WeightError) as (tmp,):
            pass
