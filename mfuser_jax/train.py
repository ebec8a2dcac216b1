"""Training loop: optimizer, sharded train step, Orbax checkpoints, logging and evaluation.

`train_and_evaluate(config, workdir)` is the whole job behind scripts/train.py. The state that
changes during training is kept as plain nested dicts (trainable params, batch statistics,
optax state): that is what the optimizer sees and what Orbax stores. Frozen params and other
model variables are rebuilt from the config (and the converted pretrained weights) on every
start, so a checkpoint holds only what training changed. Data are a pure function of
(seed, step, process), so the step number is the data position.

Reference recipe (MFuser's mmseg configs): AdamW lr 1e-4, weight decay 1e-4 (none on norms),
poly decay power 0.9 to 1e-6 after a 1,500-step linear warm-up (mmcv semantics), 20k steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mfuser_jax import sharding as shd
from mfuser_jax.errors import Preempted, TrainingDiverged, UserError  # noqa: F401
from mfuser_jax.evaluate import eval_json_path, evaluate_model
from mfuser_jax.models.factory import abstract_paths, build_model, init_model
from mfuser_jax.workdir import check_workdir_model, write_config


# --------------------------------------------------------------------------- optimizer

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


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)


def _scale_by_tree(factors: Any) -> optax.GradientTransformation:
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, f: u * f, updates, factors), state

    return optax.GradientTransformation(init, update)


def make_optimizer(optim: Any, total_steps: int, params: dict, decay_mask: dict
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with masked weight decay and per-group lr multipliers.

    `optim.lr_mults`: (regex, multiplier) pairs matched (re.search) against the
    '/'-joined parameter path; the first match wins. Multiplying the AdamW update equals
    scaling that group's learning rate (its decay is scaled too, as in torch param groups).
    """
    schedule = lr_schedule(optim, total_steps)
    rules = [(re.compile(p), float(m)) for p, m in optim.get("lr_mults", ())]

    def mult(path, _):
        name = _path_str(path)
        return next((m for rx, m in rules if rx.search(name)), 1.0)

    parts = []
    if float(optim.get("grad_clip", 0.0)) > 0:
        parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2),
                             eps=float(optim.eps), weight_decay=float(optim.weight_decay),
                             mask=decay_mask))
    if rules:
        parts.append(_scale_by_tree(jax.tree_util.tree_map_with_path(mult, params)))
    return optax.chain(*parts), schedule


def all_finite(tree) -> jax.Array:
    """Whether every entry of every leaf is finite: x * 0 is 0 for a finite x and NaN for
    an Inf or NaN, so one sum answers (exactly; a norm could overflow on large finite
    values)."""
    leaves = jax.tree.leaves(tree)
    return jnp.isfinite(sum(jnp.sum(x * 0) for x in leaves)) if leaves else jnp.asarray(True)


# --------------------------------------------------------------------------- train state

@dataclasses.dataclass
class TrainState:
    params: dict
    batch_stats: dict
    opt_state: Any
    step: int

    def tree(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats,
                "opt_state": self.opt_state}


def _flat_paths(state: nnx.State) -> list[tuple]:
    return [tuple(p) for p, _ in nnx.to_flat_state(state)]


