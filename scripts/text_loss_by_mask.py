"""What does MEGL's text term ask of the saliency? L_text of a trained run with the LLM's image slot showing I ⊙ M
for several masks M, on the validation split of its synthetic data.

    python scripts/text_loss_by_mask.py RUN_DIR [RUN_DIR ...]

Masks: the human mask A (the object), the run's own Grad-CAM Â, the object and the decoy patch together (A ∪ box),
the decoy patch alone, everything but the object (1 − A), and the whole image. On a DecoyMNIST run (its `corners`
annotation: A is everything but the four corners) the decoy patch is the four corners, i.e. 1 − A. If
L_text(A ∪ box) ≈ L_text(A), the term cannot push a decoy out of a map that already shows the object; if
L_text(Â) ≈ L_text(A), the run's maps already satisfy it. `grad` is the mean ∂L_text/∂M per pixel over the object
and over the decoy patch at M = ½ everywhere (negative: showing more of it lowers the loss). Reads the validation
split only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def measure(run_dir: str) -> dict:
    from megl import runs
    from megl.data import collate
    from megl.data.synthetic import SyntheticConfig, decoy_box

    run = runs.load_run(run_dir)
    model, val = run.model, run.splits["val"]
    items = [val[i] for i in range(len(val))]
    batch = collate(items)
    image, label, A = batch["image"], batch["label"], batch["mask"].float()
    refs = [it["references"][0] for it in items]
    if run.config.data_root:  # DecoyMNIST on its `corners` annotation: the decoy is a swatch in one of the corners
        if not (Path(run.config.data_root) / "decoy.json").is_file():
            raise SystemExit(f"text_loss_by_mask: {run_dir} trained on {run.config.data_root}, neither the synthetic "
                             "data nor a DecoyMNIST conversion, so where its decoy lies is not known")
        box = 1 - A
    else:
        syn = SyntheticConfig(**run.config.synthetic)
        scale = image.shape[-1] / syn.image_size
        x0, y0, x1, y1 = (round(v * scale) for v in decoy_box(syn))
        box = torch.zeros_like(A)
        box[:, y0:y1, x0:x1] = 1
    with torch.no_grad():
        out = model.classifier(image)
    sal = model.explain(image, label)[1].saliency
    masks = {"A (object)": A, "Â (the run's)": sal.reshape(A.shape), "A ∪ decoy": torch.maximum(A, box),
             "decoy alone": box, "1 − A": 1 - A, "whole image": torch.ones_like(A)}

    def loss_and_grad(m: torch.Tensor) -> tuple[float, torch.Tensor]:
        m = m.detach().clone().requires_grad_(True)
        loss = model.text_loss(out, image * m.unsqueeze(1), label, refs)
        return float(loss.detach()), torch.autograd.grad(loss, m)[0]

    report = {name: round(loss_and_grad(m)[0], 3) for name, m in masks.items()}
    _, g = loss_and_grad(torch.full_like(A, 0.5))
    report["grad object"] = float((g * A).sum() / A.sum())
    report["grad decoy"] = float((g * box).sum() / box.sum())
    return {"run": str(run_dir), "rationale_prompt": run.config.rationale_prompt,
            "sdtg_image_tokens": run.config.sdtg_image_tokens, "L_text": report}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    torch.set_num_threads(1)
    for r in ap.parse_args().runs:
        print(json.dumps(measure(r), ensure_ascii=False), flush=True)
