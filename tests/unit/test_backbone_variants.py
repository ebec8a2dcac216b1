"""The fused backbones of all three variants against PyTorch restatements of the originals'
fused forward passes (clip/models.py ``CLIPVisionTransformer.forward``, eva_vit_model.py
``EVAVisionTransformer.extract_feats`` and modeling_siglip.py
``SiglipVisionTransformer.forward``), written from the original code: towers from
tests/refs (CLIP and EVA restatements, HF's SigLIP with MFuser's pooling head), DINOv2 from
HF, the original MVFuser (tests/refs/mvfuser.py), the shared layer loop and the FPN as the
originals build them (tests/refs/backbone.py).
Random tiny weights; everything is compared: the four FPN maps, the global and the
per-pixel embeddings.
"""

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn as tnn  # noqa: E402

from mfuser_jax.towers.dinov2.convert import hf_to_official  # noqa: E402
from mfuser_jax.weights.state_dict import load_torch_state_dict  # noqa: E402
from mfuser_jax.model.variants import vfm_fusion_args  # noqa: E402
from mfuser_jax.towers.clip.fusion import MFuserBackbone  # noqa: E402
from mfuser_jax.towers.eva02.fusion import MFuserEVABackbone  # noqa: E402
from mfuser_jax.towers.registry import get_vfm  # noqa: E402
from mfuser_jax.towers.siglip.fusion import MFuserSiglipBackbone  # noqa: E402
from tests.refs.backbone import (IMAGENET, TorchFPN, compare_outputs, first_output,  # noqa: E402
                                 fused_layers, randomize, renorm)
from tests.refs.clip import TVisual  # noqa: E402
from tests.refs.eva02 import TEVA, visual_state_dict  # noqa: E402
from tests.refs.eva02 import randomize as eva_randomize  # noqa: E402
from tests.refs.mvfuser import TorchMVFuser  # noqa: E402
from tests.refs.siglip import pooling_head  # noqa: E402

WIDTH, LAYERS, HEADS, OUT = 32, 4, 2, (0, 1, 2, 3)


def _fusion(image, patch):
    """The DINOv2 tower and MVFuser arguments every variant here shares."""
    dinov2 = SimpleNamespace(embed_dim=WIDTH, num_heads=HEADS, mlp_ratio=4.0, init_values=0.5)
    vfm = vfm_fusion_args(get_vfm("dinov2"), dinov2, image_size=image, patch_size=patch,
                          layers=LAYERS)
    return dict(**vfm, out_indices=OUT, d_state=16, d_conv=3, expand=1,
                scan_backend="reference")


def _dino(image, patch, seed):
    torch.manual_seed(seed)
    model = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH, image_size=image, patch_size=patch,
        layerscale_value=0.5, layer_norm_eps=1e-6)).eval()
    randomize(model, seed)
    return model


def _torch_fusion(image, patch):
    """DINOv2 (HF), the per-layer MVFusers and the FPN with random weights, and an input."""
    dino = _dino(image, patch, 2)
    adapters = tnn.Sequential(*[TorchMVFuser(WIDTH, 16, 3, 1) for _ in range(LAYERS)]).eval()
    randomize(adapters, 3)
    return dino, adapters, TorchFPN(2 * WIDTH).eval(), torch.randn(2, 3, image, image)


def _common_state(dino, adapters, fpn):
    sd = {f"dinov2.{k}": v for k, v in hf_to_official(dino.state_dict()).items()}
    sd.update({f"adapter.{k}": v for k, v in adapters.state_dict().items()})
    sd.update(fpn.state_dict())
    return sd


# ------------------------------------------------------------------------------ SigLIP

