"""Rare-class sampling (RCS), as DAFormer's UDADataset/UGDataset does it.

Ported from devinxzhang/MFuser mmseg/datasets/ug_dataset.py (get_rcs_class_probs,
get_rare_class_sample):

* class frequencies f_c = pixels of c / all pixels, over the classes present in the
  statistics, ordered by increasing pixel count; P(c) = softmax((1 - f_c) / class_temp);
* an image is drawn uniformly among those holding more than ``min_pixels`` of c;
* its training crop is re-drawn (up to 10 more times) until it holds more than
  ``min_pixels * min_crop_ratio`` pixels of c.

Deviation: the reference asserts that every class has an eligible image; a class
without one is dropped here (with a warning) and the others renormalised, so small
or partial datasets still train.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

log = logging.getLogger(__name__)


def rcs_class_probs(stats: list[dict], class_temp: float):
    """(classes, probabilities) from per-image {class: pixels} statistics."""
    total: dict[int, int] = {}
    for s in stats:
        for c, n in s.items():
            total[int(c)] = total.get(int(c), 0) + int(n)
    items = sorted(total.items(), key=lambda kv: kv[1])
    classes = np.array([c for c, _ in items], np.int64)
    freq = np.array([n for _, n in items], np.float64)
    freq = 1.0 - freq / freq.sum()
    logits = freq / class_temp
    p = np.exp(logits - logits.max())
    return classes, p / p.sum()


class RareClassSampler:
    """Draws (image index, class) pairs for rare-class sampling."""

    def __init__(self, stats: list[dict], class_temp: float = 100.0,
                 min_pixels: int = 3000, min_crop_ratio: float = 0.5):
        classes, probs = rcs_class_probs(stats, class_temp)
        samples = {int(c): np.array([i for i, s in enumerate(stats)
                                     if int(s.get(int(c), 0)) > min_pixels], np.int64)
                   for c in classes}
        keep = np.array([len(samples[int(c)]) > 0 for c in classes])
        if not keep.all():
            log.warning("rare-class sampling: no image has more than %d pixels of classes "
                        "%s; they are not sampled", min_pixels, classes[~keep].tolist())
        if not keep.any():
            raise ValueError(
                f"rare-class sampling: no image has more than min_pixels={min_pixels} "
                "pixels of any class; lower config.data.rcs.min_pixels or disable RCS")
        self.classes = classes[keep]
        self.probs = probs[keep] / probs[keep].sum()
        self.samples = samples
        self.min_crop_pixels = min_pixels * min_crop_ratio
        self.min_crop_ratio = min_crop_ratio

    def draw(self, rng: np.random.Generator) -> tuple[int, int]:
        c = int(rng.choice(self.classes, p=self.probs))
        i = int(rng.choice(self.samples[c]))
        return i, c

    def crop_ok(self, label_crop: np.ndarray, c: int) -> bool:
        return self.min_crop_ratio <= 0 or int((label_crop == c).sum()) > self.min_crop_pixels


def save_class_stats(ds: str, entries: list[dict]):
    """Writes the files rare-class sampling reads: sample_class_stats.json (per image: file
    and pixel count per class) and samples_with_class.json (per class: [file, count])."""
    with open(os.path.join(ds, "sample_class_stats.json"), "w") as f:
        json.dump(entries, f, indent=1)
    by_class: dict[str, list] = {}
    for e in entries:
        for c, n in e.items():
            if c != "file":
                by_class.setdefault(c, []).append([e["file"], n])
    with open(os.path.join(ds, "samples_with_class.json"), "w") as f:
        json.dump(by_class, f, indent=1)
