"""The errors the command lines turn into exit codes (scripts/_cli.py): one module that
everything may import, so that no module needs train.py for them."""

import signal


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
