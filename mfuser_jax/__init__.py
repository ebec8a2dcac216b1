"""MFuser in JAX: Mamba-based fusion of DINOv2 and CLIP for domain-generalized segmentation."""

__version__ = "0.1.0"
