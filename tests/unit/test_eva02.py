"""EVA02-CLIP towers and weight conversion against PyTorch restatements of MFuser's eva_clip
(tests/refs/eva02.py). Switches in the restatement build the tempting wrong variants, so
each trap test shows the variant really differs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from mfuser_jax.weights.state_dict import load_torch_state_dict  # noqa: E402
from mfuser_jax.weights.torch_io import WeightFileError  # noqa: E402
from mfuser_jax.towers.eva02.convert import (  # noqa: E402
    eva02_state_dicts,
    is_eva02_clip,
    read_eva02_clip,
)
from mfuser_jax.towers.clip.model import CLIPTextContextEncoder  # noqa: E402
from mfuser_jax.towers.eva02.model import EVAVisionTransformer, eva_rope_table, rotate_half  # noqa: E402
from mfuser_jax.nn.layers import set_attn_implementation  # noqa: E402
from tests.refs.clip import TQuickGELU  # noqa: E402
from tests.refs.eva02 import (  # noqa: E402
    TEVA,
    TRope,
    TTextTransformer,
    clip_state_dict,
    randomize,
    resize_evaclip_pos_embed,
    resize_float16_on_gpu,
    visual_state_dict,
)

IMG, PATCH, DIM, HEADS, DEPTH, RATIO, OUT = 56, 14, 64, 4, 3, 2.6667, 48
VOCAB, TW, THEADS, TLAYERS = 100, 64, 4, 2
EOT = VOCAB - 1
TOWER = dict(img=IMG, patch=PATCH, dim=DIM, heads=HEADS, depth=DEPTH, ratio=RATIO, out=OUT)
TEXT = dict(vocab=VOCAB, width=TW, heads=THEADS, layers=TLAYERS, out=OUT)


def _teva(**kw):
    """The tiny EVA tower of these tests (TOWER), ``kw`` changed."""
    return TEVA(**{**TOWER, **kw})


def _ttext(context_length, **kw):
    return TTextTransformer(context_length, **{**TEXT, **kw})


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _torch_tower(seed=0, **kw):
    small = kw.pop("small_input", False)
    return randomize(_teva(**kw), seed, small).eval()


def _ours(sd, img=IMG, dtype=jnp.float32, impl=None, **kw):
    m = EVAVisionTransformer(img, PATCH, DIM, DEPTH, HEADS, RATIO, OUT, dtype=dtype,
                             rngs=nnx.Rngs(0), **kw)
    set_attn_implementation(m, impl)  # the tower's attention path; raises on a bad name
    return load_torch_state_dict(m, sd)


def _images(seed, n=2, hw=(IMG, IMG)):
    return torch.randn(n, 3, *hw, generator=torch.Generator().manual_seed(seed))


def _nhwc(x):
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _run_ours(m, images):
    x = m.prepare_tokens(images)
    rope = m.rope(m.grid_size(images.shape[1], images.shape[2]))
    tokens = []
    for i in range(m.num_layers):
        x = m.block(m.blocks[i], x, aux=rope)
        tokens.append(x)
    return tokens, m(images)


@pytest.fixture(scope="module")
def reference():
    tmod = _torch_tower(0)
    images = _images(1)
    with torch.no_grad():
        tokens, pooled = tmod(images)
    return tmod, images, [t.numpy() for t in tokens], pooled.numpy()


def test_tower_matches_torch_restatement(reference):
    tmod, images, t_tokens, t_pooled = reference
    m = _ours(visual_state_dict(tmod))
    assert m.num_layers == DEPTH and m.grid_size(IMG, IMG) == (4, 4)
    tokens, pooled = _run_ours(m, _nhwc(images))
    assert tokens[0].shape == (2, 17, DIM) and pooled.shape == (2, OUT)
    for i, (a, b) in enumerate(zip(tokens, t_tokens)):
        assert rel_err(a, b) < 1e-4, f"block {i}: {rel_err(a, b)}"
    assert rel_err(pooled, t_pooled) < 1e-4
    # scanned (compiled) vs stepped (eager) blocks: equal up to float reassociation
    np.testing.assert_allclose(m.forward_tokens(_nhwc(images)), tokens[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        dict(half_split=True),  # rotate_half works on interleaved pairs, not on halves
        dict(shift_rope=True),  # class token not rotated; patch p gets table row p - 1
        dict(k_bias=True),  # k has no bias (with rope a k bias is not softmax-invariant)
        dict(no_ffn_ln=True),  # SwiGLU's ffn_ln is there
    ],
    ids=lambda v: next(iter(v)),
)
def test_traps_differ(reference, variant):
    tmod, images, _, t_pooled = reference
    wrong = _teva(**variant)
    wrong.load_state_dict(tmod.state_dict())
    with torch.no_grad():
        _, wrong_pooled = wrong.eval()(images)
    assert rel_err(wrong_pooled.numpy(), t_pooled) > 1e-2
    m = _ours(visual_state_dict(tmod))
    assert rel_err(m(_nhwc(images)), t_pooled) < 1e-4
    assert m.blocks[0].attn.k_proj.bias is None


def test_layer_norm_eps_is_1e6():
    # tokens of variance ~1e-6: eps 1e-6 vs 1e-5 moves the output a lot
    tmod = _torch_tower(3, small_input=True)
    images = _images(4)
    wrong = _teva(eps=1e-5)
    wrong.load_state_dict(tmod.state_dict())
    with torch.no_grad():
        _, ref = tmod(images)
        _, bad = wrong.eval()(images)
    assert rel_err(bad.numpy(), ref.numpy()) > 1e-2
    ours = _ours(visual_state_dict(tmod))(_nhwc(images))
    assert rel_err(ours, ref.numpy()) < 1e-4


def test_rotate_half_interleaved():
    x = jnp.arange(8.0).reshape(1, 8)
    np.testing.assert_array_equal(rotate_half(x), [[-1, 0, -3, 2, -5, 4, -7, 6]])


@pytest.mark.parametrize("grid,pt", [(36, 16), (24, 16), (4, 16)])
def test_rope_table_matches_original_formula(grid, pt):
    # EVA02-CLIP-L at 512 px: head_dim 64 -> VisionRotaryEmbeddingFast(dim=32, 16, 36)
    t = TRope(32, pt, grid)
    cos, sin = eva_rope_table((grid, grid), 64, pt)
    assert cos.shape == (grid * grid, 64) and cos.dtype == np.float32
    np.testing.assert_allclose(cos, t.freqs_cos.numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(sin, t.freqs_sin.numpy(), rtol=0, atol=2e-6)
    m = nnx.eval_shape(lambda: EVAVisionTransformer(512, rngs=nnx.Rngs(0)))
    c, s = m.rope((grid, grid))
    np.testing.assert_allclose(np.asarray(c), cos)


def test_rope_non_square_grid():
    cos, _ = eva_rope_table((3, 5), 16, 16)
    rows, _ = eva_rope_table((3, 3), 16, 16)
    cols, _ = eva_rope_table((5, 5), 16, 16)
    grid = cos.reshape(3, 5, 16)
    # first half of the channels follows the row index, second half the column index
    np.testing.assert_array_equal(grid[:, 0, :8], rows.reshape(3, 3, 16)[:, 0, :8])
    np.testing.assert_array_equal(grid[0, :, 8:], cols.reshape(5, 5, 16)[0, :, 8:])


def test_run_time_pos_embed_resize_and_dtypes(reference):
    tmod, _, _, _ = reference
    sd = visual_state_dict(tmod)
    m = _ours(sd)
    images = _nhwc(_images(5, hw=(84, 84)))
    # at run time the 4x4 table is resized to 6x6 like the converter does it at load time
    resized, _ = eva02_state_dicts(clip_state_dict(tmod, _torch_text(0)), img_size=84,
                                   context_length=8)
    m84 = _ours(resized, img=84)
    assert rel_err(m(images), m84(images)) < 1e-5
    assert m(_nhwc(_images(6, hw=(70, 42)))).shape == (2, OUT)
    ref = m(images)
    assert rel_err(_ours(sd, impl="xla")(images), ref) < 1e-5
    bf16 = _ours(sd, dtype=jnp.bfloat16)(images)
    assert bf16.dtype == jnp.float32 and rel_err(bf16, ref) < 5e-2
    with pytest.raises(ValueError, match="attn_implementation"):
        _ours(sd, impl="flash")


# --------------------------------------------------------------------------------------
# Text tower: open_clip TextTransformer (exact nn.GELU) with CoOp context


def _torch_text(seed, context_length=16, **kw):
    return randomize(_ttext(context_length, **kw), seed).eval()


def _text_inputs(seed, n1=5, n2=3, k=3):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, VOCAB - 2, (k, n1), generator=g)
    text[:, 0] = VOCAB - 2
    for i, end in enumerate([2, 4, 3]):
        text[i, end] = EOT
        text[i, end + 1:] = 0
    return text, torch.randn(2, n2, TW, generator=g) * 0.5


def test_text_tower_exact_gelu_with_context():
    ttext = _torch_text(7, context_length=8)
    text, context = _text_inputs(8)
    with torch.no_grad():
        ref = ttext(text, context).numpy()
        quick = _ttext(8, act=TQuickGELU())
        quick.load_state_dict(ttext.state_dict())
        ref_quick = quick.eval()(text, context).numpy()
    assert rel_err(ref_quick, ref) > 1e-3  # the activation matters
    ours = CLIPTextContextEncoder(8, VOCAB, TW, THEADS, TLAYERS, OUT, activation="gelu",
                                  rngs=nnx.Rngs(0))
    load_torch_state_dict(ours, ttext.state_dict())
    out = ours(jnp.asarray(text.numpy()), jnp.asarray(context.numpy()))
    assert out.shape == (2, 3, OUT) and rel_err(out, ref) < 1e-4
    with pytest.raises(ValueError, match="activation"):
        CLIPTextContextEncoder(8, VOCAB, TW, THEADS, TLAYERS, OUT, activation="relu",
                               rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------
# Conversion


def test_convert_file_and_run(tmp_path):
    # "pretrained" at 42 px (3x3 grid) with 16 text positions; MFuser-style load at 70 px (5x5)
    tsrc = _torch_tower(11, img=42)
    ttext = _torch_text(12, context_length=16)
    sd = clip_state_dict(tsrc, ttext)
    assert any("freqs_cos" in k for k in sd) and "visual.blocks.0.attn.rope.freqs_sin" in sd
    path = tmp_path / "eva02.pt"
    torch.save({"module": {f"module.{k}": v for k, v in sd.items()}}, path)
    visual, text = read_eva02_clip(path, img_size=70, patch_size=14, context_length=8)
    assert not any("freqs" in k for k in visual) and "logit_scale" not in text
    ref_pos = resize_evaclip_pos_embed(tsrc.pos_embed.detach(), 5).numpy()
    assert visual["pos_embed"].shape == (1, 26, DIM)
    np.testing.assert_allclose(visual["pos_embed"], ref_pos, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(visual["pos_embed"][:, 0], sd["visual.pos_embed"][:, 0])
    assert text["positional_embedding"].shape == (8, TW)

    # the original loader into a 70 px torch tower vs ours loaded strictly from the file
    tdst = _teva(img=70)
    tsd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    tsd["pos_embed"] = torch.from_numpy(ref_pos)
    tsd = {k: v for k, v in tsd.items() if "freqs_" not in k}
    missing, unexpected = tdst.load_state_dict(tsd, strict=False)
    assert not unexpected and all("freqs_" in k for k in missing)
    images = _images(13, hw=(70, 70))
    with torch.no_grad():
        _, ref = tdst.eval()(images)
    ours = _ours(visual, img=70)
    assert rel_err(ours(_nhwc(images)), ref.numpy()) < 1e-4

    t8 = CLIPTextContextEncoder(8, VOCAB, TW, THEADS, TLAYERS, OUT, activation="gelu",
                                rngs=nnx.Rngs(0))
    load_torch_state_dict(t8, text)
    tsmall = _ttext(8)
    tsmall.load_state_dict({**ttext.state_dict(),
                            "positional_embedding": ttext.positional_embedding[:8]})
    txt, ctx = _text_inputs(14)
    with torch.no_grad():
        tref = tsmall.eval()(txt, ctx).numpy()
    assert rel_err(t8(jnp.asarray(txt.numpy()), jnp.asarray(ctx.numpy())), tref) < 1e-4


def test_convert_patch_size_and_errors():
    tsrc, ttext = _torch_tower(15), _torch_text(16)
    sd = clip_state_dict(tsrc, ttext)
    assert is_eva02_clip(sd) and is_eva02_clip({f"module.{k}": v for k, v in sd.items()})
    visual, _ = eva02_state_dicts(sd, img_size=64, patch_size=16, context_length=8)
    ref = F.interpolate(tsrc.patch_embed.proj.weight.detach(), size=16, mode="bicubic",
                        align_corners=False)
    np.testing.assert_allclose(visual["patch_embed.proj.weight"], ref.numpy(), rtol=1e-5,
                               atol=1e-6)
    same, _ = eva02_state_dicts(sd, img_size=IMG, context_length=8)
    np.testing.assert_array_equal(same["pos_embed"], sd["visual.pos_embed"].numpy())

    clip_like = {"visual.conv1.weight": np.zeros((4, 3, 2, 2)),
                 "visual.positional_embedding": np.zeros((5, 4))}
    assert not is_eva02_clip(clip_like)
    with pytest.raises(WeightFileError, match="EVA02.*mfuser_jax.towers.clip.convert"):
        eva02_state_dicts(clip_like)
    with pytest.raises(WeightFileError, match="fewer than context_length"):
        eva02_state_dicts(sd, context_length=77)
    with pytest.raises(WeightFileError, match="outside visual"):
        eva02_state_dicts({**sd, "extra.weight": np.zeros(2)}, img_size=IMG, context_length=8)


def test_float16_file_pos_embed_rounded_like_original(tmp_path):
    # For a float16 file the original resizes pos_embed in float32 arithmetic with one
    # final rounding to float16, before copying it into float32.
    sd = {k: (v.half() if v.is_floating_point() else v)
          for k, v in clip_state_dict(_torch_tower(17), _torch_text(18)).items()}
    path = tmp_path / "eva02_fp16.pt"
    torch.save({"state_dict": sd}, path)
    visual, text = read_eva02_clip(path, img_size=84, context_length=8)
    assert visual["pos_embed"].dtype == np.float32 and text["text_projection"].dtype == np.float32
    exact = resize_evaclip_pos_embed(sd["visual.pos_embed"].float(), 6)
    ref = resize_float16_on_gpu(sd["visual.pos_embed"], 6).float().numpy()
    np.testing.assert_array_equal(visual["pos_embed"], ref)
    assert not np.array_equal(visual["pos_embed"], exact.numpy())


def test_float16_pos_embed_at_full_size_is_bit_equal_to_the_originals():
    # The released table (24 x 24 x 1024, float16) resized to MFuser's 36 x 36 grid: every
    # entry as the original's float32 arithmetic rounds it. A float64 resize rounded to
    # float16 lands one float16 step away in about 1 of 800 entries.
    rng = np.random.default_rng(3)
    pos = torch.from_numpy((rng.normal(size=(1, 577, 1024)) * 0.02).astype(np.float16))
    sd = {"visual.pos_embed": pos.numpy(), "visual.patch_embed.proj.weight": np.zeros(
        (1, 3, 14, 14), np.float16), "text.positional_embedding": np.zeros((77, 4))}
    sd.update({k: np.zeros(1) for k in ("visual.cls_token", "visual.blocks.0.attn.q_proj.weight",
                                        "visual.blocks.0.attn.q_bias",
                                        "visual.blocks.0.mlp.w3.weight",
                                        "text.token_embedding.weight", "text.text_projection")})
    visual, _ = eva02_state_dicts(sd, img_size=512, patch_size=14, context_length=13)
    ref = resize_float16_on_gpu(pos, 36).float().numpy()
    assert visual["pos_embed"].shape == (1, 1297, 1024)
    np.testing.assert_array_equal(visual["pos_embed"], ref)


# --------------------------------------------------------------------------------------
# Full size


def _count(module):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_full_size_parameter_counts():
    vit = nnx.eval_shape(lambda: EVAVisionTransformer(img_size=512, patch_size=14,
                                                      rngs=nnx.Rngs(0)))
    text = nnx.eval_shape(lambda: CLIPTextContextEncoder(13, activation="gelu",
                                                         rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        tvit = TEVA(img=512, patch=14, dim=1024, heads=16, depth=24, ratio=2.6667, out=768)
        ttext = TTextTransformer(13, vocab=49408, width=768, heads=12, layers=12, out=768)
    t_vit = sum(p.numel() for p in tvit.parameters())
    t_text = sum(p.numel() for p in ttext.parameters())
    print(f"EVA02-CLIP-L/14 vision @512: {_count(vit):,}; text @13: {_count(text):,}")
    assert _count(vit) == t_vit and _count(text) == t_text
    assert vit.pos_embed.shape == (1, 1297, 1024) and vit.blocks[0].mlp.w1.kernel.shape == (
        1024, 2730)
    assert vit.num_layers == 24 and vit.head_dim == 64
