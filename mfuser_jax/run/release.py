"""Released MFuser checkpoints (CLIP, EVA02 and SigLIP variants) <-> the JAX ``MFuser``.

The originals (devinxzhang/MFuser, models/segmentors/mfuser_{clip,eva_clip,siglip}.py) are
mmseg segmentors saved by mmcv as ``{"state_dict": {...}, "meta": {...}}``. Their top-level
attributes are backbone (VLM image tower + ``dinov2`` + MVFuser adapters + FPN),
text_encoder, context_decoder, contexts, gamma and decode_head — the same names as
``MFuser``, so every key maps by the generic rule of ``load_torch_state_dict``. Keys that
carry no state for us are dropped by name, each for a stated reason (``unused_keys``; the
per-variant ones are in the VLM's spec, ``VLMRelease.unused`` in ``towers/<vlm>/spec.py``):

* ``identity_head.*`` (all variants): mmseg's IdentityHead passes the score map through;
  its ``conv_seg`` (a 1x1 conv of a 1-channel map, only present in mmseg versions that do
  not set it to None) never runs.
* ``random_text`` (EVA02): MFuser_EVA_CLIP creates this (num_classes, 768) parameter and
  never reads it.
* ``backbone.adapter_proj{1,2,3}.*`` (SigLIP): the SigLIP backbone builds the CLIP
  variant's projections but its forward never calls them.
* ``*.num_batches_tracked``: BatchNorm's step counter (momentum is fixed in both codes).

Buffers are not weights (``VLMRelease.recomputed``): EVA02's rotary tables
(``backbone.rope.freqs_*`` and one copy per block, persistent) and its text tower's causal
mask ``text_encoder.attn_mask``, SigLIP's ``backbone.embeddings.position_ids`` and
``text_encoder.embeddings.position_ids``. The last three are ``persistent=False`` in the
original, so torch's ``state_dict()`` leaves them out, but mmcv 1.5.1's ``save_checkpoint``
(runner/checkpoint.py ``get_state_dict``) writes every buffer, so real releases hold them.
Each one found is compared with what the JAX model computes (a clear error naming the key
and the difference otherwise) and then dropped. CLIP's text mask is a plain attribute in the
original (not saved); DINOv2, the MVFusers, the FPN (BatchNorm's persistent statistics
aside), the ContextDecoder and the decoder register no buffers. SigLIP's
``logit_scale``/``logit_bias``
(``VLMRelease.scalars``) are not in a release at all (the original reads them from the
SigLIP file at build time); they come from the SigLIP weights when given, else they are NaN
so that training from such a workdir stops with a clear message (evaluation does not use
them).

Anything else that does not fit is reported, with every missing, unexpected and mis-shaped
key in one ``StateDictMismatchError``.

The way back (``mfuser_state_dict``, ``save_mfuser_checkpoint``) writes the dropped keys
again, so that the original loads the result with ``strict=True``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from mfuser_jax.weights.state_dict import (
    StateDictMismatchError,
    load_torch_state_dict,
    torch_state_dict_of,
)
from mfuser_jax.weights.torch_io import WeightFileError, _flatten, _import_torch
from mfuser_jax.files import atomic_write
from mfuser_jax.towers.registry import get_vlm, vlm_names

__all__ = ["check_is_mfuser", "checkpoint_step", "convert_mfuser_checkpoint",
           "frozen_encoder_tree", "load_mfuser_checkpoint", "mfuser_state_dict",
           "read_mfuser_checkpoint", "release_variant", "save_mfuser_checkpoint",
           "unused_keys"]

_IDENTITY_HEAD = r"identity_head\."


def unused_keys(vlm: str) -> re.Pattern:
    """The keys of a ``vlm`` release that hold nothing the JAX model uses (see the
    docstring): identity_head's (every variant) and the VLM spec's ``release_unused``."""
    return re.compile("|".join(f"(?:{p})" for p in (_IDENTITY_HEAD,
                                                     *get_vlm(vlm).release.unused)))


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
            "checkpoint (for the encoder files use --dinov2 with "
            + " or ".join(f"--{n}" for n in vlm_names()) + " instead of --mfuser)")


def _difference(value: np.ndarray, want: np.ndarray) -> str | None:
    """None if ``value`` is ``want`` (floats to 1e-5, infinities equal), else how it differs."""
    if value.shape != want.shape:
        return f"shape {tuple(value.shape)}, expected {tuple(want.shape)}"
    if np.issubdtype(want.dtype, np.floating):
        value = value.astype(np.float64)
        bad = ~np.isclose(value, want, rtol=0, atol=1e-5)
    else:
        bad = value != want
    if not bad.any():
        return None
    diff = np.abs(value[bad].astype(np.float64) - want[bad].astype(np.float64))
    return (f"{int(bad.sum())} of {bad.size} values differ, by up to "
            f"{np.where(np.isnan(diff), np.inf, diff).max():.3g}")


def _check_recomputed(model: nnx.Module, state_dict: dict, source: str) -> int:
    """Pop the buffers the VLM's original saves and the JAX model computes (``VLMSpec.
    release_recomputed``: EVA02's rotary tables and text mask, SigLIP's position ids) from
    ``state_dict``; each must equal the model's, else a WeightFileError names the key and
    the difference. Returns how many were checked (a release need not hold them: torch's own
    ``state_dict()`` leaves the non-persistent ones out)."""
    buffers = get_vlm(model.vlm).release.recomputed(model)
    found = [k for k in buffers if k in state_dict]
    for key in found:
        value = np.asarray(state_dict.pop(key))
        want, what = buffers[key]
        difference = _difference(value, np.asarray(want))
        if difference is not None:
            raise WeightFileError(f"{source}: {key} is not {what}: {difference}")
    return len(found)


def release_variant(state_dict: Mapping[str, Any]) -> str | None:
    """The registered VLM a released MFuser state dict is of, by the key only that
    variant's backbone has (``VLMRelease.key``); None if not exactly one fits."""
    found = [vlm for vlm in vlm_names() if get_vlm(vlm).release.key in state_dict]
    return found[0] if len(found) == 1 else None


