#!/usr/bin/env python
"""What the checkpoint manifest costs: a train state of the full-size shapes
(configs/gta2cs.py: trainable params and both AdamW moments, float32, random values) saved
with mfuser_jax.checkpoints, against the same save through Orbax alone; then the manifest
written and verified on its own, and the restore it precedes.

    python scripts/benchmark_checkpoint.py --dir /tmp/ckpt_bench [--repeats 3] [--config ...]

The manifest is hashed in Orbax's finalisation thread: it lengthens the background save
(the time until the checkpoint is committed), not the training step, unless the next save
comes before it ends. Verifying reads the checkpoint once more before a restore.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_state(config_arg: str):
    """The full-size train state (placed on the default device) and its size in bytes."""
    import importlib

    import jax
    import numpy as np
    from flax import nnx

    from mfuser_jax import sharding as shd
    from mfuser_jax.model.factory import build_model
    from mfuser_jax.model_state import TrainState
    from mfuser_jax.trainer import Trainer

    path, _, arg = config_arg.partition(":")  # configs/gta2cs.py[:arg]
    module = importlib.import_module(f"configs.{os.path.splitext(os.path.basename(path))[0]}")
    config = module.get_config(arg or None)
    config.model.pretrained = ""
    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    trainer = Trainer(config, model, shd.make_mesh(None))
    rng = np.random.default_rng(0)

    def fill(x):
        if np.issubdtype(x.dtype, np.floating):
            return jax.device_put(rng.standard_normal(x.shape, np.float32).astype(x.dtype))
        return jax.device_put(np.zeros(x.shape, x.dtype))

    tree = jax.tree.map(fill, trainer.abstract_tree())
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(tree))
    return TrainState(tree["params"], tree["batch_stats"], tree["opt_state"], 1), n_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="scratch folder (emptied)")
    ap.add_argument("--config", default="configs/gta2cs.py")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import orbax.checkpoint as ocp

    from mfuser_jax import checkpoints as C

    state, n_bytes = train_state(args.config)
    print(f"train state: {n_bytes / 2**30:.2f} GiB", flush=True)

    def orbax_alone(workdir):  # what checkpoint_manager built before the manifest
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
        return ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), options=options)

    hashing = []  # the manifest's share of each save, timed where Orbax calls it
    write_manifest = C.write_manifest

    def timed_write_manifest(directory):
        t0 = time.perf_counter()
        out = write_manifest(directory)
        hashing.append(time.perf_counter() - t0)
        return out

    C.write_manifest = timed_write_manifest
    times = {"orbax": [], "manifest": []}
    makers = [("orbax", orbax_alone), ("manifest", C.checkpoint_manager)]
    for r in range(args.repeats):
        for name, make in makers[::1 if r % 2 == 0 else -1]:  # alternate who goes first
            workdir = os.path.join(args.dir, name)
            shutil.rmtree(workdir, ignore_errors=True)
            os.sync()  # the previous save's dirty pages written back: each save starts alike
            mngr = make(workdir)
            t0 = time.perf_counter()
            C.save_checkpoint(mngr, state)
            t1 = time.perf_counter()
            mngr.wait_until_finished()
            t2 = time.perf_counter()
            mngr.close()
            times[name].append((t1 - t0, t2 - t0))
            print(f"repeat {r}: {name:8s} blocking {t1 - t0:6.2f} s, committed after "
                  f"{t2 - t0:6.2f} s", flush=True)

    C.write_manifest = write_manifest
    ckpt = os.path.join(args.dir, "manifest", "checkpoints", "1")
    on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ckpt) for f in fs)
    t0 = time.perf_counter()
    C.write_manifest(ckpt)
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert C.check_manifest(ckpt)
    t_verify = time.perf_counter() - t0

    import jax

    from mfuser_jax.checkpoints import _restore
    mngr = C.checkpoint_manager(os.path.join(args.dir, "manifest"), create=False)
    target = {"params": state.params, "batch_stats": state.batch_stats,
              "opt_state": state.opt_state}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), target)
    t0 = time.perf_counter()
    jax.block_until_ready(_restore(mngr, 1, abstract))
    t_restore = time.perf_counter() - t0
    mngr.close()

    med = {k: statistics.median(t for _, t in v) for k, v in times.items()}
    blocking = {k: statistics.median(b for b, _ in v) for k, v in times.items()}
    files = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(ckpt) for f in fs]
    print(f"\ncheckpoint on disk: {on_disk / 2**30:.2f} GiB in {len(files)} files (largest "
          f"{max(files) / 2**30:.2f} GiB), {os.cpu_count()} CPUs")
    print(f"save, Orbax alone:     blocking {blocking['orbax']:.2f} s, committed "
          f"{med['orbax']:.2f} s")
    print(f"save with manifest:    blocking {blocking['manifest']:.2f} s, committed "
          f"{med['manifest']:.2f} s (+{med['manifest'] - med['orbax']:.2f} s, "
          f"{(med['manifest'] - med['orbax']) / med['orbax']:+.1%})")
    t_hash = statistics.median(hashing)
    print(f"manifest, in the save: {t_hash:.2f} s ({t_hash / med['orbax']:.1%} of the save "
          f"through Orbax alone)")
    print(f"manifest, page cache warm: {t_write:.2f} s")
    print(f"verify before restore: {t_verify:.2f} s; the restore itself {t_restore:.2f} s")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
