"""Training/test transforms: alignment, OpenCV-equivalent resizing, cat_max_ratio, colour."""
import colorsys

import numpy as np
import pytest

from mfuser_jax.data import transforms as T
from mfuser_jax.data.fake import random_label
from mfuser_jax.data.labels import colorize


def cv2_bilinear(img, new_w, new_h):
    """Independent restatement of OpenCV INTER_LINEAR (half-pixel, replicate border)."""
    h, w = img.shape[:2]

    def axis(n_in, n_out):
        f = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        f = np.maximum(f, 0)
        i0 = np.minimum(np.floor(f).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), f - i0

    y0, y1, dy = axis(h, new_h)
    x0, x1, dx = axis(w, new_w)
    im = img.astype(np.float64)
    dx = dx[None, :, None]
    top = im[y0][:, x0] * (1 - dx) + im[y0][:, x1] * dx
    bot = im[y1][:, x0] * (1 - dx) + im[y1][:, x1] * dx
    return top * (1 - dy)[:, None, None] + bot * dy[:, None, None]


@pytest.mark.parametrize("new", [(106, 74), (20, 13), (81, 57), (53, 37)])
def test_bilinear_matches_opencv_and_windows_agree(new):
    img = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    ref = cv2_bilinear(img, *new)
    full = T.resize_bilinear_window(img, *new)
    assert full.shape == (new[1], new[0], 3)
    assert np.abs(full - ref).max() <= 1.0  # OpenCV/PIL fixed-point rounding
    win = T.resize_bilinear_window(img, *new, box=(2, 9, 3, 15))
    np.testing.assert_array_equal(win, full[2:9, 3:15])


def test_nearest_is_opencv_floor_rule():
    lab = np.arange(10, dtype=np.uint8)[None].repeat(2, 0)
    out = T.resize_nearest_window(lab, 4, 2)
    assert out[0].tolist() == [0, 2, 5, 7]  # floor(x * 10 / 4)
    up = T.resize_nearest_window(lab, 25, 2)
    assert up[0].tolist() == [int(np.floor(x * 10 / 25)) for x in range(25)]


def test_rescale_size_is_mmcv():
    assert T.rescale_size(1914, 1052, (2048, 1024)) == (1863, 1024)
    assert T.rescale_size(1280, 720, (1280, 720)) == (1280, 720)
    assert T.rescale_size(1914, 1052, (int(1914 * 0.5), int(1052 * 0.5))) == (957, 526)


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_keeps_image_and_label_aligned(seed):
    rng = np.random.default_rng(seed)
    lab = random_label(rng, 60, 90, block=10)
    img = colorize(lab)
    out_img, out_lab = T.train_transform(img, lab, np.random.default_rng(100 + seed),
                                         crop_size=(64, 64), ratio_range=(0.5, 2.0),
                                         cat_max_ratio=0.75, photometric=False)
    assert out_img.shape == (64, 64, 3) and out_lab.shape == (64, 64)
    assert out_img.dtype == np.uint8 and out_lab.dtype == np.uint8
    # Pixels inside a uniform 5x5 label neighbourhood carry exactly their class colour
    # (bilinear blur and the half-pixel offset only touch region borders).
    pad = np.pad(out_lab.astype(int), 2, constant_values=-1)
    same = np.ones_like(out_lab, bool)
    for dy in range(5):
        for dx in range(5):
            same &= pad[dy:dy + 64, dx:dx + 64] == out_lab
    same &= out_lab != 255  # ignore: padding carries the mean colour, not the label's black
    assert same.sum() > 200
    np.testing.assert_array_equal(out_img[same], colorize(out_lab)[same])


def test_flip_and_pad():
    lab = np.zeros((20, 30), np.uint8)
    lab[:, :10] = 1
    img = colorize(lab)
    # No rescale, crop larger than the image -> pad; flip forced.
    oi, ol = T.train_transform(img, lab, np.random.default_rng(0), crop_size=(32, 40),
                               ratio_range=None, cat_max_ratio=1.0, flip_prob=1.0,
                               photometric=False)
    assert (ol[20:] == 255).all() and (ol[:, 30:] == 255).all()
    assert (oi[20:] == T.PAD_COLOUR).all() and (oi[:, 30:] == T.PAD_COLOUR).all()
    assert (ol[:20, 20:30] == 1).all() and (ol[:20, :20] == 0).all()  # flipped
    np.testing.assert_array_equal(oi[:20, :30], colorize(lab)[:, ::-1])


