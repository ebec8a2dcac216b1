"""MFuser's EVA02 and SigLIP variants: the trainable split, inference, and the full-size
parameter count against the original segmentor restated module by module on torch's
'meta' device (what MFuser_EVA_CLIP / MFuser_SIGLIP build, unused parameters included;
tests/refs). The tiny models come from tests/conftest.py's ``tiny_mfuser``."""

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn as tnn  # noqa: E402

from configs.base import mfuser_model_config  # noqa: E402
from mfuser_jax.model.mfuser import MFuser  # noqa: E402
from mfuser_jax.model.variants import is_trainable_path, no_decay_filter_for  # noqa: E402
from mfuser_jax.nn.stack import stack_prefixes  # noqa: E402
from tests.refs.backbone import t_fpn1  # noqa: E402
from tests.refs.decoder import FULL_TORCH, THead  # noqa: E402
from tests.refs.eva02 import TEVA, TTextTransformer  # noqa: E402
from tests.refs.mvfuser import TorchMVFuser  # noqa: E402
from tests.refs.text_enhancer import TorchContextDecoder  # noqa: E402
from tests.support import batch, paths, tiny_config  # noqa: E402


def check_trainable_split(model, frozen_towers):
    """Gradients reach every trainable parameter (none is dead) and no frozen one; the loss
    has all its terms; predict gives finite per-class scores at the input size."""
    size = model.config.image_size
    images, labels = batch(size=size)
    graphdef, trainable, rest = nnx.split(model, model.trainable_filter, ...)

    @jax.jit
    def grads(trainable, rest):
        def loss(trainable):
            m = nnx.merge(graphdef, trainable, rest, copy=True)
            return m.loss(images, labels, jax.random.key(1))
        return jax.grad(loss, has_aux=True)(trainable)

    g, parts = grads(trainable, rest)
    assert "scr_map.loss_seg" in parts and len(parts) == 10
    assert all(np.isfinite(float(v)) for v in parts.values())
    grad_paths = paths(g)
    assert grad_paths == paths(trainable) and all(is_trainable_path(p) for p in grad_paths)
    # a stacked parameter is checked layer by layer
    stacked = stack_prefixes(model)
    dead = [".".join(map(str, p)) for p, v in nnx.to_flat_state(g)
            if any(not np.any(a) for a in (
                np.asarray(v[...]) if any(tuple(map(str, p[:len(s)])) == s for s in stacked)
                else [np.asarray(v[...])]))]
    assert dead == [], f"parameters without gradient: {dead}"
    frozen = paths(nnx.state(model, nnx.Param)) - grad_paths
    for tower in frozen_towers:
        assert any(p[:2] == ("backbone", tower) or p[:3] == ("backbone", "vlm", tower)
                   for p in frozen), tower
    assert any(p[0] == "text_encoder" for p in frozen)
    scores = nnx.jit(lambda m, x: m.predict(x))(model, images[:1])
    assert scores.shape == (1, size, size, 19) and np.all(np.isfinite(np.asarray(scores)))
    return parts


def test_eva02_tiny_trains_only_what_the_original_trains(tiny_mfuser):
    model = tiny_mfuser("eva02")
    assert model.config.patch_size == 14 and model.config.image_size == 56
    assert not hasattr(model.backbone, "adapter_proj1")  # EVA02 fuses without projections
    assert model.contexts.shape == (1, 8, 32)  # 13 text positions = 5 name tokens + 8
    check_trainable_split(model, ("dinov2", "blocks", "patch_embed", "norm", "head"))


def test_siglip_tiny_trains_only_what_the_original_trains(tiny_mfuser, spiece):
    model = tiny_mfuser("siglip", tokenizer=spiece)
    assert not hasattr(model.backbone, "adapter_proj1")  # built but never called originally
    assert model.contexts.shape == (1, 5, 32) and model.texts.shape == (19, 5)
    parts = check_trainable_split(model, ("dinov2", "encoder", "embeddings", "head",
                                          "post_layernorm", "logit_scale"))
    # the score map becomes logits through SigLIP's frozen scale and bias: changing them
    # changes the score-map loss and nothing else
    images, labels = batch(size=model.config.image_size)
    loss_parts = nnx.jit(lambda m: m.loss(images, labels, jax.random.key(1))[1])
    before = loss_parts(model)
    model.backbone.logit_bias[...] = model.backbone.logit_bias[...] + 3.0
    after = loss_parts(model)
    assert float(after["scr_map.loss_seg"]) != pytest.approx(float(before["scr_map.loss_seg"]))
    assert float(after["decode.loss_dice"]) == pytest.approx(float(before["decode.loss_dice"]),
                                                             rel=1e-3)
    assert set(parts) == set(after)


