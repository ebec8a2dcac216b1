"""The two checkpoint formats on the toy model: a training checkpoint written before the lr
multipliers went through optax.partition resumes with the same steps; a model checkpoint
(no optimizer state) is read by evaluation and by training (fresh optimizer state); either
format gives evaluation its params and batch statistics."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from tests.toy import fake_train_iter, register_toy, toy_config

register_toy()
from mfuser_jax import checkpoints as C  # noqa: E402
from mfuser_jax import sharding as shd  # noqa: E402
from mfuser_jax.errors import UserError  # noqa: E402
from mfuser_jax.model.factory import create_model  # noqa: E402
from mfuser_jax.model_state import SplitModel, TrainState  # noqa: E402
from mfuser_jax.trainer import Trainer  # noqa: E402


def _trainer(config, resuming=False):
    """`resuming`: as training builds it to resume, the checkpointed values left abstract."""
    return Trainer(config, create_model(config, skip_checkpointed=resuming),
                   shd.make_mesh(None))


def _batches(config, n):
    it = fake_train_iter(config, start_step=0, process_index=0, process_count=1)
    return [next(it) for _ in range(n)]


def _assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def trained():
    """A toy trainer (lr_mults set: the optimizer state ends in optax.partition's) after two
    steps, and the batches of the next two."""
    config = toy_config()
    assert config.optim.lr_mults
    trainer = _trainer(config)
    batches = _batches(config, 4)
    state = trainer.init_state()
    for batch in batches[:2]:
        state, _ = trainer.step(state, batch)
    return config, trainer, state, batches[2:]


def _continue(trainer, state, batches):
    losses = []
    for batch in batches:
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses


def test_pre_partition_training_checkpoint_resumes_exactly(trained, tmp_path):
    config, trainer, state, rest = trained
    assert isinstance(state.opt_state[-1], optax.PartitionState)
    # what save_checkpoint wrote before: an EmptyState where optax.partition's state is now
    old = (*state.opt_state[:-1], optax.EmptyState())
    mngr = C.checkpoint_manager(str(tmp_path))
    mngr.save(2, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats,
                                     "opt_state": old}),
        meta=ocp.args.JsonSave({"step": 2, "data_position": 2})))
    mngr.wait_until_finished()
    restored = C.restore_checkpoint(mngr, _trainer(config, resuming=True), 2)
    mngr.close()
    assert restored.step == 2
    _assert_trees_equal(restored.tree(), state.tree())
    want = _continue(trainer, TrainState(*jax.tree.map(np.array, (
        state.params, state.batch_stats, state.opt_state)), 2), rest)
    assert _continue(trainer, restored, rest) == want


def test_model_checkpoint_has_no_optimizer_and_restores_both_ways(trained, tmp_path):
    config, trainer, state, rest = trained
    mngr = C.checkpoint_manager(str(tmp_path))
    C.save_model_checkpoint(mngr, 2, state.params, state.batch_stats)
    C.save_checkpoint(mngr, TrainState(state.params, state.batch_stats, state.opt_state, 3))
    mngr.wait_until_finished()
    assert C.read_meta(mngr, 2)["format"] == "model"
    assert "format" not in C.read_meta(mngr, 3)  # the training format is as before
    mngr.close()
    saved = ocp.PyTreeCheckpointer().metadata(tmp_path / "checkpoints" / "2" / "state")
    assert set(saved.item_metadata.tree) == {"params", "batch_stats"}

    # evaluation: params and batch statistics from either format, no optimizer built
    reader = C.checkpoint_manager(str(tmp_path), create=False)
    split = SplitModel(config, create_model(config, skip_checkpointed=True),
                       shd.make_mesh(None))
    for step in (2, 3):
        tree = C.restore_model_state(reader, step, split.model_tree())
        _assert_trees_equal(tree, {"params": state.params, "batch_stats": state.batch_stats})
    # a checkpoint that lacks a parameter does not fit
    target = split.model_tree()
    target["params"]["extra"] = target["params"]["stem"]["bias"]
    with pytest.raises(UserError, match=r"checkpoints/2 does not fit the model.*extra"):
        C.restore_model_state(reader, 2, target)
    reader.close()

    # training from a model checkpoint: its params, a fresh optimizer state
    mngr = C.checkpoint_manager(str(tmp_path))
    fresh = _trainer(config, resuming=True)
    restored = C.restore_checkpoint(mngr, fresh, 2)
    mngr.close()
    assert restored.step == 2
    _assert_trees_equal(restored.params, state.params)
    _assert_trees_equal(restored.opt_state, fresh.init_opt_state(restored.params))
