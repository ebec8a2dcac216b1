"""Training input pipeline throughput (images/s at 512 crops from 1914x1052 PNGs).

CLI: ``python scripts/benchmark_data.py [--images 24] [--batch 8] [--steps 12]
[--workers 0 2] [--root DIR]``. Writes a GTA-like tree (real-style synthetic scenes at
GTA5's 1914x1052, PNG) into a temporary folder, prepares it with the same code as
scripts/prepare_data.py, then times ``make_train_iterator`` with the reference recipe
(rescale 0.5-2, crop 512, cat_max_ratio 0.75, flip, photometric distortion, RCS).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import ml_collections
from PIL import Image

from configs.base import data_config
from mfuser_jax.data import imageio
from mfuser_jax.data.fake import INVERSE
from mfuser_jax.data.pipeline import make_train_iterator
from mfuser_jax.data.prepare import prepare
from mfuser_jax.data.synthetic import render_scene


def write_gta_like(root: str, n: int, size=(1052, 1914)) -> None:
    os.makedirs(f"{root}/gta/images", exist_ok=True)
    os.makedirs(f"{root}/gta/labels", exist_ok=True)
    for i in range(n):
        img, lab = render_scene(i, seed=123, size=size, style="real")
        Image.fromarray(img).save(f"{root}/gta/images/{i:05d}.png")
        imageio.write_label(f"{root}/gta/labels/{i:05d}.png", INVERSE["gta"][lab])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_pipeline(root: str, batch: int, steps: int, workers: int, warmup: int = 2) -> dict:
    c = ml_collections.ConfigDict(dict(seed=0, batch_size=batch, data_root=root))
    c.data = data_config("gta", ())
    c.data.num_workers = workers
    it = make_train_iterator(c)
    t0 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    t1 = time.perf_counter()
    for _ in range(steps):
        b = next(it)
        assert b["image"].shape == (batch, 512, 512, 3)
    t2 = time.perf_counter()
    close = getattr(it, "close", None)
    if close:
        close()
    return {"workers": workers, "batch": batch, "steps": steps,
            "startup_s": round(t1 - t0, 2),
            "images_per_s": round(batch * steps / (t2 - t1), 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--root", default=None, help="reuse/keep the generated tree here")
    a = p.parse_args(argv)
    tmp = None
    root = a.root
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = tmp.name
    if not os.path.isdir(os.path.join(root, "gta", "images")):
        t = time.perf_counter()
        write_gta_like(root, a.images)
        print(f"wrote {a.images} 1914x1052 PNG pairs in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    prepare("gta", root, nproc=os.cpu_count() or 1, progress=False)
    print(f"prepare_data gta: {time.perf_counter() - t:.1f} s")
    results = [time_pipeline(root, a.batch, a.steps, w) for w in a.workers]
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "results": results}
    print(json.dumps(info, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return info
