"""Sliding-window inference, confusion matrices and the mIoU report.

Follows mmsegmentation's `slide_inference` as the reference uses it (crop 512, stride 341):
windows on a regular grid, the last one flush with the border, scores of overlapping windows
averaged, the averaged map resized bilinearly (half-pixel centres, no antialiasing, as
`F.interpolate(align_corners=False)`) to the label's size, argmax, confusion matrix.
All windows of an image are predicted in batches of `crop_batch` through one `lax.map`, so
the model is compiled once per image shape.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mfuser_jax.data.labels import IGNORE_INDEX
from mfuser_jax.run.report import (accuracy_from_confusion, eval_json_path,
                                    iou_from_confusion, write_eval_png)
from mfuser_jax import sharding as shd
from mfuser_jax.files import atomic_write, check_writable
from mfuser_jax.run.restore import restore_model
from mfuser_jax.data.checks import available_eval_datasets, check_data_for_eval
from mfuser_jax.ops.resize import resize


def window_positions(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the sliding windows, in mmseg's order."""
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2 = min(hi * stride + crop, h)
            x2 = min(wi * stride + crop, w)
            out.append((max(y2 - crop, 0), max(x2 - crop, 0)))
    return out


def sliding_window_scores(predict: Callable[[jax.Array], jax.Array], image: jax.Array, *,
                          crop: int, stride: int, crop_batch: int,
                          crop_sharding: Any = None) -> jax.Array:
    """Averaged window scores (h, w, K) float32 for one image (1, h, w, 3); traceable.

    `predict` maps uint8 crops (n, ch, cw, 3) to scores (n, ch, cw, K). `crop_sharding`
    (a NamedSharding for the (chunks, crop_batch, ...) crop array) spreads each chunk of
    windows over several devices.
    """
    _, h, w, _ = image.shape
    ch, cw = min(crop, h), min(crop, w)
    pos = window_positions(h, w, crop, stride)
    crops = jnp.stack([image[0, y:y + ch, x:x + cw] for y, x in pos])
    n = len(pos)
    if crop_sharding is None:  # a sharded chunk keeps its full (divisible) size
        crop_batch = max(1, min(crop_batch, n))
    chunks = math.ceil(n / crop_batch)
    pad = chunks * crop_batch - n
    if pad:  # repeat the last window so every chunk has the same shape; dropped below
        crops = jnp.concatenate([crops, jnp.repeat(crops[-1:], pad, axis=0)])
    crops = crops.reshape(chunks, crop_batch, ch, cw, 3)
    if crop_sharding is not None:
        crops = jax.lax.with_sharding_constraint(crops, crop_sharding)
    scores = jax.lax.map(lambda c: predict(c).astype(jnp.float32), crops)
    scores = scores.reshape(chunks * crop_batch, ch, cw, -1)[:n]
    total = jnp.zeros((h, w, scores.shape[-1]), jnp.float32)
    count = np.zeros((h, w, 1), np.float32)
    for i, (y, x) in enumerate(pos):
        total = total.at[y:y + ch, x:x + cw].add(scores[i])
        count[y:y + ch, x:x + cw] += 1
    return total / jnp.asarray(count)


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """(K, K) int32 counts, rows = ground truth, columns = prediction; ignore_index skipped."""
    label = label.reshape(-1).astype(jnp.int32)
    pred = pred.reshape(-1).astype(jnp.int32)
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    idx = jnp.where(valid, label * num_classes + pred, 0)
    counts = jnp.bincount(idx, weights=valid.astype(jnp.int32), length=num_classes ** 2)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def format_iou_table(dataset: str, class_names: Sequence[str], iou: np.ndarray,
                     miou: float, acc: tuple[float, np.ndarray, float] | None = None) -> str:
    """The per-class IoU table; with `acc` = (aAcc, per-class Acc, mAcc) an Acc column and
    the mAcc and aAcc lines too (mmseg's table)."""
    width = max(len(n) for n in class_names + ["aAcc"])
    if acc is None:
        lines = [f"{dataset}: per-class IoU (%)"]
        lines += [f"  {name:<{width}}  {v:6.2f}" for name, v in zip(class_names, iou)]
        lines.append(f"  {'mIoU':<{width}}  {miou:6.2f}")
        return "\n".join(lines)
    aacc, per_class, macc = acc
    lines = [f"{dataset}: per-class IoU and Acc (%)", f"  {'':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    lines += [f"  {name:<{width}}  {v:6.2f}  {a:6.2f}"
              for name, v, a in zip(class_names, iou, per_class)]
    lines.append(f"  {'mean':<{width}}  {miou:6.2f}  {macc:6.2f}")
    lines.append(f"  {'aAcc':<{width}}  {aacc:6.2f}")
    return "\n".join(lines)