def check_variant(state_dict: Mapping[str, Any], vlm: str, source: str) -> None:
    """Refuse a release of another variant than the config's, naming the right argument."""
    found = release_variant(state_dict)
    if found is not None and found != vlm:
        raise WeightFileError(
            f"{source} is an MFuser {found} checkpoint but the config builds vlm={vlm!r}: "
            f"append ':vlm={found}' to the config file name (e.g. --config "
            f"configs/gta2cs.py:vlm={found})")


def load_mfuser_checkpoint(model: nnx.Module, state_dict: Mapping[str, Any], *,
                           source: str = "the MFuser checkpoint",
                           scalars: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Strictly copy a released MFuser state dict into ``model`` (an ``MFuser`` of the same
    variant, ``model.vlm``).

    Every parameter and BatchNorm statistic of the model must be present with the original
    PyTorch shape and every key must be consumed, except the documented ``unused_keys``,
    the buffers the model recomputes (``VLMRelease.recomputed``: checked, then
    dropped) and ``num_batches_tracked``. Raises ``StateDictMismatchError`` listing all
    problems.
    ``scalars``: the frozen parameters releases lack (``VLMRelease.scalars``, by last
    name: SigLIP's {"logit_scale", "logit_bias"}) from the VLM's weight file (NaN when not
    given). Returns counts: {"loaded": keys loaded, "dropped": unused keys dropped,
    "recomputed": buffers checked}.
    """
    check_is_mfuser(state_dict, source)
    vlm = model.vlm
    check_variant(state_dict, vlm, source)
    unused = unused_keys(vlm)
    kept = {k: v for k, v in state_dict.items() if not unused.match(k)}
    dropped = len(state_dict) - len(kept)
    recomputed = _check_recomputed(model, kept, source)
    added = get_vlm(vlm).release.scalars
    scalars = scalars or {}
    for key in added:
        name = key.split(".")[-1]
        kept[key] = np.asarray(scalars[name], np.float32).reshape(1) if name in scalars \
            else np.full((1,), np.nan, np.float32)
    load_torch_state_dict(model, kept, strict=True, module_name=f"MFuser from {source}")
    n_ignored = sum(k.endswith("num_batches_tracked") for k in kept)
    return {"loaded": len(kept) - n_ignored - len(added), "dropped": dropped,
            "recomputed": recomputed}


def mfuser_state_dict(model: nnx.Module, *, step: int,
                      reference: Mapping[str, Any] | None = None,
                      source: str = "the reference checkpoint") -> dict[str, np.ndarray]:
    """The inverse of ``load_mfuser_checkpoint``: ``model`` as the state dict the original
    MFuser_{CLIP,EVA_CLIP,SIGLIP} saves, which its ``load_state_dict(strict=True)`` takes.

    Parameters and BatchNorm statistics come out by the inverse rules of
    ``torch_state_dict_of`` (float32, PyTorch layouts, per-layer names); the spec's
    ``release_scalars`` (SigLIP's ``logit_scale``/``logit_bias``) stay out (the original does
    not save them). The keys the import drops are written again, so that every key the
    original expects is there:

    * ``*.num_batches_tracked``: ``step`` (int64); nothing reads it (fixed momentum);
    * the spec's ``release_recomputed`` (EVA02's rotary tables and text mask, SigLIP's
      position ids): recomputed, in the original's dtypes, as mmcv's saver writes them
      (the rotary tables equal the original's up to float32 rounding);
    * the spec's ``release_zeros`` (EVA02's ``random_text``, SigLIP's
      ``backbone.adapter_proj{1,2,3}``): zeros of the original's shapes (the original never
      reads them either);
    * ``identity_head.*``: none (the original's IdentityHead sets ``conv_seg = None``).

    ``reference``: a state dict of the release this model was converted from (or of another
    model of the same architecture). Those keys are then copied from it, identity_head's
    included (the buffers only where it holds them), and the result must have exactly its
    keys and shapes (else ``WeightFileError`` lists every difference): a converted release
    comes out unchanged.
    """
    spec = get_vlm(getattr(model, "vlm", "clip"))
    sd = {k: np.asarray(v, np.float32) for k, v in torch_state_dict_of(model).items()
          if k not in spec.release.scalars}
    extra = {k.removesuffix("running_mean") + "num_batches_tracked": np.array(step, np.int64)
             for k in sd if k.endswith(".running_mean")}
    buffers = spec.release.recomputed(model)
    extra.update({k: v for k, (v, _) in buffers.items()})
    extra.update({k: np.zeros(shape, np.float32)
                  for k, shape in spec.release.zeros(model.config).items()})
    if reference is not None:
        unused = unused_keys(spec.name)
        # the import accepts releases without the buffers (saved by torch's state_dict(),
        # not mmcv's saver): the reference decides whether they are written
        extra = {k: v for k, v in extra.items() if k in reference or k not in buffers}
        ours = sd | extra
        mismatched = [(k, np.shape(reference[k]), np.shape(v)) for k, v in ours.items()
                      if k in reference and np.shape(reference[k]) != np.shape(v)]
        missing = sorted(k for k in set(reference) - set(ours) if not unused.match(k))
        unexpected = sorted(set(ours) - set(reference))
        if missing or unexpected or mismatched:
            raise WeightFileError(str(StateDictMismatchError(
                missing, unexpected, mismatched, f"{source} (a checkpoint of another model?)")))
        extra.update({k: np.asarray(v) for k, v in reference.items()
                      if k in extra or unused.match(k)})
    return sd | extra


def save_mfuser_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray],
                           meta: Mapping[str, Any]) -> None:
    """Write ``{"meta": meta, "state_dict": tensors}`` with torch.save, as mmcv saves a
    checkpoint; the file appears only once complete. ``meta`` should hold plain Python
    values, so that ``torch.load(weights_only=True)`` reads it."""
    from collections import OrderedDict

    path = os.fspath(path)
    torch = _import_torch(path)
    tensors = OrderedDict((k, torch.from_numpy(np.array(v, copy=None, order="C")))
                          for k, v in state_dict.items())
    with atomic_write(path, error=WeightFileError) as (tmp,):
        torch.save({"meta": dict(meta), "state_dict": tensors}, tmp)


def frozen_encoder_tree(model: nnx.Module) -> dict:
    """The frozen parameters of ``model`` as the nested tree the converted-encoder checkpoint
    (mfuser_jax.model.pretrained) stores: {"backbone": {...}, "text_encoder": {...}}.

    The trainer's checkpoints hold only the trainable parameters; the frozen ones come from
    ``config.model.pretrained``. A converted release brings its own frozen towers, written
    with ``save_pretrained_encoders`` so ``load_pretrained_encoders`` fills them.
    """
    from mfuser_jax.model.pretrained import per_layer_tree
    from mfuser_jax.model.variants import is_trainable_path

    return per_layer_tree(model, lambda path: not is_trainable_path(path))


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


def convert_mfuser_checkpoint(config: Any, path: str, out: str, *, vlm_weights=None,
                              tokenizer=None, progress=None) -> dict:
    """A released MFuser .pth -> a trainer workdir ``out`` that eval/predict restore.

    Writes ``out/checkpoints/<step>/`` in the model format of ``mfuser_jax.checkpoints``
    (trainable parameters and BatchNorm statistics, no optimizer state), the checkpoint's
    frozen towers as ``out/pretrained/`` (the trainer checkpoints hold only the trainable
    part; restore_model takes the frozen one from ``config.model.pretrained``),
    and ``out/config.json`` with ``model.pretrained`` pointing there. ``config`` is an
    experiment config (configs/*.py) of the release's variant; it is not modified.
    Releases of a VLM whose tokenizer reads a file need it (``tokenizer``; SigLIP's
    SentencePiece file, copied to ``out/pretrained/spiece.model``), and those lacking frozen
    scalars (``VLMRelease.scalars``: SigLIP's ``logit_scale``/``logit_bias``) take them
    from ``vlm_weights`` (the VLM's weight file) when given. Returns a summary dict.
    """
    import shutil

    from mfuser_jax import checkpoints
    from mfuser_jax.model.pretrained import save_pretrained_encoders
    from mfuser_jax.weights.state_dict import LOADED
    from mfuser_jax.model.factory import init_model, require_concrete
    from mfuser_jax.model_state import trained_state
    from mfuser_jax.workdir import write_config

    step_cb = progress or (lambda stage: None)
    out = os.path.abspath(os.path.expanduser(out))
    ckpt_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise WeightFileError(f"{ckpt_dir} already holds checkpoints: choose an empty --out")
    config = config.copy_and_resolve_references()  # the caller's config stays as it was
    config.unlock()
    spec = get_vlm(config.model.vlm)
    vlm, scalars = spec.name, None
    if spec.build.tokenizer_file:
        tokenizer = tokenizer or config.model[vlm].tokenizer
        if not tokenizer or not os.path.isfile(tokenizer):
            raise WeightFileError(
                f"a {spec.title} release needs {spec.build.tokenizer_source}: pass "
                f"--{spec.tokenizer_flag} {spec.build.tokenizer_file}")
        config.model[vlm].tokenizer = os.path.abspath(tokenizer)
    elif tokenizer:
        raise WeightFileError(f"vlm={vlm!r} reads no tokenizer file: drop the tokenizer flag")
    if vlm_weights and not spec.release.scalars:
        raise WeightFileError(f"a {vlm} release holds all its weights: --{vlm} is not read "
                              "with --mfuser")

    step_cb(f"reading {path}")
    state_dict, meta = read_mfuser_checkpoint(path)
    check_is_mfuser(state_dict, os.fspath(path))
    check_variant(state_dict, vlm, os.fspath(path))
    if vlm_weights:
        from mfuser_jax.weights.torch_io import read_state_dict

        step_cb(f"reading {', '.join(k.split('.')[-1] for k in spec.release.scalars)} from "
                f"{vlm_weights}")
        scalars = spec.release.scalars_from(read_state_dict(vlm_weights))
    step_cb("building the model")
    config.model.pretrained = ""  # every weight comes from the release
    # From shapes: the strict load fills every parameter and BatchNorm statistic, so only
    # the rest (RNG state, the tokenized class names) is computed; nothing random is drawn.
    model = init_model(config.model, seed=int(config.seed), skip=LOADED)
    step_cb("loading the weights")
    counts = load_mfuser_checkpoint(model, state_dict, source=os.fspath(path),
                                    scalars=scalars)
    del state_dict
    require_concrete(model, f"MFuser from {os.fspath(path)}")
    step = checkpoint_step(meta, int(config.total_steps))

    step_cb(f"writing {out}/pretrained")
    os.makedirs(out, exist_ok=True)
    pretrained = os.path.join(out, "pretrained")
    save_pretrained_encoders(pretrained, frozen_encoder_tree(model))
    if spec.build.tokenizer_file:  # found as <pretrained>/<tokenizer_file> from now on
        shutil.copyfile(tokenizer, os.path.join(pretrained, spec.build.tokenizer_file))
        config.model[vlm].tokenizer = ""
    config.model.pretrained = pretrained
    write_config(out, config)  # as training writes it: eval/predict check their model against it

    step_cb(f"writing {ckpt_dir}/{step}")
    params, batch_stats = trained_state(model)
    mngr = checkpoints.checkpoint_manager(out)
    try:
        checkpoints.save_model_checkpoint(mngr, step, params, batch_stats)
        mngr.wait_until_finished()
    finally:
        mngr.close()
    n_train = sum(x.size for x in jax.tree.leaves(params))
    n_all = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {"step": step, "vlm": vlm, "loaded": counts["loaded"], "dropped": counts["dropped"],
            "recomputed": counts["recomputed"], "trainable": n_train, "total": n_all,
            "pretrained": pretrained, "checkpoints": ckpt_dir,
            "logit_scalars": not spec.release.scalars or scalars is not None}