class Trainer:
    """Holds the split model and the jitted, sharded train step."""

    def __init__(self, config: Any, model: nnx.Module, mesh: jax.sharding.Mesh):
        self.config = config
        self.mesh = mesh
        self.model = model
        model.train()
        trainable = nnx.All(nnx.Param, model.trainable_filter)
        self.graphdef, params, batch_stats, rest = nnx.split(
            model, trainable, nnx.BatchStat, ...)
        # nnx.State <-> plain dict by leaf order: both flatten in sorted-key order; checked.
        self._p_def = jax.tree.structure(params)
        self._b_def = jax.tree.structure(batch_stats)
        p_pure, b_pure = params.to_pure_dict(), batch_stats.to_pure_dict()
        for st, pure in ((params, p_pure), (batch_stats, b_pure)):
            pure_paths = [tuple(getattr(k, "key", k) for k in p)
                          for p, _ in jax.tree_util.tree_flatten_with_path(pure)[0]]
            assert pure_paths == _flat_paths(st), "nnx.State / dict leaf orders differ"
        no_decay = set(_flat_paths(nnx.state(model, nnx.All(trainable,
                                                             model.no_decay_filter))))
        decay_mask = jax.tree_util.tree_map_with_path(
            lambda path, _: tuple(getattr(k, "key", k) for k in path) not in no_decay, p_pure)

        self.tx, self.schedule = make_optimizer(config.optim, int(config.total_steps),
                                                p_pure, decay_mask)
        fsdp = int(config.get("sharding", {}).get("fsdp_min_size", 0))
        self.rest_shardings = shd.tree_shardings(rest, mesh, fsdp_min_size=fsdp)
        # An abstract model (nnx.eval_shape) only lowers and compiles the step: see lower().
        self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(rest))
        if self.abstract:
            self.rest = rest
        else:
            self.rest = shd.put_global(rest, self.rest_shardings)
            nnx.update(model, self.rest)  # drop the unplaced copy of the frozen weights
        self.param_shardings = shd.tree_shardings(p_pure, mesh)
        self.bs_shardings = shd.tree_shardings(b_pure, mesh)
        self._init_params, self._init_bs = p_pure, b_pure
        opt_shape = jax.eval_shape(self.tx.init, p_pure)
        self.opt_shardings = shd.tree_shardings(opt_shape, mesh)
        self.base_key = jax.random.key(int(config.seed))
        self.accum = int(config.optim.get("grad_accum", 1))
        batch = shd.batch_sharding(mesh)
        repl = shd.replicated(mesh)
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.param_shardings, self.bs_shardings, self.rest_shardings,
                          self.opt_shardings, batch, batch, repl),
            out_shardings=(self.param_shardings, self.bs_shardings, self.opt_shardings,
                           repl),
            donate_argnums=(0, 1, 3))

    def num_params(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self._init_params))
        n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
            nnx.state(self.model, nnx.Param)))
        return n_train, n_all

    def init_state(self) -> TrainState:
        params = shd.put_global(self._init_params, self.param_shardings)
        bs = shd.put_global(self._init_bs, self.bs_shardings)
        opt = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        return TrainState(params, bs, opt, 0)

    def abstract_tree(self) -> dict:
        def sds(x, s):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return {"params": jax.tree.map(sds, self._init_params, self.param_shardings),
                "batch_stats": jax.tree.map(sds, self._init_bs, self.bs_shardings),
                "opt_state": jax.tree.map(sds, jax.eval_shape(self.tx.init,
                                                              self._init_params),
                                          self.opt_shardings)}

    def lower(self, batch_size: int, image_size: int):
        """The train step lowered for a global batch of ``batch_size`` images of
        ``image_size`` px, from shapes alone (no data, no weights needed)."""
        def sds(x, s):
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)
        tree = self.abstract_tree()
        batch = shd.batch_sharding(self.mesh)
        images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8,
                                      sharding=batch)
        labels = jax.ShapeDtypeStruct((batch_size, image_size, image_size), jnp.int32,
                                      sharding=batch)
        rest = jax.tree.map(sds, self.rest, self.rest_shardings)
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(self.mesh))
        return self._step.lower(tree["params"], tree["batch_stats"], rest, tree["opt_state"],
                                images, labels, step)

    def merged_model(self, state: TrainState) -> nnx.Module:
        """Writes the trained params and batch statistics back into the host model."""
        nnx.update(self.model, jax.tree.unflatten(self._p_def, jax.tree.leaves(state.params)),
                   jax.tree.unflatten(self._b_def, jax.tree.leaves(state.batch_stats)))
        return self.model

    # The step, traced once: grads w.r.t. the trainable params only.
    def _loss(self, params, batch_stats, rest, images, labels, key):
        model = nnx.merge(self.graphdef,
                          jax.tree.unflatten(self._p_def, jax.tree.leaves(params)),
                          jax.tree.unflatten(self._b_def, jax.tree.leaves(batch_stats)),
                          rest, copy=True)  # fresh Variables: the loss may advance RNG counts
        model.train()
        total, parts = model.loss(images, labels, key)
        new_bs = nnx.state(model, nnx.BatchStat).to_pure_dict()
        return total.astype(jnp.float32), (parts, new_bs)

    def _train_step(self, params, batch_stats, rest, opt_state, images, labels, step):
        key = jax.random.fold_in(self.base_key, step)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        if self.accum <= 1:
            (total, (parts, new_bs)), grads = grad_fn(params, batch_stats, rest, images,
                                                      labels, key)
        else:
            total, parts, new_bs, grads = self._accumulate(grad_fn, params, batch_stats,
                                                           rest, images, labels, key)
        finite = jnp.isfinite(total) & all_finite(grads)

        def apply(_):
            updates, new_opt = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_bs, new_opt

        # NaN/Inf guard: a bad step changes nothing; the host stops at its next check. One
        # cond, not a select per leaf: per-leaf selects made XLA compile ~20 s longer.
        new_params, new_bs, new_opt = jax.lax.cond(
            finite, apply, lambda _: (params, batch_stats, opt_state), None)
        metrics = {"loss": total, **{k: jnp.asarray(v, jnp.float32) for k, v in parts.items()},
                   "finite": finite}
        return new_params, new_bs, new_opt, metrics

    def _accumulate(self, grad_fn, params, batch_stats, rest, images, labels, key):
        """Mean of `accum` micro-batch gradients (lax.scan); batch stats carried through.

        Micro-batch i takes rows i, i+accum, ...: each device keeps its own rows, so the
        split needs no communication."""
        n = self.accum
        b = images.shape[0]
        if b % n:
            raise UserError(f"batch_size {b} is not divisible by optim.grad_accum {n}")
        spec = jax.sharding.PartitionSpec(None, shd.DATA_AXIS)
        split = lambda x: jax.lax.with_sharding_constraint(
            jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1),
            jax.sharding.NamedSharding(self.mesh, spec))
        ims, lbs = split(images), split(labels)
        out_shape = jax.eval_shape(grad_fn, params, batch_stats, rest, ims[0], lbs[0], key)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
        (_, (parts0, _)), grads0 = zeros

        def body(carry, xs):
            bs, tot, parts, grads = carry
            im, lb, i = xs
            (t, (p, bs)), g = grad_fn(params, bs, rest, im, lb, jax.random.fold_in(key, i))
            add = lambda a, c: jax.tree.map(jnp.add, a, c)
            return (bs, tot + t, add(parts, p), add(grads, g)), None

        init = (batch_stats, jnp.zeros((), jnp.float32), parts0, grads0)
        (bs, tot, parts, grads), _ = jax.lax.scan(body, init, (ims, lbs, jnp.arange(n)))
        scale = lambda t: jax.tree.map(lambda x: x / n, t)
        return tot / n, scale(parts), bs, scale(grads)

    def step(self, state: TrainState, batch: dict[str, np.ndarray]) -> tuple[TrainState, dict]:
        g = shd.global_batch({"image": batch["image"], "label": batch["label"]}, self.mesh)
        params, bs, opt, metrics = self._step(state.params, state.batch_stats, self.rest,
                                              state.opt_state, g["image"], g["label"],
                                              np.int32(state.step))
        return TrainState(params, bs, opt, state.step + 1), metrics


