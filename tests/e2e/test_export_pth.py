"""scripts/export.py --to pth: a workdir -> the mmseg checkpoint the original MFuser loads
with strict=True, the inverse of the release converter.

Round trip: the "released" state dicts of tests/e2e/test_convert_mfuser*.py (tests/conftest.py's
fixtures, assembled from the PyTorch restatements of the original modules, never from the
JAX model) are converted in
and exported out. With the release as --reference every key, shape, dtype and value comes
back identical. Without it, the JAX model's parameters and statistics still do, and the
keys the converter drops are rebuilt, with these differences from the release, each
asserted below:

* identity_head.conv_seg.*: not written (the original's IdentityHead sets conv_seg = None;
  the test releases carry one, as mmseg versions without that line would);
* *.num_batches_tracked: the workdir's step (40) instead of the release's count (20000);
* EVA02's rotary tables: recomputed, equal to float32 rounding (not bit for bit);
* EVA02's random_text and SigLIP's backbone.adapter_proj{1,2,3}.*: zeros (never read).

The non-persistent buffers mmcv's saver writes (EVA02's text_encoder.attn_mask, SigLIP's
*.embeddings.position_ids) come back recomputed and identical, dtypes included, and an
export read back, imported and exported again is unchanged.

Strict loading: the key set and shapes equal those of the original modules' state dicts,
and parts of the file load into those modules with load_state_dict(strict=True).
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mfuser_jax.weights import WeightFileError  # noqa: E402
from mfuser_jax.run.release import (  # noqa: E402
    convert_mfuser_checkpoint,
    load_mfuser_checkpoint,
    mfuser_state_dict,
    read_mfuser_checkpoint,
    save_mfuser_checkpoint,
)
from mfuser_jax.run.export import export_pth  # noqa: E402
from mfuser_jax.towers.registry import get_vlm  # noqa: E402
from tests.refs.backbone import t_fpn1  # noqa: E402
from tests.refs.segmentor import NON_PERSISTENT  # noqa: E402
from tests.refs.text_enhancer import TorchContextDecoder  # noqa: E402
from tests.support import REPO, abstract_mfuser, save_pth  # noqa: E402

IDENTITY_HEAD = re.compile(r"identity_head\.")
COUNTER = re.compile(r".*\.num_batches_tracked$")


def _assert_identical(got, want):
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert (got[k].dtype, got[k].shape) == (v.dtype, v.shape), k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def _split(state_dict, *patterns):
    """(keys matching none of the patterns, {pattern: matching keys})."""
    rest = {k: v for k, v in state_dict.items() if not any(p.match(k) for p in patterns)}
    return rest, {p.pattern: sorted(k for k in state_dict if p.match(k)) for p in patterns}


def _without_release_keys(got, release, *rebuilt):
    """Checks what an export without --reference gives: the release's keys but
    identity_head's, the same shapes, the same values except `rebuilt`'s and the counters
    (the step); returns the rebuilt ones, {pattern: keys}."""
    assert sorted(got) == sorted(k for k in release if not IDENTITY_HEAD.match(k))
    assert all(got[k].shape == release[k].shape for k in got)
    same, found = _split(got, COUNTER, *rebuilt)
    _assert_identical(same, {k: release[k] for k in same})
    assert found[COUNTER.pattern] and all(
        got[k].dtype == np.int64 and got[k] == 40 for k in found[COUNTER.pattern])
    return found


def test_a_converted_release_exports_unchanged(clip_release, tmp_path):
    config, release = clip_release
    pth = str(tmp_path / "iter_40.pth")
    save_pth(pth, release, {"iter": 39})
    workdir = str(tmp_path / "w")
    convert_mfuser_checkpoint(config, pth, workdir)

    # the command line, without --config: the one the converter recorded in W/config.json
    out = str(tmp_path / "out" / "mfuser.pth")
    done = subprocess.run(
        [sys.executable, "scripts/export.py", "--workdir", workdir, "--to", "pth", "--out", out,
         "--reference", pth], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"config: {os.path.join(workdir, 'config.json')}" in done.stdout
    assert f"{len(release)} tensors of checkpoint step 40 written to" in done.stdout, done.stdout
    got, meta = read_mfuser_checkpoint(out)
    _assert_identical(got, release)
    assert meta["iter"] == 39 and list(meta["CLASSES"]) == list(config.model.class_names)
    assert len(meta["PALETTE"]) == 19 and meta["PALETTE"][0] == [128, 64, 128]  # road

    # mmcv under torch >= 2.6 reads with weights_only: plain meta, tensors only
    saved = torch.load(out, map_location="cpu", weights_only=True)
    tensors = saved["state_dict"]
    m = config.model
    fpn = m.clip.width + m.dinov2.embed_dim
    fpn1 = t_fpn1(fpn)
    cd = m.context_decoder
    parts = {"backbone.fpn1.": fpn1, "context_decoder.": TorchContextDecoder(
        cd.width, cd.heads, cd.layers, m.clip.output_dim, cd.dropout)}
    for prefix, module in parts.items():
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                if k.startswith(prefix)}, strict=True)
    assert int(fpn1[1].num_batches_tracked) == 20000

    # Without the release: the same model, the dropped keys rebuilt
    export_pth(config, workdir, str(tmp_path / "plain.pth"))
    got, _ = read_mfuser_checkpoint(str(tmp_path / "plain.pth"))
    found = _without_release_keys(got, release)
    assert found[COUNTER.pattern] == ["backbone.fpn1.1.num_batches_tracked"]


def test_eva02_and_siglip_releases_round_trip(eva02_release, siglip_release):
    rope = re.compile(r"backbone\.(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")
    random_text = re.compile(r"random_text$")
    adapter_proj = re.compile(r"backbone\.adapter_proj[123]\.")
    for (config, release), rebuilt in ((eva02_release, (rope, random_text)),
                                       (siglip_release, (adapter_proj,))):
        model = abstract_mfuser(config)
        load_mfuser_checkpoint(model, release)  # SigLIP: logit scalars NaN, not exported
        _assert_identical(mfuser_state_dict(model, step=40, reference=release), release)
        # a release saved by torch's state_dict() (no non-persistent buffers) also comes
        # back unchanged
        vlm = config.model.vlm
        saved_by_torch = {k: v for k, v in release.items() if k not in NON_PERSISTENT[vlm]}
        assert len(saved_by_torch) < len(release)
        _assert_identical(mfuser_state_dict(model, step=40, reference=saved_by_torch),
                          saved_by_torch)

        got = mfuser_state_dict(model, step=40)
        found = _without_release_keys(got, release, *rebuilt)
        layers = config.model[config.model.vlm].layers
        if config.model.vlm == "eva02":
            assert len(found[rope.pattern]) == 2 * (1 + layers)
            for k in found[rope.pattern]:
                np.testing.assert_allclose(got[k], release[k], rtol=0, atol=1e-6, err_msg=k)
            assert found[random_text.pattern] == ["random_text"]
            assert not got["random_text"].any()
        else:
            assert len(found[adapter_proj.pattern]) == 4 * layers + 2
            assert not any(got[k].any() for k in found[adapter_proj.pattern])
            assert "backbone.logit_scale" not in got


def test_a_reference_of_another_model_is_refused(eva02_release):
    config, release = eva02_release
    model = abstract_mfuser(config)
    load_mfuser_checkpoint(model, release)
    bad = dict(release)
    del bad["gamma"]
    bad["decode_head.extra.weight"] = np.zeros(3, np.float32)
    bad["random_text"] = bad["random_text"][:, :10]  # copied as it is, then refused
    with pytest.raises(WeightFileError) as e:
        mfuser_state_dict(model, step=40, reference=bad, source="other.pth")
    msg = str(e.value)
    assert "other.pth" in msg
    assert "missing keys (1):\n    decode_head.extra.weight" in msg
    assert "unexpected keys (1):\n    gamma" in msg
    assert "random_text: expected (19, 10) (PyTorch layout), got (19, 768)" in msg


def test_export_import_export_keeps_every_key_and_value(clip_release, eva02_release,
                                                         siglip_release, tmp_path):
    # For each variant: a workdir's model exported (mmcv's key set, the buffers written as
    # mmcv saves them), read back from the file, imported and exported again gives the same
    # keys, dtypes, shapes and values.
    buffers = {"clip": {}, "eva02": {"text_encoder.attn_mask": np.float32},
               "siglip": {"backbone.embeddings.position_ids": np.int64,
                          "text_encoder.embeddings.position_ids": np.int64}}
    for config, release in (clip_release, eva02_release, siglip_release):
        vlm = config.model.vlm
        model = abstract_mfuser(config)
        load_mfuser_checkpoint(model, release)
        first = mfuser_state_dict(model, step=40)
        assert sorted(first) == sorted(k for k in release if not IDENTITY_HEAD.match(k)), vlm
        path = str(tmp_path / f"{vlm}.pth")
        save_mfuser_checkpoint(path, first, {"iter": 39})
        saved, _ = read_mfuser_checkpoint(path)
        _assert_identical(saved, first)
        for key, dtype in buffers[vlm].items():
            assert saved[key].dtype == dtype, key
            np.testing.assert_array_equal(saved[key], release[key], err_msg=key)
        # import into the same model, zeroed first: every value comes from the file
        nnx.update(model, jax.tree.map(jnp.zeros_like,
                                       nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))
        counts = load_mfuser_checkpoint(model, saved)
        assert counts["recomputed"] == len(get_vlm(vlm).release.recomputed(model)), vlm
        _assert_identical(mfuser_state_dict(model, step=40), first)
