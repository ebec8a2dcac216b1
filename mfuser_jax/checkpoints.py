"""Orbax checkpoints in W/checkpoints/<step>, in two formats with one writer each.

* Training (``save_checkpoint``): state {"params", "batch_stats", "opt_state"}, meta
  {"step", "data_position"}. A run resumes from it exactly: data are a pure function of
  (seed, step, process), so the step number is the data position.
* Model (``save_model_checkpoint``): state {"params", "batch_stats"}, meta {"step",
  "format": "model"}. What the release converter writes: evaluation and prediction need
  nothing more, and there are no optimizer moments to keep.

Both hold only what training changes (trainable params, batch statistics); the frozen
weights come from the config's converted encoders. ``restore_checkpoint`` (a trainer's whole
state; a model checkpoint gets a fresh optimizer state) and ``restore_model_state`` (params
and batch statistics only: the optimizer state of a training checkpoint is not read) take
either format.

Integrity: every checkpoint written here holds W/checkpoints/<step>/manifest.json, the size
and CRC-32 of each of its files. It is written by Orbax's finalisation thread after the
data and before the step directory is renamed into place, so it appears together with the
checkpoint (an interrupted save leaves only Orbax's ``<step>.orbax-checkpoint-tmp``, which
is ignored). Every restore verifies it first: a checkpoint whose bytes changed on disk
(a failing disk, an interrupted copy) is refused instead of restoring garbage or failing
deep inside Orbax. Training sets such a checkpoint aside (``damaged-<step>``, never
deleted) and resumes from the newest intact one; eval, predict and export name it and the
intact steps. Checkpoints written before manifests existed load as before, with a note.
Old checkpoints are deleted (``keep``) only by a save that committed, manifest included:
a failed save (a full disk) deletes nothing.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax

from mfuser_jax.errors import CheckpointSaveError, DamagedCheckpoint, UserError
from mfuser_jax.files import atomic_write, partial_path
from mfuser_jax.optim import pre_partition_layout
from mfuser_jax.model_state import TrainState

MODEL_FORMAT = "model"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mfuser-checkpoint-manifest/1"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step directory being written
_CHUNK = 16 << 20
BLOCK_BYTES = 64 << 20  # files are checksummed in blocks of this size, in parallel


# --------------------------------------------------------------------------- manifests

def _block_crc32(path: str, index: int, block: int) -> str:
    crc = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    left = block
    with open(path, "rb", buffering=0) as f:
        f.seek(index * block)
        while left and (n := f.readinto(view[:min(_CHUNK, left)])):
            crc = zlib.crc32(view[:n], crc)
            left -= n
    return f"{crc:08x}"


def _digests(directory: str, sizes: dict[str, int], block: int) -> dict[str, list[str]]:
    """The CRC-32 of each `block`-byte block of each file, in hex. CRC-32 finds accidental
    damage (not tampering) at 2-3 times SHA-256's speed; blocks are checked in parallel
    (zlib releases the GIL): a checkpoint is a few large OCDBT data files, which would
    otherwise take one core."""
    blocks = [(rel, i) for rel, size in sizes.items()
              for i in range(max(1, -(-size // block)))]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        hexes = pool.map(lambda b: _block_crc32(os.path.join(directory, b[0]), b[1], block),
                         blocks)
        out: dict[str, list[str]] = {rel: [] for rel in sizes}
        for (rel, _), digest in zip(blocks, hexes):
            out[rel].append(digest)
    return out


# Orbax rewrites these two when it commits, after the manifest is written; they hold no
# weights, and a restore works with them damaged or missing.
COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


def _checkpoint_files(directory: str) -> list[str]:
    skip = {MANIFEST, partial_path(MANIFEST), *COMMIT_FILES}
    return sorted(rel for root, _, names in os.walk(directory) for n in names
                  if (rel := os.path.relpath(os.path.join(root, n), directory)) not in skip)


def _stats(directory: str, rels) -> dict[str, tuple[int, int]]:
    out = {}
    for rel in rels:
        st = os.stat(os.path.join(directory, rel))
        out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def write_manifest(directory: str) -> dict:
    """<directory>/manifest.json: size and CRC-32 of every file under `directory`,
    written atomically and synced (a crash leaves the old state, never half a manifest)."""
    sizes = {r: os.path.getsize(os.path.join(directory, r))
             for r in _checkpoint_files(directory)}
    digests = _digests(directory, sizes, BLOCK_BYTES)
    manifest = {"format": MANIFEST_FORMAT, "block_bytes": BLOCK_BYTES,
                "files": {r: {"bytes": sizes[r], "crc32": digests[r]} for r in sizes}}
    with atomic_write(os.path.join(directory, MANIFEST)) as (tmp,), open(tmp, "w") as f:
        json.dump(manifest, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def check_manifest(directory: str) -> bool:
    """True when every file <directory>/manifest.json lists has its size and CRC-32; False
    without a manifest (a checkpoint written before them); otherwise ValueError(why).
    Files the manifest does not list are not read by Orbax's restore either way."""
    try:
        with open(os.path.join(directory, MANIFEST), "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return False
    try:
        manifest = json.loads(text)
        block = int(manifest["block_bytes"])
        if block < 1:
            raise ValueError
        want = {str(r): (int(v["bytes"]), v["crc32"]) for r, v in manifest["files"].items()}
        if not all(isinstance(d, list) and all(isinstance(x, str) for x in d)
                   for _, d in want.values()):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"its {MANIFEST} is unreadable") from None
    try:
        for rel, (size, _) in want.items():  # sizes first: cheap, and most damage shows there
            got = os.path.getsize(os.path.join(directory, rel))
            if got != size:
                raise ValueError(f"{rel} has {got:,} bytes, {size:,} when saved")
        digests = _digests(directory, {rel: size for rel, (size, _) in want.items()}, block)
    except FileNotFoundError as e:
        raise ValueError(f"{os.path.relpath(e.filename, directory)} is missing") from None
    except OSError as e:  # a failing disk (EIO) is damage as well
        raise ValueError(f"cannot read {e.filename}: {e.strerror or e}") from None
    bad = [r for r, (_, digest) in want.items() if digests[r] != digest]
    if bad:
        more = f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""
        raise ValueError(f"{bad[0]} has other contents than when saved{more}")
    return True


