"""Stacked layers: one module whose parameters carry a leading layer axis, run by ``lax.scan``.

Why: the fused backbone runs 24 x (VLM block, DINOv2 block, MVFuser); the decoders 6 and 9
identical layers. Unrolled in Python, XLA compiles every layer separately (minutes at full
size) and ignores ``jax.checkpoint`` around each layer, so the backward keeps every layer's
activations. Stacked and scanned, the body compiles once and rematerialisation works: only
the residual stream is kept between layers.

The stacking is an internal layout. ``iter_layer_modules`` presents the model as the
original PyTorch code names it (``transformer.resblocks.N.*``, ``blocks.N.*``,
``adapter.N.*``): weight conversion, the converted-encoder checkpoint and released
checkpoints all read and write per-layer names, each mapped to a slice of a stacked array.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["DropPath", "dropout_stream", "LayerStack", "Slot", "assign_slots", "emit_group", "iter_layer_modules",
           "per_layer_params",
           "scan_layers", "stack_prefixes"]


class LayerStack(nnx.Module):
    """``num_layers`` structurally identical layers built by ``make_layer(rngs)``.

    The constructor is vmapped over split parameter keys, so every parameter gets a leading
    axis of size ``num_layers`` and one graph describes all layers. ``make_layer`` receives
    an ``nnx.Rngs`` with a ``params`` stream only: a stacked layer holds no RNG state and
    gets its dropout keys as call arguments (see ``scan_layers``' ``xs``).
    """

    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
                 rngs: nnx.Rngs):
        if num_layers < 1:
            raise ValueError(f"a LayerStack needs at least one layer, got {num_layers}")
        self.num_layers = int(num_layers)
        keys = jax.random.split(rngs.params(), self.num_layers)
        self.layers = nnx.vmap(lambda k: make_layer(nnx.Rngs(params=k)),
                               in_axes=0, out_axes=0)(keys)

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, index: int) -> nnx.Module:
        """Layer ``index`` as a module of its own: a copy with unstacked parameters (for
        stepping, tests and inspection; writing to it leaves the stack unchanged)."""
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(f"layer {index} of a {self.num_layers}-layer stack")
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: _take(a, index), state))

    def __iter__(self):
        return (self[i] for i in range(self.num_layers))


def _take(a, i):
    if isinstance(a, jax.ShapeDtypeStruct):  # an abstract (eval_shape) model
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return a[i]


def _index(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def scan_layers(body: Callable, stacks: Sequence[LayerStack], carry, xs=None, *,
                remat: bool = False, unroll: bool = False, group: int | None = None,
                emit: Callable | None = None, outputs: bool = False):
    """Run ``carry = body(layers, carry, x)`` over the layers of ``stacks`` in step.

    ``layers`` is a tuple with layer i of every stack; ``x`` is slice i of ``xs`` (a pytree
    with leading axis num_layers, or None). With ``outputs``, ``body`` returns
    ``(carry, y)`` and the ys of all layers come back stacked. With ``emit``, ``emit(carry)``
    is collected after every ``group`` layers (stacked on a new leading axis): a scan over
    groups of an inner scan over layers, so outputs taken between layers (the backbone's
    feature maps) need no per-layer buffer. ``remat`` recomputes each layer in the backward
    pass and keeps only the carry. ``unroll`` runs a Python loop over the same stacked
    parameters instead (the pre-scan program: every layer traced and compiled separately;
    for comparisons). Returns ``(carry, ys)``; ``ys`` is None without ``emit`` or ``outputs``.
    """
    n = len(stacks[0])
    if any(len(s) != n for s in stacks):
        raise ValueError(f"stacks of different depths: {[len(s) for s in stacks]}")
    if outputs and emit is not None:
        raise ValueError("give emit or outputs, not both")
    group = n if group is None else int(group)
    if group < 1 or n % group:
        raise ValueError(f"group {group} does not divide {n} layers")
    graphdefs, states = zip(*(nnx.split(s.layers) for s in stacks))

    def step(carry, sliced):
        layer_states, x = sliced
        layers = tuple(nnx.merge(g, s) for g, s in zip(graphdefs, layer_states))
        out = body(layers, carry, x)
        return out if outputs else (out, None)

    if remat:
        step = jax.checkpoint(step, prevent_cse=False,
                              policy=jax.checkpoint_policies.nothing_saveable)
    per_layer = (tuple(states), xs)
    stack_ys = lambda ys: jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys else None  # noqa: E731
    if unroll:
        ys = []
        for i in range(n):
            carry, y = step(carry, _index(per_layer, i))
            if outputs:
                ys.append(y)
            elif emit is not None and (i + 1) % group == 0:
                ys.append(emit(carry))
        return carry, stack_ys(ys)
    if emit is None:
        return jax.lax.scan(step, carry, per_layer)
    # (n, ...) -> (n / group, group, ...): a reshape of the leading axis, no copy.
    grouped = jax.tree.map(lambda a: a.reshape(n // group, group, *a.shape[1:]), per_layer)

    def outer(carry, group_slice):
        carry, _ = jax.lax.scan(step, carry, group_slice)
        return carry, emit(carry)

    return jax.lax.scan(outer, carry, grouped)


def emit_group(indices: Sequence[int], num_layers: int) -> int:
    """The largest group size g such that every layer in ``indices`` ends a group of g."""
    return math.gcd(num_layers, *(int(i) + 1 for i in indices))


# ---------------------------------------------------------------------- per-layer view


class Slot:
    """One variable, or one layer's slice of a stacked variable."""

    __slots__ = ("variable", "index")

    def __init__(self, variable: nnx.Variable, index: int | None):
        self.variable, self.index = variable, index

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.variable.get_value().shape)
        return shape if self.index is None else shape[1:]

    @property
    def dtype(self):
        return self.variable.get_value().dtype

    def get(self) -> np.ndarray:
        value = np.asarray(self.variable.get_value())
        return value if self.index is None else value[self.index]


