#!/usr/bin/env python
"""Segment images with a trained checkpoint: colour masks and overlays.

  python scripts/predict.py --config configs/gta2cs.py --workdir runs/gta2cs \\
      --images photo.jpg frames/ --out preds/ [--classes "road,car,person"] [--step N]

Folders are searched for .png/.jpg/.jpeg/.bmp/.webp images. For each image X it writes
preds/X_mask.png (colours: config.model.palette, else the Cityscapes palette; generated
colours for other class names) and preds/X_overlay.jpg. Since the queries come from text,
--classes segments any list of class names (names the model was not trained on are
zero-shot).
"""

import os

import _cli  # noqa: F401
import numpy as np
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py[:arg]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "training output folder holding checkpoints/")
flags.DEFINE_multi_string("images", None, "image files or folders (repeat or list)")
flags.DEFINE_string("out", None, "output folder")
flags.DEFINE_string("classes", None, "comma-separated class names (default: the config's)")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.DEFINE_float("alpha", 0.5, "mask opacity in the overlay")
flags.mark_flags_as_required(["config", "workdir", "images", "out"])
FLAGS = flags.FLAGS

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_images(paths):
    from mfuser_jax.train import UserError
    out = []
    for p in paths:
        for item in p.split(",") if not os.path.exists(p) else [p]:
            if os.path.isdir(item):
                out += sorted(os.path.join(item, f) for f in os.listdir(item)
                              if f.lower().endswith(EXTS))
            elif os.path.isfile(item):
                out.append(item)
            else:
                raise UserError(f"no such image or folder: {os.path.abspath(item)}")
    if not out:
        raise UserError(f"no images found in {', '.join(paths)}")
    return out


def palette_for(names, default_names, trained_palette=None):
    """A trained class keeps its colour (config.model.palette, else the Cityscapes colour
    of a Cityscapes name); any other name gets an evenly spaced hue."""
    from mfuser_jax.data.custom import default_palette, generated_colour
    base = np.asarray(trained_palette if trained_palette else default_palette(default_names),
                      np.uint8).reshape(-1, 3)
    index = {n: i for i, n in enumerate(default_names)}
    return np.array([base[index[n]] if n in index else generated_colour(i)
                     for i, n in enumerate(names)], np.uint8).reshape(-1, 3)


def predict(config, workdir, images, out, classes, step, alpha):
    from PIL import Image

    from mfuser_jax.evaluate import SlidingWindowPredictor
    from mfuser_jax.train import restore_model

    files = list_images(images)
    default_names = list(config.model.class_names)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    model, step = restore_model(config, workdir, step)
    ev = config.get("evaluation", {})
    predictor = SlidingWindowPredictor(model, crop=int(ev.get("crop_size", 512)),
                                       stride=int(ev.get("stride", 341)),
                                       crop_batch=int(ev.get("crop_batch", 6)),
                                       class_names=names)
    pal = palette_for(names or default_names, default_names,
                      config.model.get("palette", None))
    os.makedirs(out, exist_ok=True)
    for f in files:
        image = np.asarray(Image.open(f).convert("RGB"))
        pred = predictor(image).argmax(-1)
        mask = pal[pred]
        stem = os.path.splitext(os.path.basename(f))[0]
        Image.fromarray(mask).save(os.path.join(out, f"{stem}_mask.png"))
        overlay = (image * (1 - alpha) + mask * alpha).astype(np.uint8)
        Image.fromarray(overlay).save(os.path.join(out, f"{stem}_overlay.jpg"), quality=92)
        print(f"{f} -> {out}/{stem}_mask.png", flush=True)
    print(f"{len(files)} image(s) segmented with checkpoint step {step}", flush=True)


def main(argv):
    del argv
    _cli.run_main(predict, FLAGS.config, FLAGS.workdir, FLAGS.images, FLAGS.out,
                  FLAGS.classes, FLAGS.step, FLAGS.alpha)


if __name__ == "__main__":
    _cli.run_app(main)
