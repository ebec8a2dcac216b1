"""scripts/prepare_data.py: conversion, statistics, resumption and verification."""
import json
import os

import numpy as np
import pytest

from mfuser_jax.data import imageio, sources as S
from mfuser_jax.data.fake import write_fake_tree

from mfuser_jax.data import prepare as prep


@pytest.mark.parametrize("name,src_fn,kw", [
    ("gta", S.gta_source, {}),
    ("synthia", S.synthia_source, {}),
    ("cityscapes", S.cityscapes_source, {"split": "train"}),
    ("mapillary", S.mapillary_source, {"split": "training"}),
])
def test_conversion_matches_written_trainids(tmp_path, name, src_fn, kw):
    split = {"cityscapes": "train", "mapillary": "training"}.get(name)
    labels = write_fake_tree(str(tmp_path), name, n=3, size=(24, 40), raw=True, split=split)
    counts = prep.prepare(name, str(tmp_path), nproc=1, progress=False)
    assert counts["done"] == 3 and counts["skipped"] == 0 and counts["stats"] == 3
    src = src_fn(str(tmp_path), **kw)
    for i, ref in enumerate(labels):
        np.testing.assert_array_equal(src.load(i)[1], ref)
    stats = S.load_class_stats(src)
    for st, ref in zip(stats, labels):
        assert st == {int(c): int((ref == c).sum()) for c in np.unique(ref) if c != 255}
    with open(os.path.join(str(tmp_path), name, "samples_with_class.json")) as f:
        swc = json.load(f)
    for c, entries in swc.items():
        for file, n in entries:
            i = [os.path.basename(p) for p in src.labels].index(os.path.basename(file))
            assert int((labels[i] == int(c)).sum()) == n


def test_cityscapes_val_has_no_statistics(tmp_path):
    write_fake_tree(str(tmp_path), "cityscapes", n=2, raw=True, split="train")
    write_fake_tree(str(tmp_path), "cityscapes", n=3, raw=True, split="val", seed=1)
    # the fake writer names files by index; make the val names distinct
    c = prep.prepare("cityscapes", str(tmp_path), nproc=1, progress=False)
    assert c["labels"] == 5 and c["stats"] == 2


def test_resumes_and_verifies(tmp_path, capsys):
    write_fake_tree(str(tmp_path), "gta", n=5, size=(16, 16), raw=True)
    assert prep.main(["gta", "--root", str(tmp_path), "--nproc", "2"]) == 0
    assert "5 converted" in capsys.readouterr().out
    # Second run: nothing to do. A deleted and a truncated output are redone.
    lab_dir = tmp_path / "gta" / "labels"
    os.remove(lab_dir / "00001_labelTrainIds.png")
    (lab_dir / "00003_labelTrainIds.png").write_bytes(b"\x89PNG trunc")
    c = prep.prepare("gta", str(tmp_path), nproc=1, progress=False)
    assert (c["done"], c["skipped"]) == (2, 3)
    c = prep.prepare("gta", str(tmp_path), nproc=1, progress=False)
    assert (c["done"], c["skipped"]) == (0, 5)
    # Verification: an image without a label is reported.
    imageio.write_label(tmp_path / "gta" / "images" / "00099.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(prep.PrepareError, match="6 images but 5 labels"):
        prep.prepare("gta", str(tmp_path), nproc=1, progress=False)


def test_bad_input_is_one_clear_message(tmp_path, capsys):
    assert prep.main(["mapillary", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mapillary" in err and "README" in err and "Traceback" not in err
    write_fake_tree(str(tmp_path), "mapillary", n=2, raw=True)
    bad = tmp_path / "mapillary/validation/labels/map00001.png"
    imageio.write_label(bad, np.full((8, 8), 70, np.uint8))  # not a v1.2 class id
    with pytest.raises(prep.PrepareError, match="map00001.png.*70"):
        prep.prepare("mapillary", str(tmp_path), nproc=1, progress=False)
    bad.write_bytes(b"junk")
    with pytest.raises(prep.PrepareError, match="map00001.png"):
        prep.prepare("mapillary", str(tmp_path), nproc=1, progress=False)


def test_mapillary_mapping_choice_is_recorded_and_a_change_reconverts(tmp_path):
    write_fake_tree(str(tmp_path), "mapillary", n=2, size=(8, 8), raw=True,
                    split="validation")
    src = tmp_path / "mapillary/validation/labels/map00000.png"
    raw = np.zeros((8, 8), np.uint8)
    raw[:4] = 41   # manhole: road in the 25-entry table, ignored by name
    raw[4:] = 7    # bike lane: road by name, ignored in the table
    imageio.write_label(src, raw)
    out = tmp_path / "mapillary/validation/labels/map00000_labelTrainIds.png"
    assert prep.main(["mapillary", "--root", str(tmp_path), "--nproc", "1"]) == 0
    got = imageio.read_label(out)
    assert (got[:4] == 255).all() and (got[4:] == 0).all()
    assert prep.main(["mapillary", "--root", str(tmp_path), "--nproc", "1",
                      "--mapillary_mapping", "25-class"]) == 0
    got = imageio.read_label(out)
    assert (got[:4] == 0).all() and (got[4:] == 255).all()
    assert (tmp_path / "mapillary" / prep.MAPILLARY_MAPPING_FILE).read_text().strip() == "25-class"
