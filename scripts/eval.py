#!/usr/bin/env python
"""Evaluate a checkpoint on every dataset of config.data.eval.

  python scripts/eval.py --config configs/gta2cs.py --workdir runs/gta2cs [--step N]
  python scripts/eval.py --workdir runs/gta2cs    # the config W/config.json recorded

Restores W/checkpoints/<N> (default: the latest), shows a progress bar per dataset (images/s,
time left), prints the per-class IoU table and writes W/eval/<dataset>_step<N>.json and .png
(IoU bars, confusion matrix); --out DIR writes them to DIR instead (a read-only workdir).
"""

import _cli  # noqa: F401
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py[:arg] "
                                "(default: the workdir's config.json, as trained)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "training output folder holding checkpoints/")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.DEFINE_string("out", None, "folder for the JSON and PNG reports (default: W/eval; "
                    "for a read-only workdir, e.g. a shared release)")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from mfuser_jax.train import evaluate_checkpoint
    config = _cli.config_or_workdir(FLAGS.config, FLAGS.workdir)
    _cli.run_main(evaluate_checkpoint, config, FLAGS.workdir, FLAGS.step, out=FLAGS.out)


if __name__ == "__main__":
    _cli.run_app(main)
