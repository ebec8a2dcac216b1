"""The typed model config (mfuser_jax/model/config.py): presets, the ConfigDict edge,
W/config.json, unknown keys, and the workdir check derived from the fields' metadata."""

import copy
import dataclasses
import json

import numpy as np
import pytest

from configs import base
from mfuser_jax.towers import registry
from mfuser_jax.errors import UserError
from mfuser_jax.model import config as C
from mfuser_jax.model.config import ModelConfig
from mfuser_jax.workdir import (architecture, check_workdir_model, config_from_workdir,
                                write_config)

CITYSCAPES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
              "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
              "truck", "bus", "train", "motorcycle", "bicycle")

# configs.base.plain_model_config("large", "clip") as it was before the typed config (its
# nested Fields as plain dicts), field by field and in its order; the typed config adds
# `vfm` (after `vlm`) and `palette` (last).
OLD_CLIP_LARGE = {
    "name": "mfuser", "vlm": "clip", "num_classes": 19, "class_names": CITYSCAPES,
    "patch_size": 16, "image_size": 512, "dtype": "float32", "remat": True,
    "scan_layers": True, "attn_implementation": "xla", "pretrained": "pretrained/mfuser_clip_l",
    "dinov2": {"embed_dim": 1024, "num_heads": 16, "mlp_ratio": 4.0, "init_values": 1e-05},
    "clip": {"width": 1024, "layers": 24, "heads": 16, "output_dim": 768,
             "drop_path_rate": 0.1, "text_width": 768, "text_heads": 12, "text_layers": 12,
             "text_activation": "quick_gelu", "vocab_size": 49408, "token_length": 5,
             "n_ctx": 5},
    "out_indices": (7, 11, 15, 23),
    "mvfuser": {"d_state": 16, "d_conv": 3, "expand": 1, "scan_backend": "auto"},
    "context_decoder": {"width": 256, "heads": 4, "layers": 1, "dropout": 0.1},
    "decoder": {"feat_channels": 256, "num_heads": 8, "pixel_decoder_layers": 6,
                "decoder_layers": 9, "ffn": 2048, "pixel_ffn": 2048, "deform_points": 4},
    "loss": {"cls": 2.0, "mask": 5.0, "dice": 5.0, "score_map": 1.0, "no_object_weight": 0.1,
             "num_points": 12544, "oversample": 3.0, "importance": 0.75, "temperature": 0.07,
             "cls_norm_images": 2},
}
# ... and plain_model_config("tiny", "clip")
OLD_CLIP_TINY = {
    "name": "mfuser", "vlm": "clip", "num_classes": 19, "class_names": CITYSCAPES,
    "patch_size": 16, "image_size": 64, "dtype": "float32", "remat": False,
    "scan_layers": True, "attn_implementation": "xla", "pretrained": "",
    "dinov2": {"embed_dim": 32, "num_heads": 2, "mlp_ratio": 4.0, "init_values": 1e-05},
    "clip": {"width": 32, "layers": 4, "heads": 2, "output_dim": 32, "drop_path_rate": 0.1,
             "text_width": 32, "text_heads": 2, "text_layers": 2,
             "text_activation": "quick_gelu", "vocab_size": 49408, "token_length": 5,
             "n_ctx": 5},
    "out_indices": (0, 1, 2, 3),
    "mvfuser": {"d_state": 16, "d_conv": 3, "expand": 1, "scan_backend": "auto"},
    "context_decoder": {"width": 32, "heads": 2, "layers": 1, "dropout": 0.1},
    "decoder": {"feat_channels": 32, "num_heads": 2, "pixel_decoder_layers": 1,
                "decoder_layers": 2, "ffn": 64, "pixel_ffn": 64, "deform_points": 4},
    "loss": {"cls": 2.0, "mask": 5.0, "dice": 5.0, "score_map": 1.0, "no_object_weight": 0.1,
             "num_points": 256, "oversample": 3.0, "importance": 0.75, "temperature": 0.07,
             "cls_norm_images": 2},
}


