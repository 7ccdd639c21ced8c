"""A second decoy task, independent of megl.data.synthetic, to check that MEGL's defaults generalise.

    python -m benchmarks.decoy_stripes --out data/decoy-stripes
    python -m megl.train --data-root data/decoy-stripes --method baseline --out runs/stripes-base
    python -m megl.train --data-root data/decoy-stripes --out runs/stripes-megl

Class = the texture inside a disc: horizontal stripes, vertical stripes, a checkerboard or dots. The disc's
colour and the background are random and shared by all classes, so only the texture tells the class apart.
Decoy: a bar along the bottom edge whose colour is the class's colour in `decoy_strength` of the training images
(otherwise a random class's) and always random in val / test. It differs from the synthetic default in the cue
(texture, not shape and colour), the decoy's place and form (a full-width bottom bar, not a corner patch) and its
look (no clutter, textured objects). Mask = the disc, on `mask_fraction` of training images and every val / test
image. The output is the Object-ME layout (megl.data.synthetic.write_dataset), so it goes through --data-root.
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
import torch

from megl.data.dataset import ExplanationDataset, ImageRecord
from megl.data.synthetic import write_dataset

TEXTURES = ("horizontal stripes", "vertical stripes", "a checkerboard", "dots")
BAR_COLOURS = ((230, 60, 60), (60, 200, 70), (60, 90, 230), (235, 210, 50))  # one per class
TEMPLATES = ("the disc is filled with {t}", "it shows {t} inside a round patch", "a round patch with {t} in it",
             "the texture of the disc is {t}")


def _texture(kind: int, xx: np.ndarray, yy: np.ndarray, period: float, phase: float) -> np.ndarray:
    u = 2 * math.pi / period
    if kind == 0:
        return np.sin(u * yy + phase) > 0
    if kind == 1:
        return np.sin(u * xx + phase) > 0
    if kind == 2:
        return (np.sin(u * xx + phase) > 0) ^ (np.sin(u * yy + phase) > 0)
    return (np.sin(u * xx + phase) > 0.5) & (np.sin(u * yy + phase) > 0.5)


def make_split(split: str, n: int, size: int, decoy_strength: float, mask_fraction: float, seed: int
               ) -> ExplanationDataset:
    rng = random.Random(f"decoy-stripes/{seed}/{split}")
    C, bar = len(TEXTURES), max(4, size // 10)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = [i % C for i in range(n)]
    rng.shuffle(labels)
    masked = set(rng.sample(range(n), round(mask_fraction * n))) if split == "train" else set(range(n))
    records, masks = [], {}
    for i, label in enumerate(labels):
        bg = np.full((size, size, 3), rng.uniform(90, 160), np.float32) + rng.uniform(-20, 20) * (xx / size)[..., None]
        r = rng.uniform(0.17, 0.24) * size
        cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - bar - r - 2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        ink = np.array([rng.uniform(20, 235) for _ in range(3)], np.float32)
        paper = 255 - ink
        tex = _texture(label, xx - cx, yy - cy, rng.uniform(4.0, 6.0), rng.uniform(0, 2 * math.pi))
        img = bg.copy()
        img[disc] = np.where(tex[disc][:, None], ink, paper)
        follows = split == "train" and rng.random() < decoy_strength
        img[size - bar:] = BAR_COLOURS[label if follows else rng.randrange(C)]
        img += np.random.default_rng([seed, len(split), i]).normal(0, 5, img.shape)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        if i in masked:
            masks[i] = torch.from_numpy(disc.astype(np.float32))
        refs = [t.format(t=TEXTURES[label]) for t in rng.sample(TEMPLATES, 2)]
        records.append(ImageRecord(id=f"{split}_{i:05d}", label=label, references=refs, has_mask=i in masked,
                                   meta={}))
    return ExplanationDataset(records, [t.replace("a ", "") for t in TEXTURES], size,
                              images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), masks=masks,
                              split=split)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=32, help="pixels (default: the Config default image_size)")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-eval", type=int, default=300, help="images in val and in test")
    p.add_argument("--decoy-strength", type=float, default=0.95)
    p.add_argument("--mask-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = {s: make_split(s, n, a.size, a.decoy_strength, a.mask_fraction, a.seed)
              for s, n in (("train", a.n_train), ("val", a.n_eval), ("test", a.n_eval))}
    write_dataset(splits, a.out, overwrite=True)
    print(f"wrote {a.out}: {a.n_train} / {a.n_eval} / {a.n_eval} images, {len(TEXTURES)} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
