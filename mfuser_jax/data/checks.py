"""The data folders a config needs, checked before anything is built: one clear error
naming the path and the layout (training and evaluation)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from mfuser_jax.errors import UserError

__all__ = ["available_eval_datasets", "check_data", "check_data_for_eval"]


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
