"""`python -m megl.experiments table2|table4`: train and evaluate every method with the same seeds and epochs and
write the paper's tables.

    python -m megl.experiments table2 --quick                       # synthetic data, CPU-sized, all methods
    python -m megl.experiments table4 --quick                       # MEGL ablation (paper Table 4)
    python -m megl.experiments decoy-mnist --backbone cnn --seeds 0,1,2  # DecoyMNIST (megl.decoy_mnist)
    python -m megl.experiments table2 --data-root data/object-me --backbones resnet18,vit_b_16 \\
        --seeds 0,1,2 --epochs 10 --device cuda --set clip_weights=... --set llm=...

table2: for every backbone, the plain classifier ("-", method baseline), the visual EGL methods (CDEP, HAICS,
RES-G, RES-L, plus GRADIA and RRR) and MEGL; and, once (they use no backbone), the LLaVA and LLaVA-Fine-tune-CoT
VQA classifiers. Columns: Accuracy, macro Precision / Recall / F1 and mIoU on the test split (paper Table 2),
then Table 3 (CLIPScore, BLEU-4, METEOR, ROUGE-L, SPICE, CIDEr) for the methods that write rationales (MEGL,
Fine-tune-CoT), and the list of methods that beat the plain classifier.
table4: MEGL with each explanation module set (full, visual+text, text, visual, none) and the accuracy change
against full MEGL, per backbone.

Each run lives in OUT/runs/<backbone>_<method>[_<ablation>]_seed<k>_<config hash>/ (a normal megl.train run
directory, plus eval.json; the hash covers the method's package defaults); a finished run is reused, an
interrupted one resumed, so the tables can be rebuilt or extended without retraining, and table2 and table4 share
the full-MEGL runs. With several seeds, cells are
mean ± standard deviation over seeds (the seeds vary training; the data stays that of `data_seed`). --quick
shrinks data and models so that both tables run on a CPU in minutes (see QUICK); every run of one invocation
shares the same settings, seeds and epochs.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from megl.config import STORY_DATA, Config, apply_overrides
from megl.methods import get_method
from megl.tables import markdown_table

# the rows' order; which methods are LLM classifiers is the registry's word (megl.methods)
ROW_ORDER = ("llava", "ft-cot", "baseline", "cdep", "haics", "res-g", "res-l", "gradia", "rrr", "megl")
LLM_METHODS = tuple(m for m in ROW_ORDER if get_method(m).kind == "llm")
VISUAL_METHODS = tuple(m for m in ROW_ORDER if get_method(m).kind == "visual")
TEXT_METHODS = ("megl", "ft-cot")
TABLE2_METHODS = LLM_METHODS + VISUAL_METHODS
ABLATION_ORDER = ("full", "paper", "visual+text", "text", "visual", "none")
ABLATION_NAMES = {"full": "MEGL", "paper": "MEGL, paper objective", "visual+text": "Visual+Text", "text": "Text",
                  "visual": "Visual", "none": "-"}
METHOD_NAMES = {"baseline": "-", "megl": "MEGL", "gradia": "GRADIA", "haics": "HAICS", "res-g": "RES-G",
                "res-l": "RES-L", "rrr": "RRR", "cdep": "CDEP", "llava": "-", "ft-cot": "Fine-Tune-CoT"}
BACKBONE_NAMES = {"resnet18": "ResNet18", "vit_b_16": "ViT-B/16"}
# (backbone, method) pairs that cannot run, with the reason printed under the table
UNSUPPORTED = {("vit_b_16", "cdep"): "CDEP on ViT-B/16: n/a, contextual decomposition has propagation rules for "
                                     "CNN layers only (no attention / LayerNorm / GELU rules; megl.losses.cdep)."}
T2_KEYS = ("accuracy", "precision", "recall", "f1", "miou")
T3_KEYS = ("clipscore", "bleu4", "meteor", "rouge_l", "spice", "cider")
CAPTION_KEYS = T3_KEYS[1:]

# CPU-sized settings: a smaller 4-class synthetic dataset (same generator, same decoy), a few epochs, a narrow ViT
# on the ViT-B/16 code path (patch 16), the tiny CLIP and LLM (the defaults), short rationales.
QUICK: dict[str, Any] = {
    "synthetic": {**STORY_DATA, "n_train": 384, "n_val": 64, "n_test": 128, "num_classes": 4},
    "epochs": 8,
    "batch_size": 16,
    "eval_batch_size": 64,
    "vit_layers": 2, "vit_heads": 2, "vit_hidden": 64, "vit_mlp": 128,
    "max_new_tokens": 40,
    "num_overlays": 0,
    "checkpoint_every": 1000,
}


# ----------------------------------------------------------------------------- run configs
def base_settings(args) -> dict:
    """The settings every run of this invocation shares (before backbone / method / seed / ablation)."""
    d = Config().to_dict()
    if args.quick:
        d.update(json.loads(json.dumps(QUICK)))
    if args.data_root:
        d["data_root"] = args.data_root
    if args.epochs is not None:
        d["epochs"] = args.epochs
    if args.device:
        d["device"] = args.device
    return apply_overrides(d, args.set or [])


def run_config(base: dict, backbone: str, method: str, seed: int, ablation: Optional[str] = None) -> Config:
    from megl.train import ABLATIONS

    d = json.loads(json.dumps(base))
    d.update(backbone=backbone, method=method, seed=seed)
    if ablation is not None:
        d.update(method="megl", **ABLATIONS[ablation])
    return Config.from_dict(d).validate()


def method_defaults(method: str) -> dict:
    """The `DEFAULTS` of the module behind a method's loss (megl/losses/<method>.py; {} where there are none)."""
    return dict(getattr(inspect.getmodule(get_method(method).resolve("loss")), "DEFAULTS", None) or {})


