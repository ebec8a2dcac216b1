"""Pure functions without parameters: selective scan, deformable attention, point sampling."""

from mfuser_jax.ops.selective_scan import selective_scan

__all__ = ["selective_scan"]
