"""Point sampling and PointRend point selection against torch and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mfuser_jax.ops.point_sample import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)


def _rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def _points_with_borders(rng, n, p):
    pts = rng.uniform(-0.05, 1.05, size=(n, p, 2))
    # Exact borders, pixel centres and corners of the unit square.
    special = np.array([[0, 0], [1, 1], [0, 1], [1, 0], [0.5, 0.5], [0.0, 0.37], [1.0, 0.61],
                        [0.125, 0.875]])
    pts[:, : len(special)] = special
    return pts.astype(np.float32)


def _numpy_bilinear(img, pts):
    """Direct per-point bilinear with zero padding, pixel centres at (i + 0.5) / size."""
    n, c, h, w = img.shape
    out = np.zeros((n, c, pts.shape[1]), np.float64)
    for b in range(n):
        for j, (x, y) in enumerate(pts[b].astype(np.float64)):
            px, py = x * w - 0.5, y * h - 0.5
            x0, y0 = int(np.floor(px)), int(np.floor(py))
            for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                wgt = (1 - abs(px - xi)) * (1 - abs(py - yi))
                if 0 <= xi < w and 0 <= yi < h:
                    out[b, :, j] += wgt * img[b, :, yi, xi]
    return out


@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 4, 16, 16)])
def test_point_sample_matches_torch_grid_sample(shape):
    rng = np.random.default_rng(0)
    img = rng.normal(size=shape).astype(np.float32)
    pts = _points_with_borders(rng, shape[0], 50)
    got = point_sample(jnp.asarray(img), jnp.asarray(pts))
    ref = F.grid_sample(torch.from_numpy(img), torch.from_numpy(pts)[:, :, None] * 2 - 1,
                        mode="bilinear", padding_mode="zeros", align_corners=False)[..., 0]
    assert got.shape == (shape[0], shape[1], 50)
    assert got.dtype == jnp.float32
    assert _rel_err(got, ref.numpy()) < 1e-5
    assert _rel_err(got, _numpy_bilinear(img, pts)) < 1e-5


def test_point_sample_zero_outside_and_exact_at_centres():
    img = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
    centres = np.array([[[(1 + 0.5) / 4, (2 + 0.5) / 3], [2.0, 0.5], [0.5, -1.0]]], np.float32)
    got = np.asarray(point_sample(jnp.asarray(img), jnp.asarray(centres)))[0, 0]
    np.testing.assert_allclose(got, [img[0, 0, 2, 1], 0.0, 0.0], atol=1e-6)


def test_point_sample_gradient_matches_torch():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(2, 2, 6, 9)).astype(np.float32)
    pts = _points_with_borders(rng, 2, 30)
    cot = rng.normal(size=(2, 2, 30)).astype(np.float32)
    g = jax.grad(lambda x: jnp.sum(point_sample(x, jnp.asarray(pts)) * cot))(jnp.asarray(img))
    t = torch.from_numpy(img).requires_grad_(True)
    out = F.grid_sample(t, torch.from_numpy(pts)[:, :, None] * 2 - 1, align_corners=False)[..., 0]
    (out * torch.from_numpy(cot)).sum().backward()
    assert _rel_err(g, t.grad.numpy()) < 1e-5


def _candidates(key, n, num_sampled):
    # The sampler's documented draw: candidates from the first half of split(key).
    key_candidates, _ = jax.random.split(key)
    return np.asarray(jax.random.uniform(key_candidates, (n, num_sampled, 2), jnp.float32))


def test_uncertain_points_pick_most_uncertain():
    # Crafted map: logits grow with distance from a diagonal band, so uncertainty varies.
    h = w = 12
    yy, xx = np.mgrid[0:h, 0:w]
    logits = np.stack([(xx - yy) * 0.7 + 0.1, (xx + yy - 11) * 0.5]).astype(np.float32)
    logits = logits.reshape(1, 2, h, w)
    key = jax.random.key(3)
    num_points, oversample = 40, 4.0
    got = np.asarray(get_uncertain_point_coords_with_randomness(
        key, jnp.asarray(logits), num_points, oversample, 1.0))
    assert got.shape == (1, 2, num_points, 2)
    cands = _candidates(key, 2, int(num_points * oversample))
    sampled = _numpy_bilinear(logits.reshape(2, 1, h, w), cands)[:, 0]  # (2, S)
    for m in range(2):
        order = np.argsort(np.abs(sampled[m]), kind="stable")
        expected = cands[m][order[:num_points]]
        as_set = lambda a: sorted(map(tuple, np.round(a, 6)))
        assert as_set(got[0, m]) == as_set(expected)
        # And every chosen point is at least as uncertain as every rejected candidate.
        chosen = np.abs(_numpy_bilinear(logits.reshape(2, 1, h, w)[m:m + 1], got[0, m][None]))
        rejected = np.abs(sampled[m][order[num_points:]])
        assert chosen.max() <= rejected.min() + 1e-6


def test_uncertain_points_shapes_range_and_randomness():
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(size=(2, 3, 8, 8)).astype(np.float32))
    f = jax.jit(lambda k, x: get_uncertain_point_coords_with_randomness(k, x, 100, 3.0, 0.75))
    a = np.asarray(f(jax.random.key(0), logits))
    b = np.asarray(f(jax.random.key(0), logits))
    c = np.asarray(f(jax.random.key(1), logits))
    assert a.shape == (2, 3, 100, 2)
    assert a.min() >= 0.0 and a.max() < 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # The first 75 points are among the candidates; the last 25 are fresh uniform draws.
    cands = _candidates(jax.random.key(0), 6, 300).reshape(2, 3, 300, 2)  # (n = B*K) draws
    for i in range(2):
        for j in range(3):
            cand = set(map(tuple, cands[i, j]))
            assert all(tuple(p) in cand for p in a[i, j, :75])
            assert not any(tuple(p) in cand for p in a[i, j, 75:])
    # No importance sampling at all: purely random points, still the right count.
    r = jax.jit(lambda k, x: get_uncertain_point_coords_with_randomness(k, x, 10, 1.0, 0.0))(
        jax.random.key(2), logits)
    assert r.shape == (2, 3, 10, 2)
    # No gradient flows into the logits through the coordinates.
    g = jax.jit(jax.grad(lambda x: jnp.sum(
        get_uncertain_point_coords_with_randomness(jax.random.key(0), x, 10, 3.0, 0.75))))(logits)
    assert np.all(np.asarray(g) == 0)
