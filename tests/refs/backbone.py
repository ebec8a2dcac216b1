"""The originals' fused backbones restated in torch: the layer loop all three share
(devinxzhang/MFuser clip/models.py ``CLIPVisionTransformer.forward``, eva_vit_model.py
``EVAVisionTransformer.extract_feats``, modeling_siglip.py ``SiglipVisionTransformer.forward``:
block i of each tower, MVFuser i over both towers' tokens) and the FPN they build."""

import torch
import torch.nn as tnn

from tests.support import rel_err

# Pixel statistics in 0..255 units (the reference's data pipeline and towers).
CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)
IMAGENET = ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))


def randomize(module, seed):
    """Random weights for a reference module (norm scales around 1, the rest around 0), so
    that a parity test exercises every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def renorm(x, mean, std):
    """A CLIP-normalised NCHW batch normalised again with a tower's statistics, as the
    reference does per tower."""
    m = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x * s + m - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def compare_outputs(ours, theirs, tol=1e-5):
    """A fused backbone's (4 NHWC maps, global, pixel embeddings) against the reference's
    (NCHW maps), each to relative error ``tol``."""
    feats, glob, pix = ours
    t_feats, t_glob, t_pix = theirs
    assert len(feats) == 4
    for f, t in zip(feats, t_feats):
        t = t.detach().numpy().transpose(0, 2, 3, 1)
        assert f.shape == t.shape
        assert rel_err(f, t) < tol
    assert rel_err(glob, t_glob.detach().numpy()) < tol
    assert rel_err(pix, t_pix.detach().numpy()) < tol


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
