"""Checkpoints that survive faults, on the toy model: each checkpoint carries a manifest of
its files' sizes and CRC-32 checksums. Bytes overwritten in a data file, a truncated file, a missing
file or a manifest that lies: training sets the checkpoint aside (damaged-<step>) and
resumes from the one before with the same losses; eval, predict and export name it and the
intact steps. A full disk during a save (patched, and a real small tmpfs where the test may
mount one) and a SIGKILL during the asynchronous save lose no checkpoint, and the same
command resumes. One trained toy workdir is copied per fault."""

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.support import scripts_cli
from tests.toy import SCRIPT, fake_eval_iter, fake_train_iter, register_toy, toy_config

register_toy()
from mfuser_jax import checkpoints as C  # noqa: E402
from mfuser_jax.run import train as T  # noqa: E402
from mfuser_jax.run import evaluate as E  # noqa: E402
from mfuser_jax.run import restore as R  # noqa: E402

RUN = {"checkpoint_every": 4, "data.eval": ()}  # checkpoints 4 and 8 of an 8-step run


def _train(workdir, steps=8, **overrides):
    """train_and_evaluate in-process; returns the lines it logged."""
    lines = []
    # extending the 8-step run (steps=12) is on purpose: the lr curve follows the new total
    T.train_and_evaluate(toy_config(total_steps=steps, **RUN, **overrides), workdir,
                         train_iter_fn=fake_train_iter, log=lines.append,
                         new_schedule=steps != 8)
    return lines


def _losses(workdir):
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}  # the last line per step


