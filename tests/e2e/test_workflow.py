"""The research workflow around the model (issue 24): the guards, prediction at the
evaluation protocol, the CLIs' one-line errors, test-time augmentation and the outputs a
segmentation user expects. One toy run (tests/toy.py) serves every test."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.support import REPO, scripts_cli
from tests.toy import fake_eval_iter, fake_train_iter, register_toy, toy_config

register_toy()
from mfuser_jax.run import train as T  # noqa: E402
from mfuser_jax.run import evaluate as E  # noqa: E402
from mfuser_jax.run import restore as R  # noqa: E402
from mfuser_jax.errors import UserError  # noqa: E402


def _run(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(config, workdir) of a 4-step toy run: checkpoints 2 and 4, evaluations at 2 and 4,
    the better one kept in W/best, W/config.json."""
    workdir = str(tmp_path_factory.mktemp("toy_workflow"))
    config = toy_config(total_steps=4, checkpoint_every=2, eval_every=2, save_best="miou")
    T.train_and_evaluate(config, workdir, train_iter_fn=fake_train_iter,
                         eval_iter_fn=fake_eval_iter, log=lambda s: None)
    return config, workdir


def _folder_eval(config, scale):
    """The config with a folder dataset of test scale `scale` as its first target."""
    import ml_collections
    c = config.copy_and_resolve_references()
    c.data.eval = ("folder",)
    c.data.folder = ml_collections.ConfigDict(dict(root="", test_scale=scale))
    return c


def test_predict_resizes_to_the_evaluation_scale_and_back(toy, tmp_path):
    """Photos were segmented at their own size, not at the protocol's test scale."""
    from PIL import Image

    from mfuser_jax.run import predict as P
    from mfuser_jax.data.transforms import test_resize
    from mfuser_jax.run.evaluate import ImageEvaluator
    config, workdir = toy
    c = _folder_eval(config, (40, 20))
    assert P.parse_scale(c) == (40, 20)
    assert P.parse_scale(c, "native") is None and P.parse_scale(c, "64x32") == (64, 32)
    assert P.parse_scale(config) is None  # the toy's synthetic target: own size
    with pytest.raises(UserError, match="--scale='big': give W,H"):
        P.parse_scale(c, "big")
    image = np.random.default_rng(3).integers(0, 256, (30, 60, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    assert P.predict(c, workdir, [str(tmp_path / "a.png")], str(tmp_path / "out"), None,
                     None, 0.5) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "a_png_mask.png"))
    pal = P.palette_for(["red", "green", "blue"], ["red", "green", "blue"])
    classes = np.argmax((mask[..., None, :] == pal).all(-1), -1)
    # the evaluator, given the 40x20 test-resized image and this map as the label, agrees
    # on every pixel: the same resize, window, resize back and argmax
    model, _ = R.restore_model(config, workdir)
    small = test_resize(image, (40, 20))
    assert small.shape == (20, 40, 3)
    cm = np.asarray(ImageEvaluator(model, num_classes=3, crop=16, stride=11, crop_batch=8)(
        small[None], classes[None]))
    assert cm.sum() == 30 * 60 and np.trace(cm) == cm.sum(), cm
    # at the native size the map differs (the toy sees other pixels)
    native = P.Segmenter(model, c, test_scale=P.parse_scale(c, "native"))(image)
    assert native.shape == (30, 60) and (native != classes).any()


def test_workdir_guard_compares_image_size(tmp_path):
    """A 128 px workdir evaluated with a 64 px config ran silently (mIoU 3.6)."""
    from configs import demo
    from mfuser_jax.workdir import check_workdir_model, write_config
    (tmp_path / "checkpoints" / "600").mkdir(parents=True)
    write_config(str(tmp_path), demo.get_config())  # 128 px
    smaller = demo.get_config()
    smaller.model.image_size = 64
    with pytest.raises(UserError, match=r"model.image_size=128 there, 64 here"):
        check_workdir_model(smaller, str(tmp_path))
    check_workdir_model(demo.get_config(), str(tmp_path))  # the same size passes


def test_train_without_workdir_is_one_line():
    """It printed the whole --help and exited 1 (eval/predict: one line, exit 2)."""
    out = _run("scripts/train.py", "--config", "configs/demo.py")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == "error: --workdir is required (except with --compile_only)"


