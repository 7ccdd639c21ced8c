"""PNG grid of images with their masks overlaid (outside dimmed, outline) and their class names.

    python -m megl.data.preview --out grid.png                      # synthetic default, val split
    python -m megl.data.preview --root DATA --split train --out grid.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .dataset import ExplanationDataset


def preview_grid(ds: ExplanationDataset, out: str | Path, *, n: int = 16, cols: int = 8, scale: int = 2,
                 masked_only: bool = False, start: int = 0) -> Path:
    """Write a grid: per image, the picture (top) and the picture dimmed outside its mask, mask outlined in yellow
    (bottom), captioned
    with the class name and "no mask" where the image has none. Returns the path."""
    from PIL import Image, ImageDraw

    idx = [i for i in range(ds.num_images) if ds.records[i].has_mask or not masked_only][start:start + n]
    if not idx:
        raise ValueError(f"preview_grid: no image to show in {ds!r} (masked_only={masked_only})")
    S = ds.image_size * scale
    cols = min(cols, len(idx))
    rows = (len(idx) + cols - 1) // cols
    cap = 12
    tile_h = 2 * S + cap + 4
    sheet = Image.new("RGB", (cols * (S + 4) + 4, rows * tile_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for t, i in enumerate(idx):
        r = ds.records[i]
        img = (ds.image(i).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        m = ds.mask(i).numpy()
        over = img.astype(np.float32) * (0.25 + 0.75 * m[..., None])  # dim what the mask leaves out
        if r.has_mask:  # outline where the mask crosses 0.5
            b = m > 0.5
            edge = b & ~(np.roll(b, 1, 0) & np.roll(b, -1, 0) & np.roll(b, 1, 1) & np.roll(b, -1, 1))
            over[edge] = (255, 255, 0)
        x = 4 + (t % cols) * (S + 4)
        y = 4 + (t // cols) * tile_h
        sheet.paste(Image.fromarray(img).resize((S, S), Image.NEAREST), (x, y))
        sheet.paste(Image.fromarray(over.clip(0, 255).astype(np.uint8)).resize((S, S), Image.NEAREST), (x, y + S))
        name = ds.class_names[r.label] + ("" if r.has_mask else " (no mask)")
        draw.text((x, y + 2 * S + 1), name[: max(4, S // 6)], fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megl.data.preview", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--root", type=Path, default=None, help="on-disk dataset (default: the synthetic default)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--n", type=int, default=16, help="images to show")
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--scale", type=int, default=2, help="pixel magnification")
    p.add_argument("--image-size", type=int, default=None, help="resize on load (default: 224 real, 64 synthetic)")
    p.add_argument("--masked-only", action="store_true", help="only images that carry a mask")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.root is None:
        from .synthetic import SyntheticConfig, generate_split

        cfg = SyntheticConfig(seed=args.seed, **({"image_size": args.image_size} if args.image_size else {}))
        splits = {args.split: generate_split(cfg, args.split)}  # only the split shown
    else:
        from .loader import load_splits

        splits = load_splits(args.root, image_size=args.image_size or 224, seed=args.seed)
    out = preview_grid(splits[args.split], args.out, n=args.n, cols=args.cols, scale=args.scale,
                       masked_only=args.masked_only)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
