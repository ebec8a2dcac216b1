"""Procedural street scenes with Cityscapes trainIds: an embedded demo domain shift.

Each scene is a pure function of (seed, split, index): a road vanishing at the horizon,
sidewalks, terrain, buildings, walls, fences and trees along the sides, sky, poles with
traffic signs and lights, cars, trucks, buses, the odd train, pedestrians and riders on
bicycles or motorcycles. The same layout is rendered in two styles:

* "synthetic": flat-shaded uniform colours with sharp edges (the training domain),
* "real": per-class procedural textures, random object paints, re-lighting, colour
  casts, gamma, blur and sensor noise (the unseen test domain).

Sources "synthetic" (train split, synthetic style) and "synthetic_real" (eval split,
real-like style) plug into the same pipeline as the on-disk datasets.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from mfuser_jax.data.labels import IGNORE_INDEX, NUM_CLASSES, PALETTE

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY,
 PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(NUM_CLASSES)

# Flat base colours of the synthetic style (deliberately not the Cityscapes palette).
BASE_COLOURS = np.array(
    [[90, 90, 95], [170, 160, 150], [150, 110, 90], [180, 170, 140], [120, 100, 70],
     [70, 70, 70], [40, 40, 40], [230, 200, 40], [60, 130, 50], [140, 160, 80],
     [130, 180, 235], [200, 60, 60], [60, 60, 200], [200, 30, 30], [230, 230, 230],
     [240, 170, 30], [120, 120, 140], [30, 30, 120], [20, 160, 160]], dtype=np.float32)

SPLITS = {"train": 0, "val": 1}
STYLES = ("synthetic", "real")


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index, stream]))


class _Canvas:
    """Painter's-algorithm label and instance maps."""

    def __init__(self, h, w):
        self.h, self.w = h, w
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.label = np.full((h, w), SKY, np.uint8)
        self.inst = np.zeros((h, w), np.int32)
        self.n = 0

    def paint(self, mask, cls, window=(slice(None), slice(None))):
        self.n += 1
        self.label[window][mask] = cls
        self.inst[window][mask] = self.n

    def rect(self, x0, y0, x1, y1, cls):
        xa, xb = int(round(max(min(x0, x1), 0))), int(round(min(max(x0, x1), self.w)))
        ya, yb = int(round(max(min(y0, y1), 0))), int(round(min(max(y0, y1), self.h)))
        if xb > xa and yb > ya:
            self.n += 1
            self.label[ya:yb, xa:xb] = cls
            self.inst[ya:yb, xa:xb] = self.n

    def ellipse(self, cx, cy, rx, ry, cls):
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        ya, yb = max(int(cy - ry) - 1, 0), min(int(cy + ry) + 2, self.h)
        xa, xb = max(int(cx - rx) - 1, 0), min(int(cx + rx) + 2, self.w)
        if xb <= xa or yb <= ya:
            return
        win = (slice(ya, yb), slice(xa, xb))
        m = ((self.xx[win] - cx) / rx) ** 2 + ((self.yy[win] - cy) / ry) ** 2 <= 1
        self.paint(m, cls, win)