def format_summary(results: dict[str, dict[str, float]], step: int) -> str:
    """One closing table over the evaluated datasets: mIoU, mAcc, aAcc each, and the
    average mIoU over them (the number domain-generalization papers quote)."""
    width = max(len(n) for n in [*results, "average"])
    lines = [f"summary @ step {step} (%)",
             f"  {'dataset':<{width}}  {'mIoU':>6}  {'mAcc':>6}  {'aAcc':>6}"]
    lines += [f"  {n:<{width}}  {r['miou']:6.2f}  {r['macc']:6.2f}  {r['aacc']:6.2f}"
              for n, r in results.items()]
    lines.append(f"  {'average':<{width}}  {np.mean([r['miou'] for r in results.values()]):6.2f}")
    return "\n".join(lines)


def _scores_fn(graphdef, *, crop: int, stride: int, crop_batch: int,
               class_names: Sequence[str] | None = None, crop_sharding: Any = None):
    """(state, image (1,h,w,3)) -> averaged window scores (h, w, K); traceable."""
    names = tuple(class_names) if class_names is not None else None

    def scores(state, image):
        # Merge inside the mapped function: the model then lives at lax.map's trace
        # level, so predict() may switch modes (eval()) on it.
        def predict(crops):
            m = nnx.merge(graphdef, state)
            m.eval()
            return m.predict(crops) if names is None else m.predict(crops, list(names))

        return sliding_window_scores(predict, image, crop=crop, stride=stride,
                                     crop_batch=crop_batch, crop_sharding=crop_sharding)

    return scores