# --------------------------------------------------------------------------- checkpoints

def checkpoint_manager(workdir: str, keep: int = 2, *, create: bool = True):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def save_checkpoint(mngr, state: TrainState) -> None:
    import orbax.checkpoint as ocp
    meta = {"step": int(state.step), "data_position": int(state.step)}
    mngr.save(state.step, args=ocp.args.Composite(state=ocp.args.StandardSave(state.tree()),
                                                  meta=ocp.args.JsonSave(meta)))


def restore_checkpoint(mngr, trainer: Trainer, step: int) -> TrainState:
    import orbax.checkpoint as ocp
    try:
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(trainer.abstract_tree()),
            meta=ocp.args.JsonRestore()))
    except ValueError as e:  # Orbax's (long) tree or shape diff
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {mngr.directory}/{step} does not fit the model this "
                        f"config builds ({first}); was it trained with another config?"
                        ) from None
    tree = out["state"]
    return TrainState(tree["params"], tree["batch_stats"], tree["opt_state"],
                      int(out["meta"]["step"]))


# --------------------------------------------------------------------------- setup checks

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


def check_pretrained(config: Any) -> str | None:
    path = config.model.get("pretrained", "") or ""
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        vlm = config.model.vlm
        vlm_file = {"clip": "--clip ViT-L-14-336px.pt",
                    "eva02": "--eva02 EVA02_CLIP_L_336_psz14_s6B.pt",
                    "siglip": "--siglip siglip_vitl16_384.pth --siglip_tokenizer spiece.model",
                    }.get(vlm, f"--{vlm} FILE")
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
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"compile_cache={setting!r}: cannot create {path} ({e.strerror}); "
                        "give a writable folder or --config.compile_cache=off") from None
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
    from mfuser_jax.convert import WeightFileError
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


