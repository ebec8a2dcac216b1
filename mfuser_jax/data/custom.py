"""Your own dataset with your own classes: a class list file and a generic folder layout.

Layout of a dataset folder D (any split names; "train" and "val" are the defaults):

  D/classes.txt                       the class list (below)
  D/images/<split>/<x>.{png,jpg,jpeg,bmp,tif,tiff,webp}   (sub-folders allowed)
  D/labels/<split>/<x>.png            single-channel PNG of label ids, same size
  D/sample_class_stats.json           written by `scripts/prepare_data.py folder`

Class list file: one class per line, ``<label id> <name> [<colour>]``; the line order
is the class order (the model's query / output channel order).

  # a comment; ' # ...' ends a line with one
  ignore 0                            # pixel value to ignore (default 255)
  1 road #804080
  2 traffic light 250,170,30
  3 sky

``<label id>`` is the class's pixel value in labels/*.png (0..255); ``<name>`` (spaces
allowed) is the text the model's query is built from; ``<colour>`` (``#rrggbb`` or
``r,g,b``) is its colour in predictions; without one a Cityscapes name keeps its
Cityscapes colour and other classes get distinct generated hues.

Internally labels become class indices 0..K-1 (file order) with 255 = ignore, like
every other source.
"""
from __future__ import annotations

import colorsys
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from mfuser_jax.data import imageio
from mfuser_jax.data import labels as L
from mfuser_jax.data.rcs import save_class_stats
from mfuser_jax.data.sources import DatasetLayoutError, FolderSource
from mfuser_jax.errors import ClassFileError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
LAYOUT = ("D/images/<split>/<x>.{png,jpg,...} and D/labels/<split>/<x>.png (label ids "
          "as listed in the class file); see the README section \"Your own dataset\"")


@dataclass(frozen=True)
class ClassList:
    names: tuple[str, ...]
    label_ids: tuple[int, ...]       # pixel value of each class in the label PNGs
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = L.IGNORE_INDEX

    def __len__(self):
        return len(self.names)

    def lut(self) -> np.ndarray:
        """256-entry uint8 table: label pixel value -> class index (255 = ignore)."""
        return label_lut(self.label_ids)


def label_lut(label_ids) -> np.ndarray:
    lut = np.full(256, L.IGNORE_INDEX, np.uint8)
    lut[np.asarray(label_ids, np.int64)] = np.arange(len(label_ids), dtype=np.uint8)
    return lut


def _colour_candidates() -> np.ndarray:
    """72 hues at three saturation/value levels, as float RGB rows."""
    out = [colorsys.hsv_to_rgb(h / 72, sat, val) for sat, val in
           ((0.75, 0.95), (0.9, 0.55), (0.4, 0.85)) for h in range(72)]
    return np.round(np.asarray(out) * 255)


def distinct_colours(used, n: int) -> list[tuple[int, int, int]]:
    """n colours, each in turn the candidate farthest (RGB distance) from `used` and from
    the ones chosen before it: a generated class never looks like a palette class
    (golden-ratio hues alone put some within 30 of Cityscapes' colours)."""
    cand = _colour_candidates()
    taken = [np.asarray(c, np.float64) for c in used]
    out = []
    for _ in range(n):
        if taken:
            d = np.sqrt(((cand[:, None] - np.asarray(taken)[None]) ** 2).sum(-1)).min(1)
            best = cand[int(np.argmax(d))]
        else:
            best = cand[0]
        taken.append(best)
        out.append(tuple(int(v) for v in best))
    return out


def default_palette(names, used=()) -> np.ndarray:
    """Cityscapes colours for Cityscapes class names; for the others distinct colours, far
    from those and from `used` (colours the caller's other classes have)."""
    cs = {n: i for i, n in enumerate(L.CLASSES)}
    known = [tuple(L.PALETTE[cs[n]]) for n in names if n in cs]
    new = iter(distinct_colours([*used, *known], sum(n not in cs for n in names)))
    return np.array([tuple(L.PALETTE[cs[n]]) if n in cs else next(new) for n in names],
                    np.uint8).reshape(-1, 3)


_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")


def _parse_colour(tok: str, where: str):
    """(r, g, b), or None when ``tok`` is not meant as a colour (part of the name)."""
    if tok.startswith("#"):
        if not _HEX.match(tok):
            raise ClassFileError(f"{where}: colour {tok!r} is not #rrggbb")
        return tuple(int(tok[k:k + 2], 16) for k in (1, 3, 5))
    if "," in tok:
        parts = tok.split(",")
        if len(parts) != 3 or not all(p.isdigit() and int(p) <= 255 for p in parts):
            raise ClassFileError(f"{where}: colour {tok!r} is not r,g,b with values 0..255")
        return tuple(int(p) for p in parts)
    return None


