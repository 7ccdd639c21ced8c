"""`python -m megl.predict --run RUN_DIR IMAGE...`: label, probability, saliency overlay PNG, generated rationale.

Prints one JSON object per image: {"image", "label", "class_id", "probability", "overlay", "rationale"}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import Tensor

from megl.errors import UserError, cli
from megl.files import safe_stem
from megl.overlays import save_panel


def load_image(path, size: int) -> Tensor:
    from PIL import Image

    from megl.data.dataset import read_image_file

    try:
        return read_image_file(path, size).float() / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def predict(run, paths, out_dir, device="cpu", max_new_tokens=None) -> list[dict]:
    model = run.model
    images = torch.stack([load_image(p, run.config.image_size) for p in paths]).to(device)
    logits, sal = model.explain(images)
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    rationales = model.generate_rationales(images, pred, max_new_tokens=max_new_tokens)
    results, used = [], set()
    for i, p in enumerate(paths):
        png = Path(out_dir) / f"{safe_stem(Path(p).stem, used)}_saliency.png"  # a/x.png, b/x.png: two files
        save_panel(png, images[i], sal.saliency[i])
        c = int(pred[i])
        results.append({"image": str(p), "label": model.class_names[c], "class_id": c,
                        "probability": round(float(probs[i, c]), 6), "overlay": str(png), "rationale": rationales[i]})
    return results


@cli("megl.predict")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megl.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run directory written by python -m megl.train")
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--out", default=None, help="where overlay PNGs go (default RUN/predictions)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    args = ap.parse_args(argv)
    from megl.runs import check_device, load_run, require_saliency

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        ap.error(f"image file(s) not found: {', '.join(missing)}")
    check_device(args.device)
    require_saliency(args.run, "megl.predict")
    run = load_run(args.run, device=args.device)
    out_dir = Path(args.out) if args.out else Path(args.run) / "predictions"
    for r in predict(run, args.images, out_dir, args.device, args.max_new_tokens):
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
