"""scripts/export.py --to stablehlo: the sliding-window predictor serialised with jax.export
and run again in a fresh process that imports jax, numpy and mfuser_jax.run.export alone (no
Flax, no model code), against the live model; the CLI's mistakes. The .pth export (torch)
is tested in tests/e2e/test_export_pth.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mfuser_jax.run import train as T
from mfuser_jax.run import restore as R
from mfuser_jax.run.evaluate import SlidingWindowPredictor
from mfuser_jax.run.export import (
    export_predictor,
    export_stablehlo,
    load_stablehlo,
    save_stablehlo,
)
from tests.support import REPO
from tests.toy import fake_eval_iter, fake_train_iter, register_toy, toy_config

ENV = dict(os.environ, JAX_PLATFORMS="cpu")

# Loads an export and runs it on an image: argv = export, image .npy, output .npy.
FRESH = """
import sys
import numpy as np
from mfuser_jax.run.export import load_stablehlo
predictor = load_stablehlo(sys.argv[1])
np.save(sys.argv[3], predictor(np.load(sys.argv[2])))
assert not [m for m in sys.modules if m.split(".")[0] == "flax" or m.startswith(
    "mfuser_jax.") and m not in ("mfuser_jax.run", "mfuser_jax.run.export")], (
    "the loader imported model code")
