"""The PNG evaluation report: bar lengths follow the IoUs, matrix cells the row-normalised
counts (numpy), file beside the JSON."""
import numpy as np
from PIL import Image

from mfuser_jax.run import report as R


def test_bars_and_matrix_follow_the_numbers(tmp_path):
    cm = np.array([[60, 30, 10, 0],
                   [5, 80, 15, 0],
                   [0, 0, 0, 0],      # class 2 never labelled: row of zeros
                   [10, 0, 20, 70]], np.int64)
    names = ["grass", "sheep", "fence", "sky"]
    palette = np.array([[10, 200, 10], [200, 10, 200], [250, 140, 0], [10, 10, 250]],
                       np.uint8)
    path = R.write_eval_png(str(tmp_path), "farm:val", 7, names, cm, palette,
                            groups={"dawn": 40.0})
    assert path == str(tmp_path / "eval" / "farm_val_step7.png")
    img = np.asarray(Image.open(path).convert("RGB"))
    # numpy IoU: inter / (row + column - inter)
    inter = np.diag(cm).astype(float)
    iou = 100 * inter / (cm.sum(0) + cm.sum(1) - inter)
    for k in range(4):
        cols = np.flatnonzero((img == palette[k]).all(-1).any(0))
        width = cols.max() - cols.min() + 1 if cols.size else 0
        # filled bar interior: (BAR_WIDTH * IoU / 100) pixels, outline excluded
        assert abs(width - R.BAR_WIDTH * iou[k] / 100) <= 2, (names[k], width, iou[k])
    assert iou[2] == 0 and not (img == palette[2]).all(-1).any()
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    np.testing.assert_allclose(R.row_normalised(cm), norm)
    for v in np.unique(norm):  # every cell drawn in the colour of its value
        hits = (img == np.array(R._heat(v), np.uint8)).all(-1).sum()
        assert hits >= 100 * (norm == v).sum(), (v, hits)
    assert R._heat(1.0) != R._heat(0.5) != R._heat(0.0) == (247, 251, 255)