class ImageEvaluator:
    """Jitted per-image evaluation of an NNX model: sliding window -> confusion matrix.

    Test-time augmentation as mmseg's aug_test: with `flip` and/or `ratios`, every
    augmented image (each ratio of the test scale, keep-ratio resized from the original
    image; each also mirrored with `flip`) goes through the sliding window, its scores are
    resized to the label size, softmaxed and mirrored back; the probabilities are
    averaged, then argmax. `on_prediction(batch, pred)` receives each image's prediction
    (at the label's size) on the host (--show_dir).

    One process with a mesh of several devices: the model stays where training placed it
    and each chunk of `crop_batch` windows is split over the mesh's 'data' axis (when it
    divides). Several processes: the state is copied to one device of each process and
    every process evaluates its own images (image sizes differ, so no common SPMD
    program); the confusion matrices are summed afterwards."""

    def __init__(self, model: nnx.Module, *, num_classes: int, crop: int, stride: int,
                 crop_batch: int, device: jax.Device | None = None,
                 mesh: jax.sharding.Mesh | None = None, flip: bool = False,
                 ratios: Sequence[float] = (),
                 on_prediction: Callable[[dict, np.ndarray], None] | None = None):
        model.eval()
        self.flip, self.ratios = bool(flip), tuple(float(r) for r in ratios or ())
        self.on_prediction = on_prediction
        self.graphdef, state = nnx.split(model)
        crop_sharding = None
        if mesh is not None and mesh.size > 1 and jax.process_count() == 1 and device is None:
            from jax.sharding import NamedSharding, PartitionSpec as P
            self.placement = NamedSharding(mesh, P())
            self.state = jax.tree.map(lambda x: _to_mesh(x, self.placement), state)
            if crop_batch % mesh.shape["data"] == 0:
                crop_sharding = NamedSharding(mesh, P(None, "data"))
        else:
            self.placement = device or jax.local_devices()[0]
            self.state = jax.tree.map(lambda x: _to_device(x, self.placement), state)
        self.device = self.placement
        self.num_classes = num_classes
        scores_fn = _scores_fn(self.graphdef, crop=crop, stride=stride, crop_batch=crop_batch,
                               crop_sharding=crop_sharding)

        def run(state, image, label):
            scores = resize(scores_fn(state, image), label.shape[-2:], axes=(0, 1))
            pred = jnp.argmax(scores, axis=-1)
            return confusion_matrix(pred, label[0], num_classes), pred

        def decide(total, count, label):
            pred = jnp.argmax(total / count, axis=-1)
            return confusion_matrix(pred, label[0], num_classes), pred

        self._run = jax.jit(run)
        self._probs = jax.jit(functools.partial(_tta_probs, scores_fn), static_argnums=(2, 3))
        self._decide = jax.jit(decide)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> jax.Array:
        return self.evaluate({"image": image, "label": label})

    def augmented_images(self, batch: dict) -> list[np.ndarray]:
        """The (1, h, w, 3) images of one test image's scales: the batch's test-resized
        image alone, or each ratio of the test scale (mmseg's MultiScaleFlipAug:
        (int(w_s * r), int(h_s * r)), keep-ratio, from the original image; the image's own
        size when the dataset has no test scale)."""
        if not self.ratios:
            return [np.asarray(batch["image"])]
        from mfuser_jax.data.transforms import test_resize
        original = np.asarray(batch["original"])[0]
        scale = batch.get("test_scale")
        if scale is None or len(scale) == 0:
            scale = (original.shape[1], original.shape[0])
        return [test_resize(original, (int(scale[0] * r), int(scale[1] * r)))[None]
                for r in self.ratios]

    def evaluate(self, batch: dict) -> jax.Array:
        """The (K, K) confusion matrix of one image {"image", "label"[, "original",
        "test_scale"]} (with `ratios`, make_eval_iterator keeps the original)."""
        label = jax.device_put(np.asarray(batch["label"]), self.device)
        if not self.flip and not self.ratios:
            image = jax.device_put(np.asarray(batch["image"]), self.device)
            cm, pred = self._run(self.state, image, label)
        else:
            size = tuple(label.shape[-2:])
            total, count = None, 0
            for image in self.augmented_images(batch):
                image = jax.device_put(image, self.device)
                for flip in (False, True) if self.flip else (False,):
                    p = self._probs(self.state, image, size, flip)
                    total = p if total is None else total + p
                    count += 1
            cm, pred = self._decide(total, count, label)
        if self.on_prediction is not None:
            self.on_prediction(batch, np.asarray(pred))
        return cm


def _tta_probs(scores_fn, state, image, size, flip):
    """One test-time-augmented view as mmseg's inference(): the window scores of `image`
    (mirrored with `flip`) resized to `size`, softmaxed, and mirrored back."""
    if flip:
        image = image[:, :, ::-1]
    p = jax.nn.softmax(resize(scores_fn(state, image), size, axes=(0, 1)), axis=-1)
    return p[:, ::-1] if flip else p


class SlidingWindowPredictor:
    """image (h, w, 3) uint8 -> (h, w, K) float32 scores, optionally for custom classes;
    `probs`: one view of ImageEvaluator's test-time augmentation."""

    def __init__(self, model: nnx.Module, *, crop: int, stride: int, crop_batch: int,
                 class_names: Sequence[str] | None = None, device: jax.Device | None = None):
        model.eval()
        graphdef, state = nnx.split(model)
        self.device = device or jax.local_devices()[0]
        self.state = jax.tree.map(lambda x: _to_device(x, self.device), state)
        scores_fn = _scores_fn(graphdef, crop=crop, stride=stride, crop_batch=crop_batch,
                               class_names=class_names)
        self._run = jax.jit(scores_fn)
        self._probs = jax.jit(functools.partial(_tta_probs, scores_fn), static_argnums=(2, 3))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = jax.device_put(np.asarray(image)[None], self.device)
        return np.asarray(self._run(self.state, image))

    def probs(self, image: np.ndarray, size: tuple[int, int], flip: bool) -> jax.Array:
        """(h, w, K) class probabilities at `size` = (h, w), of `image` mirrored with
        `flip` and mirrored back (jitted per image size, `size` and `flip`)."""
        image = jax.device_put(np.asarray(image)[None], self.device)
        return self._probs(self.state, image, tuple(size), bool(flip))


