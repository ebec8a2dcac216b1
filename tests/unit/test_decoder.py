"""tqdm head (pixel decoder + text-query Mask2Former) against a PyTorch restatement.

The restatement (tests/refs/decoder.py) rebuilds tqdmHead / tqdmMSDeformAttnPixelDecoder the
way the original constructors do, with the same module names, so its state dict defines the
expected keys and parameter count, and its forward is the numerical reference.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mfuser_jax.weights.state_dict import _targets, load_torch_state_dict, torch_state_dict_of
from mfuser_jax.model.mask_decoder import (TqdmHead, pad_levels, semantic_inference,
                                            unmask_full_rows)
from mfuser_jax.model.pixel_decoder import MultiheadAttention, sine_positional_encoding
from mfuser_jax.ops.resize import resize
from tests.refs.decoder import FULL_TORCH, THead, t_sine_pos, torch_cfg
from tests.support import TINY_HEAD as TINY


def _features(seed=0, b=2, hw=(64, 96), ch=16, text_dim=24, k=5):
    rng = np.random.default_rng(seed)
    feats = [rng.standard_normal((b, hw[0] // s, hw[1] // s, ch)).astype(np.float32)
             for s in (4, 8, 16, 32)]
    texts = rng.standard_normal((b, k, text_dim)).astype(np.float32)
    return feats, texts


def _randomised_torch_head(cfg, seed=0):
    torch.manual_seed(seed)
    head = THead(torch_cfg(cfg)).eval()
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("sampling_offsets.weight"):
                p.normal_(0.0, 0.05)  # offsets of a few pixels, some past the borders
            elif "norms" in name or ".gn." in name or "post_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight")
                        else 0.2 * torch.randn_like(p))
            elif p.dim() > 1 and "embed" not in name and "level_encoding" not in name:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / math.sqrt(fan_in))
            else:
                p.normal_(0.0, 0.5)
    return head


@pytest.fixture(scope="module")
def tiny_head():
    return TqdmHead(**TINY, rngs=nnx.Rngs(0))


def test_tiny_forward_shapes(tiny_head):
    feats, texts = _features()
    cls_list, mask_list = tiny_head(feats, texts)  # eager; the gradient test runs under jit
    assert len(cls_list) == len(mask_list) == TINY["num_decoder_layers"] + 1
    for c, m in zip(cls_list, mask_list):
        assert c.shape == (2, 5, 6) and c.dtype == jnp.float32
        assert m.shape == (2, 5, 16, 24) and m.dtype == jnp.float32
        assert np.all(np.isfinite(c)) and np.all(np.isfinite(m))
    mask_feature, memories = tiny_head.pixel_decoder(feats, texts)
    assert mask_feature.shape == (2, 16, 24, 32)
    assert [x.shape for x in memories] == [(2, 2, 3, 32), (2, 4, 6, 32), (2, 8, 12, 32)]

    cls_last, mask_last = (x[-1] for x in tiny_head(feats, texts, deterministic=True))
    sem = semantic_inference(cls_last, mask_last)  # what MFuser.predict does with the head
    assert sem.shape == (2, 16, 24, 5)
    np.testing.assert_allclose(np.asarray(sem),
                               np.asarray(semantic_inference(cls_list[-1], mask_list[-1])),
                               rtol=1e-5, atol=1e-6)


def test_rejects_wrong_number_of_texts(tiny_head):
    feats, texts = _features()
    with pytest.raises(ValueError, match="num_queries"):
        tiny_head(feats, texts[:, :3])


def test_matches_torch_restatement_through_state_dict():
    torch_head = _randomised_torch_head(TINY, seed=1)
    head = TqdmHead(**TINY, rngs=nnx.Rngs(3))
    load_torch_state_dict(head, torch_head.state_dict())
    feats, texts = _features(seed=2)
    with torch.no_grad():
        want_cls, want_mask = torch_head([torch.from_numpy(f).permute(0, 3, 1, 2) for f in feats],
                                         torch.from_numpy(texts))
    got_cls, got_mask = head(feats, texts)
    assert len(got_cls) == len(want_cls)
    for i, (gc, wc, gm, wm) in enumerate(zip(got_cls, want_cls, got_mask, want_mask)):
        scale = float(wm.abs().max())
        np.testing.assert_allclose(np.asarray(gc), wc.numpy(), rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"cls {i}")
        np.testing.assert_allclose(np.asarray(gm), wm.numpy(), rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"mask {i}")
    # The attention masks were neither trivial nor all-unmasked: some queries saw only
    # part of the memory, which is what makes this parity check cover masked attention.
    frac = float((torch.sigmoid(want_mask[0]) < 0.5).float().mean())
    assert 0.05 < frac < 0.95, frac


def test_state_dict_keys_match_original_tiny(tiny_head):
    want = {k: tuple(v.shape) for k, v in THead(torch_cfg(TINY)).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in torch_state_dict_of(tiny_head).items()}
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    assert got == want


def _expected_full_param_count(c):
    """The released decode_head, counted layer by layer from the original constructors."""
    e, lv, t = c["feat"], c["levels"], c["text_dim"]
    lin = lambda i, o: i * o + o  # noqa: E731
    ln = gn = lambda ch: 2 * ch  # noqa: E731
    mha = 3 * e * e + 3 * e + lin(e, e)  # in_proj_weight/bias + out_proj
    ffn = lambda hidden: lin(e, hidden) + lin(hidden, e)  # noqa: E731
    msda = (lin(e, c["pd_heads"] * lv * c["points"] * 2) + lin(e, c["pd_heads"] * lv * c["points"])
            + lin(e, e) + lin(e, e))  # sampling_offsets, attention_weights, value/output_proj
    ins = c["in_channels"]
    pixel = (
        sum(ins[i] * e + e + gn(e) for i in (3, 2, 1))  # input_convs: 1x1 conv (bias) + GN
        + c["pd_layers"] * (msda + mha + ffn(c["pd_ffn"]) + 3 * ln(e))  # encoder.layers
        + ln(e)  # encoder.post_norm
        + lv * e  # level_encoding
        + ins[0] * e + gn(e)  # lateral_convs.0: 1x1 conv, no bias (GN follows)
        + 9 * e * e + gn(e)  # output_convs.0: 3x3 conv, no bias
        + lin(e, c["out"])  # mask_feature 1x1 conv
        + lin(t, e)  # text_proj
        + c["queries"] * e  # text_pos_embed
    )
    decoder = c["dec_layers"] * (2 * mha + ffn(c["dec_ffn"]) + 3 * ln(e)) + ln(e)
    head = (
        c["queries"] * e  # query_embed
        + lin(t, e) + lin(e, e)  # text_proj.0, text_proj.2
        + lv * e  # level_embed
        + lin(e, c["num_classes"] + 1)  # cls_embed
        + 2 * lin(e, e) + lin(e, c["out"])  # mask_embed.0/2/4
    )  # decoder_input_projs are Identity (256 == 256); no conv_seg
    return pixel + decoder + head


def test_full_size_parameter_count_and_keys():
    abstract = nnx.eval_shape(lambda: TqdmHead(rngs=nnx.Rngs(0)))
    leaves = jax.tree_util.tree_leaves(nnx.state(abstract, nnx.Param))
    got = sum(int(np.prod(x.shape)) for x in leaves)
    want = _expected_full_param_count(FULL_TORCH)
    assert got == want == 26_766_292  # 12,086,208 pixel decoder + 14,209,280 decoder + 470,804
    # Same count and the same named shapes in the full-size restatement (built on 'meta').
    with torch.device("meta"):
        original = THead(FULL_TORCH)
    want_shapes = {k: tuple(v.shape) for k, v in original.state_dict().items()}
    assert sum(p.numel() for p in original.parameters()) == want
    got_shapes = {k: tuple(s) for k, _, _, s in _targets(abstract)}
    assert got_shapes == want_shapes


def test_fully_masked_rows_are_unmasked():
    mask = jnp.array([[[True, True, True], [True, False, True], [False, False, False]]])
    np.testing.assert_array_equal(
        np.asarray(unmask_full_rows(mask)),
        [[[False, False, False], [True, False, True], [False, False, False]]])


def test_all_background_prediction_attends_everywhere(tiny_head):
    # Force every mask logit negative: every query's attention row is fully masked. The
    # rule must turn that into "no mask" (finite outputs equal to an unmasked layer).
    head = nnx.clone(tiny_head)
    pd = head.pixel_decoder
    pd.mask_feature.kernel[...] = jnp.zeros_like(pd.mask_feature.kernel[...])
    pd.mask_feature.bias[...] = jnp.ones_like(pd.mask_feature.bias[...])
    head.mask_embed[4].kernel[...] = jnp.zeros_like(head.mask_embed[4].kernel[...])
    head.mask_embed[4].bias[...] = -jnp.ones_like(head.mask_embed[4].bias[...])
    feats, texts = _features(seed=4)
    cls_list, mask_list = head(feats, texts)
    assert np.all(np.asarray(mask_list[0]) < 0)
    assert all(np.all(np.isfinite(c)) for c in cls_list)

    layer = head.transformer_decoder.layers[0]
    q = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 32)), jnp.float32)
    mem = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 32)), jnp.float32)
    full = jnp.ones((2, 5, 6), bool)
    masked = layer(q, mem, mem, attn_masks=[unmask_full_rows(full), None])
    free = layer(q, mem, mem, attn_masks=[None, None])
    np.testing.assert_allclose(np.asarray(masked), np.asarray(free), rtol=1e-6, atol=1e-6)
    # Without the rule the fully-masked softmax is NaN, as in PyTorch.
    assert np.all(np.isnan(np.asarray(layer(q, mem, mem, attn_masks=[full, None]))))


def test_padded_level_matches_the_unpadded_level(tiny_head):
    # The 9 layers run as one scanned body over levels padded to one key count: a layer on
    # a padded level (padding blocked, fully-masked rows unmasked over the real keys only)
    # must equal the same layer on the level itself, and the padded resize must be ops.resize.
    rng = np.random.default_rng(3)
    small, big = (rng.standard_normal((2, *hw, 32)).astype(np.float32) for hw in ((3, 4), (5, 6)))
    pos = [rng.standard_normal((1, *m.shape[1:])).astype(np.float32) for m in (small, big)]
    levels = pad_levels([jnp.asarray(small), jnp.asarray(big)], [jnp.asarray(p) for p in pos],
                        (10, 12))
    assert levels.memory.shape == (2, 2, 30, 32) and int(levels.valid[0].sum()) == 12

    mask_logits = jnp.asarray(rng.standard_normal((2, 5, 10, 12)), jnp.float32)
    for i, (h, w) in enumerate(((3, 4), (5, 6))):
        grid = jnp.einsum("jw,bqiw->bqij", levels.resize_w[i],
                          jnp.einsum("ih,bqhw->bqiw", levels.resize_h[i], mask_logits))
        np.testing.assert_allclose(grid[:, :, :h, :w], resize(mask_logits, (h, w)),
                                   rtol=1e-6, atol=1e-6)
        assert not np.any(np.asarray(grid[:, :, h:])) and not np.any(np.asarray(grid[:, :, :, w:]))

    layer = tiny_head.transformer_decoder.layers[0]
    q = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
    mask = rng.random((2, 5, 3, 4)) < 0.5
    mask[:, 0] = True  # a fully masked row: attends to every real key, never to padding
    padded = np.ones((2, 5, 5, 6), bool)
    padded[:, :, :3, :4] = mask
    out = layer(q, levels.memory[0], levels.memory[0], key_pos=levels.pos[0],
                attn_masks=[unmask_full_rows(jnp.asarray(padded.reshape(2, 5, 30)),
                                             levels.valid[0]), None])
    want = layer(q, jnp.asarray(small.reshape(2, 12, 32)), jnp.asarray(small.reshape(2, 12, 32)),
                 key_pos=jnp.asarray(pos[0].reshape(1, 12, 32)),
                 attn_masks=[unmask_full_rows(jnp.asarray(mask.reshape(2, 5, 12))), None])
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_attention_mask_blocks_keys():
    mha = MultiheadAttention(8, 2, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 3, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 4, 8)), jnp.float32)
    mask = jnp.array([[[False, True, True, True]] * 3])  # only key 0 visible
    out1 = mha(q, k, k, attn_mask=mask)
    k2 = k.at[:, 1:].set(100.0)  # changing hidden keys/values must not matter
    out2 = mha(q, k2, k2, attn_mask=mask)
    np.testing.assert_allclose(np.asarray(out1), np.asarray(out2), rtol=1e-6, atol=1e-6)


def test_semantic_inference_matches_numpy():
    rng = np.random.default_rng(6)
    cls = rng.standard_normal((2, 4, 5)).astype(np.float32)
    masks = rng.standard_normal((2, 4, 3, 7)).astype(np.float32)
    got = np.asarray(semantic_inference(cls, masks))
    p = np.exp(cls) / np.exp(cls).sum(-1, keepdims=True)
    want = np.einsum("bqc,bqhw->bhwc", p[..., :-1], 1 / (1 + np.exp(-masks)))
    assert got.shape == (2, 3, 7, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sine_encoding_matches_original():
    want = t_sine_pos(1, 3, 5, 8)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.asarray(sine_positional_encoding(3, 5, 8)), want, rtol=1e-6,
                               atol=1e-6)


def test_gradients_reach_every_parameter():
    # One layer per stack keeps the compile small; every parameter kind is still present.
    head = TqdmHead(**{**TINY, "pixel_decoder_layers": 1, "num_decoder_layers": 1},
                    rngs=nnx.Rngs(1))
    feats, texts = _features(seed=7, hw=(32, 32))

    def loss(model):
        cls_list, mask_list = model(feats, texts)
        return sum(jnp.mean(c ** 2) + jnp.mean(jnp.tanh(m)) for c, m in zip(cls_list, mask_list))

    grads = nnx.jit(nnx.grad(loss))(head)
    flat = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
    assert flat
    for path, g in flat:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.abs(g).max() > 0, path


def test_bfloat16_compute_close_to_float32():
    feats, texts = _features(seed=8, hw=(32, 32))
    small = {**TINY, "pixel_decoder_layers": 1, "num_decoder_layers": 1}
    head32 = TqdmHead(**small, rngs=nnx.Rngs(0))
    head16 = TqdmHead(**small, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(head16, nnx.state(head32, nnx.Param))
    c32, _ = head32(feats, texts)
    c16, m16 = head16(feats, texts)
    assert c16[0].dtype == jnp.float32 and m16[0].dtype == jnp.float32
    # The first prediction precedes any masked attention, so it is continuous in dtype.
    err = np.abs(np.asarray(c16[0]) - np.asarray(c32[0])).max()
    assert err < 0.1 * np.abs(np.asarray(c32[0])).max() + 0.05, err
