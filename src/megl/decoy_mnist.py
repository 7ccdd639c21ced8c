"""`python -m megl.experiments decoy-mnist`: every method on DecoyMNIST (Ross et al. 2017), beside published figures.

    python -m megl.experiments decoy-mnist --backbone mlp --seeds 0,1,2            # the published setting
    python -m megl.experiments decoy-mnist --backbone cnn --seeds 0,1,2            # the harder variant (HARD)
    python -m megl.experiments decoy-mnist --backbone cnn --variant paper          # the unmodified construction
    python -m megl.experiments decoy-mnist --backbone cnn --mask-fraction 0.1      # 10 % of the masks
    python -m megl.experiments decoy-mnist --backbone cnn --methods rrr --sweep method_args.rrr_lambda=1,10,100

The data are converted once per construction into OUT/data/ (megl.data.convert decoy-mnist): one copy with the
`corners` annotation, which RRR and CDEP penalise (their loss uses 1 − mask: the corners), one with the `digit`
annotation, which GRADIA, HAICS, RES and MEGL reward; same images, same splits (ANNOTATION: which copy a method
reads where it is not its family's, e.g. MEGL on the cnn reads `corners` as "everything but the corners"). Every
method trains through megl.train on identical data, seeds and epochs (runs reused as in megl.experiments). Then each
run is scored on the train, val and test digits with the swatch and on the same val / test digits without it (on
the conv nets also on all of MNIST's test digits and on 20k held-out training digits: SCORING), and its saliency
(Grad-CAM; the input gradient for the mlp, which has no spatial layer) is compared with the digit masks (mIoU) and
with the four corners (the share of saliency that sits where a swatch may be).

Hyper-parameters (λ per method) come from HPARAMS, chosen with --sweep on the validation split: the rule is the
highest accuracy on the *swatch-free* validation digits — the counterfactual the annotation defines (remove what
it marks irrelevant) — since the plain validation split carries the same decoy as training and rewards it. On the
conv nets, where 1k val digits cannot separate the best settings, the held-out digits (built like val) decide.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megl.config import GRADCAM_METHODS, RANDOM_STANDINS, Config, apply_overrides, parse_value
from megl.tables import markdown_table

METHODS = ("baseline", "rrr", "cdep", "gradia", "haics", "res-g", "res-l", "megl")
PENALISE_IRRELEVANT = ("rrr", "cdep")  # their loss uses 1 − mask, so they need the corners annotation
ANNOTATIONS = ("corners", "digit")  # the converter's --mask
NAMES = {"baseline": "plain (CE)", "rrr": "RRR", "cdep": "CDEP", "gradia": "GRADIA", "haics": "HAICS",
         "res-g": "RES-G", "res-l": "RES-L", "megl": "MEGL"}
ABLATIONS = ("paper", "visual+text", "text", "visual")  # megl/<ablation> rows (megl.train.ABLATIONS)

# Constructions (converter options). paper: Ross et al.'s. hard: the digit made the harder cue for a CNN
# (lower contrast, pixel noise, a larger swatch), chosen by measuring a plain CNN (docs/decoy_mnist.md).
VARIANTS: dict[str, dict] = {
    "paper": {"swatch": 4, "digit_contrast": 1.0, "noise": 0.0},
    "hard": {"swatch": 8, "digit_contrast": 0.6, "noise": 0.2},
}
# subsamples of MNIST that fit the CPU budget: the mlp at the calibration's 10k training digits, the conv nets at 5k
SIZES = {"mlp": {"n_train": 10000, "n_val": 1000, "n_test": 2000},
         "cnn": {"n_train": 5000, "n_val": 1000, "n_test": 2000}}
SIZES["resnet18"] = SIZES["cnn"]
# Digits the conv nets' tables are scored on, beyond the converted dataset (the runs train on the same data): all of
# MNIST's test digits, and 20k further training digits built like val ("held-out"), on which hyper-parameters are
# chosen. On the hard cnn the best methods are half a point apart, and 1k val or 2k test digits carry a sampling
# error of ±0.4-0.7 points per seed (docs/decoy_mnist.md). The mlp's tables keep the dataset's own splits.
SCORING = {"cnn": {"n_test": 10000, "n_held_out": 20000}}
SCORING["resnet18"] = SCORING["cnn"]
# Shared training settings. The optimiser is the published one (RRR's and CDEP's code: Adam 1e-3 at a constant rate,
# no clipping), not megl's default recipe, so that the plain and RRR rows can be checked against the published
# figures. MEGL's text term uses the random tiny CLIP / LLM, with which its rows were measured (the term's share of
# the classifier's gradient is 0.00 there: docs/decoy_mnist.md); `--set clip_model=tiny --set llm=tiny` pretrains them.
TRAIN: dict[str, Any] = {"image_size": 28, "batch_size": 64, "eval_batch_size": 500, "lr": 1e-3,
                         "lr_schedule": "constant", "grad_clip": 0.0, **RANDOM_STANDINS,
                         "num_overlays": 0, "checkpoint_every": 10 ** 6, "clip_image_size": 32,
                         "tiny_clip_patch": 8, "max_new_tokens": 24}
# cnn: the smallest budget at which a plain CNN trained on the hard digits *without* swatches comes within 0.5 points
# of its best validation accuracy over 1-10 epochs (94.1 / 95.0 / 95.9 / 96.1 % at 3 / 5 / 8 / 10; method-free, val
# only: scripts/decoy_variants.py, docs/decoy_mnist.md). At 3 epochs every guided method was still under-fitting.
EPOCHS = {"mlp": 8, "cnn": 8, "resnet18": 3}
# Config overrides per (backbone, method), chosen on val with --sweep by the rule above (docs/decoy_mnist.md has
# the sweep tables); unlisted methods keep the package defaults (megl/losses/<method>.py).
HPARAMS: dict[tuple[str, str], dict] = {
    # RRR with the paper's score, with which λ was chosen (the package default is megl's share score)
    ("mlp", "rrr"): {"method_args": {"rrr_score": "reference", "rrr_lambda": 100.0}},  # 10 93.1, 100 93.5, 1000 91.8
    # CDEP with the group ReLU rule and the centred score (megl's CDEP; the reference rule and share score peak at
    # 79.4 on the mlp), λ and the mlp's input range on val without the swatch, 3 seeds: unit λ 0.1 89.7, 0.3 93.5,
    # 1 92.8, 3 87.2; signed 0.1 92.5, 0.3 92.2, 1 91.5, 3 89.3 (docs/decoy_mnist.md)
    ("mlp", "cdep"): {"method_args": {"cdep_relu": "group", "cdep_score": "centred_l1", "cdep_lambda": 0.3}},
    # cnn RRR λ: 1 86.0, 10 83.1, 100 78.4, 1000 79.3
    ("cnn", "rrr"): {"method_args": {"rrr_score": "reference", "rrr_lambda": 1}},
    # cnn CDEP (group rule, centred score), 3 seeds: λ 0.1 93.8, 0.3 95.7, 1 95.8 (seed 0: 3 95.2)
    ("cnn", "cdep"): {"method_args": {"cdep_relu": "group", "cdep_score": "centred_l1", "cdep_lambda": 1.0}},
    # paper objective: conv2/1 63.5, conv1/1 65.8, conv1/10 72.2; then at conv1/10 lambda_background 0.3 88.8,
    # 1 92.2, 3 91.5; at lambda_background 1, lambda_visual 1 91.0, 3 91.1 (all at 3 epochs). Again at 8 epochs
    # (the budget since), lambda_background 1: lambda_visual 10 94.4, 1 94.9 (3 seeds); seed 0: 10 95.2, 3 95.4,
    # 1 95.6, and lambda_background 3 (lambda_visual 10) 95.1. At lambda_visual 1, 3 seeds: lambda_visual 0.3 94.7;
    # lambda_background 3 95.1, 1 94.9 (without the text term, which leaves these unchanged: 0.3 94.3, 3 95.0,
    # 10 95.0, 30 95.1, 100 94.9); background_mode transplant 94.3. With the text term, 30 95.2: a tie with 3 at
    # full annotation, but at mask fraction 0.1 (val, no swatch) 30 falls to 89.4 against 3's 92.8, so 3 stays.
    # The tap again at 8 epochs with the background term (3 seeds): conv2 95.2 ± 0.5, a tie with conv1's 95.1 ± 0.2
    # SDTG's slot on CLIP's 4×4 grid rather than 576 copies of it at conv1's 24×24 (3 seeds, corners, one machine):
    # coarser 95.4 ± 0.5, classifier 95.5 ± 0.5, a tie; taken for half the run time (163-193 s a run, not 330-370)
    # The L1 on the corners mask asks Grad-CAM to fill everything but the corners; visual_l1=outside only keeps it off
    # them. 1k val digits tie (95.5 ± 0.1 against 95.4 ± 0.5); on the 20k held-out digits (SCORING) outside 96.00 ±
    # 0.31 against 95.58 ± 0.33, ahead in each of the 3 seeds. lambda_background again with it (held-out): 1 95.82,
    # 3 96.00, 10 95.93, 30 95.97
    ("cnn", "megl"): {"cnn_gradcam_layer": "conv1", "lambda_visual": 1, "lambda_background": 3.0,
                      "sdtg_grid": "coarser", "visual_l1": "outside"},
    # GRADIA, HAICS, RES: their papers' λ = 1, with which docs/decoy_mnist.md's rows were measured (not swept
    # here; the package defaults were chosen on megl.train's default data, docs/recipe.md §3)
    **{(bb, m): {"method_args": {k: 1.0}} for bb in ("cnn", "resnet18")
       for m, k in (("gradia", "gradia_lambda"), ("haics", "haics_lambda"), ("res-g", "res_lambda"),
                    ("res-l", "res_lambda"))},
}
# The annotation a method trains on, where it is not its family's: RRR and CDEP penalise 1 − mask and get `corners`;
# the methods that reward the mask get `digit` (the strokes) unless listed here, chosen on val with
# --sweep annotation=digit,corners. `corners` also reads as a "look here" mask: everything but the corners.
ANNOTATION: dict[tuple[str, str], str] = {
    # MEGL at lambda_background 3, val without the swatch, 3 seeds: digit 95.1 ± 0.2, corners 95.3 ± 0.6 (at
    # lambda_background 10 / 30: 95.4 ± 0.9 / 95.5 ± 0.5, but 30 falls to 90.6 at mask fraction 0.1, where corners
    # at 3 scores 92.6 ± 1.7 and digit 92.8 ± 0.8). On corners the swap composites are real digits with another
    # image's corners, with no painted silhouette. On corners, lambda_visual 0.3 scores 95.4 ± 0.3: 0.1 above 1,
    # one val digit in a thousand, so 1 stays (as the tap did at a 0.1 difference).
    ("cnn", "megl"): "corners",
}


def annotation(backbone: str, method: str) -> str:
    return ANNOTATION.get((backbone, method), "corners" if method in PENALISE_IRRELEVANT else "digit")


# Published DecoyMNIST test accuracies (%), with where they are stated.
PUBLISHED = {
    ("mlp", "baseline"): (63.7, "R4 (Ghitu, Piratla & Wicker, TMLR 2025), MLP"),
    ("mlp", "rrr"): (92.3, "R4 (Ghitu, Piratla & Wicker, TMLR 2025), MLP"),
}
KEYS = ("test", "train", "val", "val_clean", "test_clean", "miou", "corner_share", "epoch_seconds", "held_out",
        "held_out_clean", "held_out_shuffled")


# ----------------------------------------------------------------------------- data
DEFAULT_MNIST_DIRS = (Path("data/MNIST/raw"), Path("data/mnist"), Path.home() / ".cache" / "megl" / "mnist")


def mnist_dir(arg: Optional[str]) -> Path:
    """--mnist, else $MEGL_MNIST, else the first of DEFAULT_MNIST_DIRS (where torchvision's MNIST download and
    megl's cache would put it) that exists."""
    from megl.data.mnist import ENV

    given = arg or os.environ.get(ENV)
    if given:
        if not Path(given).is_dir():
            raise SystemExit(f"megl.experiments: MNIST folder {given} does not exist; pass --mnist DIR (or set "
                             f"{ENV}) to a folder holding MNIST's four IDX files")
        return Path(given)
    for candidate in DEFAULT_MNIST_DIRS:
        if candidate.is_dir():
            return candidate
    raise SystemExit(f"megl.experiments: no MNIST copy found: pass --mnist DIR (or set {ENV}=DIR) to a folder with "
                     "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
                     "t10k-labels-idx1-ubyte.gz (torchvision's MNIST/raw/ works too)")


def splits_of(mnist: Path, c: dict, n_held_out: int = 0) -> dict:
    """The DecoyMNIST splits of construction `c` (`construction(args)`, or a converted dataset's decoy.json)."""
    from megl.data.mnist import DecoyOptions, decoy_splits

    return decoy_splits(mnist, c["n_train"], c["n_val"], c["n_test"], c["seed"],
                        DecoyOptions(swatch=c["swatch"], digit_contrast=c["digit_contrast"], noise=c["noise"]),
                        n_held_out=n_held_out)


def scoring_splits(mnist: Path, c: dict, backbone: str) -> dict:
    """The splits a table scores: `splits_of`, with test and held-out digits as SCORING asks for the backbone (as
    many as MNIST has)."""
    from megl.data.mnist import load_mnist

    want = SCORING.get(backbone)
    if not want:
        return splits_of(mnist, c)
    n_train_part, n_test_part = len(load_mnist(mnist, "train")[1]), len(load_mnist(mnist, "test")[1])
    n_test = max(c["n_test"], min(want["n_test"], n_test_part))
    held = max(0, min(want["n_held_out"], n_train_part - c["n_train"] - c["n_val"]))
    return splits_of(mnist, dict(c, n_test=n_test), held)


def scored_sizes(parts: dict) -> dict:
    """How many digits each scored split holds: a cached score is reused only for the same sizes."""
    return {k: len(v[0]) for k, v in parts.items()}


def run_construction(run_dir) -> dict:
    """The construction a run trained on: its dataset's decoy.json."""
    from megl import runs

    return json.loads((Path(runs.load_config(run_dir).data_root) / "decoy.json").read_text())


def construction(args) -> dict:
    c = dict(VARIANTS[args.variant], **SIZES[args.backbone], seed=args.data_seed)
    for k in ("n_train", "n_val", "n_test", "swatch", "digit_contrast", "noise"):
        if getattr(args, k) is not None:
            c[k] = getattr(args, k)
    return c


def ensure_data(out: Path, mnist: Path, c: dict, mask: str, fraction: float) -> Path:
    """The converted dataset for this construction and annotation (converted once, then reused)."""
    from megl.data.convert import main as convert

    want = dict(c, mask=mask, mask_fraction=fraction)
    tag = hashlib.sha1(json.dumps(want, sort_keys=True).encode()).hexdigest()[:8]
    root = out / "data" / f"{mask}-f{fraction:g}-{tag}"
    done = root / "decoy.json"
    if done.exists() and json.loads(done.read_text()) == want:
        return root
    argv = ["decoy-mnist", "--mnist", str(mnist), "--out", str(root), "--mask", mask, "--mask-fraction",
            str(fraction), "--overwrite"] + [f"--{k.replace('_', '-')}={v}" for k, v in c.items()]
    convert(argv)
    return root


# ----------------------------------------------------------------------------- scoring a run
def load_model(run_dir: Path):
    from megl import runs
    from megl.data.mnist import DIGITS

    return runs.load_model(run_dir, DIGITS)  # the class names without rebuilding the run's data


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0)[:, None].expand(-1, 3, -1, -1)