def _integral(value):
    """`value` with every whole float as an int, so that `--set lambda=1` and `lambda=1.0` name the same run."""
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_integral(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# Options added after runs were named: at these values they are left out of the hash, so that the runs trained
# before the option existed (which behave as its default) keep their names and are reused.
NEW_OPTION_DEFAULTS = {"rationale_prompt": "label", "sdtg_image_tokens": True, "sdtg_grid": "classifier",
                       "visual_l1": "both"}


def run_name(config: Config, ablation: Optional[str] = None) -> str:
    """backbone_method[_ablation]_seed<k>_<hash of the config>. The hash covers the method's package defaults
    too, so a run trained before a default changed is not reused for the new default."""
    d = config.to_dict()
    if d.get("data_root"):  # the same folder names the same run, given relative to the working directory or not
        d["data_root"] = os.path.abspath(d["data_root"])
    for k, v in NEW_OPTION_DEFAULTS.items():
        if d.get(k) == v:
            del d[k]
    defaults = method_defaults(config.method)
    if defaults:
        d["method_args"] = {**defaults, **(d.get("method_args") or {})}
    digest = hashlib.sha1(json.dumps(_integral(d), sort_keys=True).encode()).hexdigest()[:10]
    who = "llm" if config.method in LLM_METHODS else config.backbone
    tag = f"_{ablation}" if ablation else ""
    return f"{who}_{config.method}{tag}_seed{config.seed}_{digest}"


# ----------------------------------------------------------------------------- training
def _finished(run_dir: Path, config: Config) -> bool:
    from megl import runs

    metrics = runs.read_metrics(run_dir)
    return len(metrics) >= config.epochs and (run_dir / "eval.json").exists()


def train_run(config: Config, run_dir: Path, progress: bool, blind: bool = False) -> None:
    """A megl.train run (any registered method), resumed if a checkpoint exists; blind: its log shows no test
    accuracy."""
    from megl import runs
    from megl.train import LOG_SPLITS, Dist, train

    resume = runs.load_checkpoint(run_dir) is not None
    train(config, run_dir, Dist(config.device), resume=resume, progress=progress,
          log_splits=("val",) if blind else LOG_SPLITS)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_llm_text(model, dataset, config: Config) -> dict:
    """Fine-tune-CoT's Table 3 numbers: the caption metrics and CLIPScore of the rationales it generates (with
    the class it picks itself), and how many answers named no class."""
    from megl.data import collate
    from megl.metrics import caption_metrics, clip_scores

    ds = dataset.expanded(False)
    rationales, references, clip, invalid = [], [], [], 0
    model.eval()
    device = torch.device(config.device)
    for start in range(0, len(ds), config.eval_batch_size):
        batch = collate([ds[i] for i in range(start, min(start + config.eval_batch_size, len(ds)))])
        image = batch["image"].to(device)
        pred = model.predict(image, config.max_new_tokens)
        invalid += int((pred.class_ids < 0).sum())
        rationales += pred.rationales
        references += batch["references"]
        clip.append(clip_scores(model.clip, model.clip_tokenizer, image, pred.rationales).cpu())
    tm = caption_metrics(rationales, references)
    out: dict[str, Any] = {k: tm.get(k) for k in CAPTION_KEYS}
    out["clipscore"] = float(torch.cat(clip).mean())
    out["rationales"] = [{"generated": g, "references": r} for g, r in zip(rationales[:20], references[:20])]
    out["invalid_answers"] = invalid
    return out


def evaluate_run(run_dir: Path, config: Config, text: bool) -> dict:
    """Table 2 numbers: the last epoch's test metrics of the run (the training loop's evaluation, identical for
    every method); with text: MEGL's rationales for the predicted class scored by megl.evaluate, or
    Fine-tune-CoT's generated rationales (evaluate_llm_text)."""
    from megl import runs

    last = runs.read_metrics(run_dir)[-1]
    out: dict[str, Any] = dict(last["test"])
    if not text:
        return out
    run = runs.load_run(run_dir, device=config.device)
    if get_method(config.method).kind == "llm":
        out.update(evaluate_llm_text(run.model, run.splits["test"], config))
        return out
    from megl.evaluate import evaluate_split

    m = evaluate_split(run.model, run.splits["test"], run.prior, batch_size=config.eval_batch_size,
                       text=True, max_new_tokens=config.max_new_tokens, faithfulness=False)
    out.update({k: (m.get("text") or {}).get(k) for k in CAPTION_KEYS})
    out["clipscore"] = m.get("clipscore")
    out["rationales"] = m.get("rationales", [])[:20]
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def run_one(base: dict, out: Path, backbone: str, method: str, seed: int, ablation: Optional[str] = None, *,
            text: bool = True, progress: bool = False, blind: bool = False) -> dict:
    """Train (or reuse / resume) one run and return its eval.json content. blind (sweeps, which choose on val):
    what is printed while training names the validation accuracy, never the test split's."""
    config = run_config(base, backbone, method, seed, ablation)
    run_dir = out / "runs" / run_name(config, ablation)
    want_text = text and method in TEXT_METHODS and ablation is None
    if _finished(run_dir, config):
        payload = json.loads((run_dir / "eval.json").read_text())
        if want_text and payload["metrics"].get("clipscore") is None:
            payload["metrics"].update(evaluate_run(run_dir, config, text=True))  # text asked for later
            _write_json(run_dir / "eval.json", payload)
        return payload
    where = "LLM" if method in LLM_METHODS else backbone
    label = f"{method}{'/' + ablation if ablation else ''} ({where}, seed {seed})"
    print(f"[experiments] training {label} -> {run_dir}", file=sys.stderr, flush=True)
    t0 = time.time()
    train_run(config, run_dir, progress, blind)
    result = evaluate_run(run_dir, config, want_text)
    payload = {"backbone": None if method in LLM_METHODS else backbone, "method": method, "ablation": ablation,
               "seed": seed, "seconds": round(time.time() - t0, 1), "run_dir": str(run_dir), "metrics": result}
    _write_json(run_dir / "eval.json", payload)
    if blind:
        from megl import runs

        shown = f"val acc {runs.read_metrics(run_dir)[-1]['val']['accuracy']:.4f}"
    else:
        shown = f"test acc {result.get('accuracy', float('nan')):.4f}"
    print(f"[experiments] {label}: {shown} in {payload['seconds']} s", file=sys.stderr, flush=True)
    return payload


# ----------------------------------------------------------------------------- tables
def aggregate(payloads: Sequence[dict], keys: Sequence[str]) -> dict[str, tuple[Optional[float], Optional[float]]]:
    """(mean, std over seeds or None for one seed) per key; None when a value is missing in any seed."""
    out = {}
    for k in keys:
        vals = [p["metrics"].get(k) for p in payloads]
        if not vals or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
            out[k] = (None, None)
            continue
        m = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
        out[k] = (m, sd)
    return out


def cell(ms: tuple[Optional[float], Optional[float]], none: str = "-") -> str:
    m, sd = ms
    if m is None:
        return none
    return f"{m:.4f}" if sd is None else f"{m:.4f} ± {sd:.4f}"


def table2_markdown(results: dict, backbones: Sequence[str], methods: Sequence[str], dataset: str) -> str:
    """results: {(backbone or None, method): [payload per seed]}."""
    rows, t3_rows, beats, notes = [], [], [], []
    for method in [m for m in LLM_METHODS if m in methods]:
        agg = aggregate(results[(None, method)], T2_KEYS)
        rows.append(["LLaVA", METHOD_NAMES[method]] + [cell(agg[k]) for k in T2_KEYS])
    for bb in backbones:
        for method in [m for m in VISUAL_METHODS if m in methods]:
            agg = aggregate(results[(bb, method)], T2_KEYS)
            skipped = (bb, method) in UNSUPPORTED
            if skipped:
                notes.append(UNSUPPORTED[(bb, method)])
            rows.append([BACKBONE_NAMES.get(bb, bb), METHOD_NAMES[method]]
                        + [cell(agg[k], "n/a" if skipped else "-") for k in T2_KEYS])
    for key in [(None, "ft-cot"), *[(bb, "megl") for bb in backbones]]:
        if key in results and key[1] in methods:
            agg = aggregate(results[key], T3_KEYS)
            name = "LLaVA-Fine-tune-CoT" if key[1] == "ft-cot" else f"MEGL-{BACKBONE_NAMES.get(key[0], key[0])}"
            t3_rows.append([name] + [cell(agg[k], "n/a") for k in T3_KEYS])
    for bb in backbones:
        if (bb, "baseline") not in results:
            continue
        base = aggregate(results[(bb, "baseline")], ("accuracy", "f1"))
        better = []
        for method in [m for m in TABLE2_METHODS if m != "baseline" and m in methods]:
            key = (None, method) if method in LLM_METHODS else (bb, method)
            agg = aggregate(results[key], ("accuracy", "f1"))
            if agg["accuracy"][0] is not None and agg["accuracy"][0] > base["accuracy"][0]:
                name = "LLaVA" + ("" if method == "llava" else "-Fine-tune-CoT") if method in LLM_METHODS \
                    else METHOD_NAMES[method]
                gain = agg["accuracy"][0] - base["accuracy"][0]
                # with several seeds, a gain no larger than either row's seed std is not called a win
                spread = max(agg["accuracy"][1] or 0.0, base["accuracy"][1] or 0.0)
                better.append(f"{name} ({gain:+.4f} acc, {agg['f1'][0] - base['f1'][0]:+.4f} F1"
                              + (", within the seed spread" if gain <= spread else "") + ")")
        beats.append(f"- {BACKBONE_NAMES.get(bb, bb)} (plain classifier accuracy {base['accuracy'][0]:.4f}): "
                     + (", ".join(better) if better else "none"))
    parts = [f"**Table 2. Classification and visual explainability ({dataset}, test split)**",
             markdown_table(["Backbone", "Method", "Accuracy", "Precision", "Recall", "F1 Score", "mIoU"], rows)]
    if t3_rows:
        parts += [f"**Table 3. Textual explanation quality ({dataset}, test split)**",
                  markdown_table(["Method", "CLIPScore", "B4", "M", "R", "S", "C"], t3_rows)]
    if any(r[5] == "n/a" for r in t3_rows):
        notes.append("S (SPICE) n/a: pycocoevalcap's SPICE needs the Stanford CoreNLP 3.6.0 jars "
                     "(`python -m pycocoevalcap.spice.get_stanford_models`, needs internet once).")
    if notes:
        parts += ["\n".join(f"- {n}" for n in notes)]
    if beats:
        parts += ["**Methods with a higher mean test accuracy than the plain classifier (\"-\") of the same "
                  "backbone** (\"within the seed spread\": the gain is no larger than the seeds' standard "
                  "deviation)",
                  "\n".join(beats)]
    return "\n\n".join(parts) + "\n"


def table4_markdown(results: dict, backbones: Sequence[str], ablations: Sequence[str], dataset: str) -> str:
    rows = []
    for bb in backbones:
        full = aggregate(results[(bb, "full")], ("accuracy",))["accuracy"][0] if (bb, "full") in results else None
        for i, ab in enumerate([a for a in ABLATION_ORDER if a in ablations]):
            acc = aggregate(results[(bb, ab)], ("accuracy",))
            change = "-" if ab == "full" or full is None or acc["accuracy"][0] is None \
                else f"{(acc['accuracy'][0] - full) * 100:+.2f}%"
            rows.append([BACKBONE_NAMES.get(bb, bb) if i == 0 else "", ABLATION_NAMES[ab], cell(acc["accuracy"]),
                         change])
    return (f"**Table 4. Ablation study ({dataset}, test split)** Visual: L1 to the human masks; Text: SDTG's "
            "rationale loss; the paper's MEGL adds the visual explanation distribution consistency (KL to the mean "
            "mask); MEGL (megl's default) adds the background term, which every other row leaves out. "
            "Performance change: accuracy difference to full MEGL, in percentage points.\n\n"
            + markdown_table(["Backbone", "Modules", "Accuracy", "Performance Change"], rows) + "\n")


def settings_note(base: dict, seeds: Sequence[int], quick: bool) -> str:
    synth = "synthetic" if base.get("data_root") is None else base["data_root"]
    vit = (f"ViT: {base['vit_layers']} layers, width {base['vit_hidden']}, patch {base['vit_patch_size']}"
           + (" (narrowed by --quick; the ViT-B/16 code path)" if quick else ""))
    sizes = f", sizes {base['synthetic']}" if base.get("data_root") is None and base.get("synthetic") else ""
    return (f"Settings: data {synth}{sizes}, image {base['image_size']} px, epochs {base['epochs']}, batch "
            f"{base['batch_size']}, lr {base['lr']}, seeds {list(seeds)}, ResNet18 stem max-pool "
            f"{base['resnet_stem_maxpool']} and layer4 stride {base.get('resnet_layer4_stride', 2)}; {vit}; CLIP {base['clip_model']}, LLM {base['llm']}. "
            "Method hyper-parameters: the defaults of megl/losses/<method>.py (docs/recipe.md §3) unless --set "
            "method_args.<name>=... .")


# ----------------------------------------------------------------------------- command line
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megl.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=("table2", "table4"),
                   help="(or decoy-mnist: see python -m megl.experiments decoy-mnist --help)")
    p.add_argument("--data-root", help="Object-ME / Action-ME directory (default: the synthetic dataset)")
    p.add_argument("--backbones", default="resnet18,vit_b_16", help="comma list (default resnet18,vit_b_16)")
    p.add_argument("--methods", default=",".join(TABLE2_METHODS), help="table2: comma list of methods")
    p.add_argument("--ablations", default=",".join(ABLATION_ORDER), help="table4: comma list of module sets")
    p.add_argument("--seeds", default="0", help="comma list of seeds, the same for every method (default 0)")
    p.add_argument("--epochs", type=int, help="epochs of every run (default: the config's, or QUICK's)")
    p.add_argument("--quick", action="store_true", help="CPU-sized data and models (see QUICK in the module)")
    p.add_argument("--device", help="cpu, cuda, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Config override for every run")
    p.add_argument("--out", default="runs/experiments", help="output directory (default runs/experiments)")
    p.add_argument("--no-text", action="store_true", help="skip rationale generation and Table 3")
    p.add_argument("--progress", action="store_true", help="per-step progress bars")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def run_table(args, base: dict, out: Path, backbones: list, seeds: list, dataset: str) -> tuple[dict, str]:
    """Train (or reuse) every run of `args.table` and return ({(backbone, row): [metrics per seed]}, markdown)."""
    text = not args.no_text
    results: dict = {}
    if args.table == "table2":
        methods = _csv(args.methods)
        bad = [m for m in methods if m not in TABLE2_METHODS]
        if bad:
            raise SystemExit(f"unknown method(s) {bad}; choose from {', '.join(TABLE2_METHODS)}")
        for method in [m for m in LLM_METHODS if m in methods]:
            results[(None, method)] = [run_one(base, out, "resnet18", method, s, text=text, progress=args.progress)
                                       for s in seeds]
        for bb in backbones:
            for method in [m for m in VISUAL_METHODS if m in methods]:
                if (bb, method) in UNSUPPORTED:
                    results[(bb, method)] = []
                    continue
                results[(bb, method)] = [run_one(base, out, bb, method, s, text=text, progress=args.progress)
                                         for s in seeds]
        md = table2_markdown(results, backbones, methods, dataset)
    else:
        ablations = _csv(args.ablations)
        bad = [a for a in ablations if a not in ABLATION_ORDER]
        if bad:
            raise SystemExit(f"unknown ablation(s) {bad}; choose from {', '.join(ABLATION_ORDER)}")
        for bb in backbones:
            for ab in [a for a in ABLATION_ORDER if a in ablations]:
                # "full" is plain MEGL: the same run directory as table2's MEGL row (shared, not retrained)
                results[(bb, ab)] = [run_one(base, out, bb, "megl", s, text=text, progress=args.progress)
                                     if ab == "full" else
                                     run_one(base, out, bb, "megl", s, ab, text=False, progress=args.progress)
                                     for s in seeds]
        md = table4_markdown(results, backbones, ablations, dataset)
    return results, md


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["decoy-mnist"]:  # its own options (megl.decoy_mnist)
        from megl.decoy_mnist import main as decoy_main

        return decoy_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones = _csv(args.backbones)
    for bb in backbones:
        if bb not in BACKBONE_NAMES:
            raise SystemExit(f"unknown backbone {bb!r}; choose from {', '.join(BACKBONE_NAMES)}")
    try:
        seeds = [int(s) for s in _csv(args.seeds)]
    except ValueError:
        raise SystemExit(f"--seeds must be a comma list of integers, got {args.seeds!r}")
    try:
        base = base_settings(args)
        Config.from_dict(base).validate()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"megl.experiments: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = "synthetic" if base.get("data_root") is None else os.path.basename(os.path.normpath(base["data_root"]))
    from megl.metrics import shared_meteor

    with shared_meteor():  # one METEOR process for every run's Table 3 scores
        results, md = run_table(args, base, out, backbones, seeds, dataset)
    md += "\n" + settings_note(base, seeds, args.quick) + "\n"
    (out / f"{args.table}.md").write_text(md)
    serial = {f"{k[0] or 'llm'}/{k[1]}": v for k, v in results.items()}
    (out / f"{args.table}.json").write_text(json.dumps({"settings": base, "seeds": seeds, "runs": serial}, indent=2))
    print(md)
    print(f"written: {out / (args.table + '.md')}, {out / (args.table + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
