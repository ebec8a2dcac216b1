"""Shared building blocks: those that re-express a Flax layer for speed must compute the same
thing, and the one torch.nn.MultiheadAttention port and the attention core's mask path must
compute what PyTorch does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mfuser_jax.weights.state_dict import load_torch_state_dict
from mfuser_jax.nn.layers import (
    DepthwiseConv1d,
    TiledConvTranspose,
    TorchMultiheadAttention,
    dot_product_attention,
    set_attn_implementation,
    torch_conv_transpose,
)


def _assert_same_outputs_and_gradients(fast, reference, x, tol):
    """Outputs, parameter gradients and input gradients of two layers holding the same
    parameters agree; the loss weights make every output element's gradient distinct."""
    def loss(layer, x):
        y = layer(x).astype(jnp.float32)
        return jnp.sum(y * jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size)

    np.testing.assert_allclose(np.asarray(fast(x), np.float32),
                               np.asarray(reference(x), np.float32), rtol=tol, atol=tol)
    grad = nnx.grad(loss, argnums=(0, 1))
    (g_fast, gx_fast), (g_ref, gx_ref) = grad(fast, x), grad(reference, x)
    for a, b in zip(jax.tree.leaves(nnx.state(g_fast)) + [gx_fast],
                    jax.tree.leaves(nnx.state(g_ref)) + [gx_ref]):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_tiled_conv_transpose_equals_the_convolution_and_its_gradients(dtype, tol):
    tiled = torch_conv_transpose(6, 5, 2, stride=2, dtype=dtype, rngs=nnx.Rngs(0))
    assert isinstance(tiled, TiledConvTranspose)
    conv = nnx.ConvTranspose(6, 5, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
                             rngs=nnx.Rngs(1))
    nnx.update(conv, nnx.state(tiled))  # same kernel and bias
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 6)), jnp.float32)
    assert tiled(x).shape == conv(x).shape == (2, 6, 8, 5)
    _assert_same_outputs_and_gradients(tiled, conv, x, tol)


def test_other_transposed_convolutions_stay_convolutions():
    layer = torch_conv_transpose(4, 4, 3, stride=2, rngs=nnx.Rngs(0))
    assert type(layer) is nnx.ConvTranspose


@pytest.mark.parametrize("k,pad", [(3, (1, 1)), (4, (1, 2))])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_depthwise_conv1d_equals_the_grouped_convolution_and_its_gradients(k, pad, dtype, tol):
    shifted = DepthwiseConv1d(6, k, padding=pad, dtype=dtype, rngs=nnx.Rngs(0))
    conv = nnx.Conv(6, 6, (k,), padding=(pad,), feature_group_count=6, use_bias=False,
                    dtype=dtype, rngs=nnx.Rngs(1))
    nnx.update(conv, nnx.state(shifted))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 6)), jnp.float32)
    _assert_same_outputs_and_gradients(shifted, conv, x, tol)


# ---------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention and the attention core's masks

E, HEADS, B, LQ, LK = 16, 4, 2, 5, 7


def _arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def _mask(shape, seed):
    """A random boolean mask, True = blocked (torch's convention), key 0 never blocked: no
    row is fully blocked (PyTorch gives NaN there)."""
    mask = np.random.default_rng(seed).random(shape) < 0.5
    mask[..., 0] = False
    return mask


# (inputs, mask): self-attention (one array: the packed projection), key is value (the
# pooling head), three arrays; masks (Lq, Lk) and per sample and head (B, heads, Lq, Lk)
# (torch: (B * heads, Lq, Lk)); causal (torch: the upper-triangle attn_mask).
CASES = ["self", "kv", "qkv", "self_mask_2d", "qkv_mask_4d", "causal"]


@pytest.mark.parametrize("impl", [None, "xla"])
@pytest.mark.parametrize("case", CASES)
def test_torch_multihead_attention_matches_torch(case, impl):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, HEADS, batch_first=True).eval()
    with torch.no_grad():  # torch starts both biases at 0: give them values to check
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    ours = load_torch_state_dict(TorchMultiheadAttention(E, HEADS, rngs=nnx.Rngs(0)),
                                 ref.state_dict())
    assert set_attn_implementation(ours, impl) == 1

    x, y, z = _arrays(1, (B, LQ, E), (B, LK, E), (B, LK, E))
    kw, torch_mask = {}, None
    if case.startswith("self") or case == "causal":
        inputs = (x,)
        torch_inputs = (torch.from_numpy(x),) * 3
        lk = LQ
    else:
        inputs = (x, y) if case == "kv" else (x, y, z)
        ty = torch.from_numpy(y)
        torch_inputs = (torch.from_numpy(x), ty, ty if case == "kv" else torch.from_numpy(z))
        lk = LK
    if case == "self_mask_2d":
        kw["attn_mask"] = _mask((LQ, lk), 2)
        torch_mask = torch.from_numpy(kw["attn_mask"])
    elif case == "qkv_mask_4d":
        kw["attn_mask"] = _mask((B, HEADS, LQ, lk), 3)
        torch_mask = torch.from_numpy(kw["attn_mask"].reshape(B * HEADS, LQ, lk))
    elif case == "causal":
        kw["causal"] = True
        torch_mask = torch.triu(torch.ones(LQ, LQ, dtype=torch.bool), 1)

    want = ref(*torch_inputs, attn_mask=torch_mask, need_weights=False)[0].detach().numpy()
    got = ours(*(jnp.asarray(a) for a in inputs), **kw)
    assert got.shape == (B, LQ, E)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_torch_multihead_attention_rejects_ambiguous_masks():
    mha = TorchMultiheadAttention(E, HEADS, rngs=nnx.Rngs(0))
    x = jnp.zeros((B, LQ, E))
    with pytest.raises(ValueError, match="boolean"):  # torch's (B * heads, Lq, Lk) layout
        mha(x, attn_mask=np.zeros((B * HEADS, LQ, LQ), bool))
    with pytest.raises(ValueError, match="boolean"):  # additive float masks are not taken
        mha(x, attn_mask=np.zeros((LQ, LQ), np.float32))