def assign_slots(assignments: Sequence[tuple[Slot, Any]]) -> None:
    """Write arrays into slots; the slices of one stacked variable are written together."""
    by_variable: dict[int, tuple[nnx.Variable, list]] = {}
    for slot, array in assignments:
        by_variable.setdefault(id(slot.variable), (slot.variable, []))[1].append(
            (slot.index, array))
    for variable, items in by_variable.values():
        dtype = variable.get_value().dtype
        if len(items) == 1 and items[0][0] is None:
            variable.set_value(jnp.asarray(items[0][1], dtype=dtype))
            continue
        current = variable.get_value()
        if isinstance(current, jax.ShapeDtypeStruct):  # an abstract model being filled
            if len({i for i, _ in items}) != current.shape[0]:
                raise ValueError("an abstract stacked variable must be filled in every layer")
            value = np.zeros(current.shape, current.dtype)
        else:
            value = np.array(current)  # a writable host copy
        for index, array in items:
            value[index] = np.asarray(array, dtype=value.dtype)
        variable.set_value(jnp.asarray(value, dtype=dtype))


def stack_prefixes(root: nnx.Module) -> set[tuple[str, ...]]:
    """Paths (as strings) under which every variable is stacked: each LayerStack's layers."""
    return {tuple(str(p) for p in path) + ("layers",)
            for path, m in nnx.iter_modules(root) if isinstance(m, LayerStack)}


def iter_layer_modules(root: nnx.Module) -> Iterator[tuple[tuple, nnx.Module, int | None]]:
    """Every submodule of ``root`` as ``(path, module, index)`` under the original's names.

    A ``LayerStack`` at path P contributes its layer modules once per layer, at P + (i,)
    with ``index`` i (variables of the module are then read at ``[i]``); attributes that a
    module lists in ``flatten_children`` vanish from paths (the fused backbone's ``vlm``
    tower, whose parameters the original keeps at the backbone's top level).
    """
    modules = list(nnx.iter_modules(root))
    stacks: dict[tuple, int] = {}
    flattened: set[tuple] = set()
    for path, module in modules:
        path = tuple(path)
        if isinstance(module, LayerStack):
            stacks[path + ("layers",)] = module.num_layers
        for name in getattr(type(module), "flatten_children", ()):
            flattened.add(path + (name,))
    for path, module in modules:
        path = tuple(path)
        stack = next((p for p in stacks if path[:len(p)] == p), None)
        for index in (None,) if stack is None else range(stacks[stack]):
            out = []
            for k in range(len(path)):
                prefix = path[:k + 1]
                if prefix in flattened:
                    continue
                out.append(index if prefix == stack else path[k])
            yield tuple(out), module, index


def per_layer_params(root: nnx.Module, keep: Callable[[tuple], bool] = lambda p: True
                     ) -> dict[tuple, Slot]:
    """``{per-layer path (strings): Slot}`` for every ``nnx.Param`` whose per-layer path
    passes ``keep`` — the layout-independent view the encoder checkpoints are written in."""
    out = {}
    for path, module, index in iter_layer_modules(root):
        for attr, var in vars(module).items():
            if isinstance(var, nnx.Param):
                full = tuple(str(p) for p in path + (attr,))
                if keep(full):
                    out[full] = Slot(var, index)
    return out


def dropout_stream(rngs: nnx.Rngs):
    """The stream a Dropout would draw from (``dropout``, else ``default``), or None: a
    layer built inside a ``LayerStack`` has neither and takes its keys per call."""
    try:
        return rngs["dropout"]
    except (KeyError, AttributeError):
        return None


class DropPath(nnx.Module):
    """Stochastic depth: a residual branch kept with probability 1 - rate, scaled by 1/keep.

    The mask covers every axis except ``broadcast_dims`` (DINOv2: per sample; MFuser's CLIP
    blocks: per token position, see clip.py). Layers of a stack differ in rate, so the rate
    and the key can come with the call; without them the module's own ``rate`` and its
    ``dropout`` stream (when built with one) are used. ``eval()`` turns it off.
    """

    def __init__(self, rate: float, *, broadcast_dims: Sequence[int], rngs: nnx.Rngs):
        self.rate = float(rate)
        self.broadcast_dims = tuple(broadcast_dims)
        self.deterministic = False
        stream = dropout_stream(rngs)
        self.rngs = stream.fork() if stream is not None else nnx.data(None)

    def __call__(self, x: jax.Array, *, rate=None, key=None) -> jax.Array:
        rate = self.rate if rate is None else rate
        if self.deterministic or (isinstance(rate, float) and rate == 0.0):
            return x
        if key is None:
            if self.rngs is None:
                raise ValueError("DropPath in train mode needs a key (a stacked layer gets "
                                 "its keys from the caller) or a 'dropout' stream")
            key = self.rngs()
        keep = 1.0 - rate
        shape = [1 if d in self.broadcast_dims else s for d, s in enumerate(x.shape)]
        mask = jax.random.bernoulli(key, keep, shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