# --------------------------------------------------------------------------- the manager

class _DropOrbaxErrors(logging.Filter):
    """Orbax logs each failure of its background threads with a traceback (a full disk:
    about 300 lines) before raising it where the caller waits, where the manager reports
    it in one line (or raises it unchanged): the logged copies are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR
                    and f"{os.sep}orbax{os.sep}" in record.pathname)


_DROP = _DropOrbaxErrors()


def _drop_closed_loop(unraisable, previous) -> None:
    """TensorStore completes the reads of a failed restore after Orbax has closed their
    asyncio loop, each one printing 'RuntimeError: Event loop is closed' with a traceback
    (hundreds of lines for one damaged checkpoint); the failure itself is raised."""
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
        previous(unraisable)


def _quiet_orbax() -> None:
    """Installs both filters for good: a failed save's other writer threads may still log
    after the manager has reported the failure and closed."""
    logger = logging.getLogger("absl")
    if _DROP not in logger.filters:
        logger.addFilter(_DROP)
    if getattr(sys.unraisablehook, "func", None) is not _drop_closed_loop:
        sys.unraisablehook = functools.partial(_drop_closed_loop, previous=sys.unraisablehook)


def _join_orbax_threads(timeout: float = 60.0) -> None:
    """Waits for Orbax's writer threads. When one write of a save fails, Orbax reports it
    at once while the others go on writing into the partial directory; waiting for them
    lets the partial directory be removed and keeps their late errors off the console."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax."):
            t.join(max(0.0, deadline - time.monotonic()))