def test_siglip_needs_its_tokenizer():
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        MFuser(tiny_config("siglip"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("vlm", ["clip", "eva02", "siglip"])
def test_weight_decay_follows_the_references_paramwise_cfg(vlm):
    """mmcv's constructor with custom_keys 'norm' (+ 'level_embed', 'query_embed' for EVA02
    and SigLIP) at decay_mult 0: every other parameter decays, biases included."""
    no_decay = no_decay_filter_for(vlm)
    param = nnx.Param(np.zeros(1))

    def decays(*path):
        return not no_decay(path, param)

    assert not decays("decode_head", "transformer_decoder", "layers", 0, "norms", 1, "scale")
    assert not decays("backbone", "adapter", 3, "norm", "weight")  # MVFuser's gated RMSNorm
    assert not decays("decode_head", "pixel_decoder", "post_norm", "bias")
    for path in (("decode_head", "cls_embed", "bias"), ("backbone", "fpn1", 1, "scale"),
                 ("gamma",), ("backbone", "adapter", 0, "A_log"), ("backbone", "adapter", 0, "D"),
                 ("decode_head", "pixel_decoder", "input_convs", 0, "gn", "scale")):
        assert decays(*path), path
    embeds = (decays("decode_head", "query_embed", "embedding"),
              decays("decode_head", "level_embed", "embedding"))
    assert embeds == ((True, True) if vlm == "clip" else (False, False))


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _torch_count(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def _original_shared(text_dim):
    """DINOv2 is built per variant; these are the same modules in every segmentor."""
    cfg = dict(FULL_TORCH, text_dim=text_dim)
    fpn = 2048
    return (
        tnn.Sequential(*[TorchMVFuser(1024, 16, 3, 1) for _ in range(24)]),
        t_fpn1(fpn),
        tnn.ConvTranspose2d(fpn, fpn, 2, 2),
        TorchContextDecoder(256, 4, 1, text_dim, 0.1),
        THead(cfg),
    )


def _dinov2(patch):
    return transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, image_size=512, patch_size=patch))


def test_eva02_full_size_parameter_count_equals_the_original():
    model = nnx.eval_shape(lambda: MFuser(mfuser_model_config("large", "eva02"),
                                          rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    with torch.device("meta"):
        eva = TEVA(img=512, patch=14, dim=1024, heads=16, depth=24, ratio=2.6667, out=768)
        text = TTextTransformer(13, vocab=49408, width=768, heads=12, layers=12, out=768)
        dino = _dinov2(14)
        shared = _original_shared(768)
    contexts, gamma, random_text = 8 * 768, 768, 19 * 768
    original = _torch_count(eva, text, dino, *shared) + contexts + gamma + random_text
    # Everything but random_text, which MFuser_EVA_CLIP creates and never reads.
    assert _count(params) == original - random_text
    bb = params["backbone"]
    assert _count(bb["dinov2"]) == _torch_count(dino) == 304_293_888  # patch 14, 37->36 grid
    assert _count(params["text_encoder"]) == _torch_count(text) == 123_601_152
    eva_tower = {k: v for k, v in bb.items()
                 if not str(k).startswith(("dinov2", "adapter", "fpn"))}
    assert _count(eva_tower) == _torch_count(eva) == 305_170_112
    print(f"MFuser EVA02-L: {_count(params):,} parameters (original {original:,} incl. "
          f"random_text)")


def test_siglip_full_size_parameter_count_equals_the_original(spiece):
    cfg = mfuser_model_config("large", "siglip")
    cfg.siglip.tokenizer = spiece
    model = nnx.eval_shape(lambda: MFuser(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    full = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16)
    with torch.device("meta"):
        vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            image_size=512, patch_size=16, **full))
        text = transformers.SiglipTextModel(transformers.SiglipTextConfig(
            vocab_size=32000, max_position_embeddings=10, **full))
        dino = _dinov2(16)
        shared = _original_shared(1024)
        unused_proj = (tnn.Sequential(*[tnn.Linear(1024, 1024) for _ in range(48)]),
                       tnn.Linear(1024, 1024))
    contexts, gamma = 5 * 1024, 1024
    original = (_torch_count(vision, text, dino, *shared, *unused_proj) + contexts + gamma)
    # The original builds adapter_proj1/2/3 and never calls them; it keeps SigLIP's
    # logit_scale/logit_bias as plain tensors outside its state dict (ours: 2 frozen Params).
    assert _count(params) == original - _torch_count(*unused_proj) + 2
    bb = params["backbone"]
    assert _count(bb["dinov2"]) == _torch_count(dino) == 304_199_680
    assert _count(params["text_encoder"]) == _torch_count(text)
    tower = {k: v for k, v in bb.items() if not str(k).startswith(
        ("dinov2", "adapter", "fpn", "logit_"))}
    assert _count(tower) == _torch_count(vision)
    print(f"MFuser SigLIP-L: {_count(params):,} parameters (vision {_count(tower):,}, text "
          f"{_count(params['text_encoder']):,}); original {original:,} incl. unused projections")
