"""Released MFuser checkpoints of the EVA02 and SigLIP variants: strict loading, the keys
dropped by name and why, the buffers mmcv saves (EVA02's rotary tables and text mask,
SigLIP's position ids), SigLIP's logit scalars, the round trip.

As in tests/test_convert_mfuser.py, each reference state dict is assembled from PyTorch
restatements of the original modules (the EVA tower of tests/test_eva02.py, HF's SigLIP
towers, HF DINOv2 renamed to the official names, the original MVFuser, ContextDecoder and
tqdm head), with the prefixes MFuser_EVA_CLIP / MFuser_SIGLIP give them, plus what only the
segmentors own (contexts, gamma, EVA's unused random_text, SigLIP's unused adapter_proj1/2/3,
identity_head.conv_seg). Each module is saved as mmcv's save_checkpoint saves it: every
buffer, persistent or not. Its keys are never derived from the JAX model.
"""

import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn as tnn  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_convert_mfuser import (  # noqa: E402
    NON_PERSISTENT,
    _concrete,
    _images,
    _prefixed,
    _save_pth,
    _shared_parts,
    mmcv_state_dict,
    torch_state_dict,
)
from test_eva02 import TEVA, TTextTransformer  # noqa: E402
from test_siglip import spiece  # noqa: E402,F401  (a tiny SentencePiece model fixture)

from configs import demo  # noqa: E402
from mfuser_jax import startup
from mfuser_jax.run import train  # noqa: E402
from mfuser_jax.weights import WeightFileError  # noqa: E402
from mfuser_jax.run.release import convert_mfuser_checkpoint, load_mfuser_checkpoint  # noqa: E402
from mfuser_jax.model.mfuser import MFuser  # noqa: E402


def experiment_config(vlm, **model):
    c = demo.get_config(f"vlm={vlm}")
    c.model.image_size = 4 * c.model.patch_size  # a 4x4 patch grid keeps the test fast
    c.data.crop_size = c.evaluation.crop_size = c.model.image_size  # they must agree
    c.evaluation.stride = (2 * c.model.image_size) // 3
    c.model.mvfuser.scan_backend = "reference"
    c.model.update(model)
    c.total_steps = 40
    return c


def eva02_state_dict(m, seed=0, saver=mmcv_state_dict):
    """The state dict MFuser_EVA_CLIP saves (tiny sizes, random values); ``saver``: mmcv's,
    as releases are saved, or torch's state_dict."""
    torch.manual_seed(seed)
    c = m.eva02
    sd = _shared_parts(m, c.width, c.output_dim, seed, saver)
    # The EVA tower at the backbone's top level, its rope buffers (one shared module,
    # saved once per block too) included.
    sd.update(_prefixed(saver, "backbone.", TEVA(
        img=m.image_size, patch=m.patch_size, dim=c.width, heads=c.heads, depth=c.layers,
        ratio=c.mlp_ratio, out=c.output_dim)))
    n = c.token_length + c.n_ctx
    text = TTextTransformer(n, vocab=c.vocab_size, width=c.text_width, heads=c.text_heads,
                            layers=c.text_layers, out=c.output_dim)
    # eva_clip/transformer.py TextTransformer.__init__: the causal mask as a buffer
    text.register_buffer("attn_mask", torch.full((n, n), float("-inf")).triu_(1),
                         persistent=False)
    sd.update(_prefixed(saver, "text_encoder.", text))
    # MFuser_EVA_CLIP.__init__: nn.Parameter(torch.randn(num_classes, 768)), never read.
    sd["random_text"] = np.random.default_rng(seed).normal(size=(m.num_classes, 768)).astype(
        np.float32)
    return sd


def _hf_tower(model):
    return getattr(model, "vision_model", getattr(model, "text_model", model))  # transformers 4


def siglip_state_dict(m, seed=0, saver=mmcv_state_dict):
    """The state dict MFuser_SIGLIP saves (tiny sizes, random values): HF SigLIP towers,
    whose embeddings register position_ids as the original's do (persistent=False)."""
    torch.manual_seed(seed)
    c, dd = m.siglip, m.dinov2.embed_dim
    sd = _shared_parts(m, c.width, c.output_dim, seed, saver)
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=m.image_size, patch_size=m.patch_size, hidden_size=c.width,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.layers,
        num_attention_heads=c.heads))
    sd.update(_prefixed(saver, "backbone.", _hf_tower(vision)))
    text = transformers.SiglipTextModel(transformers.SiglipTextConfig(
        vocab_size=c.vocab_size, max_position_embeddings=c.token_length + c.n_ctx,
        hidden_size=c.text_width, intermediate_size=c.text_intermediate_size,
        num_hidden_layers=c.text_layers, num_attention_heads=c.text_heads))
    sd.update(_prefixed(saver, "text_encoder.", _hf_tower(text)))
    # SiglipVisionTransformer.__init__ builds the CLIP variant's projections; forward never
    # calls them, but they are in the checkpoint.
    sd.update(_prefixed(saver, "backbone.adapter_proj1.",
                        tnn.Sequential(*[tnn.Linear(dd, c.width) for _ in range(c.layers)])))
    sd.update(_prefixed(saver, "backbone.adapter_proj2.",
                        tnn.Sequential(*[tnn.Linear(c.width, dd) for _ in range(c.layers)])))
    sd.update(_prefixed(saver, "backbone.adapter_proj3.", tnn.Linear(dd, c.width)))
    return sd


def _abstract(config):
    return nnx.eval_shape(lambda: MFuser(config.model, rngs=nnx.Rngs(0)))


def _concrete_model(model):
    _concrete(model)
    model.texts = model._tokenize(list(model.class_names))  # the variant's own tokenizer
    return model


