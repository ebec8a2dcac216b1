"""The tower registry (mfuser_jax/towers/registry.py): a fourth VLM is one registry entry.

A toy VLM reuses CLIP's tower builders and weight renames under its own name, with its own
tiny config section (other widths, patch 8, 3 contexts), weight decay, no-decay keys,
score-map logits and release key. With nothing else edited, the config, the model, its
loss, the optimizer's no-decay filter, the encoder converter and release detection must all
follow the spec; it is unregistered afterwards so no other test sees it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from mfuser_jax.run import flops
from mfuser_jax.model import losses
from mfuser_jax.towers import registry
from mfuser_jax.run.release import WeightFileError, check_variant, release_variant
from mfuser_jax.model import variants
from mfuser_jax.model.mfuser import MFuser
from mfuser_jax.towers.clip import spec as clip_vlm

TOY = "toyclip"
LOGIT_SCALE = 3.0
CALLS = []


def toy_logits(backbone, score_map, temperature):
    """Its own score-map logits: the cosine times 3 at temperature 1 (CLIP: cosine / 0.07)."""
    del backbone, temperature
    return score_map * LOGIT_SCALE, 1.0


def toy_convert(state_dict, **sizes):
    CALLS.append(sizes)
    return clip_vlm.convert_encoder(state_dict, **sizes)


@pytest.fixture
def toy():
    clip = clip_vlm.SPEC
    spec = dataclasses.replace(
        clip, name=TOY, title="Toy CLIP",
        config=dataclasses.replace(
            clip.config,
            tiny=dict(width=16, layers=4, heads=2, output_dim=24, text_width=16,
                      text_heads=2, text_layers=1, n_ctx=3),
            patch_size=8, weight_decay=3e-5, no_decay_keys=("norm", "gamma")),
        build=dataclasses.replace(clip.build, score_logits=toy_logits, analytic_flops=False),
        weights=dataclasses.replace(clip.weights, convert=toy_convert, file="toy.pt",
                                    help="toy weights, for vlm=toyclip"),
        release=dataclasses.replace(clip.release, key="backbone.toy_only.weight"))
    registry.register(spec)
    CALLS.clear()
    yield spec
    registry.unregister(spec)


def toy_config():
    cfg = base.mfuser_model_config(size="tiny", vlm=TOY)
    cfg.mvfuser.scan_backend = "reference"
    cfg.loss.num_points = 64
    return cfg


def test_the_toy_config_comes_from_its_spec(toy):
    assert TOY in base.VLMS and TOY in registry.vlm_names()
    cfg = toy_config()
    assert cfg.vlm == TOY and cfg.patch_size == 8 and cfg.image_size == 32
    assert cfg[TOY].width == 16 and cfg[TOY].n_ctx == 3 and cfg[TOY].text_layers == 1
    assert cfg[TOY].vocab_size == 49408  # from the large section it shares with CLIP
    assert "clip" not in cfg
    experiment = base.make_config("synthetic", ("synthetic",), f"vlm={TOY},size=tiny")
    assert experiment.optim.weight_decay == pytest.approx(3e-5)
    assert experiment.model.pretrained == ""


def test_the_toy_model_builds_and_its_loss_uses_its_logits(toy):
    cfg = toy_config()
    model = MFuser(cfg, rngs=nnx.Rngs(0))
    assert model.backbone.vlm.conv1.kernel.shape[:2] == (8, 8)
    assert model.contexts.shape == (1, 3, 16) and model.texts.shape == (cfg.num_classes, 5)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
    labels = jnp.asarray(rng.integers(0, 6, (2, 32, 32)).astype(np.int32))
    total, parts = model.loss(images, labels, jax.random.key(0))
    assert np.isfinite(float(total)) and set(parts) >= {"scr_map.loss_seg", "decode.loss_cls"}

    model.eval()
    outputs = model.forward(images)
    _, parts = model.loss_of_outputs(outputs, labels, jax.random.key(1))
    score_map = outputs[2]
    want = model.score_map_weight * losses.score_map_loss(
        score_map * LOGIT_SCALE, labels, temperature=1.0)
    clip_way = model.score_map_weight * losses.score_map_loss(
        score_map, labels, temperature=model.tau)
    np.testing.assert_allclose(float(parts["scr_map.loss_seg"]), float(want), rtol=1e-5)
    assert abs(float(want) - float(clip_way)) > 1e-3  # the two ways differ: the test can fail


def test_the_no_decay_filter_uses_its_keys(toy):
    param = nnx.Param(np.zeros(1))
    toy_filter = variants.no_decay_filter_for(TOY)
    clip_filter = variants.no_decay_filter_for("clip")
    assert toy_filter(("gamma",), param) and not clip_filter(("gamma",), param)
    assert toy_filter(("backbone", "fpn1", 1, "norm"), param)
    assert not toy_filter(("decode_head", "cls_embed", "bias"), param)
    model = MFuser(toy_config(), rngs=nnx.Rngs(0))
    assert model.no_decay_filter(("gamma",), param)


def test_release_detection_and_flops_follow_the_spec(toy):
    release = {"backbone.toy_only.weight": 0, "decode_head.x": 0}
    assert release_variant(release) == TOY
    with pytest.raises(WeightFileError, match=f":vlm={TOY}"):
        check_variant(release, "clip", "toy.pth")
    with pytest.raises(ValueError, match="cover clip only"):
        flops.backbone_flops(toy_config(), 1, (32, 32))


def test_unknown_names_list_the_registered_ones(toy):
    with pytest.raises(ValueError, match=f"'clip', 'eva02', 'siglip', '{TOY}'"):
        registry.get_vlm("llava")
    with pytest.raises(base.ConfigError, match=TOY):
        base.plain_model_config("tiny", "llava")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(toy)
    with pytest.raises(ValueError, match="large lacks"):
        dataclasses.replace(toy.config, tiny=dict(depth=2))


def test_the_toy_is_gone_after_its_test():
    assert TOY not in registry.vlm_names() and TOY not in base.VLMS
    with pytest.raises(base.ConfigError, match=TOY):
        base.plain_model_config("tiny", TOY)


def test_the_encoder_converter_runs_the_toys_renames(toy, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.refs.hf import random_dinov2_and_clip, save_safetensors

    from mfuser_jax.model.pretrained import convert_encoders

    cfg = toy_config()
    c, d = cfg[TOY], cfg.dinov2
    torch.manual_seed(0)
    dino, clip = random_dinov2_and_clip(c, d, image_size=28)
    paths = {name: save_safetensors(model, str(tmp_path / f"{name}.safetensors"))
             for name, model in (("dinov2", dino), ("toy", clip))}
    out = str(tmp_path / "converted")
    counts = convert_encoders(cfg, out, vfm_path=paths["dinov2"], vlm_path=paths["toy"])
    # the spec's renames ran once, at the toy's sizes: 32 px, patch 8, 5 + 3 text positions
    assert CALLS == [dict(img_size=32, patch_size=8, context_length=8)]
    assert set(counts) == {"dinov2", f"{TOY}_visual", f"{TOY}_text"}

    model = MFuser(cfg, rngs=nnx.Rngs(1))
    model.load_pretrained(out)
    np.testing.assert_allclose(model.text_encoder.text_projection[...],
                               clip.text_projection.weight.detach().numpy().T, rtol=1e-6)
    assert model.text_encoder.positional_embedding.shape == (8, 16)