def test_padding_is_zero_after_normalisation_as_in_the_original():
    """The reference's train pipeline: Normalize(CLIP mean/std in 0..255), then Pad with
    pad_val=0 (labels 255). Our uint8 crop normalised by the model must match it: the
    content exactly, the padded area within uint8 rounding of the mean (it used to be
    black, about -1.8)."""
    from mfuser_jax.model.backbone import normalize_for_clip

    mean = np.array([v * 255 for v in (0.48145466, 0.4578275, 0.40821073)])
    std = np.array([v * 255 for v in (0.26862954, 0.26130258, 0.27577711)])
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    lab = rng.integers(0, 19, (24, 30), dtype=np.uint8)
    oi, ol = T.train_transform(img, lab, np.random.default_rng(1), crop_size=(32, 40),
                               ratio_range=None, cat_max_ratio=1.0, flip_prob=0.0,
                               photometric=False)
    want = np.zeros((32, 40, 3))
    want[:24, :30] = (img - mean) / std
    got = np.asarray(normalize_for_clip(oi[None]))[0]
    np.testing.assert_allclose(got[:24, :30], want[:24, :30], atol=1e-5)
    assert np.abs(got[24:]).max() < 0.005 and np.abs(got[:, 30:]).max() < 0.005
    assert (ol[24:] == 255).all() and (ol[:, 30:] == 255).all()


def test_cat_max_ratio_retries_until_accepted():
    # Mostly road; one corner mixes classes. Only crops overlapping it are acceptable.
    lab = np.zeros((100, 100), np.uint8)
    lab[:30, :30] = np.indices((30, 30)).sum(0) % 3 + 5
    n = 300

    def rate(ratio):
        ok = 0
        for s in range(n):
            _, box, crop = T.sample_crop(lab, np.random.default_rng(s), crop_size=(40, 40),
                                         ratio_range=None, cat_max_ratio=ratio)
            np.testing.assert_array_equal(crop, lab[box[0]:box[1], box[2]:box[3]])
            ok += T.cat_ratio_ok(crop, 0.75)
        return ok / n

    p1 = rate(1.0)  # no retries: a single uniformly random crop
    p11 = rate(0.75)  # up to 11 draws
    expect = 1 - (1 - p1) ** 11
    assert 0.01 < p1 < 0.2
    assert abs(p11 - expect) < 4 * np.sqrt(expect * (1 - expect) / n) + 0.03, (p1, p11)


def test_cat_max_ratio_gives_up_after_ten_retries():
    lab = np.zeros((50, 50), np.uint8)

    class Counting:
        def __init__(self):
            self.rng, self.calls = np.random.default_rng(0), 0

        def integers(self, *a, **k):
            self.calls += 1
            return self.rng.integers(*a, **k)

    r = Counting()
    T.sample_crop(lab, r, crop_size=(20, 20), ratio_range=None, cat_max_ratio=0.75)
    assert r.calls == 2 * 11  # first draw + 10 retries, two offsets each


def test_cat_ratio_ok_is_mmseg_rule():
    assert not T.cat_ratio_ok(np.array([[1, 1, 1, 255]]), 0.75)  # one class only
    assert not T.cat_ratio_ok(np.array([[1, 1, 1, 2]]), 0.75)    # 0.75 is not < 0.75
    assert T.cat_ratio_ok(np.array([[1, 1, 2, 2, 255, 255, 255]]), 0.75)


