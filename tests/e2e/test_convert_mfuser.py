"""Released MFuser (CLIP) checkpoints: strict loading, clear reports, the CLI round trip.

The reference state dict (fixture ``clip_release``, tests/refs/segmentor.py) is assembled
from the PyTorch restatements of the original modules (models/backbones/clip/models.py,
adapter_module.py, the tqdm head), with the prefixes MFuser_CLIP gives them, plus the parts
only the segmentor and the fused backbone own (adapter_proj1/2/3, fpn1/fpn2 with their
BatchNorm, contexts, gamma) and identity_head.conv_seg, each saved as mmcv's save_checkpoint
saves it (every buffer, persistent or not). Its keys are never derived from the JAX model.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mfuser_jax.run import restore  # noqa: E402
from mfuser_jax.run.release import (  # noqa: E402
    checkpoint_step,
    convert_mfuser_checkpoint,
    load_mfuser_checkpoint,
    read_mfuser_checkpoint,
)
from mfuser_jax.weights.state_dict import StateDictMismatchError  # noqa: E402
from mfuser_jax.model.factory import abstract_paths  # noqa: E402
from tests.support import (  # noqa: E402
    REPO,
    abstract_mfuser,
    concrete,
    random_images,
    release_config,
    save_pth,
)


def test_release_loads_strictly_and_predicts(clip_release):
    config, release = clip_release
    model = abstract_mfuser(config)
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
    concrete(model).eval()
    scores = nnx.jit(lambda m, x: m.predict(x))(model, random_images())
    assert scores.shape == (1, 64, 64, 19) and np.all(np.isfinite(np.asarray(scores)))


def test_mismatches_are_reported_together(clip_release):
    config, release = clip_release
    bad = dict(release)
    del bad["backbone.adapter.1.A_log"]
    bad["decode_head.extra.weight"] = np.zeros(3, np.float32)
    bad["backbone.fpn2.0.weight"] = bad["backbone.fpn2.0.weight"][:, :-1]
    with pytest.raises(StateDictMismatchError) as e:
        load_mfuser_checkpoint(abstract_mfuser(config), bad, source="bad.pth")
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


def test_convert_then_restore_gives_the_same_model(clip_release, tmp_path):
    config, release = clip_release
    pth = str(tmp_path / "iter_40.pth")
    save_pth(pth, release, {"iter": 39, "epoch": 1, "CLASSES": ["road"]})
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
    cfg = release_config()
    assert cfg.model.pretrained == "" and info["pretrained"] == os.path.join(out, "pretrained")
    restored, step = restore.restore_model(cfg, out)
    assert step == 40
    want = abstract_mfuser(config)
    load_mfuser_checkpoint(want, release)
    got_flat = dict(nnx.to_flat_state(nnx.state(restored, nnx.Any(nnx.Param, nnx.BatchStat))))
    want_flat = dict(nnx.to_flat_state(nnx.state(want, nnx.Any(nnx.Param, nnx.BatchStat))))
    assert set(got_flat) == set(want_flat)
    for path, var in want_flat.items():
        np.testing.assert_array_equal(np.asarray(got_flat[path].get_value()),
                                      np.asarray(var.get_value()), err_msg=str(path))

    # The training loop sees a finished run: the checkpoint step is the run's length.
    assert step >= int(cfg.total_steps)


def test_the_converter_computes_nothing_the_release_brings(clip_release, tmp_path,
                                                          monkeypatch):
    # Built from shapes: when the strict load starts, every parameter and BatchNorm
    # statistic is still abstract (none was drawn at random to be overwritten) and all
    # the rest (RNG state, the tokenized class names) is computed.
    import mfuser_jax.run.release as convert

    config, release = clip_release
    pth = str(tmp_path / "iter_40.pth")
    save_pth(pth, release, {"iter": 39})
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


def test_the_converter_refuses_a_value_neither_loaded_nor_computed(clip_release, tmp_path,
                                                                   monkeypatch):
    # A parameter load_torch_state_dict does not reach (here: in a tuple) is not in the
    # strict load's accounts: it is named, not saved at random.
    import mfuser_jax.model.factory as factory

    config, release = clip_release
    pth = str(tmp_path / "iter_40.pth")
    save_pth(pth, release, {"iter": 39})
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
