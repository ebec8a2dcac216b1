"""NaN/Inf guard (stop with a clear message, keep the last good checkpoint) and gradient
accumulation (mean of micro-batch gradients, batch statistics carried through)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.toy import fake_train_iter, register_toy, toy_config

register_toy()
from mfuser_jax import sharding as shd  # noqa: E402
from mfuser_jax.run import train as T  # noqa: E402
from mfuser_jax.run import restore as R  # noqa: E402
from mfuser_jax.model.factory import create_model  # noqa: E402
from mfuser_jax.trainer import Trainer  # noqa: E402


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = toy_config(total_steps=6, checkpoint_every=2, **{"data.eval": ()})
    workdir = str(tmp_path)
    poisoned = functools.partial(fake_train_iter, poison_step=3)
    with pytest.raises(T.TrainingDiverged, match="in step 4"):
        T.train_and_evaluate(config, workdir, train_iter_fn=poisoned)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    steps = [json.loads(x)["step"] for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [1, 2, 3]
    model, step = R.restore_model(config, workdir)
    assert step == 2
    assert np.isfinite(np.asarray(model.stem.kernel[...])).all()


def test_grad_accumulation_is_mean_of_micro_batches():
    config = toy_config(**{"optim.grad_accum": 2})
    trainer = Trainer(config, create_model(config), shd.make_mesh(None))
    state = trainer.init_state()
    batch = next(fake_train_iter(config, start_step=0, process_index=0, process_count=1))
    images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
    key = jax.random.key(3)
    grad_fn = jax.value_and_grad(trainer._loss, has_aux=True)

    @jax.jit
    def both(params, bs):
        got = trainer._accumulate(grad_fn, params, bs, trainer.rest, images, labels, key)
        # restated: micro-batch i = rows i, i+2, ...; batch stats chained
        tot, grads, cur = 0.0, None, bs
        for i in range(2):
            (t, (p, cur)), g = grad_fn(params, cur, trainer.rest, images[i::2],
                                       labels[i::2], jax.random.fold_in(key, i))
            tot = tot + t / 2
            grads = jax.tree.map(lambda x: x / 2, g) if grads is None else \
                jax.tree.map(lambda a, x: a + x / 2, grads, g)
        return got, (tot, cur, grads)

    (tot, parts, bs, grads), (w_tot, w_bs, w_grads) = both(state.params, state.batch_stats)
    np.testing.assert_allclose(tot, w_tot, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads) + jax.tree.leaves(bs),
                    jax.tree.leaves(w_grads) + jax.tree.leaves(w_bs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # and differs from one full-batch gradient (BatchNorm sees half batches)
    (_, _), g_full = grad_fn(state.params, state.batch_stats, trainer.rest, images, labels,
                             key)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(grads),
                                                      jax.tree.leaves(g_full)))
    # the whole jitted step runs with accumulation
    new, metrics = trainer.step(state, batch)
    assert bool(metrics["finite"]) and new.step == 1


def test_sigterm_saves_checkpoint_then_resume_finishes(tmp_path):
    import signal
    config = toy_config(total_steps=8, checkpoint_every=100, **{"data.eval": ()})
    workdir = str(tmp_path)

    def term_at_5(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(T.Preempted, match="step 6"):
        T.train_and_evaluate(config, workdir, train_iter_fn=functools.partial(
            fake_train_iter, on_request=term_at_5))
    assert signal.getsignal(signal.SIGTERM) is before
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6"]
    T.train_and_evaluate(config, workdir, train_iter_fn=fake_train_iter)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6", "8"]
