"""Suite-wide setup and the fixtures many test files share."""

import copy
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


# XLA's CPU backend compiling fast: LLVM at optimisation level 0 and XLA's classic
# elemental fusion emitters instead of the newer MLIR ones (`--xla_cpu_use_fusion_emitters`).
# The suite's programs are tiny and run a few times each, so compiling them is most of its
# time: the tiny MFuser's loss-and-gradient compiles in 5 s instead of 14 s (12.6 s at level
# 0 alone), and the suite's in-process XLA compile time is 234 s instead of 508 s. The HLO
# passes (fusion, layout, memory analysis) are the same; results agree with XLA's default
# to float32 rounding, not bit for bit (tiny MFuser: loss parts within 3e-7, scores within
# 1.6e-6 of a 1.58 range with the same argmax, gradients within a median 8e-7 of each leaf's
# largest value), and every process of a run uses the same flags, so comparisons between
# them stay exact. Set MFUSER_TEST_XLA_OPT=default to test at XLA's defaults.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def pytest_configure(config):
    # Runs in the xdist controller before the workers start: they and every subprocess a
    # test starts inherit the environment.
    if hasattr(config, "workerinput"):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if (os.environ.get("MFUSER_TEST_XLA_OPT") != "default"
            and "xla_backend_optimization_level" not in flags
            and "xla_cpu_use_fusion_emitters" not in flags):
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


# ---------------------------------------------------------------------- shared fixtures
# Built once per worker at most (session scope; with --dist loadfile a worker runs whole
# files), when a test first asks. What a test may change comes as its own copy: a clone
# of the model, a copy of the config and of the release's dict (whose arrays are shared and
# read-only, so writing into one fails instead of leaking into another test).

_CORPUS = """road sidewalk building wall fence pole traffic light traffic sign vegetation
terrain sky person rider car truck bus train motorcycle bicycle a photo of the street at
night with rain and fog; the car, the bus and the bicycle stop at the red traffic light.
People walk on the sidewalk next to a tall building and green vegetation under a blue sky."""


@pytest.fixture(scope="session")
def spiece(tmp_path_factory):
    """A tiny SentencePiece model laid out as SigLIP's: pad 0, eos 1, unk 2 (its path)."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([_CORPUS.lower()] * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=60,
        hard_vocab_limit=False,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    return str(folder / "spiece.model")


@pytest.fixture(scope="session")
def _tiny_mfusers():
    return {}  # (vlm, tower settings) -> the model as built, only ever cloned


@pytest.fixture
def tiny_mfuser(_tiny_mfusers):
    """tiny_mfuser(vlm="clip", **tower): the MFuser of tests.support.tiny_config(vlm,
    **tower) built with nnx.Rngs(0), as a fresh clone (train mode, its own variables): built
    once per worker and settings, never shared between tests."""
    from flax import nnx

    from mfuser_jax.model.mfuser import MFuser
    from tests.support import tiny_config

    def make(vlm="clip", **tower):
        key = (vlm, tuple(sorted(tower.items())))
        if key not in _tiny_mfusers:
            _tiny_mfusers[key] = MFuser(tiny_config(vlm, **tower), rngs=nnx.Rngs(0))
        return nnx.clone(_tiny_mfusers[key])
    return make


def _read_only(state_dict):
    for value in state_dict.values():
        value.setflags(write=False)
    return state_dict


@pytest.fixture(scope="session")
def _releases():
    return {}  # vlm -> (config, release) as built, only ever copied


def _release(cache, vlm, spiece=None):
    """(config, state dict) of the fake release of ``vlm`` (tests/refs/segmentor.py), built
    once; a copy of the config and of the dict."""
    if vlm not in cache:
        from tests.refs import segmentor
        from tests.support import release_config, small_release_config
        if vlm == "clip":
            config = release_config()
        else:
            config = small_release_config(vlm)
        if vlm == "siglip":
            config.model.siglip.tokenizer = spiece
        build = {"clip": segmentor.clip_state_dict, "eva02": segmentor.eva02_state_dict,
                 "siglip": segmentor.siglip_state_dict}[vlm]
        cache[vlm] = config, _read_only(build(config.model))
    config, release = cache[vlm]
    return copy.deepcopy(config), dict(release)


@pytest.fixture
def clip_release(_releases):
    """(config, release) of MFuser_CLIP at configs/demo.py's sizes (support.release_config)."""
    return _release(_releases, "clip")


@pytest.fixture
def eva02_release(_releases):
    """(config, release) of MFuser_EVA_CLIP at a 4x4 patch grid (small_release_config)."""
    return _release(_releases, "eva02")


@pytest.fixture
def siglip_release(_releases, spiece):
    """(config, release) of MFuser_SIGLIP at a 4x4 patch grid, tokenizer ``spiece``."""
    return _release(_releases, "siglip", spiece)