def compile_train_step(config: Any, workdir: str | None = None,
                       log: Callable[[str], None] = print) -> dict:
    """Build the model from shapes only, then lower and compile the train step at the
    config's global batch and crop size: no data, no weights, no device memory for them.
    With a workdir, the compiled step goes into its compile cache (config.compile_cache), so
    training there starts without compiling. Returns times (s) and XLA's memory analysis
    (bytes per device)."""
    apply_matmul_precision(config)
    use_compile_cache(config, workdir)
    mesh = shd.make_mesh(config.get("mesh", None))
    t0 = time.perf_counter()
    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(int(config.seed))))
    trainer = Trainer(config, model, mesh)
    t1 = time.perf_counter()
    n_train, n_all = (sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
                      for t in (trainer._init_params, nnx.state(model, nnx.Param)))
    log(f"model: {n_all:,} parameters, {n_train:,} trainable (built from shapes in "
        f"{t1 - t0:.1f} s); compiling the train step for batch {config.batch_size} "
        f"at {config.data.crop_size} px ...")
    lowered = trainer.lower(int(config.batch_size), int(config.data.crop_size))
    t2 = time.perf_counter()
    hits = []
    on_event = lambda event, **kw: hits.append(event)  # noqa: E731
    jax.monitoring.register_event_listener(on_event)
    try:
        compiled = lowered.compile()
    finally:
        jax.monitoring.unregister_event_listener(on_event)
    t3 = time.perf_counter()
    mem = compiled.memory_analysis()
    report = dict(build_s=t1 - t0, trace_s=t2 - t1, compile_s=t3 - t2, params=n_all,
                  trainable=n_train, devices=mesh.size,
                  from_cache="/jax/compilation_cache/cache_hits" in hits)
    for field in ("temp", "argument", "output", "alias", "generated_code"):
        report[f"{field}_bytes"] = int(getattr(mem, f"{field}_size_in_bytes", 0) or 0)
    gib = lambda n: n / 2**30  # noqa: E731
    source = " (loaded from the compile cache)" if report["from_cache"] else ""
    log(f"compiled in {report['compile_s']:.1f} s{source} (tracing {report['trace_s']:.1f} s); "
        f"per device: temporaries {gib(report['temp_bytes']):.2f} GiB, arguments "
        f"{gib(report['argument_bytes']):.2f} GiB, outputs {gib(report['output_bytes']):.2f} "
        f"GiB ({gib(report['alias_bytes']):.2f} GiB donated and reused)")
    return report


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
    """Refuse to train a model whose frozen SigLIP logit scalars are unknown (a converted
    release without the SigLIP weights): the score-map loss would be NaN from step 1."""
    backbone = getattr(model, "backbone", None)
    scalars = [getattr(backbone, n, None) for n in ("logit_scale", "logit_bias")]
    if any(v is not None and not np.all(np.isfinite(np.asarray(v[...]))) for v in scalars):
        raise UserError("SigLIP's logit_scale/logit_bias are unset in these weights (a "
                        "release converted without --siglip): reconvert with --siglip "
                        "siglip_vitl16_384.pth to train; evaluation does not need them")


# --------------------------------------------------------------------------- logging