def _to_mesh(x, replicated):
    """Arrays already on the mesh stay put (FSDP shards included); others are replicated."""
    if not isinstance(x, jax.Array):
        return x
    if set(x.sharding.device_set) == set(replicated.mesh.devices.flat):
        return x
    return jax.device_put(x, replicated)


def _to_device(x, device):
    if not isinstance(x, jax.Array):
        return x
    if x.is_fully_addressable:
        return jax.device_put(x, device)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # nnx.Rngs state
        data = _to_device(jax.random.key_data(x), device)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    from mfuser_jax.sharding import to_host
    return jax.device_put(to_host(x), device)


def evaluate_batches(evaluator: ImageEvaluator, batches: Iterable[dict[str, Any]],
                     groups: Sequence[str | None] = (None,), flush_every: int = 32,
                     on_image: Callable[[], None] | None = None) -> np.ndarray:
    """(G, K, K) int64 host confusion matrices over this process's images, one per group:
    each batch names its group (batch["group"], e.g. ACDC's condition); the default, one
    group None, counts every batch in it. Their sum is the whole set's matrix.

    Counts accumulate on device in int32 and are flushed to an int64 host total every
    `flush_every` images, which keeps them exact for any dataset size. `on_image` is called
    as each image's result is ready (a progress bar): one image stays in flight meanwhile,
    so the host prepares the next image while the device computes."""
    k = evaluator.num_classes
    index = {g: i for i, g in enumerate(groups)}
    total = np.zeros((len(groups), k, k), np.int64)
    acc: dict[int, Any] = {}
    in_flight = None
    for i, batch in enumerate(batches):
        g = 0 if groups == (None,) else index[batch["group"]]
        run = getattr(evaluator, "evaluate", None)  # test-time augmentation needs the batch
        cm = run(batch) if run is not None else evaluator(batch["image"], batch["label"])
        acc[g] = cm if g not in acc else acc[g] + cm
        if on_image is not None:
            if in_flight is not None:
                jax.block_until_ready(in_flight)
                on_image()
            in_flight = cm
        if (i + 1) % flush_every == 0:
            for g, a in acc.items():
                total[g] += np.asarray(a, np.int64)
            acc = {}
    for g, a in acc.items():
        total[g] += np.asarray(a, np.int64)
    if in_flight is not None:
        on_image()  # ready: its counts were just read
    return total


def sum_over_processes(cm: np.ndarray) -> np.ndarray:
    """Sums an int64 host matrix over processes (exchanged as two int32 halves)."""
    if jax.process_count() == 1:
        return cm
    from jax.experimental import multihost_utils
    hi = (cm >> 30).astype(np.int32)
    lo = (cm & ((1 << 30) - 1)).astype(np.int32)
    hi = np.asarray(multihost_utils.process_allgather(hi)).astype(np.int64).sum(0)
    lo = np.asarray(multihost_utils.process_allgather(lo)).astype(np.int64).sum(0)
    return (hi << 30) + lo


def write_eval_json(workdir: str, dataset: str, step: int, miou: float,
                    class_names: Sequence[str], iou: np.ndarray,
                    groups: dict[str, tuple[float, np.ndarray]] | None = None,
                    eval_dir: str | None = None,
                    acc: tuple[float, np.ndarray, float] | None = None) -> str:
    """`groups` {name: (miou, iou)} adds {"groups": {name: {"miou", "per_class"}}}.
    `eval_dir`: the folder instead of W/eval. `acc` (aAcc, per-class Acc, mAcc) adds
    "aacc", "macc" and "per_class_acc"."""
    path = eval_json_path(workdir, dataset, step, eval_dir)

    def per_class(values):
        return {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, values)}

    report = {"step": int(step), "dataset": dataset, "miou": float(miou),
              "per_class": per_class(iou)}
    if acc is not None:
        report.update(aacc=float(acc[0]), macc=float(acc[2]), per_class_acc=per_class(acc[1]))
    if groups:
        report["groups"] = {g: {"miou": None if np.isnan(m) else float(m),
                                "per_class": per_class(v)} for g, (m, v) in groups.items()}
    with atomic_write(path) as (tmp,), open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    return path


