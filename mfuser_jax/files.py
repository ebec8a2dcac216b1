"""Writing result files so that an interrupted or failed run never leaves half of one.

Every writer of a user-visible file (config.json, eval JSON and PNG, prepared labels,
predictions, exported predictors, mmseg checkpoints) goes through ``atomic_write``: the
data goes to a temporary name next to the target and is renamed onto it once complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from mfuser_jax.errors import UserError


def partial_path(path: str) -> str:
    """``a/b.png`` -> ``a/b.part.png``: same folder (so the rename is atomic) and same
    extension (so writers that choose the format by extension still do)."""
    root, ext = os.path.splitext(path)
    return f"{root}.part{ext}"


@contextlib.contextmanager
def atomic_write(*paths: str | os.PathLike,
                 error: type[Exception] = UserError) -> Iterator[list[str]]:
    """Yields one temporary path per target, to write to. When the block succeeds, each
    is renamed onto its target (all targets appear together, e.g. a mask and its
    overlay); when it raises, nothing is renamed and the temporaries are removed. An
    ``OSError`` (disk full, permissions) becomes ``error("cannot write PATH: reason")``,
    which the command lines print without a traceback."""
    targets = [os.fspath(p) for p in paths]
    tmps = [partial_path(p) for p in targets]
    try:
        for path in targets:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        yield tmps
        for tmp, path in zip(tmps, targets):
            os.replace(tmp, path)
    except OSError as e:
        named = dict(zip(tmps, targets))  # report the target, not its temporary name
        where = named.get(e.filename, e.filename if e.filename in targets else targets[0])
        raise error(f"cannot write {where}: {e.strerror or e}") from None
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def check_writable(path: str | os.PathLike, *, folder: bool = False,
                   hint: str = "") -> str:
    """Creates the folder ``path`` (``folder``) or the folder of the file ``path`` and
    writes a probe file there: a command that would write there after minutes of work
    fails at once instead, with one ``UserError`` line. Returns the folder."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    where = path if folder else os.path.dirname(path)
    try:
        os.makedirs(where, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=where, prefix=".write_probe_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {where}: {e.strerror or e}{hint}") from None
    return where