class MetricWriter:
    """metrics.jsonl + TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, resume_step: int):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if not self.active:
            return
        # Drop lines a killed run wrote after its last checkpoint: they are redone.
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [ln for ln in f if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            if len(keep) != len(lines):
                with open(self.path, "w") as f:
                    f.writelines(keep)
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(workdir)
        except ImportError:
            self.tb = None

    def write(self, record: dict, prefix: str) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            tag = prefix + (f"/{record['dataset']}" if "dataset" in record else "")
            for k, v in record.items():
                if k not in ("step", "dataset") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{tag}/{k}", v, step)
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


CONSOLE_WIDTH = 120


def format_step_line(step: int, total: int, loss: float, lr: float,
                     images_per_s: float | None, eta_s: float | None) -> str:
    """'step   40/600 | loss  12.3456 | lr 1.00e-03 |   45.6 img/s | ETA 3m20s': fixed
    columns, well under CONSOLE_WIDTH. No rate yet (None): the window held compilation."""
    n = len(str(total))
    speed = (f"{images_per_s:7.1f} img/s | ETA {_fmt_time(eta_s)}"
             if images_per_s is not None else "compiling (rate and ETA on the next line)")
    return f"step {step:>{n}}/{total} | loss {loss:8.4f} | lr {lr:.2e} | {speed}"


def format_loss_parts(parts: dict[str, float], width: int = CONSOLE_WIDTH) -> str:
    """The per-part losses (config.log_parts), wrapped and indented under a step line."""
    import textwrap
    text = "  ".join(f"{k} {v:.4f}" for k, v in parts.items())
    return textwrap.fill(text, width=width, initial_indent="    ", subsequent_indent="    ",
                         break_on_hyphens=False)


class StopSignals:
    """SIGTERM and Ctrl-C during training: finish the current step, save it, stop.

    The first signal only records itself; the loop checks after every step. A first Ctrl-C
    says so at once and restores the default handler, so a second one ends the process
    immediately. Ctrl-C during an evaluation abandons it (`evaluating`), so the checkpoint
    follows promptly; the resumed run evaluates that step again. Outside the main thread
    (no signals there) and for a SIGINT the parent ignores (background jobs), nothing is
    installed."""

    NOTICE = (b"\nCtrl-C: saving a checkpoint after the current step (Ctrl-C again quits "
              b"at once, without it)\n")

    def __init__(self):
        self.signum: int | None = None
        self.evaluating = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        del frame
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.write(2, self.NOTICE)  # not print(): the main thread may be inside one
            if self.evaluating:
                raise KeyboardInterrupt

    def evaluate(self, fn: Callable[[], Any]) -> None:
        """Runs an evaluation; a Ctrl-C during it abandons it (nothing half-written: the
        per-dataset JSON files are replaced atomically)."""
        self.evaluating = True
        try:
            fn()
        except KeyboardInterrupt:
            if self.signum is None:
                raise
        finally:
            self.evaluating = False

    def message(self, step: int, workdir: str) -> str:
        what = "interrupted (Ctrl-C)" if self.signum == signal.SIGINT else "SIGTERM"
        return (f"{what}: checkpoint of step {step} saved in {workdir}/checkpoints; "
                "rerun the same command to resume")


# --------------------------------------------------------------------------- main loop

def _default_train_iter(config, *, start_step, process_index, process_count):
    from mfuser_jax.data.pipeline import make_train_iterator
    return make_train_iterator(config, start_step=start_step, process_index=process_index,
                               process_count=process_count)


def _eval_done(workdir: str, datasets: list[str], step: int) -> bool:
    return all(os.path.exists(eval_json_path(workdir, d, step)) for d in datasets)


class StepProfiler:
    """A jax.profiler trace of the steps first..last (1-based) into `logdir`, which
    TensorBoard's profile plugin reads (tensorboard --logdir W)."""

    def __init__(self, steps: tuple[int, int] | None, logdir: str, log: Callable[[str], None]):
        self.steps, self.logdir, self.log, self.active = steps, logdir, log, False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self.active:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)  # the trace holds the steps' device work
            self.stop()
            self.log(f"profile of steps {self.steps[0]}-{self.steps[1]} in {self.logdir} "
                     f"(tensorboard --logdir {self.logdir})")

    def stop(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


def train_and_evaluate(config: Any, workdir: str, *,
                       train_iter_fn: Callable[..., Iterator[dict]] | None = None,
                       eval_iter_fn: Callable[..., Any] | None = None,
                       log: Callable[[str], None] | None = None) -> dict:
    """Trains (resuming from W/checkpoints if present), evaluates, returns the last metrics.

    `train_iter_fn` / `eval_iter_fn` replace the data pipeline's iterator factories
    (same signatures as mfuser_jax.data.pipeline.make_train_iterator / make_eval_iterator).
    """
    shd.maybe_initialize_distributed(config)
    is_main = jax.process_index() == 0
    log = log or (lambda s: print(s, flush=True) if is_main else None)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    total_steps = int(config.total_steps)
    check_data(config)
    check_pretrained(config)
    check_workdir_model(config, workdir)  # before config.json records this config
    profile = parse_profile_steps(config)
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        write_config(workdir, config)
    use_compile_cache(config, workdir)
    eval_sets = available_eval_datasets(config, log)

    mngr = checkpoint_manager(workdir, int(config.get("keep_checkpoints", 2)))
    latest = mngr.latest_step()
    if latest is not None and latest >= total_steps and _eval_done(workdir, eval_sets,
                                                                    latest):
        log(f"{workdir}: training already finished at step {latest}; nothing to do")
        mngr.close()
        return {"step": latest}

    mesh = shd.make_mesh(config.get("mesh", None))
    model = build_and_load(config, workdir)
    trainer = Trainer(config, model, mesh)
    n_train, n_all = trainer.num_params()
    log(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
        f"{jax.process_count()} process(es); params: {n_train:,} trainable of {n_all:,}")
    if latest is not None:
        state = restore_checkpoint(mngr, trainer, latest)
        log(f"resumed from {workdir}/checkpoints/{latest}")
    else:
        state = trainer.init_state()
    if state.step < total_steps:
        check_trainable_from(model)

    writer = MetricWriter(workdir, state.step)
    train_iter_fn = train_iter_fn or _default_train_iter
    batches = iter(train_iter_fn(config, start_step=state.step,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count()))
    log_every = max(int(config.log_every), 1)
    ckpt_every = max(int(config.checkpoint_every), 1)
    eval_every = max(int(config.eval_every), 1)
    batch_size = int(config.batch_size)
    log_parts = bool(config.get("log_parts", False))

    pending: list[tuple[int, dict]] = []
    last: dict = {"step": state.step}
    t_window, n_window, warmed_up = time.time(), 0, False

    def flush():
        """Fetches pending step metrics; stops on a non-finite step; logs the window mean."""
        nonlocal t_window, n_window, last, warmed_up
        if not pending:
            return
        fetched = [(s, {k: float(shd.to_host(v)) for k, v in m.items()}) for s, m in pending]
        pending.clear()
        bad = [s for s, m in fetched if not m["finite"]]
        if bad:
            raise TrainingDiverged(
                f"non-finite loss or gradient in step {bad[0] + 1}: training stopped; the "
                f"last good checkpoint in {workdir}/checkpoints is kept (lower "
                "optim.lr, enable optim.grad_clip or use float32 compute)")
        end = fetched[-1][0] + 1
        keys = [k for k in fetched[-1][1] if k != "finite"]
        mean = {k: float(np.mean([m[k] for _, m in fetched])) for k in keys}
        lr = float(trainer.schedule(end - 1))
        record = {"step": end, **mean, "lr": lr}
        writer.write(record, "train")
        dt = time.time() - t_window
        # The first window after (re)start holds the step's compilation: no rate from it.
        ips = n_window * batch_size / max(dt, 1e-9) if warmed_up else None
        eta = (total_steps - end) * dt / max(n_window, 1)
        log(format_step_line(end, total_steps, mean["loss"], lr, ips, eta))
        if log_parts:
            log(format_loss_parts({k: v for k, v in mean.items() if k != "loss"}))
        t_window, n_window, warmed_up = time.time(), 0, True
        last = record

    def evaluate(step):
        model_now = trainer.merged_model(state)
        res = evaluate_model(model_now, config, step=step, workdir=workdir,
                             datasets=eval_sets, eval_iter_fn=eval_iter_fn, log=log,
                             mesh=mesh)
        for name, miou in res.items():
            writer.write({"step": step, "dataset": name, "miou": miou}, "eval")
        return res

    def eval_due(step):
        return step % eval_every == 0 or step == total_steps

    profiler = StepProfiler(profile, os.path.join(workdir, "profile"), log)
    try:
        with StopSignals() as stop:
            if latest is not None and eval_due(latest) and not _eval_done(
                    workdir, eval_sets, latest):
                # a run stopped before (or while) evaluating its last checkpoint
                stop.evaluate(lambda: evaluate(latest))
            while state.step < total_steps and stop.signum is None:
                batch = next(batches)
                step_idx = state.step
                profiler.before(step_idx + 1)
                state, metrics = trainer.step(state, batch)
                profiler.after(step_idx + 1, metrics)
                pending.append((step_idx, metrics))
                n_window += 1
                done = state.step
                if done % log_every == 0 or done == total_steps:
                    flush()
                if done % ckpt_every == 0 or done == total_steps or stop.signum:
                    flush()
                    save_checkpoint(mngr, state)
                if eval_due(done) and stop.signum is None:
                    flush()
                    mngr.wait_until_finished()
                    stop.evaluate(lambda: evaluate(done))
                    if stop.signum and done % ckpt_every and done != total_steps:
                        save_checkpoint(mngr, state)  # stopped during an unsaved step's eval
                    t_window = time.time()  # keep evaluation out of the images/s figure
            mngr.wait_until_finished()
            if stop.signum is not None:
                raise Preempted(stop.message(state.step, workdir), stop.signum)
    finally:
        profiler.stop()
        mngr.close()
        writer.close()
    return last


def restore_model(config: Any, workdir: str, step: int | None = None
                  ) -> tuple[nnx.Module, int]:
    """The model with the trained state of W/checkpoints/<step> (default latest)."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    hint = "train first: python scripts/train.py --config C --workdir W"
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"no checkpoints in {ckpt_dir}\n{hint}")
    check_workdir_model(config, workdir)
    use_compile_cache(config, workdir)
    mngr = checkpoint_manager(workdir, create=False)
    try:
        steps = sorted(mngr.all_steps())
        if not steps:
            raise UserError(f"no checkpoints in {ckpt_dir}\n{hint}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise UserError(f"no checkpoint for step {step} in {ckpt_dir} "
                            f"(available: {', '.join(map(str, steps))})")
        mesh = shd.make_mesh(config.get("mesh", None))
        model = build_and_load(config, workdir)
        trainer = Trainer(config, model, mesh)
        state = restore_checkpoint(mngr, trainer, step)
    finally:
        mngr.close()
    return trainer.merged_model(state), step


def evaluate_checkpoint(config: Any, workdir: str, step: int | None = None, *,
                        eval_iter_fn: Callable[..., Any] | None = None,
                        log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Restores W/checkpoints/<step> (default latest) and evaluates config.data.eval."""
    shd.maybe_initialize_distributed(config)
    log = log or (lambda s: print(s, flush=True) if jax.process_index() == 0 else None)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if eval_iter_fn is None:
        check_data_for_eval(config)
    eval_sets = available_eval_datasets(config, log)
    log(f"restoring the model from {workdir} (building and compiling take a while at full "
        "size)")
    model, step = restore_model(config, workdir, step)
    return evaluate_model(model, config, step=step, workdir=workdir, datasets=eval_sets,
                          eval_iter_fn=eval_iter_fn, log=log,
                          mesh=shd.make_mesh(config.get("mesh", None)))


def check_data_for_eval(config: Any) -> None:
    if not any(_needs_folder(n) and _base_name(n) != "folder" for n in config.data.eval):
        return  # the generic "folder" dataset lives at data.folder.root
    root = os.path.abspath(os.path.expanduser(config.data_root))
    if not os.path.isdir(root):
        raise UserError(f"data root not found: {root}\n"
                        "set --config.data_root=DIR and prepare the evaluation datasets "
                        "with scripts/prepare_data.py")