def test_torch_multihead_attention_dropout():
    mha = TorchMultiheadAttention(E, HEADS, 0.5, rngs=nnx.Rngs(0, dropout=1))
    plain = TorchMultiheadAttention(E, HEADS, rngs=nnx.Rngs(0))  # same weights, no dropout
    x = jnp.asarray(_arrays(4, (B, LQ, E))[0])
    np.testing.assert_allclose(mha(x, deterministic=True), plain(x), rtol=1e-6, atol=1e-6)
    dropped = mha(x, deterministic=False)
    assert np.all(np.isfinite(dropped)) and not np.allclose(dropped, plain(x), atol=1e-3)
    set_attn_implementation(mha, "xla")  # computed by the einsums (the same math)
    np.testing.assert_allclose(mha(x, deterministic=True), plain(x), rtol=1e-6, atol=1e-6)
    assert not np.allclose(mha(x, deterministic=False), plain(x), atol=1e-3)
    q = jnp.zeros((1, 3, 2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="attention dropout"):
        dot_product_attention(q, q, q, implementation="cudnn", dropout=lambda p: p)


def _numpy_masked_attention(q, k, v, keep):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(keep, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


# mask shapes: (Lq, Lk), per sample (B, 1, Lq, Lk), per sample and head (B, H, Lq, Lk)
@pytest.mark.parametrize("shape", [(LQ, LK), (B, 1, LQ, LK), (B, HEADS, LQ, LK)])
@pytest.mark.parametrize("causal", [False, True])
def test_masked_attention_einsums_equal_xla(shape, causal):
    q, k, v = (jnp.asarray(a) for a in _arrays(5, (B, LQ, HEADS, 8), (B, LK, HEADS, 8),
                                               (B, LK, HEADS, 8)))
    keep = jnp.asarray(~_mask(shape, 6))  # the core's convention: True = may attend

    def f(impl, q, k, v):
        return dot_product_attention(q, k, v, implementation=impl, causal=causal, mask=keep)

    w = jnp.asarray(_arrays(7, (B, LQ, HEADS, 8))[0])
    outs, grads = {}, {}
    for impl in (None, "xla"):
        outs[impl] = jax.jit(lambda *a: f(impl, *a))(q, k, v)  # noqa: B023
        grads[impl] = jax.grad(lambda *a: jnp.sum(f(impl, *a) * w),  # noqa: B023
                               argnums=(0, 1, 2))(q, k, v)
    full = np.broadcast_to(np.asarray(keep), (B, HEADS, LQ, LK))
    if causal:
        full = full & np.tril(np.ones((LQ, LK), bool))
    np.testing.assert_allclose(outs[None], _numpy_masked_attention(q, k, v, full),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs["xla"], outs[None], rtol=1e-5, atol=1e-6)
    for g_xla, g_none in zip(grads["xla"], grads[None]):
        np.testing.assert_allclose(g_xla, g_none, rtol=1e-4, atol=1e-5)


def test_fully_masked_row_is_nan_in_the_einsum_path_only():
    # the documented difference: -inf (PyTorch's NaN) against XLA's large finite negative
    q = jnp.asarray(_arrays(8, (1, 2, 1, 4))[0])
    keep = jnp.asarray([[True, False, True], [False, False, False]])
    kv = jnp.asarray(_arrays(9, (1, 3, 1, 4))[0])
    none = np.asarray(dot_product_attention(q, kv, kv, mask=keep))
    xla = np.asarray(dot_product_attention(q, kv, kv, implementation="xla", mask=keep))
    np.testing.assert_allclose(xla[:, 0], none[:, 0], rtol=1e-6, atol=1e-6)
    assert np.all(np.isnan(none[:, 1])) and np.all(np.isfinite(xla[:, 1]))
    with pytest.raises(ValueError, match="boolean"):
        dot_product_attention(q, kv, kv, mask=keep.astype(jnp.float32))