def _with_new_fields(old):
    items = list(old.items())
    items.insert(2, ("vfm", "dinov2"))
    return {**dict(items), "palette": ()}


def _assert_same(got, want):
    """Equal, in the same key order at every level, with the same types (tuples kept)."""
    assert list(got) == list(want)
    for key, value in want.items():
        if isinstance(value, dict):
            _assert_same(got[key], value)
        else:
            assert got[key] == value and type(got[key]) is type(value), key


@pytest.mark.parametrize("size, old", [("large", OLD_CLIP_LARGE), ("tiny", OLD_CLIP_TINY)])
def test_presets_give_the_old_config_values(size, old):
    want = _with_new_fields(old)
    _assert_same(ModelConfig.preset(size, vlm="clip").to_dict(), want)
    _assert_same(base.plain_model_config(size, "clip"), want)
    cd = base.mfuser_model_config(size, "clip")
    assert cd.to_dict() == want and cd.clip.width == want["clip"]["width"]
    assert cd.dinov2.embed_dim == want["dinov2"]["embed_dim"]


def test_every_vlm_preset_has_the_sections_of_its_spec():
    for vlm in registry.vlm_names():
        spec = registry.get_vlm(vlm)
        for size in C.SIZES:
            cfg = ModelConfig.preset(size, vlm)
            section = spec.config.section(size == "large")
            assert dict(cfg[vlm]) == section and list(cfg[vlm]) == list(section)
            assert cfg.patch_size == spec.config.patch_size and cfg.vfm == "dinov2"
            assert list(cfg.towers) == ["dinov2", vlm]
    with pytest.raises(UserError, match="choose 'large' or 'tiny'"):
        ModelConfig.preset("huge")
    with pytest.raises(UserError, match="vfm='dinov4'"):
        ModelConfig.preset("tiny", vfm="dinov4")
    with pytest.raises(base.ConfigError, match="vlm='llava'"):
        base.mfuser_model_config("tiny", "llava")


