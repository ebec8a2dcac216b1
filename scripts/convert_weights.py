#!/usr/bin/env python
"""Convert the official encoder weights, or a released MFuser checkpoint, for MFuser.

    python scripts/convert_weights.py --dinov2 dinov2_vitl14_pretrain.pth \
        --clip ViT-L-14-336px.pt --out pretrained/mfuser_clip_l
    python scripts/convert_weights.py --config configs/gta2cs.py:vlm=eva02 \
        --dinov2 dinov2_vitl14_pretrain.pth --eva02 EVA02_CLIP_L_336_psz14_s6B.pt \
        --out pretrained/mfuser_eva02_l
    python scripts/convert_weights.py --config configs/gta2cs.py:vlm=siglip \
        --dinov2 dinov2_vitl14_pretrain.pth --siglip siglip_vitl16_384.pth \
        --siglip_tokenizer spiece.model --out pretrained/mfuser_siglip_l

--dinov2 takes the official .pth or an HF Dinov2Model file (.safetensors/.bin); --clip
takes OpenAI's TorchScript .pt or an HF CLIPModel file; --eva02 the EVA02-CLIP .pt;
--siglip the SigLIP .pth the reference uses or an HF SiglipModel file, with the
SentencePiece vocabulary of google/siglip-large-patch16-384 (--siglip_tokenizer). The VLM
flag must match the config's vlm. The result is an Orbax checkpoint of the three frozen
towers at the sizes of --config's model (default configs/gta2cs.py); the paper configs
look for it at pretrained/mfuser_<vlm>_l (`config.model.pretrained`).

    python scripts/convert_weights.py --mfuser mfuser_clip_gta2cs.pth \
        --config configs/gta2cs.py --out runs/mfuser_release

--mfuser converts a released MFuser mmseg checkpoint (any variant; the config's vlm must
match it — SigLIP releases also need --siglip_tokenizer, and take logit_scale/logit_bias
from --siglip when given) into a trainer workdir: W/checkpoints/<step>/ in the trainer's
format, W/pretrained/ (the release's frozen towers) and W/config.json. Evaluate or predict
with the same config (restoring a workdir uses its own W/pretrained):

    python scripts/eval.py --config configs/gta2cs.py --workdir W

<step> is the release's iteration count (mmcv meta "iter" + 1; the config's total_steps
when the file has no meta), so scripts/train.py on W sees a finished run and does not
continue training it. A converted model is meant for evaluation.
"""

import os
import sys
import time

import _cli  # noqa: F401  (puts the repo on sys.path)
from absl import flags
from ml_collections import config_flags

from configs.base import VLMS

config_flags.DEFINE_config_file("config", os.path.join(_cli.REPO, "configs", "gta2cs.py"),
                                "config whose model sizes to convert for")
flags.DEFINE_string("dinov2", None, "DINOv2 ViT-L/14 weights (official .pth or HF)")
flags.DEFINE_string("clip", None, "CLIP ViT-L/14-336 weights (OpenAI .pt or HF), for vlm=clip")
flags.DEFINE_string("eva02", None, "EVA02-CLIP-L/14-336 weights (EVA02_CLIP_L_336_psz14_s6B.pt), "
                    "for vlm=eva02")
flags.DEFINE_string("siglip", None, "SigLIP-L/16-384 weights (siglip_vitl16_384.pth or HF), for "
                    "vlm=siglip")
flags.DEFINE_string("siglip_tokenizer", None, "SigLIP's spiece.model (google/siglip-large-"
                    "patch16-384), for vlm=siglip")
flags.DEFINE_string("mfuser", None, "a released MFuser mmseg checkpoint .pth; replaces "
                    "--dinov2 and the VLM weights")
flags.DEFINE_string("out", None, "output folder for the Orbax checkpoint")
flags.mark_flags_as_required(["out"])
FLAGS = flags.FLAGS


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv
    _cli.quiet_logging()
    from mfuser_jax.convert import WeightFileError
    from mfuser_jax.convert.pretrained import convert_encoders

    start = time.time()
    if FLAGS.mfuser:
        return convert_release(start)
    vlm = FLAGS.config.model.vlm
    given = [name for name in VLMS if getattr(FLAGS, name)]
    if not FLAGS.dinov2 or given != [vlm]:
        hint = (f" (the config builds vlm={vlm!r}; choose another with "
                f"--config configs/gta2cs.py:vlm=eva02 or :vlm=siglip)")
        fail(f"give --dinov2 and --{vlm} (the encoder weights), or --mfuser (a released "
             f"MFuser checkpoint){hint}")
    progress = stage_printer(6, start)

    try:
        counts = convert_encoders(FLAGS.config.model, FLAGS.out, dinov2_path=FLAGS.dinov2,
                                  vlm_path=getattr(FLAGS, vlm),
                                  tokenizer_path=FLAGS.siglip_tokenizer, progress=progress)
    except (WeightFileError, ValueError, FileNotFoundError) as e:
        fail(e)
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

    if FLAGS.dinov2 or FLAGS.clip or FLAGS.eva02:
        fail("--mfuser brings its own encoders; drop --dinov2/--clip/--eva02")
    progress = stage_printer(6 if FLAGS.siglip else 5, start)

    try:
        info = convert_mfuser_checkpoint(
            FLAGS.config, FLAGS.mfuser, FLAGS.out, siglip_weights=FLAGS.siglip,
            siglip_tokenizer=FLAGS.siglip_tokenizer, progress=progress)
    except (WeightFileError, ValueError, FileNotFoundError, OSError) as e:
        fail(e)
    extra = f", {info['recomputed']} rotary tables checked" if info["recomputed"] else ""
    print(f"  MFuser {info['vlm']}: {info['loaded']:,} tensors loaded ({info['dropped']} unused "
          f"keys dropped{extra}); {info['trainable']:,} trainable of {info['total']:,} parameters")
    if not info["logit_scalars"]:
        print("  note: SigLIP's logit_scale/logit_bias are not in a release; without --siglip "
              "they are unset (NaN), which only matters for training from this folder")
    print(f"wrote {info['checkpoints']}/{info['step']} and {info['pretrained']} in "
          f"{time.time() - start:.0f} s")
    out = os.path.abspath(FLAGS.out)
    print(f"evaluate with: python scripts/eval.py --config <this config> --workdir {out}")


if __name__ == "__main__":
    _cli.run_app(main)
