"""Score DecoyMNIST runs on a larger validation set, for choices the 1,000 val digits cannot make.

The val split holds 1,000 digits, so one seed's accuracy has a sampling error of about ±0.7 points, as large as
the gaps between the best methods. This script draws N further digits from MNIST's *training* part, after the
run's train and val digits in the same permutation (so disjoint from both, and never from the test part), builds
them with the run's construction (a fresh noise and swatch draw), and scores each run on them with the label's
swatch, without a swatch (the selection rule's number, as on val) and, as a diagnostic of what a swatch of the
wrong shade does, with a random-shade swatch as the test split has. Nothing here reads the test split.

    python scripts/decoy_selection_val.py RUN_DIR... [--n 20000] [--mnist DIR]

Prints one line per run and, for runs that share a label (the method and
config, i.e. the run name without its seed and hash), the mean ± std over seeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch


def selection_digits(mnist: Path, c: dict, n: int, random_shade: bool = False):
    """The Decoyed digits perm[n_train + n_val : n_train + n_val + n] of the construction's permutation; with
    random_shade, the same digits and noise with the swatch of a random class, as in the test split."""
    from megl.data.mnist import DecoyOptions, decoy, load_mnist

    X, Y = load_mnist(mnist, "train")
    start = c["n_train"] + c["n_val"]
    if start + n > len(X):
        raise SystemExit(f"--n {n}: only {len(X) - start} training digits are left after train and val")
    perm = np.random.default_rng([c["seed"], 0]).permutation(len(X))  # as megl.data.mnist.decoy_splits draws it
    idx = np.sort(perm[start:start + n])
    opts = DecoyOptions(swatch=c["swatch"], digit_contrast=c["digit_contrast"], noise=c["noise"])
    return decoy(X[idx], Y[idx], random_shade, np.random.default_rng([c["seed"], 99]), opts)


def accuracy(model, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    from megl.decoy_mnist import _tensor

    hits = 0
    with torch.no_grad():
        for s in range(0, len(images), batch):
            logits = model.classifier(_tensor(images[s:s + batch])).logits
            hits += int((logits.argmax(1) == torch.from_numpy(labels[s:s + batch])).sum())
    return hits / len(images)


def label_of(run: Path) -> str:
    """The run's method and config without its seed: the name's prefix plus the keys that differ between runs."""
    cfg = json.loads((run / "config.json").read_text())
    keys = ("annotation", "lambda_visual", "lambda_background", "lambda_text", "visual_l1", "sdtg_grid",
            "cnn_gradcam_layer", "clip_model", "background_mode")
    extra = " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg and cfg["method"] == "megl")
    return f"{cfg['method']} {Path(cfg['data_root']).name} {extra} {cfg.get('method_args') or ''}".strip()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--n", type=int, default=20000, help="selection digits (default 20000)")
    p.add_argument("--mnist", default=None, help="MNIST folder (default: as megl.experiments finds it)")
    args = p.parse_args(argv)
    from megl import decoy_mnist as dm

    torch.set_num_threads(1)
    mnist, cache, groups = dm.mnist_dir(args.mnist), {}, defaultdict(list)
    for run in args.runs:
        c = dm.run_construction(run)
        key = json.dumps({k: c[k] for k in ("n_train", "n_val", "seed", "swatch", "digit_contrast", "noise")},
                         sort_keys=True)
        if key not in cache:
            cache[key] = selection_digits(mnist, c, args.n), selection_digits(mnist, c, args.n, random_shade=True)
        d, shuffled = cache[key]
        model = dm.load_model(run)
        model.eval()
        acc = [accuracy(model, x, d.labels) for x in (d.images, d.clean, shuffled.images)]
        groups[label_of(run)].append(acc)
        print(f"{run.name}: label swatch {100 * acc[0]:.2f}, no swatch {100 * acc[1]:.2f}, random-shade swatch "
              f"{100 * acc[2]:.2f}", flush=True)
    print(f"\n{args.n} selection digits, mean ± std over seeds: no swatch (the rule) | label swatch | random shade")
    for label, rows in groups.items():
        cols = []
        for xs in zip(*rows):
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cols.append(f"{100 * statistics.mean(xs):.2f} ± {100 * sd:.2f}")
        print(f"  {cols[1]} | {cols[0]} | {cols[2]} (n={len(rows)})  {label}")


if __name__ == "__main__":
    sys.exit(main())
