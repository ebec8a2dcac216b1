"""Released MFuser (CLIP) checkpoints: strict loading, clear reports, the CLI round trip.

The reference state dict is assembled from the PyTorch restatements of the original modules
the other test files define (models/backbones/clip/models.py, adapter_module.py, the tqdm
head), with the prefixes MFuser_CLIP gives them, plus the parts only the segmentor and the
fused backbone own (adapter_proj1/2/3, fpn1/fpn2 with their BatchNorm, contexts, gamma) and
identity_head.conv_seg, each saved as mmcv's save_checkpoint saves it (every buffer,
persistent or not: ``mmcv_state_dict``). Its keys are never derived from the JAX model.
"""

import os
import subprocess
import sys
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn as tnn  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_clip import TTransformer, TVisual, _causal  # noqa: E402
from test_decoder import THead, _torch_cfg  # noqa: E402
from test_mvfuser import TorchMVFuser  # noqa: E402
from test_text_enhancer import TorchContextDecoder  # noqa: E402

from configs import demo  # noqa: E402
from mfuser_jax import startup
from mfuser_jax.run import train  # noqa: E402
from mfuser_jax.towers.dinov2.convert import hf_to_official  # noqa: E402
from mfuser_jax.run.release import (  # noqa: E402
    checkpoint_step,
    convert_mfuser_checkpoint,
    load_mfuser_checkpoint,
    read_mfuser_checkpoint,
)
from mfuser_jax.weights.state_dict import StateDictMismatchError  # noqa: E402
from mfuser_jax.model.factory import abstract_paths  # noqa: E402
from mfuser_jax.model.mfuser import MFuser  # noqa: E402
from mfuser_jax.towers.clip.tokenizer import tokenize  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment_config():
    c = demo.get_config()
    c.model.mvfuser.scan_backend = "reference"
    c.total_steps = 40
    return c


class TText(tnn.Module):
    """CLIPTextContextEncoder's parameters (models.py): names and shapes."""

    def __init__(self, ctx, vocab, w, layers, h, embed):
        super().__init__()
        self.transformer = TTransformer(w, layers, h, _causal(ctx))
        self.token_embedding = tnn.Embedding(vocab, w)
        self.positional_embedding = tnn.Parameter(torch.randn(ctx, w) * 0.01)
        self.ln_final = tnn.LayerNorm(w)
        self.text_projection = tnn.Parameter(torch.randn(w, embed) * w ** -0.5)


def mmcv_state_dict(module, prefix=""):
    """What mmcv 1.5.1's save_checkpoint writes for ``module`` (runner/checkpoint.py
    get_state_dict / _save_to_state_dict): every parameter and every buffer that is not
    None, ``persistent=False`` ones included, recursively; torch's state_dict() leaves the
    non-persistent buffers out."""
    out = {}
    for name, value in [*module._parameters.items(), *module._buffers.items()]:
        if value is not None:
            out[prefix + name] = value.detach().numpy().copy()
    for name, child in module._modules.items():
        if child is not None:
            out.update(mmcv_state_dict(child, f"{prefix}{name}."))
    return out


