"""The optimizer: mmcv's poly schedule with warm-up, AdamW with masked weight decay and
per-group learning-rate multipliers, and the finiteness test of the train step's guard.

Reference recipe (MFuser's mmseg configs): AdamW lr 1e-4, weight decay 1e-4 (none on norms),
poly decay power 0.9 to 1e-6 after a 1,500-step linear warm-up (mmcv semantics), 20k steps.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax


def lr_schedule(optim: Any, total_steps: int) -> optax.Schedule:
    """mmcv's poly policy with linear warm-up: lr(t) = (lr0 - min_lr)(1 - t/T)^p + min_lr,
    multiplied during warm-up by 1 - (1 - t/W)(1 - warmup_ratio)."""
    lr0, min_lr = float(optim.lr), float(optim.min_lr)
    power, warmup = float(optim.power), int(optim.warmup_steps)
    ratio = float(optim.get("warmup_ratio", 1e-6))
    total = float(max(total_steps, 1))

    def schedule(step):
        t = jnp.minimum(jnp.asarray(step, jnp.float32), total)
        lr = (lr0 - min_lr) * (1.0 - t / total) ** power + min_lr
        if warmup > 0:
            # 1 - (1 - t/W)(1 - r), written without the float32 cancellation at t = 0
            lr = jnp.where(t < warmup, lr * (ratio + (1.0 - ratio) * t / warmup), lr)
        return lr

    return schedule


def path_str(path) -> str:
    """A tree path as 'backbone/adapter/0/A_log' (what optim.lr_mults' regexes match)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def lr_multiplier_labels(rules: list[tuple[re.Pattern, float]], params: dict) -> dict:
    """Each parameter's group: the multiplier of the first rule whose regex matches its path
    (re.search), 1.0 when none does."""
    def label(path, _):
        name = path_str(path)
        return next((m for rx, m in rules if rx.search(name)), 1.0)

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(optim: Any, total_steps: int, params: dict, decay_mask: dict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with masked weight decay and per-group lr multipliers.

    `optim.lr_mults`: (regex, multiplier) pairs matched (re.search) against the
    '/'-joined parameter path; the first match wins. Multiplying the AdamW update equals
    scaling that group's learning rate (its decay is scaled too, as in torch param groups).
    `decay_mask`: True for the parameters that decay, in the tree of `params`.

    The optimizer state is the chain's: (clip_by_global_norm's, when optim.grad_clip > 0),
    AdamW's, then optax.partition's (when there are lr_mults; its groups hold no arrays).
    """
    schedule = lr_schedule(optim, total_steps)
    rules = [(re.compile(p), float(m)) for p, m in optim.get("lr_mults", ())]
    parts = []
    if float(optim.get("grad_clip", 0.0)) > 0:
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2),
                             eps=float(optim.eps), weight_decay=float(optim.weight_decay),
                             mask=decay_mask))
    if rules:
        groups = {m: optax.identity() if m == 1.0 else optax.scale(m)
                  for m in {1.0, *(m for _, m in rules)}}
        parts.append(optax.partition(groups, lr_multiplier_labels(rules, params)))
    return optax.chain(*parts), schedule


def pre_partition_layout(opt_state: Any) -> Any | None:
    """`opt_state` as checkpoints written before the lr multipliers went through
    optax.partition lay it out: an optax.EmptyState where the PartitionState is now. Neither
    holds an array, so every array keeps its path. None without lr multipliers (the layout
    did not change)."""
    if isinstance(opt_state, tuple) and opt_state and isinstance(
            opt_state[-1], optax.PartitionState):
        return (*opt_state[:-1], optax.EmptyState())
    return None


def all_finite(tree) -> jax.Array:
    """Whether every entry of every leaf is finite: x * 0 is 0 for a finite x and NaN for
    an Inf or NaN, so one sum answers (exactly; a norm could overflow on large finite
    values)."""
    leaves = jax.tree.leaves(tree)
    return jnp.isfinite(sum(jnp.sum(x * 0) for x in leaves)) if leaves else jnp.asarray(True)
