"""The originals' fused backbones restated in torch: the layer loop all three share
(devinxzhang/MFuser clip/models.py ``CLIPVisionTransformer.forward``, eva_vit_model.py
``EVAVisionTransformer.extract_feats``, modeling_siglip.py ``SiglipVisionTransformer.forward``:
block i of each tower, MVFuser i over both towers' tokens) and the FPN they build."""

import torch
import torch.nn as tnn


def first_output(out):
    """An HF layer's hidden states (a tensor or a tuple, depending on the version)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def t_fpn1(dim):
    """fpn1: two stride-2 transposed convolutions with BatchNorm and GELU between."""
    return tnn.Sequential(tnn.ConvTranspose2d(dim, dim, 2, 2), tnn.BatchNorm2d(dim), tnn.GELU(),
                          tnn.ConvTranspose2d(dim, dim, 2, 2))


def t_fpn2(dim):
    """fpn2: one stride-2 transposed convolution."""
    return tnn.Sequential(tnn.ConvTranspose2d(dim, dim, 2, 2))


class TorchFPN(tnn.Module):
    """fpn1/fpn2 as the originals build them (fpn3 identity, fpn4 max-pool), with random
    BatchNorm statistics."""

    def __init__(self, dim):
        super().__init__()
        self.fpn1 = t_fpn1(dim)
        self.fpn2 = t_fpn2(dim)
        with torch.no_grad():
            self.fpn1[1].running_mean.normal_(0.0, 0.5)
            self.fpn1[1].running_var.uniform_(0.5, 2.0)

    def forward(self, maps):
        ops = [self.fpn1, self.fpn2, tnn.Identity(), tnn.MaxPool2d(2, 2)]
        return [op(m) for op, m in zip(ops, maps)]


def fused_layers(vlm_block, dino, adapters, vlm_x, dino_x, grid, out_indices):
    """The shared loop of the EVA02 and SigLIP originals: block i of each tower (``dino``:
    HF Dinov2Model), MVFuser i over [DINOv2 tokens, VLM tokens], each half added back; the
    maps after the ``out_indices`` layers. Returns (vlm_x, dino_x, maps)."""
    b, maps = vlm_x.shape[0], []
    for i in range(len(adapters)):
        vlm_x = vlm_block(i, vlm_x)
        dino_x = first_output(dino.encoder.layer[i](dino_x))
        fused = adapters[i](torch.cat((dino_x, vlm_x), dim=1))
        n = dino_x.shape[1]
        dino_x = dino_x + fused[:, :n]
        vlm_x = vlm_x + fused[:, n:]
        if i in out_indices:
            vlm_patches = vlm_x[:, vlm_x.shape[1] - grid * grid:]
            maps.append(torch.cat([
                dino_x[:, 1:].permute(0, 2, 1).reshape(b, -1, grid, grid),
                vlm_patches.permute(0, 2, 1).reshape(b, -1, grid, grid)], dim=1))
    return vlm_x, dino_x, maps
