"""Your own dataset and classes: the class list file (and its errors), the folder layout,
prepare_data.py's statistics, the model sized from the list, and train -> eval ->
predict end to end on a generated 5-class folder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mfuser_jax.data import custom as C
from mfuser_jax.data.sources import DatasetLayoutError
from mfuser_jax.data.synthetic import FOLDER_CLASSES, write_folder_dataset
from tests.support import REPO


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_class_file_names_ids_colours_and_ignore(tmp_path):
    path = _write(tmp_path / "classes.txt", "# my classes\n\nignore 0\n"
                  "7 traffic light #0a0B0c\n3 pony 1,2,3  # a comment\n  9 sky\n5 blue whale #\n")
    cl = C.read_class_file(path)
    assert cl.names == ("traffic light", "pony", "sky", "blue whale")
    assert cl.label_ids == (7, 3, 9, 5) and cl.ignore_index == 0
    assert cl.palette[:2] == ((10, 11, 12), (1, 2, 3))
    assert cl.palette[2] == (70, 130, 180)                 # a Cityscapes name: its colour
    others = np.asarray(cl.palette[:3], float)                # otherwise a generated one,
    assert np.sqrt(((others - cl.palette[3]) ** 2).sum(1)).min() > 100  # far from those
    lut = cl.lut()
    assert [lut[v] for v in (7, 3, 9, 5)] == [0, 1, 2, 3]   # file order = class index
    assert lut[0] == lut[4] == lut[255] == 255


@pytest.mark.parametrize("body,needle", [
    ("1 cat\n2 dog\n3 cat\n", "line 3: duplicate class name 'cat' (first on line 1)"),
    ("1 cat\n300 dog\n", "line 2: label id 300 is out of range"),
    ("-1 cat\n", "line 1: label id -1 is out of range"),
    ("1 cat\n2 dog\n2 eel\n", "line 3: label id 2 is already used by class 'dog'"),
    ("1 cat #12345\n", "line 1: colour '#12345' is not #rrggbb"),
    ("1 cat 1,2\n", "line 1: colour '1,2' is not r,g,b"),
    ("1 cat 256,0,0\n", "colour '256,0,0' is not r,g,b with values 0..255"),
    ("ignore 1\n1 cat\n", "label id 1 is both the ignore index and class 'cat'"),
    ("cat 1\n", "label id 'cat' is not an integer"),
    ("# nothing\n", "no classes"),
])
def test_wrong_class_file_is_one_clear_error(tmp_path, body, needle):
    path = _write(tmp_path / "classes.txt", body)
    with pytest.raises(C.ClassFileError) as e:
        C.read_class_file(path)
    assert needle in str(e.value) and str(tmp_path) in str(e.value)
    from configs import base, custom
    with pytest.raises(base.ConfigError, match="classes.txt"):
        custom.get_config(f"classes={path}")


def test_prepare_cli_reports_a_bad_class_file_in_one_line(tmp_path):
    write_folder_dataset(str(tmp_path), num_train=1, num_val=1, size=(16, 16))
    _write(tmp_path / "classes.txt", "1 ground\n2 ground\n")
    out = subprocess.run([sys.executable, "scripts/prepare_data.py", "folder", "--root",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path}/classes.txt line 2: duplicate class name 'ground' (first on line 1)"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    classes = write_folder_dataset(str(root), num_train=6, num_val=2, size=(48, 72))
    C.prepare_folder(str(root), classes, progress=False)
    return root


def test_prepare_writes_statistics_of_class_indices(folder):
    entries = json.load(open(folder / "sample_class_stats.json"))
    files = [e["file"] for e in entries]
    assert files == [f"labels/train/{i:05d}.png" for i in range(6)] + \
        [f"labels/val/{i:05d}.png" for i in range(2)]
    for e in entries:
        raw = np.asarray(Image.open(folder / e["file"]))
        # label id k+1 -> class index k; ignore (0) not counted
        want = {str(v - 1): int((raw == v).sum()) for v in range(1, 6) if (raw == v).any()}
        assert {k: v for k, v in e.items() if k != "file"} == want
    src = C.FolderDatasetSource(str(folder), "train", (1, 2, 3, 4, 5), 0)
    stats = src.class_stats()
    assert stats[2] == {int(k): v for k, v in entries[2].items() if k != "file"}


def test_prepare_names_bad_labels_and_missing_files(tmp_path):
    classes = write_folder_dataset(str(tmp_path), num_train=2, num_val=1, size=(16, 16))
    lab = np.asarray(Image.open(tmp_path / "labels/train/00001.png")).copy()
    lab[0, 0] = 9
    Image.fromarray(lab).save(tmp_path / "labels/train/00001.png")
    with pytest.raises(DatasetLayoutError, match=r"labels/train/00001.png: values \[9\]"):
        C.prepare_folder(str(tmp_path), classes, progress=False)
    os.remove(tmp_path / "labels/val/00000.png")
    with pytest.raises(DatasetLayoutError, match="labels/val/00000.png"):
        C.prepare_folder(str(tmp_path), classes, progress=False)
    assert not (tmp_path / "sample_class_stats.json").exists()


def test_config_sizes_queries_class_head_and_palette(folder):
    from flax import nnx

    from configs import custom
    from mfuser_jax.model.factory import build_model
    c = custom.get_config(f"root={folder},size=tiny")
    assert c.model.class_names == ("ground", "building", "tree", "sky", "vehicle")
    assert c.model.num_classes == 5
    assert [tuple(p) for p in c.model.palette] == [col for _, _, col, _ in FOLDER_CLASSES]
    assert c.data.train == "folder:train" and c.data.eval == ("folder:val",)
    assert tuple(c.data.folder.label_ids) == (1, 2, 3, 4, 5) and c.data.folder.ignore_index == 0
    model = nnx.eval_shape(lambda: build_model(c.model, rngs=nnx.Rngs(0)))
    assert model.texts.shape[0] == 5                       # one text query per class
    assert model.decode_head.cls_embed.kernel.shape[-1] == 6  # 5 classes + no-object
    assert model.decode_head.query_embed.embedding.shape[0] == 5


def test_train_eval_predict_end_to_end(folder, tmp_path):
    from tests.toy import register_toy, toy_config
    register_toy()
    from configs import custom
    from mfuser_jax.run import train as T
    cc = custom.get_config(f"root={folder}")
    c = toy_config(total_steps=4, checkpoint_every=4, eval_every=4, batch_size=4)
    c.data = cc.data
    c.data.crop_size = 32
    c.data.rcs.min_pixels = 50
    c.model.num_classes = 5
    c.model.class_names = cc.model.class_names
    c.model.palette = cc.model.palette
    work = str(tmp_path / "w")
    T.train_and_evaluate(c, work, log=lambda s: None)
    report = json.load(open(os.path.join(work, "eval", "folder_val_step4.json")))
    assert list(report["per_class"]) == list(cc.model.class_names)
    assert os.path.isfile(os.path.join(work, "eval", "folder_val_step4.png"))
    # predict: masks in the class file's colours
    from mfuser_jax.run.predict import predict
    out = tmp_path / "pred"
    predict(c, work, [str(folder / "images/val")], str(out), None, None, 0.5)
    pal = np.array([col for _, _, col, _ in FOLDER_CLASSES], np.int64)
    # The evaluation's numbers again from the raw files and the predicted masks:
    # label ids 1..5 -> classes 0..4, 0 ignored; mask colour -> class.
    cm = np.zeros((5, 5), np.int64)
    for f in sorted(os.listdir(folder / "images/val")):
        stem = f[:-4]
        raw = np.asarray(Image.open(folder / "labels/val" / (stem + ".png")))
        # predict.py keeps the extension in output names: 00000.png -> 00000_png_mask.png
        mask = np.asarray(Image.open(out / (f.replace(".", "_") + "_mask.png")).convert("RGB"))
        hit = (mask[..., None, :] == pal).all(-1)
        assert hit.sum(-1).min() == 1  # every pixel in exactly one class colour
        pred = hit.argmax(-1)
        valid = raw > 0
        np.add.at(cm, (raw[valid].astype(int) - 1, pred[valid]), 1)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = np.where(union > 0, 100 * inter / np.maximum(union, 1), np.nan)
    assert report["miou"] == pytest.approx(np.nanmean(iou), abs=1e-6)
    assert [report["per_class"][n] for n in cc.model.class_names] == [
        None if np.isnan(v) else pytest.approx(v, abs=1e-6) for v in iou]
