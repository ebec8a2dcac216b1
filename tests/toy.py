"""Toy segmentation model, fake data and a subprocess runner for the training tests.

The toy model follows the training protocol of mfuser_jax.model.factory: BatchNorm (batch
statistics carried by the train step), a frozen sub-module (excluded by `trainable_filter`),
dropout drawn from the step key. Run as a script (`python tests/toy.py --workdir W ...`,
``SCRIPT``) it trains the toy in a fresh process, through the CLIs' error path
(scripts/_cli.run_main: exit codes, one-line messages): the SIGKILL, Ctrl-C, 8-device and
two-process tests use that.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np

NUM_CLASSES = 3
IMAGE = 16
SCRIPT = os.path.abspath(__file__)  # run with sys.executable: trains the toy (main below)


def toy_config(**overrides):
    import ml_collections
    c = ml_collections.ConfigDict()
    c.total_steps = 12
    c.batch_size = 8
    c.seed = 0
    c.log_every = 1
    c.checkpoint_every = 4
    c.eval_every = 6
    c.keep_checkpoints = 5
    c.compile_cache = "off"  # tests compile into no shared cache unless they ask
    c.profile_steps = ""
    c.data_root = "unused"
    c.mesh = (("data", -1),)
    c.sharding = ml_collections.ConfigDict({"fsdp_min_size": 0})
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-2, min_lr=1e-4, weight_decay=1e-4, power=0.9, warmup_steps=2,
        warmup_ratio=1e-6, b1=0.9, b2=0.999, eps=1e-8, grad_accum=1, grad_clip=0.0,
        lr_mults=(("head", 1.0),)))
    c.evaluation = ml_collections.ConfigDict(dict(crop_size=16, stride=11, crop_batch=8))
    c.data = ml_collections.ConfigDict(dict(train="synthetic", eval=("synthetic_toy",),
                                            crop_size=IMAGE,
                                            tfds=ml_collections.ConfigDict({"enabled": False})))
    c.model = ml_collections.ConfigDict(dict(
        name="toy", num_classes=NUM_CLASSES, class_names=("red", "green", "blue"),
        width=8, pretrained=""))
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def register_toy():
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from mfuser_jax.model.factory import MODEL_REGISTRY, register_model

    if "toy" in MODEL_REGISTRY:
        return MODEL_REGISTRY["toy"]

    @register_model("toy")
    class ToySeg(nnx.Module):
        def __init__(self, cfg, *, rngs):
            w = int(cfg.width)
            self.stem = nnx.Conv(3, w, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(w, momentum=0.9, rngs=rngs)
            self.frozen = nnx.Conv(w, w, (1, 1), rngs=rngs)
            self.head = nnx.Conv(w, int(cfg.num_classes), (1, 1), rngs=rngs)
            # holds nnx.Rngs state (typed keys) like MFuser's dropouts; randomness in the
            # step comes from the `key` argument
            self.dropout = nnx.Dropout(0.1, rngs=rngs)

        @property
        def trainable_filter(self):
            return lambda path, v: "frozen" not in path

        @property
        def no_decay_filter(self):
            return lambda path, v: path[-1] in ("bias", "scale")

        def load_pretrained(self, path):
            if not os.path.exists(path):
                raise FileNotFoundError(path)
            self.frozen.kernel[...] = jnp.asarray(np.load(path))

        def _logits(self, images, key=None):
            x = images.astype(jnp.float32) / 255.0 - 0.5
            x = nnx.relu(self.bn(self.stem(x)))
            x = x + self.frozen(x)
            if key is not None:
                x = self.dropout(x, rngs=nnx.Rngs(key))
            return self.head(x)

        def loss(self, images, labels, key):
            self.train()
            logits = self._logits(images, key)
            valid = labels < NUM_CLASSES
            ce = optax.softmax_cross_entropy_with_integer_labels(
                logits, jnp.where(valid, labels, 0))
            ce = jnp.sum(ce * valid) / jnp.maximum(valid.sum(), 1)
            # Label 254 (neither a class nor ignore) poisons the loss: the NaN-guard test.
            poison = jnp.where(jnp.any(labels == 254), jnp.nan, 0.0)
            reg = 1e-3 * jnp.mean(logits ** 2)
            return ce + reg + poison, {"ce": ce, "reg": reg}

        def predict(self, images, class_names=None):
            self.eval()
            scores = jax.nn.softmax(self._logits(images), axis=-1)
            if class_names is not None:  # "open vocabulary": any subset of the classes
                order = ("red", "green", "blue")
                scores = scores[..., [order.index(n) for n in class_names]]
            return scores

    return ToySeg


def _labels_of(images: np.ndarray) -> np.ndarray:
    labels = np.argmax(images, axis=-1).astype(np.int32)
    labels[..., :2, :2] = 255  # some ignored pixels
    return labels


def fake_train_iter(config, *, start_step, process_index, process_count, poison_step=None,
                    on_request=None):
    """Pure function of (seed, step, process): process p takes its slice of the global batch."""
    b = int(config.batch_size) // process_count
    step = start_step
    while True:
        if on_request is not None:
            on_request(step)
        rng = np.random.default_rng([int(config.seed), step])
        images = rng.integers(0, 256, (int(config.batch_size), IMAGE, IMAGE, 3), np.uint8)
        labels = _labels_of(images)
        if poison_step is not None and step == poison_step:
            labels[:, -1, -1] = 254
        sl = slice(process_index * b, (process_index + 1) * b)
        yield {"image": images[sl], "label": labels[sl]}
        step += 1


def fake_eval_images(n=3):
    rng = np.random.default_rng(123)
    out = []
    for i in range(n):
        h, w = 20 + 4 * i, 28
        images = rng.integers(0, 256, (1, h, w, 3), np.uint8)
        big = images.repeat(2, axis=1).repeat(2, axis=2)  # "original size" labels
        out.append({"image": images, "label": _labels_of(big), "name": f"img{i}"})
    return out


def fake_eval_iter(config, name, *, process_index, process_count):
    items = fake_eval_images()
    return iter(items[process_index::process_count])


def _kill_in_save(step):
    """Orbax writes a checkpoint's JSON item in a background thread, beside the arrays and
    before the step directory is renamed into place: the kill lands mid-save."""
    import orbax.checkpoint as ocp
    save_fn = ocp.JsonCheckpointHandler._save_fn

    async def killing_save_fn(self, x, directory):
        if directory.parent.name.startswith(f"{step}.orbax-checkpoint-tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        return await save_fn(self, x, directory)

    ocp.JsonCheckpointHandler._save_fn = killing_save_fn


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--kill_at", type=int, default=None,
                    help="SIGKILL itself when asked for this step, once checkpoint "
                         "--kill_after_ckpt is on disk")
    ap.add_argument("--kill_after_ckpt", type=int, default=None)
    ap.add_argument("--kill_in_save", type=int, default=None,
                    help="SIGKILL itself in Orbax's background writer while it saves "
                         "checkpoint N (before Orbax commits it)")
    ap.add_argument("--sigint_at", type=int, default=None,
                    help="send itself SIGINT (Ctrl-C) when asked for this step")
    ap.add_argument("--sigint_twice", action="store_true", help="... and a second one")
    ap.add_argument("--coordinator", default="")
    ap.add_argument("--num_processes", type=int, default=1)
    ap.add_argument("--process_id", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--no_eval", action="store_true")
    args = ap.parse_args(argv)

    overrides = {"total_steps": args.steps}
    if args.no_eval:
        overrides["data.eval"] = ()
    if args.coordinator:
        import ml_collections
        overrides["distributed"] = ml_collections.ConfigDict(dict(
            enabled=True, coordinator_address=args.coordinator,
            num_processes=args.num_processes, process_id=args.process_id))
    config = toy_config(**overrides)
    register_toy()
    if args.kill_in_save is not None:
        _kill_in_save(args.kill_in_save)
    from mfuser_jax.run.train import train_and_evaluate

    def on_request(step):
        if args.sigint_at is not None and step == args.sigint_at:
            os.kill(os.getpid(), signal.SIGINT)
            if args.sigint_twice:
                os.kill(os.getpid(), signal.SIGINT)
        if args.kill_at is not None and step == args.kill_at:
            ckpt = os.path.join(args.workdir, "checkpoints", str(args.kill_after_ckpt))
            for _ in range(600):
                if os.path.isdir(ckpt):
                    break
                time.sleep(0.05)
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)

    def train_iter(config, **kw):
        return fake_train_iter(config, on_request=on_request, **kw)

    import _cli
    _cli.run_main(train_and_evaluate, config, args.workdir, train_iter_fn=train_iter,
                  eval_iter_fn=fake_eval_iter)


if __name__ == "__main__":
    # Run as a script, Python puts tests/ on the path, not the repository: this checkout
    # (its mfuser_jax and configs) and scripts/ (_cli, as the scripts import it) go first.
    REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [REPO, os.path.join(REPO, "scripts")]
    main()
