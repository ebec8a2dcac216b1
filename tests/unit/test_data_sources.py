"""Every source in its folder layout, TFDS and synthetic: pairing, errors, determinism."""
import os

import numpy as np
import pytest
from PIL import Image

from mfuser_jax.data import sources as S
from mfuser_jax.data.fake import write_fake_tree
from mfuser_jax.data.imageio import DataFileError
from mfuser_jax.data.labels import colorize
from mfuser_jax.data.synthetic import SyntheticSource, render_scene


def _check_pairs(src, labels, lossy=False):
    assert len(src) == len(labels)
    for i, lab_ref in enumerate(labels):
        img, lab, name = src.load(i)
        assert img.dtype == np.uint8 and img.shape == lab.shape + (3,)
        np.testing.assert_array_equal(lab, lab_ref)
        err = np.abs(img.astype(int) - colorize(lab_ref)).mean()
        if lossy:  # JPEG: the own label's drawing is far closer than any other's
            others = [np.abs(img.astype(int) - colorize(o)).mean()
                      for j, o in enumerate(labels) if j != i]
            assert err < 15 and err < 0.3 * min(others), (src.name, i, err, others)
        else:
            assert err == 0, (src.name, i, err)
        assert isinstance(name, str)


@pytest.mark.parametrize("name,factory,kw,lossy", [
    ("gta", S.gta_source, {}, False),
    ("synthia", S.synthia_source, {}, False),
    ("cityscapes", S.cityscapes_source, {"split": "val"}, False),
    ("bdd100k", S.bdd100k_source, {"split": "val"}, True),
    ("mapillary", S.mapillary_source, {"split": "validation"}, True),
])
def test_folder_sources_pair_images_and_labels(tmp_path, name, factory, kw, lossy):
    labels = write_fake_tree(str(tmp_path), name, n=3, size=(40, 56), seed=hash(name) % 100)
    src = factory(str(tmp_path), **kw)
    _check_pairs(src, labels, lossy)
    assert src.test_scale == ((1280, 720) if name == "bdd100k" else (2048, 1024))


def test_missing_root_names_folder_and_layout(tmp_path):
    with pytest.raises(S.DatasetLayoutError) as e:
        S.cityscapes_source(str(tmp_path))
    msg = str(e.value)
    assert os.path.join(str(tmp_path), "cityscapes") in msg and "leftImg8bit" in msg
    assert "README" in msg
    write_fake_tree(str(tmp_path), "cityscapes", n=1, split="val")
    with pytest.raises(S.DatasetLayoutError, match="leftImg8bit/train"):
        S.cityscapes_source(str(tmp_path), "train")


def test_missing_label_is_named(tmp_path):
    write_fake_tree(str(tmp_path), "gta", n=2)
    os.remove(tmp_path / "gta/labels/00001_labelTrainIds.png")
    with pytest.raises(S.DatasetLayoutError, match="00001_labelTrainIds.png"):
        S.gta_source(str(tmp_path))


def test_corrupt_file_is_named(tmp_path):
    write_fake_tree(str(tmp_path), "gta", n=2)
    (tmp_path / "gta/images/00001.png").write_bytes(b"not a png")
    src = S.gta_source(str(tmp_path))
    with pytest.raises(DataFileError, match="00001.png"):
        src.load(1)


def test_out_of_range_labels_become_ignore(tmp_path):
    write_fake_tree(str(tmp_path), "gta", n=1, size=(8, 8))
    lab = np.full((8, 8), 40, np.uint8)
    lab[0, 0] = 3
    Image.fromarray(lab).save(tmp_path / "gta/labels/00000_labelTrainIds.png")
    _, out, _ = S.gta_source(str(tmp_path)).load(0)
    assert out[0, 0] == 3 and (out.ravel()[1:] == 255).all()


def test_bdd_falls_back_to_colormaps(tmp_path):
    labels = write_fake_tree(str(tmp_path), "bdd100k", n=2)
    base = tmp_path / "bdd100k/labels/sem_seg"
    os.rename(base / "masks", base / "colormaps")
    _check_pairs(S.bdd100k_source(str(tmp_path)), labels, lossy=True)


def test_synthetic_is_deterministic_and_styles_differ():
    a1, l1 = render_scene(3, seed=1, size=(32, 64))
    a2, l2 = render_scene(3, seed=1, size=(32, 64))
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(l1, l2)
    b, lb = render_scene(3, seed=1, size=(32, 64), style="real")
    np.testing.assert_array_equal(l1, lb)  # same layout, other rendering
    assert np.abs(a1.astype(int) - b).mean() > 10
    c, lc = render_scene(4, seed=1, size=(32, 64))
    assert (lc != l1).mean() > 0.05
    assert set(np.unique(l1)) <= set(range(19))
    src = SyntheticSource(5, size=(32, 64), style="real", split="val")
    img, lab, name = src.load(2)
    assert img.shape == (32, 64, 3) and lab.shape == (32, 64) and "synthetic_real" in name
    stats = src.class_stats()
    assert len(stats) == 5 and sum(stats[2].values()) == 32 * 64
    assert stats[2] == {c: int((lab == c).sum()) for c in np.unique(lab)}


def _build_tfds(data_dir, n=3, h=24, w=32):
    """A tiny TFDS dataset shaped like TFDS's `cityscapes` (Image features, labelIds),
    written without TensorFlow (PIL images are encoded by TFDS without TF)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from mfuser_jax.data.fake import INVERSE, random_label

    labels = [random_label(np.random.default_rng(i), h, w, 8) for i in range(n)]

    class TinyCityscapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image_left": tfds.features.Image(shape=(h, w, 3)),
                "segmentation_label": tfds.features.Image(shape=(h, w, 1)),
            }))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for i, lab in enumerate(labels):
                yield i, {"image_left": Image.fromarray(colorize(lab)),
                          "segmentation_label": Image.fromarray(INVERSE["cityscapes"][lab])}

    TinyCityscapes(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return labels


def test_tfds_source_reads_image_features_without_tensorflow(tmp_path):
    labels = _build_tfds(str(tmp_path))
    src = S.TFDSSource("tiny_cityscapes", "validation", data_dir=str(tmp_path),
                       image_key="image_left", label_key="segmentation_label",
                       label_map="cityscapes")
    assert len(src) == 3
    got = sorted((src.load(i) for i in range(3)), key=lambda t: t[1].tobytes())
    ref = sorted(labels, key=lambda a: a.tobytes())
    for (img, lab, _), lab_ref in zip(got, ref):
        np.testing.assert_array_equal(lab, lab_ref)
        np.testing.assert_array_equal(img, colorize(lab_ref))
    with pytest.raises(S.DatasetLayoutError, match="nonexistent_ds"):
        S.TFDSSource("nonexistent_ds", "train", data_dir=str(tmp_path))
