"""CLIP towers: parity with HF transformers' CLIPModel and with torch restatements of MFuser's
CLIPVisionTransformer / CLIPTextContextEncoder forward passes (tests/refs/clip.py), weight
conversion, sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mfuser_jax.weights import WeightFileError, load_torch_state_dict, read_state_dict  # noqa: E402
from mfuser_jax.towers.clip.convert import (  # noqa: E402
    hf_to_openai,
    mfuser_clip_state_dicts,
    resize_for_mfuser,
    split_openai,
)
from mfuser_jax.towers.clip.model import (  # noqa: E402
    CLIPTextContextEncoder,
    CLIPTextEncoder,
    CLIPVisionTransformer,
    ResidualAttentionBlock,
)
from mfuser_jax.nn.layers import set_attn_implementation  # noqa: E402
from tests.refs.clip import TCLIP, TVisual, context_forward, mfuser_init_resize  # noqa: E402

W, HEADS, LAYERS, PATCH, IMG, EMBED, VOCAB, CTX = 64, 4, 2, 8, 32, 48, 100, 16
EOT = VOCAB - 1


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _randomize(module, seed):
    # Default inits leave biases zero and norms at one: perturb everything so a wrong
    # mapping of any tensor shows.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            if name.endswith("weight") and p.ndim == 1:  # layer norm scale
                p.copy_(1.0 + noise)
            elif name.endswith("logit_scale"):
                continue
            else:
                p.add_(noise)


@pytest.fixture(scope="module")
def hf_model():
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=W, intermediate_size=4 * W, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=CTX,
                         eos_token_id=EOT, bos_token_id=VOCAB - 2, pad_token_id=0),
        vision_config=dict(hidden_size=W, intermediate_size=4 * W, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, image_size=IMG, patch_size=PATCH),
        projection_dim=EMBED,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    _randomize(model, 1)
    return model


@pytest.fixture(scope="module")
def openai_sd(hf_model):
    return hf_to_openai(hf_model.state_dict())


def _ids(rng, lengths, total):
    ids = np.zeros((len(lengths), total), np.int64)
    for i, n in enumerate(lengths):  # n tokens incl. SOT and EOT
        ids[i, 0] = VOCAB - 2
        ids[i, 1 : n - 1] = rng.integers(1, VOCAB - 2, n - 2)
        ids[i, n - 1] = EOT
    return ids


def _loaded(ctor, sd):
    # Built abstractly (no random init to compile) and filled from the state dict; strict
    # loading guarantees every parameter is then a concrete array.
    module = nnx.eval_shape(ctor)
    load_torch_state_dict(module, sd)
    assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(nnx.state(module)))
    return module


def _with_impl(module, impl):
    set_attn_implementation(module, impl)  # the tower's attention path; raises on a bad name
    return module


def _vision(sd, res=IMG, patch=PATCH, mfuser=True, dtype=jnp.float32, impl=None):
    return _with_impl(_loaded(lambda: CLIPVisionTransformer(
        res, patch, W, LAYERS, HEADS, EMBED, mfuser_class_token=mfuser, dtype=dtype,
        rngs=nnx.Rngs(0)), sd), impl)


def _text(sd, cls=CLIPTextEncoder, ctx=CTX, impl=None):
    return _with_impl(_loaded(lambda: cls(ctx, VOCAB, W, HEADS, LAYERS, EMBED,
                                          rngs=nnx.Rngs(0)), sd), impl)


# one compiled forward per (module structure, input shapes) instead of op-by-op dispatch
_call = nnx.jit(lambda m, *args: m(*args))
_tokens = nnx.jit(lambda m, x: m.prepare_tokens(x))


def _nhwc(x):
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


# ---------------------------------------------------------------------------------------


def test_hf_parity_image_and_text(hf_model, openai_sd):
    visual_sd, text_sd = split_openai(openai_sd)
    vis = _vision(visual_sd, mfuser=False)
    txt = _text(text_sd)
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, IMG, IMG)
    ids = _ids(np.random.default_rng(0), [5, 9, 16], CTX)
    with torch.no_grad():
        ref_img = hf_model.visual_projection(hf_model.vision_model(pixels).pooler_output)
        ref_txt = hf_model.text_projection(
            hf_model.text_model(torch.as_tensor(ids)).pooler_output)
        ref_short = hf_model.text_projection(
            hf_model.text_model(torch.as_tensor(ids[:2, :10])).pooler_output)
    assert rel_err(_call(vis, _nhwc(pixels)), ref_img.numpy()) < 1e-4
    assert rel_err(_call(txt, jnp.asarray(ids)), ref_txt.numpy()) < 1e-4
    # shorter than the positional table: first positions used, as HF does
    assert rel_err(_call(txt, jnp.asarray(ids[:2, :10])), ref_short.numpy()) < 1e-4


def test_mfuser_class_token_differs_from_openai(openai_sd):
    visual_sd, _ = split_openai(openai_sd)
    a, b = _vision(visual_sd, mfuser=True), _vision(visual_sd, mfuser=False)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, IMG, IMG, 3)), jnp.float32)
    ta, tb = _tokens(a, x), _tokens(b, x)
    np.testing.assert_allclose(ta[:, 1:], tb[:, 1:], atol=1e-6)
    assert rel_err(ta[:, 0], tb[:, 0]) > 1e-2


def _torch_visual(visual_sd, res, patch):
    m = TVisual(res, patch, W, LAYERS, HEADS, EMBED).eval()
    m.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in visual_sd.items()})
    return m


@pytest.mark.parametrize("hw", [(IMG, IMG), (IMG, 48), (24, 40)], ids=["square", "wide", "small"])
def test_vision_matches_mfuser_restatement(openai_sd, hw):
    # Non-square and other grids resize the stored 4x4 positions at run time (bilinear,
    # align_corners=False: MFuser's choice; HF's interpolate_pos_encoding is bicubic, so HF
    # is not the reference here).
    visual_sd, _ = split_openai(openai_sd)
    ours = _vision(visual_sd, mfuser=True)
    ref = _torch_visual(visual_sd, IMG, PATCH)
    torch.manual_seed(4)
    pixels = torch.randn(2, 3, *hw)
    with torch.no_grad():
        expected = ref(pixels).numpy()
    assert rel_err(_call(ours, _nhwc(pixels)), expected) < 1e-4


def test_resize_for_mfuser_and_run(openai_sd):
    # the 14 -> 16 / 24x24 -> 32x32 step, scaled down: patch 8 -> 10, grid 4x4 -> 6x6
    visual_sd, _ = split_openai(openai_sd)
    resized = resize_for_mfuser(visual_sd, patch_size=10, img_size=60)
    expected = mfuser_init_resize(visual_sd, 10, 60)
    assert set(resized) == set(expected)
    for k in resized:
        np.testing.assert_allclose(resized[k], expected[k].numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    assert resized["conv1.weight"].shape == (W, 3, 10, 10)
    assert resized["positional_embedding"].shape == (37, W)
    untouched = resize_for_mfuser(visual_sd, patch_size=PATCH, img_size=IMG)
    np.testing.assert_array_equal(untouched["conv1.weight"], visual_sd["conv1.weight"])

    ours = _vision(resized, 60, 10)
    ref = _torch_visual(resized, 60, 10)
    torch.manual_seed(5)
    for hw in [(60, 60), (40, 70)]:
        pixels = torch.randn(1, 3, *hw)
        with torch.no_grad():
            expected_out = ref(pixels).numpy()
        assert rel_err(_call(ours, _nhwc(pixels)), expected_out) < 1e-4


def test_context_encoder_matches_mfuser(openai_sd):
    _, text_sd = split_openai(openai_sd, context_length=10)
    assert text_sd["positional_embedding"].shape == (10, W)
    enc = _text(text_sd, CLIPTextContextEncoder, 10)
    rng = np.random.default_rng(2)
    text = _ids(rng, [3, 5, 4, 3], 5)  # K=4 class names, 5 tokens each (MFuser)
    for shape in [(1, 5, W), (2, 5, W), (2, 4, 5, W)]:
        ctx = rng.normal(size=shape).astype(np.float32)
        with torch.no_grad():
            expected = context_forward(text_sd, torch.as_tensor(text), torch.as_tensor(ctx),
                                       LAYERS, HEADS).numpy()
        got = _call(enc, jnp.asarray(text), jnp.asarray(ctx))
        assert got.shape == (shape[0], 4, EMBED)
        assert rel_err(got, expected) < 1e-4, shape


def test_torchscript_archive_roundtrip(tmp_path):
    torch.manual_seed(6)
    model = TCLIP(IMG, PATCH, W, LAYERS, HEADS, VOCAB, CTX, EMBED).eval()
    _randomize(model, 7)
    pixels = torch.randn(2, 3, IMG, IMG)
    text = torch.as_tensor(_ids(np.random.default_rng(3), [4, 16], CTX))
    with torch.no_grad():
        traced = torch.jit.trace(model, (pixels, text), check_trace=False)
        path = tmp_path / "ViT-tiny.pt"
        torch.jit.save(traced.half(), str(path))  # OpenAI's archives hold float16 weights
        # MFuser reads them with torch.jit.load(...).float()
        ref_img, ref_txt = (t.numpy() for t in torch.jit.load(str(path)).float()(pixels, text))
    sd = read_state_dict(path)
    assert {"input_resolution", "logit_scale", "visual.proj"} <= set(sd)
    assert sd["visual.proj"].dtype == np.float16
    visual_sd, text_sd = split_openai(sd)
    vis, txt = _vision(visual_sd, mfuser=True), _text(text_sd)
    assert rel_err(_call(vis, _nhwc(pixels)), ref_img) < 1e-4
    assert rel_err(_call(txt, jnp.asarray(text.numpy())), ref_txt) < 1e-4
    # the MFuser-shaped towers (patch 8 -> 10, 60 px, 10 text positions) load strictly
    vis_m, txt_m = mfuser_clip_state_dicts(sd, patch_size=10, img_size=60, context_length=10)
    # resized from the float32 view of the half weights, as MFuser does, not in float16
    assert vis_m["conv1.weight"].dtype == np.float32
    expected = mfuser_init_resize(
        {k: v.astype(np.float32) for k, v in visual_sd.items()}, 10, 60)
    np.testing.assert_allclose(vis_m["conv1.weight"], expected["conv1.weight"].numpy(),
                               rtol=1e-5, atol=1e-6)  # float16 rounding would be ~1e-3 rel
    assert _vision(vis_m, 60, 10).positional_embedding.shape == (37, W)
    assert _text(txt_m, CLIPTextContextEncoder, 10).positional_embedding.shape == (10, W)


def test_not_clip_raises_clear_error():
    with pytest.raises(WeightFileError, match="not a CLIP checkpoint"):
        split_openai({"patch_embed.proj.weight": np.zeros((4, 3, 2, 2)), "cls_token": np.zeros(4)})
    with pytest.raises(WeightFileError, match="ResNet CLIP"):
        split_openai({"visual.layer1.0.conv1.weight": np.zeros((4, 3, 1, 1))})
    with pytest.raises(WeightFileError, match="does not know"):
        hf_to_openai({"vision_model.something_new.weight": np.zeros(3)})
    with pytest.raises(WeightFileError, match="not an HF"):
        hf_to_openai({"visual.conv1.weight": np.zeros((4, 3, 2, 2))})


def test_stepping_and_embed_match_call(openai_sd):
    visual_sd, _ = split_openai(openai_sd)
    vis = _vision(visual_sd)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, IMG, 40, 3)), jnp.float32)

    @nnx.jit
    def stepped(m, x):
        tok = m.prepare_tokens(x)
        assert tok.shape == (2, 1 + 4 * 5, W)
        for i in range(m.num_layers):
            tok = m.block(m.blocks[i], tok)
        return m.embed(tok), m(x)

    emb, pooled = stepped(vis, x)
    assert emb.shape == (2, 21, EMBED)
    np.testing.assert_allclose(emb[:, 0], pooled, rtol=1e-6, atol=1e-6)


def test_drop_path_train_eval():
    blk = ResidualAttentionBlock(W, HEADS, drop_path=0.5, rngs=nnx.Rngs(0, dropout=1))
    one = np.random.default_rng(5).normal(size=(1, 40, W)).astype(np.float32)
    x = jnp.asarray(np.repeat(one, 4, axis=0))  # 4 identical images
    blk.eval()
    a, b = blk(x), blk(x)
    np.testing.assert_array_equal(a, b)
    # eval == the same weights without drop path
    plain = ResidualAttentionBlock(W, HEADS, drop_path=0.0, rngs=nnx.Rngs(0, dropout=1))
    nnx.update(plain, nnx.state(blk, nnx.Param))
    np.testing.assert_allclose(plain(x), a, rtol=1e-6, atol=1e-6)
    blk.train()
    t = np.asarray(blk(x))
    assert np.isfinite(t).all()
    # MFuser drops token positions shared across the batch (sequence-first timm drop_path):
    # identical images stay identical, while some tokens differ from the eval output
    np.testing.assert_allclose(t, np.repeat(t[:1], 4, axis=0), rtol=1e-6, atol=1e-6)
    per_token = np.abs(t[0] - np.asarray(a[0])).max(axis=-1)
    assert (per_token > 1e-3).sum() > 5
    t2 = np.asarray(blk(x))  # a fresh mask on the next call
    assert np.abs(t2 - t).max() > 1e-3


def test_bfloat16_compute_close(openai_sd):
    visual_sd, text_sd = split_openai(openai_sd, context_length=10)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(1, IMG, IMG, 3)), jnp.float32)
    f32 = _call(_vision(visual_sd), x)
    bf = _vision(visual_sd, dtype=jnp.bfloat16)
    assert bf.conv1.kernel[...].dtype == jnp.float32  # params stay float32
    out = _call(bf, x)
    assert out.dtype == jnp.float32 and rel_err(out, f32) < 5e-2


def test_dot_product_attention_path_matches(openai_sd):
    # the jax.nn.dot_product_attention route (XLA implementation on CPU) equals the einsums,
    # bidirectional (image) and causal (text)
    visual_sd, text_sd = split_openai(openai_sd)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, IMG, IMG, 3)), jnp.float32)
    ids = jnp.asarray(_ids(np.random.default_rng(8), [4, 16], CTX))
    np.testing.assert_allclose(_call(_vision(visual_sd, impl="xla"), x),
                               _call(_vision(visual_sd), x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_call(_text(text_sd, impl="xla"), ids),
                               _call(_text(text_sd), ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attn_implementation"):
        _vision(visual_sd, impl="flash")


def _count(module):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_full_size_parameter_counts():
    vit = nnx.eval_shape(lambda: CLIPVisionTransformer(rngs=nnx.Rngs(0)))  # ViT-L/14-336
    assert _count(vit) == 304_293_888
    assert vit.positional_embedding.shape == (577, 1024) and vit.proj.shape == (1024, 768)
    text = nnx.eval_shape(lambda: CLIPTextEncoder(rngs=nnx.Rngs(0)))
    assert _count(text) == 123_650_304
    # MFuser: patch 16 at 512 px (conv1 16x16, 32x32+1 positions), text positions cut to 10
    vit16 = nnx.eval_shape(lambda: CLIPVisionTransformer(512, 16, drop_path_rate=0.1,
                                                         rngs=nnx.Rngs(0)))
    assert _count(vit16) == 304_293_888 + 1024 * 3 * (16**2 - 14**2) + 1024 * (1025 - 577)
    assert vit16.conv1.kernel.shape == (16, 16, 3, 1024)
    ctx = nnx.eval_shape(lambda: CLIPTextContextEncoder(10, rngs=nnx.Rngs(0)))
    assert _count(ctx) == 123_650_304 - 67 * 768
