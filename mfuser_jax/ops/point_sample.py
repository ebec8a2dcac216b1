"""Bilinear point sampling with PyTorch's semantics, in pure JAX.

Layout: channels first, as the original's masks, (N, C, H, W); points (N, P, 2) hold
normalised (x, y) in [0, 1] x [0, 1] (x along W, y along H).

* ``point_sample`` is mmcv 1.x's ``mmcv.ops.point_sample``: ``F.grid_sample(input,
  2 * points - 1, mode="bilinear", padding_mode="zeros", align_corners=False)``.
* ``get_uncertain_point_coords_with_randomness`` is mmdet/detectron2's PointRend-style
  sampler used by Mask2Former's loss (ported from devinxzhang/MFuser,
  mmseg/models/utils/point_sample.py).

Everything is gather based with static shapes, so it jits and differentiates
with respect to the sampled values (coordinates carry no gradient here, as in the
original where they are drawn under ``torch.no_grad``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "bilinear_corners",
    "point_sample",
    "get_uncertain_point_coords_with_randomness",
]


def bilinear_corners(points: jax.Array, height: int, width: int):
    """The four bilinear taps of ``grid_sample(align_corners=False, padding="zeros")``.

    points: (..., 2) normalised (x, y) in [0, 1]. Returns a list of four
    (flat_index, weight) pairs, each (...,): ``flat_index = y * width + x`` clipped into
    range, and ``weight`` zero for taps that fall outside the map (zero padding).
    """
    points = points.astype(jnp.float32)
    # Same arithmetic as torch: grid = 2p - 1, then unnormalise with align_corners=False.
    gx = points[..., 0] * 2.0 - 1.0
    gy = points[..., 1] * 2.0 - 1.0
    ix = ((gx + 1.0) * width - 1.0) / 2.0
    iy = ((gy + 1.0) * height - 1.0) / 2.0
    x0 = jnp.floor(ix)
    y0 = jnp.floor(iy)
    x1 = x0 + 1.0
    y1 = y0 + 1.0
    taps = []
    for xc, yc, w in (
        (x0, y0, (x1 - ix) * (y1 - iy)),
        (x1, y0, (ix - x0) * (y1 - iy)),
        (x0, y1, (x1 - ix) * (iy - y0)),
        (x1, y1, (ix - x0) * (iy - y0)),
    ):
        inside = (xc >= 0) & (xc <= width - 1) & (yc >= 0) & (yc <= height - 1)
        xi = jnp.clip(xc, 0, width - 1).astype(jnp.int32)
        yi = jnp.clip(yc, 0, height - 1).astype(jnp.int32)
        taps.append((yi * width + xi, jnp.where(inside, w, 0.0)))
    return taps


def point_sample(inputs: jax.Array, points: jax.Array) -> jax.Array:
    """Sample ``inputs`` (N, C, H, W) at ``points`` (N, P, 2) -> (N, C, P).

    Bilinear, zero padding outside the map, align_corners=False (mmcv's point_sample).
    The result is float32 (or wider if ``inputs`` is wider).
    """
    if inputs.ndim != 4 or points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(
            f"point_sample expects inputs (N, C, H, W) and points (N, P, 2), got "
            f"{inputs.shape} and {points.shape}")
    if inputs.shape[0] != points.shape[0]:
        raise ValueError(f"batch mismatch: inputs {inputs.shape}, points {points.shape}")
    n, c, h, w = inputs.shape
    flat = inputs.reshape(n, c, h * w)
    gather = jax.vmap(lambda f, i: jnp.take(f, i, axis=1))  # (C, HW), (P,) -> (C, P)
    out = None
    for idx, wt in bilinear_corners(points, h, w):
        term = gather(flat, idx) * wt[:, None, :]
        out = term if out is None else out + term
    return out


def get_uncertain_point_coords_with_randomness(
    key: jax.Array,
    mask_logits: jax.Array,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
) -> jax.Array:
    """PointRend training points for class-agnostic mask logits.

    mask_logits: (*lead, H, W), one map per mask (e.g. (B, K, H, W)). Returns
    (*lead, num_points, 2) normalised (x, y): the ``int(importance_sample_ratio *
    num_points)`` most uncertain (smallest |logit|, measured on the bilinearly sampled
    logit, not on the coarse grid) out of ``int(num_points * oversample_ratio)`` uniform
    candidates, followed by uniform random points. No gradient flows through.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(
            f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    lead = mask_logits.shape[:-2]
    h, w = mask_logits.shape[-2:]
    n = int(np.prod(lead)) if lead else 1
    logits = jax.lax.stop_gradient(mask_logits).reshape(n, 1, h, w)
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    key_candidates, key_random = jax.random.split(key)
    candidates = jax.random.uniform(key_candidates, (n, num_sampled, 2), jnp.float32)
    uncertainty = -jnp.abs(point_sample(logits, candidates)[:, 0, :])  # (n, num_sampled)
    parts = []
    if num_uncertain > 0:
        _, idx = jax.lax.top_k(uncertainty, num_uncertain)
        parts.append(jnp.take_along_axis(candidates, idx[..., None], axis=1))
    if num_random > 0:
        parts.append(jax.random.uniform(key_random, (n, num_random, 2), jnp.float32))
    coords = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return jax.lax.stop_gradient(coords).reshape(*lead, num_points, 2)