def _progress_bar(batches: Iterable[dict], name: str):
    """A progress bar (images/s; an ETA when the iterator has a length) on process 0."""
    if jax.process_index() != 0:
        return None
    from tqdm import tqdm
    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(total=total, desc=f"eval {name}", unit="img", dynamic_ncols=True)


def _default_eval_iter(config, name, *, process_index, process_count):
    from mfuser_jax.data.pipeline import make_eval_iterator
    return make_eval_iterator(config, name, process_index=process_index,
                              process_count=process_count)


def _eval_groups(config, name, eval_iter_fn) -> tuple[str, ...]:
    """Groups reported besides the whole set: the data pipeline's (ACDC's conditions), or
    an injected iterator factory's `groups(config, name)` attribute."""
    if eval_iter_fn is _default_eval_iter:
        from mfuser_jax.data.pipeline import eval_dataset_groups
        return eval_dataset_groups(config, name)
    fn = getattr(eval_iter_fn, "groups", None)
    return tuple(fn(config, name)) if fn is not None else ()


def _report_groups(log, name, step, class_names, groups, by_group):
    """Per-group (miou, iou) from the (G, K, K) matrices, each group's table logged."""
    out = {}
    for g, cm in zip(groups, by_group):
        iou, miou = iou_from_confusion(cm)
        out[g] = (miou, iou)
        log(format_iou_table(f"{name} [{g}] @ step {step}", class_names, iou, miou))
    return out


def write_eval_report(workdir, name, step, config, cm, groups=None, eval_dir=None):
    """The PNG beside the JSON (mfuser_jax/run/report.py)."""
    palette = config.model.get("palette", None) or None
    write_eval_png(workdir, name, step, list(config.model.class_names), cm,
                   palette=np.asarray(palette, np.uint8) if palette else None,
                   groups={g: m for g, (m, _) in (groups or {}).items()}, eval_dir=eval_dir)


def evaluate_model(model: nnx.Module, config: Any, *, step: int, workdir: str | None,
                   datasets: Sequence[str] | None = None,
                   eval_iter_fn: Callable[..., Iterable[dict]] | None = None,
                   log: Callable[[str], None] = print,
                   mesh: jax.sharding.Mesh | None = None,
                   eval_dir: str | None = None,
                   show_dir: str | None = None,
                   metrics_out: dict | None = None) -> dict[str, float]:
    """Evaluates `model` on every dataset (default config.data.eval); returns {name: mIoU %}.

    Each process evaluates its share of the images; confusion matrices are summed over
    processes; process 0 writes W/eval/<dataset>_step<N>.json (mIoU, mAcc, aAcc, per
    class; per-group entries for grouped sets such as ACDC) and .png (in `eval_dir`
    instead of W/eval when given), prints the tables and, after several datasets, one
    summary table. config.evaluation.flip / .ratios: test-time augmentation
    (ImageEvaluator). `show_dir`: each image's prediction in the palette's colours, as
    <show_dir>/<dataset>/<image name>.png. `metrics_out` receives {name: {"miou", "macc",
    "aacc"}} on every process.
    """
    eval_iter_fn = eval_iter_fn or _default_eval_iter
    ev_cfg = config.evaluation
    class_names = list(config.model.class_names)
    num_classes = int(config.model.num_classes)
    evaluator = ImageEvaluator(model, num_classes=num_classes, crop=int(ev_cfg.crop_size),
                               stride=int(ev_cfg.stride), crop_batch=int(ev_cfg.crop_batch),
                               mesh=mesh, flip=bool(ev_cfg.get("flip", False)),
                               ratios=tuple(ev_cfg.get("ratios", ()) or ()))
    results, summary = {}, {}
    for name in (datasets if datasets is not None else config.data.eval):
        if show_dir is not None:
            evaluator.on_prediction = _show_writer(config, show_dir, name)
        batches = eval_iter_fn(config, name, process_index=jax.process_index(),
                               process_count=jax.process_count())
        groups = _eval_groups(config, name, eval_iter_fn)
        bar = _progress_bar(batches, name)
        try:
            by_group = sum_over_processes(evaluate_batches(
                evaluator, batches, groups or (None,),
                on_image=None if bar is None else lambda: bar.update(1)))
        finally:
            if bar is not None:
                bar.close()
        cm = by_group.sum(0)
        iou, miou = iou_from_confusion(cm)
        acc = accuracy_from_confusion(cm)
        results[name] = miou
        summary[name] = {"miou": miou, "aacc": acc[0], "macc": acc[2]}
        if jax.process_index() == 0:
            # one group (acdc:val:night, or one condition on disk) is the whole set: its
            # table would be the overall one again
            per_group = (_report_groups(log if len(groups) > 1 else (lambda s: None), name,
                                        step, class_names, groups, by_group)
                         if groups else None)
            log(format_iou_table(f"{name} @ step {step}", class_names, iou, miou, acc))
            if workdir is not None or eval_dir is not None:
                write_eval_json(workdir, name, step, miou, class_names, iou, per_group,
                                eval_dir=eval_dir, acc=acc)
                write_eval_report(workdir, name, step, config, cm, per_group,
                                  eval_dir=eval_dir)
    if len(summary) > 1 and jax.process_index() == 0:
        log(format_summary(summary, step))
    if metrics_out is not None:
        metrics_out.update(summary)
    return results


