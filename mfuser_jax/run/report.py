"""The evaluation as a picture: per-class IoU bars and the row-normalised confusion matrix.

``write_eval_png`` writes W/eval/<dataset>_step<N>.png next to the JSON. The IoU arithmetic and
the report files' names live here too, below the evaluation that runs the model. Drawn with PIL
alone (no plotting library). Rows of the matrix are the ground truth, columns the
prediction, each row divided by its pixel count: the diagonal is per-class recall and a
bright off-diagonal cell says which class a class is mistaken for.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mfuser_jax.files import atomic_write


BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (215, 215, 215)
BAR_WIDTH = 260  # pixels for IoU 100


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def row_normalised(cm: np.ndarray) -> np.ndarray:
    """Each ground-truth row divided by its total (rows without pixels stay 0)."""
    cm = np.asarray(cm, np.float64)
    rows = cm.sum(1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def _heat(v: float) -> tuple[int, int, int]:
    """0 -> white, 1 -> dark blue (a sequential map readable in grey too)."""
    lo, hi = np.array([247, 251, 255]), np.array([8, 48, 107])
    return tuple(int(round(x)) for x in lo + (hi - lo) * float(np.clip(v, 0, 1)) ** 0.7)


def _text_w(draw, text, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def iou_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class IoU in percent (NaN where a class is absent from labels and predictions)
    and their mean over the present classes (mmseg's nanmean)."""
    cm = np.asarray(cm, np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan) * 100.0
    miou = float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")
    return iou, miou


def accuracy_from_confusion(cm: np.ndarray) -> tuple[float, np.ndarray, float]:
    """mmseg's aAcc (all pixels), per-class Acc (a class's labelled pixels predicted as it,
    NaN for classes absent from the labels) and mAcc (their nanmean), in percent."""
    cm = np.asarray(cm, np.float64)
    total, rows = cm.sum(), cm.sum(1)
    aacc = float(np.trace(cm) / total * 100.0) if total > 0 else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(rows > 0, np.diag(cm) / rows, np.nan) * 100.0
    macc = float(np.nanmean(acc)) if np.any(~np.isnan(acc)) else float("nan")
    return aacc, acc, macc


def eval_json_path(workdir: str, dataset: str, step: int, eval_dir: str | None = None
                   ) -> str:
    """W/eval/<dataset>_step<N>.json (':' and '/' of 'name:split' names become '_'); in
    `eval_dir` instead of W/eval when given (scripts/eval.py --out)."""
    safe = dataset.replace(":", "_").replace("/", "_")
    return os.path.join(eval_dir or os.path.join(workdir, "eval"), f"{safe}_step{step}.json")


def render_eval_png(title: str, class_names: Sequence[str], cm: np.ndarray,
                    palette: np.ndarray | None = None,
                    groups: Mapping[str, float] | None = None) -> Image.Image:
    """The report image: IoU bars (left) and the confusion matrix (right)."""
    names = list(class_names)
    k = len(names)
    iou, miou = iou_from_confusion(cm)
    norm = row_normalised(cm)
    if palette is None:
        from mfuser_jax.data.custom import default_palette
        palette = default_palette(names)
    palette = np.asarray(palette, np.uint8).reshape(-1, 3)
    f_title, f_text, f_cell = _font(16), _font(12), _font(9)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max(_text_w(probe, n, f_text) for n in names) + 8
    row_h = 18
    cell = max(10, min(28, 520 // max(k, 1)))
    bar_w = BAR_WIDTH
    pad = 16
    head = 52 if groups else 34
    bars_x0 = pad + name_w
    cm_x0 = bars_x0 + bar_w + 40 + name_w
    caption = "rows: ground truth, columns: predicted (row-normalised)"
    width = cm_x0 + max(k * cell, _text_w(probe, caption, f_text)) + pad
    col_label_h = name_w
    height = max(head + k * row_h + 20, head + k * cell + col_label_h + 30) + pad
    img = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(img)
    d.text((pad, 8), f"{title}   mIoU {miou:.2f}", fill=INK, font=f_title)
    if groups:
        d.text((pad, 30), "mIoU per group:  " + "   ".join(
            f"{g} {v:.2f}" for g, v in groups.items()), fill=INK, font=f_text)

    # IoU bars, one row per class, a light grid every 20 points.
    for t in range(0, 101, 20):
        x = bars_x0 + bar_w * t / 100
        d.line([(x, head), (x, head + k * row_h)], fill=GRID)
        d.text((x - 6, head + k * row_h + 3), str(t), fill=INK, font=f_cell)
    for i, n in enumerate(names):
        y = head + i * row_h
        d.text((bars_x0 - 4 - _text_w(d, n, f_text), y + 2), n, fill=INK, font=f_text)
        v = iou[i]
        if np.isnan(v):
            d.text((bars_x0 + 4, y + 2), "n/a", fill=INK, font=f_text)
            continue
        x1 = bars_x0 + bar_w * v / 100
        d.rectangle([bars_x0, y + 3, max(x1, bars_x0 + 1), y + row_h - 3],
                    fill=tuple(int(c) for c in palette[i]), outline=INK)
        d.text((x1 + 4, y + 2), f"{v:.1f}", fill=INK, font=f_text)

    # Confusion matrix: rows = ground truth (names on the left), columns = prediction.
    d.text((cm_x0, head - 18), caption, fill=INK, font=f_text)
    for i, n in enumerate(names):
        yc = head + i * cell + (cell - 12) / 2
        d.text((cm_x0 - 4 - _text_w(d, n, f_text), yc), n, fill=INK, font=f_text)
        for j in range(k):
            v = norm[i, j]
            x, y = cm_x0 + j * cell, head + i * cell
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=_heat(v))
            if cell >= 20 and v >= 0.01:
                s = f"{int(round(v * 100))}"
                d.text((x + (cell - _text_w(d, s, f_cell)) / 2, y + (cell - 10) / 2), s,
                       fill=(255, 255, 255) if v > 0.5 else INK, font=f_cell)
    d.rectangle([cm_x0 - 1, head - 1, cm_x0 + k * cell, head + k * cell], outline=INK)
    # Column names, rotated, under the matrix.
    for j, n in enumerate(names):
        w = _text_w(d, n, f_text) + 2
        label = Image.new("RGB", (w, 14), BACKGROUND)
        ImageDraw.Draw(label).text((0, 0), n, fill=INK, font=f_text)
        label = label.rotate(90, expand=True)
        img.paste(label, (int(cm_x0 + j * cell + (cell - 14) / 2), head + k * cell + 4))
    return img


def eval_png_path(workdir: str, dataset: str, step: int, eval_dir: str | None = None
                  ) -> str:
    """W/eval/<dataset>_step<N>.png, beside the JSON."""
    return os.path.splitext(eval_json_path(workdir, dataset, step, eval_dir))[0] + ".png"


def write_eval_png(workdir: str, dataset: str, step: int, class_names: Sequence[str],
                   cm: np.ndarray, palette: np.ndarray | None = None,
                   groups: Mapping[str, float] | None = None,
                   eval_dir: str | None = None) -> str:
    """Writes W/eval/<dataset>_step<N>.png (atomically); returns its path."""
    path = eval_png_path(workdir, dataset, step, eval_dir)
    img = render_eval_png(f"{dataset} @ step {step}", class_names, cm, palette,
                          {g: v for g, v in (groups or {}).items() if not math.isnan(v)})
    with atomic_write(path) as (tmp,):
        img.save(tmp, format="PNG", optimize=True)
    return path
