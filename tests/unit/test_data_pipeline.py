"""grain pipelines: pairing, determinism across workers/processes/resumption, RCS, eval."""
import gc

import ml_collections
import numpy as np
import pytest
import torch

from configs.base import data_config
from mfuser_jax.data import pipeline as P
from mfuser_jax.data.fake import write_fake_tree
from mfuser_jax.data.labels import colorize
from mfuser_jax.data.rcs import RareClassSampler, rcs_class_probs
from mfuser_jax.data.sources import DatasetLayoutError

from mfuser_jax.data import prepare as prepare_data


def make_config(root, **data):
    c = ml_collections.ConfigDict()
    c.seed = 3
    c.batch_size = 4
    c.data_root = str(root)
    c.data = data_config("synthetic", ("synthetic_real",))
    c.data.crop_size = 32
    c.data.rcs.min_pixels = 20
    c.data.update(data)
    return c


@pytest.fixture(scope="module")
def gta_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_tree(str(root), "gta", n=6, size=(40, 60), raw=True, block=10)
    prepare_data.prepare("gta", str(root), nproc=1, progress=False)
    return root


def _take(it, n):
    out = [next(it) for _ in range(n)]
    close = getattr(it, "close", None)
    if close:
        close()
    del it
    gc.collect()
    return out


def test_train_batches_are_paired_and_aligned(gta_root):
    c = make_config(gta_root, train="gta", photometric=False)
    (b,) = _take(P.make_train_iterator(c), 1)
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["label"].shape == (4, 32, 32) and b["label"].dtype == np.int32
    lab = b["label"].astype(np.uint8)
    # Interior pixels of uniform 5x5 label neighbourhoods show their class colour.
    pad = np.pad(lab, ((0, 0), (2, 2), (2, 2)), constant_values=254)
    same = np.ones(lab.shape, bool)
    for dy in range(5):
        for dx in range(5):
            same &= pad[:, dy:dy + 32, dx:dx + 32] == lab
    same &= lab != 255  # ignore (and padding, which is the mean colour) has no colour
    assert same.sum() > 300
    np.testing.assert_array_equal(b["image"][same], colorize(lab)[same])


def test_same_seed_step_same_batch_for_0_and_2_workers(gta_root):
    c = make_config(gta_root, train="gta")
    ref = _take(P.make_train_iterator(c), 3)
    c.data.num_workers = 2
    mp = _take(P.make_train_iterator(c), 3)
    for a, b in zip(ref, mp):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Resuming at step 2 gives step 2's batch; another seed gives other batches.
    c.data.num_workers = 0
    (r,) = _take(P.make_train_iterator(c, start_step=2), 1)
    np.testing.assert_array_equal(r["image"], ref[2]["image"])
    c.seed = 4
    (o,) = _take(P.make_train_iterator(c), 1)
    assert not np.array_equal(o["image"], ref[0]["image"])


def test_processes_split_the_global_batch(gta_root):
    c = make_config(gta_root, train="gta")
    (full,) = _take(P.make_train_iterator(c, start_step=5), 1)
    parts = [_take(P.make_train_iterator(c, start_step=5, process_index=p, process_count=2), 1)[0]
             for p in range(2)]
    assert parts[0]["image"].shape[0] == 2
    for k in full:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    with pytest.raises(ValueError, match="divisible"):
        P.make_train_iterator(c, process_count=3)