def saliency(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, (B, H, W) saliency of the predicted class in [0, 1]): Grad-CAM, or for a backbone without a
    spatial layer (mlp) the input gradient's magnitude |∂ log p̂_pred / ∂x|, min-max normalised per image."""
    clf = model.classifier
    if clf.has_gradcam:
        logits, sal = model.explain(x)
        return logits, sal.saliency
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = clf(x).logits
        logp = torch.log_softmax(logits, 1).gather(1, logits.argmax(1, keepdim=True)).sum()
        (g,) = torch.autograd.grad(logp, x)
    s = g.abs().sum(1)
    lo, hi = s.amin((1, 2), keepdim=True), s.amax((1, 2), keepdim=True)
    return logits.detach(), (s - lo) / (hi - lo + 1e-12)


def score(model, parts: dict, swatch: int, batch: int = 500) -> dict:
    """Accuracies with and without the swatch, mIoU against the digit masks and the corners' saliency share on
    test (the model's own predicted class, threshold 0.5 as in megl.train.evaluate)."""
    from megl.data.mnist import corners_mask
    from megl.metrics import iou

    out = {}
    corners = 1.0 - torch.from_numpy(corners_mask(swatch))
    held = (("held_out", False), ("held_out", True), ("held_out_shuffled", False)) if "held_out" in parts else ()
    for split, clean in (("train", False), ("val", False), ("val", True), ("test", False), ("test", True), *held):
        d = parts[split][1]
        images = d.clean if clean else d.images
        hits, ious, share = 0, [], []
        for s in range(0, len(images), batch):
            x = _tensor(images[s:s + batch])
            y = torch.from_numpy(d.labels[s:s + batch])
            if split == "test" and not clean:
                logits, sal = saliency(model, x)
                ious.append(iou(sal.float(), torch.from_numpy(d.digit_mask[s:s + batch])))
                share.append((sal * corners).sum((1, 2)) / sal.sum((1, 2)).clamp_min(1e-12))
            else:
                with torch.no_grad():
                    logits = model.classifier(x).logits
            hits += int((logits.argmax(1) == y).sum())
        out[split + ("_clean" if clean else "")] = hits / len(images)
        if ious:
            out["miou"] = float(torch.cat(ious).mean())
            out["corner_share"] = float(torch.cat(share).mean())
    return out


