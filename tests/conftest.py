"""Suite-wide setup."""

import signal

import pytest


@pytest.fixture(autouse=True, scope="session")
def sigint_not_ignored():
    """A suite started in the background (`cmd &`, nohup) inherits SIGINT ignored, and
    training rightly leaves an ignored Ctrl-C alone. The Ctrl-C tests need it delivered:
    Python's own handler here, and (exec resets caught signals) the default in the
    subprocesses they start."""
    before = signal.getsignal(signal.SIGINT)
    if before == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