def test_siglip_backbone_matches_the_original_forward():
    image, patch = 64, 16
    grid = image // patch
    torch.manual_seed(0)
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH, image_size=image, patch_size=patch))
    siglip = getattr(siglip, "vision_model", siglip).eval()  # transformers 4 nests it
    randomize(siglip, 1)
    dino, adapters, fpn, x = _torch_fusion(image, patch)

    with torch.no_grad():
        dino_x = dino.embeddings(renorm(x, *IMAGENET))
        h = siglip.embeddings(renorm(x, (127.5,) * 3, (127.5,) * 3))
        block = lambda i, t: first_output(siglip.encoder.layers[i](t, None))  # noqa: E731
        h, dino_x, maps = fused_layers(block, dino, adapters, h, dino_x, grid, OUT)
        last = siglip.post_layernorm(h) + dino.layernorm(dino_x[:, 1:])
        glob, loc = pooling_head(siglip.head, last)
        want = (fpn(maps), glob, loc.reshape(2, grid, grid, -1))

    ours = MFuserSiglipBackbone(image_size=image, patch_size=patch, width=WIDTH, layers=LAYERS,
                                heads=HEADS, intermediate_size=2 * WIDTH, **_fusion(image, patch),
                                rngs=nnx.Rngs(0))
    sd = _common_state(dino, adapters, fpn)
    sd.update(siglip.state_dict())
    sd.update({"logit_scale": np.array([2.3], np.float32), "logit_bias": np.array([-7.0], np.float32)})
    load_torch_state_dict(ours, sd)
    ours.eval()
    got = ours(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    compare_outputs(got, want)
    # SigLIP's score logits: cosine * exp(logit_scale) + logit_bias
    s = jnp.asarray([[0.5, -0.25]])
    np.testing.assert_allclose(ours.score_logits(s), np.asarray(s) * np.exp(2.3) - 7.0,
                               rtol=1e-6)


# ------------------------------------------------------------------------------ EVA02

def test_eva02_backbone_matches_the_original_forward():
    """extract_feats: patch 14 in both towers, no projections, head(norm(eva) + dino.norm(dino))."""
    image, patch, out_dim = 56, 14, 24
    grid = image // patch
    eva = eva_randomize(TEVA(img=image, patch=patch, dim=WIDTH, heads=HEADS, depth=LAYERS,
                             ratio=2.6667, out=out_dim), 1).eval()
    dino, adapters, fpn, x = _torch_fusion(image, patch)

    with torch.no_grad():
        dino_x = dino.embeddings(renorm(x, *IMAGENET))
        t = eva.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat((eva.cls_token.expand(2, -1, -1), t), dim=1) + eva.pos_embed
        block = lambda i, t: eva.blocks[i](t)  # noqa: E731
        t, dino_x, maps = fused_layers(block, dino, adapters, t, dino_x, grid, OUT)
        emb = eva.head(eva.norm(t) + dino.layernorm(dino_x))
        want = (fpn(maps), emb[:, :1], emb[:, 1:].reshape(2, grid, grid, -1))

    ours = MFuserEVABackbone(image_size=image, patch_size=patch, width=WIDTH, layers=LAYERS,
                             heads=HEADS, mlp_ratio=2.6667, output_dim=out_dim,
                             pt_hw_seq_len=16, **_fusion(image, patch), rngs=nnx.Rngs(0))
    sd = _common_state(dino, adapters, fpn)
    sd.update(visual_state_dict(eva))
    load_torch_state_dict(ours, sd)
    ours.eval()
    compare_outputs(ours(jnp.asarray(x.numpy().transpose(0, 2, 3, 1))), want)


# ------------------------------------------------------------------------------ CLIP

def test_clip_backbone_matches_the_original_forward():
    """The only variant with projections: proj1(dino) into the fuser, proj2 on the way
    back, clip + proj3(dino) before ln_post/proj (no DINOv2 norm)."""
    image, patch, out_dim = 64, 16, 24
    grid = image // patch
    clip = TVisual(image, patch, WIDTH, LAYERS, HEADS, out_dim).eval()
    randomize(clip, 1)
    dino, adapters, fpn, x = _torch_fusion(image, patch)
    proj1 = tnn.Sequential(*[tnn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    proj2 = tnn.Sequential(*[tnn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    proj3 = tnn.Linear(WIDTH, WIDTH)
    for i, m in enumerate((proj1, proj2, proj3)):
        randomize(m, 4 + i)

    with torch.no_grad():
        dino_x = dino.embeddings(renorm(x, *IMAGENET))
        t = clip.conv1(x).flatten(2).transpose(1, 2)
        c = t.shape[-1]
        t = torch.cat([clip.class_embedding + torch.zeros(2, 1, c), t], dim=1)
        pos = clip.positional_embedding
        t = t + torch.cat([(pos[0] + clip.class_embedding).reshape(1, 1, c), pos[1:][None]], 1)
        t = clip.ln_pre(t)
        b, maps = 2, []
        for i in range(LAYERS):
            t = clip.transformer.resblocks[i](t.permute(1, 0, 2)).permute(1, 0, 2)
            dino_x = first_output(dino.encoder.layer[i](dino_x))
            fused = adapters[i](torch.cat((proj1[i](dino_x), t), dim=1))
            n = dino_x.shape[1]
            dino_x = dino_x + proj2[i](fused[:, :n])
            t = t + fused[:, n:]
            maps.append(torch.cat([dino_x[:, 1:].permute(0, 2, 1).reshape(b, -1, grid, grid),
                                   t[:, 1:].permute(0, 2, 1).reshape(b, -1, grid, grid)], 1))
        emb = clip.ln_post(t + proj3(dino_x)) @ clip.proj
        want = (fpn(maps), emb[:, :1], emb[:, 1:].reshape(2, grid, grid, -1))

    ours = MFuserBackbone(image_size=image, patch_size=patch, width=WIDTH, layers=LAYERS,
                          heads=HEADS, output_dim=out_dim, drop_path_rate=0.1, **_fusion(image, patch),
                          rngs=nnx.Rngs(0))
    sd = _common_state(dino, adapters, fpn)
    sd.update(clip.state_dict())
    for name, m in (("adapter_proj1.", proj1), ("adapter_proj2.", proj2), ("adapter_proj3.", proj3)):
        sd.update({name + k: v for k, v in m.state_dict().items()})
    load_torch_state_dict(ours, sd)
    ours.eval()
    compare_outputs(ours(jnp.asarray(x.numpy().transpose(0, 2, 3, 1))), want)