def test_relative_config_found_from_another_folder(tmp_path):
    """`--config configs/demo.py` from another folder: the repository's configs/."""
    out = _run(os.path.join(REPO, "scripts", "eval.py"), "--config", "configs/demo.py",
               "--config.totl_steps=1", "--workdir", str(tmp_path), cwd=str(tmp_path))
    assert out.returncode == 2 and "did you mean config.total_steps" in out.stderr, out.stderr
    out = _run(os.path.join(REPO, "scripts", "eval.py"), "--config=configs/nope.py:vlm=clip",
               "--workdir", str(tmp_path), cwd=str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: config file not found: configs/nope.py (looked in "
                                  f"{tmp_path} and {REPO})")


def test_scripts_help_keeps_the_examples_line_breaks():
    """A lone backslash at a docstring line's end joined the example lines in --help."""
    import ast
    import re
    for name in sorted(os.listdir(os.path.join(REPO, "scripts"))):
        if name.endswith(".py"):
            with open(os.path.join(REPO, "scripts", name)) as f:
                doc = ast.get_docstring(ast.parse(f.read()), clean=False) or ""
            assert not re.search(r"\S {5,}--", doc), name  # "...pth         --clip ..."
    out = _run("scripts/convert_weights.py", "--help")
    assert "\n        --clip ViT-L-14-336px.pt --out pretrained/mfuser_clip_l\n" in out.stdout


def test_gitignore_covers_data_and_pretrained():
    lines = open(os.path.join(REPO, ".gitignore")).read().split()
    assert "/data/" in lines and "/pretrained/" in lines


def test_package_warnings_are_plain_lines(capsys):
    """Rare-class warnings printed as absl records (time, thread, file:line)."""
    import logging
    _cli = scripts_cli()
    from mfuser_jax.data.rcs import RareClassSampler
    handler = _cli.plain_package_warnings()
    try:
        assert _cli.plain_package_warnings() is handler  # installed once
        stats = [{0: 5000, 1: 10}, {0: 4000, 2: 20}]
        RareClassSampler(stats, min_pixels=3000)
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["warning: rare-class sampling: no image has more than 3000 pixels of "
                       "classes [1, 2]; they are not sampled"]
    finally:
        logger = logging.getLogger("mfuser_jax")
        logger.removeHandler(handler)
        logger.propagate = True


def test_one_acdc_condition_prints_one_table(tmp_path):
    """acdc with one condition printed the same table twice (the group, then the whole)."""
    from mfuser_jax.run import evaluate as E
    from mfuser_jax.data.fake import write_fake_tree
    from tests.support import PaletteModel, acdc_config
    write_fake_tree(str(tmp_path), "acdc", n=1, size=(24, 40), seed=5)
    c = acdc_config(tmp_path)
    c.data.eval = ("acdc:val:night",)
    lines = []
    E.evaluate_model(PaletteModel(np.arange(19)), c, step=1, workdir=str(tmp_path / "w"),
                     log=lines.append)
    assert sum("per-class IoU" in x for x in lines) == 1, lines
    report = json.load(open(tmp_path / "w/eval/acdc_val_night_step1.json"))
    assert set(report["groups"]) == {"night"}


UNWRITABLE = "/sys"  # refuses new files even to root (chmod does not stop root)


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"),
                    reason="needs Linux sysfs as an unwritable folder")
def test_export_into_an_unwritable_folder_is_one_line_before_any_work(tmp_path):
    """torch.save's failure came as a raw traceback, after the restore. The workdir here
    does not exist: reaching the restore would fail with 'no checkpoints' instead."""
    from configs import demo
    from mfuser_jax.run import export
    config, none = demo.get_config(), str(tmp_path / "none")
    with pytest.raises(UserError, match=f"^cannot write to {UNWRITABLE}: Permission denied$"):
        export.export_pth(config, none, f"{UNWRITABLE}/m.pth")
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(UserError, match=f"^cannot write to {blocked}"):
        export.export_stablehlo(config, none, f"{blocked}/m.npz")