def test_epoch_order_visits_every_image_without_rcs(gta_root):
    c = make_config(gta_root, train="gta")
    c.data.rcs.enabled = False
    cfg = P.resolve_config(c)
    cfg["process_count"] = 1
    src = P.build_source(cfg, "gta", train=True)
    fn = P.TrainExample(cfg, src, None, 4, 0)
    seen = [int(fn._perm(n // 6)[n % 6]) for n in range(12)]
    assert sorted(seen[:6]) == list(range(6)) and sorted(seen[6:]) == list(range(6))


def test_rcs_without_class_statistics_is_an_error_unless_switched_off(tmp_path):
    """The reference stops when sample_class_stats.json is missing; training uniformly
    instead would silently change the recipe, so only an explicit switch allows it."""
    write_fake_tree(str(tmp_path), "gta", n=3, size=(40, 40))  # no prepare_data run
    c = make_config(tmp_path, train="gta", cat_max_ratio=1.0)
    c.batch_size = 3
    with pytest.raises(DatasetLayoutError,
                       match=r"prepare_data\.py.*--config\.data\.rcs\.enabled=False"):
        P.make_train_iterator(c)
    c.data.rcs.enabled = False
    (b,) = _take(P.make_train_iterator(c), 1)
    assert b["image"].shape == (3, 32, 32, 3)


def test_rcs_class_probabilities_match_reference():
    stats = [{0: 5000, 1: 10, 13: 400}, {0: 7000, 5: 90, 13: 3000}, {10: 100}]

    def torch_ref(stats, temperature):  # restatement of get_rcs_class_probs
        overall = {}
        for s in stats:
            for c, n in s.items():
                overall[c] = overall.get(c, 0) + n
        overall = dict(sorted(overall.items(), key=lambda kv: kv[1]))
        freq = torch.tensor(list(overall.values()), dtype=torch.float64)
        freq = 1 - freq / freq.sum()
        return list(overall), torch.softmax(freq / temperature, -1).numpy()

    for temp in (100.0, 0.1):
        classes, probs = rcs_class_probs(stats, temp)
        rc, rp = torch_ref(stats, temp)
        assert classes.tolist() == rc
        np.testing.assert_allclose(probs, rp, rtol=1e-12)
    s = RareClassSampler(stats, class_temp=0.1, min_pixels=95, min_crop_ratio=0.5)
    assert s.samples[13].tolist() == [0, 1] and s.samples[5].tolist() == []
    assert 5 not in s.classes.tolist() and 1 not in s.classes.tolist()  # no eligible image
    rng = np.random.default_rng(0)
    draws = [s.draw(rng) for _ in range(2000)]
    for i, c in draws:
        assert stats[i][c] > 95
    freq = np.mean([c == 10 for _, c in draws])
    np.testing.assert_allclose(freq, s.probs[s.classes.tolist().index(10)], atol=0.04)
    assert s.crop_ok(np.full((10, 10), 13), 13) and not s.crop_ok(np.full((6, 7), 13), 13)


def test_rcs_prefers_crops_holding_the_sampled_class(tmp_path):
    # One rare class (bicycle, 18) in a small corner of one image out of four.
    write_fake_tree(str(tmp_path), "gta", n=4, size=(64, 64), raw=True, block=64)
    from mfuser_jax.data import imageio
    p = tmp_path / "gta/labels/00002.png"
    raw = imageio.read_label(p).copy()
    raw[:24, :24] = 33  # GTA id of bicycle
    imageio.write_label(p, raw)
    prepare_data.prepare("gta", str(tmp_path), nproc=1, progress=False)
    c = make_config(tmp_path, train="gta", crop_size=32, ratio_range=None, cat_max_ratio=1.0)

    def rate(min_crop_ratio):
        c.data.rcs.update(dict(class_temp=0.01, min_pixels=100,
                               min_crop_ratio=min_crop_ratio))
        labs = np.concatenate([b["label"] for b in _take(P.make_train_iterator(c), 8)])
        return np.mean([(lab == 18).sum() > 50 for lab in labs])

    # Low temperature -> bicycle is (nearly) always the sampled class. A random 32x32
    # crop holds > 50 of its pixels with p ~ 0.3; up to 11 draws make that ~ 0.97.
    assert rate(0.0) < 0.6
    assert rate(0.5) > 0.85


def test_eval_covers_every_image_once_over_processes(tmp_path):
    write_fake_tree(str(tmp_path), "cityscapes", n=5, size=(20, 40), split="val")
    c = make_config(tmp_path)
    assert len(P.make_eval_iterator(c, "cityscapes")) == 5
    names = []
    for p in range(2):
        it = P.make_eval_iterator(c, "cityscapes", process_index=p, process_count=2)
        n_before = len(names)
        for ex in it:
            assert ex["image"].shape == (1, 1024, 2048, 3)  # keep ratio to 2048x1024
            assert ex["label"].shape == (1, 20, 40) and ex["label"].dtype == np.int32
            names.append(ex["name"])
        assert len(it) == len(names) - n_before == (3, 2)[p]  # a progress bar's total
    assert len(names) == 5 and len(set(names)) == 5
    c.synthetic = None
    c.data.synthetic.update(dict(num_eval=3, image_size=(16, 24)))
    ex = list(P.make_eval_iterator(c, "synthetic_real"))
    assert len(ex) == 3 and ex[0]["image"].shape == (1, 16, 24, 3)


def test_synthetic_training_source(tmp_path):
    c = make_config(tmp_path, train="synthetic", crop_size=24)
    c.data.synthetic.update(dict(num_train=8, image_size=(32, 48)))
    (b,) = _take(P.make_train_iterator(c), 1)
    assert b["image"].shape == (4, 24, 24, 3)
    assert set(np.unique(b["label"])) <= set(range(19)) | {255}


def test_bad_config_and_corrupt_files(tmp_path):
    c = make_config(tmp_path / "missing", train="gta")
    with pytest.raises(DatasetLayoutError, match="data_root"):
        P.make_train_iterator(c)
    with pytest.raises(ValueError, match="unknown dataset"):
        P.make_train_iterator(make_config(tmp_path, train="kitti"))
    write_fake_tree(str(tmp_path), "gta", n=3, size=(40, 40))
    (tmp_path / "gta/images/00001.png").write_bytes(b"garbage")
    c = make_config(tmp_path, train="gta", cat_max_ratio=1.0)
    c.data.rcs.enabled = False
    c.batch_size = 3
    with pytest.raises(Exception, match="00001.png"):
        _take(P.make_train_iterator(c), 1)
    c.data.skip_corrupt = True
    before = len(P.SKIPPED_FILES)
    (b,) = _take(P.make_train_iterator(c), 1)
    assert b["image"].shape == (3, 32, 32, 3)
    # counted (read-ahead may have met it more than once)
    assert len(P.SKIPPED_FILES) > before and "00001.png" in P.SKIPPED_FILES[-1]


def test_without_grain_the_same_batches(gta_root, monkeypatch):
    c = make_config(gta_root, train="gta")
    ref = _take(P.make_train_iterator(c, start_step=1), 2)
    monkeypatch.setattr(P, "_grain", lambda: None)
    plain = _take(P.make_train_iterator(c, start_step=1), 2)
    for a, b in zip(ref, plain):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert len(list(P.make_eval_iterator(c, "gta"))) == 6
