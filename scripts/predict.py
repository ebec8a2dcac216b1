#!/usr/bin/env python
"""Segment images with a trained checkpoint: colour masks and overlays.

  python scripts/predict.py --config configs/gta2cs.py --workdir runs/gta2cs \\
      --images photo.jpg street.png frames/ --out preds/ [--classes "road,car,person"] [--step N]

Without --config, the config W/config.json recorded (training and the release converter
write it) is used.

--images takes any number of files and folders (also repeated: --images a.jpg --images
b/); folders are searched for .png/.jpg/.jpeg/.bmp/.webp/.tif/.tiff images (with
--recursive their sub-folders too, e.g. Cityscapes' city folders). Outputs mirror the
inputs' folders below their common parent and keep each input's extension in the name, so
no two inputs share an output: frames/0001.png gives preds/frames/0001_png_mask.png
(colours: config.model.palette, else the Cityscapes palette; generated colours for other
class names) and preds/frames/0001_png_overlay.jpg; --outputs adds _trainIds.png (class
index) and _labelIds.png (Cityscapes label ids, the benchmark server's format, as mmseg's
--format-only; a class list's own ids for configs/custom.py). preds/legend.png and
legend.txt give each class's colour (and label id). Since the queries come from text,
--classes segments any list of class names (the model was trained on the 19 Cityscapes
classes; others are zero-shot).

Each image is segmented as the evaluation segments: resized (keep-ratio) to the first
evaluation dataset's test scale (config.data.eval[0]: 2048x1024 for Cityscapes, 1280x720
for BDD100K), sliding window, scores resized back to the image's size, argmax. --scale
native segments each image at its own size (another scale than the reported numbers';
each new size compiles once); --scale W,H picks a scale.

An image that cannot be read is reported by name and skipped; the others are segmented and
the exit status is 1. Exit status 2: a usage mistake (nothing segmented), 130: Ctrl-C.
"""

import sys

import _cli
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/demo.py[:arg] "
                                "(default: the workdir's config.json, as trained)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "training output folder holding checkpoints/")
flags.DEFINE_multi_string("images", None, "image files or folders: any number after one "
                          "--images, or repeated")
flags.DEFINE_string("out", None, "output folder")
flags.DEFINE_string("classes", None, "comma-separated class names (default: the config's)")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.DEFINE_float("alpha", 0.5, "mask opacity in the overlay")
flags.DEFINE_list("outputs", ["mask", "overlay"], "files per image: mask (colours), overlay "
                  "(.jpg), trainid (class index PNG), labelid (label-id PNG: Cityscapes ids, "
                  "the benchmark server's format, or a class list's own ids)")
flags.DEFINE_bool("recursive", False, "search the folders' sub-folders too (e.g. Cityscapes' "
                  "leftImg8bit/test with its city folders)")
flags.DEFINE_string("scale", "", "test-time resize before the sliding window: empty = the "
                    "first evaluation dataset's scale (the protocol the mIoU comes from, "
                    "e.g. 2048,1024 for Cityscapes); 'native' = each image's own size; "
                    "or W,H")
flags.mark_flags_as_required(["workdir", "images", "out"])
FLAGS = flags.FLAGS

EXIT_SOME_FAILED = 1


def main(argv):
    images = list(FLAGS.images) + list(argv[1:])  # the paths after the first one
    from mfuser_jax.run.predict import predict
    config = _cli.config_or_workdir(FLAGS.config, FLAGS.workdir)
    failed = _cli.run_main(predict, config, FLAGS.workdir, images, FLAGS.out,
                           FLAGS.classes, FLAGS.step, FLAGS.alpha, FLAGS.scale,
                           FLAGS.outputs, FLAGS.recursive)
    if failed:
        sys.exit(EXIT_SOME_FAILED)


if __name__ == "__main__":
    _cli.run_app(main, positional_args=True)
