"""Model registry: configs name a model (`config.model.name`), the training code builds it here.

A model class registered here implements the training protocol used by `mfuser_jax.trainer`:
`loss(images, labels, key) -> (total, parts)`, `predict(images, class_names=None) -> scores`,
`trainable_filter`, `no_decay_filter` and `load_pretrained(path)`; optionally
`pretrained_filter`, the variables `load_pretrained` fills (`init_model` need not compute
them).
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

import jax
from flax import nnx

from mfuser_jax.errors import UserError, WeightFileError
from mfuser_jax.model.config import DEFAULT_VFM
from mfuser_jax.towers.registry import get_vfm, get_vlm

# name -> callable(model_config, *, rngs) -> nnx.Module
MODEL_REGISTRY: dict[str, Callable[..., nnx.Module]] = {}

# Models registered on first use, so that importing the factory never imports a heavy
# model file (and works before that file exists): name -> (module path, class name).
_LAZY_MODELS: dict[str, tuple[str, str]] = {
        "mfuser": ("mfuser_jax.model.mfuser", "MFuser"),
}


def register_model(name: str):
    """Decorator: `@register_model("toy") class Toy(nnx.Module): ...` (or a factory function)."""

    def decorator(builder):
        MODEL_REGISTRY[name] = builder
        return builder

    return decorator


def _resolve(name: str) -> Callable[..., nnx.Module]:
    if name in MODEL_REGISTRY:
        return MODEL_REGISTRY[name]
    if name in _LAZY_MODELS:
        module_name, attr = _LAZY_MODELS[name]
        module = importlib.import_module(module_name)
        # The module may register itself on import; otherwise take the class by name.
        if name not in MODEL_REGISTRY:
            MODEL_REGISTRY[name] = getattr(module, attr)
        return MODEL_REGISTRY[name]
    known = sorted(set(MODEL_REGISTRY) | set(_LAZY_MODELS))
    raise ValueError(f"unknown model name {name!r} in config.model.name; known: {known}")


def build_model(model_config: Any, *, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model named by `model_config.name` with its parameters on the default device."""
    return _resolve(model_config.name)(model_config, rngs=rngs)


def trainable(model: nnx.Module) -> nnx.filterlib.Filter:
    """The filter of what the optimizer updates: the model's trainable parameters."""
    return nnx.All(nnx.Param, model.trainable_filter)


def checkpointed(model: nnx.Module) -> nnx.filterlib.Filter:
    """What training changes and a checkpoint holds: the trainable parameters and the
    batch statistics (model_state.split_model's first two parts)."""
    return nnx.Any(trainable(model), nnx.BatchStat)


def init_model(model_config: Any, *, seed: int, skip_pretrained: bool = False,
               skip_checkpointed: bool = False, skip: Any = None) -> nnx.Module:
    """`build_model` without computing what is not needed: the structure from
    `nnx.eval_shape`, then the values from one jitted run of the constructor that returns
    only the wanted ones, so XLA leaves the others out (`compute_values`).

    `skip_pretrained`: the variables the model's `pretrained_filter` selects (the frozen
    encoders `load_pretrained(path)` then fills) stay abstract, `jax.ShapeDtypeStruct`; a
    model without that filter is built whole. `skip_checkpointed`: so do the variables a
    checkpoint holds (`checkpointed`), for a restore to fill. `skip`: an nnx filter of more
    variables to leave abstract (what a loader then fills, e.g. every parameter for a strict
    load of a released checkpoint). Each value depends on `seed` alone, not on what is
    skipped.
    """
    build = lambda: build_model(model_config, rngs=nnx.Rngs(seed))  # noqa: E731
    model = nnx.eval_shape(build)
    skips = [f for f in (getattr(model, "pretrained_filter", None) if skip_pretrained else None,
                         checkpointed(model) if skip_checkpointed else None,
                         skip) if f is not None]
    compute_values(model, build, nnx.Not(nnx.Any(*skips)) if skips else ...)
    return model


