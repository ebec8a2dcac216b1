"""Released MFuser checkpoints of the EVA02 and SigLIP variants: strict loading, the keys
dropped by name and why, the buffers mmcv saves (EVA02's rotary tables and text mask,
SigLIP's position ids), SigLIP's logit scalars, the round trip.

As in tests/e2e/test_convert_mfuser.py, each reference state dict (fixtures ``eva02_release``,
``siglip_release``; tests/refs/segmentor.py) is assembled from PyTorch restatements of the
original modules (the EVA tower of tests/refs/eva02.py, HF's SigLIP towers, HF DINOv2
renamed to the official names, the original MVFuser, ContextDecoder and tqdm head), with the
prefixes MFuser_EVA_CLIP / MFuser_SIGLIP give them, plus what only the segmentors own
(contexts, gamma, EVA's unused random_text, SigLIP's unused adapter_proj1/2/3,
identity_head.conv_seg). Each module is saved as mmcv's save_checkpoint saves it: every
buffer, persistent or not. Its keys are never derived from the JAX model.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mfuser_jax.run.train import check_trainable_from  # noqa: E402
from mfuser_jax.errors import UserError  # noqa: E402
from mfuser_jax.run import restore  # noqa: E402
from mfuser_jax.weights import WeightFileError  # noqa: E402
from mfuser_jax.run.release import convert_mfuser_checkpoint, load_mfuser_checkpoint  # noqa: E402
from tests.refs.segmentor import (  # noqa: E402
    NON_PERSISTENT,
    clip_state_dict,
    eva02_state_dict,
    siglip_state_dict,
    torch_state_dict,
)
from tests.support import (  # noqa: E402
    abstract_mfuser,
    concrete,
    random_images,
    save_pth,
    small_release_config,
)


def _concrete_model(model):
    concrete(model)
    model.texts = model._tokenize(list(model.class_names))  # the variant's own tokenizer
    return model


def test_eva02_release_loads_strictly_and_predicts(eva02_release):
    config, release = eva02_release
    model = abstract_mfuser(config)
    counts = load_mfuser_checkpoint(model, release)
    n_buffers = 2 * (1 + config.model.eva02.layers) + 1  # rotary tables, text mask
    assert counts == {"loaded": len(release) - 3 - 1 - n_buffers, "dropped": 3,
                      "recomputed": n_buffers}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
        assert isinstance(var.get_value(), jax.Array), path
    np.testing.assert_array_equal(model.backbone.vlm.blocks[1].attn.q_bias[...],
                                  release["backbone.blocks.1.attn.q_bias"])
    np.testing.assert_array_equal(model.text_encoder.positional_embedding[...],
                                  release["text_encoder.positional_embedding"])
    _concrete_model(model).eval()
    size = config.model.image_size
    scores = nnx.jit(lambda m, x: m.predict(x))(model, random_images(size=size))
    assert scores.shape == (1, size, size, 19) and np.all(np.isfinite(np.asarray(scores)))


def test_eva02_buffers_are_checked(eva02_release):
    # Each buffer must be what the JAX model computes; the error names key and difference.
    config, release = eva02_release
    model = abstract_mfuser(config)  # a refused load leaves the model as it was
    bad = dict(release)
    bad["backbone.blocks.2.attn.rope.freqs_sin"] = bad["backbone.blocks.2.attn.rope.freqs_sin"] + 0.1
    with pytest.raises(WeightFileError, match="rotary table"):
        load_mfuser_checkpoint(model, bad, source="eva.pth")
    mask = release["text_encoder.attn_mask"].copy()
    mask[0, 1] = 0.0  # a position that may see a later one
    with pytest.raises(WeightFileError, match=r"^eva\.pth: text_encoder\.attn_mask is not "
                       r"the causal mask of 13 text positions .*: 1 of 169 values differ, by "
                       r"up to inf$"):
        load_mfuser_checkpoint(model, {**release, "text_encoder.attn_mask": mask},
                               source="eva.pth")


def test_releases_hold_the_buffers_the_originals_register(clip_release, eva02_release,
                                                          siglip_release):
    # The fake releases are saved as mmcv saves: every buffer. Their keys beyond torch's
    # state_dict() are exactly the originals' non-persistent buffers (NON_PERSISTENT, read
    # off the original code). That the spec checks each (the strict loads count them) and
    # writes it back with the release's dtype and value: tests/e2e/test_export_pth.py.
    for vlm, build, (config, release) in (
            ("clip", clip_state_dict, clip_release), ("eva02", eva02_state_dict, eva02_release),
            ("siglip", siglip_state_dict, siglip_release)):
        torch_keys = set(build(config.model, saver=torch_state_dict))
        assert torch_keys <= set(release) and set(release) - torch_keys == NON_PERSISTENT[vlm]


def test_a_release_of_another_variant_is_refused_with_the_fix(eva02_release):
    config, release = eva02_release
    with pytest.raises(WeightFileError, match="vlm=eva02"):
        load_mfuser_checkpoint(abstract_mfuser(small_release_config("clip")), release,
                               source="eva.pth")


def _round_trip(config, release, tmp_path, scalars=None, **kwargs):
    """convert -> restore_model gives exactly the model a strict load gives."""
    pth = str(tmp_path / "iter_40.pth")
    save_pth(pth, release, {"iter": 39})
    out = str(tmp_path / "w")
    info = convert_mfuser_checkpoint(config, pth, out, **kwargs)
    assert info["step"] == 40 and info["vlm"] == config.model.vlm
    restored, step = restore.restore_model(config, out)
    assert step == 40
    want = abstract_mfuser(config)
    load_mfuser_checkpoint(want, release, scalars=scalars)
    got_flat = dict(nnx.to_flat_state(nnx.state(restored, nnx.Any(nnx.Param, nnx.BatchStat))))
    want_flat = dict(nnx.to_flat_state(nnx.state(want, nnx.Any(nnx.Param, nnx.BatchStat))))
    assert set(got_flat) == set(want_flat)
    return info, got_flat, want_flat


def test_eva02_convert_then_restore_gives_the_same_model(eva02_release, tmp_path):
    config, release = eva02_release
    info, got, want = _round_trip(config, release, tmp_path)
    assert info["recomputed"] == 2 * (1 + config.model.eva02.layers) + 1
    for path, var in want.items():
        np.testing.assert_array_equal(np.asarray(got[path].get_value()),
                                      np.asarray(var.get_value()), err_msg=str(path))


# ------------------------------------------------------------------------------ SigLIP

def test_siglip_release_loads_strictly_and_predicts(siglip_release):
    config, release = siglip_release
    model = abstract_mfuser(config)
    # First the checks of the saved position ids (a refused load leaves the model as it
    # was); the error names key and difference.
    ids = np.arange(25, dtype=np.int64)[None]  # a 5 x 5 grid: another image size
    with pytest.raises(WeightFileError, match=r"^sig\.pth: backbone\.embeddings\.position_ids "
                       r"is not the position indices of a 4x4 patch grid \(was the checkpoint "
                       r"trained at another image size.*\): shape \(1, 25\), expected \(1, 16\)$"):
        load_mfuser_checkpoint(model, {**release, "backbone.embeddings.position_ids": ids},
                               source="sig.pth")
    ids = release["text_encoder.embeddings.position_ids"][:, ::-1]
    with pytest.raises(WeightFileError, match=r"text_encoder\.embeddings\.position_ids is not "
                       r"the position indices of 10 text positions: 10 of 10 values differ, "
                       r"by up to 9$"):
        load_mfuser_checkpoint(model, {**release, "text_encoder.embeddings.position_ids": ids},
                               source="sig.pth")
    counts = load_mfuser_checkpoint(model, release, scalars={
        "logit_scale": np.float32(2.5), "logit_bias": np.float32(-9.0)})
    n_proj = 4 * config.model.siglip.layers + 2  # adapter_proj1/2 weight+bias per layer, proj3
    assert counts == {"loaded": len(release) - 3 - n_proj - 2, "dropped": 2 + n_proj,
                      "recomputed": 2}  # both towers' position_ids
    assert float(model.backbone.logit_scale[0]) == 2.5
    np.testing.assert_array_equal(model.backbone.vlm.head.attention.in_proj_weight[...],
                                  release["backbone.head.attention.in_proj_weight"])
    _concrete_model(model).eval()
    size = config.model.image_size
    scores = nnx.jit(lambda m, x: m.predict(x))(model, random_images(size=size))
    assert scores.shape == (1, size, size, 19) and np.all(np.isfinite(np.asarray(scores)))


def test_siglip_convert_then_restore_gives_the_same_model(siglip_release, spiece, tmp_path):
    config, release = siglip_release
    torch.manual_seed(5)
    weights = transformers.SiglipModel(transformers.SiglipConfig(
        text_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=50, max_position_embeddings=16),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16)))
    with torch.no_grad():
        weights.logit_scale.fill_(2.25)
        weights.logit_bias.fill_(-8.5)
    siglip_file = str(tmp_path / "siglip_vitl16_384.pth")
    torch.save(weights.state_dict(), siglip_file)
    scalars = {"logit_scale": np.float32(2.25), "logit_bias": np.float32(-8.5)}
    user_config = config.copy_and_resolve_references()
    user_config.model.siglip.tokenizer = ""  # the workdir brings its own copy
    info, got, want = _round_trip(config, release, tmp_path, scalars=scalars,
                                  vlm_weights=siglip_file, tokenizer=spiece)
    assert info["logit_scalars"] and info["dropped"] == 2 + 4 * config.model.siglip.layers + 2
    assert os.path.isfile(os.path.join(info["pretrained"], "spiece.model"))
    for path, var in want.items():
        np.testing.assert_array_equal(np.asarray(got[path].get_value()),
                                      np.asarray(var.get_value()), err_msg=str(path))
    restored, _ = restore.restore_model(user_config, str(tmp_path / "w"))
    assert float(restored.backbone.logit_bias[0]) == -8.5


def test_siglip_release_without_its_weights_cannot_be_trained(siglip_release, spiece,
                                                              tmp_path):
    config, release = siglip_release
    with pytest.raises(WeightFileError, match="siglip_tokenizer"):
        cfg = config.copy_and_resolve_references()
        cfg.model.siglip.tokenizer = ""
        convert_mfuser_checkpoint(cfg, str(tmp_path / "x.pth"), str(tmp_path / "x"))
    info, got, _ = _round_trip(config, release, tmp_path, tokenizer=spiece)
    assert not info["logit_scalars"]
    scale = [v for p, v in got.items() if p[-1] == "logit_scale"][0]
    assert np.isnan(np.asarray(scale.get_value())).all()
    model, _ = restore.restore_model(config, str(tmp_path / "w"))
    with pytest.raises(UserError, match="--siglip"):
        check_trainable_from(model)
