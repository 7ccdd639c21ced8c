"""Does a trained run read the decoy? Diagnostics on one split (default: test) of a synthetic-data run.

    python -m benchmarks.decoy_diagnose runs/a runs/b ... [--split train|val|test]

Per run: test accuracy; the share of predictions equal to the image's decoy class (≈ 1/C when the decoy is
ignored, since test decoys are random); the saliency mass inside the decoy box (over the whole map); the
classifier's accuracy on I ⊙ Â and on I ⊙ (1 − Â) (Â: its own Grad-CAM of the predicted class); and the decoy
cells' evidence for the decoy class, split into the decoy class's own logit contribution ("for", what its
Grad-CAM can show) and the drop of the other classes' logits ("against", invisible to the decoy class's
Grad-CAM after its ReLU); and the share of the squared input gradient of Σ_k log p̂_k (what RRR penalises)
that lies in the decoy box, beside the box's share of the image area; on the annotated images, that squared
gradient summed outside the mask (RRR's reference penalty, `grad_out_sum`) and its share (`grad_out`).
"""
from __future__ import annotations

import argparse
import json

import torch


@torch.no_grad()
def diagnose(run_dir: str, split: str = "test") -> dict:
    from megl import runs
    from megl.data import collate

    run = runs.load_run(run_dir)
    model, ds = run.model, run.splits[split].expanded(False)
    clf = model.classifier
    rec = ds.records
    stats = {k: 0.0 for k in ("acc", "follow", "mass", "acc_in", "acc_out", "for", "against", "grad_mass")}
    annotated = {"grad_out": 0.0, "grad_out_sum": 0.0, "n": 0}
    for start in range(0, len(ds), 100):
        items = [ds[i] for i in range(start, min(start + 100, len(ds)))]
        batch = collate(items)
        img, y = batch["image"], batch["label"]
        decoy = torch.tensor([rec[start + k].meta["decoy_class"] for k in range(len(items))])
        x0, y0, x1, y1 = rec[start].meta["decoy_box"]
        logits, sal = model.explain(img)
        pred = logits.argmax(1)
        s = sal.saliency
        stats["acc"] += float((pred == y).sum())
        stats["follow"] += float((pred == decoy).sum())
        stats["mass"] += float((s[:, y0:y1, x0:x1].sum((1, 2)) / s.sum((1, 2)).clamp_min(1e-8)).sum())
        stats["acc_in"] += float((clf(img * s[:, None]).logits.argmax(1) == y).sum())
        stats["acc_out"] += float((clf(img * (1 - s[:, None])).logits.argmax(1) == y).sum())
        out = clf(img)
        h, w = out.activations.shape[-2:]
        contrib = torch.einsum("ck,bkij->bcij", clf.head.weight, out.activations) / (h * w)
        S = img.shape[-1]
        cy0, cy1 = y0 * h // S, -(-y1 * h // S)
        cx0, cx1 = x0 * w // S, -(-x1 * w // S)
        cells = contrib[:, :, cy0:cy1, cx0:cx1].sum((2, 3))  # (B, C) logit contribution of the decoy cells
        own = cells.gather(1, decoy[:, None])[:, 0]
        others = (cells.sum(1) - own) / (cells.shape[1] - 1)
        stats["for"] += float(own.sum())
        stats["against"] += float(-others.sum())
        with torch.enable_grad():  # RRR's quantity: ∂ Σ_k log p̂_k / ∂x, squared and summed over channels
            x = img.clone().requires_grad_(True)
            g2 = torch.autograd.grad(clf(x).logits.log_softmax(1).sum(), x)[0].pow(2).sum(1)
        total = g2.sum((1, 2)).clamp_min(1e-30)
        stats["grad_mass"] += float((g2[:, y0:y1, x0:x1].sum((1, 2)) / total).sum())
        has = batch["has_mask"]
        outside = (g2 * (1 - batch["mask"])).sum((1, 2))[has]
        annotated["grad_out"] += float((outside / total[has]).sum())
        annotated["grad_out_sum"] += float(outside.sum())
        annotated["n"] += int(has.sum())
    n = len(ds)
    out = {k: v / n for k, v in stats.items()}
    out["chance"] = 1 / len(ds.class_names)
    n_ann = annotated.pop("n")
    out.update({k: (v / n_ann if n_ann else float("nan")) for k, v in annotated.items()})
    x0, y0, x1, y1 = rec[0].meta["decoy_box"]
    out["box_area"] = (x1 - x0) * (y1 - y0) / (ds[0]["image"].shape[-1] * ds[0]["image"].shape[-2])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    args = p.parse_args(argv)
    for r in args.runs:
        print(r, json.dumps({k: round(v, 4) for k, v in diagnose(r, args.split).items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