def test_hsv_matches_colorsys():
    x = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    hsv = T.rgb_to_hsv_u8(x).reshape(-1, 3).astype(float)
    ref = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in x.reshape(-1, 3)])
    dh = np.abs(ref[:, 0] * 180 - hsv[:, 0])
    assert np.minimum(dh, 180 - dh).max() <= 0.75  # fixed-point tables
    assert np.abs(ref[:, 1] * 255 - hsv[:, 1]).max() <= 0.75
    assert np.abs(ref[:, 2] * 255 - hsv[:, 2]).max() == 0
    back = np.array([colorsys.hsv_to_rgb(h / 180, s / 255, v / 255) for h, s, v in hsv])
    np.testing.assert_allclose(T.hsv_to_rgb_u8(hsv.reshape(40, 40, 3).astype(np.uint8))
                               .reshape(-1, 3), back * 255, atol=0.5 + 1e-4)


class Scripted:
    """A Generator stand-in replaying given draws (checks order and ranges)."""

    def __init__(self, ints, floats):
        self.ints, self.floats, self.int_args = list(ints), list(floats), []

    def integers(self, lo, hi=None):
        self.int_args.append((lo, hi))
        return self.ints.pop(0)

    def uniform(self, lo, hi):
        return lo + (hi - lo) * self.floats.pop(0)


def test_photometric_order_and_ranges():
    img = np.full((2, 2, 3), 100, np.uint8)
    # brightness on (+delta 0.75 -> +16), mode 1 (contrast first), contrast on (x0.5 + 0.25
    # -> 0.75), saturation off, hue off.
    r = Scripted([1, 1, 1, 0, 0], [0.75, 0.25])
    out = T.photometric_distortion(img, r)
    assert out[0, 0, 0] == int(np.float32(116) * np.float32(0.75))  # 87: truncated
    assert not r.ints and not r.floats
    # mode 0: contrast last; hue delta drawn from integers(-18, 18) (exclusive top).
    img2 = np.array([[[200, 50, 50]]], np.uint8)
    r = Scripted([0, 0, 0, 1, 10, 1], [1.0])
    out = T.photometric_distortion(img2, r)
    assert (-18, 18) in r.int_args
    h = T.rgb_to_hsv_u8(img2)[0, 0, 0]
    hsv = T.rgb_to_hsv_u8(img2)
    hsv[..., 0] = (h + 10) % 180
    expect = T.hsv_to_rgb_u8(hsv)
    expect = np.clip(expect.astype(np.float32) * np.float32(1.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expect)


def test_test_resize():
    img = np.zeros((1052, 1914, 3), np.uint8)
    assert T.test_resize(img, (2048, 1024)).shape == (1024, 1863, 3)
    assert T.test_resize(img[:720, :1280], (1280, 720)).shape == (720, 1280, 3)
    assert T.test_resize(img[:10, :20], None).shape == (10, 20, 3)


def _opencv_hsv2rgb_pixel(h, s, v):
    """Literal scalar restatement of OpenCV's HSV2RGB_b (hrange 180) for one pixel."""
    h = np.float32(h) * np.float32(6.0 / 180.0)
    s = np.float32(s) * np.float32(1 / 255.0)
    v = np.float32(v) * np.float32(1 / 255.0)
    if s == 0:
        b = g = r = v
    else:
        while h < 0:
            h += np.float32(6)
        while h >= 6:
            h -= np.float32(6)
        sector = int(np.floor(h))
        h = np.float32(h - sector)
        if sector < 0 or sector >= 6:
            sector, h = 0, np.float32(0)
        one = np.float32(1)
        tab = [v, v * (one - s), v * (one - s * h), v * (one - s * (one - h))]
        sd = [[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]][sector]
        b, g, r = tab[sd[0]], tab[sd[1]], tab[sd[2]]
    return [int(np.clip(np.rint(np.float32(c) * np.float32(255)), 0, 255)) for c in (r, g, b)]


def test_hsv_to_rgb_is_opencv_formula_exactly():
    rng = np.random.default_rng(5)
    hsv = np.stack([rng.integers(0, 180, 600), rng.integers(0, 256, 600),
                    rng.integers(0, 256, 600)], -1).astype(np.uint8)
    hsv[:20, 1] = 0  # grey pixels
    got = T.hsv_to_rgb_u8(hsv[None])[0]
    ref = np.array([_opencv_hsv2rgb_pixel(*p) for p in hsv])
    np.testing.assert_array_equal(got, ref)
