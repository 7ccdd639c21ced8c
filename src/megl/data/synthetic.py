"""Procedural data with the paper's three kinds of supervision, deterministic from a seed, needing no files.

Each image holds one target object whose (shape, colour) pair is the class, grey clutter (thin lines, small dots)
that cannot be mistaken for it, and a decoy: a patch in a fixed image corner whose colour is the class's decoy
colour with probability `decoy_strength` in training (otherwise a uniformly random class's decoy colour) and
always random in validation and test. A classifier that reads the patch instead of the object scores about
`decoy_strength` on training images and chance on test images: explanation guidance has something to fix.
Measured with a 4-block CNN (Adam 2e-3, batch 64, default config), test accuracy after epochs 1..6:
decoy_strength 0.9: .26 .28 .48 .58 .79 .88 (train .77 → 1.00); decoy_strength 0.0: .25 .48 .57 .91 .98 .98.
The decoy is learnt first and slows object learning; objects are kept small (radius 0.10–0.16 of the image)
because larger ones let the network drop the decoy sooner.

Mask = the object's silhouette: on a `mask_fraction` of training images and on every val/test image.
Rationales: one to three per image, from varied templates naming colour, shape, a shape feature and position.

    python -m megl.data.synthetic --out data/synthetic       # write the on-disk format + print statistics
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Union

import numpy as np
import torch

from .dataset import ExplanationDataset, ImageRecord

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")
COLOURS = {  # object colours: saturated, far from the grey background and clutter
    "red": (215, 45, 45), "blue": (45, 85, 225), "green": (40, 170, 60), "yellow": (235, 205, 40),
    "magenta": (205, 60, 205), "cyan": (40, 200, 210), "orange": (240, 135, 30),
}
# first all colours × the first four shapes, then the rest: 8 classes = {red, blue} × 4 shapes
CLASSES = tuple((s, c) for c in COLOURS for s in SHAPES[:4]) + tuple((s, c) for c in COLOURS for s in SHAPES[4:])
FEATURES = {
    "circle": ("a round outline", "no corners", "a smooth curved edge"),
    "square": ("four equal sides", "four right angles", "four straight edges"),
    "triangle": ("three corners", "three straight sides", "a pointed tip"),
    "cross": ("two crossing bars", "four short arms", "a plus-like outline"),
    "diamond": ("four slanted sides", "a pointed top and bottom", "a narrow rhombus outline"),
    "star": ("five points", "five sharp tips", "a spiky outline"),
}
WHERE = (("in the upper left", "at the top", "in the upper right"),
         ("on the left", "in the center", "on the right"),
         ("in the lower left", "at the bottom", "in the lower right"))
TEMPLATES = (
    "the object {where} is {a} {colour} {shape} with {feature}",
    "there is {a} {size} {colour} {shape} {where}",
    "{a} {colour} {shape} sits {where} of the image",
    "the shape {where} has {feature} and is {colour}, so it is {a} {colour} {shape}",
    "it is {a} {colour} {shape} because the {colour} object {where} has {feature}",
    "the {size} {shape} {where} is {colour} and has {feature}",
    "{where} there is {a} {colour} {shape}; it has {feature}",
    "the picture shows {a} {colour} {shape} {where}, a shape with {feature}",
)
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
CUES = ("shape_colour", "colour")


@dataclass
class SyntheticConfig:
    """Sizes and difficulty of the synthetic data. Defaults: a small ResNet18 trains on it in minutes on a CPU."""

    n_train: int = 1200
    n_val: int = 300
    n_test: int = 300
    image_size: int = 64
    num_classes: int = 8
    mask_fraction: float = 0.1      # training images with a mask (val/test: all)
    decoy_strength: float = 0.9     # P(training decoy colour = the class's decoy colour)
    seed: int = 0
    decoy_corner: str = "top_left"
    noise_std: float = 4.0          # per-pixel Gaussian noise (0..255 scale)
    min_object_size: float = 0.10   # object radius range, as a fraction of image_size (small objects keep the
                                    # decoy the easier cue for longer, see the module docstring)
    max_object_size: float = 0.16
    max_rationales: int = 3         # rationales per image: uniform in 1..max_rationales
    class_cue: str = "shape_colour"  # "shape_colour": class = (shape, colour); "colour": class = the object's
                                     # colour, its shape random (a cue a small CNN learns in a few epochs)
    object_contrast: float = 1.0    # object colour blended toward the background: 1 = saturated, 0.5 = faint

    def __post_init__(self):
        problems = []
        if self.n_train < 1 or self.n_val < 0 or self.n_test < 0:
            problems.append(f"sizes must be n_train >= 1, n_val >= 0, n_test >= 0 (got {self.n_train}, "
                            f"{self.n_val}, {self.n_test})")
        if self.image_size < 32:
            problems.append(f"image_size must be >= 32 to draw recognisable shapes (got {self.image_size})")
        if self.class_cue not in CUES:
            problems.append(f"class_cue must be one of {CUES}, got {self.class_cue!r}")
        elif self.class_cue == "colour" and not 2 <= self.num_classes <= len(COLOURS):
            problems.append(f"num_classes must be in [2, {len(COLOURS)}] with class_cue 'colour', got {self.num_classes}")
        if not 0.0 < self.object_contrast <= 1.0:
            problems.append(f"object_contrast must be in (0, 1], got {self.object_contrast}")
        if not 2 <= self.num_classes <= len(CLASSES):
            problems.append(f"num_classes must be in [2, {len(CLASSES)}] ({len(SHAPES)} shapes × {len(COLOURS)} "
                            f"colours), got {self.num_classes}")
        if not 0.0 <= self.mask_fraction <= 1.0:
            problems.append(f"mask_fraction must be in [0, 1], got {self.mask_fraction}")
        if not 0.0 <= self.decoy_strength <= 1.0:
            problems.append(f"decoy_strength must be in [0, 1], got {self.decoy_strength}")
        if not 0.06 <= self.min_object_size <= self.max_object_size <= 0.25:
            problems.append(f"object sizes must satisfy 0.06 <= min_object_size <= max_object_size <= 0.25 "
                            f"(got {self.min_object_size}, {self.max_object_size})")
        if self.decoy_corner not in CORNERS:
            problems.append(f"decoy_corner must be one of {CORNERS}, got {self.decoy_corner!r}")
        if not 1 <= self.max_rationales <= len(TEMPLATES):
            problems.append(f"max_rationales must be in [1, {len(TEMPLATES)}], got {self.max_rationales}")
        if problems:
            raise ValueError("SyntheticConfig: " + "; ".join(problems))


def class_names(num_classes: int, class_cue: str = "shape_colour") -> list[str]:
    if class_cue == "colour":
        return list(COLOURS)[:num_classes]
    return [f"{c} {s}" for s, c in CLASSES[:num_classes]]


def decoy_palette(num_classes: int) -> np.ndarray:
    """(C, 3) uint8: one decoy colour per class, spread around the hue circle (alternating brightness)."""
    import colorsys

    out = []
    for k in range(num_classes):
        v = 0.95 if k % 2 == 0 else 0.62
        r, g, b = colorsys.hsv_to_rgb((k / num_classes + 0.08) % 1.0, 0.75, v)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return np.array(out, dtype=np.uint8)


def decoy_box(cfg: SyntheticConfig) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the decoy patch, flush with its corner (x1, y1 exclusive)."""
    S, d = cfg.image_size, max(4, round(0.16 * cfg.image_size))
    x0 = 0 if cfg.decoy_corner.endswith("left") else S - d
    y0 = 0 if cfg.decoy_corner.startswith("top") else S - d
    return x0, y0, x0 + d, y0 + d