def test_predict_checks_out_and_inputs_before_the_restore(tmp_path, capsys):
    """--out and the inputs were checked only after the restore and the first image; with
    no readable image the report named a folder never created. The workdir here does
    not exist: reaching the restore would fail with 'no checkpoints'."""
    from PIL import Image

    from mfuser_jax.run import predict as P
    config = toy_config()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_text("not an image")
    none = str(tmp_path / "no_workdir")
    if os.path.isdir("/sys/kernel"):
        with pytest.raises(UserError, match=r"^cannot write to /sys/preds: .* \(give --out"):
            P.predict(config, none, [str(tmp_path / "ok.png")], "/sys/preds", None, None, 0.5)
    with pytest.raises(UserError, match=r"none of the 1 image\(s\) is a readable image: "):
        P.predict(config, none, [str(tmp_path / "bad.jpg")], str(tmp_path / "o1"), None,
                  None, 0.5)
    with pytest.raises(UserError, match="no checkpoints in"):
        P.predict(config, none, [str(tmp_path)], str(tmp_path / "o2"), None, None, 0.5)
    err = capsys.readouterr().err  # the bad file is named before the restore
    assert f"skipped {tmp_path / 'bad.jpg'}: not a readable image" in err
    assert os.path.isdir(tmp_path / "o2")


def test_class_list_mistakes_and_distinct_generated_colours(tmp_path):
    """'road,,road' silently became fewer classes; generated colours came within 27 (RGB
    distance) of Cityscapes' sidewalk."""
    from PIL import Image

    from mfuser_jax.run import predict as P
    from mfuser_jax.data.labels import CLASSES
    assert P.parse_class_names(" road , car ") == ["road", "car"]
    assert P.parse_class_names("") is None and P.parse_class_names(None) is None
    with pytest.raises(UserError, match=r"--classes='road,,road': entry 2 is empty"):
        P.parse_class_names("road,,road")
    with pytest.raises(UserError, match=r"--classes='road,car,road': 'road' is given twice"):
        P.parse_class_names("road,car,road")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="is given twice"):  # before any restore
        P.predict(toy_config(), str(tmp_path / "none"), [str(tmp_path / "a.png")],
                  str(tmp_path / "o"), "road,road", None, 0.5)
    names = list(CLASSES) + [f"thing {i}" for i in range(12)]
    pal = P.palette_for(names, list(CLASSES)).astype(float)
    assert (pal[:19] == np.asarray(P.palette_for(CLASSES, CLASSES))).all()  # kept
    dist = np.sqrt(((pal[:, None] - pal[None]) ** 2).sum(-1)) + 1e9 * np.eye(len(pal))
    assert dist[19:].min() > 50, dist[19:].min()


@pytest.fixture
def without_suite_cache():
    """A process with no compile cache of its own yet (the suite's shared one, set in
    tests/conftest.py, would otherwise stand in for it)."""
    import jax
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_eval_of_a_read_only_workdir_fails_first_or_writes_to_out(toy, tmp_path, capsys,
                                                                  without_suite_cache):
    """Eval of a read-only workdir ran to the end, then could not write its JSON (after a
    compilation-cache warning). An unwritable W/eval and W/compile_cache are played by
    files in their place (chmod does not stop root)."""
    import shutil
    config, workdir = toy
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "eval")
    (copy / "eval").write_text("")
    (copy / "compile_cache").write_text("")
    c = config.copy_and_resolve_references()
    c.compile_cache = "workdir"
    used = []

    def eval_iter(*a, **kw):
        used.append(1)
        return fake_eval_iter(*a, **kw)

    with pytest.raises(UserError, match=r"cannot write to .*/w/eval: .*give scripts/eval.py "
                                        r"--out DIR\)"):
        E.evaluate_checkpoint(c, str(copy), eval_iter_fn=eval_iter)
    assert not used  # before any image
    res = E.evaluate_checkpoint(c, str(copy), eval_iter_fn=eval_iter,
                                out=str(tmp_path / "results"))
    assert used
    got = json.load(open(tmp_path / "results" / "synthetic_toy_step4.json"))
    assert got["miou"] == pytest.approx(res["synthetic_toy"])
    assert (tmp_path / "results" / "synthetic_toy_step4.png").exists()
    assert "compiling without the persistent cache" in capsys.readouterr().out


