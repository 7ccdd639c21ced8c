"""Does a MEGL DecoyMNIST run treat the background term's composites differently from real digits?

    python scripts/decoy_composites.py RUN_DIR [RUN_DIR ...] [--mnist DIR]

On the validation digits of each run's DecoyMNIST data (rebuilt from its decoy.json), pairs k, k+1 with
different labels. For real digits given the partner's swatch (the same digit, the swatch of a digit of another
class), and for the composites of both swap modes (`megl.losses.megl.swap_composite`: the partner's digit on
this image's background, which keeps this image's swatch), it prints the mean probability of the swatch's class
and how often it is predicted, and the accuracy. A net that follows the swatch on real digits but not on
composites has learnt to tell the composites apart, and the background term no longer reaches real digits.
Each case is also shown without any swatch, the baseline the swatch's effect is read against.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32) / 255.0)[:, None].expand(-1, 3, -1, -1).contiguous()


@torch.no_grad()
def measure(run_dir: Path, mnist: Path) -> dict:
    from megl import decoy_mnist as dm
    from megl.losses.megl import swap_composite

    parts = dm.splits_of(mnist, dm.run_construction(run_dir))
    d = parts["val"][1]
    model = dm.load_model(run_dir)
    n = len(d.labels) - len(d.labels) % 2
    # hosts h = 0, 2, 4, ...; partners p = h + 1: keep the pairs whose labels differ
    h = np.arange(0, n, 2)
    p = h + 1
    keep = d.labels[h] != d.labels[p]
    h, p = h[keep], p[keep]
    swatch = d.images != d.clean  # where each image's swatch changed a pixel
    # real digit p with h's swatch: the swatch names h's class, the digit p's
    real_wrong = np.where(swatch[h], d.images[h], d.clean[p])
    cases = {"real digit, own swatch": (d.images[p], d.labels[p]),
             "real digit, the other class's swatch": (real_wrong, d.labels[h]),
             "real digit, no swatch": (d.clean[p], None)}
    mask = torch.from_numpy(d.digit_mask)
    for mode in ("swap", "transplant"):
        for name, imgs in (("host's swatch", d.images), ("no swatch", d.clean)):
            x = _tensor(np.stack([imgs[h], imgs[p]], 1).reshape(-1, *imgs.shape[1:]))
            m = torch.stack([mask[h], mask[p]], 1).reshape(-1, *mask.shape[1:])
            pair = torch.arange(0, x.shape[0], 2)  # composite: the partner's digit on the host's background
            comp, _ = swap_composite(x, m, torch.stack([pair, pair + 1], 1).reshape(-1), mode)
            comp = comp[0::2]
            cases[f"{mode} composite, {name}"] = (comp, d.labels[h] if name == "host's swatch" else None)
    out = {}
    for name, (imgs, decoy) in cases.items():
        x = imgs if torch.is_tensor(imgs) else _tensor(imgs)
        prob = torch.cat([model.classifier(x[s:s + 500]).logits.softmax(1) for s in range(0, len(x), 500)])
        pred = prob.argmax(1).numpy()
        row = {"accuracy": float((pred == d.labels[p]).mean())}
        if decoy is not None:
            row["p(swatch class)"] = float(prob[torch.arange(len(x)), torch.from_numpy(decoy).long()].mean())
            row["predicts swatch class"] = float((pred == decoy).mean())
        out[name] = row
    return {"pairs": int(len(h)), **out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--mnist", default=None, help="MNIST's raw IDX folder (default: as megl.experiments finds it)")
    args = ap.parse_args(argv)
    from megl import decoy_mnist as dm

    mnist = dm.mnist_dir(args.mnist)
    for r in args.runs:
        res = measure(r, mnist)
        print(f"{r} ({res.pop('pairs')} val pairs with different labels)")
        for name, row in res.items():
            print(f"  {name:45s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