def compute_values(model: Any, build: Callable[[], Any], wanted: Any) -> None:
    """Fill the values of `model` (`nnx.eval_shape(build)`: a module or a tuple of them)
    that the nnx filter `wanted` selects, from one jitted run of `build` that returns only
    those: XLA drops every computation they do not need. Nothing runs when nothing is
    selected; the rest stays as it is."""
    if jax.tree.leaves(nnx.state(model, wanted)):
        nnx.update(model, jax.jit(lambda: nnx.state(build(), wanted))())


def abstract_paths(model: nnx.Module, *filters: Any) -> list[str]:
    """Paths of the values still abstract (`jax.ShapeDtypeStruct`): none once loaded;
    among the variables `filters` select, if given."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, *filters))
    return [jax.tree_util.keystr(path) for path, x in leaves
            if isinstance(x, jax.ShapeDtypeStruct)]


def require_concrete(model: Any, what: str) -> None:
    """RuntimeError naming the values of `model` still abstract: neither loaded nor
    computed (e.g. a parameter the loader does not reach), they would otherwise fail
    later with a less clear error."""
    left = abstract_paths(model)
    if left:
        raise RuntimeError(f"{what}: {len(left)} values were neither loaded nor computed: "
                           + ", ".join(left[:8]) + (" ..." if len(left) > 8 else ""))


# ------------------------------------------------------------------ the programs' model

def check_pretrained(config: Any) -> str | None:
    """The converted-encoder folder config.model.pretrained names (None: random encoders);
    a missing one is a UserError saying how to create it."""
    path = config.model.get("pretrained", "") or ""
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        vlm, vfm = config.model.vlm, config.model.get("vfm", DEFAULT_VFM)
        try:
            vlm_file = get_vlm(vlm).convert_args()
        except ValueError:  # not a registered VLM: a model of its own (model.factory)
            vlm_file = f"--{vlm} FILE"
        try:
            vfm_spec = get_vfm(vfm)
            vfm_file, vfm_title = f"--{vfm} {vfm_spec.weights.file}", vfm_spec.title
        except ValueError:
            vfm_file, vfm_title = f"--{vfm} FILE", vfm
        raise UserError(
            f"pretrained weights not found: {path}\n"
            f"convert the original {vfm_title} and {vlm} checkpoints first:\n"
            f"  python scripts/convert_weights.py --config <this config> {vfm_file} "
            f"{vlm_file} --out DIR\n"
            "then pass --config.model.pretrained=DIR (or '' to train from random weights)")
    return path


def load_pretrained(model: nnx.Module, path: str | None) -> None:
    """Fill ``model``'s frozen encoders from ``path`` (None: leave them); a file that does
    not fit is a UserError saying how to re-create it."""
    if path is None:
        return
    try:
        model.load_pretrained(path)
    except (FileNotFoundError, WeightFileError) as e:
        raise UserError(f"cannot load pretrained weights from {path}: {e}\n"
                        "re-create them with scripts/convert_weights.py") from None
    # what a restore fills (create_model's skip_checkpointed) may still be abstract
    unset = abstract_paths(model, getattr(model, "pretrained_filter", ...))
    if unset:  # a pretrained_filter wider than what load_pretrained fills
        raise RuntimeError(f"{type(model).__name__}.load_pretrained left {len(unset)} values "
                           f"unset, e.g. {unset[0]}")


def create_model(config: Any, *, skip_checkpointed: bool = False) -> nnx.Module:
    """The model built from shapes (``init_model``): with config.model.pretrained
    set, the frozen encoders the model's pretrained_filter selects are not computed but left
    abstract for load_pretrained to fill; with it empty (tests, smoke runs) every value is
    drawn from its initialiser. `skip_checkpointed`: what a checkpoint holds stays abstract
    too (a restore fills it)."""
    return init_model(config.model, seed=int(config.seed),
                      skip_pretrained=bool(config.model.get("pretrained")),
                      skip_checkpointed=skip_checkpointed)
