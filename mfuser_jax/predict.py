"""Segmenting images with a trained checkpoint: inputs, unique output names, colour masks
and overlays written atomically. The command line is scripts/predict.py."""

import os
import sys

import numpy as np

from mfuser_jax.errors import UserError
from mfuser_jax.files import atomic_write

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_images(paths, out=None):
    """Image files from files and folders (a path that does not exist may be a
    comma-separated list), each once, in the given order (folders sorted). A folder's
    files inside `out` are earlier results, not inputs."""
    skip = os.path.join(os.path.realpath(out), "") if out else None
    found_all, seen = [], set()
    for p in paths:
        for item in p.split(",") if not os.path.exists(p) else [p]:
            if not item:
                continue
            if os.path.isdir(item):
                found = sorted(os.path.join(item, f) for f in os.listdir(item)
                               if f.lower().endswith(EXTS)
                               and os.path.isfile(os.path.join(item, f)))
                if skip:
                    found = [f for f in found if not os.path.realpath(f).startswith(skip)]
            elif os.path.isfile(item):
                found = [item]
            else:
                raise UserError(f"no such image or folder: {os.path.abspath(item)}")
            for f in found:
                if os.path.realpath(f) not in seen:
                    seen.add(os.path.realpath(f))
                    found_all.append(f)
    if not found_all:
        raise UserError(f"no images found in {', '.join(paths)}")
    return found_all


def output_stems(files, out):
    """out/<folder below the inputs' common parent>/<name>_<ext>: one per input, never
    shared (same-stem files keep apart by their extension; a leftover clash, possible
    only for odd names, gets a counter)."""
    dirs = [os.path.dirname(os.path.abspath(f)) for f in files]
    root = os.path.commonpath(dirs)
    stems, taken = [], set()
    for f, d in zip(files, dirs):
        base, ext = os.path.splitext(os.path.basename(f))
        name = f"{base}_{ext[1:]}" if ext else base
        stem = os.path.normpath(os.path.join(out, os.path.relpath(d, root), name))
        candidate, n = stem, 1
        while candidate in taken:
            n += 1
            candidate = f"{stem}_{n}"
        taken.add(candidate)
        stems.append(candidate)
    return stems


def read_image(path):
    """uint8 (h, w, 3), or None with the reason when the file is not a readable image."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")), None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, str(e) or type(e).__name__


def write_outputs(stem, mask, overlay):
    """Writes <stem>_mask.png and <stem>_overlay.jpg together or not at all: each goes to a
    temporary name first, renamed once both are complete."""
    from PIL import Image
    targets = [(f"{stem}_mask.png", mask, {"format": "PNG"}),
               (f"{stem}_overlay.jpg", overlay, {"format": "JPEG", "quality": 92})]
    with atomic_write(*(path for path, _, _ in targets)) as tmps:
        for tmp, (_, array, kw) in zip(tmps, targets):
            Image.fromarray(array).save(tmp, **kw)
    return targets[0][0]


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
    """Segments every readable image; returns the number of images that could not be read."""
    from tqdm import tqdm

    from mfuser_jax.evaluate import SlidingWindowPredictor
    from mfuser_jax.train import restore_model

    files = list_images(images, out)
    stems = output_stems(files, out)
    default_names = list(config.model.class_names)
    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    print(f"{len(files)} image(s); restoring the model from {workdir} (building and "
          "compiling take a while at full size)", flush=True)
    model, step = restore_model(config, workdir, step)
    ev = config.evaluation
    predictor = SlidingWindowPredictor(model, crop=int(ev.crop_size), stride=int(ev.stride),
                                       crop_batch=int(ev.crop_batch), class_names=names)
    pal = palette_for(names or default_names, default_names,
                      config.model.get("palette", None))
    failed = []
    with tqdm(total=len(files), desc="predict", unit="img", dynamic_ncols=True) as bar:
        for f, stem in zip(files, stems):
            image, reason = read_image(f)
            if image is None:
                failed.append(f)
                tqdm.write(f"skipped {f}: not a readable image ({reason})", file=sys.stderr)
            else:
                mask = pal[predictor(image).argmax(-1)]
                overlay = (image * (1 - alpha) + mask * alpha).astype(np.uint8)
                write_outputs(stem, mask, overlay)
            bar.update(1)
    done = len(files) - len(failed)
    print(f"{done} image(s) segmented with checkpoint step {step}: masks and overlays in "
          f"{os.path.abspath(out)}", flush=True)
    if failed:
        print(f"error: {len(failed)} of {len(files)} image(s) could not be read: "
              f"{', '.join(failed)}", file=sys.stderr, flush=True)
    return len(failed)
