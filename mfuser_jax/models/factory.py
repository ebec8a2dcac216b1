"""Model registry: configs name a model (`config.model.name`), the training code builds it here.

A model class registered here implements the training protocol used by `mfuser_jax.trainer`:
`loss(images, labels, key) -> (total, parts)`, `predict(images, class_names=None) -> scores`,
`trainable_filter`, `no_decay_filter` and `load_pretrained(path)`.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from flax import nnx

# name -> callable(model_config, *, rngs) -> nnx.Module
MODEL_REGISTRY: dict[str, Callable[..., nnx.Module]] = {}

# Models registered on first use, so that importing the factory never imports a heavy
# model file (and works before that file exists): name -> (module path, class name).
_LAZY_MODELS: dict[str, tuple[str, str]] = {
        "mfuser": ("mfuser_jax.models.mfuser", "MFuser"),
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