@pytest.fixture(scope="module")
def eva():
    config = experiment_config("eva02")
    return config, eva02_state_dict(config.model)


def test_eva02_release_loads_strictly_and_predicts(eva):
    config, release = eva
    model = _abstract(config)
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
    scores = nnx.jit(lambda m, x: m.predict(x))(model, _images(size=size))
    assert scores.shape == (1, size, size, 19) and np.all(np.isfinite(np.asarray(scores)))


def test_eva02_buffers_are_checked(eva):
    # Each buffer must be what the JAX model computes; the error names key and difference.
    config, release = eva
    model = _abstract(config)  # a refused load leaves the model as it was
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


def test_releases_hold_the_buffers_the_originals_register(eva, sig):
    # The fake releases are saved as mmcv saves: every buffer. Their keys beyond torch's
    # state_dict() are exactly the originals' non-persistent buffers (NON_PERSISTENT, read
    # off the original code). That the spec checks each (the strict loads count them) and
    # writes it back with the release's dtype and value: tests/test_export_pth.py.
    from test_convert_mfuser import experiment_config as clip_config
    from test_convert_mfuser import original_state_dict

    clip = clip_config()
    for vlm, build, (config, release) in (
            ("clip", original_state_dict, (clip, None)), ("eva02", eva02_state_dict, eva),
            ("siglip", siglip_state_dict, sig)):
        release = build(config.model) if release is None else release
        torch_keys = set(build(config.model, saver=torch_state_dict))
        assert torch_keys <= set(release) and set(release) - torch_keys == NON_PERSISTENT[vlm]


def test_a_release_of_another_variant_is_refused_with_the_fix(eva):
    config, release = eva
    with pytest.raises(WeightFileError, match="vlm=eva02"):
        load_mfuser_checkpoint(_abstract(experiment_config("clip")), release, source="eva.pth")


def _round_trip(config, release, tmp_path, monkeypatch, scalars=None, **kwargs):
    """convert -> restore_model gives exactly the model a strict load gives."""
    monkeypatch.setattr(startup, "create_model", lambda cfg: _concrete_model(_abstract(cfg)))
    pth = str(tmp_path / "iter_40.pth")
    _save_pth(pth, release, {"iter": 39})
    out = str(tmp_path / "w")
    info = convert_mfuser_checkpoint(config, pth, out, **kwargs)
    assert info["step"] == 40 and info["vlm"] == config.model.vlm
    restored, step = train.restore_model(config, out)
    assert step == 40
    want = _abstract(config)
    load_mfuser_checkpoint(want, release, scalars=scalars)
    got_flat = dict(nnx.to_flat_state(nnx.state(restored, nnx.Any(nnx.Param, nnx.BatchStat))))
    want_flat = dict(nnx.to_flat_state(nnx.state(want, nnx.Any(nnx.Param, nnx.BatchStat))))
    assert set(got_flat) == set(want_flat)
    return info, got_flat, want_flat


def test_eva02_convert_then_restore_gives_the_same_model(eva, tmp_path, monkeypatch):
    config, release = eva
    info, got, want = _round_trip(config, release, tmp_path, monkeypatch)
    assert info["recomputed"] == 2 * (1 + config.model.eva02.layers) + 1
    for path, var in want.items():
        np.testing.assert_array_equal(np.asarray(got[path].get_value()),
                                      np.asarray(var.get_value()), err_msg=str(path))


# ------------------------------------------------------------------------------ SigLIP

@pytest.fixture(scope="module")
def sig(spiece):
    config = experiment_config("siglip")
    config.model.siglip.tokenizer = spiece
    return config, siglip_state_dict(config.model)


def test_siglip_release_loads_strictly_and_predicts(sig):
    config, release = sig
    model = _abstract(config)
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
    scores = nnx.jit(lambda m, x: m.predict(x))(model, _images(size=size))
    assert scores.shape == (1, size, size, 19) and np.all(np.isfinite(np.asarray(scores)))


def test_siglip_convert_then_restore_gives_the_same_model(sig, spiece, tmp_path, monkeypatch):
    config, release = sig
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
    info, got, want = _round_trip(config, release, tmp_path, monkeypatch, scalars=scalars,
                                  vlm_weights=siglip_file, tokenizer=spiece)
    assert info["logit_scalars"] and info["dropped"] == 2 + 4 * config.model.siglip.layers + 2
    assert os.path.isfile(os.path.join(info["pretrained"], "spiece.model"))
    for path, var in want.items():
        np.testing.assert_array_equal(np.asarray(got[path].get_value()),
                                      np.asarray(var.get_value()), err_msg=str(path))
    restored, _ = train.restore_model(user_config, str(tmp_path / "w"))
    assert float(restored.backbone.logit_bias[0]) == -8.5


def test_siglip_release_without_its_weights_cannot_be_trained(sig, spiece, tmp_path,
                                                              monkeypatch):
    config, release = sig
    with pytest.raises(WeightFileError, match="siglip_tokenizer"):
        cfg = config.copy_and_resolve_references()
        cfg.model.siglip.tokenizer = ""
        convert_mfuser_checkpoint(cfg, str(tmp_path / "x.pth"), str(tmp_path / "x"))
    info, got, _ = _round_trip(config, release, tmp_path, monkeypatch, tokenizer=spiece)
    assert not info["logit_scalars"]
    scale = [v for p, v in got.items() if p[-1] == "logit_scale"][0]
    assert np.isnan(np.asarray(scale.get_value())).all()
    model, _ = train.restore_model(config, str(tmp_path / "w"))
    with pytest.raises(train.UserError, match="--siglip"):
        startup.check_trainable_from(model)
