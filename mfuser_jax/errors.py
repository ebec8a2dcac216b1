"""Every error the package raises for the user, in one module that everything may import.

The command lines (scripts/_cli.py) map them by base class: a ``UserError`` is a mistake
the user can fix (paths, weights, config values, data) and ends in its message alone, exit
status 2; ``TrainingDiverged`` exits 3; ``Preempted`` exits 128 + the signal. The specific
classes also keep the builtin base their callers catch (a weight file that does not fit is
a ValueError too, a missing dataset folder a FileNotFoundError).
"""

import signal

__all__ = ["CheckpointSaveError", "ClassFileError", "ConfigError", "DamagedCheckpoint", "DataFileError",
           "DatasetLayoutError", "Preempted", "PrepareError", "StateDictMismatchError",
           "TrainingDiverged", "UserError", "WeightFileError"]


class UserError(Exception):
    """A mistake the user can fix (paths, weights, config values): the CLIs print the
    message alone, without a traceback, and exit non-zero."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: training stops, the last good checkpoint stays."""


class Preempted(Exception):
    """SIGTERM or Ctrl-C arrived; a checkpoint of the current step was written. The CLIs
    exit with 128 + signum (143, 130), as a process killed by that signal would."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)


class ConfigError(UserError):
    """A bad config argument (configs/*.py). Not a ValueError on purpose: ml_collections
    re-raises those from config files with a traceback appended; the CLIs print this as
    one line."""


# ----------------------------------------------------------------------------- weights

class WeightFileError(UserError, ValueError):
    """A weight file is missing, unreadable, or not the model the caller expected."""


class StateDictMismatchError(UserError, ValueError):
    """The state dict does not fit the module; the message lists every problem at once."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), module_name="module"):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)  # (key, expected_shape, got_shape)
        lines = [f"state dict does not fit {module_name}:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}):")
            lines += [f"    {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}):")
            lines += [f"    {k}" for k in self.unexpected]
        if self.mismatched:
            lines.append(f"  mis-shaped keys ({len(self.mismatched)}):")
            lines += [
                f"    {k}: expected {tuple(e)} (PyTorch layout), got {tuple(g)}"
                for k, e, g in self.mismatched
            ]
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- data

class DatasetLayoutError(UserError, FileNotFoundError):
    """A dataset folder or file is missing; the message names it and the layout."""

    def __str__(self):  # FileNotFoundError's default str adds errno noise
        return self.args[0] if self.args else ""


class ClassFileError(UserError, ValueError):
    """A malformed class list file; the message names the file and line."""


class DataFileError(UserError, ValueError):
    """A corrupt or unreadable image/label file; the message names the file."""


class PrepareError(UserError):
    """Dataset preparation cannot go on (scripts/prepare_data.py); the message says why."""


# ----------------------------------------------------------------------------- checkpoints

class DamagedCheckpoint(UserError):
    """A checkpoint whose files differ from those its manifest lists: never restored."""

    def __init__(self, path: str, step: int, reason: str):
        super().__init__(f"checkpoint {path} is damaged ({reason})")
        self.path, self.step, self.reason = path, step, reason


class CheckpointSaveError(UserError):
    """A save that failed writing (a full disk): the checkpoints before it are kept."""
