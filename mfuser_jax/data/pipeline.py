"""Training and evaluation input pipelines (grain), deterministic and resumable.

Config fields read (configs/base.py's ``data_config`` sets every ``data.*`` field and
its default):

  config.seed               the one seed of the run.
  config.batch_size         global batch; each process yields batch_size // process_count.
  config.data_root          folder holding gta/, synthia/, cityscapes/, bdd100k/,
                            mapillary/.
  data.train                training source: "gta", "synthia", "cityscapes", "bdd100k",
                            "mapillary", "folder", "synthetic" or "tfds:<name>";
                            "name:split" picks a split (defaults: gta/synthia all images,
                            cityscapes/bdd100k/folder train, mapillary training, synthetic
                            train). Several joined by '+' ("gta+synthia") are mixed
                            (mfuser_jax/data/mix.py).
  data.mix_ratios           sampling weight of each '+'-joined training source
                            (normalised; empty = equal shares).
  data.eval                 tuple of evaluation sources: "cityscapes", "bdd100k",
                            "mapillary", "synthetic_real", "synthetic", "gta", "synthia",
                            "tfds:<name>", "acdc" (every condition and overall; "acdc:val:fog"
                            one), "dark_zurich", "folder", "name:split" (defaults: the val
                            splits).
  data.folder               root, classes, label_ids, ignore_index, test_scale: the generic
                            dataset "folder" (mfuser_jax/data/custom.py; configs/custom.py
                            fills it from a class list). Empty label_ids: labels are
                            Cityscapes trainIds.
  data.crop_size            int or (h, w).
  data.ratio_range          random rescale of the original size; None = off.
  data.cat_max_ratio        1.0 disables the class-balanced crop retries.
  data.flip_prob            horizontal flip probability.
  data.photometric          mmseg's PhotoMetricDistortion on or off.
  data.rcs                  enabled, class_temp, min_pixels, min_crop_ratio: rare-class
                            sampling; needs the source's sample_class_stats.json
                            (scripts/prepare_data.py) and stops with an error without it,
                            as the reference does. enabled=False samples uniformly (a
                            different recipe).
  data.num_workers          0 = in-process; N = N grain worker processes.
  data.worker_buffer_size   batches each worker prepares ahead.
  data.read_threads         threads per process (or worker) preparing batches.
  data.read_prefetch        batches read ahead by those threads.
  data.skip_corrupt         False: a corrupt file stops the run naming it; True: skip it
                            with a warning (the next image is used) and count it.
  data.synthetic            num_train, num_eval, image_size, seed: the embedded demo domains.
  data.tfds                 name, split, eval_split, data_dir, image_key, label_key,
                            label_map: defaults fit TFDS's `cityscapes` builder (labelIds).
                            The dataset must be prepared as ArrayRecord
                            (`tfds build NAME --file_format=array_record`). Reading needs
                            no TensorFlow (tfds.features.Image decodes with PIL); writing
                            Image features needs TensorFlow only when given numpy arrays
                            (PIL images, bytes or paths are stored without it).

Determinism: training example (step, slot) of process p is a pure function of
(seed, step, p * local_batch + slot): the image index comes from a per-epoch
permutation (or from rare-class sampling) and every random augmentation from a
generator seeded with those numbers. Worker count, prefetching and restarts do not
change any batch. Images stay uint8 (the model normalises); labels are int32 trainIds
with 255 = ignore.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import weakref
from typing import Iterator

import ml_collections
import numpy as np

from mfuser_jax.data import mix
from mfuser_jax.data import sources as S
from mfuser_jax.data.custom import FolderDatasetSource
from mfuser_jax.data.imageio import DataFileError
from mfuser_jax.data.rcs import RareClassSampler
from mfuser_jax.data.synthetic import SyntheticSource
from mfuser_jax.data.transforms import test_resize, train_transform

log = logging.getLogger(__name__)

# Files skipped because they could not be read (per process; data.skip_corrupt=True).
SKIPPED_FILES: list[str] = []


def _to_plain(x):
    if isinstance(x, (ml_collections.ConfigDict, dict)):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_to_plain(v) for v in x)
    return x


def resolve_config(config) -> dict:
    """Plain (picklable) dict: seed, batch_size, data_root and data.*."""
    return {"seed": int(config.seed), "batch_size": int(config.batch_size),
            "data_root": str(config.data_root), "data": _to_plain(config.data)}


def _split_name(name: str) -> tuple[str, str | None]:
    if name.startswith("tfds:"):
        rest = name[5:]
        base, _, split = rest.partition(":")
        return f"tfds:{base}", split or None
    base, _, split = name.partition(":")
    return base, split or None


_TRAIN_SPLITS = {"gta": "all", "synthia": "all", "cityscapes": "train", "bdd100k": "train",
                 "mapillary": "training", "acdc": "train", "dark_zurich": "val"}
_EVAL_SPLITS = {"gta": "all", "synthia": "all", "cityscapes": "val", "bdd100k": "val",
                "mapillary": "validation", "acdc": "val", "dark_zurich": "val"}
_FOLDER_SOURCES = {"gta": S.gta_source, "synthia": S.synthia_source,
                   "cityscapes": S.cityscapes_source, "bdd100k": S.bdd100k_source,
                   "mapillary": S.mapillary_source, "acdc": S.acdc_source,
                   "dark_zurich": S.dark_zurich_source}


def build_source(cfg: dict, name: str, *, train: bool):
    """A random-access source (``len``, ``load(i)``) for a configured dataset name."""
    if mix.is_mix(name):
        return mix.MixedSource(name, [build_source(cfg, n, train=train)
                                      for n in mix.split_mix(name)])
    base, split = _split_name(name)
    d = cfg["data"]
    if base == "folder":
        return _folder_source(d["folder"], split or ("train" if train else "val"))
    if base in ("synthetic", "synthetic_real"):
        syn = d["synthetic"]
        style = "synthetic" if base == "synthetic" else "real"
        split = split or ("train" if train else "val")
        num = syn["num_train"] if split == "train" else syn["num_eval"]
        return SyntheticSource(num, seed=int(syn["seed"]), split=split,
                               size=tuple(syn["image_size"]), style=style, name=base)
    if base.startswith("tfds:"):
        t = d["tfds"]
        tname = base[5:] or t["name"]
        split = split or (t["split"] if train else t["eval_split"])
        return S.TFDSSource(tname, split, data_dir=t["data_dir"] or None,
                            image_key=t["image_key"], label_key=t["label_key"],
                            label_map=t["label_map"])
    if base not in _FOLDER_SOURCES:
        raise ValueError(
            f"unknown dataset {name!r}: expected one of {sorted(_FOLDER_SOURCES)}, "
            "'folder', 'synthetic', 'synthetic_real' or 'tfds:<name>' (optionally ':split')")
    root = cfg["data_root"]
    if not os.path.isdir(root):
        raise S.DatasetLayoutError(
            f"data_root {root!r} does not exist: set --config.data_root to the folder "
            f"holding gta/, synthia/, cityscapes/, bdd100k/, mapillary/ (see the "
            f"{S.README_SECTION}).")
    split = split or (_TRAIN_SPLITS if train else _EVAL_SPLITS)[base]
    return _FOLDER_SOURCES[base](root, split)


def _folder_source(f: dict, split: str):
    if not f["root"]:
        raise S.DatasetLayoutError(
            "dataset 'folder' needs config.data.folder.root (the folder holding images/ "
            "and labels/): use configs/custom.py:root=DIR or --config.data.folder.root=DIR")
    return FolderDatasetSource(f["root"], split, tuple(f["label_ids"]),
                               int(f["ignore_index"]), tuple(f["test_scale"]) or None)


def _train_sampler(cfg: dict, source):
    """A mixed source gets its ratio sampler (over per-source RCS); others RCS or None."""
    if not isinstance(source, mix.MixedSource):
        return _make_sampler(cfg, source)
    probs = mix.mix_probabilities(cfg["data"]["mix_ratios"], len(source.sources),
                                  source.name)
    return mix.MixSampler(source, probs, [_make_sampler(cfg, s) for s in source.sources])


def _load(source, i: int, skip_corrupt: bool):
    n = len(source)
    for k in range(10 if skip_corrupt else 1):
        j = (i + k) % n
        try:
            return source.load(j)
        except DataFileError as e:
            if not skip_corrupt:
                raise DataFileError(
                    f"{e} (set config.data.skip_corrupt=True to skip unreadable files)"
                ) from None
            SKIPPED_FILES.append(str(e))
            log.warning("skipping unreadable file (%d so far): %s", len(SKIPPED_FILES), e)
    raise DataFileError(f"{source.name}: 10 consecutive unreadable files from index {i}")


class TrainExample:
    """Flat local sample index -> one augmented example (picklable for grain workers)."""

    def __init__(self, cfg: dict, source, sampler, local_batch: int, process_index: int):
        self.cfg, self.source, self.sampler = cfg, source, sampler
        self.local_batch, self.process_index = local_batch, process_index
        d = cfg["data"]
        crop = d["crop_size"]
        self.crop = (int(crop), int(crop)) if np.isscalar(crop) else tuple(map(int, crop))
        rr = d["ratio_range"]
        self.kw = dict(crop_size=self.crop, ratio_range=tuple(rr) if rr else None,
                       cat_max_ratio=float(d["cat_max_ratio"]),
                       flip_prob=float(d["flip_prob"]), photometric=bool(d["photometric"]))
        self.global_batch = local_batch * int(cfg["process_count"])
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 2:
                self._perm_cache.clear()
            rng = np.random.default_rng(np.random.SeedSequence([self.cfg["seed"], 7, epoch]))
            self._perm_cache[epoch] = rng.permutation(len(self.source))
        return self._perm_cache[epoch]

    def example(self, step: int, slot: int) -> dict:
        g = self.process_index * self.local_batch + slot  # global slot in the step
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg["seed"], step, g]))
        accept = None
        if self.sampler is not None:
            i, c = self.sampler.draw(rng)
            accept = functools.partial(self.sampler.crop_ok, c=c)
        else:
            n = step * self.global_batch + g
            i = int(self._perm(n // len(self.source))[n % len(self.source)])
        img, lab, _ = _load(self.source, i, self.cfg["data"]["skip_corrupt"])
        img, lab = train_transform(img, lab, rng, accept=accept, **self.kw)
        return {"image": img, "label": lab.astype(np.int32)}

    def __call__(self, flat_index: int) -> dict:
        flat_index = int(flat_index)
        return self.example(flat_index // self.local_batch, flat_index % self.local_batch)


def _make_sampler(cfg: dict, source):
    rcs = cfg["data"]["rcs"]
    if not rcs["enabled"]:
        return None
    stats = S.load_class_stats(source)
    if stats is None:  # the reference fails here too; training uniformly changes the recipe
        raise S.DatasetLayoutError(
            f"rare-class sampling needs class statistics for {source.name} "
            f"({getattr(source, 'stats_file', None) or 'none for this source'}): run "
            f"scripts/prepare_data.py for it, or pass --config.data.rcs.enabled=False to "
            f"sample uniformly")
    return RareClassSampler(stats, float(rcs["class_temp"]), int(rcs["min_pixels"]),
                            float(rcs["min_crop_ratio"]))


def _grain():
    try:
        import grain
    except ImportError:
        return None
    # grain's multiprocessing reads absl flags; scripts that do not use absl.app never
    # parse them, so accept the defaults.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return grain


def make_train_iterator(config, *, start_step: int = 0, process_index: int = 0,
                        process_count: int = 1) -> Iterator[dict]:
    """Batches {"image": uint8 (b, crop, crop, 3), "label": int32 (b, crop, crop)}.

    b = batch_size // process_count; batch k is training step start_step + k.
    """
    cfg = resolve_config(config)
    if cfg["batch_size"] % process_count:
        raise ValueError(f"batch_size {cfg['batch_size']} is not divisible by the "
                         f"{process_count} processes")
    b = cfg["batch_size"] // process_count
    cfg["process_count"] = process_count
    source = build_source(cfg, cfg["data"]["train"], train=True)
    fn = TrainExample(cfg, source, _train_sampler(cfg, source), b, process_index)
    workers = int(cfg["data"]["num_workers"])
    grain = _grain()
    if grain is None:
        if workers:
            raise ImportError("config.data.num_workers > 0 needs `pip install grain`")
        return _plain_train_iter(fn, start_step, b)
    stop = np.iinfo(np.int64).max // 2
    ds = grain.MapDataset.range(start_step * b, stop).map(fn).batch(b)
    # Bounded read-ahead (grain's default is 16 threads and 500 elements per process).
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=int(cfg["data"]["read_threads"]),
        prefetch_buffer_size=int(cfg["data"]["read_prefetch"])))
    if workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers,
            per_worker_buffer_size=int(cfg["data"]["worker_buffer_size"])))
    gen = _closing(iter(ds))
    _OPEN_ITERATORS.add(gen)
    return gen


_OPEN_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _close_open_iterators():
    # Shut grain workers down while the interpreter is intact (their buffers hold
    # shared memory that cannot be released cleanly during interpreter teardown).
    for gen in list(_OPEN_ITERATORS):
        gen.close()


def _closing(it):
    """Yields from a grain iterator and shuts its workers down when done or closed.

    Worker outputs live in shared memory that grain frees only when the arrays die;
    copying them into plain arrays frees it at once (not noisily at interpreter exit).
    """
    try:
        for batch in it:
            yield {k: np.array(v) if isinstance(v, np.ndarray) else v
                   for k, v in batch.items()}
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _plain_train_iter(fn: TrainExample, start_step: int, b: int):
    step = start_step
    while True:
        ex = [fn.example(step, j) for j in range(b)]
        yield {k: np.stack([e[k] for e in ex]) for k in ex[0]}
        step += 1


class EvalExample:
    """keep_original: also the image before the test resize and the test scale, for
    multi-scale testing (evaluation.ratios), which resizes the original to each scale."""

    def __init__(self, source, skip_corrupt: bool, keep_original: bool = False):
        self.source, self.skip_corrupt = source, skip_corrupt
        self.keep_original = keep_original

    def __call__(self, i: int) -> dict:
        img, lab, name = _load(self.source, int(i), self.skip_corrupt)
        out = {"image": test_resize(img, self.source.test_scale)[None],
               "label": lab[None].astype(np.int32), "name": name}
        if self.keep_original:
            out["original"] = img[None]
            out["test_scale"] = np.asarray(self.source.test_scale or (), np.int64)
        if getattr(self.source, "groups", ()):  # e.g. ACDC's condition of the image
            out["group"] = self.source.group(int(i))
        return out


def eval_test_scale(config, name: str) -> tuple[int, int] | None:
    """The test-time resize scale (w, h) of evaluation dataset `name`, read from the
    config without touching the disk; None: evaluated at the images' own size (ACDC,
    Dark Zurich, synthetic, TFDS, a folder dataset without data.folder.test_scale)."""
    base = name.split(":", 1)[0]
    if base == "folder":
        scale = tuple(config.data.get("folder", {}).get("test_scale", ()) or ())
        return tuple(int(v) for v in scale) or None
    return S.TEST_SCALES.get(base)


def eval_dataset_groups(config, name: str) -> tuple[str, ...]:
    """Names of the groups (ACDC's conditions) an evaluation also reports; () if none."""
    return tuple(getattr(build_source(resolve_config(config), name, train=False),
                         "groups", ()))


def make_eval_iterator(config, name: str, *, process_index: int = 0,
                       process_count: int = 1) -> Iterator[dict]:
    """{"image": uint8 (1, h, w, 3) test-resized, "label": int32 (1, H, W) original
    size, "name": str} for images process_index, process_index + process_count, ...:
    every image exactly once over all processes, in a fixed order."""
    cfg = resolve_config(config)
    source = build_source(cfg, name, train=False)
    ratios = config.get("evaluation", {}).get("ratios", ()) if hasattr(config, "get") else ()
    fn = EvalExample(source, bool(cfg["data"]["skip_corrupt"]), keep_original=bool(ratios))
    indices = range(process_index, len(source), process_count)
    grain = _grain()
    workers = int(cfg["data"]["num_workers"])
    if grain is None or workers == 0:
        return SizedIterator((fn(i) for i in indices), len(indices))
    ds = grain.MapDataset.source(list(indices)).map(fn).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=1))
    gen = _closing(iter(ds))
    _OPEN_ITERATORS.add(gen)
    return SizedIterator(gen, len(indices))


class SizedIterator:
    """An iterator that knows how many items it yields in all (for a progress bar's ETA)."""

    def __init__(self, it: Iterator[dict], n: int):
        self._it, self._n = it, n

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def __len__(self) -> int:
        return self._n
