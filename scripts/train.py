#!/usr/bin/env python
"""Train MFuser: `python scripts/train.py --config configs/gta2cs.py --workdir runs/gta2cs`.

Running the same command again resumes from the latest checkpoint in W/checkpoints; a
finished run exits at once; resuming with another --config.total_steps (which moves the
learning-rate schedule) needs --new_schedule. Ctrl-C (or SIGTERM) finishes the current step, saves it and
exits 130 (143); a second Ctrl-C quits at once. A workdir trained with another model
(W/config.json) is refused with the config argument to use. Outputs: W/checkpoints/<step>/, W/metrics.jsonl,
W/eval/<dataset>_step<N>.json, W/config.json and TensorBoard event files in W.
Several GPUs on one machine: nothing to add (the mesh spans all devices). Several machines:
launch one process per machine with the same command under SLURM/MPI (detected), or pass
--config.distributed.coordinator_address=HOST:PORT --config.distributed.num_processes=N
--config.distributed.process_id=I; W must be on a shared file system.
"""

import _cli  # (also puts the repo on sys.path)
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py[:arg]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "output folder (checkpoints, metrics, eval JSON)")
flags.DEFINE_bool("compile_only", False, "build the model from shapes, compile the train step "
                  "and print its memory analysis (no data, no weights; --workdir optional: "
                  "its compile cache then holds the step)")
flags.DEFINE_string("platform", None, "with --compile_only: lower the train step for this "
                    "platform (cuda, rocm, tpu, cpu) on any machine, without compiling, and "
                    "print what the module holds (Triton kernels, custom calls, largest tensor, "
                    "matmul dtypes)")
flags.DEFINE_string("lowered_out", None, "with --platform: write the StableHLO text here")
flags.DEFINE_integer("devices", None, "with --platform: lower for a mesh of this many devices "
                     "(abstract: none needed here; default this machine's)")
flags.DEFINE_bool("new_schedule", False, "resume with another --config.total_steps than the "
                  "run started with: the poly learning-rate curve is recomputed for the new "
                  "total (refused without this flag)")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from mfuser_jax.run.train import compile_train_step, train_and_evaluate
    if FLAGS.platform is None and (FLAGS.lowered_out or FLAGS.devices):
        _cli.fail("--lowered_out and --devices go with --compile_only --platform (see --help)")
    if FLAGS.platform is not None:
        if not FLAGS.compile_only:
            _cli.fail("--platform goes with --compile_only (see --help)")
        from mfuser_jax.run.lowering import lower_train_step_job
        _cli.run_main(lower_train_step_job, FLAGS.config, FLAGS.platform, FLAGS.lowered_out,
                      FLAGS.devices)
    elif FLAGS.compile_only:
        _cli.run_main(compile_train_step, FLAGS.config, FLAGS.workdir)
    elif not FLAGS.workdir:
        # absl's UsageError would print the whole --help and exit 1
        _cli.fail("--workdir is required (except with --compile_only)")
    else:
        _cli.run_main(train_and_evaluate, FLAGS.config, FLAGS.workdir,
                      new_schedule=FLAGS.new_schedule)


if __name__ == "__main__":
    _cli.run_app(main)
