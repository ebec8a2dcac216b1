"""Shared building blocks that re-express a Flax layer for speed must compute the same thing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mfuser_jax.models.layers import DepthwiseConv1d, TiledConvTranspose, torch_conv_transpose


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_tiled_conv_transpose_equals_the_convolution_and_its_gradients(dtype, tol):
    tiled = torch_conv_transpose(6, 5, 2, stride=2, dtype=dtype, rngs=nnx.Rngs(0))
    assert isinstance(tiled, TiledConvTranspose)
    conv = nnx.ConvTranspose(6, 5, (2, 2), strides=(2, 2), padding="VALID", dtype=dtype,
                             rngs=nnx.Rngs(1))
    nnx.update(conv, nnx.state(tiled))  # same kernel and bias
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 6)), jnp.float32)

    def loss(layer, x):  # the weights make every output element's gradient distinct
        y = layer(x).astype(jnp.float32)
        return jnp.sum(y * jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size)

    assert tiled(x).shape == conv(x).shape == (2, 6, 8, 5)
    np.testing.assert_allclose(np.asarray(tiled(x), np.float32), np.asarray(conv(x), np.float32),
                               rtol=tol, atol=tol)
    grad = nnx.grad(loss, argnums=(0, 1))
    (g_tiled, gx_tiled), (g_conv, gx_conv) = grad(tiled, x), grad(conv, x)
    for a, b in zip(jax.tree.leaves(nnx.state(g_tiled)) + [gx_tiled],
                    jax.tree.leaves(nnx.state(g_conv)) + [gx_conv]):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)


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

    def loss(layer, x):
        y = layer(x).astype(jnp.float32)
        return jnp.sum(y * jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) / y.size)

    np.testing.assert_allclose(np.asarray(shifted(x), np.float32),
                               np.asarray(conv(x), np.float32), rtol=tol, atol=tol)
    grad = nnx.grad(loss, argnums=(0, 1))
    (g_shifted, gx_shifted), (g_conv, gx_conv) = grad(shifted, x), grad(conv, x)
    for a, b in zip(jax.tree.leaves(nnx.state(g_shifted)) + [gx_shifted],
                    jax.tree.leaves(nnx.state(g_conv)) + [gx_conv]):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)
