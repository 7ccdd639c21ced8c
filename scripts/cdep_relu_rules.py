"""What each CD ReLU rule charges to the swatch, on trained DecoyMNIST runs, beside what the swatch really does.

For each run: the validation digits with their swatch; CD of the four corners under the reference rule and under
megl's `group` rule, scored as CDEP's centred score mean_c |β_c − mean_c β| (the group's effect on the logits'
differences); and the swatch's real effect, the same statistic of logits(with swatch) − logits(without swatch),
with the val accuracy with and without it. A rule that hides the swatch charges it far less than its real effect.

    python scripts/cdep_relu_rules.py runs/decoy-mnist/runs/mlp_cdep_seed0_<hash> ... [--mnist DIR] [--n 500]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from megl.data.mnist import corners_mask
from megl.decoy_mnist import _tensor, load_model, mnist_dir, run_construction, splits_of
from megl.losses.cdep import _resnet_and_input, contextual_decomposition


def centred(t: torch.Tensor) -> float:
    return float((t - t.mean(1, keepdim=True)).abs().mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--mnist")
    p.add_argument("--n", type=int, default=500, help="validation digits (default 500)")
    args = p.parse_args()
    rows = []
    for run in map(Path, args.runs):
        data = run_construction(run)
        val = splits_of(mnist_dir(args.mnist), data)["val"][1]
        model = load_model(run)
        clf = model.classifier
        x, clean = _tensor(val.images[:args.n]), _tensor(val.clean[:args.n])
        y = torch.from_numpy(val.labels[:args.n])
        corners = (1.0 - torch.from_numpy(corners_mask(data["swatch"]))).expand(len(x), -1, -1)
        with torch.no_grad():
            logits, logits_clean = clf(x).logits, clf(clean).logits
            net, xin = _resnet_and_input(clf, x)
            charged = {rule: centred(contextual_decomposition(net, xin, corners, rule)[0])
                       for rule in ("reference", "group")}
        c = json.loads((run / "config.json").read_text())
        rows.append({"run": run.name, "method_args": c.get("method_args"), "mlp_input": c.get("mlp_input"),
                     "val": float((logits.argmax(1) == y).float().mean()),
                     "val_clean": float((logits_clean.argmax(1) == y).float().mean()),
                     "swatch_effect": centred(logits - logits_clean),
                     "charged_reference": charged["reference"], "charged_group": charged["group"]})
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
