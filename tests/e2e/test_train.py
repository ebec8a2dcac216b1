"""Training loop on the toy model: loss goes down, workdir files, resume-at-end, frozen
params untouched, scripts/eval.py's path reproduces the in-training evaluation, schedule
and optimizer rules."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support import REPO
from tests.toy import fake_eval_iter, fake_train_iter, register_toy, toy_config

register_toy()
from mfuser_jax import sharding as shd  # noqa: E402
from mfuser_jax.run import train as T  # noqa: E402
from mfuser_jax.run import evaluate as E  # noqa: E402
from mfuser_jax.run import restore as R  # noqa: E402
from mfuser_jax.optim import lr_schedule, make_optimizer  # noqa: E402
from mfuser_jax.model.factory import create_model  # noqa: E402
from mfuser_jax.trainer import Trainer  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("toy_run"))
    config = toy_config()
    T.train_and_evaluate(config, workdir, train_iter_fn=fake_train_iter,
                         eval_iter_fn=fake_eval_iter)
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return config, workdir, lines


def test_loss_decreases_and_files_written(run):
    config, workdir, lines = run
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == list(range(1, 13))
    assert all({"ce", "reg", "lr"} <= set(x) for x in train)
    first, last = train[0]["loss"], np.mean([x["loss"] for x in train[-3:]])
    assert last < 0.8 * first, (first, last)
    evals = [x for x in lines if "miou" in x]
    assert [(x["step"], x["dataset"]) for x in evals] == [(6, "synthetic_toy"),
                                                          (12, "synthetic_toy")]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "4", "8"]
    report = json.load(open(os.path.join(workdir, "eval", "synthetic_toy_step12.json")))
    assert set(report) == {"step", "dataset", "miou", "per_class", "aacc", "macc",
                           "per_class_acc"}
    assert report["miou"] == pytest.approx(evals[-1]["miou"])
    assert set(report["per_class"]) == {"red", "green", "blue"}
    assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 12
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def test_finished_run_exits_at_once(run):
    config, workdir, lines = run
    out = T.train_and_evaluate(config, workdir, train_iter_fn=None, eval_iter_fn=None)
    assert out == {"step": 12}
    assert len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == len(lines)


def test_eval_from_checkpoint_reproduces_training_eval(run, tmp_path, capsys):
    from mfuser_jax.data.pipeline import SizedIterator
    config, workdir, lines = run
    want = json.load(open(os.path.join(workdir, "eval", "synthetic_toy_step12.json")))
    os.remove(os.path.join(workdir, "eval", "synthetic_toy_step12.json"))
    sized = lambda *a, **kw: SizedIterator(fake_eval_iter(*a, **kw), 3)  # noqa: E731
    res = E.evaluate_checkpoint(config, workdir, eval_iter_fn=sized)
    got = json.load(open(os.path.join(workdir, "eval", "synthetic_toy_step12.json")))
    assert res == {"synthetic_toy": got["miou"]}
    assert got == want
    progress = capsys.readouterr().err  # a bar per dataset: count of total, images/s
    assert "eval synthetic_toy" in progress and "3/3" in progress
    assert re.search(r"(img/s|s/img)\]", progress)  # tqdm turns the rate round when slow
    # an older checkpoint is a different model
    res4 = E.evaluate_checkpoint(config, workdir, step=4, eval_iter_fn=fake_eval_iter)
    assert res4["synthetic_toy"] != got["miou"]
    with pytest.raises(T.UserError, match="no checkpoint for step 5"):
        E.evaluate_checkpoint(config, workdir, step=5, eval_iter_fn=fake_eval_iter)


def test_frozen_params_untouched_and_trained_changed(run):
    config, workdir, _ = run
    model, step = R.restore_model(config, workdir)
    fresh = create_model(config)
    assert step == 12
    np.testing.assert_array_equal(np.asarray(model.frozen.kernel[...]),
                                  np.asarray(fresh.frozen.kernel[...]))
    assert not np.allclose(np.asarray(model.stem.kernel[...]),
                           np.asarray(fresh.stem.kernel[...]))
    # batch statistics were carried out of the train step
    assert not np.allclose(np.asarray(model.bn.mean[...]), 0.0)


def test_optimizer_state_excludes_frozen(run):
    config, _, _ = run
    trainer = Trainer(config, create_model(config), shd.make_mesh(None))
    paths = {"/".join(map(str, p)) for p, _ in
             jax.tree_util.tree_flatten_with_path(trainer.abstract_tree())[0]}
    assert not any("frozen" in p for p in paths)
    assert any("stem" in p for p in paths)


def test_lr_schedule_matches_mmcv_poly_with_warmup():
    import ml_collections
    optim = ml_collections.ConfigDict(dict(lr=1e-4, min_lr=1e-6, power=0.9,
                                           warmup_steps=1500, warmup_ratio=1e-6))
    sched = lr_schedule(optim, 20000)

    def mmcv(it):  # mmcv PolyLrUpdaterHook + linear warm-up, restated
        regular = (1e-4 - 1e-6) * (1 - it / 20000) ** 0.9 + 1e-6
        if it < 1500:
            k = (1 - it / 1500) * (1 - 1e-6)
            return regular * (1 - k)
        return regular

    for it in (0, 1, 750, 1499, 1500, 10000, 19999, 20000):
        assert float(sched(it)) == pytest.approx(mmcv(it), rel=1e-5, abs=1e-12)


def test_weight_decay_mask_and_lr_mults():
    import ml_collections
    optim = ml_collections.ConfigDict(dict(
        lr=0.1, min_lr=0.1, power=1.0, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.5, lr_mults=(("^head", 0.0), ("slow", 0.5))))
    params = {"head": {"w": jnp.ones(2)}, "body": {"w": jnp.ones(2), "b": jnp.ones(2)},
              "slow": {"w": jnp.ones(2)}}
    mask = {"head": {"w": True}, "body": {"w": True, "b": False}, "slow": {"w": True}}
    tx, _ = make_optimizer(optim, 100, params, mask)
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, tx.init(params), params)
    # zero gradients: only decoupled weight decay moves the params (-lr * wd * p)
    np.testing.assert_allclose(upd["body"]["w"], -0.05)
    np.testing.assert_allclose(upd["body"]["b"], 0.0)     # no decay
    np.testing.assert_allclose(upd["head"]["w"], 0.0)     # lr multiplier 0
    np.testing.assert_allclose(upd["slow"]["w"], -0.025)  # lr multiplier 0.5


def test_predict_writes_masks_and_overlays(run, tmp_path):
    from PIL import Image

    from mfuser_jax.run import predict as predict_lib
    config, workdir, _ = run
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (21, 30, 3), np.uint8)
    Image.fromarray(image).save(folder / "a.png")
    out = tmp_path / "out"
    assert predict_lib.predict(config, workdir, [str(folder)], str(out), None, None,
                               0.5) == 0
    mask = np.asarray(Image.open(out / "a_png_mask.png"))
    assert mask.shape == (21, 30, 3) and (out / "a_png_overlay.jpg").exists()
    pal = predict_lib.palette_for(["red", "green", "blue"], ["red", "green", "blue"])
    # the mask is the palette colour of the argmax of the sliding-window scores
    from mfuser_jax.run.evaluate import SlidingWindowPredictor
    model, _ = R.restore_model(config, workdir)
    scores = SlidingWindowPredictor(model, crop=16, stride=11, crop_batch=8)(image)
    np.testing.assert_array_equal(mask, pal[scores.argmax(-1)])
    # custom classes: two of them, two colours
    out2 = tmp_path / "out2"
    predict_lib.predict(config, workdir, [str(folder / "a.png")], str(out2),
                        "blue,red", None, 0.5)
    mask2 = np.asarray(Image.open(out2 / "a_png_mask.png")).reshape(-1, 3)
    assert len(np.unique(mask2, axis=0)) <= 2
    with pytest.raises(T.UserError, match="no such image"):
        predict_lib.list_images([str(tmp_path / "missing.png")])


def test_predict_cli_keeps_every_input_and_skips_unreadable(run, tmp_path):
    """Two folders, two files, a same-stem pair and a text file named .jpg through
    scripts/predict.py: one mask per readable image, the bad one named, nothing
    overwritten, exit status 1; a progress bar with images/s."""
    import subprocess
    import sys

    from PIL import Image
    _, workdir, _ = run
    rng = np.random.default_rng(1)
    inputs = {"seq1/0001.png": (20, 24), "seq2/0001.png": (18, 26), "seq2/0002.jpg": (20, 20),
              "one.png": (16, 30), "street.png": (22, 22), "street.jpg": (24, 18)}
    for rel, shape in inputs.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*shape, 3), np.uint8)).save(tmp_path / rel)
    (tmp_path / "fake.jpg").write_text("not an image")
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "scripts/predict.py", "--config", "tests/toy_config.py",
         "--workdir", workdir, "--out", str(out), "--images", str(tmp_path / "seq1"),
         str(tmp_path / "seq2"), str(tmp_path / "one.png"), str(tmp_path / "fake.jpg"),
         "--images", str(tmp_path / "street.png"), str(tmp_path / "street.jpg")],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert f"skipped {tmp_path / 'fake.jpg'}: not a readable image" in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: 1 of 7 image(s) could not be read: {tmp_path / 'fake.jpg'}")
    assert re.search(r"predict: 100%.*7/7.*(img/s|s/img)\]", res.stderr)  # the bar
    assert "6 image(s) segmented" in res.stdout
    masks = sorted(str(p.relative_to(out)) for p in out.rglob("*_mask.png"))
    assert masks == ["one_png_mask.png", "seq1/0001_png_mask.png", "seq2/0001_png_mask.png",
                     "seq2/0002_jpg_mask.png", "street_jpg_mask.png", "street_png_mask.png"]
    assert len(list(out.rglob("*_overlay.jpg"))) == 6
    assert not [p for p in out.rglob("*") if "fake" in p.name or ".part" in p.suffixes]
    for rel, shape in inputs.items():  # each output belongs to its own input
        stem = os.path.splitext(rel)[0] + "_" + rel.rsplit(".", 1)[1]
        assert np.asarray(Image.open(out / f"{stem}_mask.png")).shape == (*shape, 3)


def test_workdir_refuses_another_model_before_touching_it(run, tmp_path):
    import shutil
    config, workdir, _ = run
    wider = toy_config(**{"model.width": 16})
    with pytest.raises(T.UserError, match=r"model.width=8 there, 16 here"):
        R.restore_model(wider, workdir)
    copy = str(tmp_path / "w")
    shutil.copytree(workdir, copy)
    before = open(os.path.join(copy, "config.json")).read()
    with pytest.raises(T.UserError, match=r"holds another model than this config builds"):
        T.train_and_evaluate(wider, copy, train_iter_fn=fake_train_iter)
    assert open(os.path.join(copy, "config.json")).read() == before  # record kept
    # without config.json the restore itself fails: one line, not Orbax's tree diff
    os.remove(os.path.join(copy, "config.json"))
    with pytest.raises(T.UserError, match=r"checkpoints/12 does not fit the model") as e:
        R.restore_model(wider, copy)
    assert "\n" not in str(e.value)
