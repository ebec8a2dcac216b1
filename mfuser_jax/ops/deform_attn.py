"""Multi-scale deformable attention and the bilinear sampling it is built on, in pure JAX.

Semantics follow mmcv's ``multi_scale_deformable_attn_pytorch`` (open-mmlab/mmcv 1.x,
mmcv/ops/multi_scale_deform_attn.py), which samples every level with
``F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)``. Instead of
one grid_sample per level and head we gather the four neighbours of every sampling point
from the flattened value directly (one ``take_along_axis`` per corner), so the whole op is
a handful of vectorised gathers that XLA fuses; its gradient w.r.t. ``value`` is a
scatter-add and w.r.t. the locations flows through the bilinear weights, as in PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "bilinear_gather",
    "grid_sample_bilinear",
    "multi_scale_deformable_attention",
]


def bilinear_gather(value: jax.Array, height, width, x: jax.Array, y: jax.Array, start=0):
    """Bilinearly sample ``value`` (N, S, C) at pixel coordinates x, y (N, ...).

    The sampled map is the rows ``start .. start + height*width`` of ``value``, row-major;
    ``height``, ``width`` and ``start`` are ints or int arrays broadcastable to x, so one
    call samples several maps stored one after another (every level of a deformable
    attention). Pixel coordinates put the centre of pixel (i, j) at (x=j, y=i). Neighbours
    outside the map contribute zero (grid_sample's zero padding). Returns (N, ..., C) in
    value's dtype; the interpolation weights are float32.
    """
    n, c = value.shape[0], value.shape[-1]
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)
    out = None
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi = x0 + dx
            yi = y0 + dy
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            index = start + jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
            corner = jnp.take_along_axis(value, index.reshape(n, -1, 1), axis=1)
            corner = corner.reshape(*index.shape, c)  # (N, ..., C)
            weight = jnp.where(inside, wx * wy, 0.0).astype(value.dtype)
            term = corner * weight[..., None]
            out = term if out is None else out + term
    return out


def grid_sample_bilinear(inputs: jax.Array, grid: jax.Array) -> jax.Array:
    """``F.grid_sample(bilinear, padding_mode='zeros', align_corners=False)`` for NHWC input.

    inputs (N, H, W, C); grid (N, Ho, Wo, 2) with (x, y) in [-1, 1] (-1 is the outer edge
    of the first pixel). Returns (N, Ho, Wo, C).
    """
    n, h, w, c = inputs.shape
    if grid.shape[0] != n or grid.shape[-1] != 2:
        raise ValueError(f"grid must be (N={n}, Ho, Wo, 2), got {grid.shape}")
    out_hw = grid.shape[1:-1]
    grid = grid.reshape(n, -1, 2).astype(jnp.float32)
    # align_corners=False: [-1, 1] spans the outer pixel edges.
    x = ((grid[..., 0] + 1.0) * w - 1.0) / 2.0
    y = ((grid[..., 1] + 1.0) * h - 1.0) / 2.0
    out = bilinear_gather(inputs.reshape(n, h * w, c), h, w, x, y)
    return out.reshape(n, *out_hw, c)


def multi_scale_deformable_attention(
    value: jax.Array,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:
    """Deformable attention over several feature levels (mmcv semantics).

    Args:
      value: (B, S, heads, head_dim), the levels' maps flattened row-major and
        concatenated, S = sum(h * w).
      spatial_shapes: static ((h, w), ...) per level, in the order of ``value``.
      sampling_locations: (B, Q, heads, levels, points, 2), (x, y) normalised to [0, 1]
        over each level (0 and 1 are the outer pixel edges).
      attention_weights: (B, Q, heads, levels, points), already normalised.

    Returns:
      (B, Q, heads * head_dim) in value's dtype.
    """
    spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    b, s, heads, head_dim = value.shape
    _, q, heads_l, levels, points, two = sampling_locations.shape
    if sum(h * w for h, w in spatial_shapes) != s:
        raise ValueError(f"spatial_shapes {spatial_shapes} do not add up to S={s}")
    if (heads_l, levels, two) != (heads, len(spatial_shapes), 2):
        raise ValueError(
            f"sampling_locations {sampling_locations.shape} do not fit value {value.shape} "
            f"and {len(spatial_shapes)} levels"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights {attention_weights.shape} must be "
            f"{sampling_locations.shape[:-1]}"
        )
    # Heads fold into the batch: (B*heads, S, head_dim) and (B*heads, Q, levels, points, .)
    value = value.transpose(0, 2, 1, 3).reshape(b * heads, s, head_dim)
    locations = sampling_locations.transpose(0, 2, 1, 3, 4, 5).reshape(
        b * heads, q, levels, points, 2
    )
    weights = attention_weights.transpose(0, 2, 1, 3, 4).reshape(b * heads, q, levels, points)
    # Every level in one gather per corner (not one per level and corner: a third of the
    # kernels to compile); each point carries its level's size and offset into `value`.
    heights = np.array([h for h, _ in spatial_shapes], np.int32)[:, None]  # (levels, 1)
    widths = np.array([w for _, w in spatial_shapes], np.int32)[:, None]
    starts = np.cumsum([0] + [h * w for h, w in spatial_shapes[:-1]]).astype(np.int32)[:, None]
    loc = locations.astype(jnp.float32)
    # align_corners=False: a location in [0, 1] maps to pixel coordinate loc*size - 0.5.
    sampled = bilinear_gather(value, heights, widths,
                              loc[..., 0] * widths - 0.5, loc[..., 1] * heights - 0.5,
                              start=starts)  # (B*heads, Q, levels, points, head_dim)
    sampled = sampled.reshape(b * heads, q, levels * points, head_dim)
    out = jnp.einsum("nqpd,nqp->nqd", sampled.astype(jnp.float32),
                     weights.reshape(b * heads, q, levels * points).astype(jnp.float32))
    out = out.reshape(b, heads, q, head_dim).transpose(0, 2, 1, 3)
    return out.reshape(b, q, heads * head_dim).astype(value.dtype)