# ----------------------------------------------------------------------------- runs
def run_method(base: dict, out: Path, backbone: str, method: str, seed: int, parts: dict, swatch: int,
               train: bool = True, blind: bool = False) -> Optional[dict]:
    """Train (or reuse) one run and score it; the scores are cached in the run directory. train=False: only a
    finished run is scored (None otherwise). blind: print no test accuracy while training (sweeps)."""
    from megl import experiments as ex
    from megl import runs

    name, _, ablation = method.partition("/")
    if not train:
        config = ex.run_config(base, backbone, name, seed, ablation or None)
        if not ex._finished(out / "runs" / ex.run_name(config, ablation or None), config):
            return None
    payload = ex.run_one(base, out, backbone, name, seed, ablation or None, text=False, blind=blind)
    run_dir = Path(payload["run_dir"])
    cache = run_dir / "decoy_eval.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("scored") == scored_sizes(parts):
            return cached
    metrics = runs.read_metrics(run_dir)
    torch.manual_seed(0)
    result = score(load_model(run_dir), parts, swatch)
    result["epoch_seconds"] = float(np.mean([m.get("train_seconds", math.nan) for m in metrics]))
    result["run_dir"] = str(run_dir)
    result["scored"] = scored_sizes(parts)
    cache.write_text(json.dumps(result, indent=1))
    return result