def _show_writer(config, show_dir: str, dataset: str):
    """on_prediction for --show_dir: <show_dir>/<dataset>/<image name>.png in colours (a
    folder dataset's names keep their sub-folders, so equal file names stay apart)."""
    from PIL import Image

    from mfuser_jax.data.custom import default_palette
    names = list(config.model.class_names)
    palette = np.asarray(config.model.get("palette", None) or default_palette(names),
                         np.uint8).reshape(-1, 3)
    folder = os.path.join(show_dir, dataset.replace(":", "_").replace("/", "_"))

    def write(batch, pred):
        name = os.path.normpath(str(batch.get("name", "image"))).lstrip(os.sep)
        if name.startswith(".."):
            name = os.path.basename(name)
        path = os.path.join(folder, f"{os.path.splitext(name)[0]}.png")
        with atomic_write(path) as (tmp,):
            Image.fromarray(palette[pred]).save(tmp, format="PNG")

    return write


def evaluate_checkpoint(config: Any, workdir: str, step: int | None = None, *,
                        eval_iter_fn: Callable[..., Any] | None = None,
                        log: Callable[[str], None] | None = None,
                        out: str | None = None,
                        show_dir: str | None = None) -> dict[str, float]:
    """Restores W/checkpoints/<step> (default latest) and evaluates config.data.eval; the
    JSON and PNG reports go to `out` (default W/eval), checked writable first; `show_dir`:
    each image's prediction in colours (evaluate_model)."""
    shd.maybe_initialize_distributed(config)
    log = log or (lambda s: print(s, flush=True) if jax.process_index() == 0 else None)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if eval_iter_fn is None:
        check_data_for_eval(config)
    eval_dir = os.path.abspath(os.path.expanduser(out)) if out else os.path.join(workdir,
                                                                                "eval")
    if jax.process_index() == 0:  # a read-only workdir (a shared release) fails here
        check_writable(eval_dir, folder=True,
                       hint=" (a read-only workdir? give scripts/eval.py --out DIR)")
        if show_dir:
            check_writable(show_dir, folder=True)
    eval_sets = available_eval_datasets(config, log)
    log(f"restoring the model from {workdir} (building and compiling take a while at full "
        "size)")
    model, step = restore_model(config, workdir, step)
    return evaluate_model(model, config, step=step, workdir=workdir, datasets=eval_sets,
                          eval_iter_fn=eval_iter_fn, log=log,
                          mesh=shd.make_mesh(config.get("mesh", None)), eval_dir=eval_dir,
                          show_dir=show_dir)
