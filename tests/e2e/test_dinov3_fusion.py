"""``vfm=dinov3`` end to end: the fused backbone against a PyTorch restatement (HF
DINOv3ViTModel with 4 register tokens + the CLIP variant's towers, as
tests/test_backbone_variants.py restates the DINOv2 forward), the register tokens in the
fused sequence and out of the maps for every VLM, the encoder conversion through
scripts/convert_weights.py, a few training steps from the converted folder with an
evaluation, the workdir's record of the VFM, and the full-size tower's parameter count.

Tiny random models throughout; each model is built once per module (fixtures).
"""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


from configs.base import mfuser_model_config  # noqa: E402
from mfuser_jax.model.factory import compute_values  # noqa: E402
from mfuser_jax.model.variants import build_backbone, vfm_fusion_args  # noqa: E402
from mfuser_jax.towers.clip.fusion import MFuserBackbone  # noqa: E402
from mfuser_jax.towers.registry import get_vfm  # noqa: E402
from mfuser_jax.weights.state_dict import load_torch_state_dict  # noqa: E402
from tests.refs.backbone import (IMAGENET, TorchFPN, compare_outputs, randomize,  # noqa: E402
                                 renorm)
from tests.refs.clip import TVisual  # noqa: E402
from tests.refs.hf import random_dinov2_and_clip, save_safetensors  # noqa: E402
from tests.refs.mvfuser import TorchMVFuser  # noqa: E402
from tests.support import REPO, rel_err  # noqa: E402

WIDTH, LAYERS, HEADS, OUT = 32, 4, 2, (0, 1, 2, 3)  # as tests/unit/test_backbone_variants.py

REG = 4  # DINOv3's register ("storage") tokens
IMAGE, PATCH = 64, 16
GRID = IMAGE // PATCH
OUT_DIM = 24


def _hf_dinov3(seed, layers=LAYERS, width=WIDTH, heads=HEADS):
    """A random HF DINOv3ViTModel of the tiny sizes; every parameter random (HF inits layer
    scale to 1 and the norms to 1/0), the register tokens included."""
    torch.manual_seed(seed)
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, num_register_tokens=REG, patch_size=PATCH,
        image_size=IMAGE, layer_norm_eps=1e-5, hidden_act="gelu", rope_theta=100.0)).eval()
    randomize(model, seed)
    return model


def _dinov3_section():
    """The tower section ``towers/dinov3/spec.py`` reads, at the test's sizes."""
    return SimpleNamespace(embed_dim=WIDTH, num_heads=HEADS, mlp_ratio=4.0, init_values=0.5,
                           n_storage_tokens=REG, rope_base=100.0)


def _converted(hf_model, *, patch_size=PATCH, image_size=IMAGE):
    """The HF state dict through the spec's converter (what convert_weights.py runs)."""
    spec = get_vfm("dinov3")
    return spec.weights.convert(hf_model.state_dict(), _dinov3_section(),
                                img_size=image_size, patch_size=patch_size)


def _built(build):
    """``build()``'s module: structure from shapes, every value from one jitted run."""
    model = nnx.eval_shape(build)
    compute_values(model, build, ...)
    return model


@nnx.jit
def _forward(model, x):
    return model(x)


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


# ----------------------------------------------------------- (a) against a restatement


