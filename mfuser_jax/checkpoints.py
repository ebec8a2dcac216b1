"""Orbax checkpoints in W/checkpoints/<step>, in two formats with one writer each.

* Training (``save_checkpoint``): state {"params", "batch_stats", "opt_state"}, meta
  {"step", "data_position"}. A run resumes from it exactly: data are a pure function of
  (seed, step, process), so the step number is the data position.
* Model (``save_model_checkpoint``): state {"params", "batch_stats"}, meta {"step",
  "format": "model"}. What the release converter writes: evaluation and prediction need
  nothing more, and there are no optimizer moments to keep.

Both hold only what training changes (trainable params, batch statistics); the frozen
weights come from the config's converted encoders. ``restore_checkpoint`` (a trainer's whole
state; a model checkpoint gets a fresh optimizer state) and ``restore_model_state`` (params
and batch statistics only: the optimizer state of a training checkpoint is not read) take
either format.
"""

from __future__ import annotations

import os

import jax

from mfuser_jax.errors import UserError
from mfuser_jax.optim import pre_partition_layout
from mfuser_jax.trainer import Trainer, TrainState

MODEL_FORMAT = "model"


def checkpoint_manager(workdir: str, keep: int = 2, *, create: bool = True):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def _save(mngr, step: int, tree: dict, meta: dict) -> None:
    import orbax.checkpoint as ocp
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                            meta=ocp.args.JsonSave(meta)))


def save_checkpoint(mngr, state: TrainState) -> None:
    """The training format: the whole train state."""
    step = int(state.step)
    _save(mngr, step, state.tree(), {"step": step, "data_position": step})


def save_model_checkpoint(mngr, step: int, params: dict, batch_stats: dict) -> None:
    """The model format: trainable params and batch statistics (pure dicts), no optimizer."""
    _save(mngr, int(step), {"params": params, "batch_stats": batch_stats},
          {"step": int(step), "format": MODEL_FORMAT})


def _does_not_fit(mngr, step: int, detail: str) -> UserError:
    return UserError(f"checkpoint {mngr.directory}/{step} does not fit the model this config "
                     f"builds ({detail}); was it trained with another config?")


def _first_line(e: Exception) -> str:
    """The head of Orbax's (long) tree or shape diff."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _restore(mngr, step: int, target: dict, *, partial: bool = False) -> dict:
    import orbax.checkpoint as ocp
    if partial:  # only the entries of `target` are read
        args = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)
    else:
        args = ocp.args.StandardRestore(target)
    return dict(mngr.restore(step, args=ocp.args.Composite(state=args))["state"])


def read_meta(mngr, step: int) -> dict:
    import orbax.checkpoint as ocp
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def _restore_train_tree(mngr, step: int, target: dict) -> dict:
    try:
        return _restore(mngr, step, target)
    except ValueError as first:
        # Checkpoints written before the lr multipliers went through optax.partition have an
        # EmptyState where the PartitionState is now; neither holds arrays, so the arrays
        # are read by the same paths and the (array-free) new entry is put in.
        old = pre_partition_layout(target["opt_state"])
        if old is None:
            raise
        try:
            tree = _restore(mngr, step, {**target, "opt_state": old})
        except ValueError:
            raise first from None
        tree["opt_state"] = (*tree["opt_state"][:-1], target["opt_state"][-1])
        return tree


def restore_checkpoint(mngr, trainer: Trainer, step: int) -> TrainState:
    """The train state of checkpoint `step` (either format) on the trainer's shardings."""
    meta = read_meta(mngr, step)
    try:
        if meta.get("format") == MODEL_FORMAT:
            tree = _restore(mngr, step, trainer.model_tree())
            tree["opt_state"] = trainer.init_opt_state(tree["params"])
        else:
            tree = _restore_train_tree(mngr, step, trainer.abstract_tree())
    except ValueError as e:
        raise _does_not_fit(mngr, step, _first_line(e)) from None
    return TrainState(tree["params"], tree["batch_stats"], tree["opt_state"],
                      int(meta["step"]))


def restore_model_state(mngr, step: int, target: dict) -> dict:
    """{"params", "batch_stats"} of checkpoint `step` (either format) into `target`, their
    sharded shapes (SplitModel.model_tree())."""
    try:
        tree = _restore(mngr, step, target, partial=True)
    except ValueError as e:
        raise _does_not_fit(mngr, step, _first_line(e)) from None
    # a partial restore leaves what the checkpoint lacks as the target's shapes
    missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(tree)
               if isinstance(x, jax.ShapeDtypeStruct)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise _does_not_fit(mngr, step, f"it has no {', '.join(missing[:3])}{more}")
    return tree

