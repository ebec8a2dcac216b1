"""Stacked layers: scan == a plain loop over the same layers, grouped outputs, per-layer names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mfuser_jax.weights.state_dict import load_torch_state_dict, torch_state_dict_of
from mfuser_jax.nn.stack import LayerStack, emit_group, scan_layers


class _Tower(nnx.Module):
    def __init__(self, n, width, rngs):
        self.blocks = LayerStack(lambda r: nnx.Linear(width, width, rngs=r), n, rngs=rngs)
        self.head = nnx.Linear(width, 2, rngs=rngs)


def _loop(stack, x, indices):
    """The reference: each layer on its own (LayerStack[i] is an unstacked copy)."""
    outs = []
    for i in range(len(stack)):
        x = jnp.tanh(stack[i](x))
        if i in indices:
            outs.append(x)
    return x, outs


@pytest.mark.parametrize("remat,unroll", [(False, False), (True, False), (False, True)])
def test_scan_emits_after_the_chosen_layers(remat, unroll):
    tower = _Tower(6, 8, nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.float32)
    indices = (1, 3, 5)
    group = emit_group(indices, 6)
    assert group == 2 and emit_group((7, 11, 15, 23), 24) == 4 and emit_group((0, 2), 4) == 1

    def run(x):
        return scan_layers(lambda layers, t, _: jnp.tanh(layers[0](t)), (tower.blocks,), x,
                           remat=remat, unroll=unroll, group=group, emit=lambda t: t)

    last, maps = jax.jit(run)(x)
    want_last, want_maps = _loop(tower.blocks, x, indices)
    np.testing.assert_allclose(last, want_last, rtol=1e-6, atol=1e-6)
    assert maps.shape == (3, 3, 8)
    for got, want in zip(maps, want_maps):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # gradients flow into every layer's slice of the stacked parameters
    graphdef, state = nnx.split(tower)

    def loss(state):
        t = nnx.merge(graphdef, state)
        out, _ = scan_layers(lambda layers, v, _: jnp.tanh(layers[0](v)), (t.blocks,), x,
                             remat=remat, unroll=unroll)
        return jnp.sum(out ** 2)

    g = jax.grad(loss)(state)
    assert np.all(np.abs(np.asarray(g["blocks"]["layers"]["kernel"][...])).sum(axis=(1, 2)) > 0)


@pytest.mark.parametrize("remat,unroll", [(False, False), (True, False), (False, True)])
def test_scan_collects_per_layer_outputs_in_layer_order(remat, unroll):
    stack = LayerStack(lambda r: nnx.Linear(4, 4, rngs=r), 6, rngs=nnx.Rngs(1))
    inputs = jnp.stack([jnp.full((2, 4), float(j + 1)) for j in range(3)])  # one per level

    def body(layers, carry, level):  # the mask decoder's pattern: a level per layer
        carry = jnp.tanh(layers[0](carry) + inputs[level])
        return carry, carry.sum()

    x = jnp.ones((2, 4))
    levels = jnp.arange(6) % 3
    carry, ys = jax.jit(lambda x: scan_layers(body, (stack,), x, levels, remat=remat,
                                              unroll=unroll, outputs=True))(x)
    manual, want = x, []
    for i in range(6):
        manual, y = body((stack[i],), manual, i % 3)
        want.append(y)
    np.testing.assert_allclose(carry, manual, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ys, np.stack(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="emit or outputs"):
        scan_layers(body, (stack,), x, levels, outputs=True, emit=lambda t: t)


def test_per_layer_names_round_trip():
    """Stacking is internal: state dicts use blocks.N.* and load back slice by slice."""
    tower = _Tower(3, 4, nnx.Rngs(2))
    sd = torch_state_dict_of(tower)
    assert sorted(sd) == sorted([f"blocks.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
                                + ["head.weight", "head.bias"])
    np.testing.assert_array_equal(sd["blocks.1.weight"],
                                  np.asarray(tower.blocks.layers.kernel[...][1]).T)
    other = _Tower(3, 4, nnx.Rngs(3))
    load_torch_state_dict(other, sd)
    for a, b in zip(jax.tree.leaves(nnx.state(other)), jax.tree.leaves(nnx.state(tower))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(IndexError):
        tower.blocks[3]
