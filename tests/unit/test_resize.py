"""mfuser_jax.ops.resize against torch.nn.functional.interpolate: bilinear and bicubic, up and
down, by size and by scale_factor, numpy and jax inputs, any two axes. Collects the resize
checks that used to sit beside each caller (CLIP, DINOv2, deformable attention, point
sampling, evaluation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from mfuser_jax.ops.resize import resize, resize_matrix  # noqa: E402


def _rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def _torch_on_axes(x, axes, **kw):
    """F.interpolate of x (numpy) on two arbitrary axes: move them last, flatten the rest."""
    t = torch.as_tensor(x)
    perm = [i for i in range(x.ndim) if i not in axes] + list(axes)
    t = t.permute(*perm)
    lead = t.shape[:-2]
    r = F.interpolate(t.reshape(1, -1, *t.shape[-2:]), **kw)
    r = r.reshape(*lead, *r.shape[-2:]).permute(*np.argsort(perm))
    return r.numpy()


# ---- The grid over mode x direction x size/scale_factor x numpy/jax -------------------

CASES = [  # (in_hw, size, scale_factor)
    ((4, 6), (16, 24), None),         # up by size
    ((9, 8), (4, 3), None),           # down by size (no antialiasing)
    ((5, 7), (13, 4), None),          # up on one axis, down on the other
    ((4, 4), None, (5.1 / 4, 3.1 / 4)),  # DINOv2's offset scale factors: up and down
    ((6, 5), None, 2.0),              # up by a scalar scale factor
    ((9, 10), None, (0.37, 0.5)),     # down by scale factor
    ((4, 4), (5, 3), (5.1 / 4, 3.1 / 4)),  # both given, as dinov2 passes them
]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("src,size,scale", CASES)
@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_matches_torch_interpolate(mode, src, size, scale, backend):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, *src)).astype(np.float32)
    kw = {"size": size} if scale is None else {"scale_factor": scale}
    want = F.interpolate(torch.from_numpy(x), mode=mode, align_corners=False, **kw).numpy()
    inp = x if backend == "numpy" else jnp.asarray(x)
    got = resize(inp, size, mode=mode, scale_factor=scale)
    assert isinstance(got, np.ndarray) == (backend == "numpy")
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_align_corners_matches_torch(mode):
    x = np.random.default_rng(3).normal(size=(1, 2, 5, 7)).astype(np.float32)
    for size in [(9, 4), (2, 13)]:
        want = F.interpolate(torch.from_numpy(x), size=size, mode=mode,
                             align_corners=True).numpy()
        got = resize(x, size, mode=mode, align_corners=True)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_scale_factor_is_not_the_size_ratio():
    # With scale_factor torch samples at 1/scale, not in/out: the 0.1 offset of DINOv2 moves
    # the sampling points, so resizing by the derived size instead would be wrong.
    x = np.random.default_rng(1).normal(size=(1, 8, 4, 4)).astype(np.float32)
    by_scale = resize(x, (5, 3), mode="bicubic", scale_factor=(5.1 / 4, 3.1 / 4))
    by_size = resize(x, (5, 3), mode="bicubic")
    assert np.abs(by_scale - by_size).max() > 1e-2


def test_matrix_rows_sum_to_one_and_unchanged_size_is_identity():
    for mode in ("bilinear", "bicubic"):
        for n_in, n_out in [(7, 3), (3, 11), (16, 16)]:
            m = resize_matrix(n_in, n_out, mode)
            np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)  # float32 weights
        np.testing.assert_array_equal(resize_matrix(6, 6, mode), np.eye(6))
    with pytest.raises(ValueError, match="mode"):
        resize_matrix(4, 8, "nearest")


def test_dtype_and_gradient():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 5, 3)), jnp.bfloat16)
    assert resize(x, (9, 4), axes=(1, 2)).dtype == jnp.float32
    assert resize(x, (9, 4), axes=(1, 2), dtype=x.dtype).dtype == jnp.bfloat16
    # The adjoint of a linear resize: <resize(x), c> == <x, resize^T(c)>.
    xf = x.astype(jnp.float32)
    c = jnp.asarray(np.random.default_rng(4).normal(size=(2, 9, 4, 3)), jnp.float32)
    g = jax.grad(lambda v: jnp.sum(resize(v, (9, 4), axes=(1, 2)) * c))(xf)
    mh, mw = resize_matrix(6, 9), resize_matrix(5, 4)
    want = np.einsum("Hh,Ww,bHWc->bhwc", mh, mw, np.asarray(c, np.float64))
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-6)


def test_rejects_bad_arguments():
    x = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="size or scale_factor"):
        resize(x)
    with pytest.raises(ValueError, match="axes"):
        resize(x, (2, 2), axes=(1, -2))


# ---- The call patterns of the callers, each against its torch counterpart ------------

@pytest.mark.parametrize(
    "shape,size,axes",
    [((6, 3, 8, 8), (10, 10), (2, 3)), ((4, 4, 16), (6, 6), (0, 1)),
     ((5, 5, 16), (3, 4), (0, 1)), ((7, 3, 5), (2, 9), (0, 1))],
)
def test_clip_bilinear_on_any_axes(shape, size, axes):
    # CLIP: conv1 kernels (axes 2, 3) and position grids (axes 0, 1), numpy and jax.
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    r = _torch_on_axes(x, axes, size=size, mode="bilinear")
    np.testing.assert_allclose(resize(x, size, axes), r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(resize(jnp.asarray(x), size, axes)), r,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(2, 3), (16, 12), (5, 5), (3, 17)])
def test_mask_logits_nchw_and_nhwc(size):
    # Mask2Former attention masks (B, Q, h, w) and the pixel decoder's NHWC upsampling.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 16, 10)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear",
                         align_corners=False).numpy()
    np.testing.assert_allclose(np.asarray(resize(jnp.asarray(x), size, axes=(2, 3))), want,
                               rtol=1e-5, atol=1e-6)
    nhwc = np.asarray(resize(jnp.asarray(x.transpose(0, 2, 3, 1)), size, axes=(1, 2)))
    np.testing.assert_allclose(nhwc, want.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("src,dst", [((4, 6), (16, 24)), ((5, 7), (13, 11)), ((9, 8), (4, 3))])
def test_loss_logits_last_two_axes(src, dst):
    # The segmentation loss resizes (B, K, h, w) logits to the label size.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3) + src).astype(np.float32)
    got = resize(jnp.asarray(x), dst)
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False)
    assert got.shape == (2, 3) + dst
    assert _rel_err(got, ref.numpy()) < 1e-5


@pytest.mark.parametrize("src,dst", [((7, 9), (20, 23)), ((16, 16), (32, 32)),
                                     ((10, 12), (10, 12))])
def test_evaluation_scores_hwk(src, dst):
    # Sliding-window inference resizes (h, w, K) averaged scores to the label size.
    x = np.random.default_rng(1).normal(size=(*src, 4)).astype(np.float32)
    got = np.asarray(resize(jnp.asarray(x), dst, axes=(0, 1)))
    want = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=dst,
                         mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape,size,axes",
    [((1, 37 * 37 + 1, 8), (32, 32), "pos"), ((12, 3, 14, 14), (16, 16), (2, 3))],
)
def test_dinov2_mfuser_bicubic_resize(shape, size, axes):
    rng = np.random.default_rng(4)
    x = rng.normal(size=shape).astype(np.float32)
    if axes == "pos":  # MFuser: reshape (1, 37, 37, D) -> NCHW, bicubic to 32x32, back
        t = torch.from_numpy(x[:, 1:]).reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
        want = F.interpolate(t, size=size, mode="bicubic", align_corners=False)
        want = want.permute(0, 2, 3, 1).reshape(1, -1, shape[-1]).numpy()
        got = resize(x[0, 1:].reshape(37, 37, -1), size, (0, 1), "bicubic")
        got = got.reshape(1, -1, shape[-1])
    else:  # MFuser: F.interpolate(weight.float(), size=patch_size, mode='bicubic', ...)
        want = F.interpolate(torch.from_numpy(x), size=size, mode="bicubic",
                             align_corners=False).numpy()
        got = resize(x, size, axes, "bicubic")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # jax.image.resize's bicubic (Keys a=-0.5, edge renormalisation) is a different filter:
    # using it would silently shift every pretrained position embedding.
    if axes != "pos":
        jimg = jax.image.resize(jnp.asarray(x), (*shape[:2], *size), method="bicubic")
        assert np.abs(np.asarray(jimg) - want).max() > 1e-2


def test_jax_image_resize_antialiases_when_shrinking():
    # Why resize exists for bilinear too: jax.image.resize's default antialiasing blurs an
    # 8x reduction (Mask2Former's 1/4 -> 1/32 attention masks), torch does not.
    x = np.random.default_rng(6).normal(size=(1, 2, 64, 64)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=(8, 8), mode="bilinear",
                         align_corners=False).numpy()
    np.testing.assert_allclose(np.asarray(resize(jnp.asarray(x), (8, 8))), want,
                               rtol=1e-5, atol=1e-6)
    blurred = jax.image.resize(jnp.asarray(x), (1, 2, 8, 8), method="bilinear")
    assert np.abs(np.asarray(blurred) - want).max() > 1e-1
