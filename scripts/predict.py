#!/usr/bin/env python
"""Segment images with a trained checkpoint: colour masks and overlays.

  python scripts/predict.py --config configs/gta2cs.py --workdir runs/gta2cs \\
      --images photo.jpg frames/ --out preds/ [--classes "road,car,person"] [--step N]

Folders are searched for .png/.jpg/.jpeg/.bmp/.webp images. For each image X it writes
preds/X_mask.png (colours: the Cityscapes palette; generated colours for custom classes)
and preds/X_overlay.jpg. Since the queries come from text, --classes segments any list of
class names (the model was trained on the 19 Cityscapes classes; others are zero-shot).
"""

import colorsys
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


def palette_for(names, default_names):
    """Cityscapes colours for the Cityscapes classes, evenly spaced hues otherwise."""
    cityscapes = np.array(
        [[128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
         [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
         [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70],
         [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32]], np.uint8)
    try:
        from mfuser_jax.data.labels import PALETTE as cityscapes  # noqa: F811
    except ImportError:
        pass
    index = {n: i for i, n in enumerate(default_names)}
    pal = np.zeros((len(names), 3), np.uint8)
    for i, n in enumerate(names):
        if n in index and index[n] < len(cityscapes):
            pal[i] = cityscapes[index[n]]
        else:  # golden-ratio hues: distinct for any number of classes
            r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)
            pal[i] = (int(r * 255), int(g * 255), int(b * 255))
    return pal


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
    pal = palette_for(names or default_names, default_names)
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
