"""Deformable attention and grid sampling against direct references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfuser_jax.ops.deform_attn import (
    grid_sample_bilinear,
    multi_scale_deformable_attention,
)


def _np_sample(img, x, y):
    """img (H, W, C); bilinear at pixel coordinates (x, y), zero outside, loops only."""
    h, w, c = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = np.zeros(c, np.float64)
    for yi in (y0, y0 + 1):
        for xi in (x0, x0 + 1):
            if 0 <= yi < h and 0 <= xi < w:
                out += (1 - abs(x - xi)) * (1 - abs(y - yi)) * img[yi, xi]
    return out


def _np_msda(value, shapes, loc, attn):
    b, s, heads, d = value.shape
    _, q, _, levels, points, _ = loc.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = np.zeros((b, q, heads, d), np.float64)
    for bi in range(b):
        for qi in range(q):
            for hi in range(heads):
                for li, (h, w) in enumerate(shapes):
                    img = value[bi, starts[li] : starts[li + 1], hi].reshape(h, w, d)
                    for pi in range(points):
                        lx, ly = loc[bi, qi, hi, li, pi]
                        sample = _np_sample(img, lx * w - 0.5, ly * h - 0.5)
                        out[bi, qi, hi] += attn[bi, qi, hi, li, pi] * sample
    return out.reshape(b, q, heads * d)


def _inputs(seed=0, b=2, q=5, heads=2, d=3, shapes=((4, 5), (2, 3), (1, 2)), points=3):
    rng = np.random.default_rng(seed)
    s = sum(h * w for h, w in shapes)
    value = rng.standard_normal((b, s, heads, d)).astype(np.float32)
    # Locations reach past both borders so zero padding and partial corners are exercised.
    loc = rng.uniform(-0.3, 1.3, (b, q, heads, len(shapes), points, 2)).astype(np.float32)
    loc[0, 0, 0, :, 0] = [0.0, 0.0]  # exact outer corner
    loc[0, 0, 0, :, 1] = [1.0, 1.0]
    loc[0, 1, 0, :, 0] = [-0.6, 0.5]  # fully outside: contributes zero
    logits = rng.standard_normal((b, q, heads, len(shapes) * points))
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    attn = attn.reshape(b, q, heads, len(shapes), points).astype(np.float32)
    return value, shapes, loc, attn


def test_msda_matches_numpy_loops():
    value, shapes, loc, attn = _inputs()
    got = np.asarray(multi_scale_deformable_attention(value, shapes, loc, attn))
    want = _np_msda(value.astype(np.float64), shapes, loc.astype(np.float64), attn)
    assert got.shape == want.shape == (2, 5, 6)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-5, rel


def test_msda_matches_mmcv_pytorch_restatement():
    # The reference function of mmcv 1.x (grid_sample per level), restated in torch.
    value, shapes, loc, attn = _inputs(seed=1, b=1, q=7, heads=3, d=4, points=2)
    v = torch.from_numpy(value)
    b, _, heads, d = v.shape
    _, q, _, levels, points, _ = loc.shape
    grids = 2 * torch.from_numpy(loc) - 1
    sampled = []
    for lvl, v_l in enumerate(v.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        v_l = v_l.flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v_l, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    a = torch.from_numpy(attn).transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    want = (torch.stack(sampled, dim=-2).flatten(-2) * a).sum(-1).view(b, heads * d, q)
    want = want.transpose(1, 2).numpy()
    got = np.asarray(multi_scale_deformable_attention(value, shapes, loc, attn))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_msda_outside_points_give_zero():
    value, shapes, loc, attn = _inputs(seed=2)
    loc = np.full_like(loc, 1.8)  # every point beyond the right/bottom border
    got = np.asarray(multi_scale_deformable_attention(value, shapes, loc, attn))
    assert np.all(got == 0.0)


def test_msda_gradients_finite_and_nonzero():
    value, shapes, loc, attn = _inputs(seed=3)

    def f(v, l, a):
        return jnp.sum(jnp.sin(multi_scale_deformable_attention(v, shapes, l, a)))

    grads = jax.grad(f, argnums=(0, 1, 2))(value, loc, attn)
    for g in grads:
        g = np.asarray(g)
        assert np.all(np.isfinite(g))
        assert np.abs(g).sum() > 0
    # Gradient w.r.t. locations against a central finite difference (float64 numpy ref).
    idx = (1, 2, 1, 0, 1, 0)
    eps = 1e-3
    lp, lm = loc.astype(np.float64).copy(), loc.astype(np.float64).copy()
    lp[idx] += eps
    lm[idx] -= eps
    fd = (np.sin(_np_msda(value, shapes, lp, attn)).sum()
          - np.sin(_np_msda(value, shapes, lm, attn)).sum()) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grads[1])[idx], fd, rtol=2e-3, atol=1e-4)


def test_msda_rejects_bad_shapes():
    value, shapes, loc, attn = _inputs()
    with pytest.raises(ValueError, match="add up"):
        multi_scale_deformable_attention(value, shapes[:2], loc, attn)
    with pytest.raises(ValueError, match="attention_weights"):
        multi_scale_deformable_attention(value, shapes, loc, attn[..., :1])


def test_grid_sample_matches_torch():
    rng = np.random.default_rng(4)
    img = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    grid = rng.uniform(-1.4, 1.4, (2, 4, 6, 2)).astype(np.float32)
    grid[0, 0, 0] = [-1.0, -1.0]
    grid[0, 0, 1] = [1.0, 1.0]
    want = F.grid_sample(torch.from_numpy(img).permute(0, 3, 1, 2), torch.from_numpy(grid),
                         mode="bilinear", padding_mode="zeros", align_corners=False)
    got = np.asarray(grid_sample_bilinear(img, grid))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)