def test_raising_total_steps_needs_new_schedule(toy, tmp_path):
    """Raising total_steps on a finished run silently restarted the lr schedule."""
    import shutil

    from mfuser_jax.optim import lr_schedule
    config, workdir = toy
    copy = str(tmp_path / "w")
    shutil.copytree(workdir, copy)
    longer = toy_config(total_steps=6, checkpoint_every=2, eval_every=100, **{"data.eval": ()})
    with pytest.raises(UserError, match=r"trained with total_steps=4 \(checkpoint at step 4\)"
                                        r".* pass --config.total_steps=4 to resume the run as "
                                        r"it was, or --new_schedule"):
        T.train_and_evaluate(longer, copy, train_iter_fn=fake_train_iter)
    logged = []
    T.train_and_evaluate(longer, copy, train_iter_fn=fake_train_iter, new_schedule=True,
                         log=logged.append)
    assert any(x.startswith("note: ") and "--new_schedule" in x for x in logged)
    lines = [json.loads(x) for x in open(os.path.join(copy, "metrics.jsonl"))]
    step5 = [x for x in lines if x.get("step") == 5 and "lr" in x][0]
    assert step5["lr"] == pytest.approx(float(lr_schedule(longer.optim, 6)(4)))
    # the same total resumes (and a finished run stays finished) without the flag
    T.train_and_evaluate(longer, copy, train_iter_fn=fake_train_iter)


def test_eval_and_predict_without_config_read_the_workdirs(toy, tmp_path):
    """eval/predict needed --config even though W/config.json records it."""
    from mfuser_jax.workdir import config_from_workdir
    config, workdir = toy
    loaded = config_from_workdir(workdir)
    assert loaded.to_dict() == config.to_dict()  # tuples stay tuples
    assert R.restore_model(loaded, workdir)[1] == 4
    out = _run("scripts/eval.py", "--workdir", str(tmp_path))
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: no readable {tmp_path}/config.json (training and the release converter "
        "write it): give the config with --config")


# cityscapesScripts' labels.py: trainId -> id of the 19 evaluated classes
CITYSCAPES_TRAINID_TO_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31,
                            32, 33)


def test_predict_outputs_legend_recursive_tif(toy, tmp_path):
    """Label-id and trainId PNGs, a legend, city sub-folders and .tif inputs."""
    from PIL import Image

    from mfuser_jax.run import predict as P
    from mfuser_jax.data.labels import CLASSES
    config, workdir = toy
    ids = P.label_ids_for(CLASSES, config)  # the Cityscapes server's ids
    assert ids.tolist() == list(CITYSCAPES_TRAINID_TO_ID)
    with pytest.raises(UserError, match="--outputs labelid needs the 19 Cityscapes classes"):
        P.label_ids_for(["red", "green", "blue"], config)
    with pytest.raises(UserError, match="--outputs=mask,jpeg: choose from"):
        P.check_outputs(["mask", "jpeg"])
    rng = np.random.default_rng(4)
    src = tmp_path / "leftImg8bit"
    for rel, shape in {"aachen/a.png": (18, 24), "bremen/b.tif": (20, 20)}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*shape, 3), np.uint8)).save(src / rel)
    with pytest.raises(UserError, match=r"found in .*leftImg8bit \(sub-folders are searched "
                                        r"with --recursive\)"):
        P.list_images([str(src)])
    c = config.copy_and_resolve_references()  # a class list's own label ids
    c.data.folder = {"label_ids": (10, 20, 30)}
    out = tmp_path / "out"
    assert P.predict(c, workdir, [str(src)], str(out), None, None, 0.5,
                     outputs=["trainid", "labelid", "mask"], recursive=True) == 0
    for rel, shape in (("aachen/a_png", (18, 24)), ("bremen/b_tif", (20, 20))):
        train_ids = np.asarray(Image.open(out / f"{rel}_trainIds.png"))
        label = np.asarray(Image.open(out / f"{rel}_labelIds.png"))
        mask = np.asarray(Image.open(out / f"{rel}_mask.png"))
        assert train_ids.shape == label.shape == shape and train_ids.max() < 3
        np.testing.assert_array_equal(label, np.asarray([10, 20, 30])[train_ids])
        np.testing.assert_array_equal(mask, P.palette_for(["red", "green", "blue"],
                                                          ["red", "green", "blue"])[train_ids])
        assert not (out / f"{rel}_overlay.jpg").exists()
    pal = P.palette_for(["red", "green", "blue"], ["red", "green", "blue"])
    legend = (out / "legend.txt").read_text().splitlines()
    assert legend == [f"{i} #{''.join(f'{v:02x}' for v in pal[i])} {10 * (i + 1)} {n}"
                      for i, n in enumerate(["red", "green", "blue"])]
    img = np.asarray(Image.open(out / "legend.png").convert("RGB"))
    assert [tuple(img[6 + 22 * i + 5, 12]) for i in range(3)] == [tuple(p) for p in pal]