def test_the_config_is_frozen_hashable_and_read_like_a_configdict():
    cfg = ModelConfig.preset("tiny", "siglip")
    assert cfg.siglip is cfg["siglip"] is cfg.towers["siglip"] and cfg.siglip.width == 32
    assert cfg.dinov2.num_heads == 2 and cfg[cfg.vfm] is cfg.dinov2
    assert cfg["image_size"] == 64 and cfg.get("palette") == () and cfg.get("nope", 3) == 3
    assert "siglip" in cfg and "clip" not in cfg and cfg.decoder["ffn"] == 64
    with pytest.raises(AttributeError, match="no field 'clip'"):
        cfg.clip
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.image_size = 128
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.decoder.ffn = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.siglip.width = 1
    # equal configs hash alike (static arguments of jitted code, nnx graph definitions)
    again = ModelConfig.from_mapping(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and hash(again) == hash(cfg) and again is not cfg
    wider = cfg.replace(decoder=cfg.decoder.replace(ffn=128))
    assert wider != cfg and wider.decoder.ffn == 128 and cfg.decoder.ffn == 64


def test_from_mapping_names_unknown_and_missing_keys():
    good = ModelConfig.preset("tiny").to_dict()

    def refused(change, match):
        bad = copy.deepcopy(good)
        change(bad)
        with pytest.raises(UserError, match=match):
            ModelConfig.from_mapping(bad)
        cd = base.config_dict(bad)  # the same from a ConfigDict
        with pytest.raises(UserError, match=match):
            ModelConfig.from_mapping(cd)

    refused(lambda m: m.update(imag_size=64),
            r"config\.model has no field 'imag_size'; did you mean config\.model\.image_size")
    refused(lambda m: m["decoder"].update(ffm=64),
            r"config\.model\.decoder has no field 'ffm'; "
            r"did you mean config\.model\.decoder\.ffn\?")
    refused(lambda m: m["clip"].update(widht=32),
            r"config\.model\.clip has no field 'widht'; did you mean config\.model\.clip\.width\?")
    refused(lambda m: m["loss"].pop("cls_norm_images"),
            r"config\.model\.loss\.cls_norm_images is missing")
    refused(lambda m: m["dinov2"].pop("init_values"),
            r"config\.model\.dinov2\.init_values is missing")
    refused(lambda m: m.pop("image_size"), r"config\.model\.image_size is missing")
    refused(lambda m: m.update(vlm="eva02"),
            r"config\.model\.vlm='eva02' has no config\.model\.eva02 section")
    refused(lambda m: m.update(decoder=3), r"config\.model\.decoder must be a section")
    with pytest.raises(UserError, match=r"vlm='llava': choose one of"):
        ModelConfig.from_mapping({**good, "vlm": "llava"})


def test_lists_become_tuples_and_old_workdir_configs_load():
    cfg = ModelConfig.preset("tiny")
    old = json.loads(json.dumps(OLD_CLIP_TINY))  # W/config.json before vfm and palette
    assert isinstance(old["class_names"], list)
    loaded = ModelConfig.from_mapping(old)
    assert loaded == cfg and loaded.vfm == "dinov2"
    assert loaded.class_names == CITYSCAPES and loaded.out_indices == (0, 1, 2, 3)
    palette = ModelConfig.from_mapping({**old, "palette": [[1, 2, 3]] * 19}).palette
    assert palette == ((1, 2, 3),) * 19


def test_workdir_config_json_round_trip(tmp_path):
    config = base.make_config("synthetic", ("synthetic",), "vlm=siglip,size=tiny")
    write_config(str(tmp_path), config)
    saved = json.loads((tmp_path / "config.json").read_text())["model"]
    # the same JSON as before: the towers' sections at the top of config.model
    assert list(saved)[:3] == ["name", "vlm", "vfm"] and list(saved)[-1] == "palette"
    assert saved["siglip"]["tokenizer"] == "" and saved["dinov2"]["embed_dim"] == 32
    assert saved == json.loads(json.dumps(ModelConfig.preset("tiny", "siglip").to_dict()))
    back = config_from_workdir(str(tmp_path))
    assert back.model.siglip.width == 32 and back.model.dinov2.embed_dim == 32
    assert ModelConfig.from_mapping(back.model) == ModelConfig.from_mapping(config.model)
    assert ModelConfig.from_mapping(back.model) == ModelConfig.preset("tiny", "siglip")


def _all_fields(cls, prefix="model"):
    for f in dataclasses.fields(cls):
        yield f"{prefix}.{f.name}", f
        section = f.metadata.get("type")
        if section is not None:
            yield from _all_fields(section, f"{prefix}.{f.name}")


def test_every_field_is_architecture_or_run_time():
    fields = dict(_all_fields(ModelConfig))
    assert len(fields) > 40
    for path, f in fields.items():
        kind = f.metadata.get(C.KIND)
        assert kind in (C.ARCHITECTURE, C.RUNTIME, C.SECTION), path
        if kind == C.SECTION and f.name != "towers":
            assert dataclasses.is_dataclass(f.metadata["type"]), path
    kinds = {p: f.metadata[C.KIND] for p, f in fields.items()}
    assert kinds["model.image_size"] == kinds["model.decoder.ffn"] == C.ARCHITECTURE
    for runtime in ("model.dtype", "model.remat", "model.scan_layers", "model.pretrained",
                    "model.attn_implementation", "model.class_names", "model.palette",
                    "model.mvfuser.scan_backend", "model.context_decoder.dropout",
                    "model.loss.cls", "model.loss.num_points"):
        assert kinds[runtime] == C.RUNTIME, runtime
    # the towers' run-time fields are fields of their sections (TowerConfig checks it), and
    # the ones this test relies on are declared
    assert registry.get_vlm("clip").config.runtime == ("drop_path_rate",)
    assert registry.get_vlm("siglip").config.runtime == ("tokenizer",)


def test_architecture_leaves_come_from_the_field_metadata():
    cfg = ModelConfig.preset("large", "siglip")
    leaves = architecture(json.loads(json.dumps(cfg.to_dict())))
    want = {f"model.{n}" for n in ("name", "vlm", "vfm", "num_classes", "patch_size",
                                   "image_size", "out_indices")}
    want |= {f"model.siglip.{k}" for k in cfg.siglip if k != "tokenizer"}
    want |= {f"model.dinov2.{k}" for k in cfg.dinov2}
    want |= {f"model.mvfuser.{k}" for k in ("d_state", "d_conv", "expand")}
    want |= {f"model.context_decoder.{k}" for k in ("width", "heads", "layers")}
    want |= {f"model.decoder.{k}" for k in cfg.decoder.keys()}
    assert set(leaves) == want
    assert leaves["model.siglip.width"] == 1024 and leaves["model.out_indices"] == [7, 11, 15, 23]
    # another model has no typed config: every leaf is compared
    toy = {"name": "toy", "width": 8, "head": {"depth": 2}}
    assert architecture(toy) == {"model.name": "toy", "model.width": 8, "model.head.depth": 2}


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "checkpoints" / "8").mkdir(parents=True)
    write_config(str(tmp_path), base.make_config("synthetic", ("synthetic",), "size=tiny"))
    return str(tmp_path)


