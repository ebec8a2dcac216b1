"""Released MFuser (CLIP variant) checkpoints -> the JAX ``MFuser``.

The original (devinxzhang/MFuser, models/segmentors/mfuser_clip.py) is an mmseg segmentor
saved by mmcv as ``{"state_dict": {...}, "meta": {...}}``. Its top-level attributes are
backbone (CLIP image tower + ``dinov2`` + MVFuser adapters + FPN), text_encoder,
context_decoder, contexts, gamma and decode_head — the same names as ``MFuser``, so every
key maps by the generic rule of ``load_torch_state_dict``. Two groups of keys carry no
state for us and are dropped explicitly:

* ``identity_head.*``: mmseg's IdentityHead passes the score map through; its ``conv_seg``
  (a 1x1 conv of a 1-channel map, only present in mmseg versions that do not set it to
  None) never runs. ``identity_head.loss_decode.*`` would be loss buffers.
* ``*.num_batches_tracked``: BatchNorm's step counter (momentum is fixed in both codes).

Anything else that does not fit is reported, with every missing, unexpected and mis-shaped
key in one ``StateDictMismatchError``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from mfuser_jax.convert.state_dict import load_torch_state_dict
from mfuser_jax.convert.torch_io import WeightFileError, _flatten, _import_torch

__all__ = ["DROPPED_PREFIXES", "check_is_mfuser", "checkpoint_step", "convert_mfuser_checkpoint",
           "frozen_encoder_tree", "load_mfuser_checkpoint", "read_mfuser_checkpoint",
           "save_frozen_encoders"]

# Keys of a released checkpoint that hold nothing the JAX model uses (see the docstring).
DROPPED_PREFIXES = ("identity_head.",)


def read_mfuser_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """(flat state dict of numpy arrays, mmcv ``meta`` dict or {}) from a released .pth."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"{path}: no such file")
    torch = _import_torch(path)
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            # mmcv pickles its meta (config text, class names, numpy scalars): retry without
            # the weights-only guard, as torch_io does; the user chose to convert this file.
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise WeightFileError(f"{path}: not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from e
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{path}: expected an mmseg checkpoint dict, found a "
                              f"{type(obj).__name__}")
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    tree = obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj
    state = _flatten(tree)
    if not state:
        raise WeightFileError(f"{path}: the file holds no tensors")
    # DataParallel / DDP wrappers prefix every key with "module."
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, dict(meta)


def check_is_mfuser(state_dict: Mapping[str, Any], source: str) -> None:
    """A cheap early refusal of files that are not MFuser segmentors (before any build)."""
    if not any(k.startswith("backbone.") for k in state_dict) or not any(
            k.startswith("decode_head.") for k in state_dict):
        raise WeightFileError(
            f"{source}: no 'backbone.*' and 'decode_head.*' keys: not an MFuser segmentor "
            "checkpoint (for the DINOv2 and CLIP encoder files use --dinov2/--clip instead "
            "of --mfuser)")


def load_mfuser_checkpoint(model: nnx.Module, state_dict: Mapping[str, Any], *,
                           source: str = "the MFuser checkpoint") -> dict[str, int]:
    """Strictly copy a released MFuser_CLIP state dict into ``model`` (an ``MFuser``).

    Every parameter and BatchNorm statistic of the model must be present with the original
    PyTorch shape and every key must be consumed, except the documented ``identity_head.*``
    and ``num_batches_tracked`` entries. Raises ``StateDictMismatchError`` listing all
    problems. Returns counts: {"loaded": n keys loaded, "dropped": n identity_head keys}.
    """
    check_is_mfuser(state_dict, source)
    kept = {k: v for k, v in state_dict.items() if not k.startswith(DROPPED_PREFIXES)}
    dropped = len(state_dict) - len(kept)
    load_torch_state_dict(model, kept, strict=True, module_name=f"MFuser from {source}")
    n_ignored = sum(k.endswith("num_batches_tracked") for k in kept)
    return {"loaded": len(kept) - n_ignored, "dropped": dropped}


