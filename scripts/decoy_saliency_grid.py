"""Where do DecoyMNIST runs look? One picture: validation digits (with their swatch) and each run's saliency.

    python scripts/decoy_saliency_grid.py NAME=RUN_DIR [NAME=RUN_DIR ...] --out grid.png [--n 8] [--mnist DIR]

Row 0 shows the first --n validation digits of the runs' data (one per class while they last), with their
label-shaded swatch; each further row is one run's saliency of its predicted class on those digits (Grad-CAM;
the input gradient for the mlp, as in the experiment's mIoU column), drawn over the digit, with a red frame where
the prediction is wrong. The runs must share one construction (decoy.json); validation only, never test.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

PAD, SCALE, LABEL_W = 2, 4, 150


def _rows(runs: list[tuple[str, Path]], mnist: Path, n: int) -> tuple[list[str], list[list[np.ndarray]], list]:
    from megl import decoy_mnist as dm
    from megl.overlays import saliency_overlay, to_hwc

    constructions = {name: dm.run_construction(d) for name, d in runs}
    keys = ("n_train", "n_val", "n_test", "seed", "swatch", "digit_contrast", "noise")
    first = constructions[runs[0][0]]
    if any({k: c[k] for k in keys} != {k: first[k] for k in keys} for c in constructions.values()):
        raise SystemExit("decoy_saliency_grid: the runs were trained on different DecoyMNIST constructions")
    d = dm.splits_of(mnist, first)["val"][1]
    pick: list[int] = []
    for i, y in enumerate(d.labels):  # one digit per class first, then in order
        if len(pick) < n and int(y) not in {int(d.labels[j]) for j in pick}:
            pick.append(i)
    pick += [i for i in range(len(d.labels)) if i not in pick][:n - len(pick)]
    x = dm._tensor(d.images[pick])
    names, rows, wrong = ["digit + swatch"], [[to_hwc(im) for im in x]], [[False] * len(pick)]
    for name, run_dir in runs:
        torch.manual_seed(0)
        logits, sal = dm.saliency(dm.load_model(run_dir), x)
        names.append(name)
        rows.append([saliency_overlay(im, s) for im, s in zip(x, sal)])
        wrong.append((logits.argmax(1).numpy() != d.labels[pick]).tolist())
    return names, rows, wrong


def draw(names: list[str], rows: list[list[np.ndarray]], wrong: list, out: Path) -> None:
    from PIL import Image, ImageDraw

    h, w = rows[0][0].shape[:2]
    cell_h, cell_w = h * SCALE + 2 * PAD, w * SCALE + 2 * PAD
    canvas = Image.new("RGB", (LABEL_W + cell_w * len(rows[0]), cell_h * len(rows)), "white")
    pen = ImageDraw.Draw(canvas)
    for r, (name, row) in enumerate(zip(names, rows)):
        pen.text((4, r * cell_h + cell_h // 2 - 6), name, fill="black")
        for k, arr in enumerate(row):
            im = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).resize(
                (w * SCALE, h * SCALE), Image.NEAREST)
            x0, y0 = LABEL_W + k * cell_w, r * cell_h
            if wrong[r][k]:
                pen.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], fill="red")
            canvas.paste(im, (x0 + PAD, y0 + PAD))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)


def main(argv=None) -> int:
    from megl.decoy_mnist import mnist_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--n", type=int, default=8, help="validation digits (default 8)")
    ap.add_argument("--mnist", help="MNIST IDX folder (default: $MEGL_MNIST, as the experiment)")
    args = ap.parse_args(argv)
    runs = []
    for spec in args.runs:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path, "config.json").is_file():
            raise SystemExit(f"decoy_saliency_grid: {spec!r} is not NAME=RUN_DIR with a finished run in RUN_DIR")
        runs.append((name, Path(path)))
    if args.n < 1:
        raise SystemExit(f"decoy_saliency_grid: --n must be at least 1, got {args.n}")
    draw(*_rows(runs, mnist_dir(args.mnist), args.n), Path(args.out))
    print(f"written: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
