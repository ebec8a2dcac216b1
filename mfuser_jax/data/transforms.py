"""mmseg 0.x's training and test transforms in numpy/PIL, with explicit RNGs.

Ported from devinxzhang/MFuser mmseg/datasets/pipelines/transforms.py (Resize with
ratio_range, RandomCrop with cat_max_ratio, RandomFlip, PhotoMetricDistortion, Pad) and
the OpenCV routines mmcv calls underneath. Same random decisions in the same order,
drawn from a ``numpy.random.Generator`` instead of the global numpy state:

1. Resize: ratio ~ U[lo, hi); target (int(w*r), int(h*r)) with keep_ratio, i.e.
   mmcv.imrescale: factor = min(long/max(h,w), short/min(h,w)), size int(x*f + 0.5).
   Image bilinear with OpenCV's half-pixel mapping and replicated borders (no
   antialiasing), label nearest with OpenCV's INTER_NEAREST (src = floor(dst * in/out)).
2. RandomCrop: offsets randint(0, margin + 1); with cat_max_ratio < 1, up to 10 draws
   until the crop holds > 1 non-ignore class and none covers >= cat_max_ratio.
3. RandomFlip: horizontal when U[0,1) < prob.
4. PhotoMetricDistortion: brightness, then mode = randint(2) (contrast first when
   mode == 1), saturation, hue (delta randint(-18, 18): upper bound exclusive), contrast
   last when mode == 0; each step applied with probability 1/2; float math truncated to
   uint8 as mmseg does; HSV via OpenCV's 8-bit algorithm (H in [0, 180)).
5. Pad to the crop size at the bottom/right: label 255; image the CLIP mean colour. The
   reference normalises first and pads the normalised image with 0, i.e. with the mean;
   here images stay uint8 until the model normalises them, so the pad is the mean rounded
   to whole grey levels (within 0.004 of 0 after normalisation).

Only the crop window is ever resampled: an output pixel's value does not depend on the
rest of the resized image, so this equals resize-then-crop at a fraction of the cost.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from mfuser_jax.data.labels import IGNORE_INDEX

# The pipeline's normalisation mean (CLIP's, model/backbone.py CLIP_MEAN) in uint8: the
# colour the reference's zero padding of the normalised image stands for.
PAD_COLOUR = (123, 117, 104)


# ----------------------------------------------------------------------------- resize
def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv.rescale_size: (new_w, new_h) fitting ``scale`` (either order) keeping ratio."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """OpenCV INTER_NEAREST source indices (floor(dst * in / out), clamped)."""
    idx = np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def resize_bilinear_window(img: np.ndarray, new_w: int, new_h: int,
                           box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Pixels [y1:y2, x1:x2] of ``img`` resized bilinearly to (new_h, new_w).

    PIL's affine transform samples source point a*(x + 0.5) + c and its bilinear filter
    subtracts 0.5 and clamps neighbours at the border: OpenCV's INTER_LINEAR mapping.
    """
    h, w = img.shape[:2]
    if box is None:
        box = (0, new_h, 0, new_w)
    y1, y2, x1, x2 = box
    if (new_w, new_h) == (w, h):
        return np.ascontiguousarray(img[y1:y2, x1:x2])
    sx, sy = w / new_w, h / new_h
    pil = Image.fromarray(img)
    out = pil.transform((x2 - x1, y2 - y1), Image.Transform.AFFINE,
                        (sx, 0.0, x1 * sx, 0.0, sy, y1 * sy),
                        resample=Image.Resampling.BILINEAR)
    return np.asarray(out)