def frozen_encoder_tree(model: nnx.Module) -> dict:
    """The frozen towers of ``model`` as the nested tree the converted-encoder checkpoint
    (mfuser_jax.convert.pretrained) stores: {"backbone": {...}, "text_encoder": {...}}.

    The trainer's checkpoints hold only the trainable parameters; the frozen ones come from
    ``config.model.pretrained``. A converted release brings its own frozen towers, written
    in that format so ``load_pretrained_encoders`` fills them.
    """
    frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(model.trainable_filter)))
    tree = frozen.to_pure_dict()
    extra = sorted(set(tree) - {"backbone", "text_encoder"})
    if extra:  # the encoder format has no place for them; the trainer would lose them
        raise ValueError(f"frozen parameters outside the encoders: {extra}")
    return tree


def save_frozen_encoders(model: nnx.Module, path: str) -> None:
    """Write ``model``'s frozen towers in the converted-encoder format at ``path``."""
    import orbax.checkpoint as ocp

    from mfuser_jax.convert.pretrained import _stringify

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), {"params": _stringify(frozen_encoder_tree(model))},
                      force=True)
    checkpointer.wait_until_finished()


def checkpoint_step(meta: Mapping, total_steps: int) -> int:
    """The trainer step a converted release is saved under.

    mmcv's IterBasedRunner saves ``iter_N.pth`` with ``meta["iter"] = N - 1`` (the 0-based
    index of the last iteration run, saved before its counter advances), so the number of
    finished iterations is ``meta["iter"] + 1``. Without meta the release is taken to be a
    finished run: ``total_steps``. Either way the trainer, pointed at the folder, finds a
    finished run (for the released 20k schedule) and only evaluates it, instead of
    "resuming" a converted model with fresh optimizer moments.
    """
    it = meta.get("iter") if meta else None
    if isinstance(it, (int, np.integer)) and int(it) >= 0:
        return int(it) + 1
    return int(total_steps)


def convert_mfuser_checkpoint(config: Any, path: str, out: str, *, progress=None) -> dict:
    """A released MFuser .pth -> a trainer workdir ``out`` that eval/predict restore.

    Writes ``out/checkpoints/<step>/`` with the trainer's own ``save_checkpoint`` (trainable
    parameters, BatchNorm statistics, a freshly initialised optimizer state, meta), the
    checkpoint's frozen towers as ``out/pretrained/`` (the trainer checkpoints hold only the
    trainable part; restore_model takes the frozen one from ``config.model.pretrained``),
    and ``out/config.json`` with ``model.pretrained`` pointing there. ``config`` is an
    experiment config (configs/*.py); it is not modified. Returns a summary dict.
    """
    import dataclasses
    import json

    from mfuser_jax import sharding as shd
    from mfuser_jax import train

    step_cb = progress or (lambda stage: None)
    out = os.path.abspath(os.path.expanduser(out))
    ckpt_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise WeightFileError(f"{ckpt_dir} already holds checkpoints: choose an empty --out")
    config = config.copy_and_resolve_references()  # the caller's config stays as it was
    config.unlock()

    step_cb(f"reading {path}")
    state_dict, meta = read_mfuser_checkpoint(path)
    check_is_mfuser(state_dict, os.fspath(path))
    step_cb("building the model")
    config.model.pretrained = ""  # every weight comes from the release
    model = train.create_model(config)
    step_cb("loading the weights")
    counts = load_mfuser_checkpoint(model, state_dict, source=os.fspath(path))
    del state_dict
    step = checkpoint_step(meta, int(config.total_steps))

    step_cb(f"writing {out}/pretrained")
    os.makedirs(out, exist_ok=True)
    pretrained = os.path.join(out, "pretrained")
    save_frozen_encoders(model, pretrained)
    config.model.pretrained = pretrained
    with open(os.path.join(out, "config.json"), "w") as f:  # as train_and_evaluate writes it
        f.write(config.to_json_best_effort(indent=1) if hasattr(
            config, "to_json_best_effort") else json.dumps(dict(config), default=str))

    step_cb(f"writing {ckpt_dir}/{step}")
    trainer = train.Trainer(config, model, shd.make_mesh(config.get("mesh", None)))
    state = dataclasses.replace(trainer.init_state(), step=step)
    mngr = train.checkpoint_manager(out)
    try:
        train.save_checkpoint(mngr, state)
        mngr.wait_until_finished()
    finally:
        mngr.close()
    n_train, n_all = trainer.num_params()
    return {"step": step, "loaded": counts["loaded"], "dropped": counts["dropped"],
            "trainable": n_train, "total": n_all, "pretrained": pretrained,
            "checkpoints": ckpt_dir}
