"""Multi-source training: several datasets mixed by a per-source sampling ratio.

``data.train = "gta+synthia"`` (any '+'-joined training names, splits allowed:
"gta+synthia+cityscapes:train") with ``data.mix_ratios = (0.5, 0.5)`` (one weight per
source, normalised; empty = equal shares). Every training example first draws its source
with those probabilities, then an image of that source: by rare-class sampling over that
source's own class statistics (as DAFormer's RCS, per source) when enabled and available,
uniformly otherwise. All draws come from the example's generator, seeded with
(seed, step, global slot), so a batch stays a pure function of (seed, step, process) and
resuming at step k gives step k's batch, as for a single source.
"""
from __future__ import annotations

import numpy as np

MIX_SEPARATOR = "+"


def is_mix(name: str) -> bool:
    return MIX_SEPARATOR in name and not name.startswith("tfds:")


def split_mix(name: str) -> list[str]:
    parts = [p.strip() for p in name.split(MIX_SEPARATOR)]
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"data.train {name!r}: expected source names joined by '+', "
                         "e.g. 'gta+synthia'")
    return parts


def mix_probabilities(ratios, n: int, name: str) -> np.ndarray:
    ratios = tuple(ratios or ())
    if not ratios:
        return np.full(n, 1.0 / n)
    if len(ratios) != n:
        raise ValueError(f"data.mix_ratios {ratios} has {len(ratios)} entries for the {n} "
                         f"sources of {name!r}")
    w = np.asarray(ratios, np.float64)
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"data.mix_ratios {ratios}: weights must be >= 0 with a positive sum")
    return w / w.sum()


class MixedSource:
    """The sources' images under one index space (source k owns [offset_k, offset_k+1))."""

    stats_file = None
    root = None
    test_scale = None

    def __init__(self, name: str, sources: list):
        self.name, self.sources = name, list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self):
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Global index -> (source k, index within source k)."""
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, int(i - self.offsets[k])

    def load(self, i: int):
        k, j = self.locate(int(i))
        return self.sources[k].load(j)

    def label_key(self, i: int) -> str:
        k, j = self.locate(int(i))
        return f"{k}/{self.sources[k].label_key(j)}"


class MixSampler:
    """draw(rng) -> (global index, class or None); the TrainExample sampler protocol."""

    def __init__(self, source: MixedSource, probs: np.ndarray, samplers: list):
        self.source, self.probs, self.samplers = source, np.asarray(probs), list(samplers)
        crop = [s for s in self.samplers if s is not None]
        self._crop_ok = crop[0].crop_ok if crop else None

    def draw(self, rng: np.random.Generator) -> tuple[int, int | None]:
        k = int(rng.choice(len(self.probs), p=self.probs))
        sub = self.samplers[k]
        if sub is None:
            i, c = int(rng.integers(len(self.source.sources[k]))), None
        else:
            i, c = sub.draw(rng)
        return int(self.source.offsets[k]) + i, c

    def crop_ok(self, label_crop: np.ndarray, c) -> bool:
        # every per-source RCS sampler shares config.data.rcs, so any one judges crops
        return c is None or self._crop_ok(label_crop, c)