def scene_layout(index: int, *, seed: int = 0, split: str = "train",
                 size: tuple[int, int] = (128, 256)):
    """(label uint8 (H, W) trainIds, instance ids int32 (H, W)) of one scene."""
    h, w = size
    rng = _rng(seed, split, index, 0)
    cv = _Canvas(h, w)
    hy = h * rng.uniform(0.36, 0.5)
    vx = w * rng.uniform(0.3, 0.7)
    road_half = w * rng.uniform(0.3, 0.6)
    walk = w * rng.uniform(0.12, 0.3)
    yy, xx = cv.yy, cv.xx
    t = np.clip((yy - hy) / (h - hy), 0, None)  # 0 at the horizon, 1 at the bottom row
    ground = yy >= hy
    cv.paint(ground, TERRAIN)
    cv.paint(ground & (np.abs(xx - vx) <= t * (road_half + walk)), SIDEWALK)
    cv.paint(ground & (np.abs(xx - vx) <= t * road_half), ROAD)

    # Side blocks above the horizon: buildings, trees, walls and fences, gaps of sky.
    x = 0.0
    while x < w:
        bw = w * rng.uniform(0.08, 0.25)
        side = abs(x + bw / 2 - vx) / w  # taller towards the image edges
        kind = rng.choice(4, p=[0.55, 0.25, 0.1, 0.1])
        if kind == 0:
            top = hy - h * rng.uniform(0.1, 0.25 + 0.6 * side)
            cv.rect(x, top, x + bw, hy + 1, BUILDING)
        elif kind == 1:
            r = bw * rng.uniform(0.35, 0.6)
            cv.rect(x + bw / 2 - r * 0.12, hy - r, x + bw / 2 + r * 0.12, hy + 1, VEGETATION)
            cv.ellipse(x + bw / 2, hy - r * 1.3, r, r * rng.uniform(0.7, 1.1), VEGETATION)
        if kind in (0, 2) and rng.random() < 0.5:
            cv.rect(x, hy - h * rng.uniform(0.02, 0.06), x + bw, hy + 1,
                    WALL if rng.random() < 0.5 else FENCE)
        x += bw

    # Objects from far to near (painter's order).
    objs = []
    for _ in range(rng.integers(1, 5)):
        objs.append(("pole", rng.uniform(0.1, 0.95), rng.choice([-1, 1])))
    for _ in range(rng.integers(0, 5)):
        objs.append(("vehicle", rng.uniform(0.12, 0.95), rng.uniform(-0.8, 0.8)))
    for _ in range(rng.integers(0, 4)):
        objs.append(("person", rng.uniform(0.1, 0.95), rng.choice([-1, 1])))
    if rng.random() < 0.3:
        objs.append(("rider", rng.uniform(0.15, 0.9), rng.uniform(-0.8, 0.8)))
    if rng.random() < 0.08:
        objs.append(("train", rng.uniform(0.05, 0.2), 0.0))
    objs.sort(key=lambda o: o[1])
    for kind, d, pos in objs:
        base = hy + d * (h - hy)
        if kind == "pole":
            px = vx + pos * d * (road_half + walk * 0.6)
            ph, pw = d * h * 0.9, max(1.0, d * w * 0.012)
            cv.rect(px - pw / 2, base - ph, px + pw / 2, base, POLE)
            if rng.random() < 0.5:
                s = d * w * 0.05
                cv.rect(px - s / 2, base - ph - s * 0.5, px + s / 2, base - ph + s * 0.6, SIGN)
            else:
                s = d * w * 0.025
                cv.rect(px - s / 2, base - ph - s, px + s / 2, base - ph + s * 1.4, LIGHT)
        elif kind == "vehicle":
            cls = rng.choice([CAR, TRUCK, BUS], p=[0.8, 0.1, 0.1])
            vw = d * w * (0.22 if cls == CAR else 0.3)
            vh = vw * (0.55 if cls == CAR else 0.9)
            cx = vx + pos * d * road_half
            cv.rect(cx - vw / 2, base - vh * (0.6 if cls == CAR else 1.0), cx + vw / 2, base, cls)
            if cls == CAR:
                cv.rect(cx - vw * 0.32, base - vh, cx + vw * 0.32, base - vh * 0.55, cls)
        elif kind == "person":
            px = vx + pos * d * (road_half + walk * 0.5)
            ph = d * h * 0.45
            cv.ellipse(px, base - ph * 0.42, ph * 0.12, ph * 0.42, PERSON)
            cv.ellipse(px, base - ph * 0.9, ph * 0.08, ph * 0.1, PERSON)
        elif kind == "rider":
            cx = vx + pos * d * road_half
            bh = d * h * 0.2
            cls = BICYCLE if rng.random() < 0.6 else MOTORCYCLE
            cv.ellipse(cx - bh * 0.6, base - bh * 0.35, bh * 0.35, bh * 0.35, cls)
            cv.ellipse(cx + bh * 0.6, base - bh * 0.35, bh * 0.35, bh * 0.35, cls)
            cv.rect(cx - bh * 0.6, base - bh * 0.55, cx + bh * 0.6, base - bh * 0.4, cls)
            cv.ellipse(cx, base - bh * 1.2, bh * 0.22, bh * 0.55, RIDER)
            cv.ellipse(cx, base - bh * 1.95, bh * 0.16, bh * 0.18, RIDER)
        else:  # a train crossing far away
            cv.rect(0, base - d * h * 0.5, w, base, TRAIN)
    return cv.label, cv.inst


