"""Convert dataset labels to Cityscapes trainIds and write rare-class statistics.

  python scripts/prepare_data.py {gta,synthia,cityscapes,mapillary} --root DATA_ROOT
      [--nproc N] [--force] [--mapillary_mapping {by-name,25-class}]
  python scripts/prepare_data.py folder --root DATASET_DIR [--classes classes.txt]

Reads the labels as released and writes <name>_labelTrainIds.png next to them:
  gta:        gta/labels/<n>.png                      (ids as Cityscapes labelIds)
  synthia:    synthia/GT/LABELS/<n>.png               (16-bit RGB, class id in channel 1)
  cityscapes: cityscapes/gtFine/<split>/<city>/<x>_gtFine_labelIds.png
  mapillary:  mapillary/<split>/labels/<x>.png or mapillary/<split>/v1.2/labels/<x>.png
              (v1.2 class indices 0..65) -> mapillary/<split>/labels/<x>_labelTrainIds.png
              by class name as Rein's mapillary2cityscape.py (default, "by-name") or by
              the 25-entry table of DAFormer-style code ("25-class"); see labels.py.
              The choice is recorded in mapillary/trainid_mapping.txt and a change
              reconverts every label.
and, in the dataset folder, sample_class_stats.json (one {"file", class: pixels} per
training image) and samples_with_class.json ({class: [[file, pixels], ...]}), the
statistics rare-class sampling reads (same format as DAFormer's conversion scripts).

Resumable: a label whose *_labelTrainIds.png already exists and reads back is not
converted again (its statistics are recomputed from it). Ends by verifying counts.
Label conversion follows devinxzhang/MFuser tools/convert_datasets/*.py.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys

import numpy as np

from mfuser_jax.data import imageio, labels as L
from mfuser_jax.data.rcs import save_class_stats
from mfuser_jax.data.sources import LAYOUTS, README_SECTION
from mfuser_jax.files import atomic_write
from mfuser_jax.errors import PrepareError

OUT_SUFFIX = "_labelTrainIds.png"


MAPILLARY_MAPPING_FILE = "trainid_mapping.txt"


# (lut, reader, allowed raw ids) per dataset.
def _spec(name, mapillary_mapping="by-name"):
    cs_ids = set(range(35)) | {255}
    if name == "mapillary":
        return (L.make_lut(L.MAPILLARY_MAPPINGS[mapillary_mapping]), imageio.read_label,
                set(range(66)))
    return {
        "gta": (L.GTA_LUT, imageio.read_label, cs_ids),
        "synthia": (L.SYNTHIA_LUT, imageio.read_synthia_label, set(range(23))),
        "cityscapes": (L.CITYSCAPES_LUT, imageio.read_label, cs_ids),
    }[name]


def _scan(folder, suffix, exclude=OUT_SUFFIX):
    out = []
    for dirpath, _, files in os.walk(folder):
        out += [os.path.join(dirpath, f) for f in files
                if f.endswith(suffix) and not f.endswith(exclude)]
    return sorted(out)


def find_jobs(name: str, root: str):
    """[(input label, output label, counts toward statistics)], dataset folder, images."""
    def missing(path):
        return PrepareError(f"{name}: {path} not found. Expected under --root: "
                            f"{LAYOUTS[name]}. See the {README_SECTION}.")

    ds = os.path.join(root, name)
    if not os.path.isdir(ds):
        raise missing(ds)
    jobs, n_images = [], None
    if name in ("gta", "synthia"):
        lab_dir = os.path.join(ds, "labels") if name == "gta" else os.path.join(ds, "GT", "LABELS")
        img_dir = os.path.join(ds, "images") if name == "gta" else os.path.join(ds, "RGB")
        if not os.path.isdir(lab_dir):
            raise missing(lab_dir)
        for p in _scan(lab_dir, ".png"):
            jobs.append((p, p[:-4] + OUT_SUFFIX, True))
        n_images = len(_scan(img_dir, ".png")) if os.path.isdir(img_dir) else None
    elif name == "cityscapes":
        gt = os.path.join(ds, "gtFine")
        if not os.path.isdir(gt):
            raise missing(gt)
        for p in _scan(gt, "_gtFine_labelIds.png"):
            split = os.path.relpath(p, gt).split(os.sep)[0]
            jobs.append((p, p[: -len("_labelIds.png")] + OUT_SUFFIX, split == "train"))
        img_dir = os.path.join(ds, "leftImg8bit")
        n_images = len(_scan(img_dir, "_leftImg8bit.png")) if os.path.isdir(img_dir) else None
    else:  # mapillary
        splits = [s for s in ("training", "validation") if os.path.isdir(os.path.join(ds, s))]
        if not splits:
            raise missing(os.path.join(ds, "validation"))
        n_images = 0
        for s in splits:
            out_dir = os.path.join(ds, s, "labels")
            src_dir = os.path.join(ds, s, "v1.2", "labels")
            if not os.path.isdir(src_dir):
                src_dir = out_dir
            if not os.path.isdir(src_dir):
                raise missing(src_dir)
            for p in _scan(src_dir, ".png"):
                rel = os.path.relpath(p, src_dir)[:-4]
                jobs.append((p, os.path.join(out_dir, rel + OUT_SUFFIX), s == "training"))
            img_dir = os.path.join(ds, s, "images")
            n_images += len(_scan(img_dir, ".jpg")) if os.path.isdir(img_dir) else 0
    if not jobs:
        raise PrepareError(f"{name}: no label files found under {ds}. Expected: "
                           f"{LAYOUTS[name]}. See the {README_SECTION}.")
    return jobs, ds, n_images


def _stats(trainids: np.ndarray) -> dict:
    cnt = np.bincount(trainids.ravel(), minlength=256)[: L.NUM_CLASSES]
    return {str(c): int(n) for c, n in enumerate(cnt) if n > 0}


def convert_one(args):
    """Returns (output path, stats or None, 'done'|'skipped', error message or None)."""
    name, src, dst, force, mapping = args
    lut, reader, allowed = _spec(name, mapping)
    if not force and os.path.isfile(dst):
        try:
            out = imageio.read_label(dst)
            bad = np.setdiff1d(np.unique(out), np.r_[np.arange(L.NUM_CLASSES), L.IGNORE_INDEX])
            if bad.size == 0:
                return dst, _stats(out), "skipped", None
        except imageio.DataFileError:
            pass  # unreadable (e.g. interrupted): convert again
    try:
        raw = reader(src)
    except imageio.DataFileError as e:
        return dst, None, "failed", str(e)
    bad = sorted(set(np.unique(raw).tolist()) - allowed)
    if bad:
        return dst, None, "failed", (f"{src}: label values {bad[:10]} are not {name} class "
                                     "ids; is this the right dataset / file?")
    out = lut[raw]
    with atomic_write(dst) as (tmp,):  # an interrupted run never leaves half a file
        imageio.write_label(tmp, out)
    return dst, _stats(out), "done", None


def prepare(name: str, root: str, nproc: int = 1, force: bool = False,
            progress: bool = True, mapillary_mapping: str = "by-name") -> dict:
    """Converts one dataset; returns counts {"done", "skipped", "stats", "labels"}."""
    if mapillary_mapping not in L.MAPILLARY_MAPPINGS:
        raise PrepareError(f"unknown Mapillary mapping {mapillary_mapping!r}; choose one of "
                           f"{', '.join(L.MAPILLARY_MAPPINGS)}")
    jobs, ds, n_images = find_jobs(name, root)
    if name == "mapillary":  # labels converted with the other mapping must be redone
        record = os.path.join(ds, MAPILLARY_MAPPING_FILE)
        previous = open(record).read().strip() if os.path.isfile(record) else None
        force = force or previous != mapillary_mapping
        with open(record, "w") as f:
            f.write(mapillary_mapping + "\n")
    args = [(name, src, dst, force, mapillary_mapping) for src, dst, _ in jobs]
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional
        def tqdm(x, **_):
            return x
    results = []
    if nproc > 1:
        with mp.get_context("spawn").Pool(nproc) as pool:
            it = pool.imap(convert_one, args, chunksize=4)
            results = list(tqdm(it, total=len(args), desc=f"{name} -> trainIds",
                                disable=not progress))
    else:
        results = [convert_one(a) for a in tqdm(args, desc=f"{name} -> trainIds",
                                                disable=not progress)]
    failed = [r[3] for r in results if r[2] == "failed"]
    if failed:
        raise PrepareError(f"{len(failed)} of {len(jobs)} {name} labels could not be "
                           "converted:\n  " + "\n  ".join(failed[:20]))
    entries = []
    for (src, dst, in_stats), (_, st, _, _) in zip(jobs, results):
        if in_stats:
            entries.append({"file": os.path.relpath(dst, ds), **st})
    save_class_stats(ds, entries)
    # Verification: every label converted and readable, statistics complete.
    n_out = sum(os.path.isfile(dst) for _, dst, _ in jobs)
    counts = {"labels": len(jobs), "done": sum(r[2] == "done" for r in results),
              "skipped": sum(r[2] == "skipped" for r in results),
              "stats": len(entries), "images": n_images}
    if n_out != len(jobs) or len(entries) != sum(s for _, _, s in jobs):
        raise PrepareError(f"{name}: verification failed: {n_out} of {len(jobs)} "
                           f"*{OUT_SUFFIX} files exist, {len(entries)} statistics entries")
    if n_images is not None and n_images != len(jobs):
        raise PrepareError(f"{name}: verification failed: {n_images} images but "
                           f"{len(jobs)} labels under {ds}")
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset", choices=["gta", "synthia", "cityscapes", "mapillary", "folder"])
    p.add_argument("--root", required=True, help="data_root holding gta/, synthia/, ... "
                   "(folder: the dataset folder holding images/ and labels/)")
    p.add_argument("--classes", help="folder: the class list file (default ROOT/classes.txt)")
    p.add_argument("--nproc", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--force", action="store_true", help="convert finished files again")
    p.add_argument("--mapillary_mapping", choices=list(L.MAPILLARY_MAPPINGS),
                   default="by-name",
                   help="Mapillary classes -> Cityscapes: by name as Rein's conversion "
                        "(default) or the 25-entry table of DAFormer-style code")
    a = p.parse_args(argv)
    if a.dataset == "folder":
        return _main_folder(a)
    try:
        c = prepare(a.dataset, a.root, a.nproc, a.force,
                    mapillary_mapping=a.mapillary_mapping)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # a mistake the user can fix, as every script reports it
    print(f"{a.dataset}: {c['labels']} labels ({c['done']} converted, {c['skipped']} "
          f"already done), {c['stats']} images in sample_class_stats.json; verified.")
    return 0


def _main_folder(a):
    """`folder`: checks a generic dataset (mfuser_jax/data/custom.py) and writes its
    rare-class statistics; labels are read as they are (no conversion)."""
    from mfuser_jax.data.custom import ClassFileError, prepare_folder
    from mfuser_jax.data.sources import DatasetLayoutError
    classes = a.classes or os.path.join(a.root, "classes.txt")
    try:
        c = prepare_folder(a.root, classes, a.nproc)
    except (ClassFileError, DatasetLayoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{s} {n}" for s, n in c["splits"].items())
    print(f"folder {a.root}: {c['classes']} classes; images per split: {splits}; "
          f"{os.path.join(a.root, 'sample_class_stats.json')} written; verified.")
    return 0
