"""Measure how hard a DecoyMNIST construction is for a plain CNN (megl.models.small's CDEP net): train on the decoyed
digits, or on the same digits without the swatch (`"clean": true`, the ceiling a guided model can reach), and print
val / test accuracy with and without the swatch. Used to pick the `hard` variant (docs/decoy_mnist.md).
`"composites": L` adds MEGL's background term (`swap`, weight L) on the training digits' masks, to measure what
training on composites costs a net in reading the digits; `--val-only` prints no test accuracy.

    OMP_NUM_THREADS=1 python scripts/decoy_variants.py '[{"swatch": 8, "digit_contrast": 0.6, "noise": 0.2}]' \\
        --mnist data/MNIST/raw
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from megl.data.mnist import DecoyOptions, decoy_splits
from megl.losses.megl import background_loss
from megl.models.small import SmallCNNClassifier


def run(opts, mnist, epochs=3, n=10000, clean=False, seed=0, composites=0.0):
    parts = decoy_splits(mnist, n, 1000, 2000, 0, opts)
    t = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)[:, None].expand(-1, 3, -1, -1)  # noqa: E731
    train = parts["train"][1]
    x, y = t(train.clean if clean else train.images), torch.from_numpy(train.labels)
    mask = torch.from_numpy(train.digit_mask)
    torch.manual_seed(seed)
    model = SmallCNNClassifier(10, 28)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for j in torch.randperm(n, generator=g).split(64):
            loss = F.cross_entropy(model(x[j]).logits, y[j])
            if composites:
                loss = loss + composites * background_loss(model, x[j], mask[j], label=y[j], mode="swap")
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = lambda a, lab: float((model(t(a)).logits.argmax(1).numpy() == lab).mean())  # noqa: E731
        v, te = parts["val"][1], parts["test"][1]
        return {"val": acc(v.images, v.labels), "val_clean": acc(v.clean, v.labels),
                "test": acc(te.images, te.labels), "test_clean": acc(te.clean, te.labels)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", help="JSON list of DecoyOptions fields, plus optional epochs / n / clean")
    ap.add_argument("--mnist", default=os.environ.get("MEGL_MNIST", "data/MNIST/raw"))
    ap.add_argument("--val-only", action="store_true", help="print no test accuracy (when choosing anything)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for v in json.loads(args.variants):
        kw = {k: v.pop(k) for k in ("epochs", "n", "clean", "seed", "composites") if k in v}
        t0 = time.time()
        res = run(DecoyOptions(**v), args.mnist, **kw)
        if args.val_only:
            res = {k: r for k, r in res.items() if k.startswith("val")}
        print(json.dumps({**v, **kw, **res, "seconds": round(time.time() - t0)}), flush=True)
