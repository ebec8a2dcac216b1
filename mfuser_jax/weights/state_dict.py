"""Fill an NNX module from a PyTorch state dict named as in the original code.

Our modules mirror the PyTorch attribute names, so a state-dict key maps to a parameter
path by rule, not by a per-model table: the type of the NNX submodule that owns the
parameter decides the rename and the layout change (Linear weight -> kernel transposed,
Conv weight -> kernel with channels last, norm weight -> scale, ...). Raw ``nnx.Param``
attributes (cls_token, A_log, in_proj_weight, ...) keep the PyTorch name and layout.
Per-format renames (HF transformers, TorchScript, in the per-model converters of this
package) turn other naming schemes into the original one before this loader runs. Stacked
layers are read and written under their per-layer names (``models.stack``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from mfuser_jax.nn.stack import Slot, assign_slots, iter_layer_modules
from mfuser_jax.errors import StateDictMismatchError

__all__ = ["LOADED", "StateDictMismatchError", "load_torch_state_dict", "torch_state_dict_of"]

# The variables load_torch_state_dict fills (with strict=True, every one of the module's):
# a module built only to be loaded need not compute them (models.factory.compute_values).
# A class tuple: both an isinstance test and an nnx filter.
LOADED = (nnx.Param, nnx.BatchStat)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


# (torch suffix, flax attribute, torch array -> flax array, flax shape -> torch shape)
_Rule = tuple[str, str, Callable[[np.ndarray], np.ndarray], Callable[[tuple], tuple]]
_identity = lambda a: a  # noqa: E731
_same_shape = lambda s: tuple(s)  # noqa: E731


def _conv_rules() -> list[_Rule]:
    # torch Conv weight (O, I/g, *k) <-> flax kernel (*k, I/g, O)
    def to_flax(w):
        return np.moveaxis(w, (0, 1), (-1, -2))

    def torch_shape(s):
        return (s[-1], s[-2], *s[:-2])

    return [("weight", "kernel", to_flax, torch_shape), ("bias", "bias", _identity, _same_shape)]


def _conv_transpose_rules() -> list[_Rule]:
    # torch ConvTranspose weight (I, O, *k) computes a gradient-of-conv, i.e. a correlation
    # with the spatially flipped kernel; nnx.ConvTranspose (transpose_kernel=False) does
    # not flip, so flip here. Kernel layout (*k, I, O).
    def to_flax(w):
        k = np.moveaxis(w, (0, 1), (-2, -1))
        return k[tuple(slice(None, None, -1) for _ in range(w.ndim - 2))]

    def torch_shape(s):
        return (s[-2], s[-1], *s[:-2])

    return [("weight", "kernel", to_flax, torch_shape), ("bias", "bias", _identity, _same_shape)]


_NORM_RULES: list[_Rule] = [
    ("weight", "scale", _identity, _same_shape),
    ("bias", "bias", _identity, _same_shape),
]


def _rules_for(module: nnx.Module) -> list[_Rule] | None:
    if isinstance(module, nnx.Linear):
        return [
            ("weight", "kernel", lambda w: w.T, lambda s: (s[1], s[0])),
            ("bias", "bias", _identity, _same_shape),
        ]
    if isinstance(module, nnx.ConvTranspose):
        return _conv_transpose_rules()
    if isinstance(module, nnx.Conv):
        return _conv_rules()
    if isinstance(module, nnx.BatchNorm):
        return _NORM_RULES + [
            ("running_mean", "mean", _identity, _same_shape),
            ("running_var", "var", _identity, _same_shape),
        ]
    if isinstance(module, (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)):
        return _NORM_RULES
    if isinstance(module, nnx.Embed):
        return [("weight", "embedding", _identity, _same_shape)]
    return None


# Buffers PyTorch stores that carry no learned state for us.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def _join(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _targets(module: nnx.Module):
    """Yield (torch_key, slot, to_flax, torch_shape) for every Param/BatchStat of module.

    Stacked layers (``models.stack.LayerStack``) appear once per layer under the original's
    per-layer names; the slot is that layer's slice of the stacked variable."""
    for path, sub, index in iter_layer_modules(module):
        rules = _rules_for(sub)
        handled = set()
        if rules is not None:
            for torch_name, attr, to_flax, torch_shape in rules:
                var = getattr(sub, attr, None)
                if isinstance(var, nnx.Variable) and var.get_value() is not None:
                    handled.add(attr)
                    slot = Slot(var, index)
                    yield _join(path + (torch_name,)), slot, to_flax, torch_shape(slot.shape)
        # Raw variables owned directly by this module keep their PyTorch name and layout.
        for attr, var in vars(sub).items():
            if attr in handled or not isinstance(var, LOADED):
                continue
            slot = Slot(var, index)
            yield _join(path + (attr,)), slot, _identity, slot.shape


def load_torch_state_dict(
    module: nnx.Module,
    state_dict: Mapping[str, Any],
    strict: bool = True,
    *,
    module_name: str | None = None,
) -> nnx.Module:
    """Copy ``state_dict`` (numpy arrays or torch tensors) into ``module`` in place.

    Keys are named as in the original PyTorch module. With ``strict`` every parameter must
    be present and every key consumed; all missing, unexpected and mis-shaped keys are
    reported together in one ``StateDictMismatchError``. Non-strict loading still refuses
    mis-shaped keys. Values keep the dtype of the module's parameters. Returns ``module``.
    """
    name = module_name or type(module).__name__
    state_dict = {
        k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)
    }
    missing, mismatched, assignments = [], [], []
    seen = set()
    for key, slot, to_flax, torch_shape in _targets(module):
        seen.add(key)
        if key not in state_dict:
            missing.append(key)
            continue
        array = _to_numpy(state_dict[key])
        if tuple(array.shape) != tuple(torch_shape):
            mismatched.append((key, torch_shape, array.shape))
            continue
        assignments.append((slot, to_flax(array)))
    unexpected = sorted(set(state_dict) - seen)
    if mismatched or (strict and (missing or unexpected)):
        raise StateDictMismatchError(
            missing if strict else (), unexpected if strict else (), mismatched, name
        )
    assign_slots(assignments)
    return module


def torch_state_dict_of(module: nnx.Module) -> dict[str, np.ndarray]:
    """The inverse mapping: the module's parameters as a PyTorch-named state dict.

    Used to export, and by tests to check that a mapping round-trips. Layout changes are
    inverted by checking them on the forward rule (each rule is a pure axis permutation
    or flip, so applying it to an index grid gives the inverse permutation).
    """
    out = {}
    for key, slot, to_flax, torch_shape in _targets(module):
        flat_index = np.arange(int(np.prod(torch_shape))).reshape(torch_shape)
        mapped = to_flax(flat_index)
        value = slot.get()
        torch_value = np.empty(int(np.prod(torch_shape)), dtype=value.dtype)
        torch_value[mapped.reshape(-1)] = value.reshape(-1)
        out[key] = torch_value.reshape(torch_shape)
    return out
