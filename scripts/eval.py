#!/usr/bin/env python
"""Evaluate a checkpoint on every dataset of config.data.eval.

  python scripts/eval.py --config configs/gta2cs.py --workdir runs/gta2cs [--step N]
  python scripts/eval.py --workdir runs/gta2cs    # the config W/config.json recorded

Restores W/checkpoints/<N> (default: the latest), shows a progress bar per dataset (images/s,
time left), prints the per-class IoU table and writes W/eval/<dataset>_step<N>.json and .png
(IoU bars, confusion matrix); --out DIR writes them to DIR instead (a read-only workdir).
The tables give IoU and Acc per class, mIoU, mAcc and aAcc; after several datasets one
summary table closes the run. Test-time augmentation as mmseg's aug_test (not the
paper's protocol): --flip, --ratios 0.5,0.75,1.0,1.25,1.5,1.75. --show_dir DIR writes
each image's prediction in colours.
"""

import _cli  # noqa: F401
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py[:arg] "
                                "(default: the workdir's config.json, as trained)",
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
flags.DEFINE_bool("flip", False, "test-time augmentation: also each image mirrored, "
                  "probabilities averaged (mmseg's aug_test; not the paper's protocol)")
flags.DEFINE_list("ratios", None, "test-time augmentation: ratios of the test scale, e.g. "
                  "0.5,0.75,1.0,1.25,1.5,1.75 (mmseg's MultiScaleFlipAug img_ratios)")
flags.DEFINE_string("show_dir", None, "write each image's prediction in the palette's "
                    "colours to DIR/<dataset>/<image>.png")
flags.DEFINE_string("out", None, "folder for the JSON and PNG reports (default: W/eval; "
                    "for a read-only workdir, e.g. a shared release)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.lower_only != (FLAGS.platform is not None):
        _cli.fail("--lower_only and --platform go together (see --help)")
    if FLAGS.lower_only:
        if FLAGS.config is None:
            _cli.fail("--lower_only needs --config (see --help)")
        from mfuser_jax.run.lowering import lower_eval_step_job
        _cli.run_main(lower_eval_step_job, FLAGS.config, FLAGS.platform, FLAGS.height,
                      FLAGS.width, FLAGS.lowered_out)
        return
    if not FLAGS.workdir:
        _cli.fail("--workdir is required (see --help)")
    from mfuser_jax.run.evaluate import evaluate_checkpoint
    config = _cli.config_or_workdir(FLAGS.config, FLAGS.workdir)
    if FLAGS.flip or FLAGS.ratios:
        try:
            ratios = tuple(float(r) for r in FLAGS.ratios or ())
        except ValueError:
            _cli.fail(f"--ratios={','.join(FLAGS.ratios)}: give numbers, e.g. 0.75,1.0,1.25")
        if any(r <= 0 for r in ratios):
            _cli.fail(f"--ratios={','.join(FLAGS.ratios)}: ratios must be positive")
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.evaluation.flip = bool(FLAGS.flip or config.evaluation.get("flip", False))
            config.evaluation.ratios = ratios or tuple(config.evaluation.get("ratios", ()))
    _cli.run_main(evaluate_checkpoint, config, FLAGS.workdir, FLAGS.step, out=FLAGS.out,
                  show_dir=FLAGS.show_dir)


if __name__ == "__main__":
    _cli.run_app(main)
