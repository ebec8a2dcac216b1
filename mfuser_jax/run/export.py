"""Exporting a trained (or converted) workdir; the command line is scripts/export.py.

``export_pth``: the mmseg checkpoint that the original PyTorch MFuser (devinxzhang/MFuser)
loads with ``strict=True`` (``convert.mfuser.mfuser_state_dict`` says what each key holds).

``export_stablehlo``: the evaluator's whole-image predictor, traced with ``jax.export`` at
one fixed input size: a uint8 image (H, W, 3) -> the averaged sliding-window scores
(H, W, K) float32, windows and stride as ``config.evaluation`` (what scripts/eval.py and
scripts/predict.py compute before the argmax). H = W = crop size is the single-window,
per-crop predictor. The weights are arguments of the exported function, not constants
baked into it: a full-size model (about 3 GB of float32) does not fit in the 2 GiB that
a serialized ``Exported`` may take. One .npz file holds the serialized ``Exported``, the
weights in argument order and a JSON ``meta`` (input size, the class of each output
channel, ...). ``load_stablehlo`` reads it back with jax and numpy alone: no model code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["StableHLOPredictor", "export_predictor", "export_pth", "export_stablehlo",
           "load_stablehlo", "save_stablehlo"]

FORMAT = "mfuser-jax-stablehlo/1"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's lowering platforms


def export_pth(config: Any, workdir: str, out: str, step: int | None = None,
               reference: str | None = None) -> dict:
    """W/checkpoints/<step> (default latest) -> ``out``, an mmseg checkpoint
    ``{"state_dict": ..., "meta": ...}`` of the original MFuser of the config's variant.

    ``reference``: the release the workdir was converted from (or any checkpoint of the
    same architecture); the keys the JAX model does not hold (BatchNorm counters, the
    buffers of ``VLMRelease.recomputed``, the never-read ``random_text``/
    ``adapter_proj*``/``identity_head``) are copied from it, so a converted release
    round-trips exactly."""
    from mfuser_jax.run.release import (
        check_is_mfuser,
        check_variant,
        mfuser_state_dict,
        read_mfuser_checkpoint,
        save_mfuser_checkpoint,
    )
    from mfuser_jax.errors import UserError
    from mfuser_jax.files import check_writable
    from mfuser_jax.run.predict import palette_for
    from mfuser_jax.run.restore import restore_model

    name = config.model.get("name", "mfuser")
    if name != "mfuser":
        raise UserError(f"--to pth writes the original MFuser's checkpoint; "
                        f"config.model.name={name!r} has no PyTorch original "
                        "(--to stablehlo exports any model)")
    check_writable(out)  # before the restore; torch.save's own failure is a traceback
    ref = None
    if reference:  # read first: a wrong file fails before the model is built
        ref, _ = read_mfuser_checkpoint(reference)
        check_is_mfuser(ref, reference)
        check_variant(ref, config.model.get("vlm", "clip"), reference)
    model, step = restore_model(config, workdir, step)
    state_dict = mfuser_state_dict(model, step=step, reference=ref,
                                   source=reference or "the reference checkpoint")
    names = list(config.model.class_names)
    meta = {"iter": step - 1,  # mmcv's IterBasedRunner saves iter_N.pth with iter N - 1
            "CLASSES": tuple(names),
            "PALETTE": palette_for(names, names, config.model.get("palette", None)).tolist()}
    save_mfuser_checkpoint(out, state_dict, meta)
    print(f"{len(state_dict)} tensors of checkpoint step {step} written to "
          f"{os.path.abspath(out)}", flush=True)
    return {"out": out, "step": step, "keys": len(state_dict)}


def export_predictor(model: Any, height: int, width: int, *, crop: int, stride: int,
                     crop_batch: int, class_names: Sequence[str] | None = None,
                     platforms: Sequence[str] | None = None):
    """(``jax.export.Exported``, weights) of ``model``'s sliding-window predictor for one
    uint8 image (height, width, 3). The exported function takes (weights, image): its
    Params and BatchStats as a list, in ``weights``' order; the rest of the model state
    (dropout RNG state, the tokenized class names) is baked in. ``platforms``: lowering
    platforms (default: the current backend)."""
    import jax.numpy as jnp
    from flax import nnx

    from mfuser_jax.run.evaluate import _scores_fn

    model.eval()
    graphdef, weights, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
    leaves, treedef = jax.tree.flatten(weights)
    scores = _scores_fn(graphdef, crop=crop, stride=stride, crop_batch=crop_batch,
                        class_names=class_names)

    def predict(leaves, image):
        state = nnx.merge_state(jax.tree.unflatten(treedef, leaves), rest)
        return scores(state, image[None])

    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    image = jax.ShapeDtypeStruct((height, width, 3), jnp.uint8)
    # jax.export refuses the scan's Triton kernels (custom calls with no compatibility
    # guarantee), and a module for several platforms cannot hold them: on GPUs the export
    # holds the associative scan.
    from mfuser_jax.ops.selective_scan import portable_lowering
    with portable_lowering():
        exported = jax.export.export(jax.jit(predict), platforms=platforms)(specs, image)
    return exported, leaves


def export_stablehlo(config: Any, workdir: str, out: str, step: int | None = None, *,
                     height: int | None = None, width: int | None = None,
                     classes: str | None = None, platforms: Sequence[str] | None = None
                     ) -> dict:
    """W/checkpoints/<step> (default latest) -> ``out``, the predictor for one
    height x width image (default: one window, config.evaluation.crop_size square) as
    ``load_stablehlo`` reads it. ``classes``: comma-separated class names for the output
    channels (default the config's; others are zero-shot, as in scripts/predict.py)."""
    from mfuser_jax.errors import UserError
    from mfuser_jax.files import check_writable
    from mfuser_jax.run.predict import parse_class_names
    from mfuser_jax.run.restore import restore_model

    ev = config.evaluation
    crop, stride = int(ev.crop_size), int(ev.stride)
    height, width = int(height or crop), int(width or crop)
    if height < 1 or width < 1:
        raise UserError(f"--height and --width must be positive, got {height}x{width}")
    platforms = tuple(platforms) if platforms else None
    unknown = sorted(set(platforms or ()) - set(PLATFORMS))
    if unknown:
        raise UserError(f"unknown platform(s) {', '.join(unknown)}: choose from "
                        f"{', '.join(PLATFORMS)}")
    names = parse_class_names(classes)
    check_writable(out)
    model, step = restore_model(config, workdir, step)
    exported, weights = export_predictor(
        model, height, width, crop=crop, stride=stride,
        crop_batch=int(ev.crop_batch), class_names=names, platforms=platforms)
    meta = {"step": step, "input": [height, width, 3], "input_dtype": "uint8",
            "output": list(exported.out_avals[0].shape), "output_dtype": "float32",
            "class_names": names or list(config.model.class_names), "crop_size": crop,
            "stride": stride, "platforms": list(exported.platforms)}
    save_stablehlo(out, exported, weights, meta)
    print(f"predictor of checkpoint step {step} for {height}x{width} images "
          f"({', '.join(exported.platforms)}) written to {os.path.abspath(out)}", flush=True)
    return {"out": out, "step": step, **meta}


def save_stablehlo(path: str, exported, weights: Sequence[Any], meta: dict) -> None:
    """One uncompressed .npz: ``exported`` (the serialized bytes), ``meta`` (JSON, with
    the format's name added; ``class_names`` names the output channels) and ``w00000``...
    (the weights; dtypes numpy lacks, such as bfloat16, as raw bits)."""
    # Imported here: load_stablehlo must not import any other mfuser_jax module.
    from mfuser_jax.files import atomic_write

    arrays = {"exported": np.frombuffer(exported.serialize(), np.uint8),
              "meta": np.array(json.dumps({"format": FORMAT, **meta}))}
    for i, w in enumerate(weights):
        w = np.asarray(w)
        arrays[f"w{i:05d}"] = w.view(f"u{w.dtype.itemsize}") if w.dtype.kind == "V" else w
    with atomic_write(path) as (tmp,), open(tmp, "wb") as f:
        np.savez(f, **arrays)  # a file object: np.savez appends no ".npz"


class StableHLOPredictor:
    """image (H, W, 3) uint8 -> scores (H, W, K) float32 numpy, for the H and W of the
    export; ``class_names[k]`` names channel k, ``meta`` holds the rest of the file's meta."""

    def __init__(self, exported, weights: list, meta: dict):
        self.exported, self.meta = exported, meta
        self.class_names = meta.get("class_names")
        self.input_shape = tuple(exported.in_avals[-1].shape)
        self._weights = weights
        self._call = jax.jit(exported.call)

    def __call__(self, image) -> np.ndarray:
        image = np.asarray(image)
        if image.shape != self.input_shape or image.dtype != np.uint8:
            raise ValueError(f"this predictor was exported for one uint8 image of shape "
                             f"{self.input_shape}; got {image.dtype} {image.shape}")
        return np.asarray(self._call(self._weights, image))


def load_stablehlo(path: str, device: jax.Device | None = None) -> StableHLOPredictor:
    """The predictor saved by ``export_stablehlo``, its weights on ``device`` (default the
    first one). Needs jax and numpy only; the platform must be one of
    ``meta["platforms"]``."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a predictor written by export_stablehlo "
                             f"(format {meta.get('format')!r}, expected {FORMAT!r})")
        exported = jax.export.deserialize(bytearray(f["exported"].tobytes()))
        device = device or jax.local_devices()[0]
        weights = [jax.device_put(f[f"w{i:05d}"].view(aval.dtype), device)
                   for i, aval in enumerate(exported.in_avals[:-1])]
    return StableHLOPredictor(exported, weights, meta)