def _listing(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An 8-step toy run: checkpoints 4 and 8 with manifests, and its losses."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    _train(workdir)
    assert _listing(workdir) == ["4", "8"]
    return workdir, _losses(workdir)


@pytest.fixture
def workdir(trained, tmp_path):
    path = str(tmp_path / "w")
    shutil.copytree(trained[0], path)
    return path


def _data_file(ckpt):
    """The largest array data file of a checkpoint (OCDBT's d/ folders)."""
    files = [f for f in glob.glob(os.path.join(ckpt, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def _overwrite(ckpt):
    path = _data_file(ckpt)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        f.seek(0)
        f.write(data)
    return path, "has other contents than when saved"


def _truncate(ckpt):
    path = _data_file(ckpt)
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    return path, f"has {size // 2:,} bytes, {size:,} when saved"


def _remove(ckpt):
    path = _data_file(ckpt)
    os.remove(path)
    return path, "is missing"


def _lying_manifest(ckpt):
    """The files are intact; the manifest claims another digest for one of them."""
    path = _data_file(ckpt)
    manifest_path = os.path.join(ckpt, C.MANIFEST)
    manifest = json.load(open(manifest_path))
    crcs = manifest["files"][os.path.relpath(path, ckpt)]["crc32"]
    crcs[0] = f"{int(crcs[0], 16) ^ 1:08x}"
    json.dump(manifest, open(manifest_path, "w"))
    return path, "has other contents than when saved"


FAULTS = {"overwritten": _overwrite, "truncated": _truncate, "missing": _remove,
          "lying manifest": _lying_manifest}


def test_manifest_lists_every_file_of_a_checkpoint(workdir):
    ckpt = os.path.join(workdir, "checkpoints", "8")
    manifest = json.load(open(os.path.join(ckpt, C.MANIFEST)))
    on_disk = {os.path.relpath(os.path.join(r, n), ckpt)
               for r, _, names in os.walk(ckpt) for n in names}
    assert set(manifest["files"]) == on_disk - {C.MANIFEST, *C.COMMIT_FILES}
    assert any("/d/" in f for f in manifest["files"])  # the array data are covered
    assert C.check_manifest(ckpt) is True


def test_large_files_are_checked_in_blocks(workdir, monkeypatch):
    """Files are checked in BLOCK_BYTES blocks (in parallel); damage in any block is found,
    and a manifest is checked with the block size it was written with."""
    ckpt = os.path.join(workdir, "checkpoints", "8")
    path = _data_file(ckpt)
    size = os.path.getsize(path)
    monkeypatch.setattr(C, "BLOCK_BYTES", 256)
    digests = C.write_manifest(ckpt)["files"][os.path.relpath(path, ckpt)]["crc32"]
    assert len(digests) == -(-size // 256) > 1
    monkeypatch.undo()
    assert C.check_manifest(ckpt) is True
    with open(path, "r+b") as f:
        f.seek(size - 1)
        last = f.read(1)
        f.seek(size - 1)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="has other contents than when saved"):
        C.check_manifest(ckpt)


@pytest.mark.parametrize("fault", FAULTS)
def test_training_sets_a_damaged_checkpoint_aside_and_resumes(trained, workdir, fault):
    ckpt = os.path.join(workdir, "checkpoints", "8")
    path, why = FAULTS[fault](ckpt)
    rel = os.path.relpath(path, ckpt)
    damaged = sorted(os.path.relpath(os.path.join(r, n), ckpt)
                     for r, _, names in os.walk(ckpt) for n in names)

    lines = _train(workdir)
    moved = os.path.join(workdir, "checkpoints", "damaged-8")
    assert lines[0] == f"checkpoint {ckpt} is damaged ({rel} {why}): moved to {moved}"
    assert f"resumed from {workdir}/checkpoints/4" in lines
    # nothing lost: the damaged files kept as they were, steps 5-8 redone as before
    assert _listing(workdir) == ["4", "8", "damaged-8"]
    assert sorted(os.path.relpath(os.path.join(r, n), moved)
                  for r, _, names in os.walk(moved) for n in names) == damaged
    losses = _losses(workdir)
    np.testing.assert_allclose([losses[s] for s in range(1, 9)],
                               [trained[1][s] for s in range(1, 9)], rtol=1e-6)
    assert C.check_manifest(ckpt) is True  # the new step 8


def test_training_stops_when_no_checkpoint_is_intact(workdir):
    for step in ("4", "8"):
        _overwrite(os.path.join(workdir, "checkpoints", step))
    with pytest.raises(T.UserError) as e:
        _train(workdir)
    assert str(e.value) == (
        f"no intact checkpoint left in {workdir}/checkpoints (set aside: damaged-8, "
        "damaged-4); running the same command again starts training from step 0")
    assert _listing(workdir) == ["damaged-4", "damaged-8"]


def test_checkpoints_without_manifest_still_load_with_a_note(workdir):
    for step in ("4", "8"):
        os.remove(os.path.join(workdir, "checkpoints", step, C.MANIFEST))
    lines = _train(workdir, steps=12)
    ckpt = os.path.join(workdir, "checkpoints", "8")
    assert (f"note: checkpoint {ckpt} has no manifest.json (saved before "
            "checksums were kept): restored unverified") in lines
    assert f"resumed from {workdir}/checkpoints/8" in lines
    assert C.check_manifest(os.path.join(workdir, "checkpoints", "12")) is True


@pytest.mark.parametrize("part", ["meta", "data"])
def test_unreadable_checkpoint_without_manifest_is_set_aside(workdir, part):
    """Without a manifest only Orbax can tell: a checkpoint it fails to read (here its
    step record or its array data) is damaged, not a model that "does not fit"."""
    ckpt = os.path.join(workdir, "checkpoints", "8")
    os.remove(os.path.join(ckpt, C.MANIFEST))
    if part == "meta":
        with open(os.path.join(ckpt, "meta", "metadata"), "w") as f:
            f.write('{"step": 8, "data_pos')
    else:
        for path in glob.glob(os.path.join(ckpt, "state", "**", "d", "*"), recursive=True):
            os.truncate(path, os.path.getsize(path) // 2)
        # evaluation names it and the intact steps, and moves nothing
        with pytest.raises(T.UserError) as e:
            R.restore_model(toy_config(), workdir)
        assert str(e.value).startswith(
            f"checkpoint {ckpt} is damaged (Orbax cannot read it: ")
        assert str(e.value).endswith("; intact: 4 (choose one with --step N)")
    lines = _train(workdir, steps=12)
    assert any(x.startswith(f"note: checkpoint {ckpt} has no manifest.json") for x in lines)
    (line,) = [x for x in lines if "is damaged" in x]
    assert line.startswith(f"checkpoint {ckpt} is damaged (Orbax cannot read it: ")
    assert line.endswith(f"): moved to {workdir}/checkpoints/damaged-8")
    assert f"resumed from {workdir}/checkpoints/4" in lines
    assert _listing(workdir) == ["12", "4", "8", "damaged-8"]


def _cli(fn, *args, **kwargs):
    """(exit status, stderr) of a CLI job run through scripts/_cli.run_main."""
    _cli = scripts_cli()
    with pytest.raises(SystemExit) as e:
        _cli.run_main(fn, *args, **kwargs)
    return e.value.code


def test_eval_predict_export_refuse_a_damaged_checkpoint(workdir, tmp_path, capsys):
    from PIL import Image

    from mfuser_jax.run.export import export_stablehlo
    from mfuser_jax.run.predict import predict

    ckpt = os.path.join(workdir, "checkpoints", "8")
    path, why = _overwrite(ckpt)
    want = (f"error: checkpoint {ckpt} is damaged ({os.path.relpath(path, ckpt)} {why}); "
            "intact: 4 (choose one with --step N)\n")
    config = toy_config()
    image = str(tmp_path / "a.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    for job, args in [(E.evaluate_checkpoint, (config, workdir, None)),
                      (predict, (config, workdir, [image], str(tmp_path / "p"), None, None,
                                 0.5)),
                      (export_stablehlo, (config, workdir, str(tmp_path / "x.hlo")))]:
        kw = {"eval_iter_fn": fake_eval_iter} if job is E.evaluate_checkpoint else {}
        assert _cli(job, *args, **kw) == 2
        assert capsys.readouterr().err == want
    # no score of damaged weights (eval checks W/eval is writable first, so it may exist)
    assert not glob.glob(os.path.join(workdir, "eval", "*"))
    assert _listing(workdir) == ["4", "8"]  # evaluation moves nothing
    # --step picks an intact one
    res = E.evaluate_checkpoint(config, workdir, 4, eval_iter_fn=fake_eval_iter,
                                log=lambda s: None)
    assert set(res) == {"synthetic_toy"}
    assert os.path.exists(os.path.join(workdir, "eval", "synthetic_toy_step4.json"))


def _full_disk(monkeypatch):
    """Orbax's writer of the checkpoint's JSON item fails as on a full disk."""
    import orbax.checkpoint as ocp

    async def no_space(self, x, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", no_space)


def test_full_disk_during_a_save_keeps_every_checkpoint(workdir, monkeypatch, caplog):
    """keep_checkpoints=1 and the save of step 12 fails: 4 and 8 stay (a failed save
    deletes nothing), the error is one line, the same command then resumes from 8."""
    _full_disk(monkeypatch)
    with pytest.raises(C.CheckpointSaveError) as e:
        _train(workdir, steps=12, keep_checkpoints=1)
    assert str(e.value) == (
        f"cannot save checkpoint 12 in {workdir}/checkpoints: No space left on device "
        "(checkpoints kept there: 4, 8); free space, then run the same command again")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no Orbax tracebacks
    assert _listing(workdir) == ["4", "8"]  # the partial save is gone, nothing else
    for step in ("4", "8"):
        assert C.check_manifest(os.path.join(workdir, "checkpoints", step)) is True

    monkeypatch.undo()  # space freed
    lines = _train(workdir, steps=12, keep_checkpoints=1)
    assert f"resumed from {workdir}/checkpoints/8" in lines
    assert _listing(workdir) == ["12"]


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (root only; skipped where mounting is not allowed)."""
    path = tmp_path / "fs"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_real_full_file_system_during_a_save(trained, small_fs):
    workdir = os.path.join(small_fs, "w")
    shutil.copytree(trained[0], workdir)
    filler = os.path.join(small_fs, "filler")
    st = os.statvfs(small_fs)
    with open(filler, "wb") as f:  # room for the logs of 4 steps, not for a checkpoint
        f.write(b"\0" * (st.f_bavail * st.f_frsize - 16 * 4096))
    with pytest.raises(C.CheckpointSaveError) as e:
        _train(workdir, steps=12)
    assert str(e.value) == (
        f"cannot save checkpoint 12 in {workdir}/checkpoints: No space left on device "
        "(checkpoints kept there: 4, 8); free space, then run the same command again")
    assert _listing(workdir) == ["4", "8"]

    os.remove(filler)
    lines = _train(workdir, steps=12)
    assert f"resumed from {workdir}/checkpoints/8" in lines
    assert _listing(workdir) == ["12", "4", "8"]
    assert C.check_manifest(os.path.join(workdir, "checkpoints", "12")) is True


def test_sigkill_during_the_async_save_then_resume(trained, tmp_path):
    workdir = str(tmp_path / "killed")
    killed = subprocess.run(
        [sys.executable, SCRIPT, "--workdir", workdir, "--steps", "8", "--no_eval",
         "--kill_in_save", "8"], env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _listing(workdir) == ["4", "8.orbax-checkpoint-tmp"]  # killed mid-save

    lines = _train(workdir)
    assert f"resumed from {workdir}/checkpoints/4" in lines
    assert _listing(workdir) == ["4", "8"]
    assert C.check_manifest(os.path.join(workdir, "checkpoints", "8")) is True
    losses = _losses(workdir)
    np.testing.assert_allclose([losses[s] for s in range(1, 9)],
                               [trained[1][s] for s in range(1, 9)], rtol=1e-6)
