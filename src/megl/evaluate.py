"""`python -m megl.evaluate --run RUN_DIR`: evaluate a trained run on a split and write its report.

    python -m megl.evaluate --run runs/demo [--split test] [--max-new-tokens N] [--threshold 0.5] [--report-samples 16]

writes RUN_DIR/eval/ (RUN_DIR/eval/<split>/ for a split other than test):
    metrics.json       every number below, with the settings that produced them
    tables.md          the paper's Table 2 (Accuracy, Precision, Recall, F1, mIoU) and Table 3 (CLIPScore, B4, M,
                       R, S, C) layouts, plus explanation precision/recall/F1 and faithfulness
    report.html        sample images: saliency overlay, human mask, predicted vs true label, generated vs
                       reference rationales; PNGs in report_images/ (relative links)

`evaluate_split(model, dataset, prior, ...)` is the single-process implementation. Training's per-epoch metrics
(`megl.train.evaluate`: accuracy, macro P/R/F1, mIoU) shard the split over DDP ranks and gather the predictions, then
score them with the same megl.metrics functions and conventions; a test checks the two agree on a saved run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from megl.errors import cli
from megl.files import atomic_write
from megl.metrics import (DEFAULT_FRACTIONS, VisualMetrics, caption_metrics, check_java, classification_metrics,
                          clip_scores, comprehensiveness_sufficiency, load_open_clip)


def _explain(model, image: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, saliency (B,H,W)) for the predicted class, from one classifier forward when the model allows."""
    if hasattr(model, "explain"):
        logits, sal = model.explain(image)
    else:
        with torch.no_grad():
            logits = model.classifier(image).logits
        sal = model.saliency(image, logits.argmax(1))
    return logits.detach().float(), sal.saliency.detach().float()


def _minmax(x: Tensor) -> Tensor:
    return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)


def _sample_indices(n: int, k: int) -> list[int]:
    """k evenly spaced item indices of n (deterministic)."""
    if k <= 0 or n == 0:
        return []
    return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))


