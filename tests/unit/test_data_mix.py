"""Multi-source training: the per-source ratio over many steps, rare-class sampling inside
each source, identical batches after resume, clear errors."""
import ml_collections
import numpy as np
import pytest

from configs.base import data_config
from mfuser_jax.data import pipeline as P
from mfuser_jax.data import prepare as prepare_data
from mfuser_jax.data.fake import write_fake_tree
from mfuser_jax.data.mix import MixedSource, MixSampler
from mfuser_jax.data.rcs import RareClassSampler
from mfuser_jax.data.sources import load_class_stats


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    write_fake_tree(str(root), "gta", n=5, size=(40, 60), raw=True, block=10, seed=1)
    write_fake_tree(str(root), "synthia", n=3, size=(40, 60), raw=True, block=10, seed=2)
    for name in ("gta", "synthia"):
        prepare_data.prepare(name, str(root), nproc=1, progress=False)
    return root


def make_config(root, **data):
    c = ml_collections.ConfigDict()
    c.seed, c.batch_size, c.data_root = 11, 4, str(root)
    c.data = data_config("synthetic", ("synthetic_real",))
    c.data.update(dict(train="gta+synthia", mix_ratios=(1.0, 3.0), crop_size=16,
                       photometric=False, cat_max_ratio=1.0))
    c.data.rcs.min_pixels = 150
    c.data.update(data)
    return c


def _example_fn(c):
    cfg = P.resolve_config(c)
    cfg["process_count"] = 1
    src = P.build_source(cfg, cfg["data"]["train"], train=True)
    return P.TrainExample(cfg, src, P._train_sampler(cfg, src), 4, 0)


def test_ratio_over_many_steps_and_rcs_within_each_source(root):
    fn = _example_fn(make_config(root))
    src, sampler = fn.source, fn.sampler
    assert isinstance(src, MixedSource) and isinstance(sampler, MixSampler)
    assert [len(s) for s in src.sources] == [5, 3]
    # rare-class sampling inside each source, over that source's own statistics
    for sub, s in zip(sampler.samplers, src.sources):
        assert isinstance(sub, RareClassSampler)
        stats = load_class_stats(s)
        for c, idx in sub.samples.items():
            assert idx.tolist() == [i for i, st in enumerate(stats) if st.get(c, 0) > 150]
    loaded = []
    load = src.load
    src.load = lambda i: (loaded.append(i), load(i))[1]
    for step in range(150):
        for slot in range(4):
            fn.example(step, slot)
    which = np.array([src.locate(i)[0] for i in loaded])
    assert len(loaded) == 600
    assert abs(which.mean() - 0.75) < 0.05          # synthia: weight 3 of 4
    # every drawn image holds enough of some class it was drawn for
    stats = [load_class_stats(s) for s in src.sources]
    for i in loaded:
        k, j = src.locate(i)
        assert max(stats[k][j].values()) > 150

    fn = _example_fn(make_config(root, mix_ratios=(1.0, 0.0)))
    rng = np.random.default_rng(0)
    assert all(fn.source.locate(fn.sampler.draw(rng)[0])[0] == 0 for _ in range(200))


def test_batches_identical_after_resume(root):
    c = make_config(root)
    it = P.make_train_iterator(c)
    ref = [next(it) for _ in range(4)]
    resumed = P.make_train_iterator(c, start_step=2)
    for want in ref[2:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    c.data.rcs.enabled = False                      # uniform within each source
    a = next(P.make_train_iterator(c, start_step=1))
    fresh = P.make_train_iterator(c)
    next(fresh)
    np.testing.assert_array_equal(a["image"], next(fresh)["image"])


def test_mix_errors(root, tmp_path):
    with pytest.raises(ValueError, match="has 3 entries for the 2 sources"):
        P.make_train_iterator(make_config(root, mix_ratios=(1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="weights must be >= 0"):
        P.make_train_iterator(make_config(root, mix_ratios=(1.0, -1.0)))
    from configs import gtasyn2cs
    from mfuser_jax.data import checks as T
    c = gtasyn2cs.get_config()
    assert c.data.train == "gta+synthia" and tuple(c.data.mix_ratios) == (0.5, 0.5)
    c.data_root = str(tmp_path)
    write_fake_tree(str(tmp_path), "gta", n=1, size=(8, 8))
    with pytest.raises(T.UserError, match="training data 'synthia' not found"):
        T.check_data(c)
