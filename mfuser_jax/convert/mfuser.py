"""Released MFuser checkpoints (CLIP, EVA02 and SigLIP variants) <-> the JAX ``MFuser``.

The originals (devinxzhang/MFuser, models/segmentors/mfuser_{clip,eva_clip,siglip}.py) are
mmseg segmentors saved by mmcv as ``{"state_dict": {...}, "meta": {...}}``. Their top-level
attributes are backbone (VLM image tower + ``dinov2`` + MVFuser adapters + FPN),
text_encoder, context_decoder, contexts, gamma and decode_head — the same names as
``MFuser``, so every key maps by the generic rule of ``load_torch_state_dict``. Keys that
carry no state for us are dropped by name, each for a stated reason (``UNUSED_KEYS``):

* ``identity_head.*`` (all variants): mmseg's IdentityHead passes the score map through;
  its ``conv_seg`` (a 1x1 conv of a 1-channel map, only present in mmseg versions that do
  not set it to None) never runs.
* ``random_text`` (EVA02): MFuser_EVA_CLIP creates this (num_classes, 768) parameter and
  never reads it.
* ``backbone.adapter_proj{1,2,3}.*`` (SigLIP): the SigLIP backbone builds the CLIP
  variant's projections but its forward never calls them.
* ``*.num_batches_tracked``: BatchNorm's step counter (momentum is fixed in both codes).

EVA02's rotary tables (``backbone.rope.freqs_*`` and one copy per block, persistent
buffers in PyTorch) are not weights: they are compared with the tables the JAX model
computes and then dropped. SigLIP's ``logit_scale``/``logit_bias`` are not in a release at
all (the original reads them from the SigLIP file at build time); they come from the
SigLIP weights when given, else they are NaN so that training from such a workdir stops
with a clear message (evaluation does not use them).

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

from mfuser_jax.convert.state_dict import (
    StateDictMismatchError,
    load_torch_state_dict,
    torch_state_dict_of,
)
from mfuser_jax.convert.torch_io import WeightFileError, _flatten, _import_torch
from mfuser_jax.files import atomic_write

__all__ = ["UNUSED_KEYS", "check_is_mfuser", "checkpoint_step", "convert_mfuser_checkpoint",
           "frozen_encoder_tree", "load_mfuser_checkpoint", "mfuser_state_dict",
           "read_mfuser_checkpoint", "save_mfuser_checkpoint"]

# Keys of a released checkpoint that hold nothing the JAX model uses (see the docstring):
# variant -> key regexes.
_IDENTITY_HEAD = r"identity_head\."
UNUSED_KEYS = {
    "clip": (_IDENTITY_HEAD,),
    "eva02": (_IDENTITY_HEAD, r"random_text$"),
    "siglip": (_IDENTITY_HEAD, r"backbone\.adapter_proj[123]\."),
}
_EVA_ROPE_KEY = re.compile(r"^backbone\.(?:blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")
SIGLIP_SCALARS = ("backbone.logit_scale", "backbone.logit_bias")


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
            "checkpoint (for the encoder files use --dinov2 with --clip, --eva02 or --siglip "
            "instead of --mfuser)")


def _rope_tables(model: nnx.Module) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """(patch grid, cos, sin): EVA02's rotary tables at the model's training size."""
    grid = model.backbone.grid_size(int(model.config.image_size), int(model.config.image_size))
    cos, sin = (np.asarray(t) for t in model.backbone.vlm.rope(grid))
    return grid, cos, sin


def _check_rope_tables(model: nnx.Module, tables: Mapping[str, Any], source: str) -> None:
    """EVA02's persistent rotary buffers must equal what the model computes at its size."""
    grid, cos, sin = _rope_tables(model)
    for key, value in tables.items():
        want = cos if key.endswith("cos") else sin
        value = np.asarray(value, np.float32)
        if value.shape != want.shape or not np.allclose(value, want, atol=1e-5):
            raise WeightFileError(
                f"{source}: {key} {tuple(value.shape)} is not the rotary table of a "
                f"{grid[0]}x{grid[1]} patch grid: was the checkpoint trained at another "
                "image size than config.model.image_size?")


# A key only each variant's backbone has.
_VARIANT_KEYS = {
    "clip": "backbone.conv1.weight",
    "eva02": "backbone.patch_embed.proj.weight",
    "siglip": "backbone.embeddings.patch_embedding.weight",
}


