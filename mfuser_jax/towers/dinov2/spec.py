"""DINOv2 ViT-L/14 as MFuser's vision foundation model (the paper's VFM).

Follows devinxzhang/MFuser's models/backbones/dino_v2.py: one class token, no registers, the
patch kernel resized from 14 to the VLM's patch size (16 for CLIP and SigLIP) and the
position table to the training crop's grid on conversion, ImageNet pixel statistics. Its
depth is the VLM's (the two are fused layer by layer).
"""

from __future__ import annotations

from mfuser_jax.towers.dinov2.convert import resize_for_mfuser, to_official
from mfuser_jax.towers.dinov2.model import DinoVisionTransformer
from mfuser_jax.towers.dinov2.config import CONFIG
from mfuser_jax.towers.spec import VFMBuild, VFMSpec, Weights

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def build_tower(c, *, image_size, patch_size, layers, dtype, rngs):
    return DinoVisionTransformer(
        img_size=image_size, patch_size=patch_size, embed_dim=c.embed_dim, depth=layers,
        num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, init_values=c.init_values,
        dtype=dtype, rngs=rngs)


def convert(state_dict, c, *, img_size, patch_size, source="state dict"):
    """Official .pth / HF Dinov2Model state dict -> the tower's, resized as MFuser does
    (``c``, the config section, is not needed: the file's shapes are checked on load)."""
    del c
    return resize_for_mfuser(to_official(state_dict, source=source), patch_size=patch_size,
                             img_size=img_size)


SPEC = VFMSpec(
    name="dinov2",
    title="DINOv2 ViT-L/14",
    config=CONFIG,
    build=VFMBuild(tower=build_tower, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    weights=Weights(convert=convert, file="dinov2_vitl14_pretrain.pth",
                    help="DINOv2 ViT-L/14 weights (official .pth or HF)"),
)
