"""Random-access dataset sources: the DGSS folder layouts, TFDS, and synthetic scenes.

Every source returns ``(image uint8 (H, W, 3) RGB, label uint8 (H, W) trainIds, name)``
from ``load(i)`` and says which files hold its rare-class statistics. Folder layouts
(under ``config.data_root``; README section "Datasets"):

  gta/images/00001.png                         gta/labels/00001_labelTrainIds.png
  synthia/RGB/0000000.png                      synthia/GT/LABELS/0000000_labelTrainIds.png
  cityscapes/leftImg8bit/{train,val}/<city>/<x>_leftImg8bit.png
  cityscapes/gtFine/{train,val}/<city>/<x>_gtFine_labelTrainIds.png
  bdd100k/images/10k/{train,val}/<x>.jpg       bdd100k/labels/sem_seg/masks/{train,val}/<x>.png
  mapillary/{training,validation}/images/<x>.jpg
  mapillary/{training,validation}/labels/<x>_labelTrainIds.png
  acdc/rgb_anon/<cond>/{train,val}/<seq>/<x>_rgb_anon.png     (cond: fog night rain snow)
  acdc/gt/<cond>/{train,val}/<seq>/<x>_gt_labelTrainIds.png
  dark_zurich/rgb_anon/val/night/<seq>/<x>_rgb_anon.png
  dark_zurich/gt/val/night/<seq>/<x>_gt_labelTrainIds.png

*_labelTrainIds.png files and the RCS statistics (sample_class_stats.json in the dataset
folder) are written by ``scripts/prepare_data.py``; ACDC and Dark Zurich ship trainId
labels. ACDC is evaluated per condition and overall in one pass (``groups``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mfuser_jax.data import imageio
from mfuser_jax.data.labels import TRAINID_LUT
from mfuser_jax.errors import DatasetLayoutError

README_SECTION = 'README section "Datasets"'


LAYOUTS = {
    "gta": "gta/images/<n>.png and gta/labels/<n>_labelTrainIds.png "
           "(run `python scripts/prepare_data.py gta --root DATA_ROOT` on the original "
           "gta/labels/<n>.png)",
    "synthia": "synthia/RGB/<n>.png and synthia/GT/LABELS/<n>_labelTrainIds.png (run "
               "`python scripts/prepare_data.py synthia --root DATA_ROOT`)",
    "cityscapes": "cityscapes/leftImg8bit/<split>/<city>/<x>_leftImg8bit.png and "
                  "cityscapes/gtFine/<split>/<city>/<x>_gtFine_labelTrainIds.png (run "
                  "`python scripts/prepare_data.py cityscapes --root DATA_ROOT`)",
    "bdd100k": "bdd100k/images/10k/<split>/<x>.jpg and "
               "bdd100k/labels/sem_seg/masks/<split>/<x>.png (trainId masks as released)",
    "mapillary": "mapillary/<training|validation>/images/<x>.jpg and "
                 "mapillary/<training|validation>/labels/<x>_labelTrainIds.png (run "
                 "`python scripts/prepare_data.py mapillary --root DATA_ROOT`)",
    "acdc": "acdc/rgb_anon/<fog|night|rain|snow>/<split>/<seq>/<x>_rgb_anon.png and "
            "acdc/gt/<fog|night|rain|snow>/<split>/<seq>/<x>_gt_labelTrainIds.png (as "
            "released: rgb_anon_trainvaltest.zip, gt_trainval.zip)",
    "dark_zurich": "dark_zurich/rgb_anon/val/night/<seq>/<x>_rgb_anon.png and "
                   "dark_zurich/gt/val/night/<seq>/<x>_gt_labelTrainIds.png (as released: "
                   "Dark_Zurich_val_anon.zip)",
}


# The reference's test-time Resize(keep_ratio=True) scale (w, h) per dataset; None: the
# images' own size (ACDC and Dark Zurich are 1920x1080 already). scripts/predict.py
# segments photos at the first evaluation dataset's scale.
TEST_SCALES = {"gta": (2048, 1024), "synthia": (2048, 1024), "cityscapes": (2048, 1024),
               "bdd100k": (1280, 720), "mapillary": (2048, 1024), "acdc": None,
               "dark_zurich": None}


def layout_error(name: str, missing: str, extra: str = "") -> DatasetLayoutError:
    return DatasetLayoutError(
        f"{name}: {missing} not found. Expected layout under data_root: {LAYOUTS[name]}. "
        f"{extra}See the {README_SECTION}.".replace("  ", " "))


@dataclass
class FolderSource:
    """Image/label file pairs of one dataset split."""

    name: str
    root: str  # dataset folder (holds the RCS statistics)
    images: list
    labels: list
    test_scale: tuple | None = (2048, 1024)
    label_reader: Callable = field(default=imageio.read_label)

    def __len__(self):
        return len(self.images)

    def load(self, i: int):
        img = imageio.read_image(self.images[i])
        lab = self.label_reader(self.labels[i])
        if img.shape[:2] != lab.shape:
            raise imageio.DataFileError(
                f"{self.labels[i]}: label size {lab.shape} differs from image "
                f"{self.images[i]} size {img.shape[:2]}")
        return img, self.lookup_table[lab], self.image_name(i)

    lookup_table = TRAINID_LUT  # label value -> trainId (a custom class list has its own)

    def image_name(self, i: int) -> str:
        return os.path.basename(self.images[i])

    def label_key(self, i: int) -> str:
        return os.path.basename(self.labels[i])

    @property
    def stats_file(self) -> str:
        return os.path.join(self.root, "sample_class_stats.json")


def _scan(folder: str, suffix: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(folder):
        out.extend(os.path.join(dirpath, f) for f in files if f.endswith(suffix))
    return sorted(out)


def _pair(name, img_dir, img_suffix, lab_dir, lab_suffix, root, test_scale,
          exclude_suffix=None, label_reader=imageio.read_label):
    if not os.path.isdir(img_dir):
        raise layout_error(name, f"image folder {img_dir}")
    if not os.path.isdir(lab_dir):
        raise layout_error(name, f"label folder {lab_dir}")
    images = [p for p in _scan(img_dir, img_suffix)
              if not (exclude_suffix and p.endswith(exclude_suffix))]
    if not images:
        raise layout_error(name, f"any *{img_suffix} image in {img_dir}")
    labels = []
    missing = []
    for p in images:
        rel = os.path.relpath(p, img_dir)[: -len(img_suffix)] + lab_suffix
        lp = os.path.join(lab_dir, rel)
        labels.append(lp)
        if not os.path.isfile(lp):
            missing.append(lp)
    if missing:
        raise layout_error(
            name, f"{len(missing)} of {len(images)} label files (first: {missing[0]})")
    return FolderSource(name, root, images, labels, test_scale, label_reader)


def gta_source(data_root: str, split: str = "all") -> FolderSource:
    root = os.path.join(data_root, "gta")
    if not os.path.isdir(root):
        raise layout_error("gta", f"folder {root}")
    return _pair("gta", os.path.join(root, "images"), ".png", os.path.join(root, "labels"),
                 "_labelTrainIds.png", root, TEST_SCALES["gta"])


def synthia_source(data_root: str, split: str = "all") -> FolderSource:
    root = os.path.join(data_root, "synthia")
    if not os.path.isdir(root):
        raise layout_error("synthia", f"folder {root}")
    return _pair("synthia", os.path.join(root, "RGB"), ".png",
                 os.path.join(root, "GT", "LABELS"), "_labelTrainIds.png", root,
                 TEST_SCALES["synthia"])


def cityscapes_source(data_root: str, split: str = "val") -> FolderSource:
    root = os.path.join(data_root, "cityscapes")
    if not os.path.isdir(root):
        raise layout_error("cityscapes", f"folder {root}")
    return _pair("cityscapes", os.path.join(root, "leftImg8bit", split), "_leftImg8bit.png",
                 os.path.join(root, "gtFine", split), "_gtFine_labelTrainIds.png", root,
                 TEST_SCALES["cityscapes"])


def bdd100k_source(data_root: str, split: str = "val") -> FolderSource:
    root = os.path.join(data_root, "bdd100k")
    if not os.path.isdir(root):
        raise layout_error("bdd100k", f"folder {root}")
    lab_dir = os.path.join(root, "labels", "sem_seg", "masks", split)
    if not os.path.isdir(lab_dir):  # the reference configs read the (palette) colormaps
        alt = os.path.join(root, "labels", "sem_seg", "colormaps", split)
        lab_dir = alt if os.path.isdir(alt) else lab_dir
    return _pair("bdd100k", os.path.join(root, "images", "10k", split), ".jpg", lab_dir,
                 ".png", root, TEST_SCALES["bdd100k"])


def mapillary_source(data_root: str, split: str = "validation") -> FolderSource:
    split = {"val": "validation", "train": "training"}.get(split, split)
    root = os.path.join(data_root, "mapillary")
    if not os.path.isdir(root):
        raise layout_error("mapillary", f"folder {root}")
    return _pair("mapillary", os.path.join(root, split, "images"), ".jpg",
                 os.path.join(root, split, "labels"), "_labelTrainIds.png", root,
                 TEST_SCALES["mapillary"])


ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


@dataclass
class GroupedFolderSource(FolderSource):
    """A FolderSource whose images belong to named groups (ACDC's conditions): the
    evaluation reports every group and the whole set from one pass."""

    image_groups: list = field(default_factory=list)  # group name of each image
    groups: tuple = ()                                  # names, in report order

    def group(self, i: int) -> str:
        return self.image_groups[i]


def acdc_source(data_root: str, split: str = "val") -> GroupedFolderSource:
    """All ACDC conditions present on disk; 'val:fog' (split:condition) picks one.

    Test scale None: ACDC images are 1920x1080, so the reference's keep-ratio resize to
    (1920, 1080) leaves them as they are."""
    root = os.path.join(data_root, "acdc")
    if not os.path.isdir(root):
        raise layout_error("acdc", f"folder {root}")
    split, _, only = split.partition(":")
    conds = [c for c in ACDC_CONDITIONS
             if (not only or c == only) and os.path.isdir(os.path.join(root, "rgb_anon", c))]
    if not conds:
        want = only or "/".join(ACDC_CONDITIONS)
        raise layout_error("acdc", f"condition folder {os.path.join(root, 'rgb_anon', want)}")
    images, labels, groups = [], [], []
    for c in conds:
        part = _pair("acdc", os.path.join(root, "rgb_anon", c, split), "_rgb_anon.png",
                     os.path.join(root, "gt", c, split), "_gt_labelTrainIds.png", root, None)
        images += part.images
        labels += part.labels
        groups += [c] * len(part)
    return GroupedFolderSource("acdc", root, images, labels, None,
                               image_groups=groups, groups=tuple(conds))


def dark_zurich_source(data_root: str, split: str = "val") -> FolderSource:
    root = os.path.join(data_root, "dark_zurich")
    if not os.path.isdir(root):
        raise layout_error("dark_zurich", f"folder {root}")
    return _pair("dark_zurich", os.path.join(root, "rgb_anon", split), "_rgb_anon.png",
                 os.path.join(root, "gt", split), "_gt_labelTrainIds.png", root, None)


class TFDSSource:
    """Any TFDS-prepared dataset with an image and a segmentation feature.

    Read through ``tfds.data_source`` (ArrayRecord, random access). TensorFlow is not
    needed: TFDS decodes ``tfds.features.Image`` with PIL (or OpenCV) in numpy mode.
    ``label_map``: "" (labels already trainIds) or one of "cityscapes", "gta",
    "synthia", "mapillary" to convert raw ids (TFDS's ``cityscapes`` builder stores
    Cityscapes labelIds).
    """

    def __init__(self, name, split, data_dir=None, image_key="image",
                 label_key="segmentation_label", label_map="", test_scale=None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError(
                "tfds sources need `pip install tensorflow-datasets` (TensorFlow is not "
                "required)") from e
        from mfuser_jax.data import labels as L
        self.name = f"tfds:{name}"
        try:
            self._src = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; name the dataset
            raise DatasetLayoutError(
                f"tfds:{name} split {split!r} (data_dir={data_dir}) cannot be opened as an "
                f"ArrayRecord data source: {e}. Prepare it with file_format='array_record' "
                f"(`tfds build {name} --file_format=array_record`); see the "
                f"{README_SECTION}.") from None
        self.image_key, self.label_key = image_key, label_key
        luts = {"": None, "cityscapes": L.CITYSCAPES_LUT, "gta": L.GTA_LUT,
                "synthia": L.SYNTHIA_LUT, "mapillary": L.MAPILLARY_LUT}
        if label_map not in luts:
            raise ValueError(f"data.tfds.label_map {label_map!r}: expected one of {list(luts)}")
        self.lut = luts[label_map]
        self.test_scale = test_scale
        self.root = None

    def __len__(self):
        return len(self._src)

    def load(self, i: int):
        rec = self._src[int(i)]
        for k in (self.image_key, self.label_key):
            if k not in rec:
                raise KeyError(f"{self.name} has no feature {k!r} (features: {sorted(rec)}); "
                               "set config.data.tfds.image_key / label_key")
        img = np.asarray(rec[self.image_key], np.uint8)
        lab = np.asarray(rec[self.label_key])
        if lab.ndim == 3:
            lab = lab[..., 0]
        lab = lab.astype(np.uint8)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, -1)
        if self.lut is not None:
            lab = self.lut[lab]
        return img, TRAINID_LUT[lab], f"{self.name}/{i}"

    def label_key(self, i: int) -> str:
        return str(i)

    stats_file = None  # no RCS statistics for TFDS datasets


def load_class_stats(source) -> list[dict] | None:
    """Per-image class pixel counts aligned with the source's indices (or None)."""
    path = getattr(source, "stats_file", None)
    if callable(getattr(source, "class_stats", None)):
        return source.class_stats()
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        entries = json.load(f)
    by_key = {}
    for e in entries:
        e = dict(e)
        key = os.path.basename(e.pop("file"))
        by_key[key] = {int(c): int(n) for c, n in e.items()}
    stats = []
    for i in range(len(source)):
        key = source.label_key(i)
        if key not in by_key:
            raise DatasetLayoutError(
                f"{path} has no entry for {key}: it is stale; re-run scripts/prepare_data.py")
        stats.append(by_key[key])
    return stats
