"""Suite-wide setup."""

import os
import shutil
import signal
import tempfile

import pytest

# One persistent JAX compilation cache for the whole run: both xdist workers and every
# subprocess a test starts (they inherit the environment). The suite builds the same tiny
# models and compiles the same steps in many files and processes; a model build alone is
# ~180 small XLA programs (one per initialiser shape). The cache is empty at the start of
# each run (a new temporary folder, removed at the end), so every program is still compiled
# once per run: what a test checks is unchanged, only repeats are loaded. Set
# MFUSER_TEST_COMPILE_CACHE to a folder to keep it between runs, or to "off".
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_owned: list[str] = []  # the folder this process made (a nested pytest run inherits, not owns)


# XLA's CPU backend at LLVM optimisation level 0: the suite's programs are tiny and run a
# few times each, so compiling them is most of its time, and level 0 halves that (a tiny
# MFuser build 27 -> 13 s of CPU, its loss-and-gradient step 34 -> 18 s). The HLO passes
# (fusion, layout, memory analysis) are the same; results agree with the default level to
# float32 rounding, not bit for bit (tiny MFuser: the same loss, scores within 8e-7,
# gradients within 1e-6 of their scale), and every run of the suite uses one level, so
# comparisons between its processes stay exact. Set MFUSER_TEST_XLA_OPT=default to test at
# XLA's default level.
_FAST_COMPILE = "--xla_backend_optimization_level=0"


def pytest_configure(config):
    # Runs in the xdist controller before the workers start: they and every subprocess a
    # test starts inherit the environment.
    if hasattr(config, "workerinput"):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if (os.environ.get("MFUSER_TEST_XLA_OPT") != "default"
            and "xla_backend_optimization_level" not in flags):
        os.environ["XLA_FLAGS"] = f"{flags} {_FAST_COMPILE}".strip()
    if os.environ.get(_CACHE_ENV):
        return
    setting = os.environ.get("MFUSER_TEST_COMPILE_CACHE", "")
    if setting == "off":
        return
    if setting:
        os.makedirs(setting, exist_ok=True)
        path = setting
    else:
        path = tempfile.mkdtemp(prefix="mfuser-test-xla-cache-")
        _owned.append(path)
    os.environ[_CACHE_ENV] = path
    # every program, however quick to compile (the default caches only those over 1 s)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_unconfigure(config):
    while _owned:
        shutil.rmtree(_owned.pop(), ignore_errors=True)


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