def aggregate(rows: Sequence[dict], key: str) -> tuple[Optional[float], Optional[float]]:
    vals = [r.get(key) for r in rows]
    if not vals or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
        return None, None
    m = float(np.mean(vals))
    return m, (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def _pct(ms, digits: int = 1) -> str:
    m, sd = ms
    if m is None:
        return "n/a"
    return f"{100 * m:.{digits}f}" + ("" if sd is None else f" ± {100 * sd:.{digits}f}")


COLUMNS = ("Method", "Test acc. (%)", "Train acc.", "Val acc.", "Val acc., no swatch", "Held-out acc., no swatch",
           "Test acc., no swatch", "mIoU (digit)", "Saliency in corners", "s / epoch vs plain", "Published test acc.")
VAL_ONLY = ("Method", "Train acc.", "Val acc.", "Val acc., no swatch", "Held-out acc., no swatch",
            "s / epoch vs plain")  # sweeps: no test


def table_markdown(results: dict, backbone: str, base_seconds: Optional[float], title: str,
                   columns: Sequence[str] = COLUMNS) -> str:
    keep = [COLUMNS.index(c) for c in columns]
    body = []
    for method, rows in results.items():
        if not rows:
            continue
        sec = aggregate(rows, "epoch_seconds")[0]
        rel = f"{sec / base_seconds:.2f}×" if sec and base_seconds else "n/a"
        pub = PUBLISHED.get((backbone, method))
        miou = aggregate(rows, "miou")
        cells = [
            NAMES.get(method, method.replace("megl/", "MEGL ")), _pct(aggregate(rows, "test")),
            _pct(aggregate(rows, "train")), _pct(aggregate(rows, "val")), _pct(aggregate(rows, "val_clean")),
            _pct(aggregate(rows, "held_out_clean"), 2), _pct(aggregate(rows, "test_clean")),
            "n/a" if miou[0] is None else f"{miou[0]:.3f}" + ("" if miou[1] is None else f" ± {miou[1]:.3f}"),
            _pct(aggregate(rows, "corner_share")), rel, f"{pub[0]} ({pub[1]})" if pub else "-"]
        body.append([cells[i] for i in keep])
    return f"**{title}**\n\n" + markdown_table(columns, body) + "\n"


def annotation_note(backbone: str, methods: Sequence[str], forced: Optional[str] = None) -> str:
    """The table note that says which annotation fed which method."""
    by = {}
    for m in methods:
        by.setdefault(forced or annotation(backbone, m.split("/")[0]), []).append(NAMES.get(m, m))
    how = {"corners": "1 everywhere but the four corners", "digit": "the dilated strokes"}
    return "Annotation " + "; ".join(f"`{a}` ({how[a]}): {', '.join(ms)}" for a, ms in by.items()) + (
        ". RRR and CDEP penalise 1 − mask (the corners); the others reward the mask.")


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megl.experiments decoy-mnist", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=("mlp", "cnn", "resnet18"), default="mlp")
    p.add_argument("--variant", choices=tuple(VARIANTS), help="construction (default: paper for mlp, hard else)")
    p.add_argument("--seeds", default="0", help="comma list of training seeds (default 0)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list from {', '.join(METHODS)}, or megl/<{'|'.join(ABLATIONS)}> (default: all that "
                   "the backbone allows)")
    p.add_argument("--mask-fraction", type=float, default=1.0, help="share of training images with a mask")
    p.add_argument("--annotation", choices=ANNOTATIONS, help="train every method on this annotation (default: "
                   "corners for RRR and CDEP, which penalise 1 − mask; digit for the others unless ANNOTATION says)")
    p.add_argument("--mnist", help="MNIST IDX folder (default: $MEGL_MNIST, else data/MNIST/raw, data/mnist or "
                   "~/.cache/megl/mnist)")
    for k in ("n_train", "n_val", "n_test"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"default {SIZES['mlp'][k]} (mlp), "
                       f"{SIZES['cnn'][k]} (cnn, resnet18)")
    p.add_argument("--swatch", type=int, help="override the variant's swatch side (px)")
    p.add_argument("--digit-contrast", type=float, help="override the variant's digit contrast")
    p.add_argument("--noise", type=float, help="override the variant's pixel noise std")
    p.add_argument("--data-seed", type=int, default=0, help="the data's seed, fixed across training seeds")
    p.add_argument("--epochs", type=int, help=f"epochs of every run (default {EPOCHS})")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="one run per value of a Config key (e.g. method_args.rrr_lambda=10,100,1000) for each "
                   "method; the table then shows validation columns only")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Config override for every run")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap (smoke tests)")
    p.add_argument("--no-train", action="store_true", help="tabulate finished runs only; train nothing")
    p.add_argument("--out", default="runs/decoy-mnist", help="output directory (default runs/decoy-mnist)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from megl.data.mnist import MNISTError

    bb = args.backbone
    args.variant = args.variant or ("paper" if bb == "mlp" else "hard")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS and not (m.startswith("megl/") and m[5:] in ABLATIONS)]
    if bad:
        raise SystemExit(f"megl.experiments: unknown method(s) {bad}; choose from {', '.join(METHODS)} or "
                         f"megl/<{'|'.join(ABLATIONS)}>")
    skipped = [m for m in methods if bb == "mlp" and m.split("/")[0] in GRADCAM_METHODS]
    methods = [m for m in methods if m not in skipped]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"megl.experiments: --seeds must be a comma list of integers, got {args.seeds!r}")
    if not 0.0 <= args.mask_fraction <= 1.0:
        raise SystemExit(f"megl.experiments: --mask-fraction {args.mask_fraction} must be in [0, 1]")
    sweep_key, sweep_values = None, [None]
    if args.sweep:
        sweep_key, sep, vals = args.sweep.partition("=")
        if not sep or not vals:
            raise SystemExit(f"megl.experiments: --sweep expects KEY=V1,V2,..., got {args.sweep!r}")
        sweep_values = [parse_value(v) for v in vals.split(",")]
        if sweep_key == "annotation" and not set(sweep_values) <= set(ANNOTATIONS):
            raise SystemExit(f"megl.experiments: --sweep annotation takes {' and '.join(ANNOTATIONS)}, got {vals!r}")
    out = Path(args.out)
    c = construction(args)
    mnist = mnist_dir(args.mnist)
    try:
        parts = scoring_splits(mnist, c, bb)
    except (MNISTError, ValueError) as e:
        raise SystemExit(f"megl.experiments: {e}")
    roots = {mask: ensure_data(out, mnist, c, mask, args.mask_fraction) for mask in ANNOTATIONS}
    common = dict(Config().to_dict(), **TRAIN, epochs=args.epochs or EPOCHS[bb])
    if args.max_steps_per_epoch:
        common["max_steps_per_epoch"] = args.max_steps_per_epoch
    if bb == "resnet18":
        common.update(resnet_stem_maxpool=False)  # 28 px: keep a 4x4 layer4 map (stride 1)
    results: dict[str, list] = {}
    notes_missing: list[str] = []
    t0 = time.time()
    for method in methods:
        name = method.split("/")[0]
        for value in sweep_values:
            d = json.loads(json.dumps(common))
            mask = value if sweep_key == "annotation" else args.annotation or annotation(bb, name)
            d["data_root"] = str(roots[mask])
            d.update(json.loads(json.dumps(HPARAMS.get((bb, name), {}))))
            swept = [f"{sweep_key}={json.dumps(value)}"] if sweep_key and sweep_key != "annotation" else []
            try:
                d = apply_overrides(d, args.set + swept)
                Config.from_dict(d).validate()
            except (ValueError, FileNotFoundError) as e:
                raise SystemExit(f"megl.experiments: {e}")
            label = method if sweep_key is None else f"{method} {sweep_key}={value}"
            blind = sweep_key is not None  # a sweep chooses on val: its training log shows no test accuracy
            rows = [run_method(d, out, bb, method, s, parts, c["swatch"], not args.no_train, blind) for s in seeds]
            results[label] = [r for r in rows if r is not None]
            if len(results[label]) < len(seeds):
                notes_missing.append(f"{label}: {len(results[label])} of {len(seeds)} seeds finished")
            shown = ("val", "val_clean", "held_out_clean") if sweep_key else ("test", "val", "val_clean")  # no test
            if results[label]:
                print(f"[decoy-mnist] {label}: " + ", ".join(f"{k} {_pct(aggregate(results[label], k))}"
                                                             for k in shown), file=sys.stderr, flush=True)
    base = results.get("baseline")
    base_sec = aggregate(base, "epoch_seconds")[0] if base else None
    desc = ", ".join(f"{k} {v}" for k, v in c.items())
    title = (f"DecoyMNIST, {bb}, {args.variant} construction ({desc}), mask fraction {args.mask_fraction:g}, "
             + ("epochs as swept" if sweep_key == "epochs" else f"{common['epochs']} epochs") + f", seeds {seeds}")
    md = table_markdown(results, bb, base_sec, title, VAL_ONLY if sweep_key else COLUMNS)
    notes = [f"- {', '.join(skipped)} on the mlp: n/a, Grad-CAM needs a convolutional backbone." if skipped else "",
             "- " + annotation_note(bb, methods, args.annotation) + " mIoU: " +
             ("input-gradient saliency (the mlp has no Grad-CAM)" if bb == "mlp" else "Grad-CAM") +
             " of the predicted class on the test digits, threshold 0.5, against the dilated strokes.",
             "- Hyper-parameters (chosen on val, docs/decoy_mnist.md): "
             + ("; ".join(f"{m} {v}" for (b, m), v in HPARAMS.items() if b == bb) or "the papers' defaults")
             + (f"; set {', '.join(args.set)}" if args.set else "")
             + (f"; swept {sweep_key}" if sweep_key else "") + f". Wall time {time.time() - t0:.0f} s."]
    if notes_missing:
        notes.append("- Not yet trained (--no-train): " + "; ".join(notes_missing) + ".")
    md += "\n" + "\n".join(n for n in notes if n) + "\n"
    stem = "sweep" if sweep_key else "table"
    tag = f"{bb}-{args.variant}-f{args.mask_fraction:g}"
    (out / f"{stem}-{tag}.md").write_text(md)
    (out / f"{stem}-{tag}.json").write_text(json.dumps({"construction": c, "backbone": bb, "seeds": seeds,
                                                        "mask_fraction": args.mask_fraction, "settings": common,
                                                        "results": results}, indent=1))
    print(md)
    print(f"written: {out / (stem + '-' + tag + '.md')}")
    return 0
