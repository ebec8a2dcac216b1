#!/usr/bin/env python
"""Convert the official encoder weights, or a released MFuser checkpoint, for MFuser.

    python scripts/convert_weights.py --dinov2 dinov2_vitl14_pretrain.pth \\
        --clip ViT-L-14-336px.pt --out pretrained/mfuser_clip_l
    python scripts/convert_weights.py --config configs/gta2cs.py:vlm=eva02 \\
        --dinov2 dinov2_vitl14_pretrain.pth --eva02 EVA02_CLIP_L_336_psz14_s6B.pt \\
        --out pretrained/mfuser_eva02_l
    python scripts/convert_weights.py --config configs/gta2cs.py:vlm=siglip \\
        --dinov2 dinov2_vitl14_pretrain.pth --siglip siglip_vitl16_384.pth \\
        --siglip_tokenizer spiece.model --out pretrained/mfuser_siglip_l

--dinov2 takes the official .pth or an HF Dinov2Model file (.safetensors/.bin); --clip
takes OpenAI's TorchScript .pt or an HF CLIPModel file; --eva02 the EVA02-CLIP .pt;
--siglip the SigLIP .pth the reference uses or an HF SiglipModel file, with the
SentencePiece vocabulary of google/siglip-large-patch16-384 (--siglip_tokenizer). The VLM
flag must match the config's vlm (each VLM registered in mfuser_jax/towers brings its flag,
and a tokenizer flag when its tokenizer reads a file); the VFM flag (--dinov2, --dinov3)
the config's vfm. The result is an Orbax checkpoint
of the three frozen towers at the sizes of --config's model (default configs/gta2cs.py);
the paper configs look for it at pretrained/mfuser_<vlm>_l (`config.model.pretrained`).

    python scripts/convert_weights.py --mfuser mfuser_clip_gta2cs.pth \\
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

from mfuser_jax.model.config import DEFAULT_VFM
from mfuser_jax.towers.registry import get_vfm, get_vlm, vfm_names, vlm_names

config_flags.DEFINE_config_file("config", os.path.join(_cli.REPO, "configs", "gta2cs.py"),
                                "config whose model sizes to convert for")
for _spec in map(get_vfm, vfm_names()):  # --dinov2, --dinov3
    flags.DEFINE_string(_spec.name, None, _spec.weights.help)
for _spec in map(get_vlm, vlm_names()):  # --clip, --eva02, --siglip --siglip_tokenizer, ...
    flags.DEFINE_string(_spec.name, None, _spec.weights.help)
    if _spec.tokenizer_flag:
        flags.DEFINE_string(_spec.tokenizer_flag, None,
                            f"{_spec.build.tokenizer_source}, for vlm={_spec.name}")
flags.DEFINE_string("mfuser", None, "a released MFuser mmseg checkpoint .pth; replaces "
                    "the VFM and VLM weights")
flags.DEFINE_string("out", None, "output folder for the Orbax checkpoint")
flags.mark_flags_as_required(["out"])
FLAGS = flags.FLAGS


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv
    _cli.quiet_logging()
    from mfuser_jax.weights import WeightFileError
    from mfuser_jax.model.pretrained import convert_encoders

    start = time.time()
    if FLAGS.mfuser:
        return convert_release(start)
    spec, vfm = config_vlm(), config_vfm()
    vlm = spec.name
    given = [name for name in vlm_names() if getattr(FLAGS, name)]
    given_vfm = [name for name in vfm_names() if getattr(FLAGS, name)]
    if given_vfm != [vfm.name] or given != [vlm]:
        others = " or ".join(f":vlm={n}" for n in vlm_names() if n != vlm)
        hint = (f" (the config builds vfm={vfm.name!r} and vlm={vlm!r}; choose others with "
                f"--config configs/gta2cs.py{others}, :vfm=...)")
        fail(f"give --{vfm.name} and --{vlm} (the encoder weights), or --mfuser (a released "
             f"MFuser checkpoint){hint}")
    check_tokenizer_flags(spec)
    progress = stage_printer(6, start)

    try:
        counts = convert_encoders(FLAGS.config.model, FLAGS.out,
                                  vfm_path=getattr(FLAGS, vfm.name),
                                  vlm_path=getattr(FLAGS, vlm),
                                  tokenizer_path=tokenizer_flag(spec), progress=progress)
    except (WeightFileError, ValueError, FileNotFoundError) as e:
        fail(e)
    for name, n in counts.items():
        print(f"  {name}: {n:,} parameters")
    print(f"wrote {os.path.abspath(FLAGS.out)} in {time.time() - start:.0f} s")


def config_vlm():
    """The spec of the config's vlm (an unknown one: the registered names, no traceback)."""
    try:
        return get_vlm(FLAGS.config.model.vlm)
    except ValueError as e:
        fail(e)


