#!/usr/bin/env python
"""Evaluate a checkpoint on every dataset of config.data.eval.

  python scripts/eval.py --config configs/gta2cs.py --workdir runs/gta2cs [--step N]

Restores W/checkpoints/<N> (default: the latest), shows a progress bar per dataset (images/s,
time left), prints the per-class IoU table and writes W/eval/<dataset>_step<N>.json and .png
(IoU bars, confusion matrix).
"""

import _cli  # noqa: F401
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py[:arg]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "training output folder holding checkpoints/")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.DEFINE_bool("lower_only", False, "with --platform: lower the sliding-window evaluation "
                  "step of one image for that platform, model built from shapes (no workdir, "
                  "no compile), and print what the module holds")
flags.DEFINE_string("platform", None, "with --lower_only: cuda, rocm, tpu or cpu")
flags.DEFINE_integer("height", 1024, "with --lower_only: image height (Cityscapes' eval size)")
flags.DEFINE_integer("width", 2048, "with --lower_only: image width")
flags.DEFINE_string("lowered_out", None, "with --lower_only: write the StableHLO text here")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.lower_only != (FLAGS.platform is not None):
        _cli.fail("--lower_only and --platform go together (see --help)")
    if FLAGS.lower_only:
        from mfuser_jax.lowering import lower_eval_step_job
        _cli.run_main(lower_eval_step_job, FLAGS.config, FLAGS.platform, FLAGS.height,
                      FLAGS.width, FLAGS.lowered_out)
        return
    if not FLAGS.workdir:
        _cli.fail("--workdir is required (see --help)")
    from mfuser_jax.train import evaluate_checkpoint
    _cli.run_main(evaluate_checkpoint, FLAGS.config, FLAGS.workdir, FLAGS.step)


if __name__ == "__main__":
    _cli.run_app(main)