def _shape_polygon(shape: str, cx: float, cy: float, r: float, theta: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape of radius ~r at (cx, cy), rotated by theta; None for the circle (an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        a = r * 0.9
        pts = [(-a, -a), (a, -a), (a, a), (-a, a)]
    elif shape == "triangle":
        R = r * 1.2
        pts = [(R * math.cos(t), R * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x, y + 0.2 * r) for x, y in pts]  # centre the triangle's bounding box
    elif shape == "cross":
        w = 0.34 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w),
               (-w, -w)]
    elif shape == "diamond":
        pts = [(0, -r * 1.1), (r * 0.65, 0), (0, r * 1.1), (-r * 0.65, 0)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r * 1.1 if k % 2 == 0 else r * 0.45
            t = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(t), rad * math.sin(t)))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _rationales(rng: random.Random, shape: str, colour: str, where: str, size: str, k: int) -> list[str]:
    a = "an" if colour[0] in "aeiou" else "a"
    out = []
    for t in rng.sample(range(len(TEMPLATES)), k):
        feature = rng.choice(FEATURES[shape])
        out.append(TEMPLATES[t].format(a=a, colour=colour, shape=shape, where=where, size=size, feature=feature))
    return out


def _render(cfg: SyntheticConfig, rng: random.Random, label: int, decoy_class: int, palette: np.ndarray, grid):
    """One noise-free image: (S,S,3) uint8, silhouette (S,S) bool, rationales, metadata."""
    from PIL import Image, ImageDraw

    S = cfg.image_size
    if cfg.class_cue == "colour":
        shape, colour = SHAPES[rng.randrange(4)], list(COLOURS)[label]
    else:
        shape, colour = CLASSES[label]
    # background: tinted grey with a linear ramp
    level = rng.uniform(95, 150)
    tint = np.array([rng.uniform(-10, 10) for _ in range(3)], dtype=np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    xx, yy = grid
    ramp = 30 * (xx * math.cos(ang) + yy * math.sin(ang))
    bg = np.clip(level + tint + ramp[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)

    def grey():
        g = int(min(max(level + rng.choice((-1, 1)) * rng.uniform(35, 70), 20), 235))
        return (g, g, g)

    for _ in range(rng.randint(2, 5)):  # thin lines
        draw.line([(rng.uniform(0, S), rng.uniform(0, S)), (rng.uniform(0, S), rng.uniform(0, S))], fill=grey(),
                  width=1)
    for _ in range(rng.randint(3, 8)):  # small dots
        x, y = rng.uniform(0, S), rng.uniform(0, S)
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=grey())

    # target object, never overlapping the decoy patch
    r = rng.uniform(cfg.min_object_size, cfg.max_object_size) * S
    ext = 1.25 * r + 2  # half extent of any shape incl. rotation, plus a margin
    dx0, dy0, dx1, dy1 = decoy_box(cfg)
    for _ in range(1000):  # a uniformly drawn 3×3 cell (the named position), then a point inside it
        row, col = divmod(rng.randrange(9), 3)
        xlo, xhi = max(ext, col * S / 3), min(S - ext, (col + 1) * S / 3 - 1e-3)
        ylo, yhi = max(ext, row * S / 3), min(S - ext, (row + 1) * S / 3 - 1e-3)
        if xlo > xhi or ylo > yhi:
            continue
        cx, cy = rng.uniform(xlo, xhi), rng.uniform(ylo, yhi)
        if cx + ext <= dx0 or cx - ext >= dx1 or cy + ext <= dy0 or cy - ext >= dy1:
            break
    else:  # pragma: no cover - impossible for image_size >= 32
        raise RuntimeError("could not place the object away from the decoy")
    theta = math.radians(rng.uniform(-15, 15))
    fill = tuple(min(max(round(level + cfg.object_contrast * (v - level)) + rng.randint(-12, 12), 0), 255)
                 for v in COLOURS[colour])
    sil = Image.new("L", (S, S), 0)
    sdraw = ImageDraw.Draw(sil)
    poly = _shape_polygon(shape, cx, cy, r, theta)
    if poly is None:
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, fill=fill)
        sdraw.ellipse(box, fill=255)
    else:
        draw.polygon(poly, fill=fill)
        sdraw.polygon(poly, fill=255)
    # decoy patch, drawn last (clutter may pass under it)
    dcol = tuple(min(max(int(v) + rng.randint(-6, 6), 0), 255) for v in palette[decoy_class])
    draw.rectangle([dx0, dy0, dx1 - 1, dy1 - 1], fill=dcol)

    row, col = min(int(3 * cy / S), 2), min(int(3 * cx / S), 2)
    where = WHERE[row][col]
    lo, hi = cfg.min_object_size, cfg.max_object_size  # size word by thirds of the radius range
    size = "small" if r < (lo + (hi - lo) / 3) * S else ("large" if r > (lo + 2 * (hi - lo) / 3) * S else "medium-sized")
    texts = _rationales(rng, shape, colour, where, size, rng.randint(1, cfg.max_rationales))
    meta = {"shape": shape, "colour": colour, "where": where, "center": (cx, cy), "radius": r,
            "decoy_class": int(decoy_class), "decoy_box": decoy_box(cfg)}
    return np.asarray(img), np.asarray(sil) > 127, texts, meta