def _tiny(**model):
    config = base.make_config("synthetic", ("synthetic",), "size=tiny")
    for path, value in model.items():
        node = config.model
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.mark.parametrize("path, value, shown", [
    ("image_size", 128, "model.image_size=64 there, 128 here"),
    ("clip.width", 64, "model.clip.width=32 there, 64 here"),
    ("dinov2.embed_dim", 64, "model.dinov2.embed_dim=32 there, 64 here"),
    ("decoder.ffn", 128, "model.decoder.ffn=64 there, 128 here"),
])
def test_workdir_refuses_another_architecture(workdir, path, value, shown):
    with pytest.raises(UserError, match=rf"holds another model than this config builds "
                                        rf".*: {shown}; use the config it was trained with"):
        check_workdir_model(_tiny(**{path: value}), workdir)


def test_workdir_accepts_other_run_time_settings(workdir):
    check_workdir_model(_tiny(), workdir)
    check_workdir_model(_tiny(**{"dtype": "bfloat16", "remat": True, "scan_layers": False,
                                 "pretrained": "elsewhere", "clip.drop_path_rate": 0.0,
                                 "mvfuser.scan_backend": "reference",
                                 "context_decoder.dropout": 0.0, "loss.num_points": 64}),
                        workdir)


def test_tqdm_head_from_the_decoder_config_is_the_same_head():
    from flax import nnx

    from mfuser_jax.model.mask_decoder import TqdmHead

    dec = C.DecoderConfig(feat_channels=32, num_heads=4, pixel_decoder_layers=2,
                          decoder_layers=3, ffn=64, pixel_ffn=48, deform_points=2)
    ours = TqdmHead.from_config(dec, in_channels=(16,) * 4, num_classes=5, text_dim=24,
                                rngs=nnx.Rngs(0))
    theirs = TqdmHead(in_channels=(16,) * 4, feat_channels=32, out_channels=32,
                      num_classes=5, num_queries=5, text_dim=24, num_groups=32,
                      pixel_decoder_layers=2, pixel_decoder_heads=4, num_points=2,
                      pixel_decoder_ffn_channels=48, num_decoder_layers=3, decoder_heads=4,
                      decoder_ffn_channels=64, rngs=nnx.Rngs(0))
    a, b = nnx.to_flat_state(nnx.state(ours)), nnx.to_flat_state(nnx.state(theirs))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        assert np.array_equal(np.asarray(x[...]), np.asarray(y[...])), path


def test_mfuser_refuses_an_unknown_model_field_by_name():
    from flax import nnx

    from mfuser_jax.model.mfuser import MFuser

    cfg = base.mfuser_model_config("tiny")
    cfg.decoder.num_head = 4  # a misspelling once silently ignored
    with pytest.raises(UserError, match=r"config\.model\.decoder has no field 'num_head'; "
                                        r"did you mean config\.model\.decoder\.num_heads\?"):
        nnx.eval_shape(lambda: MFuser(cfg, rngs=nnx.Rngs(0)))