def evaluate_split(
    model,
    dataset,
    prior: Optional[Tensor] = None,
    *,
    batch_size: int = 64,
    device: Optional[str | torch.device] = None,
    threshold: float = 0.5,
    text: bool = False,
    max_new_tokens: Optional[int] = None,
    clip: Optional[tuple[Any, Callable]] = None,
    spice: str = "auto",
    faithfulness: bool = False,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    baseline: str = "mean",
    report_samples: int = 0,
    limit: Optional[int] = None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate `model` (a MEGLModel, see docs/architecture.md) on `dataset` (an ExplanationDataset).

    Always: accuracy, macro precision / recall / F1 (megl.metrics.classification) and, over the samples with a
    human mask, mIoU and explanation precision / recall / F1 of (saliency ≥ threshold) vs (mask ≥ threshold) for
    the predicted class; with `prior` (the training masks' mean, (H, W)) also "miou_prior", the mIoU of that
    prior used as every sample's saliency (a data-only reference point).
    text=True: greedy rationales for the predicted class (`model.generate_rationales`, `max_new_tokens`),
    scored against all references with pycocoevalcap (BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE when available),
    and CLIPScore with `clip` = (open_clip model, tokenizer) (default: the run's own `model.clip`); also the
    CLIPScore of the first reference rationale with the same CLIP, for scale.
    faithfulness=True: comprehensiveness / sufficiency of the saliency (megl.metrics.faithfulness).
    report_samples=k: "samples" holds k evenly spaced items (tensors on CPU) for the HTML report.
    The model is put in eval mode and restored to its previous mode afterwards.
    """
    from torch.utils.data import DataLoader, Subset

    from megl.data import collate

    if getattr(dataset, "expand_rationales", False) and hasattr(dataset, "expanded"):
        dataset = dataset.expanded(False)  # one item per image: each image counts once
    n_total = len(dataset)
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, n_total)))
    n = len(dataset)
    if n == 0:
        raise ValueError("evaluate_split: the dataset is empty; check the split (e.g. SyntheticConfig n_test > 0)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if text:
        check_java()  # fail before minutes of generation, not after
        if clip is None:
            clip = (model.clip, model.clip_tokenizer)
    prior_n = _minmax(prior.detach().float().to(device)) if prior is not None else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    wanted = set(_sample_indices(n, report_samples))

    visual, visual_prior = VisualMetrics(threshold), VisualMetrics(threshold)
    labels, preds, generated, references, clip_gen, clip_ref = [], [], [], [], [], []
    faith: dict[str, list[Tensor]] = {}
    samples: list[dict] = []
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        seen = 0
        for bi, batch in enumerate(loader):
            image = batch["image"].to(device, non_blocking=True)
            mask, has_mask = batch["mask"].to(device), batch["has_mask"]
            logits, sal = _explain(model, image)
            pred = logits.argmax(1)
            labels.append(batch["label"])
            preds.append(pred.cpu())
            scores = visual.update(sal, mask, has_mask)
            if prior_n is not None:
                visual_prior.update(prior_n.expand_as(sal), mask, has_mask)
            if faithfulness:
                def predict_proba(x: Tensor) -> Tensor:
                    with torch.no_grad():
                        return torch.softmax(model.classifier(x).logits.float(), -1)
                out = comprehensiveness_sufficiency(predict_proba, image, sal, pred, fractions, baseline)
                for k, v in out.items():
                    if k.startswith(("comprehensiveness", "sufficiency")):
                        faith.setdefault(k, []).append(v.cpu())
            gen = None
            if text:
                gen = model.generate_rationales(image, class_ids=pred, max_new_tokens=max_new_tokens)
                generated += gen
                references += batch["references"]
                clip_model, clip_tok = clip
                clip_gen.append(clip_scores(clip_model, clip_tok, image, gen).cpu())
                clip_ref.append(clip_scores(clip_model, clip_tok, image, [r[0] for r in batch["references"]]).cpu())
            for j in range(image.shape[0]):
                if seen + j in wanted:
                    samples.append({
                        "id": batch["id"][j], "image": batch["image"][j], "saliency": sal[j].cpu(),
                        "mask": batch["mask"][j], "has_mask": bool(has_mask[j]), "label": int(batch["label"][j]),
                        "pred": int(pred[j]), "iou": float(scores["iou"][j]),
                        "generated": gen[j] if gen is not None else None, "references": batch["references"][j],
                    })
            seen += image.shape[0]
            if progress:
                print(f"\r  evaluated {seen}/{n}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
    finally:
        model.train(was_training)

    y_true, y_pred = torch.cat(labels), torch.cat(preds)
    num_classes = len(getattr(model, "class_names", [])) or None
    result: dict[str, Any] = {"n": n, "n_total": n_total}
    result.update(classification_metrics(y_true, y_pred))
    if num_classes:  # macro over all classes of the task (absent classes count as 0), for reference
        result["f1_all_classes"] = classification_metrics(y_true, y_pred, labels=range(num_classes))["f1"]
    result.update(visual.compute())
    if prior_n is not None:
        result["miou_prior"] = visual_prior.compute()["miou"]
    if faithfulness:
        means = {k: float(torch.cat(v).mean()) for k, v in faith.items()}
        result["comprehensiveness"] = means.pop("comprehensiveness")
        result["sufficiency"] = means.pop("sufficiency")
        result["faithfulness"] = {"fractions": list(fractions), "baseline": baseline, "per_fraction": means}
    if text:
        result["text"] = caption_metrics(generated, references, spice=spice)
        result["text"]["max_new_tokens"] = max_new_tokens
        result["clipscore"] = float(torch.cat(clip_gen).mean())
        result["clipscore_references"] = float(torch.cat(clip_ref).mean())
        result["rationales"] = [{"generated": g, "references": r} for g, r in zip(generated, references)]
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if report_samples:
        result["samples"] = samples
    return result

# ------------------------------------------------------------------ command line


def _dataset_name(config) -> str:
    root = getattr(config, "data_root", None)
    return os.path.basename(os.path.normpath(root)) if root else "synthetic"


def _clip_choice(args, run, device) -> tuple[tuple[Any, Callable], str]:
    if args.clip_model:
        model, tok = load_open_clip(args.clip_model, args.clip_weights, device)
        weights = args.clip_weights or "random initialisation (no --clip-weights: CLIPScore is not meaningful)"
        return (model, tok), f"CLIPScore: open_clip {args.clip_model} from {weights}."
    config = run.config
    name = getattr(config, "clip_model", "tiny")
    if name == "tiny":
        note = ("CLIPScore uses the run's own CLIP: the embedded tiny open_clip model, pretrained contrastively on "
                "this run's training images and rationales (megl.models.standins), so scores are comparable "
                "between runs on the same data only. For the paper's setting pass "
                "--clip-model ViT-L-14 --clip-weights /path/to/open_clip_pytorch_model.bin.")
    elif name == "tiny-random":
        note = ("CLIPScore uses the run's own CLIP: the embedded tiny open_clip model, random-initialised and "
                "frozen (clip_model=tiny-random), so its values only check the pipeline. For the paper's setting "
                "pass --clip-model ViT-L-14 --clip-weights /path/to/open_clip_pytorch_model.bin.")
    else:
        note = f"CLIPScore uses the run's own CLIP: open_clip {name} from {getattr(config, 'clip_weights', None)}."
    return (run.model.clip, run.model.clip_tokenizer), note


def write_outputs(metrics: dict, out_dir: str, *, backbone: str, method: str, dataset: str, split: str,
                  class_names: Sequence[str], notes: Sequence[str], settings: dict) -> dict[str, str]:
    """metrics.json, tables.md, report.html (+ report_images/) under out_dir; returns their paths."""
    from megl.report import markdown_report, write_html_report

    os.makedirs(out_dir, exist_ok=True)
    samples = metrics.pop("samples", [])
    tables = markdown_report(metrics, backbone, method, f"{dataset}, {split} split", notes)
    paths = {"metrics": os.path.join(out_dir, "metrics.json"), "tables": os.path.join(out_dir, "tables.md")}
    payload = {"split": split, "dataset": dataset, "backbone": backbone, "method": method, "settings": settings,
               "notes": list(notes), "metrics": metrics}
    atomic_write(paths["metrics"], lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2)))
    with open(paths["tables"], "w") as f:
        f.write(tables)
    paths["report"] = write_html_report(
        samples, out_dir, title=f"megl evaluation: {method} / {backbone} on {dataset} ({split})",
        class_names=class_names, summary_markdown=tables, notes=notes)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megl.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by `python -m megl.train`")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="rationale length cap (default: the run's config)")
    p.add_argument("--threshold", type=float, default=0.5, help="binarisation threshold for mIoU (default 0.5)")
    p.add_argument("--report-samples", type=int, default=16, help="images in the HTML report (default 16)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's eval_batch_size")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items (smoke tests)")
    p.add_argument("--no-text", action="store_true", help="skip rationale generation, text metrics and CLIPScore")
    p.add_argument("--no-faithfulness", action="store_true", help="skip comprehensiveness / sufficiency")
    p.add_argument("--spice", choices=("auto", "off"), default="auto",
                   help="auto: run SPICE when its Stanford CoreNLP jars are installed (default)")
    p.add_argument("--clip-model", default=None, help="open_clip model name for CLIPScore (e.g. ViT-L-14); "
                   "default: the run's own CLIP")
    p.add_argument("--clip-weights", default=None, help="local open_clip checkpoint for --clip-model")
    p.add_argument("--quiet", action="store_true")
    return p


@cli("megl.evaluate")
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.clip_weights and not args.clip_model:
        raise SystemExit("--clip-weights needs --clip-model (the open_clip architecture name, e.g. ViT-L-14)")
    if not 0.0 <= args.threshold <= 1.0:
        raise SystemExit(f"--threshold must be in [0, 1], got {args.threshold}")
    if not os.path.isdir(args.run):
        raise SystemExit(f"run directory {args.run!r} not found; train one with `python -m megl.train --out DIR`")
    from megl.runs import check_device, load_run, require_saliency

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    require_saliency(args.run, "megl.evaluate")
    run = load_run(args.run, device=device)
    if args.split not in run.splits:
        raise SystemExit(f"split {args.split!r} not in this run; available: {', '.join(sorted(run.splits))}")
    config = run.config
    notes: list[str] = []
    clip = None
    if not args.no_text:
        clip, note = _clip_choice(args, run, device)
        notes.append(note)
    max_new_tokens = args.max_new_tokens or getattr(config, "max_new_tokens", 32)
    settings = {"threshold": args.threshold, "max_new_tokens": None if args.no_text else max_new_tokens,
                "text": not args.no_text, "faithfulness": not args.no_faithfulness,
                "faithfulness_fractions": list(DEFAULT_FRACTIONS), "faithfulness_baseline": "mean",
                "saliency_target": "predicted class", "limit": args.limit, "device": str(device),
                "clip_model": args.clip_model or f"run ({getattr(config, 'clip_model', '?')})"}
    metrics = evaluate_split(
        run.model, run.splits[args.split], run.prior,
        batch_size=args.batch_size or getattr(config, "eval_batch_size", 64), device=device,
        threshold=args.threshold, text=not args.no_text, max_new_tokens=max_new_tokens, clip=clip, spice=args.spice,
        faithfulness=not args.no_faithfulness, report_samples=args.report_samples, limit=args.limit,
        progress=not args.quiet)
    if "text" in metrics:
        notes.append(metrics["text"]["spice_note"])
    notes.append(f"mIoU: mean IoU of (saliency ≥ {args.threshold}) and (mask ≥ {args.threshold}) over "
                 f"{metrics['n_annotated']} annotated of {metrics['n']} images; saliency for the predicted class.")
    out_dir = os.path.join(args.run, "eval") if args.split == "test" else os.path.join(args.run, "eval", args.split)
    paths = write_outputs(metrics, out_dir, backbone=getattr(config, "backbone", "?"),
                          method=getattr(config, "method", "?"), dataset=_dataset_name(config), split=args.split,
                          class_names=run.model.class_names, notes=notes, settings=settings)
    if not args.quiet:
        with open(paths["tables"]) as f:
            print(f.read())
        for k, v in paths.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