def release_variant(state_dict: Mapping[str, Any]) -> str | None:
    """'clip', 'eva02' or 'siglip' for a released MFuser state dict (None if unknown)."""
    found = [vlm for vlm, key in _VARIANT_KEYS.items() if key in state_dict]
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
                           siglip_scalars: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Strictly copy a released MFuser state dict into ``model`` (an ``MFuser`` of the same
    variant, ``model.vlm``).

    Every parameter and BatchNorm statistic of the model must be present with the original
    PyTorch shape and every key must be consumed, except the documented ``UNUSED_KEYS``,
    EVA02's rotary tables (checked, then dropped) and ``num_batches_tracked``. Raises
    ``StateDictMismatchError`` listing all problems. ``siglip_scalars``: SigLIP's
    {"logit_scale", "logit_bias"} from its weight file (NaN when not given). Returns counts:
    {"loaded": keys loaded, "dropped": unused keys dropped, "recomputed": rope tables checked}.
    """
    check_is_mfuser(state_dict, source)
    vlm = model.vlm
    check_variant(state_dict, vlm, source)
    unused = re.compile("|".join(f"(?:{p})" for p in UNUSED_KEYS[vlm]))
    kept = {k: v for k, v in state_dict.items() if not unused.match(k)}
    dropped = len(state_dict) - len(kept)
    rope = {k: kept.pop(k) for k in list(kept) if vlm == "eva02" and _EVA_ROPE_KEY.match(k)}
    if rope:
        _check_rope_tables(model, rope, source)
    if vlm == "siglip":
        scalars = siglip_scalars or {}
        for key in SIGLIP_SCALARS:
            name = key.split(".")[-1]
            kept[key] = np.asarray(scalars[name], np.float32).reshape(1) if name in scalars \
                else np.full((1,), np.nan, np.float32)
    load_torch_state_dict(model, kept, strict=True, module_name=f"MFuser from {source}")
    n_ignored = sum(k.endswith("num_batches_tracked") for k in kept)
    n_added = len(SIGLIP_SCALARS) if vlm == "siglip" else 0
    return {"loaded": len(kept) - n_ignored - n_added, "dropped": dropped,
            "recomputed": len(rope)}


def mfuser_state_dict(model: nnx.Module, *, step: int,
                      reference: Mapping[str, Any] | None = None,
                      source: str = "the reference checkpoint") -> dict[str, np.ndarray]:
    """The inverse of ``load_mfuser_checkpoint``: ``model`` as the state dict the original
    MFuser_{CLIP,EVA_CLIP,SIGLIP} saves, which its ``load_state_dict(strict=True)`` takes.

    Parameters and BatchNorm statistics come out by the inverse rules of
    ``torch_state_dict_of`` (float32, PyTorch layouts, per-layer names); SigLIP's
    ``logit_scale``/``logit_bias`` stay out (the original does not save them). The keys the
    import drops are written again, so that every key the original expects is there:

    * ``*.num_batches_tracked``: ``step`` (int64); nothing reads it (fixed momentum);
    * EVA02's rotary tables: recomputed (equal to the original's up to float32 rounding);
    * EVA02's ``random_text`` and SigLIP's ``backbone.adapter_proj{1,2,3}``: zeros of the
      original's shapes (the original never reads them either);
    * ``identity_head.*``: none (the original's IdentityHead sets ``conv_seg = None``).

    ``reference``: a state dict of the release this model was converted from (or of another
    model of the same architecture). Those keys are then copied from it, identity_head's
    included, and the result must have exactly its keys and shapes (else
    ``WeightFileError`` lists every difference): a converted release comes out unchanged.
    """
    vlm = getattr(model, "vlm", "clip")
    m = model.config
    scalars = SIGLIP_SCALARS if vlm == "siglip" else ()
    sd = {k: np.asarray(v, np.float32) for k, v in torch_state_dict_of(model).items()
          if k not in scalars}
    extra = {k.removesuffix("running_mean") + "num_batches_tracked": np.array(step, np.int64)
             for k in sd if k.endswith(".running_mean")}
    if vlm == "eva02":
        _, cos, sin = _rope_tables(model)
        for prefix in ["backbone.", *(f"backbone.blocks.{i}.attn." for i in
                                      range(int(m.eva02.layers)))]:
            extra[prefix + "rope.freqs_cos"], extra[prefix + "rope.freqs_sin"] = cos, sin
        # MFuser_EVA_CLIP: nn.Parameter(torch.randn(num_classes, 768)), 768 whatever the size
        extra["random_text"] = np.zeros((int(m.num_classes), 768), np.float32)
    if vlm == "siglip":  # SiglipVisionTransformer: Linear(1024 = DINOv2-L's width, width)...
        w, d, n = int(m.siglip.width), int(m.dinov2.embed_dim), int(m.siglip.layers)
        linears = [*((f"adapter_proj1.{i}", w, d) for i in range(n)),
                   *((f"adapter_proj2.{i}", d, w) for i in range(n)), ("adapter_proj3", w, d)]
        for name, out_dim, in_dim in linears:
            extra[f"backbone.{name}.weight"] = np.zeros((out_dim, in_dim), np.float32)
            extra[f"backbone.{name}.bias"] = np.zeros((out_dim,), np.float32)
    if reference is not None:
        unused = re.compile("|".join(f"(?:{p})" for p in UNUSED_KEYS[vlm]))
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
    (mfuser_jax.convert.pretrained) stores: {"backbone": {...}, "text_encoder": {...}}.

    The trainer's checkpoints hold only the trainable parameters; the frozen ones come from
    ``config.model.pretrained``. A converted release brings its own frozen towers, written
    with ``save_pretrained_encoders`` so ``load_pretrained_encoders`` fills them.
    """
    from mfuser_jax.convert.pretrained import per_layer_tree
    from mfuser_jax.models.variants import is_trainable_path

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


def convert_mfuser_checkpoint(config: Any, path: str, out: str, *, siglip_weights=None,
                              siglip_tokenizer=None, progress=None) -> dict:
    """A released MFuser .pth -> a trainer workdir ``out`` that eval/predict restore.

    Writes ``out/checkpoints/<step>/`` in the model format of ``mfuser_jax.checkpoints``
    (trainable parameters and BatchNorm statistics, no optimizer state), the checkpoint's
    frozen towers as ``out/pretrained/`` (the trainer checkpoints hold only the trainable
    part; restore_model takes the frozen one from ``config.model.pretrained``),
    and ``out/config.json`` with ``model.pretrained`` pointing there. ``config`` is an
    experiment config (configs/*.py) of the release's variant; it is not modified.
    SigLIP releases need SigLIP's SentencePiece file (``siglip_tokenizer``, copied to
    ``out/pretrained/spiece.model``) and take ``logit_scale``/``logit_bias`` from
    ``siglip_weights`` (the SigLIP .pth/HF file) when given. Returns a summary dict.
    """
    import shutil

    from mfuser_jax import checkpoints, startup
    from mfuser_jax.convert.pretrained import save_pretrained_encoders
    from mfuser_jax.trainer import trained_state
    from mfuser_jax.workdir import write_config

    step_cb = progress or (lambda stage: None)
    out = os.path.abspath(os.path.expanduser(out))
    ckpt_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise WeightFileError(f"{ckpt_dir} already holds checkpoints: choose an empty --out")
    config = config.copy_and_resolve_references()  # the caller's config stays as it was
    config.unlock()
    vlm = config.model.vlm
    tokenizer, scalars = None, None
    if vlm == "siglip":
        tokenizer = siglip_tokenizer or config.model.siglip.tokenizer
        if not tokenizer or not os.path.isfile(tokenizer):
            raise WeightFileError(
                "a SigLIP release needs SigLIP's SentencePiece vocabulary: pass "
                "--siglip_tokenizer spiece.model (from google/siglip-large-patch16-384)")
        config.model.siglip.tokenizer = os.path.abspath(tokenizer)
    elif siglip_weights or siglip_tokenizer:
        raise WeightFileError(f"--siglip/--siglip_tokenizer are for SigLIP releases; the "
                              f"config builds vlm={vlm!r}")

    step_cb(f"reading {path}")
    state_dict, meta = read_mfuser_checkpoint(path)
    check_is_mfuser(state_dict, os.fspath(path))
    check_variant(state_dict, vlm, os.fspath(path))
    if siglip_weights:
        from mfuser_jax.convert.siglip import siglip_state_dicts
        from mfuser_jax.convert.torch_io import read_state_dict

        step_cb(f"reading logit_scale/logit_bias from {siglip_weights}")
        scalars = siglip_state_dicts(read_state_dict(siglip_weights))[2]
    step_cb("building the model")
    config.model.pretrained = ""  # every weight comes from the release
    model = startup.create_model(config)
    step_cb("loading the weights")
    counts = load_mfuser_checkpoint(model, state_dict, source=os.fspath(path),
                                    siglip_scalars=scalars)
    del state_dict
    step = checkpoint_step(meta, int(config.total_steps))

    step_cb(f"writing {out}/pretrained")
    os.makedirs(out, exist_ok=True)
    pretrained = os.path.join(out, "pretrained")
    save_pretrained_encoders(pretrained, frozen_encoder_tree(model))
    if tokenizer:  # found as <pretrained>/spiece.model from now on
        shutil.copyfile(tokenizer, os.path.join(pretrained, "spiece.model"))
        config.model.siglip.tokenizer = ""
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
            "logit_scalars": vlm != "siglip" or scalars is not None}