def config_vfm():
    """The spec of the config's vfm (an unknown one: the registered names, no traceback)."""
    try:
        return get_vfm(FLAGS.config.model.get("vfm", DEFAULT_VFM))
    except ValueError as e:
        fail(e)


def tokenizer_flag(spec):
    """The value of ``spec``'s tokenizer flag (None when it has none)."""
    return getattr(FLAGS, spec.tokenizer_flag) if spec.tokenizer_flag else None


def check_tokenizer_flags(spec):
    """Refuse tokenizer flags of another VLM than the config's."""
    stray = [f"--{s.tokenizer_flag}" for s in map(get_vlm, vlm_names())
             if s is not spec and s.tokenizer_flag and getattr(FLAGS, s.tokenizer_flag)]
    if stray:
        fail(f"{', '.join(stray)}: not read for vlm={spec.name!r}, the config's vlm")


def stage_printer(stages, start):
    """progress(stage) callback: '[i/stages] stage (elapsed s)', one line per stage."""
    count = 0

    def progress(stage):
        nonlocal count
        count += 1
        print(f"[{count}/{stages}] {stage} ({time.time() - start:.0f} s)", flush=True)

    return progress


def convert_release(start):
    from mfuser_jax.weights import WeightFileError
    from mfuser_jax.run.release import convert_mfuser_checkpoint

    spec = config_vlm()
    # A release brings its own encoders; only the frozen scalars releases lack
    # (VLMRelease.scalars: SigLIP's logit_scale/logit_bias) come from the VLM's file.
    encoders = [*vfm_names(), *(n for n in vlm_names() if not get_vlm(n).release.scalars)]
    if any(getattr(FLAGS, n) for n in encoders):
        fail(f"--mfuser brings its own encoders; drop {'/'.join('--' + n for n in encoders)}")
    stray = [f"--{n}" for n in vlm_names() if n != spec.name and getattr(FLAGS, n)]
    if stray:
        fail(f"{', '.join(stray)}: not read for vlm={spec.name!r}, the config's vlm")
    check_tokenizer_flags(spec)
    vlm_weights = getattr(FLAGS, spec.name)
    progress = stage_printer(6 if vlm_weights else 5, start)

    try:
        info = convert_mfuser_checkpoint(
            FLAGS.config, FLAGS.mfuser, FLAGS.out, vlm_weights=vlm_weights,
            tokenizer=tokenizer_flag(spec), progress=progress)
    except (WeightFileError, ValueError, FileNotFoundError, OSError) as e:
        fail(e)
    extra = f", {info['recomputed']} buffers checked" if info["recomputed"] else ""
    print(f"  MFuser {info['vlm']}: {info['loaded']:,} tensors loaded ({info['dropped']} unused "
          f"keys dropped{extra}); {info['trainable']:,} trainable of {info['total']:,} parameters")
    if not info["logit_scalars"]:
        scalars = "/".join(k.split(".")[-1] for k in spec.release.scalars)
        print(f"  note: {spec.title}'s {scalars} are not in a release; without --{spec.name} "
              "they are unset (NaN), which only matters for training from this folder")
    print(f"wrote {info['checkpoints']}/{info['step']} and {info['pretrained']} in "
          f"{time.time() - start:.0f} s")
    out = os.path.abspath(FLAGS.out)
    print(f"evaluate with: python scripts/eval.py --config <this config> --workdir {out}")


if __name__ == "__main__":
    _cli.run_app(main)
