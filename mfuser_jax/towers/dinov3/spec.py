"""DINOv3 ViT-L/16 as MFuser's vision foundation model (an alternative to the paper's DINOv2).

Not in the paper: ``--config configs/gta2cs.py:vfm=dinov3`` fuses it with the VLM in place
of DINOv2 (same depth and width as DINOv2-L: 24 layers of 1024). Patch 16 natively, so with
CLIP and SigLIP (patch 16) nothing is resized; RoPE positions fit any grid, so there is no
position table to resize either. With EVA02 (patch 14) the patch kernel is resized 16 -> 14
on conversion, as the reference resizes DINOv2's 14 -> 16 (same bicubic, same caveat: a
resized kernel is not the released one). Its 4 register ("storage") tokens are carried in
the fused sequence and left out of the FPN maps and the embeddings (model/backbone.py).
"""

from __future__ import annotations

from mfuser_jax.ops.resize import resize
from mfuser_jax.towers.dinov2.spec import IMAGENET_MEAN, IMAGENET_STD
from mfuser_jax.towers.dinov3.convert import to_official
from mfuser_jax.towers.dinov3.model import DinoV3VisionTransformer
from mfuser_jax.towers.dinov3.config import CONFIG
from mfuser_jax.towers.spec import VFMBuild, VFMSpec, Weights

PATCH = "patch_embed.proj.weight"


def build_tower(c, *, image_size, patch_size, layers, dtype, rngs):
    return DinoV3VisionTransformer(
        img_size=image_size, patch_size=patch_size, embed_dim=c.embed_dim, depth=layers,
        num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, init_values=c.init_values,
        n_storage_tokens=c.n_storage_tokens, rope_base=c.rope_base, dtype=dtype, rngs=rngs)


def convert(state_dict, c, *, img_size, patch_size, source="state dict"):
    """Official .pth / HF DINOv3ViTModel state dict -> the tower's (checked; RoPE periods
    against ``c``'s heads and base). ``img_size``: RoPE needs no resize; the patch kernel is
    resized bicubically when the model's patch size is not 16 (EVA02's 14)."""
    del img_size
    sd = to_official(state_dict, num_heads=c.num_heads, rope_base=c.rope_base, source=source)
    if sd[PATCH].shape[-2:] != (patch_size, patch_size):
        sd[PATCH] = resize(sd[PATCH], (patch_size, patch_size), axes=(2, 3), mode="bicubic")
    return sd


SPEC = VFMSpec(
    name="dinov3",
    title="DINOv3 ViT-L/16",
    config=CONFIG,
    build=VFMBuild(tower=build_tower, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    weights=Weights(convert=convert, file="dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
                    help="DINOv3 ViT-L/16 weights (official .pth or HF safetensors), for "
                         "vfm=dinov3"),
)