def generate_split(cfg: SyntheticConfig, split: str, *, expand_rationales: bool = False) -> ExplanationDataset:
    """One split ("train", "val" or "test"); deterministic in (cfg, split).

    Sample i's content (label aside, which comes from a balanced permutation) depends only on (seed, split, i).
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"generate_split: split must be one of {tuple(SPLIT_CODES)}, got {split!r}")
    n = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}[split]
    code, C, S = SPLIT_CODES[split], cfg.num_classes, cfg.image_size
    palette = decoy_palette(C)
    lrng = np.random.default_rng([cfg.seed, code, 1_000_003])
    labels = lrng.permutation(np.arange(n) % C)  # balanced classes
    if split == "train":
        with_mask = set(lrng.permutation(n)[:int(round(cfg.mask_fraction * n))].tolist())
    else:
        with_mask = set(range(n))
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / (S - 1) - 0.5
    images = np.empty((n, S, S, 3), dtype=np.uint8)
    records, masks = [], {}
    for i in range(n):
        rng = random.Random(f"megl-synthetic/{cfg.seed}/{split}/{i}")  # str seeds hash the same in every run
        label = int(labels[i])
        follows = split == "train" and rng.random() < cfg.decoy_strength
        decoy_class = label if follows else rng.randrange(C)
        arr, sil, texts, meta = _render(cfg, rng, label, decoy_class, palette, (xx, yy))
        images[i] = arr
        meta["decoy_follows_label"] = decoy_class == label
        meta["silhouette_area"] = int(sil.sum())
        has = i in with_mask
        if has:
            masks[i] = torch.from_numpy(sil.astype(np.float32))
        records.append(ImageRecord(id=f"{split}_{i:05d}", label=label, references=texts, has_mask=has, meta=meta))
    if cfg.noise_std > 0 and n:  # sensor noise, one vectorised draw per split
        nrng = np.random.default_rng([cfg.seed, code, 2_000_003])
        noisy = images.astype(np.float32)
        noisy += cfg.noise_std * nrng.standard_normal(noisy.shape, dtype=np.float32)
        images = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return ExplanationDataset(records, class_names(C, cfg.class_cue), S, images=torch.from_numpy(images).permute(0, 3, 1, 2)
                              .contiguous(), masks=masks, expand_rationales=expand_rationales, split=split)


def make_splits(cfg: SyntheticConfig | None = None, *, expand_train_rationales: bool = True
                ) -> dict[str, ExplanationDataset]:
    """{"train", "val", "test"} -> ExplanationDataset. Training items are (image, rationale) pairs unless
    `expand_train_rationales=False`; val/test have one item per image (rationale = first reference)."""
    cfg = cfg or SyntheticConfig()
    return {s: generate_split(cfg, s, expand_rationales=(s == "train" and expand_train_rationales))
            for s in ("train", "val", "test")}


def write_dataset(splits: Union[SyntheticConfig, Mapping[str, ExplanationDataset]], root: str | Path, *,
                  overwrite: bool = False) -> Path:
    """Export splits (or a SyntheticConfig, generated first) to the on-disk format of docs/data-format.md:

        <root>/exp_annotation.json   {id: {class_id, ans, image_path, visual_exp, exp, split}}
        <root>/images/<id>.png       lossless, so the loader returns the same pixels
        <root>/masks/<id>.npy        uint8 0/1 for binary masks, float32 otherwise
        <root>/classes.json          the class list (so classes without samples keep their id)
    """
    if isinstance(splits, SyntheticConfig):
        splits = make_splits(splits)
    root = Path(root)
    ann_path = root / "exp_annotation.json"
    if ann_path.exists() and not overwrite:
        raise FileExistsError(f"{ann_path} exists: pass overwrite=True (or --overwrite) to replace the dataset")
    if overwrite:
        for sub in ("images", "masks"):
            shutil.rmtree(root / sub, ignore_errors=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    names = None
    ann = {}
    for split, ds in splits.items():
        if names is None:
            names = ds.class_names
        elif ds.class_names != names:
            raise ValueError(f"write_dataset: split {split!r} has a different class list than the others")
        for i, r in enumerate(ds.records):
            if r.id in ann:
                raise ValueError(f"write_dataset: duplicate item id {r.id!r} (split {split!r})")
            fname = f"{r.id}.png"
            img = (ds.image(i) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(img, "RGB").save(root / "images" / fname)
            visual = ""
            if r.has_mask:
                m = ds.mask(i).numpy()
                binary = bool(np.isin(m, (0.0, 1.0)).all())
                np.save(root / "masks" / f"{r.id}.npy", m.astype(np.uint8) if binary else m.astype(np.float32))
                visual = f"masks/{r.id}.npy"
            ann[r.id] = {"class_id": r.label, "ans": ds.class_names[r.label], "image_path": f"images/{fname}",
                         "visual_exp": visual, "exp": list(r.references), "split": split}
    (root / "classes.json").write_text(json.dumps(names, indent=1))
    ann_path.write_text(json.dumps(ann, indent=1))
    return root


def main(argv=None) -> int:
    from .stats import format_statistics, statistics

    p = argparse.ArgumentParser(prog="python -m megl.data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SyntheticConfig()
    for f, v in asdict(defaults).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v, help=f"(default: {v})")
    p.add_argument("--out", type=Path, default=None, help="write the on-disk format here (else: statistics only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    args = p.parse_args(argv)
    cfg = SyntheticConfig(**{f: getattr(args, f) for f in asdict(defaults)})
    splits = make_splits(cfg)
    print(format_statistics(statistics(splits), name="synthetic"))
    if args.out is not None:
        write_dataset(splits, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}/exp_annotation.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
