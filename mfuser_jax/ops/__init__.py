"""Pure functions without parameters: selective scan, deformable attention, point sampling,
torch-exact resizing."""

from mfuser_jax.ops.deform_attn import grid_sample_bilinear, multi_scale_deformable_attention
from mfuser_jax.ops.point_sample import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from mfuser_jax.ops.resize import resize, resize_matrix
from mfuser_jax.ops.selective_scan import selective_scan

__all__ = [
    "get_uncertain_point_coords_with_randomness",
    "grid_sample_bilinear",
    "multi_scale_deformable_attention",
    "point_sample",
    "resize",
    "resize_matrix",
    "selective_scan",
]