print(",".join(predictor.class_names))
"""


def _run_fresh(export, image, tmp_path, wait=True):
    np.save(tmp_path / "image.npy", image)
    proc = subprocess.Popen(
        [sys.executable, "-c", FRESH, str(export), str(tmp_path / "image.npy"),
         str(tmp_path / "scores.npy")], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    return _result(proc, tmp_path) if wait else proc


def _result(proc, tmp_path):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return np.load(tmp_path / "scores.npy"), out.strip().split(",")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    register_toy()
    workdir = str(tmp_path_factory.mktemp("toy_export"))
    config = toy_config(total_steps=2, checkpoint_every=2, eval_every=100)
    T.train_and_evaluate(config, workdir, train_iter_fn=fake_train_iter,
                         eval_iter_fn=fake_eval_iter)
    return config, workdir


def test_cli_export_runs_in_a_fresh_process_like_the_live_model(toy_run, tmp_path):
    config, workdir = toy_run
    out = tmp_path / "toy.npz"
    res = subprocess.run(
        [sys.executable, "scripts/export.py", "--config", "tests/toy_config.py", "--workdir",
         workdir, "--to", "stablehlo", "--out", str(out), "--height", "21", "--width", "30"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "for 21x30 images (cpu) written to" in res.stdout
    image = np.random.default_rng(0).integers(0, 256, (21, 30, 3), np.uint8)
    scores, names = _run_fresh(out, image, tmp_path)
    model, _ = R.restore_model(config, workdir)
    live = SlidingWindowPredictor(model, crop=16, stride=11, crop_batch=8)(image)
    assert scores.shape == (21, 30, 3) and names == ["red", "green", "blue"]
    np.testing.assert_allclose(scores, live, rtol=0, atol=1e-5)


def test_classes_and_the_fixed_size(toy_run, tmp_path):
    config, workdir = toy_run
    info = export_stablehlo(config, workdir, str(tmp_path / "p.npz"), classes="blue, red")
    assert info["input"] == [16, 16, 3] and info["output"] == [16, 16, 2]  # one crop
    predictor = load_stablehlo(str(tmp_path / "p.npz"))
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)
    model, _ = R.restore_model(config, workdir)
    live = SlidingWindowPredictor(model, crop=16, stride=11, crop_batch=8,
                                  class_names=["blue", "red"])
    assert predictor.class_names == ["blue", "red"] and predictor.meta["step"] == 2
    np.testing.assert_allclose(predictor(image), live(image), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"exported for one uint8 image of shape \(16, 16, 3\)"):
        predictor(np.zeros((16, 17, 3), np.uint8))


def _random_mfuser(config):
    """A tiny MFuser with random weights, built from shapes (no compiled initialiser)."""
    from mfuser_jax.model.mfuser import MFuser

    model = nnx.eval_shape(lambda: MFuser(config.model, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)

    def fill(path, x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), x.shape) if x.shape else jax.random.key(0)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros(x.shape, x.dtype)
        if path[-1] in ("var", "scale"):  # BatchNorm variances and norm scales: positive
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        return jnp.asarray(0.05 * rng.normal(size=x.shape), x.dtype)

    nnx.update(model, nnx.map_state(lambda p, v: v.replace(fill(p, v.get_value())),
                                    nnx.state(model, nnx.Variable)))
    model.texts = model._tokenize(list(model.class_names))
    return model


@pytest.fixture(scope="module")
def mfuser():
    from configs import demo

    config = demo.get_config()
    config.model.image_size = 4 * config.model.patch_size  # a 4x4 patch grid: fast
    config.model.mvfuser.scan_backend = "reference"
    return config, _random_mfuser(config)


def _export_mfuser(config, model, path):
    crop = config.model.image_size
    exported, weights = export_predictor(model, crop, crop + crop // 2, crop=crop,
                                         stride=crop // 2, crop_batch=2)
    save_stablehlo(str(path), exported, weights, {"class_names": list(config.model.class_names)})
    return exported, weights


def test_mfuser_export_takes_its_weights_as_arguments(mfuser, tmp_path):
    config, model = mfuser
    exported, weights = _export_mfuser(config, model, tmp_path / "m.npz")
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    assert len(weights) == len(jax.tree.leaves(state)) > 200  # not constants: 2 GiB at full size
    predictor = load_stablehlo(str(tmp_path / "m.npz"))  # deserialises; compiles on first call
    crop = config.model.image_size
    assert [a.shape for a in predictor.exported.in_avals] == [
        *(w.shape for w in weights), (crop, crop + crop // 2, 3)]
    assert predictor.exported.out_avals[0].shape == (crop, crop + crop // 2, 19)
    assert predictor.class_names == list(config.model.class_names)


def test_export_holds_no_scan_kernel(mfuser):
    # The scan follows the lowering platform, but jax.export refuses the Pallas kernels'
    # Triton custom calls (no compatibility guarantee), and a module for cpu and cuda at once
    # cannot hold them (each branch is lowered for both; Pallas refuses a CPU): the exported
    # GPU branch is the associative scan, for cuda alone as for both.
    from mfuser_jax.model.mvfuser import MVFuser

    config, model = mfuser
    fusers = [m for _, m in nnx.iter_graph(model) if isinstance(m, MVFuser)]
    crop = config.model.image_size
    export = lambda platforms: export_predictor(  # noqa: E731
        model, crop, crop, crop=crop, stride=crop, crop_batch=1, platforms=platforms)[0]
    try:
        for m in fusers:
            m.scan_backend = "auto"
        both, cuda = export(("cpu", "cuda")), export(("cuda",))
    finally:
        for m in fusers:
            m.scan_backend = config.model.mvfuser.scan_backend
    assert fusers and both.platforms == ("cpu", "cuda") and cuda.platforms == ("cuda",)
    assert "triton" not in both.mlir_module() and "triton" not in cuda.mlir_module()


@pytest.mark.slow  # two compilations of the whole MFuser forward: ~100 s on 2 busy cores
def test_mfuser_export_matches_the_live_model_in_a_fresh_process(mfuser, tmp_path):
    config, model = mfuser
    _export_mfuser(config, model, tmp_path / "m.npz")
    crop = config.model.image_size
    image = np.random.default_rng(0).integers(0, 256, (crop, crop + crop // 2, 3), np.uint8)
    proc = _run_fresh(tmp_path / "m.npz", image, tmp_path, wait=False)  # compiles meanwhile
    live = SlidingWindowPredictor(model, crop=crop, stride=crop // 2, crop_batch=2)(image)
    scores, names = _result(proc, tmp_path)
    assert names == list(config.model.class_names) and np.all(np.isfinite(live))
    assert scores.shape == live.shape == (*image.shape[:2], 19)
    np.testing.assert_allclose(scores, live, rtol=0, atol=1e-5)


def _cli(*args):
    return subprocess.run([sys.executable, "scripts/export.py", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra,needle", [
    (["--to", "pth"], "error: --to pth writes the original MFuser's checkpoint; "
                      "config.model.name='toy' has no PyTorch original"),
    (["--to", "stablehlo", "--reference", "x.pth"], "error: --reference only apply to --to pth"),
    (["--to", "pth", "--height", "9"], "error: --height only apply to --to stablehlo"),
    (["--to", "stablehlo", "--platforms", "cpu,gpu"], "error: unknown platform(s) gpu"),
    (["--to", "onnx"], "error: --to=onnx: value should be one of <pth|stablehlo>"),
])
def test_cli_mistakes(tmp_path, extra, needle):
    res = _cli("--config", "tests/toy_config.py", "--workdir", str(tmp_path / "w"), "--out",
               str(tmp_path / "out"), *extra)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[0].startswith(needle), res.stderr
    assert not os.path.exists(tmp_path / "out")


def test_without_config_the_workdir_must_hold_one(tmp_path):
    (tmp_path / "w").mkdir()
    res = _cli("--workdir", str(tmp_path / "w"), "--to", "stablehlo", "--out",
               str(tmp_path / "out"))
    assert res.returncode == 2, (res.stdout, res.stderr)
    first = res.stderr.strip().splitlines()[0]
    assert first.startswith("error: no readable ") and first.endswith(
        "config.json (training and the release converter write it): give the config with "
        "--config"), res.stderr
    assert "Traceback" not in res.stderr and not os.path.exists(tmp_path / "out")


def test_a_file_of_another_kind_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", meta=np.array(json.dumps({"format": "other"})))
    with pytest.raises(ValueError, match="not a predictor written by export_stablehlo"):
        load_stablehlo(str(tmp_path / "x.npz"))
