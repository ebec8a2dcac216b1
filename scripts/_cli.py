"""Shared CLI plumbing: repo on sys.path, user errors as one short message."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def user_error_types() -> tuple[type, ...]:
    from mfuser_jax.train import UserError
    types: list[type] = [UserError, FileNotFoundError, NotImplementedError]
    try:
        from mfuser_jax.convert import WeightFileError
        types.append(WeightFileError)
    except ImportError:
        pass
    try:
        from mfuser_jax.data.imageio import DataFileError
        types.append(DataFileError)
    except ImportError:
        pass
    return tuple(types)


def quiet_logging():
    """Library INFO logs (Orbax, XLA backends) drown the progress lines: show warnings and
    up unless the user asked for a --verbosity."""
    from absl import flags, logging
    if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run_main(fn, *args, **kwargs):
    """Runs fn; user errors end in 'error: <message>' on stderr and exit status 2."""
    quiet_logging()
    from mfuser_jax.train import Preempted, TrainingDiverged
    try:
        return fn(*args, **kwargs)
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(143)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except user_error_types() as e:
        msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else \
            f"file not found: {e.filename}"
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)


def run_app(main):
    """absl's app.run, with config-file errors (raised while parsing --config) kept short."""
    from absl import app

    from configs.base import ConfigError
    try:
        app.run(main)
    except (ConfigError, ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
