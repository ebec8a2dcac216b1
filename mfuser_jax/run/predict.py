"""Segmenting images with a trained checkpoint: inputs, unique output names, colour masks,
overlays, class-index and label-id PNGs written atomically, a legend; `Segmenter` is the
Python inference path. The command line is scripts/predict.py."""

import os
import sys

import numpy as np

from mfuser_jax.errors import UserError
from mfuser_jax.files import atomic_write, check_writable

EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

# What predict can write per image (scripts/predict.py --outputs): the colour mask, the
# overlay, the class index (trainId) PNG and the label-id PNG (Cityscapes' server format,
# mmseg's --format-only; a class list's own label ids for a folder dataset).
OUTPUTS = {"mask": "_mask.png", "overlay": "_overlay.jpg", "trainid": "_trainIds.png",
           "labelid": "_labelIds.png"}


def _folder_images(folder, recursive):
    if not recursive:
        return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                      if f.lower().endswith(EXTS) and os.path.isfile(os.path.join(folder, f)))
    found = []
    for dirpath, dirnames, files in os.walk(folder):
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in sorted(files)
                     if f.lower().endswith(EXTS))
    return found


def list_images(paths, out=None, recursive=False):
    """Image files from files and folders (a path that does not exist may be a
    comma-separated list), each once, in the given order (folders sorted; `recursive`:
    their sub-folders too, e.g. Cityscapes' city folders). A folder's files inside `out`
    are earlier results, not inputs."""
    skip = os.path.join(os.path.realpath(out), "") if out else None
    found_all, seen = [], set()
    for p in paths:
        for item in p.split(",") if not os.path.exists(p) else [p]:
            if not item:
                continue
            if os.path.isdir(item):
                found = _folder_images(item, recursive)
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
        sub = "" if recursive else " (sub-folders are searched with --recursive)"
        raise UserError(f"no images ({', '.join(EXTS)}) found in {', '.join(paths)}{sub}")
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


def probe_image(path):
    """None when PIL recognises `path` as an image (its header only), else the reason."""
    from PIL import Image
    try:
        with Image.open(path):
            return None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__