def torch_state_dict(module, prefix=""):
    """torch's own ``module.state_dict()`` (persistent buffers only), as numpy."""
    return {prefix + k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# The buffers each original registers with persistent=False, which mmcv's saver writes into
# every release while torch's state_dict() leaves them out; read off the original code
# (devinxzhang/MFuser: every register_buffer of the modules each segmentor builds).
# CLIP: models/backbones/clip/models.py keeps its text mask as a plain attribute (not
# saved); EVA02: eva_clip/transformer.py TextTransformer's causal mask (its rotary tables,
# rope.py, are persistent); SigLIP: siglip/modeling_siglip.py SiglipVisionEmbeddings and
# SiglipTextEmbeddings. DINOv2 (dino_v2.py, dino_layers/), the MVFusers (adapter_module.py
# with mamba_ssm's RMSNormGated), the FPN (BatchNorm: persistent statistics), the
# ContextDecoder and the tqdm head with its pixel decoder register none.
NON_PERSISTENT = {
    "clip": set(),
    "eva02": {"text_encoder.attn_mask"},
    "siglip": {"backbone.embeddings.position_ids", "text_encoder.embeddings.position_ids"},
}


def _prefixed(saver, prefix, module):
    return saver(module, prefix)


def _shared_parts(m, vlm_width, text_dim, fpn_seed=0, saver=mmcv_state_dict):
    """What every variant's checkpoint has besides the VLM towers: DINOv2, MVFusers, FPN,
    ContextDecoder, tqdm head, contexts, gamma, identity_head.conv_seg; ``saver`` writes
    each module's keys (mmcv's, as the releases are saved, or torch's state_dict)."""
    c, d, mv, cd, dec = m[m.vlm], m.dinov2, m.mvfuser, m.context_decoder, m.decoder
    layers, dd = c.layers, d.embed_dim
    sd = {}
    hf = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=dd, num_hidden_layers=layers, num_attention_heads=d.num_heads,
        intermediate_size=int(d.mlp_ratio * dd), image_size=m.image_size,
        patch_size=m.patch_size, layerscale_value=d.init_values))
    sd.update({f"backbone.dinov2.{k}": np.asarray(v)
               for k, v in hf_to_official(saver(hf)).items()})
    sd.update(_prefixed(saver, "backbone.adapter.", tnn.Sequential(
        *[TorchMVFuser(vlm_width, mv.d_state, mv.d_conv, mv.expand) for _ in range(layers)])))
    fpn = vlm_width + dd
    fpn1 = tnn.Sequential(tnn.ConvTranspose2d(fpn, fpn, 2, 2), tnn.BatchNorm2d(fpn), tnn.GELU(),
                          tnn.ConvTranspose2d(fpn, fpn, 2, 2))
    with torch.no_grad():  # trained statistics, not the 0/1 defaults
        fpn1[1].running_mean.normal_(0.0, 0.5)
        fpn1[1].running_var.uniform_(0.5, 2.0)
        fpn1[1].weight.uniform_(0.5, 1.5)
        fpn1[1].num_batches_tracked.fill_(20000)
    sd.update(_prefixed(saver, "backbone.fpn1.", fpn1))
    sd.update(_prefixed(saver, "backbone.fpn2.",
                        tnn.Sequential(tnn.ConvTranspose2d(fpn, fpn, 2, 2))))
    sd.update(_prefixed(saver, "context_decoder.", TorchContextDecoder(
        cd.width, cd.heads, cd.layers, text_dim, cd.dropout)))
    head_cfg = dict(
        in_channels=(fpn,) * 4, feat_channels=dec.feat_channels,
        out_channels=dec.feat_channels, num_classes=m.num_classes, num_queries=m.num_classes,
        text_dim=text_dim, num_groups=min(32, dec.feat_channels),
        pixel_decoder_layers=dec.pixel_decoder_layers, pixel_decoder_heads=dec.num_heads,
        num_points=dec.deform_points, pixel_decoder_ffn_channels=dec.pixel_ffn,
        num_decoder_layers=dec.decoder_layers, decoder_heads=dec.num_heads,
        decoder_ffn_channels=dec.ffn)
    sd.update(_prefixed(saver, "decode_head.", THead(_torch_cfg(head_cfg))))
    rng = np.random.default_rng(fpn_seed)
    sd["contexts"] = rng.normal(size=(1, c.n_ctx, c.text_width)).astype(np.float32)
    sd["gamma"] = rng.normal(size=(text_dim,)).astype(np.float32)
    sd["identity_head.conv_seg.weight"] = rng.normal(size=(1, 1, 1, 1)).astype(np.float32)
    sd["identity_head.conv_seg.bias"] = np.zeros((1,), np.float32)
    return sd


def original_state_dict(m, seed=0, saver=mmcv_state_dict):
    """The state dict MFuser_CLIP(config m) saves, at m's (tiny) sizes, random values."""
    torch.manual_seed(seed)
    c, d = m.clip, m.dinov2
    w, dd, layers = c.width, d.embed_dim, c.layers
    sd = _shared_parts(m, w, c.output_dim, seed, saver)
    # backbone: the CLIP image tower at the top level (CLIPVisionTransformer) and the
    # three projections only this variant has
    sd.update(_prefixed(saver, "backbone.", TVisual(m.image_size, m.patch_size, w, layers,
                                                    c.heads, c.output_dim)))
    sd.update(_prefixed(saver, "backbone.adapter_proj1.",
                        tnn.Sequential(*[tnn.Linear(dd, w) for _ in range(layers)])))
    sd.update(_prefixed(saver, "backbone.adapter_proj2.",
                        tnn.Sequential(*[tnn.Linear(w, dd) for _ in range(layers)])))
    sd.update(_prefixed(saver, "backbone.adapter_proj3.", tnn.Linear(dd, w)))
    sd.update(_prefixed(saver, "text_encoder.", TText(c.token_length + c.n_ctx, c.vocab_size,
                                                      c.text_width, c.text_layers,
                                                      c.text_heads, c.output_dim)))
    return sd


