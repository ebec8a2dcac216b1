"""A model split into what training changes and the rest (``SplitModel``), and the train
state: what evaluation, prediction and export restore into and checkpoints hold, without the
training step (``trainer.py``) or an optimizer.

The state that changes during training is kept as plain nested dicts (trainable params,
batch statistics, optax state): that is what the optimizer sees and what Orbax stores. They
go back into the model's ``nnx.State`` by path (``nnx.replace_by_pure_dict``). Frozen params
and other model variables ("the rest") are rebuilt from the config (and the converted
pretrained weights) on every start, so a checkpoint holds only what training changed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from mfuser_jax import sharding as shd
from mfuser_jax.model.factory import trainable

__all__ = ["SplitModel", "TrainState", "abstract_like", "split_model",
           "trained_state"]


@dataclasses.dataclass
class TrainState:
    params: dict
    batch_stats: dict
    opt_state: Any
    step: int

    def tree(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats,
                "opt_state": self.opt_state}


def _shapes(state: nnx.State) -> nnx.State:
    """`state`'s Variables holding only shapes: a template that keeps no arrays alive and
    cannot silently stand in for a missing value."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)


def _with_values(template: nnx.State, values: dict) -> nnx.State:
    """A new nnx.State of `template`'s Variables (types, metadata) holding `values` (a
    pure dict), matched by path; `template` itself is left as it was."""
    state = nnx.from_flat_state(nnx.to_flat_state(template))
    nnx.replace_by_pure_dict(state, values)
    return state


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """(graphdef, trainable params, batch statistics, the rest) of `model`."""
    return nnx.split(model, trainable(model), nnx.BatchStat, ...)


def trained_state(model: nnx.Module) -> tuple[dict, dict]:
    """What training changes in `model` as pure dicts, the way checkpoints hold it:
    (trainable params, batch statistics)."""
    _, params, batch_stats, _ = split_model(model)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def abstract_like(x, sharding):
    """The shape and dtype of ``x`` with ``sharding``: what a checkpoint restores into."""
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


class SplitModel:
    """A model split into its trainable params, its batch statistics (both as pure dicts)
    and the rest, which is placed on the mesh (FSDP for large arrays with
    config.sharding.fsdp_min_size). Evaluation restores into it without an optimizer."""

    def __init__(self, config: Any, model: nnx.Module, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        self.model = model
        self.graphdef, params, batch_stats, rest = split_model(model)
        self._templates = _shapes(params), _shapes(batch_stats)
        self.init_params = nnx.to_pure_dict(params)
        self.init_batch_stats = nnx.to_pure_dict(batch_stats)
        fsdp = int(config.get("sharding", {}).get("fsdp_min_size", 0))
        self.rest_shardings = shd.tree_shardings(rest, mesh, fsdp_min_size=fsdp)
        # An abstract model (nnx.eval_shape) only lowers and compiles the step: see lower().
        self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(rest))
        if self.abstract:
            self.rest = rest
        else:
            self.rest = shd.put_global(rest, self.rest_shardings)
            nnx.update(model, self.rest)  # drop the unplaced copy of the frozen weights
        self.param_shardings = shd.tree_shardings(self.init_params, mesh)
        self.bs_shardings = shd.tree_shardings(self.init_batch_stats, mesh)

    def num_params(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.init_params))
        n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
            nnx.state(self.model, nnx.Param)))
        return n_train, n_all

    def model_tree(self) -> dict:
        """{"params", "batch_stats"} as sharded shapes: what a checkpoint restores into."""
        return {"params": jax.tree.map(abstract_like, self.init_params, self.param_shardings),
                "batch_stats": jax.tree.map(abstract_like, self.init_batch_stats, self.bs_shardings)}

    def merge(self, params: dict, batch_stats: dict, rest: nnx.State) -> nnx.Module:
        """A new module from pure-dict params and batch statistics and `rest` (traceable;
        fresh Variables, so a loss may advance RNG counts)."""
        p_tmpl, b_tmpl = self._templates
        return nnx.merge(self.graphdef, _with_values(p_tmpl, params),
                         _with_values(b_tmpl, batch_stats), rest, copy=True)

    def write_back(self, params: dict, batch_stats: dict) -> nnx.Module:
        """Writes trained params and batch statistics into the host model; returns it."""
        p_tmpl, b_tmpl = self._templates
        nnx.update(self.model, _with_values(p_tmpl, params),
                   _with_values(b_tmpl, batch_stats))
        return self.model
