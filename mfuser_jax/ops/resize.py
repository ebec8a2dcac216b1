"""``torch.nn.functional.interpolate`` (bilinear / bicubic, no antialiasing) in numpy and JAX.

The one resize of the codebase: position-embedding and patch-kernel resizing (CLIP bilinear,
DINOv2 bicubic), Mask2Former attention masks, the pixel decoder's FPN upsampling, the loss's
and the inference's logit upsampling all go through ``resize``.

Why not ``jax.image.resize``: it antialiases when shrinking (torch does not; a 1/4 -> 1/32
attention mask is an 8x reduction) and its bicubic is Keys' a = -0.5 with edge
renormalisation, while torch uses a = -0.75 with taps clamped to the border, which would
shift every pretrained position embedding. Both modes are separable, so a resize is one
static (out, in) matrix per axis, applied by a matmul.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["resize", "resize_matrix"]

# PyTorch's cubic convolution coefficient (upsample_bicubic2d); jax.image uses -0.5.
_TORCH_CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the taps at offsets -1, 0, 1, 2 for fractional positions t, (..., 4).

    Evaluated in t's dtype with torch's expression order (get_cubic_upsample_coefficients:
    the last tap is taken at (1 - t) + 1).
    """
    a = t.dtype.type(_TORCH_CUBIC_A)
    one = t.dtype.type(1)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + one), near(t), near(one - t), far((one - t) + one)], axis=-1)


def resize_matrix(
    in_size: int,
    out_size: int,
    mode: str = "bilinear",
    *,
    scale_factor: float | None = None,
    align_corners: bool = False,
) -> np.ndarray:
    """The (out_size, in_size) matrix of ``F.interpolate`` on a float32 input along one axis.

    'bilinear': half-pixel centres, source coordinate clamped at 0 and the upper neighbour
    at the last pixel. 'bicubic': A = -0.75, source coordinate not clamped, the four taps
    clamped into the axis. As in PyTorch (``recompute_scale_factor`` unset), a given
    ``scale_factor`` maps coordinates with ``1 / scale_factor`` rather than
    ``in_size / out_size``: DINOv2's run-time position-embedding interpolation depends on it.
    Source coordinates and weights are computed in float32, as torch's kernels do for
    float32 tensors: at large coordinates their rounding moves results by ~1e-6, more than
    float64 weights would differ from torch. Returned as float64.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    f32 = np.float32
    dst = np.arange(out_size, dtype=f32)
    if align_corners:
        scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0)
        src = scale * dst
    else:
        # torch: static_cast<float>(1.0 / scale) or float(in) / out
        scale = f32(1.0 / scale_factor) if scale_factor else f32(in_size) / f32(out_size)
        src = scale * (dst + f32(0.5)) - f32(0.5)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    if mode == "bicubic":
        base = np.floor(src)
        weights = _cubic_weights(src - base)
        for tap in range(4):
            idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
            np.add.at(matrix, (rows, idx), weights[:, tap])
    else:
        if not align_corners:
            src = np.maximum(src, f32(0))
        i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        i1 = np.minimum(i0 + 1, in_size - 1)
        lam = np.clip(src - i0.astype(f32), f32(0), f32(1))
        np.add.at(matrix, (rows, i0), f32(1) - lam)
        np.add.at(matrix, (rows, i1), lam)
    return matrix


def _pair(v, name: str) -> tuple:
    if v is None:
        return (None, None)
    if isinstance(v, (int, float)):
        return (v, v)
    v = tuple(v)
    if len(v) != 2:
        raise ValueError(f"{name} must be a number or a pair, got {v!r}")
    return v


def resize(
    x,
    size: Sequence[int] | None = None,
    axes: Sequence[int] = (-2, -1),
    mode: str = "bilinear",
    *,
    scale_factor: float | Sequence[float] | None = None,
    align_corners: bool = False,
    dtype=None,
):
    """Resize two axes of ``x`` (numpy or jax array) like ``F.interpolate`` (no antialias).

    ``axes`` names the two spatial axes (default: the last two, torch's NCHW; (1, 2) for
    NHWC). Give ``size`` (out_h, out_w), ``scale_factor`` (a number or a pair), or both as
    DINOv2 does; with only ``scale_factor`` the output size is ``floor(in * scale)``, torch's
    rule. numpy input is computed in float64, jax input with float32 matmuls at HIGHEST
    precision (no TF32 on GPU). The result is float32 of the same kind (numpy or jax), or
    ``dtype`` if given.
    """
    axes = tuple(int(a) % x.ndim for a in axes)
    if len(axes) != 2 or axes[0] == axes[1]:
        raise ValueError(f"axes must name two distinct axes of a rank-{x.ndim} array, got {axes}")
    scales = _pair(scale_factor, "scale_factor")
    if size is None:
        if scale_factor is None:
            raise ValueError("give size or scale_factor")
        size = tuple(math.floor(x.shape[a] * s) for a, s in zip(axes, scales))
    size = tuple(int(n) for n in _pair(size, "size"))
    out_dtype = np.float32 if dtype is None else dtype
    is_np = isinstance(x, np.ndarray)
    out = np.asarray(x, np.float64) if is_np else jnp.asarray(x).astype(jnp.float32)
    for ax, n, s in zip(axes, size, scales):
        if s is None and x.shape[ax] == n:
            continue  # the identity: with size only, an unchanged axis maps pixel to pixel
        m = resize_matrix(x.shape[ax], n, mode, scale_factor=s, align_corners=align_corners)
        if is_np:
            out = np.moveaxis(np.tensordot(m, out, axes=([1], [ax])), 0, ax)
        else:
            out = jnp.moveaxis(
                jnp.tensordot(jnp.asarray(m, jnp.float32), out, axes=([1], [ax]),
                              precision=jax.lax.Precision.HIGHEST),
                0, ax,
            )
    return out.astype(out_dtype)
