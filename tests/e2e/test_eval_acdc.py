"""ACDC (per condition and overall in one pass) and Dark Zurich: layouts, the grouped
evaluation against a numpy confusion-matrix computation, the JSON and the PNG report."""
import json
import os

import numpy as np
import pytest

from mfuser_jax.run import evaluate as E
from mfuser_jax.data import labels as L
from mfuser_jax.data import pipeline as P
from mfuser_jax.data import sources as S
from mfuser_jax.data.fake import write_fake_tree
from tests.support import PaletteModel, acdc_config

CONDS = ("fog", "night", "rain", "snow")


def numpy_iou(cm):
    cm = cm.astype(np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = np.full(len(cm), np.nan)
    iou[union > 0] = 100.0 * inter[union > 0] / union[union > 0]
    return iou, float(np.nanmean(iou))


def test_acdc_per_condition_and_overall_match_numpy(tmp_path):
    labels = write_fake_tree(str(tmp_path), "acdc", n=2, size=(24, 40), seed=5)
    # classes 0..4 are mistaken for the next one: a few IoUs drop, the rest stay exact
    mistake = np.arange(19)
    mistake[:5] = [1, 2, 3, 4, 0]
    c = acdc_config(tmp_path)
    assert P.eval_dataset_groups(c, "acdc") == CONDS
    out = E.evaluate_model(PaletteModel(mistake), c, step=3, workdir=str(tmp_path / "w"),
                           log=lambda s: None)
    report = json.load(open(tmp_path / "w/eval/acdc_step3.json"))
    assert report["miou"] == pytest.approx(out["acdc"])
    assert set(report["groups"]) == set(CONDS)

    def cm_of(labs):
        cm = np.zeros((19, 19), np.int64)
        for lab in labs:
            valid = lab != 255
            np.add.at(cm, (lab[valid], mistake[lab[valid]]), 1)
        return cm

    total = np.zeros((19, 19), np.int64)
    for k, cond in enumerate(CONDS):
        cm = cm_of(labels[2 * k: 2 * k + 2])  # the source lists condition by condition
        total += cm
        iou, miou = numpy_iou(cm)
        got = report["groups"][cond]
        assert got["miou"] == pytest.approx(miou)
        want = {n: (None if np.isnan(v) else pytest.approx(v)) for n, v in zip(L.CLASSES, iou)}
        assert got["per_class"] == want
        assert any(v is None for v in got["per_class"].values())  # absent classes: NaN
    iou, miou = numpy_iou(total)
    assert report["miou"] == pytest.approx(miou)
    assert [report["per_class"][n] for n in L.CLASSES] == [
        None if np.isnan(v) else pytest.approx(v) for v in iou]
    assert 0 < miou < 100 and len({round(report["groups"][g]["miou"], 6) for g in CONDS}) > 1
    assert os.path.getsize(tmp_path / "w/eval/acdc_step3.png") > 1000  # the report image


def test_acdc_layout_condition_subset_and_errors(tmp_path):
    labels = write_fake_tree(str(tmp_path), "acdc", n=2, size=(16, 24))
    src = S.acdc_source(str(tmp_path))
    assert src.groups == CONDS and src.image_groups == [c for c in CONDS for _ in range(2)]
    for i, lab in enumerate(labels):
        img, got, _ = src.load(i)
        np.testing.assert_array_equal(got, lab)
        np.testing.assert_array_equal(img, L.colorize(lab))
    night = S.acdc_source(str(tmp_path), "val:night")
    assert night.groups == ("night",) and len(night) == 2
    np.testing.assert_array_equal(night.load(1)[1], labels[3])
    ex = next(iter(P.make_eval_iterator(acdc_config(tmp_path), "acdc")))
    assert ex["group"] == "fog" and ex["image"].shape == (1, 16, 24, 3)  # native size
    with pytest.raises(S.DatasetLayoutError, match="rgb_anon/ice"):
        S.acdc_source(str(tmp_path), "val:ice")
    os.remove(src.labels[5])
    with pytest.raises(S.DatasetLayoutError, match="_gt_labelTrainIds.png"):
        S.acdc_source(str(tmp_path))


def test_dark_zurich_val(tmp_path):
    labels = write_fake_tree(str(tmp_path), "dark_zurich", n=2, size=(16, 24))
    src = P.build_source(P.resolve_config(acdc_config(tmp_path)), "dark_zurich", train=False)
    assert len(src) == 2 and not getattr(src, "groups", ())
    for i, lab in enumerate(labels):
        np.testing.assert_array_equal(src.load(i)[1], lab)


def test_acdc_is_an_optional_target_of_the_paper_configs(tmp_path):
    from configs import cs2bdd, cs2map, gta2bdd, gta2cs, gta2map
    from mfuser_jax.data import checks as T
    for mod in (gta2cs, gta2bdd, gta2map, cs2bdd, cs2map):
        assert mod.get_config().data.eval[-1] == "acdc"
    c = gta2cs.get_config()
    c.data_root = str(tmp_path)
    write_fake_tree(str(tmp_path), "cityscapes", n=1, size=(8, 8))
    notes = []
    assert T.available_eval_datasets(c, notes.append) == ["cityscapes"]
    assert any("acdc" in n for n in notes)
    write_fake_tree(str(tmp_path), "acdc", n=1, size=(8, 8))
    assert T.available_eval_datasets(c, notes.append) == ["cityscapes", "acdc"]
