#!/usr/bin/env python
"""Convert the official encoder weights for MFuser.

    python scripts/convert_weights.py --dinov2 dinov2_vitl14_pretrain.pth \
        --clip ViT-L-14-336px.pt --out pretrained/mfuser_clip_l

--dinov2 takes the official .pth or an HF Dinov2Model file (.safetensors/.bin); --clip
takes OpenAI's TorchScript .pt or an HF CLIPModel file. The result is an Orbax checkpoint
of the three frozen towers at the sizes of --config's model (default configs/gta2cs.py);
point `config.model.pretrained` at it (the paper configs default to pretrained/mfuser_clip_l).

    python scripts/convert_weights.py --mfuser mfuser_clip_gta2cs.pth \
        --config configs/gta2cs.py --out runs/mfuser_release

--mfuser converts a released MFuser (CLIP variant) mmseg checkpoint into a trainer workdir:
W/checkpoints/<step>/ in the trainer's format, W/pretrained/ (the release's frozen towers)
and W/config.json. Evaluate or predict with the same config (restoring a workdir uses its
own W/pretrained):

    python scripts/eval.py --config configs/gta2cs.py --workdir W

<step> is the release's iteration count (mmcv meta "iter" + 1; the config's total_steps
when the file has no meta), so scripts/train.py on W sees a finished run and does not
continue training it. A converted model is meant for evaluation.
"""

import os
import sys
import time

import _cli  # noqa: F401  (puts the repo on sys.path)
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/gta2cs.py", "config whose model sizes to convert for")
flags.DEFINE_string("dinov2", None, "DINOv2 ViT-L/14 weights (official .pth or HF)")
flags.DEFINE_string("clip", None, "CLIP ViT-L/14-336 weights (OpenAI .pt or HF)")
flags.DEFINE_string("mfuser", None, "a released MFuser (CLIP) mmseg checkpoint .pth; "
                    "replaces --dinov2/--clip")
flags.DEFINE_string("out", None, "output folder for the Orbax checkpoint")
flags.mark_flags_as_required(["out"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    _cli.quiet_logging()
    from mfuser_jax.convert import WeightFileError
    from mfuser_jax.convert.pretrained import convert_encoders

    start = time.time()
    if FLAGS.mfuser:
        return convert_release(start)
    if not (FLAGS.dinov2 and FLAGS.clip):
        print("error: give --dinov2 and --clip (the encoder weights), or --mfuser (a released "
              "MFuser checkpoint)", file=sys.stderr)
        sys.exit(2)
    progress = stage_printer(6, start)

    try:
        counts = convert_encoders(FLAGS.config.model, FLAGS.out, dinov2_path=FLAGS.dinov2,
                                  clip_path=FLAGS.clip, progress=progress)
    except (WeightFileError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, n in counts.items():
        print(f"  {name}: {n:,} parameters")
    print(f"wrote {os.path.abspath(FLAGS.out)} in {time.time() - start:.0f} s")


def stage_printer(stages, start):
    """progress(stage) callback: '[i/stages] stage (elapsed s)', one line per stage."""
    count = 0

    def progress(stage):
        nonlocal count
        count += 1
        print(f"[{count}/{stages}] {stage} ({time.time() - start:.0f} s)", flush=True)

    return progress


def convert_release(start):
    from mfuser_jax.convert import WeightFileError
    from mfuser_jax.convert.mfuser import convert_mfuser_checkpoint

    if FLAGS.dinov2 or FLAGS.clip:
        print("error: --mfuser brings its own encoders; drop --dinov2/--clip", file=sys.stderr)
        sys.exit(2)
    progress = stage_printer(5, start)

    try:
        info = convert_mfuser_checkpoint(FLAGS.config, FLAGS.mfuser, FLAGS.out,
                                         progress=progress)
    except (WeightFileError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"  {info['loaded']:,} tensors loaded ({info['dropped']} identity_head keys "
          f"dropped); {info['trainable']:,} trainable of {info['total']:,} parameters")
    print(f"wrote {info['checkpoints']}/{info['step']} and {info['pretrained']} in "
          f"{time.time() - start:.0f} s")
    out = os.path.abspath(FLAGS.out)
    print(f"evaluate with: python scripts/eval.py --config <this config> --workdir {out} "
          f"--config.model.pretrained={info['pretrained']}")


if __name__ == "__main__":
    app.run(main)