def _parse_id(tok: str, where: str, what: str) -> int:
    try:
        v = int(tok)
    except ValueError:
        raise ClassFileError(f"{where}: {what} {tok!r} is not an integer; lines are "
                             "'<label id> <name> [<colour>]' or 'ignore <id>'") from None
    if not 0 <= v <= 255:
        raise ClassFileError(f"{where}: {what} {v} is out of range: label PNGs hold 0..255")
    return v


def read_class_file(path: str) -> ClassList:
    """Parses a class list file; any mistake is one ClassFileError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ClassFileError(f"cannot read class file {path}: {e.strerror or e}") from None
    names, ids, colours, ignore = [], [], [], None
    first_line = {}
    for n, raw in enumerate(lines, 1):
        # comments: a line starting with '#', or ' # ...' at the end ('#rrggbb' is a colour)
        line = re.split(r"\s#(?:\s|$)", raw.strip(), maxsplit=1)[0].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path} line {n}"
        tok = line.split()
        if tok[0].lower() == "ignore":
            if len(tok) != 2 or ignore is not None:
                raise ClassFileError(f"{where}: expected one 'ignore <id>' line")
            ignore = _parse_id(tok[1], where, "ignore index")
            continue
        if len(tok) < 2:
            raise ClassFileError(f"{where}: expected '<label id> <name> [<colour>]', "
                                 f"got {line!r}")
        cid = _parse_id(tok[0], where, "label id")
        colour = _parse_colour(tok[-1], where) if len(tok) > 2 else None
        name = " ".join(tok[1:-1] if colour is not None else tok[1:])
        if name in first_line:
            raise ClassFileError(f"{where}: duplicate class name {name!r} (first on line "
                                 f"{first_line[name]})")
        if cid in ids:
            raise ClassFileError(f"{where}: label id {cid} is already used by class "
                                 f"{names[ids.index(cid)]!r}")
        first_line[name] = n
        names.append(name)
        ids.append(cid)
        colours.append(colour)
    ignore = L.IGNORE_INDEX if ignore is None else ignore
    if not names:
        raise ClassFileError(f"{path}: no classes; lines are '<label id> <name> [<colour>]'")
    if ignore in ids:
        raise ClassFileError(f"{path}: label id {ignore} is both the ignore index and class "
                             f"{names[ids.index(ignore)]!r}")
    if len(names) > 255:
        raise ClassFileError(f"{path}: {len(names)} classes; at most 255 fit 8-bit labels")
    fallback = default_palette(names, used=[c for c in colours if c is not None])
    palette = tuple(tuple(int(v) for v in (c if c is not None else fallback[i]))
                    for i, c in enumerate(colours))
    return ClassList(tuple(names), tuple(ids), palette, ignore)


# --------------------------------------------------------------------------- source

def _scan_images(folder: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(folder):
        out += [os.path.join(dirpath, f) for f in files if f.lower().endswith(IMAGE_EXTS)]
    return sorted(out)


def pair_files(root: str, split: str) -> tuple[list[str], list[str]]:
    """(images, labels) of D/images/<split> and D/labels/<split>, paired by path stem."""
    img_dir = os.path.join(root, "images", split)
    lab_dir = os.path.join(root, "labels", split)
    for d in (root, img_dir, lab_dir):
        if not os.path.isdir(d):
            raise DatasetLayoutError(f"folder dataset: {d} not found. Expected {LAYOUT}.")
    images = _scan_images(img_dir)
    if not images:
        raise DatasetLayoutError(f"folder dataset: no images in {img_dir}. Expected {LAYOUT}.")
    labels = [os.path.join(lab_dir, os.path.splitext(os.path.relpath(p, img_dir))[0] + ".png")
              for p in images]
    missing = [lp for lp in labels if not os.path.isfile(lp)]
    if missing:
        raise DatasetLayoutError(f"folder dataset: {len(missing)} of {len(images)} label "
                                 f"files missing (first: {missing[0]}). Expected {LAYOUT}.")
    return images, labels


class FolderDatasetSource(FolderSource):
    """One split of a generic folder dataset; labels -> class indices through a LUT."""

    def __init__(self, root: str, split: str, label_ids=(), ignore_index: int = L.IGNORE_INDEX,
                 test_scale=None):
        images, labels = pair_files(root, split)
        super().__init__("folder", root, images, labels,
                         tuple(test_scale) if test_scale else None)
        self.split = split
        # No class list: labels already hold Cityscapes trainIds (as the other sources).
        self.lookup_table = label_lut(label_ids) if len(label_ids) else L.TRAINID_LUT.copy()
        self.lookup_table[int(ignore_index)] = L.IGNORE_INDEX
        self.num_classes = len(label_ids) or L.NUM_CLASSES

    def image_name(self, i: int) -> str:
        return os.path.relpath(self.images[i], self.root)

    def label_key(self, i: int) -> str:
        return os.path.relpath(self.labels[i], self.root).replace(os.sep, "/")

    def class_stats(self) -> list[dict] | None:
        """Per-image {class index: pixels} of this split from D/sample_class_stats.json."""
        path = self.stats_file
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            by_file = {e.pop("file"): {int(c): int(n) for c, n in e.items()}
                       for e in map(dict, json.load(f))}
        out = []
        for i in range(len(self)):
            key = self.label_key(i)
            st = by_file.get(key)
            if st is None or any(c >= self.num_classes for c in st):
                raise DatasetLayoutError(
                    f"{path} is stale (no entry for {key}, or other classes): re-run "
                    "`python scripts/prepare_data.py folder --root D --classes FILE`")
            out.append(st)
        return out


# --------------------------------------------------------------------------- prepare

def _check_one(args):
    """(stats {index: pixels} or None, error message or None) of one image/label pair."""
    image, label, lut, allowed = args
    try:
        lab = imageio.read_label(label)
        from PIL import Image
        with Image.open(image) as im:  # header only: the size
            w, h = im.size
    except (imageio.DataFileError, OSError) as e:
        return None, str(e)
    if (h, w) != lab.shape:
        return None, f"{label}: size {lab.shape} differs from image {image} size {(h, w)}"
    bad = np.setdiff1d(np.unique(lab), allowed)
    if bad.size:
        return None, (f"{label}: values {bad[:10].tolist()} are neither label ids of the "
                      "class file nor its ignore index")
    cnt = np.bincount(lut[lab].ravel(), minlength=256)[:255]
    return {str(c): int(n) for c, n in enumerate(cnt) if n > 0}, None


def prepare_folder(root: str, classes: str, nproc: int = 1, progress: bool = True) -> dict:
    """Checks every image/label pair of every split and writes D/sample_class_stats.json.

    Returns {"splits": {split: images}, "classes": K}. Raises ClassFileError or
    DatasetLayoutError (with the file names) on bad input; nothing is written then.
    """
    cl = read_class_file(classes)
    img_root = os.path.join(root, "images")
    if not os.path.isdir(img_root):
        raise DatasetLayoutError(f"folder dataset: {img_root} not found. Expected {LAYOUT}.")
    splits = sorted(d for d in os.listdir(img_root) if os.path.isdir(os.path.join(img_root, d)))
    if not splits:
        raise DatasetLayoutError(f"folder dataset: no split folders (e.g. train/, val/) in "
                                 f"{img_root}. Expected {LAYOUT}.")
    pairs = []
    counts = {}
    for s in splits:
        images, labels = pair_files(root, s)
        pairs += list(zip(images, labels))
        counts[s] = len(images)
    lut = cl.lut()
    allowed = np.array(sorted(set(cl.label_ids) | {cl.ignore_index}))
    args = [(im, lab, lut, allowed) for im, lab in pairs]
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional
        def tqdm(x, **_):
            return x
    if nproc > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(nproc) as pool:
            results = list(tqdm(pool.imap(_check_one, args, chunksize=8), total=len(args),
                                desc="folder: checking labels", disable=not progress))
    else:
        results = [_check_one(a) for a in tqdm(args, desc="folder: checking labels",
                                              disable=not progress)]
    errors = [e for _, e in results if e]
    if errors:
        raise DatasetLayoutError(f"{len(errors)} of {len(pairs)} labels are unusable:\n  "
                                 + "\n  ".join(errors[:20]))
    entries = [{"file": os.path.relpath(lab, root).replace(os.sep, "/"), **st}
               for (_, lab), (st, _) in zip(pairs, results)]
    save_class_stats(root, entries)
    return {"splits": counts, "classes": len(cl)}