def _write_failure(e: BaseException) -> str | None:
    """What an operating-system error in the chain of `e` says ('No space left on
    device'), also when TensorStore reports it as a ValueError; None for other errors."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.strerror or os.strerror(e.errno)
        if isinstance(e, UserError):  # atomic_write's report (the manifest)
            return str(e)
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if code:
            return os.strerror(int(code.group(1)))
        e = e.__cause__ or e.__context__
    return None


class CheckpointManager:
    """Orbax's CheckpointManager (its other methods pass through) whose saves write a
    manifest into each checkpoint, whose restores verify it (``verify``) and whose failed
    saves end in one line (CheckpointSaveError) and delete nothing."""

    def __init__(self, directory: str, keep: int | None, *, create: bool,
                 log: Callable[[str], None] | None = None):
        import orbax.checkpoint as ocp
        self.directory = directory
        self.log = log or (lambda s: print(s, flush=True) if jax.process_index() == 0
                           else None)
        self.set_aside_paths: list[str] = []
        self._verified: dict[int, bool] = {}
        self._writing: int | None = None
        self._written: tuple[int, dict] | None = None  # (step, file stats) to check committed
        self._failed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=True,
            # what a killed save left (<step>.orbax-checkpoint-tmp) goes when training starts
            cleanup_tmp_directories=create,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._finalize))
        _quiet_orbax()
        self._mngr = ocp.CheckpointManager(directory, options=options)

    def __getattr__(self, name):
        if name == "_mngr":
            raise AttributeError(name)
        return getattr(self._mngr, name)

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def steps_on_disk(self) -> list[int]:
        """The committed steps as the directory holds them now."""
        try:
            return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
        except FileNotFoundError:
            return []

    # saving -------------------------------------------------------------------------

    def _finalize(self) -> None:
        """Orbax's post-finalisation callback (primary process, after every process wrote
        its part, before the step directory is renamed into place): the manifest goes
        into the directory being committed, so the two appear together."""
        step = self._writing
        parts = [p for p in glob.glob(os.path.join(self.directory, f"{step}{_TMP_SUFFIX}*"))
                 if os.path.isdir(p)]
        path = parts[0] if len(parts) == 1 else self.step_path(step)
        manifest = write_manifest(path)
        self._written = step, _stats(path, manifest["files"])

    def _check_commit(self) -> None:
        """A committed checkpoint's files are those its manifest describes: were Orbax to
        rewrite another file when it commits, every checkpoint would later fail to verify,
        so that is found at the first save, not at a resume."""
        written, self._written = self._written, None
        if written is None:
            return
        step, stats = written
        path = self.step_path(step)
        changed = [r for r, st in _stats(path, stats).items() if st != stats[r]]
        if changed:
            raise RuntimeError(f"{os.path.join(path, changed[0])} changed after the manifest "
                               f"of checkpoint {step} was written: this Orbax version commits "
                               "differently (see COMMIT_FILES in mfuser_jax/checkpoints.py)")

    def save(self, step: int, *args, **kwargs) -> bool:
        self.wait_until_finished()  # the previous save, its manifest and its errors
        self._writing = int(step)
        try:
            saved = self._mngr.save(step, *args, **kwargs)
        except Exception as e:
            if _write_failure(e) is None:
                raise
            raise self._save_failed(e) from None
        self._verified[int(step)] = True
        return saved

    def wait_until_finished(self) -> None:
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            if _write_failure(e) is None:
                raise
            raise self._save_failed(e) from None
        self._check_commit()

    def _save_failed(self, e: BaseException) -> CheckpointSaveError:
        step, self._writing, self._written, self._failed = self._writing, None, None, True
        self._verified.pop(step, None)
        _join_orbax_threads()
        if jax.process_index() == 0:  # the partial write: free what it took
            for part in glob.glob(os.path.join(self.directory, f"{step}{_TMP_SUFFIX}*")):
                shutil.rmtree(part, ignore_errors=True)
        kept = self.steps_on_disk()
        where = (f"checkpoints kept there: {', '.join(map(str, kept))}" if kept
                 else "no earlier checkpoint there")
        return CheckpointSaveError(f"cannot save checkpoint {step} in {self.directory}: "
                                   f"{_write_failure(e)} ({where}); free space, then run the "
                                   "same command again")

    def close(self) -> None:
        try:
            self._mngr.close()
        except Exception:
            if not self._failed:  # a failed save was reported already
                raise

    # restoring ----------------------------------------------------------------------

    def verify(self, step: int) -> bool:
        """Checks checkpoint `step` against its manifest (once per manager): True when it
        matches, False (with a note) without a manifest; DamagedCheckpoint otherwise."""
        step = int(step)
        if step not in self._verified:
            path = self.step_path(step)
            try:
                self._verified[step] = check_manifest(path)
            except ValueError as e:
                raise DamagedCheckpoint(path, step, str(e)) from None
            if not self._verified[step]:
                self.log(f"note: checkpoint {path} has no {MANIFEST} (saved before checksums "
                         "were kept): restored unverified")
        return self._verified[step]

    def intact_steps(self, exclude: int | None = None) -> list[int]:
        """The steps that verify (or have no manifest), newest first."""
        intact = []
        for step in sorted(self._mngr.all_steps(), reverse=True):
            if step == exclude:
                continue
            try:
                self.verify(step)
                intact.append(step)
            except DamagedCheckpoint:
                pass
        return intact

    def set_aside(self, step: int, reason: str) -> str:
        """Moves checkpoint `step` to damaged-<step> (never deleted: the user may want it)
        and says so in one line."""
        src = self.step_path(step)
        dst = os.path.join(self.directory, f"damaged-{step}")
        n = 1
        while os.path.exists(dst):
            dst, n = os.path.join(self.directory, f"damaged-{step}.{n}"), n + 1
        if jax.process_index() == 0:
            os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self._mngr.reload()
        self._verified.pop(int(step), None)
        self.set_aside_paths.append(dst)
        self.log(f"checkpoint {src} is damaged ({reason}): moved to {dst}")
        return dst


def checkpoint_manager(workdir: str, keep: int | None = 2, *, create: bool = True,
                       log: Callable[[str], None] | None = None) -> CheckpointManager:
    return CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), keep,
                             create=create, log=log)


def _save(mngr, step: int, tree: dict, meta: dict) -> None:
    import orbax.checkpoint as ocp
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                            meta=ocp.args.JsonSave(meta)))


def save_checkpoint(mngr, state: TrainState) -> None:
    """The training format: the whole train state."""
    step = int(state.step)
    _save(mngr, step, state.tree(), {"step": step, "data_position": step})


def save_model_checkpoint(mngr, step: int, params: dict, batch_stats: dict) -> None:
    """The model format: trainable params and batch statistics (pure dicts), no optimizer."""
    _save(mngr, int(step), {"params": params, "batch_stats": batch_stats},
          {"step": int(step), "format": MODEL_FORMAT})


def _does_not_fit(mngr, step: int, detail: str) -> UserError:
    return UserError(f"checkpoint {mngr.directory}/{step} does not fit the model this config "
                     f"builds ({detail}); was it trained with another config?")


def first_line(e: Exception) -> str:
    """The head of Orbax's (long) tree or shape diff."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# TensorStore's status codes for data it could not read or decode (Orbax passes them on
# as ValueError); not INVALID_ARGUMENT (a shape that does not fit), not RESOURCE_EXHAUSTED.
_READ_ERRORS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "UNAVAILABLE", "UNKNOWN",
                "INTERNAL", "ABORTED")


