"""Converting encoder weights (HF-named files here) and loading them into MFuser."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from mfuser_jax.weights import WeightFileError, load_torch_state_dict
from mfuser_jax.towers.dinov2.convert import load_dinov2_state_dict
from mfuser_jax.model.pretrained import convert_encoders
from mfuser_jax.towers.dinov2.model import DinoVisionTransformer
from mfuser_jax.model.factory import abstract_paths
from mfuser_jax.model.mfuser import MFuser
from tests.refs.hf import random_dinov2_and_clip, save_safetensors
from tests.support import REPO, tiny_config


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """Random HF DINOv2 and CLIP at patch 14 / 56 px, so conversion must resize to 16 px."""
    cfg = tiny_config()  # width 32, 4 layers, 64 px, patch 16
    c, d = cfg.clip, cfg.dinov2
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    dino, clip = random_dinov2_and_clip(c, d, image_size=56)
    paths = {"dinov2": save_safetensors(dino, str(folder / "dinov2.safetensors")),
             "clip": save_safetensors(clip, str(folder / "clip.safetensors"))}
    out = str(folder / "converted")
    counts = convert_encoders(cfg, out, vfm_path=paths["dinov2"], vlm_path=paths["clip"])
    return paths, out, counts


def test_converted_encoders_load_into_mfuser(weight_files):
    paths, out, counts = weight_files
    assert set(counts) == {"dinov2", "clip_visual", "clip_text"}
    cfg = tiny_config()
    model = MFuser(cfg, rngs=nnx.Rngs(1))
    adapter_before = np.asarray(model.backbone.adapter[0].in_proj.kernel[...])
    model.load_pretrained(out)

    # The fused backbone's DINOv2 is the converted (14 -> 16 px resized) HF model.
    reference = DinoVisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=4,
                                      num_heads=2, rngs=nnx.Rngs(2))
    load_torch_state_dict(reference, load_dinov2_state_dict(paths["dinov2"], 16, 64))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
    np.testing.assert_allclose(model.backbone.dinov2(x), reference(x), rtol=1e-5, atol=1e-5)
    # The CLIP text projection arrived; trainable adapters were left alone.
    assert not np.allclose(model.text_encoder.text_projection[...], 0)
    np.testing.assert_array_equal(model.backbone.adapter[0].in_proj.kernel[...], adapter_before)


def test_pretrained_filter_selects_what_the_converted_encoders_fill(weight_files):
    # create_model does not compute what pretrained_filter selects when it loads encoders
    _, out, _ = weight_files
    model = nnx.eval_shape(lambda: MFuser(tiny_config(), rngs=nnx.Rngs(0)))  # every value abstract
    rest = nnx.state(model, nnx.Not(model.pretrained_filter))
    model.load_pretrained(out)
    assert set(abstract_paths(model)) == {
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(rest)}


@pytest.mark.slow  # compiles the model's initialiser
def test_create_model_leaves_the_encoders_to_load_pretrained(weight_files):
    from mfuser_jax.model import factory

    _, out, _ = weight_files
    config = ml_collections.ConfigDict(dict(seed=0, model=tiny_config()))
    config.model.pretrained = out
    model = factory.create_model(config)
    assert abstract_paths(model)  # the encoders are left to load_pretrained
    factory.load_pretrained(model, out)
    assert abstract_paths(model) == []
    loaded = MFuser(tiny_config(), rngs=nnx.Rngs(1))
    loaded.load_pretrained(out)
    np.testing.assert_array_equal(model.backbone.dinov2.cls_token[...],
                                  loaded.backbone.dinov2.cls_token[...])
    np.testing.assert_array_equal(model.text_encoder.text_projection[...],
                                  loaded.text_encoder.text_projection[...])
    assert np.all(np.isfinite(np.asarray(model.backbone.adapter[0].in_proj.kernel[...])))


def _concrete_leaves(module):
    """The values of ``module`` that are computed arrays (not tracers, not abstract)."""
    return [x for x in jax.tree.leaves(nnx.state(module))
            if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)]


def test_the_encoder_converter_computes_nothing_it_overwrites_or_drops(
        weight_files, tmp_path, monkeypatch):
    # Every backbone the converter builds is built inside a trace (nnx.eval_shape, or the
    # jit of compute_values): its random initial values, the adapters' and FPN's that are
    # never saved included, are never computed. The tower values come from the loads alone.
    import mfuser_jax.model.pretrained as pretrained

    paths, _, counts = weight_files
    built, build = [], pretrained.build_backbone
    monkeypatch.setattr(pretrained, "build_backbone",
                        lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    assert convert_encoders(tiny_config(), str(tmp_path / "o"), vfm_path=paths["dinov2"],
                            vlm_path=paths["clip"]) == counts
    assert built and all(not _concrete_leaves(b) for b in built)
    assert jax.tree.leaves(nnx.state(built[0].adapter)) and jax.tree.leaves(
        nnx.state(built[0].fpn1))  # what is checked is there


def _text_tower_with(monkeypatch, **attrs):
    """Make the converter's text tower hold ``attrs`` too (each made by a function of the
    tower, inside its construction); returns the list the towers converted are put in."""
    import mfuser_jax.model.pretrained as pretrained

    build = pretrained.build_text_encoder

    def build_text_encoder(*a, **k):
        tower = build(*a, **k)
        for name, make in attrs.items():
            setattr(tower, name, make(tower))
        return tower

    saved, tree = [], pretrained.encoder_tree
    monkeypatch.setattr(pretrained, "build_text_encoder", build_text_encoder)
    monkeypatch.setattr(pretrained, "encoder_tree",
                        lambda **k: saved.append(k["text_encoder"]) or tree(**k))
    return saved


def test_the_encoder_converter_computes_the_buffers_the_towers_compute(
        weight_files, tmp_path, monkeypatch):
    # A buffer a tower's constructor computes (e.g. position ids) is not in the weight files:
    # it is computed, not left abstract.
    paths, _, _ = weight_files
    saved = _text_tower_with(monkeypatch, position_ids=lambda t: nnx.Variable(
        jnp.arange(t.positional_embedding.shape[0]) * 2))
    convert_encoders(tiny_config(), str(tmp_path / "o"), vfm_path=paths["dinov2"],
                     vlm_path=paths["clip"])
    np.testing.assert_array_equal(saved[0].position_ids[...], np.arange(10) * 2)


def test_the_encoder_converter_refuses_a_parameter_no_load_fills(
        weight_files, tmp_path, monkeypatch):
    # A parameter load_torch_state_dict does not reach (here: in a tuple) would be neither
    # loaded nor computed: refused by name, nothing written.
    paths, _, _ = weight_files
    _text_tower_with(monkeypatch, hidden=lambda t: nnx.data((nnx.Param(jnp.ones(3)),)))
    with pytest.raises(RuntimeError, match=r"text tower: 1 values .*\['hidden'\]\[0\]"):
        convert_encoders(tiny_config(), str(tmp_path / "o"), vfm_path=paths["dinov2"],
                         vlm_path=paths["clip"])
    assert not os.path.exists(tmp_path / "o")


def test_mismatched_checkpoint_is_one_clear_error(weight_files, tmp_path):
    _, out, _ = weight_files
    cfg = tiny_config()
    cfg.image_size = 128  # the converted position tables are for 64 px
    model = MFuser(cfg, rngs=nnx.Rngs(1))
    with pytest.raises(WeightFileError, match="mis-shaped.*positional_embedding"):
        model.load_pretrained(out)
    with pytest.raises(WeightFileError, match="convert_weights.py"):
        model.load_pretrained(str(tmp_path / "absent"))


def _run_convert(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "convert_weights.py"),
         "--config", os.path.join(REPO, "configs", "demo.py"), *args],
        capture_output=True, text=True, cwd=REPO, timeout=300)


def test_convert_weights_cli_errors(weight_files, tmp_path):
    paths, _, _ = weight_files
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00 definitely not weights")
    result = _run_convert("--dinov2", str(garbage), "--clip", paths["clip"], "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "garbage.pth" in result.stderr and "Traceback" not in result.stderr
    # A CLIP file where DINOv2 is expected names the file and what was expected.
    result = _run_convert("--dinov2", paths["clip"], "--clip", paths["clip"], "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "clip.safetensors" in result.stderr and "DINOv2" in result.stderr