@pytest.fixture(scope="module")
def config():
    return experiment_config()


@pytest.fixture(scope="module")
def release(config):
    return original_state_dict(config.model)


def _abstract_model(config):
    return nnx.eval_shape(lambda: MFuser(config.model, rngs=nnx.Rngs(0)))


def _concrete(model):
    """Fill every abstract leaf: zeros for arrays (a parameter that is never loaded stays
    zero, which the comparisons with the random release catch), fixed keys for the dropout
    RNG state, and the tokenized class names (a plain array attribute)."""
    def fill(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), x.shape) if x.shape else jax.random.key(0)
        return jnp.zeros(x.shape, x.dtype)
    nnx.update(model, jax.tree.map(fill, nnx.state(model)))
    model.texts = np.asarray(tokenize(list(model.class_names), context_length=model.token_length))
    return model


def _fast_create_model(config):
    """Stands in for startup.create_model where restore_model builds the model: its jitted
    random init costs ~35 s here on 2 cores, and every value it would produce is overwritten
    (trainable part from the checkpoint, frozen part from W/pretrained)."""
    return _concrete(nnx.eval_shape(lambda: MFuser(config.model, rngs=nnx.Rngs(0))))


def _images(b=1, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, size, size, 3)).astype(np.uint8)


def test_release_loads_strictly_and_predicts(config, release):
    model = _abstract_model(config)
    counts = load_mfuser_checkpoint(model, release)
    assert counts == {"loaded": len(release) - 3, "dropped": 2, "recomputed": 0}
    # Nothing left unconverted: every parameter and statistic is a concrete array now.
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
        assert isinstance(var.get_value(), jax.Array), path
    bn = model.backbone.fpn1[1]
    np.testing.assert_array_equal(bn.mean[...], release["backbone.fpn1.1.running_mean"])
    np.testing.assert_array_equal(bn.var[...], release["backbone.fpn1.1.running_var"])
    np.testing.assert_array_equal(bn.scale[...], release["backbone.fpn1.1.weight"])
    np.testing.assert_array_equal(model.gamma[...], release["gamma"])
    np.testing.assert_array_equal(model.backbone.adapter_proj3.kernel[...],
                                  release["backbone.adapter_proj3.weight"].T)
    np.testing.assert_array_equal(model.backbone.dinov2.cls_token[...],
                                  release["backbone.dinov2.cls_token"])
    _concrete(model).eval()
    scores = nnx.jit(lambda m, x: m.predict(x))(model, _images())
    assert scores.shape == (1, 64, 64, 19) and np.all(np.isfinite(np.asarray(scores)))


def test_mismatches_are_reported_together(config, release):
    bad = dict(release)
    del bad["backbone.adapter.1.A_log"]
    bad["decode_head.extra.weight"] = np.zeros(3, np.float32)
    bad["backbone.fpn2.0.weight"] = bad["backbone.fpn2.0.weight"][:, :-1]
    with pytest.raises(StateDictMismatchError) as e:
        load_mfuser_checkpoint(_abstract_model(config), bad, source="bad.pth")
    msg = str(e.value)
    assert "bad.pth" in msg
    assert e.value.missing == ["backbone.adapter.1.A_log"]
    assert e.value.unexpected == ["decode_head.extra.weight"]
    assert [k for k, _, _ in e.value.mismatched] == ["backbone.fpn2.0.weight"]
    # identity_head is dropped by name only: nothing else slips through silently.
    assert not any("identity_head" in k for k in e.value.unexpected)


def test_mmcv_meta_iter_is_the_last_index():
    assert checkpoint_step({"iter": 19999, "epoch": 3}, 20000) == 20000
    assert checkpoint_step({}, 20000) == 20000
    assert checkpoint_step({"iter": 4}, 20000) == 5


def _save_pth(path, state_dict, meta):
    # np.array, not np.ascontiguousarray: the latter turns the 0-d MVFuser scales into (1,)
    torch.save({"meta": meta, "state_dict": OrderedDict(
        (k, torch.from_numpy(np.array(v))) for k, v in state_dict.items())}, path)