def unreadable(e: BaseException) -> bool:
    """Whether Orbax failing to restore a checkpoint means its files are damaged: read and
    decode errors do; a model that does not fit or exhausted memory do not."""
    if isinstance(e, (OSError, EOFError, json.JSONDecodeError)):
        return True
    return (isinstance(e, (ValueError, RuntimeError))
            and str(e).split(":", 1)[0].strip() in _READ_ERRORS)


def _restore(mngr, step: int, target: dict, *, partial: bool = False) -> dict:
    import orbax.checkpoint as ocp
    if partial:  # only the entries of `target` are read
        args = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)
    else:
        args = ocp.args.StandardRestore(target)
    return dict(mngr.restore(step, args=ocp.args.Composite(state=args))["state"])


def read_meta(mngr, step: int) -> dict:
    import orbax.checkpoint as ocp
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def _restore_train_tree(mngr, step: int, target: dict) -> dict:
    try:
        return _restore(mngr, step, target)
    except ValueError as first:
        # Checkpoints written before the lr multipliers went through optax.partition have an
        # EmptyState where the PartitionState is now; neither holds arrays, so the arrays
        # are read by the same paths and the (array-free) new entry is put in.
        old = pre_partition_layout(target["opt_state"])
        if old is None:
            raise
        try:
            tree = _restore(mngr, step, {**target, "opt_state": old})
        except ValueError:
            raise first from None
        tree["opt_state"] = (*tree["opt_state"][:-1], target["opt_state"][-1])
        return tree


