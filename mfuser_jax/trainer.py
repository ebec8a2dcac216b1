"""The train step: the optimizer over a ``model_state.SplitModel`` and the jitted, sharded
step (gradient accumulation, the non-finite skip). Only training imports it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mfuser_jax import sharding as shd
from mfuser_jax.errors import UserError
from mfuser_jax.model.factory import trainable
from mfuser_jax.model_state import SplitModel, TrainState, abstract_like
from mfuser_jax.optim import all_finite, make_optimizer


class Trainer(SplitModel):
    """The split model, its optimizer and the jitted, sharded train step."""

    def __init__(self, config: Any, model: nnx.Module, mesh: jax.sharding.Mesh):
        model.train()
        super().__init__(config, model, mesh)
        no_decay = {tuple(p) for p, _ in nnx.to_flat_state(
            nnx.state(model, nnx.All(trainable(model), model.no_decay_filter)))}
        decay_mask = jax.tree_util.tree_map_with_path(
            lambda path, _: tuple(k.key for k in path) not in no_decay, self.init_params)
        self.tx, self.schedule = make_optimizer(config.optim, int(config.total_steps),
                                                self.init_params, decay_mask)
        self.opt_shardings = shd.tree_shardings(
            jax.eval_shape(self.tx.init, self.init_params), mesh)
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

    def init_opt_state(self, params: dict) -> Any:
        """A fresh optimizer state for (placed) `params`."""
        return jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)

    def init_state(self) -> TrainState:
        params = shd.put_global(self.init_params, self.param_shardings)
        bs = shd.put_global(self.init_batch_stats, self.bs_shardings)
        return TrainState(params, bs, self.init_opt_state(params), 0)

    def abstract_tree(self) -> dict:
        """The train state as sharded shapes: params, batch_stats and opt_state."""
        opt = jax.eval_shape(self.tx.init, self.init_params)
        return {**self.model_tree(), "opt_state": jax.tree.map(abstract_like, opt, self.opt_shardings)}

    def lower(self, batch_size: int, image_size: int, platforms: tuple[str, ...] | None = None):
        """The train step lowered for a global batch of ``batch_size`` images of
        ``image_size`` px, from shapes alone (no data, no weights needed); for ``platforms``
        (jax's lowering platforms, e.g. ("cuda",)) when given, else this machine's."""
        tree = self.abstract_tree()
        batch = shd.batch_sharding(self.mesh)
        images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8,
                                      sharding=batch)
        labels = jax.ShapeDtypeStruct((batch_size, image_size, image_size), jnp.int32,
                                      sharding=batch)
        rest = jax.tree.map(abstract_like, self.rest, self.rest_shardings)
        # The step counter as step() passes it: a host int32, placed by the jit's
        # in_shardings. (Given a sharding here, the jit's cache would tell this program from
        # the one step() calls, and step() would trace and compile the same module again.)
        step = jax.ShapeDtypeStruct((), jnp.int32)
        args = (tree["params"], tree["batch_stats"], rest, tree["opt_state"], images, labels, step)
        if platforms is None:
            return self._step.lower(*args)
        return self._step.trace(*args).lower(lowering_platforms=tuple(platforms))

    def merged_model(self, state: TrainState) -> nnx.Module:
        """Writes the trained params and batch statistics back into the host model."""
        return self.write_back(state.params, state.batch_stats)

    # The step, traced once: grads w.r.t. the trainable params only.
    def _loss(self, params, batch_stats, rest, images, labels, key):
        model = self.merge(params, batch_stats, rest)
        model.train()
        total, parts = model.loss(images, labels, key)
        new_bs = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
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

        # NaN/Inf guard: a bad step changes nothing, batch statistics included; the host
        # stops at its next check. optax.apply_if_finite would guard only the update (the
        # batch statistics of a NaN step would be kept) and adds counters to the optimizer
        # state. One cond, not a select per leaf: per-leaf selects made XLA compile ~20 s
        # longer.
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
