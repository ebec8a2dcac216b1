"""The towers' attention core: the cudnn path's token padding + length masking (run here with
XLA's implementation, the same padding logic) against unpadded attention, its routing, and the
config field that selects the implementation for every tower."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import mfuser_model_config
from mfuser_jax.models import layers
from mfuser_jax.models.mfuser import MFuser
from mfuser_jax.models.stack import iter_layer_modules


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

