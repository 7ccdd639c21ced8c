"""`python -m megl.sweep`: choose a hyper-parameter by validation accuracy, never by the test split.

    python -m megl.sweep --method gradia --grid method_args.gradia_lambda=0.1,1,10 --seeds 0,1 --quick
    python -m megl.sweep --method baseline --grid lr=3e-4,1e-3,3e-3 --quick
    python -m megl.sweep --method megl --ablation text --grid lambda_text=0.1,1 --quick   # a Table 4 row

Every value trains one megl.train run per seed (the runs of megl.experiments, so they are reused and resumed);
the score is the final epoch's validation accuracy, averaged over seeds. The rule: the highest mean wins; a
value within `--tie` of the best counts as tied, and among tied values the one listed first wins (list the
values from the most conservative, e.g. the smallest λ). The test split is not read here.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from megl.config import apply_overrides


def choose(scores: dict[str, list[float]], tie: float) -> str:
    """The rule above: values in listing order, best mean validation accuracy, ties to the earlier value."""
    means = {v: sum(s) / len(s) for v, s in scores.items()}
    best = max(means.values())
    return next(v for v in scores if means[v] >= best - tie)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megl import runs
    from megl.experiments import base_settings, run_one

    p = argparse.ArgumentParser(prog="python -m megl.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True)
    p.add_argument("--ablation", help="a Table 4 row of megl (megl.train.ABLATIONS), e.g. text; its runs are "
                                      "those of `megl.experiments table4`")
    p.add_argument("--grid", required=True, metavar="KEY=V1,V2,...", help="one config key and its candidate values")
    p.add_argument("--seeds", default="0")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--quick", action="store_true", help="megl.experiments' CPU-sized settings")
    p.add_argument("--data-root")
    p.add_argument("--epochs", type=int)
    p.add_argument("--device")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tie", type=float, default=0.01, help="validation-accuracy margin counted as a tie")
    p.add_argument("--out", default="runs/sweep")
    args = p.parse_args(argv)
    key, _, values = args.grid.partition("=")
    values = [v.strip() for v in values.split(",") if v.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    if not key or not values:
        raise SystemExit("--grid must be KEY=V1,V2,...")
    if args.ablation is not None:
        from megl.train import ABLATIONS

        if args.method != "megl" or args.ablation not in ABLATIONS:
            raise SystemExit(f"--ablation {args.ablation!r}: needs --method megl and one of {', '.join(ABLATIONS)}")
    ablation = None if args.ablation == "full" else args.ablation  # table4's "full" row is plain MEGL's run
    base = base_settings(args)
    out = Path(args.out)
    scores: dict[str, list[float]] = {}
    for v in values:
        cfg = apply_overrides(base, [f"{key}={v}"])
        for seed in seeds:
            payload = run_one(cfg, out, args.backbone, args.method, seed, ablation, text=False, blind=True)
            val = runs.read_metrics(payload["run_dir"])[-1]["val"]["accuracy"]
            scores.setdefault(v, []).append(val)
            print(f"[sweep] {args.method} {key}={v} seed {seed}: val acc {val:.4f}", file=sys.stderr, flush=True)
    chosen = choose(scores, args.tie)
    rows = []
    for v, s in scores.items():
        m = sum(s) / len(s)
        sd = math.sqrt(sum((x - m) ** 2 for x in s) / (len(s) - 1)) if len(s) > 1 else 0.0
        rows.append(f"| {v} | {m:.4f} ± {sd:.4f} | {'chosen' if v == chosen else ''} |")
    md = (f"{args.method}, {key}, seeds {seeds} (final-epoch validation accuracy)\n\n| value | val acc | |\n|---|---|---|\n"
          + "\n".join(rows) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.method}{'_' + args.ablation if args.ablation else ''}_{key.replace('.', '_')}"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps({"method": args.method, "key": key, "seeds": seeds,
                                                  "scores": scores, "chosen": chosen}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
