"""Sliding-window inference, confusion matrix and mIoU against independent
restatements (numpy loops after mmseg's slide_inference)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfuser_jax.run import evaluate as E


def _context_predict(crops):
    """Scores that depend on the whole window (pixel colour + window mean): averaging
    overlapping windows then differs from predicting the full image at once."""
    x = crops.astype(jnp.float32) / 255.0
    return x + x.mean(axis=(1, 2), keepdims=True)


def _numpy_slide(image, crop, stride):
    """mmseg slide_inference restated with explicit loops (batch 1, NHWC)."""
    _, h, w, _ = image.shape
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    preds = np.zeros((h, w, 3), np.float64)
    count = np.zeros((h, w, 1), np.float64)
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            window = image[:, y1:y2, x1:x2].astype(np.float64) / 255.0
            preds[y1:y2, x1:x2] += (window + window.mean(axis=(1, 2), keepdims=True))[0]
            count[y1:y2, x1:x2] += 1
    assert count.min() >= 1
    return preds / count


@pytest.mark.parametrize("shape,crop,stride,crop_batch", [
    ((37, 53), 16, 11, 4),     # 3x4 windows, last chunk padded
    ((12, 40), 16, 11, 3),     # image lower than the crop: one row of shorter windows
    ((32, 32), 16, 16, 100),   # no overlap, all windows in one chunk
])
def test_sliding_window_matches_numpy(shape, crop, stride, crop_batch):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, *shape, 3), np.uint8)
    got = jax.jit(lambda im: E.sliding_window_scores(
        _context_predict, im, crop=crop, stride=stride, crop_batch=crop_batch))(image)
    want = _numpy_slide(image, crop, stride)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # the window average really differs from one full-image prediction
    assert not np.allclose(want, np.asarray(_context_predict(jnp.asarray(image)))[0])


def test_window_positions_cover_reference_grid():
    # 1024 x 2048 Cityscapes at crop 512 / stride 341: 3 x 6 windows, last flush right
    pos = E.window_positions(1024, 2048, 512, 341)
    assert len(pos) == 18
    assert pos[-1] == (512, 1536)
    assert pos[:3] == [(0, 0), (0, 341), (0, 682)]


def test_confusion_matrix_and_miou_vs_numpy():
    rng = np.random.default_rng(2)
    k = 5
    label = rng.integers(0, k, (40, 30)).astype(np.int32)
    label[rng.random(label.shape) < 0.2] = 255
    label[label == 3] = 255                       # class 3 absent from the labels ...
    pred = rng.integers(0, k, (40, 30)).astype(np.int32)
    pred[pred == 4] = 0
    label[label == 4] = 0                         # ... class 4 absent from both
    cm = np.asarray(E.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), k))
    valid = label != 255
    want = np.zeros((k, k), np.int64)
    for t, p in zip(label[valid], pred[valid]):
        want[t, p] += 1
    np.testing.assert_array_equal(cm, want)
    iou, miou = E.iou_from_confusion(cm)
    for c in range(k):
        inter = np.sum((label == c) & (pred == c) & valid)
        union = np.sum(((label == c) | (pred == c)) & valid)
        if union == 0:
            assert np.isnan(iou[c])
        else:
            assert iou[c] == pytest.approx(100.0 * inter / union)
    assert iou[3] == 0.0 and np.isnan(iou[4])     # predicted but never labelled -> 0 IoU
    assert miou == pytest.approx(np.nanmean(iou))


def test_eval_json_and_table(tmp_path):
    iou = np.array([50.0, np.nan, 25.0])
    path = E.write_eval_json(str(tmp_path), "cityscapes:val", 7, 37.5, ["a", "b", "c"], iou)
    assert path.endswith("eval/cityscapes_val_step7.json")
    data = json.load(open(path))
    assert data == {"step": 7, "dataset": "cityscapes:val", "miou": 37.5,
                    "per_class": {"a": 50.0, "b": None, "c": 25.0}}
    table = E.format_iou_table("x", ["a", "b", "c"], iou, 37.5)
    assert "mIoU" in table and "37.50" in table


def test_sum_over_processes_single_process_identity():
    cm = np.arange(9, dtype=np.int64).reshape(3, 3) * (1 << 33)
    np.testing.assert_array_equal(E.sum_over_processes(cm), cm)


def test_evaluate_batches_reports_each_image_once_its_counts_exist():
    """The progress callback fires once per image, only after that image's confusion
    matrix is computed (not when it is dispatched), and the per-group sums are exact."""
    k, rng = 3, np.random.default_rng(0)
    images = [dict(image=None, label=rng.integers(0, k, (4, 5)), group=g) for g in "abab"]
    computed, reported = [], []

    class Evaluator:
        num_classes = k

        def __call__(self, image, label):
            computed.append(len(computed))
            return E.confusion_matrix(jnp.asarray(label), jnp.asarray(label), k)

    def on_image():
        assert len(reported) < len(computed)  # never ahead of the dispatched images
        reported.append(len(reported))

    by_group = E.evaluate_batches(Evaluator(), iter(images), ("a", "b"), flush_every=3,
                                  on_image=on_image)
    assert len(reported) == len(images)
    for gi, g in enumerate("ab"):
        want = sum(np.diag(np.bincount(b["label"].ravel(), minlength=k))
                   for b in images if b["group"] == g)
        np.testing.assert_array_equal(by_group[gi], want)
    single = E.evaluate_batches(Evaluator(), iter(images))
    np.testing.assert_array_equal(single[0], by_group.sum(0))