def _folder_dataset(root, shapes, seed=0):
    """D/images/val/<i>.png and D/labels/val/<i>.png with label ids 1..3 (0 ignored)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for i, (h, w) in enumerate(shapes):
        for sub in ("images", "labels"):
            (root / sub / "val").mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (h, w, 3), np.uint8)
        label = rng.integers(0, 4, (h, w), np.uint8)
        Image.fromarray(image).save(root / "images" / "val" / f"{i}.png")
        Image.fromarray(label).save(root / "labels" / "val" / f"{i}.png")
        out.append((image, np.where(label == 0, 255, label.astype(np.int64) - 1)))
    return out


def _numpy_aug_test(model, image, label_hw, scale, ratios, flip):
    """mmseg 0.x aug_test restated: for each ratio r, Resize(keep_ratio) of the original
    to (int(w_s * r), int(h_s * r)); each also mirrored; slide inference; logits resized
    bilinearly to the label size; softmax; mirrored back; mean; argmax."""
    from mfuser_jax.data.transforms import test_resize
    from mfuser_jax.run.evaluate import SlidingWindowPredictor
    from mfuser_jax.ops.resize import resize_matrix
    predictor = SlidingWindowPredictor(model, crop=16, stride=11, crop_batch=8)
    total, n = 0.0, 0
    for r in ratios:
        img = test_resize(image, (int(scale[0] * r), int(scale[1] * r)))
        for f in (False, True) if flip else (False,):
            s = predictor(np.ascontiguousarray(img[:, ::-1] if f else img)).astype(np.float64)
            rh = resize_matrix(s.shape[0], label_hw[0])
            rw = resize_matrix(s.shape[1], label_hw[1])
            s = np.einsum("Hh,hwk,Ww->HWk", rh, s, rw)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            total, n = total + (p[:, ::-1] if f else p), n + 1
    return np.argmax(total / n, -1)


def test_eval_tta_accuracies_summary_and_show_dir(toy, tmp_path):
    """Flip and multi-scale test-time augmentation against a numpy restatement of mmseg's
    aug_test; aAcc and mAcc beside mIoU; one closing summary table; --show_dir."""
    from PIL import Image

    from configs.base import data_config
    from mfuser_jax.run import evaluate as E
    from mfuser_jax.data.custom import default_palette
    from mfuser_jax.run.report import accuracy_from_confusion, iou_from_confusion
    config, workdir = toy
    data = _folder_dataset(tmp_path / "D", [(30, 60), (36, 50)])
    c = config.copy_and_resolve_references()
    c.data = data_config("synthetic", ("folder", "folder:val"))
    c.data.folder.update(dict(root=str(tmp_path / "D"), label_ids=(1, 2, 3), ignore_index=0,
                              test_scale=(40, 20)))
    c.evaluation.flip = True
    c.evaluation.ratios = (0.5, 1.0, 1.5)
    model, step = R.restore_model(config, workdir)
    lines = []
    res = E.evaluate_model(model, c, step=step, workdir=str(tmp_path / "w"), log=lines.append,
                           show_dir=str(tmp_path / "show"))
    cm = np.zeros((3, 3), np.int64)
    palette = default_palette(["red", "green", "blue"])
    for i, (image, label) in enumerate(data):
        pred = _numpy_aug_test(model, image, label.shape, (40, 20), (0.5, 1.0, 1.5), True)
        valid = label != 255
        np.add.at(cm, (label[valid], pred[valid]), 1)
        shown = np.asarray(Image.open(tmp_path / "show" / "folder" / "images" / "val" /
                                      f"{i}.png"))
        np.testing.assert_array_equal(shown, palette[pred])
    iou, miou = iou_from_confusion(cm)
    aacc, acc, macc = accuracy_from_confusion(cm)
    got = json.load(open(tmp_path / "w" / "eval" / f"folder_step{step}.json"))
    assert got["miou"] == pytest.approx(miou) == pytest.approx(res["folder"])
    assert got["aacc"] == pytest.approx(100 * np.trace(cm) / cm.sum())
    assert got["aacc"] == pytest.approx(aacc) and got["macc"] == pytest.approx(macc)
    assert list(got["per_class_acc"].values()) == pytest.approx(
        list(100 * np.diag(cm) / cm.sum(1)))
    # without augmentation the same images give another result
    c.evaluation.flip, c.evaluation.ratios = False, ()
    plain = E.evaluate_model(model, c, step=step, workdir=None, datasets=["folder"],
                             log=lambda s: None)
    assert plain["folder"] != pytest.approx(res["folder"])
    table = next(x for x in lines if x.startswith(f"folder @ step {step}"))
    assert "IoU     Acc" in table and "aAcc" in table.splitlines()[-1]
    summary = lines[-1].splitlines()
    assert summary[0] == f"summary @ step {step} (%)"
    assert [x.split()[0] for x in summary[2:]] == ["folder", "folder:val", "average"]
    assert summary[2].split()[1:] == [f"{miou:.2f}", f"{macc:.2f}", f"{aacc:.2f}"]


def test_save_best_keeps_the_best_evaluation_beside_the_last(toy):
    """Training kept only the last checkpoints, not the best by a chosen metric."""
    config, workdir = toy
    evals = {step: json.load(open(os.path.join(workdir, "eval",
                                               f"synthetic_toy_step{step}.json")))["miou"]
             for step in (2, 4)}
    best_step = max(evals, key=evals.get)
    info = json.load(open(os.path.join(workdir, "best", "best.json")))
    assert info == {"metric": "miou:synthetic_toy", "value": pytest.approx(evals[best_step]),
                    "step": best_step}
    assert sorted(os.listdir(os.path.join(workdir, "best", "checkpoints"))) == [str(best_step)]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    # W/best is a workdir: evaluating it gives the recorded value
    res = E.evaluate_checkpoint(config, os.path.join(workdir, "best"),
                                eval_iter_fn=fake_eval_iter, log=lambda s: None)
    assert res["synthetic_toy"] == pytest.approx(evals[best_step])
    for spec, needle in (("iou", "the metric is one of miou, macc, aacc"),
                         ("miou:cityscapes", "'cityscapes' is not evaluated")):
        with pytest.raises(UserError, match=needle):
            T.parse_save_best(toy_config(save_best=spec), ["synthetic_toy"])
    assert T.parse_save_best(toy_config(save_best="aacc:average"), ["a"]) == ("aacc",
                                                                              "average")


def test_python_inference_api(toy, tmp_path):
    """Restore a workdir and segment an array, as the README's example does."""
    from PIL import Image

    from mfuser_jax.run import predict as P
    from mfuser_jax.run.predict import Segmenter
    _, workdir = toy
    image = np.random.default_rng(5).integers(0, 256, (21, 30, 3), np.uint8)
    seg = Segmenter.from_workdir(workdir)  # W/config.json, the latest step
    assert seg.step == 4 and seg.class_names == ["red", "green", "blue"]
    labels = seg(image)
    assert labels.shape == (21, 30) and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, seg.scores(image).argmax(-1))
    # the same map as scripts/predict.py's mask
    Image.fromarray(image).save(tmp_path / "a.png")
    config = toy_config(total_steps=4, checkpoint_every=2, eval_every=2, save_best="miou")
    P.predict(config, workdir, [str(tmp_path / "a.png")], str(tmp_path / "o"), None, None, 0.5)
    mask = np.asarray(Image.open(tmp_path / "o" / "a_png_mask.png"))
    np.testing.assert_array_equal(seg.colorize(labels), mask)
    two = Segmenter.from_workdir(workdir, step=2, classes=["blue", "red"], scale="native")
    assert two.step == 2 and two(image).max() <= 1
    with pytest.raises(UserError, match="expected a uint8 \\(h, w, 3\\) RGB image"):
        seg(image.astype(np.float32))