def test_convert_then_restore_gives_the_same_model(config, release, tmp_path, monkeypatch):
    monkeypatch.setattr(startup, "create_model", _fast_create_model)
    pth = str(tmp_path / "iter_40.pth")
    _save_pth(pth, release, {"iter": 39, "epoch": 1, "CLASSES": ["road"]})
    state_dict, meta = read_mfuser_checkpoint(pth)
    assert meta["iter"] == 39 and set(state_dict) == set(release)

    out = str(tmp_path / "w")
    info = convert_mfuser_checkpoint(config, pth, out)
    assert info["step"] == 40 and info["dropped"] == 2
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["40"]
    import orbax.checkpoint as ocp  # the model format: no optimizer state was built or written
    saved = ocp.PyTreeCheckpointer().metadata(os.path.join(out, "checkpoints", "40", "state"))
    assert set(saved.item_metadata.tree) == {"params", "batch_stats"}
    assert os.path.isfile(os.path.join(out, "config.json"))
    assert config.model.pretrained == ""  # the caller's config is left alone

    # What scripts/eval.py and scripts/predict.py do: the frozen towers come from
    # W/pretrained even though the user's config names none.
    cfg = experiment_config()
    assert cfg.model.pretrained == "" and info["pretrained"] == os.path.join(out, "pretrained")
    restored, step = train.restore_model(cfg, out)
    assert step == 40
    want = _abstract_model(config)
    load_mfuser_checkpoint(want, release)
    got_flat = dict(nnx.to_flat_state(nnx.state(restored, nnx.Any(nnx.Param, nnx.BatchStat))))
    want_flat = dict(nnx.to_flat_state(nnx.state(want, nnx.Any(nnx.Param, nnx.BatchStat))))
    assert set(got_flat) == set(want_flat)
    for path, var in want_flat.items():
        np.testing.assert_array_equal(np.asarray(got_flat[path].get_value()),
                                      np.asarray(var.get_value()), err_msg=str(path))

    # The training loop sees a finished run: the checkpoint step is the run's length.
    assert step >= int(cfg.total_steps)


def test_the_converter_computes_nothing_the_release_brings(config, release, tmp_path,
                                                          monkeypatch):
    # Built from shapes: when the strict load starts, every parameter and BatchNorm
    # statistic is still abstract (none was drawn at random to be overwritten) and all
    # the rest (RNG state, the tokenized class names) is computed.
    import mfuser_jax.run.release as convert

    pth = str(tmp_path / "iter_40.pth")
    _save_pth(pth, release, {"iter": 39})
    seen, load = {}, convert.load_mfuser_checkpoint

    def spy(model, *args, **kwargs):
        loaded = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
        seen["loaded"] = {jax.tree_util.keystr(p)
                          for p, _ in jax.tree_util.tree_leaves_with_path(loaded)}
        seen["abstract"] = set(abstract_paths(model))
        return load(model, *args, **kwargs)

    monkeypatch.setattr(convert, "load_mfuser_checkpoint", spy)
    info = convert_mfuser_checkpoint(config, pth, str(tmp_path / "w"))
    assert len(seen["loaded"]) > 100 and seen["abstract"] == seen["loaded"]
    assert info["loaded"] == 362


def test_the_converter_refuses_a_value_neither_loaded_nor_computed(config, release, tmp_path,
                                                                   monkeypatch):
    # A parameter load_torch_state_dict does not reach (here: in a tuple) is not in the
    # strict load's accounts: it is named, not saved at random.
    import mfuser_jax.model.factory as factory

    pth = str(tmp_path / "iter_40.pth")
    _save_pth(pth, release, {"iter": 39})
    build = factory.build_model

    def build_model(*args, **kwargs):
        model = build(*args, **kwargs)
        model.hidden = nnx.data((nnx.Param(jnp.ones(3)),))
        return model

    monkeypatch.setattr(factory, "build_model", build_model)
    out = str(tmp_path / "w")
    with pytest.raises(RuntimeError, match=r"MFuser from .*: 1 values .*\['hidden'\]\[0\]"):
        convert_mfuser_checkpoint(config, pth, out)
    assert not os.path.exists(out)


def test_cli_reports_errors_without_traceback(tmp_path):
    pth = tmp_path / "not_mfuser.pth"
    torch.save({"state_dict": {"blocks.0.weight": torch.zeros(2)}, "meta": {"iter": 9}}, pth)
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "convert_weights.py"),
         "--config", os.path.join(REPO, "configs", "demo.py"), "--mfuser", str(pth),
         "--out", str(tmp_path / "w")],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not an MFuser segmentor checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "[1/5] reading" in proc.stdout
