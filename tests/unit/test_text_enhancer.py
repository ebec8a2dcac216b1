"""ContextDecoder / MTEnhancer against a PyTorch restatement of the original
(tests/refs/text_enhancer.py), loaded by the generic loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mfuser_jax.weights.state_dict import load_torch_state_dict, torch_state_dict_of
from mfuser_jax.nn.layers import GELU
from mfuser_jax.model.text_enhancer import ContextDecoder
from tests.refs.text_enhancer import TorchContextDecoder, random_torch_decoder
from tests.support import rel_err


# One small configuration everywhere, so eager ops compiled for one test serve the others.
SMALL = dict(width=32, heads=4, layers=2, visual_dim=48)
K, N = 5, 11


def small_inputs(seed):
    rng = np.random.default_rng(seed)
    text = jnp.asarray(rng.normal(size=(2, K, 48)), jnp.float32)
    visual = jnp.asarray(rng.normal(size=(2, N, 48)), jnp.float32)
    return text, visual


def small_decoder():
    return ContextDecoder(32, 4, 2, 48, scan_backend="reference", rngs=nnx.Rngs(0))


def n_params(module):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_full_size_parameter_count():
    abstract = nnx.eval_shape(lambda: ContextDecoder(256, 4, 1, 768, rngs=nnx.Rngs(0)))
    assert n_params(abstract) == 1_494_401
    assert n_params(abstract) == sum(p.numel() for p in TorchContextDecoder(256, 4, 1, 768).parameters())


def test_names_match_the_original():
    ref = TorchContextDecoder(32, 4, 2, 48)
    ours = small_decoder()
    exported = torch_state_dict_of(ours)
    assert sorted(exported) == sorted(ref.state_dict())
    assert {k: tuple(v.shape) for k, v in exported.items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }
    for key in ("memory_proj.0.weight", "memory_proj.2.bias", "text_proj.1.weight", "out_proj.1.bias",
                "decoder.1.mlp.3.weight", "decoder.0.cross_attn.A_log"):
        assert key in exported
    # q/k/v without bias, the output projection with bias
    assert "decoder.0.self_attn.q_proj.bias" not in exported
    assert "decoder.0.self_attn.proj.bias" in exported


def test_initialisation_follows_the_original_apply():
    m = small_decoder()
    # _init_weights reaches every Linear, the MVFuser's dt_proj included: N(0, .02), bias 0
    for lin in (m.memory_proj[1], m.decoder[0].mlp[0], m.decoder[1].cross_attn.in_proj):
        assert float(jnp.std(lin.kernel[...])) == pytest.approx(0.02, rel=0.2)
        np.testing.assert_array_equal(lin.bias[...] if lin.bias is not None else 0.0, 0.0)
    dt_proj = m.decoder[0].cross_attn.dt_proj  # not U(+-dt_rank^-0.5) and softplus^-1(dt)
    np.testing.assert_array_equal(dt_proj.bias[...], 0.0)
    assert float(jnp.max(jnp.abs(dt_proj.kernel[...]))) < 0.1
    np.testing.assert_array_equal(m.decoder[0].norm2.scale[...], 1.0)
    assert m.decoder[0].norm2.epsilon == 1e-5  # torch's default, not flax's 1e-6
    # parameters the apply() does not touch keep the MVFuser's own init
    assert float(m.decoder[0].cross_attn.scale[...]) == pytest.approx(1e-3)
    np.testing.assert_allclose(m.decoder[0].cross_attn.A_log[...][0], np.log(np.arange(1, 17.0)), rtol=1e-6)


@pytest.mark.parametrize("width,heads,layers,visual_dim,k,n", [(256, 4, 1, 768, 19, 65), (32, 4, 2, 48, K, N)])
def test_matches_torch_original(width, heads, layers, visual_dim, k, n):
    ref = random_torch_decoder(width, heads, layers, visual_dim)
    ours = ContextDecoder(width, heads, layers, visual_dim, scan_backend="reference", rngs=nnx.Rngs(0))
    load_torch_state_dict(ours, ref.state_dict())
    ours.eval()
    rng = np.random.default_rng(0)
    text = rng.normal(size=(2, k, visual_dim)).astype(np.float32)
    visual = rng.normal(size=(2, n, visual_dim)).astype(np.float32)
    with torch.no_grad():
        ref = ref.double()
        want = ref(torch.from_numpy(text).double(), torch.from_numpy(visual).double()).numpy()
        # the MVFuser path must matter for this comparison to mean anything
        for layer in ref.decoder:
            layer.cross_attn.scale.zero_()
        without_mixer = ref(torch.from_numpy(text).double(), torch.from_numpy(visual).double()).numpy()
    got = nnx.jit(lambda m, t, v: m(t, v))(ours, jnp.asarray(text), jnp.asarray(visual))
    assert got.shape == (2, k, visual_dim)
    assert rel_err(got, want) < 1e-4
    assert rel_err(without_mixer, want) > 1e-2


def test_both_text_ends_of_the_mixer_are_used():
    # MVFuser is a causal scan over [text, visual, text]: only the second copy sees the
    # visual tokens, so changing visual tokens must change the output through it.
    m = small_decoder()
    for layer in m.decoder:
        layer.cross_attn.scale[...] = jnp.asarray(1.0)
    m.eval()
    text, v1 = small_inputs(1)
    _, v2 = small_inputs(2)
    assert rel_err(m(text, v1), m(text, v2)) > 1e-3


def test_dropout_train_vs_eval_and_gradients():
    m = small_decoder()
    for layer in m.decoder:
        layer.cross_attn.scale[...] = jnp.asarray(0.5)
    text, visual = small_inputs(3)
    target, _ = small_inputs(4)
    m.train()
    assert not np.allclose(m(text, visual), m(text, visual))
    m.eval()
    np.testing.assert_array_equal(m(text, visual), m(text, visual))

    m.train()
    grads = nnx.jit(nnx.grad(lambda mod: jnp.sum(mod(text, visual) * target)))(m)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(torch_state_dict_of(m))
    for path, g in flat:
        assert float(jnp.max(jnp.abs(g[...]))) > 0, f"no gradient for {path}"


def test_mlp_gelu_is_exact_erf():
    x = np.linspace(-4, 4, 101).astype(np.float32)
    want = torch.nn.GELU()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(GELU()(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)
    tanh_approx = jax.nn.gelu(jnp.asarray(x), approximate=True)
    assert np.abs(np.asarray(tanh_approx) - want).max() > 1e-4  # the test can tell them apart


def test_bad_shapes_are_refused():
    m = small_decoder()
    with pytest.raises(ValueError, match="ContextDecoder expects"):
        m(jnp.zeros((2, 5, 32)), jnp.zeros((2, 9, 48)))
