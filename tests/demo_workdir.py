"""A workdir holding an untrained demo MFuser (configs/demo.py): the model as
run.restore.build_and_load builds it, saved as a model checkpoint with W/config.json, as the
release converter leaves one. No training run: enough for tests that restore a real MFuser
(text tower included) and segment with it, not for tests of what it predicts."""

import os


def demo_config():
    from configs import demo
    return demo.get_config()


def make_demo_workdir(workdir, config=None):
    """W/checkpoints/0 and W/config.json of `config` (default configs/demo.py)."""
    from mfuser_jax import sharding as shd
    from mfuser_jax.checkpoints import checkpoint_manager, save_model_checkpoint
    from mfuser_jax.run.restore import build_and_load
    from mfuser_jax.model_state import SplitModel
    from mfuser_jax.workdir import write_config
    config = config if config is not None else demo_config()
    os.makedirs(workdir, exist_ok=True)
    split = SplitModel(config, build_and_load(config), shd.make_mesh(config.get("mesh", None)))
    mngr = checkpoint_manager(workdir)
    try:
        save_model_checkpoint(mngr, 0, split.init_params, split.init_batch_stats)
        mngr.wait_until_finished()
    finally:
        mngr.close()
    write_config(workdir, config)
    return workdir
