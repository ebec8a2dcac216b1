"""Process-wide JAX settings every entry point applies before it compiles (matmul precision,
the persistent compile cache), and the settings of a config that must agree with each other
(checked before anything is built)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from mfuser_jax.errors import UserError
from mfuser_jax.files import check_writable

__all__ = ["COMPILE_CACHE_DIR", "MATMUL_PRECISIONS", "apply_matmul_precision", "check_config",
           "use_compile_cache"]


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