@pytest.fixture(scope="module")
def clip_dinov3():
    """The CLIP variant with DINOv3 as the VFM, in torch (restated) and ours, one input."""
    dino = _hf_dinov3(2)
    clip = TVisual(IMAGE, PATCH, WIDTH, LAYERS, HEADS, OUT_DIM).eval()
    randomize(clip, 1)
    adapters = tnn.Sequential(*[TorchMVFuser(WIDTH, 16, 3, 1) for _ in range(LAYERS)]).eval()
    randomize(adapters, 3)
    fpn = TorchFPN(2 * WIDTH).eval()
    proj1 = tnn.Sequential(*[tnn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    proj2 = tnn.Sequential(*[tnn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
    proj3 = tnn.Linear(WIDTH, WIDTH)
    for i, m in enumerate((proj1, proj2, proj3)):
        randomize(m, 4 + i)
    torch.manual_seed(0)
    x = torch.randn(2, 3, IMAGE, IMAGE)

    vfm = vfm_fusion_args(get_vfm("dinov3"), _dinov3_section(), image_size=IMAGE,
                          patch_size=PATCH, layers=LAYERS)
    ours = _built(lambda: MFuserBackbone(
        image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=HEADS,
        output_dim=OUT_DIM, drop_path_rate=0.1, **vfm, out_indices=OUT, d_state=16,
        d_conv=3, expand=1, scan_backend="reference", rngs=nnx.Rngs(0)))
    sd = {f"dinov3.{k}": v for k, v in _converted(dino).items()}
    sd.update({f"adapter.{k}": v for k, v in adapters.state_dict().items()})
    sd.update(fpn.state_dict())
    sd.update(clip.state_dict())
    for name, m in (("adapter_proj1.", proj1), ("adapter_proj2.", proj2),
                    ("adapter_proj3.", proj3)):
        sd.update({name + k: v for k, v in m.state_dict().items()})
    load_torch_state_dict(ours, sd)
    ours.eval()
    torch_parts = SimpleNamespace(dino=dino, clip=clip, adapters=adapters, fpn=fpn,
                                  proj=(proj1, proj2, proj3))
    return torch_parts, ours, x


def _restated_clip_dinov3(t, x):
    """The CLIP variant's fused forward (clip/models.py) with DINOv3 in DINOv2's place,
    the register tokens handled explicitly: [cls, REG registers, patches] through the
    DINOv3 blocks and into every MVFuser with the cls token; patches only (tokens
    1 + REG on) in the FPN maps; [cls, patches] into proj3 and the embeddings."""
    dino, clip, adapters = t.dino, t.clip, t.adapters
    proj1, proj2, proj3 = t.proj
    b = x.shape[0]
    px = renorm(x, *IMAGENET)
    dino_x = dino.embeddings(px)                 # [cls, registers, patches]
    rope = dino.rope_embeddings(px)              # (cos, sin) of the patch grid
    assert dino_x.shape[1] == 1 + REG + GRID * GRID
    c = clip.conv1(x).flatten(2).transpose(1, 2)
    w = c.shape[-1]
    c = torch.cat([clip.class_embedding + torch.zeros(b, 1, w), c], dim=1)
    pos = clip.positional_embedding
    c = c + torch.cat([(pos[0] + clip.class_embedding).reshape(1, 1, w), pos[1:][None]], 1)
    c = clip.ln_pre(c)
    maps = []
    for i in range(LAYERS):
        c = clip.transformer.resblocks[i](c.permute(1, 0, 2)).permute(1, 0, 2)
        dino_x = dino.model.layer[i](dino_x, position_embeddings=rope)
        fused = adapters[i](torch.cat((proj1[i](dino_x), c), dim=1))  # registers scanned too
        n = dino_x.shape[1]
        dino_x = dino_x + proj2[i](fused[:, :n])
        c = c + fused[:, n:]
        patches = dino_x[:, 1 + REG:]            # the registers stay out of the maps
        maps.append(torch.cat([
            patches.permute(0, 2, 1).reshape(b, -1, GRID, GRID),
            c[:, 1:].permute(0, 2, 1).reshape(b, -1, GRID, GRID)], 1))
    cls_and_patches = torch.cat([dino_x[:, :1], dino_x[:, 1 + REG:]], dim=1)
    emb = clip.ln_post(c + proj3(cls_and_patches)) @ clip.proj
    return t.fpn(maps), emb[:, :1], emb[:, 1:].reshape(b, GRID, GRID, -1)


def test_clip_dinov3_backbone_matches_the_restated_forward(clip_dinov3):
    t, ours, x = clip_dinov3
    assert ours.vfm_name == "dinov3" and ours.vfm is ours.dinov3
    assert ours.vfm.num_prefix_tokens == 1 + REG
    with torch.no_grad():
        want = _restated_clip_dinov3(t, x)
    got = _forward(ours, _nhwc(x))
    compare_outputs(got, want)  # every map and both embeddings, to float32 rounding


# ------------------------------------------------- (b) register tokens, every VLM


def _layer_scales(model):
    """The stacked LayerScale gammas of the VFM's blocks (leading axis: the layers)."""
    blocks = model.vfm.blocks.layers
    return blocks.ls1.gamma, blocks.ls2.gamma


def _check_registers(model, images):
    """The maps are the patch grid's (registers left out); changing the register tokens
    changes every output, although DINOv3's blocks are made the identity: the registers
    then reach the rest only through the fused sequence (were they left out of it, every
    output would stay bit for bit the same)."""
    b, h, w = images.shape[0], *model.grid_size(images.shape[1], images.shape[2])
    for gamma in _layer_scales(model):  # DINOv3's blocks become the identity
        gamma[...] = jnp.zeros_like(gamma[...])
    feats, glob, pix = out = _forward(model, images)
    sizes = [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (h // 2, w // 2)]
    assert [f.shape[1:3] for f in feats] == sizes
    assert {f.shape[-1] for f in feats} == {2 * WIDTH}  # VLM width + VFM width
    assert glob.shape[:2] == (b, 1) and pix.shape[:3] == (b, h, w)
    storage = model.vfm.storage_tokens
    assert storage[...].shape == (1, REG, WIDTH)
    before = np.asarray(storage[...])
    change = 10.0 * np.random.default_rng(0).normal(size=before.shape)
    storage[...] = jnp.asarray(before + change, jnp.float32)
    changed = _forward(model, images)
    storage[...] = jnp.asarray(before)
    again = _forward(model, images)
    flat = lambda o: [*o[0], o[1], o[2]]  # noqa: E731
    for a, c, r in zip(flat(out), flat(changed), flat(again)):
        np.testing.assert_array_equal(r, a)  # deterministic: a difference is the change's
        assert c.shape == a.shape
        assert rel_err(c, a) > 1e-5


def test_clip_registers_in_the_fused_sequence_not_in_the_maps(clip_dinov3):
    _, ours, x = clip_dinov3
    saved = [np.asarray(g[...]) for g in _layer_scales(ours)]
    try:
        _check_registers(ours, _nhwc(x))
    finally:  # the module's model, shared: restore what the test changed
        for g, v in zip(_layer_scales(ours), saved):
            g[...] = jnp.asarray(v)


@pytest.mark.parametrize("vlm", ["siglip", "eva02"])
def test_registers_in_the_fused_sequence_not_in_the_maps(vlm):
    cfg = mfuser_model_config("tiny", vlm, "dinov3")
    cfg.mvfuser.scan_backend = "reference"
    model = _built(lambda: build_backbone(cfg, jnp.float32, nnx.Rngs(0)))
    model.eval()
    patch, size = cfg.patch_size, cfg.image_size
    assert model.vfm.patch_embed.proj.kernel.shape[:2] == (patch, patch)
    if vlm == "eva02":  # patch 14: the converter resizes DINOv3's 16 px kernel
        hf = _hf_dinov3(5)
        sd = _converted(hf, patch_size=patch, image_size=size)
        want = F.interpolate(hf.embeddings.patch_embeddings.weight.detach(), size=(14, 14),
                             mode="bicubic", align_corners=False).numpy()
        assert sd["patch_embed.proj.weight"].shape == (WIDTH, 3, 14, 14)
        np.testing.assert_allclose(sd["patch_embed.proj.weight"], want, rtol=1e-5, atol=1e-6)
        load_torch_state_dict(model.vfm, sd, strict=True)
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size, 3)),
                         jnp.float32)
    _check_registers(model, images)


# ------------------------------------------ (d) conversion, (c) training and evaluation


def _paper_tiny():
    """config.model of configs/gta2cs.py:size=tiny,vfm=dinov3 (CLIP; 64 px, patch 16)."""
    return mfuser_model_config("tiny", "clip", "dinov3")


def _run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _convert(*args):
    return _run_script(os.path.join("scripts", "convert_weights.py"), "--config",
                       "configs/gta2cs.py:size=tiny,vfm=dinov3", *args)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Random HF DINOv3 (tiny, 4 registers) and CLIP files (CLIP at patch 14 / 56 px, so the
    conversion resizes it, as for the released ViT-L/14), converted by
    scripts/convert_weights.py for configs/gta2cs.py:size=tiny,vfm=dinov3."""
    cfg = _paper_tiny()
    assert (cfg.clip.layers, cfg.dinov3.embed_dim, cfg.dinov3.num_heads) == (LAYERS, WIDTH, HEADS)
    folder = tmp_path_factory.mktemp("dinov3_weights")
    dinov3 = _hf_dinov3(7)
    torch.manual_seed(0)
    dinov2, clip = random_dinov2_and_clip(cfg.clip, SimpleNamespace(embed_dim=WIDTH,
                                                                    num_heads=HEADS), 56)
    files = {name: save_safetensors(m, str(folder / f"{name}.safetensors"))
             for name, m in (("dinov3", dinov3), ("dinov2", dinov2), ("clip", clip))}
    out = str(folder / "converted")
    result = _convert("--dinov3", files["dinov3"], "--clip", files["clip"], "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return dinov3, files, out, result.stdout


def _hf_tokens(hf_model, images_nhwc):
    with torch.no_grad():
        px = torch.from_numpy(np.asarray(images_nhwc)).permute(0, 3, 1, 2)
        return hf_model(pixel_values=px).last_hidden_state.numpy()


def _assert_tower_is_hf(tower, hf_model, seed):
    """The DINOv3 tower ([cls, registers, patches], final norm) equals HF's last_hidden_state."""
    x = np.random.default_rng(seed).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
    got = np.asarray(nnx.jit(lambda m, x: m(x))(tower, jnp.asarray(x)))
    want = _hf_tokens(hf_model, x)
    assert got.shape == want.shape == (2, 1 + REG + GRID * GRID, WIDTH)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_convert_weights_brings_the_dinov3_tower(converted):
    from mfuser_jax.model.mfuser import MFuser

    dinov3, _, out, stdout = converted
    # HF keeps no key bias; the official qkv.bias (ours) holds its masked third.
    hf_count = sum(p.numel() for p in dinov3.parameters()) + LAYERS * WIDTH
    assert f"  dinov3: {hf_count:,} parameters" in stdout.splitlines()
    model = nnx.eval_shape(lambda: MFuser(_paper_tiny(), rngs=nnx.Rngs(0)))
    model.load_pretrained(out)  # every frozen encoder parameter, checked by path and shape
    assert not hasattr(model.backbone, "dinov2")
    _assert_tower_is_hf(model.backbone.dinov3, dinov3, seed=11)


def test_convert_weights_refuses_dinov2_for_vfm_dinov3(converted, tmp_path):
    _, files, _, _ = converted
    result = _convert("--dinov2", files["dinov2"], "--clip", files["clip"], "--out",
                      str(tmp_path / "o"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: give --dinov3 and --clip (the encoder weights)")
    assert "the config builds vfm='dinov3' and vlm='clip'" in lines[0]
    assert not (tmp_path / "o").exists()


def _demo_config(arg, pretrained):
    """configs/demo.py[:arg] shrunk to a 2-step run at 64 px (the model of gta2cs.py's
    size=tiny) evaluating 2 synthetic images."""
    from configs import demo

    c = demo.get_config(arg)
    c.model.image_size = c.data.crop_size = c.evaluation.crop_size = IMAGE
    c.evaluation.stride, c.evaluation.crop_batch = 42, 4
    c.model.pretrained = pretrained
    c.data.synthetic.update(num_train=8, num_eval=2, image_size=(64, 96))
    c.total_steps, c.batch_size = 2, 2
    c.log_every, c.checkpoint_every, c.eval_every = 1, 2, 2
    c.optim.warmup_steps = 1
    c.compile_cache = "off"
    return c


@pytest.fixture(scope="module")
def trained(converted, tmp_path_factory):
    """Two training steps of configs/demo.py:vfm=dinov3 from the converted encoders, then
    the evaluation at the end, as scripts/train.py runs them."""
    from mfuser_jax.run import train as T

    out = converted[2]
    config = _demo_config("vfm=dinov3", out)
    assert config.model.to_dict() == {**_paper_tiny().to_dict(), "pretrained": out}
    workdir = str(tmp_path_factory.mktemp("dinov3_run"))
    lines = []
    T.train_and_evaluate(config, workdir, log=lines.append)
    return config, workdir, lines


@pytest.mark.slow  # the fixture trains and evaluates: about a minute on 2 cores
def test_training_and_evaluation_with_dinov3(trained):
    _, workdir, lines = trained
    metrics = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [x for x in metrics if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2]
    assert all(np.isfinite(x["loss"]) and x["loss"] > 0 for x in steps)
    evals = [x for x in metrics if "miou" in x]
    assert [(x["step"], x["dataset"]) for x in evals] == [(2, "synthetic_real")]
    report = json.load(open(os.path.join(workdir, "eval", "synthetic_real_step2.json")))
    assert 0.0 <= report["miou"] <= 100.0  # percent
    assert report["miou"] == pytest.approx(evals[0]["miou"])
    assert any(line.startswith("synthetic_real @ step 2: per-class IoU") for line in lines)
    saved = json.load(open(os.path.join(workdir, "config.json")))["model"]
    assert saved["vfm"] == "dinov3" and "dinov3" in saved and "dinov2" not in saved
    assert saved["dinov3"]["n_storage_tokens"] == REG


@pytest.mark.slow
def test_restored_workdir_keeps_the_converted_dinov3(trained, converted):
    from mfuser_jax.run import restore as R

    config, workdir, _ = trained
    model, step = R.restore_model(config, workdir)
    assert step == 2
    _assert_tower_is_hf(model.backbone.dinov3, converted[0], seed=12)  # frozen: unchanged


@pytest.mark.slow
def test_a_dinov3_workdir_is_refused_for_vfm_dinov2(trained, converted):
    from mfuser_jax.errors import UserError
    from mfuser_jax.run import evaluate as E

    _, workdir, _ = trained
    dinov2 = _demo_config("", converted[2])
    assert dinov2.model.vfm == "dinov2"
    with pytest.raises(UserError) as err:
        E.evaluate_checkpoint(dinov2, workdir)
    assert str(err.value) == (
        f"{workdir} holds a vfm='dinov3' model ({workdir}/config.json) but the config "
        "builds vfm='dinov2': append ':vfm=dinov3' to the config file name (e.g. --config "
        "configs/gta2cs.py:vfm=dinov3)")


def test_a_workdir_recorded_before_vfm_existed_holds_dinov2(tmp_path):
    """W/config.json written before the VFM could be chosen has no model.vfm: DINOv2."""
    from configs import demo
    from mfuser_jax.errors import UserError
    from mfuser_jax.workdir import check_workdir_model, config_from_workdir, write_config

    (tmp_path / "checkpoints" / "600").mkdir(parents=True)
    old = demo.get_config()
    del old.model["vfm"]
    write_config(str(tmp_path), old)
    assert config_from_workdir(str(tmp_path)).model.vfm == "dinov2"  # eval.py without --config
    check_workdir_model(demo.get_config(), str(tmp_path))
    with pytest.raises(UserError, match=r"holds a vfm='dinov2' model .* builds vfm='dinov3': "
                                        r"append ':vfm=dinov2'"):
        check_workdir_model(demo.get_config("vfm=dinov3"), str(tmp_path))


# -------------------------------------------------------------- full-size counts


def _count(module):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_full_size_dinov3_tower_in_the_fused_backbone():
    """The fused backbone's DINOv3 at paper size (512 px, patch 16, 24 layers) holds the
    released ViT-L/16's parameters; the rest of the backbone is DINOv2's variant's."""
    backbones = {vfm: nnx.eval_shape(lambda: build_backbone(
        mfuser_model_config("large", "clip", vfm), jnp.float32, nnx.Rngs(0)))
        for vfm in ("dinov2", "dinov3")}
    tower = _count(backbones["dinov3"].dinov3)
    assert tower == 303_154_176
    with torch.device("meta"):
        hf = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, num_register_tokens=4, patch_size=16))
    assert tower == sum(p.numel() for p in hf.parameters()) + 24 * 1024  # + masked k bias
    v2 = backbones["dinov2"]
    assert _count(backbones["dinov3"]) - tower == _count(v2) - _count(v2.dinov2)
