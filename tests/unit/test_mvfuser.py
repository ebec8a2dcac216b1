"""MVFuser against a PyTorch restatement of the original, and its traps pinned.

The restatement (tests/refs/mvfuser.py: MVFuser.forward with mamba_ssm's
``selective_scan_ref`` and ``rms_norm_ref``) runs in float64 here and has switches for the
two easy-to-miss details (dt bias added twice, norm before gate) so the tests can show that
each one matters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mfuser_jax.weights.state_dict import (
    StateDictMismatchError,
    load_torch_state_dict,
    torch_state_dict_of,
)
from mfuser_jax.model.mvfuser import MVFuser, RMSNormGated
from tests.refs.mvfuser import TorchMVFuser, randomize_mvfuser_
from tests.support import rel_err


def make_pair(d_model=32, d_state=16, d_conv=3, seed=0, **torch_kwargs):
    torch.manual_seed(seed)
    ref = randomize_mvfuser_(TorchMVFuser(d_model, d_state, d_conv, **torch_kwargs),
                             torch.Generator().manual_seed(seed + 1))
    ours = MVFuser(d_model, d_state, d_conv, scan_backend="reference", rngs=nnx.Rngs(seed))
    load_torch_state_dict(ours, ref.state_dict())
    ours.eval()
    return ref.eval().double(), ours


def run_torch(ref, x):
    with torch.no_grad():
        return ref(torch.from_numpy(x).double()).numpy()


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------------------
# Sizes and initialisation
# ----------------------------------------------------------------------------------------
def n_params(module):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_full_size_parameter_count():
    abstract = nnx.eval_shape(lambda: MVFuser(1024, d_state=16, rngs=nnx.Rngs(0)))
    assert n_params(abstract) == 1_667_585
    assert n_params(abstract) == sum(p.numel() for p in TorchMVFuser(1024, 16).parameters())
    # and the same count as the torch restatement at a small size
    assert n_params(MVFuser(64, 16, rngs=nnx.Rngs(0))) == sum(
        p.numel() for p in TorchMVFuser(64, 16).parameters()
    )


def test_initialisation_follows_the_original():
    m = MVFuser(64, d_state=16, rngs=nnx.Rngs(3))
    half, dt_rank = 32, 4
    np.testing.assert_allclose(m.A_log[...], np.log(np.tile(np.arange(1, 17.0), (half, 1))), rtol=1e-6)
    np.testing.assert_array_equal(m.D[...], np.ones(half))
    np.testing.assert_array_equal(m.norm.weight[...], np.ones(half))
    assert float(m.scale[...]) == pytest.approx(1e-3) and m.scale[...].shape == ()
    dt = np.asarray(jax.nn.softplus(m.dt_proj.bias[...]))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert np.abs(np.asarray(m.dt_proj.kernel[...])).max() <= dt_rank**-0.5
    assert m.dt_proj.kernel[...].shape == (dt_rank, half)
    assert m.x_proj.kernel[...].shape == (half, dt_rank + 32)
    assert m.in_proj.bias is None and m.x_proj.bias is None and m.out_proj.bias is None


# ----------------------------------------------------------------------------------------
# Parity with the original
# ----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize(
    "d_model,d_state,d_conv,length",
    [(32, 16, 3, 23), (64, 16, 3, 37), (48, 8, 4, 20)],  # d_conv=4: uneven 'same' padding
)
def test_matches_torch_original(d_model, d_state, d_conv, length):
    ref, ours = make_pair(d_model, d_state, d_conv)
    x = inputs((2, length, d_model))
    want = run_torch(ref, x)
    got = ours(jnp.asarray(x))
    assert got.shape == x.shape and got.dtype == jnp.float32
    assert rel_err(got, want) < 1e-4


def test_state_dict_round_trips():
    ref, ours = make_pair(32)
    exported = torch_state_dict_of(ours)
    assert sorted(exported) == sorted(ref.state_dict())
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(exported[key], value.float().numpy(), rtol=1e-6, err_msg=key)


def test_trap_depthwise_convs_have_no_bias():
    # conv_bias // 2 == True // 2 == 0: the original has no conv bias parameter at all
    ref = TorchMVFuser(32, 16)
    assert ref.conv1d_x.bias is None and ref.conv1d_z.bias is None
    assert not any("conv1d" in k and k.endswith("bias") for k in ref.state_dict())
    assert ref.conv1d_x.weight.shape == (16, 1, 3)  # (C, 1, k): depthwise, groups = C
    ours = MVFuser(32, 16, rngs=nnx.Rngs(0))
    assert ours.conv1d_x.bias is None and ours.conv1d_z.bias is None
    assert ours.conv1d_x.kernel[...].shape == (3, 1, 16)
    # a checkpoint with a conv bias would not be ours: strict loading says so
    sd = dict(ref.state_dict())
    sd["conv1d_x.bias"] = torch.zeros(16)
    with pytest.raises(StateDictMismatchError, match="conv1d_x.bias"):
        load_torch_state_dict(ours, sd)


def test_trap_dt_bias_is_applied_twice():
    x = inputs((2, 29, 32), seed=5)
    twice, ours = make_pair(32, seed=7, dt_bias_twice=True)
    once, _ = make_pair(32, seed=7, dt_bias_twice=False)
    got = ours(jnp.asarray(x))
    assert rel_err(got, run_torch(twice, x)) < 1e-4  # about 3e-7
    assert rel_err(got, run_torch(once, x)) > 2e-3  # about 1e-2: far outside parity


def test_trap_norm_before_gate():
    x = inputs((2, 29, 32), seed=6)
    before, ours = make_pair(32, seed=8, norm_before_gate=True)
    after, _ = make_pair(32, seed=8, norm_before_gate=False)
    got = ours(jnp.asarray(x))
    assert rel_err(got, run_torch(before, x)) < 1e-4
    assert rel_err(got, run_torch(after, x)) > 1e-2
    # and the norm alone, against the formula in numpy
    rng = np.random.default_rng(0)
    y, z = rng.normal(size=(3, 5, 16)), rng.normal(size=(3, 5, 16))
    norm = RMSNormGated(16)
    norm.weight[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
    w = np.asarray(norm.weight[...], np.float64)
    want = y / np.sqrt((y**2).mean(-1, keepdims=True) + 1e-5) * w * (z / (1 + np.exp(-z)))
    np.testing.assert_allclose(norm(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32)), want,
                               rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_under_jit():
    _, ours = make_pair(32)
    x = jnp.asarray(inputs((2, 21, 32)))
    want = ours(x)
    ours16 = MVFuser(32, 16, scan_backend="reference", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(ours16, nnx.state(ours, nnx.Param))
    ours16.eval()
    got = nnx.jit(lambda m, v: m(v))(ours16, x)
    assert got.dtype == jnp.bfloat16
    assert ours16.A_log[...].dtype == jnp.float32  # parameters stay float32
    assert rel_err(got.astype(jnp.float32), want) < 3e-2


# ----------------------------------------------------------------------------------------
# Training behaviour
# ----------------------------------------------------------------------------------------
def test_dropout_train_vs_eval():
    m = MVFuser(32, 16, scan_backend="reference", rngs=nnx.Rngs(0))
    x = jnp.asarray(inputs((2, 17, 32)))
    m.train()
    a, b = m(x), m(x)
    assert not np.allclose(a, b)  # fresh masks per call
    # roughly 10% of outputs dropped to exactly zero
    assert 0.03 < float(jnp.mean(a == 0)) < 0.2
    m.eval()
    c, d = m(x), m(x)
    np.testing.assert_array_equal(c, d)
    assert float(jnp.mean(c == 0)) == 0.0
    kept = a != 0
    np.testing.assert_allclose(a[kept], c[kept] / 0.9, rtol=1e-5, atol=1e-7)


def test_gradients_reach_every_parameter():
    m = MVFuser(32, 16, scan_backend="reference", rngs=nnx.Rngs(1))
    m.train()
    x = jnp.asarray(inputs((2, 19, 32), seed=2))
    target = jnp.asarray(inputs((2, 19, 32), seed=3))

    def loss(module):
        return jnp.sum(module(x) * target)

    grads = nnx.jit(nnx.grad(loss))(m)
    flat = nnx.to_flat_state(grads)
    names = [".".join(map(str, path)) for path, _ in flat]
    assert len(names) == 11, names
    for path, g in flat:
        assert float(jnp.max(jnp.abs(g[...]))) > 0, f"no gradient for {path}"


def test_scan_backend_reaches_the_scan():
    m = MVFuser(32, 16, scan_backend="no-such-backend", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no-such-backend"):
        m(jnp.zeros((1, 4, 32)))
