"""What every entry point does before its first step: checks of the config, the data
folders and the converted weights (one clear error each, before anything is built), the
process-wide JAX settings (matmul precision, compile cache), and building the model with
its frozen weights loaded."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from mfuser_jax.errors import UserError
from mfuser_jax.files import check_writable
from mfuser_jax.model.factory import abstract_paths, init_model
from mfuser_jax.towers.registry import get_vlm, vlm_names


def _base_name(name: str) -> str:
    """'cityscapes:val' -> 'cityscapes' (the data pipeline's name:split syntax)."""
    return name.split(":", 1)[0]


def _needs_folder(name: str) -> bool:
    """Synthetic and TFDS sources do not live under config.data_root."""
    return not (name.startswith("synthetic") or name.startswith("tfds:"))


def _dataset_folder(config: Any, name: str) -> str:
    """Where dataset `name` lives: data.folder.root for the generic "folder" dataset,
    <data_root>/<name> for the others."""
    base = _base_name(name)
    if base == "folder":
        return os.path.abspath(os.path.expanduser(config.data.get("folder", {}).get("root", "")
                                                  or os.path.join(config.data_root, "folder")))
    root = os.path.abspath(os.path.expanduser(config.data_root))
    return os.path.join(root, base)


def check_data(config: Any) -> None:
    """Fails early, with the path, when a dataset folder the config needs is missing."""
    for name in config.data.train.split("+"):  # '+' mixes several sources
        _check_train_data(config, name.strip())


def _check_train_data(config: Any, name: str) -> None:
    if not _needs_folder(name):
        return
    if _base_name(name) == "folder":
        folder = _dataset_folder(config, name)
        if not os.path.isdir(folder):
            raise UserError(f"training data 'folder' not found: {folder}\nset "
                            "configs/custom.py:root=DIR (or --config.data.folder.root=DIR)")
        return
    name = _base_name(name)
    root = os.path.abspath(os.path.expanduser(config.data_root))
    hint = ("set --config.data_root=DIR (the folder holding gta/, synthia/, cityscapes/, "
            "bdd100k/, mapillary/) and prepare the datasets with scripts/prepare_data.py")
    if not os.path.isdir(root):
        raise UserError(f"data root not found: {root}\n{hint}")
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        raise UserError(f"training data {name!r} not found: {folder}\n{hint}")


def available_eval_datasets(config: Any, log: Callable[[str], None] = print) -> list[str]:
    """config.data.eval, without the (non-first) target datasets that are not on disk."""
    names = list(config.data.eval)
    out = []
    for i, name in enumerate(names):
        folder = _dataset_folder(config, name)
        if not _needs_folder(name) or os.path.isdir(folder):
            out.append(name)
        elif i == 0:
            raise UserError(f"evaluation data {name!r} not found: {folder}\n"
                            "prepare it with scripts/prepare_data.py")
        else:
            log(f"note: skipping evaluation on {name!r}: {folder} does not exist")
    return out


def check_data_for_eval(config: Any) -> None:
    """Fails early when the data root the evaluation datasets live under is missing."""
    if not any(_needs_folder(n) and _base_name(n) != "folder" for n in config.data.eval):
        return  # the generic "folder" dataset lives at data.folder.root
    root = os.path.abspath(os.path.expanduser(config.data_root))
    if not os.path.isdir(root):
        raise UserError(f"data root not found: {root}\n"
                        "set --config.data_root=DIR and prepare the evaluation datasets "
                        "with scripts/prepare_data.py")


def check_pretrained(config: Any) -> str | None:
    path = config.model.get("pretrained", "") or ""
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        vlm = config.model.vlm
        try:
            vlm_file = get_vlm(vlm).convert_args()
        except ValueError:  # not a registered VLM: a model of its own (models.factory)
            vlm_file = f"--{vlm} FILE"
        raise UserError(
            f"pretrained weights not found: {path}\n"
            f"convert the original DINOv2 and {vlm} checkpoints first:\n"
            "  python scripts/convert_weights.py --config <this config> --dinov2 "
            f"dinov2_vitl14_pretrain.pth {vlm_file} --out DIR\n"
            "then pass --config.model.pretrained=DIR (or '' to train from random weights)")
    return path


MATMUL_PRECISIONS = ("highest", "high", "default")


def apply_matmul_precision(config: Any) -> None:
    """jax_default_matmul_precision from config.matmul_precision (default "highest": full
    float32, what PyTorch 2.0.1 does for float32 matmuls; "default" lets Ampere/Hopper
    GPUs use TF32). It covers dots and convolutions alike."""
    precision = str(config.get("matmul_precision", "highest"))
    if precision not in MATMUL_PRECISIONS:
        raise UserError(f"matmul_precision={precision!r}: choose one of "
                        f"{', '.join(MATMUL_PRECISIONS)}")
    jax.config.update("jax_default_matmul_precision", precision)


COMPILE_CACHE_DIR = "compile_cache"


def use_compile_cache(config: Any, workdir: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache, so that a resumed or repeated run loads
    its compiled programs instead of compiling them again (minutes at full size).

    config.compile_cache: "workdir" (W/compile_cache; nothing without a workdir), a folder
    (shared by runs of the same program), or "off". The cache belongs to the process: the
    first folder set here, or JAX_COMPILATION_CACHE_DIR, stays. Returns the folder in use."""
    setting = str(config.get("compile_cache", "off"))
    current = jax.config.jax_compilation_cache_dir
    if current or setting == "off" or (setting == "workdir" and not workdir):
        return current
    path = (os.path.join(os.path.abspath(os.path.expanduser(workdir)), COMPILE_CACHE_DIR)
            if setting == "workdir" else os.path.abspath(os.path.expanduser(setting)))
    try:
        check_writable(path, folder=True)
    except UserError:
        if setting == "workdir":
            # A read-only workdir (a shared release) is fine to evaluate or predict from;
            # JAX would warn at every compiled program that it cannot write there.
            print(f"note: {path} cannot be written: compiling without the persistent "
                  "cache", flush=True)
            return None
        raise UserError(f"compile_cache={setting!r}: cannot write to {path}; give a "
                        "writable folder or --config.compile_cache=off") from None
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def parse_profile_steps(config: Any) -> tuple[int, int] | None:
    """config.profile_steps "a,b" (or "a"): the steps a..b (1-based) to trace."""
    spec = str(config.get("profile_steps", "") or "").strip()
    if not spec:
        return None
    try:
        bounds = [int(x) for x in spec.split(",")]
    except ValueError:
        bounds = []
    if len(bounds) not in (1, 2) or bounds[0] < 1 or bounds[-1] < bounds[0]:
        raise UserError(f"profile_steps={spec!r}: give 'a,b' with 1 <= a <= b (the steps to "
                        "trace) or 'a' for one step")
    return bounds[0], bounds[-1]


def _hw(size) -> tuple[int, int]:
    return (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)


def check_config(config: Any) -> None:
    """Settings that must agree with each other, checked before anything is built."""
    model, data = config.get("model", {}), config.get("data", {})
    image = model.get("image_size") if hasattr(model, "get") else None
    if image is not None:
        # The position tables are built for model.image_size; the reference trains and
        # slides its test window at that one size.
        sizes = {"model.image_size": _hw(image)}
        if hasattr(data, "get") and data.get("crop_size") is not None:
            sizes["data.crop_size"] = _hw(data.crop_size)
        if config.get("evaluation", {}).get("crop_size") is not None:
            sizes["evaluation.crop_size"] = _hw(config.evaluation.crop_size)
        if len(set(sizes.values())) > 1:
            n = _hw(image)[0]
            raise UserError(
                "crop sizes disagree (" + ", ".join(f"{k}={v[0]}" if v[0] == v[1] else
                                                    f"{k}={v}" for k, v in sizes.items())
                + f"): set them together, e.g. --config.model.image_size={n} "
                f"--config.data.crop_size={n} --config.evaluation.crop_size={n}")
    per_group = int(model.get("loss", {}).get("cls_norm_images", 0)) if hasattr(
        model, "get") else 0
    accum = int(config.get("optim", {}).get("grad_accum", 1))
    micro = int(config.get("batch_size", 0)) // max(accum, 1)
    if per_group and micro % per_group:
        raise UserError(
            f"model.loss.cls_norm_images={per_group} (images per class-loss normaliser, "
            f"the reference's per-GPU batch) does not divide the {micro}-image micro-batch "
            f"(batch_size / optim.grad_accum): change one, or set it to 0 for one "
            "normaliser per micro-batch")


def load_pretrained(model: nnx.Module, path: str | None) -> None:
    if path is None:
        return
    from mfuser_jax.weights import WeightFileError
    try:
        model.load_pretrained(path)
    except (FileNotFoundError, WeightFileError) as e:
        raise UserError(f"cannot load pretrained weights from {path}: {e}\n"
                        "re-create them with scripts/convert_weights.py") from None
    unset = abstract_paths(model)
    if unset:  # a pretrained_filter wider than what load_pretrained fills
        raise RuntimeError(f"{type(model).__name__}.load_pretrained left {len(unset)} values "
                           f"unset, e.g. {unset[0]}")


def create_model(config: Any) -> nnx.Module:
    """The model built from shapes (models.factory.init_model): with config.model.pretrained
    set, the frozen encoders the model's pretrained_filter selects are not computed but left
    abstract for load_pretrained to fill; with it empty (tests, smoke runs) every value is
    drawn from its initialiser."""
    return init_model(config.model, seed=int(config.seed),
                      skip_pretrained=bool(config.model.get("pretrained")))


WORKDIR_PRETRAINED = "pretrained"


def build_and_load(config: Any, workdir: str | None = None) -> nnx.Module:
    """The model with its frozen encoders loaded. A workdir holding its own converted
    encoders (W/pretrained, written when a released MFuser checkpoint is converted) uses
    them, so a converted model can never be evaluated with other frozen towers."""
    check_config(config)
    apply_matmul_precision(config)
    own = os.path.join(workdir, WORKDIR_PRETRAINED) if workdir else None
    path = own if own and os.path.isdir(own) else check_pretrained(config)
    if path is not None and path != config.model.get("pretrained"):
        # the model reads files beside its weights from there (SigLIP's spiece.model)
        config = config.copy_and_resolve_references()
        config.model.pretrained = path
    model = create_model(config)
    load_pretrained(model, path)
    return model


def check_trainable_from(model: nnx.Module) -> None:
    """Refuse to train a model whose frozen scalars that releases lack are unknown
    (``VLMRelease.scalars``: SigLIP's logit_scale/logit_bias, in a release converted
    without the SigLIP weights): the score-map loss would be NaN from step 1."""
    vlm = getattr(model, "vlm", None)
    if vlm not in vlm_names():
        return
    spec = get_vlm(vlm)
    unset = []
    for key in spec.release.scalars:
        value = model
        for name in key.split("."):
            value = getattr(value, name)
        if not np.all(np.isfinite(np.asarray(value[...]))):
            unset.append(name)
    if unset:
        raise UserError(f"{spec.title}'s {'/'.join(unset)} are unset in these weights (a "
                        f"release converted without --{vlm}): reconvert with --{vlm} "
                        f"{spec.weights.file} to train; evaluation does not need them")
