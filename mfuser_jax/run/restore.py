"""A workdir's trained model: ``restore_model`` builds the model of the config (the frozen
encoders from W/pretrained or the config's converted files) and fills its trained state from
W/checkpoints/<step>, verified first (checkpoints.py's manifest); no optimizer is built.
Evaluation, prediction, export and the interactive page restore through it; none of them
imports the training job (run/train.py).
"""

from __future__ import annotations

import os
from typing import Any

from flax import nnx

from mfuser_jax import sharding as shd
from mfuser_jax.checkpoints import (DamagedCheckpoint, checkpoint_manager, first_line,
                                    restore_model_state, unreadable)
from mfuser_jax.errors import UserError
from mfuser_jax.model import factory
from mfuser_jax.process import apply_matmul_precision, check_config, use_compile_cache
from mfuser_jax.model_state import SplitModel
from mfuser_jax.workdir import check_workdir_model

__all__ = ["WORKDIR_PRETRAINED", "build_and_load", "restore_model"]


WORKDIR_PRETRAINED = "pretrained"


def build_and_load(config: Any, workdir: str | None = None, *,
                   skip_checkpointed: bool = False) -> nnx.Module:
    """The model with its frozen encoders loaded. A workdir holding its own converted
    encoders (W/pretrained, written when a released MFuser checkpoint is converted) uses
    them, so a converted model can never be evaluated with other frozen towers.
    `skip_checkpointed`: what a checkpoint holds is left abstract (restore_model fills it)."""
    check_config(config)
    apply_matmul_precision(config)
    own = os.path.join(workdir, WORKDIR_PRETRAINED) if workdir else None
    path = own if own and os.path.isdir(own) else factory.check_pretrained(config)
    if path is not None and path != config.model.get("pretrained"):
        # the model reads files beside its weights from there (SigLIP's spiece.model)
        config = config.copy_and_resolve_references()
        config.model.pretrained = path
    model = factory.create_model(config, skip_checkpointed=skip_checkpointed)
    factory.load_pretrained(model, path)
    return model


def restore_model(config: Any, workdir: str, step: int | None = None
                  ) -> tuple[nnx.Module, int]:
    """The model with the trained state of W/checkpoints/<step> (default latest): a training
    or a model checkpoint (checkpoints.py); no optimizer is built."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    hint = "train first: python scripts/train.py --config C --workdir W"
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"no checkpoints in {ckpt_dir}\n{hint}")
    check_workdir_model(config, workdir)
    use_compile_cache(config, workdir)
    mngr = checkpoint_manager(workdir, None, create=False)
    try:
        steps = sorted(mngr.all_steps())
        if not steps:
            raise UserError(f"no checkpoints in {ckpt_dir}\n{hint}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise UserError(f"no checkpoint for step {step} in {ckpt_dir} "
                            f"(available: {', '.join(map(str, steps))})")
        try:
            mngr.verify(step)  # before building anything
        except DamagedCheckpoint as e:
            raise _refuse_damaged(mngr, step, e.reason) from None
        # the trained state is the checkpoint's: not computed from its initialisers first
        # (at full size, most of a restore's compile time)
        split = SplitModel(config, build_and_load(config, workdir, skip_checkpointed=True),
                           shd.make_mesh(config.get("mesh", None)))
        try:
            tree = restore_model_state(mngr, step, split.model_tree())
        except Exception as e:
            if not unreadable(e):
                raise
            raise _refuse_damaged(mngr, step, f"Orbax cannot read it: {first_line(e)}"
                                  ) from None
    finally:
        mngr.close()
    model = split.write_back(tree["params"], tree["batch_stats"])
    factory.require_concrete(model, f"the model restored from {mngr.step_path(step)}")
    return model, step


def _refuse_damaged(mngr, step: int, reason: str) -> UserError:
    """Evaluation never falls back on its own (a score must name its checkpoint): it names
    the damaged one and those that verify."""
    intact = mngr.intact_steps(exclude=step)
    choice = (f"intact: {', '.join(map(str, intact))} (choose one with --step N)" if intact
              else "no intact checkpoint there")
    return UserError(f"checkpoint {mngr.step_path(step)} is damaged ({reason}); {choice}")