def resize_nearest_window(label: np.ndarray, new_w: int, new_h: int,
                          box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    h, w = label.shape[:2]
    if box is None:
        box = (0, new_h, 0, new_w)
    y1, y2, x1, x2 = box
    rows = nearest_index(h, new_h)[y1:y2]
    cols = nearest_index(w, new_w)[x1:x2]
    return label[rows[:, None], cols[None, :]]


def test_resize(img: np.ndarray, scale: tuple[int, int] | None) -> np.ndarray:
    """Test-time Resize(keep_ratio=True) to ``scale`` = (w, h), e.g. (2048, 1024)."""
    if scale is None:
        return img
    h, w = img.shape[:2]
    new_w, new_h = rescale_size(w, h, scale)
    return resize_bilinear_window(img, new_w, new_h)


# ----------------------------------------------------------------------------- colour
_SDIV = np.zeros(256, np.int32)
_SDIV[1:] = np.round((255 << 12) / np.arange(1, 256)).astype(np.int32)
_HDIV = np.zeros(256, np.int32)
_HDIV[1:] = np.round((180 << 12) / (6.0 * np.arange(1, 256))).astype(np.int32)


def rgb_to_hsv_u8(img: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit RGB -> HSV (fixed point; H in [0, 180), S and V in [0, 255])."""
    r, g, b = (img[..., k].astype(np.int32) for k in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = (diff * _SDIV[v] + (1 << 11)) >> 12
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << 11)) >> 12
    h += (h < 0) * 180
    out = np.empty(img.shape, np.uint8)
    out[..., 0], out[..., 1], out[..., 2] = h, s, v
    return out


def _hue_weights() -> np.ndarray:
    """(256, 3) w per hue and RGB channel: OpenCV's HSV -> RGB is v * (1 - s * w) with
    w in {0 (v), 1 (p), f (q), 1 - f (t)} chosen by the hue sector (f = its fraction)."""
    h = np.arange(256, dtype=np.float32) * np.float32(6.0 / 180.0)
    h = np.mod(h, np.float32(6.0))
    sector = np.floor(h)
    f = h - sector
    sector = sector.astype(np.int64)
    one, zero = np.ones_like(f), np.zeros_like(f)
    cand = np.stack([zero, one, f, one - f])  # for v, p, q, t
    # (b, g, r) <- (v, p, q, t) indices per sector, from OpenCV's sector_data.
    table = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])
    bgr = np.stack([cand[table[sector, k], np.arange(256)] for k in range(3)], -1)
    return np.ascontiguousarray(bgr[:, ::-1])


_HUE_W = _hue_weights()


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit HSV -> RGB (float32 sector formula, rounded to nearest even)."""
    s = hsv[..., 1:2].astype(np.float32) * np.float32(1.0 / 255.0)
    v = hsv[..., 2:3].astype(np.float32) * np.float32(1.0 / 255.0)
    out = v * (np.float32(1.0) - s * _HUE_W[hsv[..., 0]])
    out *= np.float32(255.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    out = img.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator,
                           brightness_delta: float = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
    """mmseg PhotoMetricDistortion on an RGB uint8 image."""

    def contrast(x):
        if rng.integers(2):
            return _convert(x, alpha=rng.uniform(*contrast_range))
        return x

    if rng.integers(2):
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):  # saturation
        hsv = rgb_to_hsv_u8(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        img = hsv_to_rgb_u8(hsv)
    if rng.integers(2):  # hue
        hsv = rgb_to_hsv_u8(img)
        delta = int(rng.integers(-hue_delta, hue_delta))
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + delta) % 180
        img = hsv_to_rgb_u8(hsv)
    if mode == 0:
        img = contrast(img)
    return img


# ----------------------------------------------------------------------------- crop
def cat_ratio_ok(label_crop: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's acceptance test: > 1 non-ignore class and none at >= cat_max_ratio."""
    cnt = np.bincount(label_crop.ravel(), minlength=256)
    cnt[IGNORE_INDEX] = 0
    cnt = cnt[cnt > 0]
    return len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio


def _crop_box(rng, new_h, new_w, crop_h, crop_w):
    off_h = int(rng.integers(0, max(new_h - crop_h, 0) + 1))
    off_w = int(rng.integers(0, max(new_w - crop_w, 0) + 1))
    return off_h, min(off_h + crop_h, new_h), off_w, min(off_w + crop_w, new_w)


def pad_to(img: np.ndarray, label: np.ndarray, crop_h: int, crop_w: int):
    h, w = label.shape
    if (h, w) == (crop_h, crop_w):
        return img, label
    out_img = np.empty((crop_h, crop_w, 3), np.uint8)
    out_img[...] = PAD_COLOUR
    out_lab = np.full((crop_h, crop_w), IGNORE_INDEX, np.uint8)
    out_img[:h, :w] = img
    out_lab[:h, :w] = label
    return out_img, out_lab


def sample_crop(label: np.ndarray, rng: np.random.Generator, *,
                crop_size: tuple[int, int] = (512, 512),
                ratio_range: tuple[float, float] | None = (0.5, 2.0),
                cat_max_ratio: float = 0.75):
    """Resize + RandomCrop decisions: ((new_w, new_h), box, label crop before padding)."""
    crop_h, crop_w = crop_size
    h, w = label.shape
    if ratio_range is not None:
        lo, hi = ratio_range
        ratio = rng.random() * (hi - lo) + lo
        new_w, new_h = rescale_size(w, h, (int(w * ratio), int(h * ratio)))
    else:
        new_w, new_h = w, h
    box = _crop_box(rng, new_h, new_w, crop_h, crop_w)
    lab_c = resize_nearest_window(label, new_w, new_h, box)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            if cat_ratio_ok(lab_c, cat_max_ratio):
                break
            box = _crop_box(rng, new_h, new_w, crop_h, crop_w)
            lab_c = resize_nearest_window(label, new_w, new_h, box)
    return (new_w, new_h), box, lab_c


def train_transform(img: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                    crop_size: tuple[int, int] = (512, 512),
                    ratio_range: tuple[float, float] | None = (0.5, 2.0),
                    cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                    photometric: bool = True, accept=None):
    """Resize -> RandomCrop -> RandomFlip -> PhotoMetricDistortion -> Pad.

    img (H, W, 3) uint8, label (H, W) uint8 trainIds -> (crop_h, crop_w, 3) uint8 and
    (crop_h, crop_w) uint8. ``accept(label_crop) -> bool`` (rare-class sampling) makes
    the resize+crop be re-drawn up to 10 more times until it accepts; the last draw is
    kept either way. Flip and colour do not change class counts, so they are drawn once,
    after the accepted crop (the same distribution as re-running the whole pipeline).
    """
    if img.shape[:2] != label.shape:
        raise ValueError(f"image {img.shape[:2]} and label {label.shape} sizes differ")
    kw = dict(crop_size=crop_size, ratio_range=ratio_range, cat_max_ratio=cat_max_ratio)
    (new_w, new_h), box, lab_c = sample_crop(label, rng, **kw)
    if accept is not None:
        for _ in range(10):
            if accept(lab_c):
                break
            (new_w, new_h), box, lab_c = sample_crop(label, rng, **kw)
    img_c = resize_bilinear_window(img, new_w, new_h, box)
    if rng.random() < flip_prob:
        img_c, lab_c = img_c[:, ::-1], lab_c[:, ::-1]
    if photometric:
        img_c = photometric_distortion(np.ascontiguousarray(img_c), rng)
    return pad_to(np.ascontiguousarray(img_c), np.ascontiguousarray(lab_c), *crop_size)