def restore_checkpoint(mngr, trainer, step: int) -> TrainState:
    """The train state of checkpoint `step` (either format) on the shardings of `trainer` (a
    ``trainer.Trainer``: its model_tree, abstract_tree and init_opt_state)."""
    mngr.verify(step)
    meta = read_meta(mngr, step)
    try:
        if meta.get("format") == MODEL_FORMAT:
            tree = _restore(mngr, step, trainer.model_tree())
            tree["opt_state"] = trainer.init_opt_state(tree["params"])
        else:
            tree = _restore_train_tree(mngr, step, trainer.abstract_tree())
    except ValueError as e:
        if unreadable(e):
            raise
        raise _does_not_fit(mngr, step, first_line(e)) from None
    return TrainState(tree["params"], tree["batch_stats"], tree["opt_state"],
                      int(meta["step"]))


def restore_model_state(mngr, step: int, target: dict) -> dict:
    """{"params", "batch_stats"} of checkpoint `step` (either format) into `target`, their
    sharded shapes (SplitModel.model_tree())."""
    mngr.verify(step)
    try:
        tree = _restore(mngr, step, target, partial=True)
    except ValueError as e:
        if unreadable(e):
            raise
        raise _does_not_fit(mngr, step, first_line(e)) from None
    # a partial restore leaves what the checkpoint lacks as the target's shapes
    missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
               if isinstance(x, jax.ShapeDtypeStruct)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise _does_not_fit(mngr, step, f"it has no {', '.join(missing[:3])}{more}")
    return tree


# --------------------------------------------------------------------------- resuming

def resume_step(mngr: CheckpointManager) -> int | None:
    """The newest checkpoint that verifies (or has no manifest); damaged newer ones are set
    aside. None without checkpoints; UserError when every one was damaged."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            mngr.verify(step)
            return step
        except DamagedCheckpoint as e:
            mngr.set_aside(step, e.reason)
    if mngr.set_aside_paths:
        names = ", ".join(os.path.basename(p) for p in mngr.set_aside_paths)
        raise UserError(f"no intact checkpoint left in {mngr.directory} (set aside: {names}); "
                        "running the same command again starts training from step 0")
    return None


def restore_for_training(mngr: CheckpointManager, trainer, step: int
                         ) -> tuple[TrainState, int]:
    """(restore_checkpoint of `step`, `step`), or of the newest intact checkpoint before it
    when `step` cannot be read: a checkpoint that Orbax fails to read (one without a
    manifest, or a disk failing since) is set aside like one that fails verification."""
    while True:
        try:
            return restore_checkpoint(mngr, trainer, step), step
        except DamagedCheckpoint as e:
            mngr.set_aside(step, e.reason)
        except Exception as e:
            if not unreadable(e):
                raise
            mngr.set_aside(step, f"Orbax cannot read it: {first_line(e)}")
        step = resume_step(mngr)
        if step is None:  # resume_step raises once something was set aside
            raise AssertionError("unreachable")
