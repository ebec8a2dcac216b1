"""The attention core: the cudnn path's token padding + length masking (run here with XLA's
implementation, the same padding logic) against unpadded attention, its routing, and the
config field that selects the implementation for every tower and head."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import mfuser_model_config
from mfuser_jax.model import text_enhancer
from mfuser_jax.nn import layers
from mfuser_jax.towers.dinov2 import model as dinov2
from mfuser_jax.towers.eva02 import model as eva02
from mfuser_jax.towers.siglip import model as siglip
from mfuser_jax.model.mfuser import MFuser
from mfuser_jax.nn.stack import iter_layer_modules


def _qkv(b, lq, lk, heads=2, d=8, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, heads, d)), dtype) for n in (lq, lk, lk))
    return q, k, v


def _numpy_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v in float64 numpy (causal: query i sees keys j <= i)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


# (lq, lk, causal): self-attention at a token count that is not a multiple (37, as 1025 is not),
# causal self-attention, cross-attention with only the keys padded, and an aligned case.
@pytest.mark.parametrize("lq,lk,causal", [(37, 37, False), (37, 37, True), (16, 21, False)])
def test_padded_attention_equals_unpadded(lq, lk, causal):
    q, k, v = _qkv(2, lq, lk)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    @functools.partial(jax.jit, static_argnums=3)
    def value_and_grads(q, k, v, padded):
        if padded:
            f = lambda *a: layers.padded_dot_product_attention(  # noqa: E731
                *a, implementation="xla", causal=causal, multiple=16)
        else:  # the unpadded einsum core
            f = lambda *a: layers.dot_product_attention(*a, causal=causal)  # noqa: E731
        return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)

    out, grads = value_and_grads(q, k, v, True)
    assert out.shape == q.shape
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, causal), rtol=1e-5, atol=1e-6)
    # Gradients: no real query sees a padded key, so they match the unpadded core's.
    for g, g_ref in zip(grads, value_and_grads(q, k, v, False)[1]):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_cudnn_route_pads_to_the_multiple_and_passes_lengths(monkeypatch):
    # No cuDNN here: record what the core hands jax.nn.dot_product_attention and run it with
    # XLA's implementation instead.
    calls, original = [], jax.nn.dot_product_attention

    def recording(q, k, v, **kw):
        calls.append((q.shape, k.shape, kw))
        return original(q, k, v, **{**kw, "implementation": "xla"})

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    q, k, v = _qkv(2, 65, 65, d=16, dtype=jnp.bfloat16)
    out = layers.dot_product_attention(q, k, v, implementation="cudnn", causal=True)
    (q_shape, k_shape, kw), = calls
    assert q_shape[1] == k_shape[1] == 128 == 2 * layers.CUDNN_SEQ_MULTIPLE
    assert kw["implementation"] == "cudnn" and kw["is_causal"]
    assert np.asarray(kw["query_seq_lengths"]).tolist() == [65, 65]
    assert np.asarray(kw["key_value_seq_lengths"]).tolist() == [65, 65]
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _numpy_attention(q, k, v, True), atol=3e-2)
    with pytest.raises(ValueError, match="needs bfloat16 or float16"):
        layers.dot_product_attention(*_qkv(1, 4, 4), implementation="cudnn")


def test_cudnn_route_pads_the_mask(monkeypatch):
    # The mask goes to jax.nn.dot_product_attention broadcast and padded to the padded token
    # axes (cuDNN takes it as a full-size bias); run with XLA's implementation, the result is
    # the unpadded masked attention.
    calls, original = [], jax.nn.dot_product_attention

    def recording(q, k, v, **kw):
        calls.append(kw["mask"].shape)
        return original(q, k, v, **{**kw, "implementation": "xla"})

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    q, k, v = _qkv(2, 19, 70, d=16, dtype=jnp.bfloat16)
    keep = np.random.default_rng(3).random((2, 1, 19, 70)) < 0.6
    keep[..., 0] = True
    out = layers.dot_product_attention(q, k, v, implementation="cudnn", mask=jnp.asarray(keep))
    assert calls == [(2, 1, 64, 128)]
    want = layers.dot_product_attention(*(t.astype(jnp.float32) for t in (q, k, v)),
                                        mask=jnp.asarray(keep))
    assert out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)


def test_config_field_reaches_every_tower_attention():
    def implementations(impl):
        cfg = mfuser_model_config("tiny")
        cfg.attn_implementation = impl
        model = nnx.eval_shape(lambda: MFuser(cfg, rngs=nnx.Rngs(0)))  # abstract: no weights drawn
        # per layer: a stacked tower's attention is one module serving every layer
        return [m.attn_implementation for _, m, _ in iter_layer_modules(model)
                if hasattr(m, "attn_implementation")]

    assert mfuser_model_config("tiny").attn_implementation == "xla"
    found = implementations("cudnn")
    # tiny CLIP: 4 vision + 2 text layers; DINOv2: 4 blocks
    assert len(found) >= 10 and set(found) == {"cudnn"}
    with pytest.raises(ValueError, match="attn_implementation must be"):
        implementations("flash")



# Every attention module of the model: the packed torch MHA (CLIP, SigLIP's pooling head, the
# pixel decoder's and the mask decoder's), the DINOv2, EVA02 and SigLIP towers' own, and the
# text enhancer's.
ATTENTION_TYPES = (layers.TorchMultiheadAttention, dinov2.Attention, eva02.Attention,
                   siglip.SiglipAttention, text_enhancer.Attention)


@pytest.mark.parametrize("vlm", ["clip", "eva02", "siglip"])
def test_set_attn_implementation_reaches_every_attention_of_the_model(vlm, request):
    cfg = mfuser_model_config("tiny", vlm)
    if vlm == "siglip":  # the tiny SentencePiece model of tests/conftest.py
        cfg.siglip.tokenizer = request.getfixturevalue("spiece")
    cfg.attn_implementation = "cudnn"
    model = nnx.eval_shape(lambda: MFuser(cfg, rngs=nnx.Rngs(0)))  # abstract: no weights drawn
    attention = {path: m for path, m in nnx.iter_graph(model) if isinstance(m, ATTENTION_TYPES)}
    # the config reached them all at build time, the heads and the text enhancer included
    assert {m.attn_implementation for m in attention.values()} == {"cudnn"}
    assert {p[0] for p in attention} == {"backbone", "text_encoder", "context_decoder",
                                         "decode_head"}
    assert {p[1] for p in attention if p[0] == "decode_head"} == {"pixel_decoder",
                                                                  "transformer_decoder"}
    # set_attn_implementation sets exactly these (a stacked layer's module counts once)
    assert layers.set_attn_implementation(model, None) == len(attention)
    assert {m.attn_implementation for m in attention.values()} == {None}
    if vlm == "siglip":
        assert ("backbone", "vlm", "head", "attention") in attention


def test_every_attention_call_takes_the_configured_path(monkeypatch):
    # Trace the tiny model's inference abstractly, recording the (query, key) token counts of
    # each call to jax.nn.dot_product_attention: with "xla" the towers' and the heads' calls
    # all go there (the 19 class queries of the text enhancer and the mask decoder, the
    # pixel decoder's image tokens attending to the 19 texts); with None none does.
    calls, original = [], jax.nn.dot_product_attention

    def recording(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1]))
        return original(q, k, v, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    model = nnx.eval_shape(lambda: MFuser(mfuser_model_config("tiny"), rngs=nnx.Rngs(0)))
    size, k = model.config.image_size, model.num_classes
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)

    def traced_calls(impl):
        layers.set_attn_implementation(model, impl)
        graphdef, state = nnx.split(model)
        calls.clear()
        jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).predict(x), state, images)
        return set(calls)

    found = traced_calls("xla")
    grid = (size // model.config.patch_size) ** 2
    assert (1 + grid, 1 + grid) in found  # the image towers (class token + patches)
    assert (k, k) in found  # text enhancer, mask decoder self-attention
    assert any(lq == k and lk not in (k, 1 + grid) for lq, lk in found)  # masked cross-attn
    assert any(lk == k and lq != k for lq, lk in found)  # pixel decoder -> texts
    assert traced_calls(None) == set()
