#!/usr/bin/env python
"""Convert the official encoder weights for MFuser.

    python scripts/convert_weights.py --dinov2 dinov2_vitl14_pretrain.pth \
        --clip ViT-L-14-336px.pt --out pretrained/mfuser_clip_l

--dinov2 takes the official .pth or an HF Dinov2Model file (.safetensors/.bin); --clip
takes OpenAI's TorchScript .pt or an HF CLIPModel file. The result is an Orbax checkpoint
of the three frozen towers at the sizes of --config's model (default configs/gta2cs.py);
point `config.model.pretrained` at it (the paper configs default to pretrained/mfuser_clip_l).
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
flags.DEFINE_string("mfuser", None, "a released MFuser checkpoint (not supported yet)")
flags.DEFINE_string("out", None, "output folder for the Orbax checkpoint")
flags.mark_flags_as_required(["dinov2", "clip", "out"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    _cli.quiet_logging()
    from mfuser_jax.convert import WeightFileError
    from mfuser_jax.convert.pretrained import convert_encoders

    if FLAGS.mfuser:
        print("error: converting released MFuser checkpoints (--mfuser) is not implemented "
              "yet; convert the encoders and train, or see the README", file=sys.stderr)
        sys.exit(2)
    start = time.time()
    stages = 7

    def progress(stage, _count=[0]):  # noqa: B006 - a counter local to this run
        _count[0] += 1
        print(f"[{_count[0]}/{stages}] {stage} ({time.time() - start:.0f} s)", flush=True)

    try:
        counts = convert_encoders(FLAGS.config.model, FLAGS.out, dinov2_path=FLAGS.dinov2,
                                  clip_path=FLAGS.clip, progress=progress)
    except (WeightFileError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, n in counts.items():
        print(f"  {name}: {n:,} parameters")
    print(f"wrote {os.path.abspath(FLAGS.out)} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