def read_image(path):
    """uint8 (h, w, 3), or None with the reason when the file is not a readable image."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")), None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, str(e) or type(e).__name__


def write_outputs(stem, arrays):
    """Writes <stem><suffix> for each {kind: array} (suffixes: OUTPUTS) together or not at
    all: each goes to a temporary name first, renamed once all are complete."""
    from PIL import Image
    targets = [(f"{stem}{OUTPUTS[kind]}", array,
                {"format": "JPEG", "quality": 92} if kind == "overlay" else {"format": "PNG"})
               for kind, array in arrays.items()]
    with atomic_write(*(path for path, _, _ in targets)) as tmps:
        for tmp, (_, array, kw) in zip(tmps, targets):
            Image.fromarray(array).save(tmp, **kw)
    return targets[0][0]


def check_outputs(outputs):
    outputs = tuple(o.strip().lower() for o in outputs if o.strip())
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise UserError(f"--outputs={','.join(outputs)}: choose from {', '.join(OUTPUTS)}")
    return outputs


def label_ids_for(names, config):
    """(K,) uint8: the label id written for each class in --outputs labelid. The 19
    Cityscapes classes in their order take Cityscapes' labelIds (the benchmark server's
    format); the classes of a class list (configs/custom.py) its own ids."""
    from mfuser_jax.data.labels import CITYSCAPES_ID_TO_TRAINID, CLASSES
    folder_ids = tuple(config.data.get("folder", {}).get("label_ids", ()) or ())
    if folder_ids and list(names) == list(config.model.class_names):
        return np.asarray(folder_ids, np.uint8)
    if tuple(names) == tuple(CLASSES):
        ids = {t: i for i, t in CITYSCAPES_ID_TO_TRAINID.items()}
        return np.asarray([ids[t] for t in range(len(CLASSES))], np.uint8)
    raise UserError("--outputs labelid needs the 19 Cityscapes classes in their order or a "
                    "class list with label ids (configs/custom.py); --outputs trainid writes "
                    "the class index of any class list")


def write_legend(out, names, palette, label_ids=None):
    """out/legend.png (a swatch and the name of each class, in output-channel order) and
    out/legend.txt ('<index> <#rrggbb> [label id] <name>' per line)."""
    from PIL import Image, ImageDraw

    from mfuser_jax.run.report import _font
    row, sw, pad = 22, 40, 6
    font = _font(14)
    width = sw + 3 * pad + max(int(font.getlength(f"{i:>2} {n}")) for i, n in enumerate(names))
    img = Image.new("RGB", (width, row * len(names) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    lines = []
    for i, (name, colour) in enumerate(zip(names, palette)):
        y = pad + i * row
        draw.rectangle([pad, y, pad + sw - 1, y + row - pad - 1], fill=tuple(int(c) for c in colour))
        draw.text((sw + 2 * pad, y), f"{i:>2} {name}", fill=(30, 30, 30), font=font)
        hexc = "#" + "".join(f"{int(c):02x}" for c in colour)
        lid = f" {int(label_ids[i])}" if label_ids is not None else ""
        lines.append(f"{i} {hexc}{lid} {name}")
    png, txt = os.path.join(out, "legend.png"), os.path.join(out, "legend.txt")
    with atomic_write(png, txt) as (tmp_png, tmp_txt):
        img.save(tmp_png, format="PNG")
        with open(tmp_txt, "w") as f:
            f.write("\n".join(lines) + "\n")
    return png


def palette_for(names, default_names, trained_palette=None):
    """A trained class keeps its colour (config.model.palette, else the Cityscapes colour
    of a Cityscapes name); any other name gets a colour far from the others shown."""
    from mfuser_jax.data.custom import default_palette, distinct_colours
    base = np.asarray(trained_palette if trained_palette else default_palette(default_names),
                      np.uint8).reshape(-1, 3)
    index = {n: i for i, n in enumerate(default_names)}
    known = [tuple(base[index[n]]) for n in names if n in index]
    new = iter(distinct_colours(known, sum(n not in index for n in names)))
    return np.array([base[index[n]] if n in index else next(new) for n in names],
                    np.uint8).reshape(-1, 3)


def parse_class_names(text, flag="--classes"):
    """'road, car' -> ['road', 'car']; None/'' -> None. An empty entry or a name given
    twice is refused: each name is one output channel (one query)."""
    if text is None or not str(text).strip():
        return None
    names = [c.strip() for c in str(text).split(",")]
    if "" in names:
        raise UserError(f"{flag}={text!r}: entry {names.index('') + 1} is empty (give "
                        "comma-separated class names)")
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise UserError(f"{flag}={text!r}: {dup!r} is given twice")
    return names


NATIVE = "native"


def parse_scale(config, scale=None):
    """The test-time resize scale (w, h) prediction uses, or None for the images' own size.

    scale None or "": the protocol of the first evaluation dataset (config.data.eval[0]:
    2048x1024 for Cityscapes, 1280x720 for BDD100K, none for ACDC or synthetic scenes),
    so a photo is segmented at the scale the reported numbers come from; "native": each
    image at its own size; "W,H" or "WxH": that scale (keep-ratio, as mmseg's Resize)."""
    from mfuser_jax.data.pipeline import eval_test_scale
    if scale is None or str(scale).strip() == "":
        evals = list(config.data.get("eval", ()) or ())
        return eval_test_scale(config, evals[0]) if evals else None
    text = str(scale).strip().lower()
    if text == NATIVE:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        w = h = 0
    if w < 1 or h < 1:
        raise UserError(f"--scale={scale!r}: give W,H (e.g. 2048,1024), 'native' or nothing "
                        "(the first evaluation dataset's test scale)")
    return w, h


class Segmenter:
    """The Python inference API: a restored model at the evaluation protocol, image
    (h, w, 3) uint8 RGB -> class index map (h, w), or scores (h, w, K).

        from mfuser_jax.run.predict import Segmenter
        seg = Segmenter.from_workdir("runs/gta2cs")      # W/config.json, latest step
        labels = seg(image)                              # (h, w) int32
        names = [seg.class_names[i] for i in np.unique(labels)]
        colours = seg.colorize(labels)                   # (h, w, 3) uint8

    As scripts/eval.py does: the image is resized (keep-ratio, bilinear) to `test_scale`,
    the sliding window (config.evaluation) averages the window scores, the score map is
    resized bilinearly back to the image's size, then argmax. `test_scale` None segments
    at the image's own size (each new size compiles the predictor once). `flip`: mmseg's
    flip test-time augmentation (as scripts/eval.py with evaluation.flip): the scores of the
    image and of its mirror image, each resized back, softmaxed and the mirror's mirrored
    back, averaged (probabilities then, not logits)."""

    def __init__(self, model, config, *, class_names=None, test_scale=None, step=None,
                 flip=False):
        from mfuser_jax.run.evaluate import SlidingWindowPredictor
        ev = config.evaluation
        self.model, self.config, self.step, self.flip = model, config, step, bool(flip)
        self.class_names = list(class_names or config.model.class_names)
        self.test_scale = tuple(test_scale) if test_scale else None
        self.palette = palette_for(self.class_names, list(config.model.class_names),
                                   config.model.get("palette", None))
        self.predictor = SlidingWindowPredictor(
            model, crop=int(ev.crop_size), stride=int(ev.stride),
            crop_batch=int(ev.crop_batch), class_names=class_names)
        self._resizers = {}

    @classmethod
    def from_workdir(cls, workdir, config=None, *, step=None, classes=None, scale=None):
        """Restores W/checkpoints/<step> (default the latest) with `config` (default the
        one W/config.json recorded). `classes`: class names, a list or "a,b" (default the
        config's; others are zero-shot); `scale`: as scripts/predict.py --scale (default
        the first evaluation dataset's test scale, "native", or (w, h))."""
        from mfuser_jax.run.restore import restore_model
        from mfuser_jax.workdir import config_from_workdir
        config = config if config is not None else config_from_workdir(workdir)
        names = parse_class_names(",".join(classes) if isinstance(classes, (list, tuple))
                                  else classes, flag="classes")
        if isinstance(scale, (list, tuple)):
            scale = ",".join(str(int(v)) for v in scale)
        test_scale = parse_scale(config, scale)
        model, step = restore_model(config, workdir, step)
        return cls(model, config, class_names=names, test_scale=test_scale, step=step)

    def with_options(self, *, class_names=None, test_scale=None, flip=None):
        """Another Segmenter of the same restored model: other class names (None: the
        config's), test scale (None: the image's own size) or flip; each compiles anew."""
        return Segmenter(self.model, self.config, class_names=class_names,
                         test_scale=test_scale, step=self.step,
                         flip=self.flip if flip is None else flip)

    def colorize(self, labels):
        """(h, w, 3) uint8: each class index in its palette colour."""
        return self.palette[np.asarray(labels)]

    def scores(self, image):
        """(h, w, K) float32 scores for a uint8 (h, w, 3) image, at the image's size."""
        from mfuser_jax.data.transforms import test_resize
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise UserError(f"expected a uint8 (h, w, 3) RGB image, got {image.dtype} "
                            f"{image.shape}")
        h, w = image.shape[:2]
        resized = test_resize(image, self.test_scale)
        if self.flip:  # the probabilities of both views averaged, as ImageEvaluator
            views = [self.predictor.probs(resized, (h, w), flip) for flip in (False, True)]
            return np.asarray((views[0] + views[1]) / 2)
        scores = self.predictor(resized)
        if scores.shape[:2] != (h, w):
            scores = np.asarray(self._resizer(h, w)(scores))
        return scores

    def __call__(self, image):
        """(h, w) int32: the index of each pixel's class in `class_names`."""
        return self.scores(image).argmax(-1).astype(np.int32)

    def _resizer(self, h, w):
        """The evaluator's resize of the score map to the label size (jitted per size)."""
        if (h, w) not in self._resizers:
            import functools

            import jax

            from mfuser_jax.ops.resize import resize
            self._resizers[(h, w)] = jax.jit(functools.partial(resize, size=(h, w),
                                                               axes=(0, 1)))
        return self._resizers[(h, w)]


def predict(config, workdir, images, out, classes, step, alpha, scale=None,
            outputs=("mask", "overlay"), recursive=False):
    """Segments every readable image; returns the number of images that could not be read.
    `scale`: see parse_scale (default: the first evaluation dataset's test scale).
    `outputs`: which files per image (OUTPUTS); out/legend.png and legend.txt name the
    colours (and label ids). `recursive`: folders' sub-folders too."""
    from tqdm import tqdm

    from mfuser_jax.run.restore import restore_model

    outputs = check_outputs(outputs)
    files = list_images(images, out, recursive)
    stems = output_stems(files, out)
    default_names = list(config.model.class_names)
    names = parse_class_names(classes)
    label_ids = label_ids_for(names or default_names, config) if "labelid" in outputs else None
    test_scale = parse_scale(config, scale)
    # Everything the user can get wrong is checked before the restore (minutes at full
    # size): the output folder, and each input's header.
    check_writable(out, folder=True, hint=" (give --out a writable folder)")
    failed = []
    for f in files:
        reason = probe_image(f)
        if reason is not None:
            failed.append(f)
            print(f"skipped {f}: not a readable image ({reason})", file=sys.stderr,
                  flush=True)
    if len(failed) == len(files):
        raise UserError(f"none of the {len(files)} image(s) is a readable image: "
                        f"{', '.join(failed)}")
    bad = set(failed)
    stems = [s for f, s in zip(files, stems) if f not in bad]
    todo = [f for f in files if f not in bad]
    at = (f"each resized to the evaluation scale {test_scale[0]}x{test_scale[1]} and back"
          if test_scale else "each at its own size")
    print(f"{len(files)} image(s), {at}; restoring the model from {workdir} "
          "(building and compiling take a while at full size)", flush=True)
    model, step = restore_model(config, workdir, step)
    segmenter = Segmenter(model, config, class_names=names, test_scale=test_scale, step=step)
    pal = segmenter.palette
    write_legend(out, names or default_names, pal, label_ids)
    with tqdm(total=len(files), initial=len(failed), desc="predict", unit="img",
              dynamic_ncols=True) as bar:
        for f, stem in zip(todo, stems):
            image, reason = read_image(f)  # a file may still fail past its header
            if image is None:
                failed.append(f)
                tqdm.write(f"skipped {f}: not a readable image ({reason})", file=sys.stderr)
            else:
                cls = segmenter(image)
                mask = pal[cls]
                arrays = {"mask": mask,
                          "overlay": (image * (1 - alpha) + mask * alpha).astype(np.uint8),
                          "trainid": cls.astype(np.uint8),
                          "labelid": None if label_ids is None else label_ids[cls]}
                write_outputs(stem, {k: arrays[k] for k in outputs})
            bar.update(1)
    done = len(files) - len(failed)
    print(f"{done} image(s) segmented with checkpoint step {step}: {', '.join(outputs)} "
          f"and legend.png in {os.path.abspath(out)}", flush=True)
    if failed:
        print(f"error: {len(failed)} of {len(files)} image(s) could not be read: "
              f"{', '.join(failed)}", file=sys.stderr, flush=True)
    return len(failed)
