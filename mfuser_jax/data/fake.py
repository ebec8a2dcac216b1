"""Tiny fake dataset trees in each on-disk layout (tests, benchmarks, docs examples).

Labels are blocky random trainIds with some ignore pixels; the image is the label drawn
in the Cityscapes palette (ignore = black), so image/label pairing and alignment can be
checked after any geometric transform. ``raw=True`` writes the labels as released
(dataset ids), to be converted by scripts/prepare_data.py.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from mfuser_jax.data import imageio
from mfuser_jax.data import labels as L


def _inverse(table: dict) -> np.ndarray:
    inv = np.zeros(256, np.uint8)  # ignore -> id 0 (unlabeled in every id space)
    for k, v in sorted(table.items(), reverse=True):
        inv[v] = k  # the smallest id mapping to a trainId wins
    return inv


INVERSE = {"gta": _inverse(L.GTA_ID_TO_TRAINID), "cityscapes": _inverse(L.CITYSCAPES_ID_TO_TRAINID),
           "synthia": _inverse(L.SYNTHIA_ID_TO_TRAINID), "mapillary": _inverse(L.MAPILLARY_ID_TO_TRAINID)}


def random_label(rng: np.random.Generator, h: int, w: int, block: int = 8,
                 classes=None) -> np.ndarray:
    classes = np.arange(L.NUM_CLASSES) if classes is None else np.asarray(classes)
    gh, gw = -(-h // block), -(-w // block)
    grid = rng.choice(np.r_[classes, L.IGNORE_INDEX], size=(gh, gw)).astype(np.uint8)
    return np.repeat(np.repeat(grid, block, 0), block, 1)[:h, :w]


def _save_rgb(path, img, jpg=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path, quality=100) if jpg else Image.fromarray(img).save(path)


def _save_label(path, lab):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.write_label(path, lab)


def write_fake_tree(data_root: str, name: str, n: int = 3, size=(48, 64), *,
                    split: str | None = None, raw: bool = False, seed: int = 0,
                    block: int = 8):
    """Writes n image/label pairs of dataset ``name`` under data_root; returns the
    trainId labels written (in file-name order)."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    ds = os.path.join(data_root, name)
    for i in range(n):
        classes = L.SYNTHIA_16_TRAINIDS if name == "synthia" else None
        lab = random_label(rng, h, w, block, classes)
        img = L.colorize(lab)
        out.append(lab)
        ids = INVERSE.get(name, None)
        if name == "gta":
            _save_rgb(f"{ds}/images/{i:05d}.png", img)
            if raw:
                _save_label(f"{ds}/labels/{i:05d}.png", ids[lab])
            else:
                os.makedirs(f"{ds}/labels", exist_ok=True)
                _save_label(f"{ds}/labels/{i:05d}_labelTrainIds.png", lab)
        elif name == "synthia":
            _save_rgb(f"{ds}/RGB/{i:07d}.png", img)
            os.makedirs(f"{ds}/GT/LABELS", exist_ok=True)
            if raw:
                arr = np.zeros((h, w, 3), np.uint16)
                arr[..., 0] = ids[lab]
                arr[..., 1] = rng.integers(0, 3000, (h, w))  # instance ids above 255
                imageio.write_png16_rgb(f"{ds}/GT/LABELS/{i:07d}.png", arr)
            else:
                _save_label(f"{ds}/GT/LABELS/{i:07d}_labelTrainIds.png", lab)
        elif name == "cityscapes":
            sp = split or "val"
            stem = f"aachen_{i:06d}_000019"
            _save_rgb(f"{ds}/leftImg8bit/{sp}/aachen/{stem}_leftImg8bit.png", img)
            os.makedirs(f"{ds}/gtFine/{sp}/aachen", exist_ok=True)
            if raw:
                _save_label(f"{ds}/gtFine/{sp}/aachen/{stem}_gtFine_labelIds.png",
                                    ids[lab])
            else:
                _save_label(
                    f"{ds}/gtFine/{sp}/aachen/{stem}_gtFine_labelTrainIds.png", lab)
        elif name == "bdd100k":
            sp = split or "val"
            stem = f"7d{i:06d}-bdd"
            _save_rgb(f"{ds}/images/10k/{sp}/{stem}.jpg", img, jpg=True)
            os.makedirs(f"{ds}/labels/sem_seg/masks/{sp}", exist_ok=True)
            _save_label(f"{ds}/labels/sem_seg/masks/{sp}/{stem}.png", lab)
        elif name == "mapillary":
            sp = split or "validation"
            stem = f"map{i:05d}"
            _save_rgb(f"{ds}/{sp}/images/{stem}.jpg", img, jpg=True)
            os.makedirs(f"{ds}/{sp}/labels", exist_ok=True)
            if raw:
                _save_label(f"{ds}/{sp}/labels/{stem}.png", ids[lab])
            else:
                _save_label(f"{ds}/{sp}/labels/{stem}_labelTrainIds.png", lab)
        elif name in ("acdc", "dark_zurich"):
            # ACDC: n images per condition (source order: condition, then name)
            conds = ("fog", "night", "rain", "snow") if name == "acdc" else ("night",)
            sp = split or "val"
            for c in conds:
                if c != conds[0]:
                    lab = random_label(rng, h, w, block)
                    out.append(lab)
                sub = f"{c}/{sp}" if name == "acdc" else f"{sp}/{c}"
                stem = f"GOPR0{i:03d}/GOPR0{i:03d}_frame_{i:06d}"
                _save_rgb(f"{ds}/rgb_anon/{sub}/{stem}_rgb_anon.png", L.colorize(lab))
                _save_label(f"{ds}/gt/{sub}/{stem}_gt_labelTrainIds.png", lab)
        else:
            raise ValueError(f"no fake layout for {name!r}")
    if name == "acdc":  # written image-major; the source lists condition-major
        out = [out[i * 4 + k] for k in range(4) for i in range(n)]
    return out