def _value_noise(rng, h, w, cell):
    g = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    im = Image.fromarray(g, mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(im)


def render(label: np.ndarray, inst: np.ndarray, rng: np.random.Generator,
           style: str = "synthetic") -> np.ndarray:
    """RGB uint8 image of a layout in the given style."""
    h, w = label.shape
    n_inst = int(inst.max()) + 1
    if style == "synthetic":
        jitter = rng.uniform(-12, 12, (n_inst, 3)).astype(np.float32)
        img = BASE_COLOURS[label] + jitter[inst]
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)
    if style != "real":
        raise ValueError(f"unknown synthetic style {style!r}; expected one of {STYLES}")
    # Shifted class colours and random paints for vehicles and clothes.
    base = BASE_COLOURS * rng.uniform(0.75, 1.25, (1, 3)).astype(np.float32)
    base = base + rng.uniform(-25, 25, base.shape).astype(np.float32)
    paint = rng.uniform(20, 235, (n_inst, 3)).astype(np.float32)
    inst_cls = np.zeros(n_inst, np.int64)
    inst_cls[inst.ravel()] = label.ravel()
    repaint = np.isin(inst_cls, [PERSON, RIDER, CAR, TRUCK, BUS, MOTORCYCLE, BICYCLE])
    inst_col = np.where(repaint[:, None], paint, base[inst_cls])
    img = inst_col[inst]
    # Textures: two octaves of value noise, stronger on vegetation, terrain and walls.
    tex = (_value_noise(rng, h, w, 4) - 0.5) + 0.5 * (_value_noise(rng, h, w, 2) - 0.5)
    amp = np.full(NUM_CLASSES, 30.0, np.float32)
    amp[[VEGETATION, TERRAIN, BUILDING, WALL]] = 70.0
    amp[SKY] = 15.0
    img = img + (amp[label] * tex)[..., None]
    # Sky gradient and re-lighting from a random direction.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.where((label == SKY)[..., None], img * (0.75 + 0.5 * yy / h)[..., None], img)
    ang = rng.uniform(0, 2 * np.pi)
    light = 1.0 + rng.uniform(0.1, 0.5) * (np.cos(ang) * (xx / w - 0.5)
                                           + np.sin(ang) * (yy / h - 0.5))
    img = img * light[..., None] * rng.uniform(0.6, 1.2)
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** rng.uniform(0.7, 1.5)
    # Slight blur, then sensor noise.
    pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    blur = sum(pad[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0
    k = rng.uniform(0.0, 0.8)
    img = (1 - k) * img + k * blur
    img = img + rng.normal(0, rng.uniform(2, 10), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_scene(index: int, *, seed: int = 0, split: str = "train",
                 size: tuple[int, int] = (128, 256), style: str = "synthetic"):
    """(image uint8 (H, W, 3), label uint8 (H, W)) of scene ``index``; deterministic."""
    label, inst = scene_layout(index, seed=seed, split=split, size=size)
    img = render(label, inst, _rng(seed, split, index, 1 + STYLES.index(style)), style)
    return img, label


class SyntheticSource:
    """Random-access source over ``num`` procedural scenes."""

    stats_file = None
    root = None

    def __init__(self, num: int, *, seed: int = 0, split: str = "train",
                 size: tuple[int, int] = (128, 256), style: str = "synthetic", name=None):
        if style not in STYLES:
            raise ValueError(f"unknown synthetic style {style!r}; expected one of {STYLES}")
        self.num, self.seed, self.split, self.style = int(num), int(seed), split, style
        self.size = tuple(int(s) for s in size)
        self.name = name or ("synthetic" if style == "synthetic" else "synthetic_real")
        self.test_scale = None  # evaluated at the generated size

    def __len__(self):
        return self.num

    def load(self, i: int):
        img, lab = render_scene(int(i), seed=self.seed, split=self.split, size=self.size,
                                style=self.style)
        return img, lab, f"{self.name}_{self.split}_{int(i):06d}"

    def label_key(self, i: int) -> str:
        return str(i)

    def class_stats(self) -> list[dict]:
        """Per-scene class pixel counts (layouts only; cheap) for rare-class sampling."""
        out = []
        for i in range(self.num):
            lab, _ = scene_layout(i, seed=self.seed, split=self.split, size=self.size)
            cnt = np.bincount(lab.ravel(), minlength=256)
            cnt[IGNORE_INDEX] = 0
            out.append({int(c): int(n) for c, n in enumerate(cnt) if n > 0})
        return out


# A five-class grouping of the scenes, written as a generic folder dataset
# (mfuser_jax/data/custom.py): label ids 1..5 and ignore 0 exercise the id -> class table.
# (label id, name, colour, trainIds grouped into it); each group has the Cityscapes colour
# of its first member.
FOLDER_CLASSES = tuple((cid, name, tuple(int(v) for v in PALETTE[members[0]]), members)
                       for cid, name, members in (
    (1, "ground", (ROAD, SIDEWALK, TERRAIN)),
    (2, "building", (BUILDING, WALL, FENCE)),
    (3, "tree", (VEGETATION,)),
    (4, "sky", (SKY,)),
    (5, "vehicle", (CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE)),
))
FOLDER_IGNORE = 0  # poles, signs, lights, people: not in the list


def write_folder_dataset(root: str, *, num_train: int = 64, num_val: int = 8,
                         size: tuple[int, int] = (128, 256), seed: int = 0) -> str:
    """Writes a 5-class folder dataset under ``root`` (train: flat synthetic style, PNG;
    val: the "real" style, JPEG); returns the path of its classes.txt."""
    import os

    lut = np.full(256, FOLDER_IGNORE, np.uint8)
    for cid, _, _, members in FOLDER_CLASSES:
        lut[list(members)] = cid
    path = os.path.join(root, "classes.txt")
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        f.write("# synthetic street scenes grouped into five classes\n"
                f"ignore {FOLDER_IGNORE}\n")
        for cid, name, (r, g, b), _ in FOLDER_CLASSES:
            f.write(f"{cid} {name} #{r:02x}{g:02x}{b:02x}\n")
    for split, num, style, ext in (("train", num_train, "synthetic", ".png"),
                                   ("val", num_val, "real", ".jpg")):
        for d in ("images", "labels"):
            os.makedirs(os.path.join(root, d, split), exist_ok=True)
        for i in range(num):
            img, lab = render_scene(i, seed=seed, split=split, size=size, style=style)
            Image.fromarray(img).save(os.path.join(root, "images", split, f"{i:05d}{ext}"),
                                      quality=95)
            Image.fromarray(lut[lab]).save(os.path.join(root, "labels", split, f"{i:05d}.png"))
    return path
