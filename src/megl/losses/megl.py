"""MEGL's objective (docs/methods.md) and the CE-only baseline.

    L = CE + λ_text·L_text + λ_vis·[1_V·L1(Â, A) + w_KL·(1 − 1_V)·KL(Â ‖ Ā)]

(w_KL = config.kl_weight; the paper's form is w_KL = 1.)

Â is the Grad-CAM saliency of the ground-truth class, from the fused op, whose per-sample l1 (0 on samples without
a mask) and kl (0 on samples with one) are averaged over the batch. Ablation switches (paper Table 4):
use_visual (the L1 term), use_consistency (the KL term), use_text (SDTG's L_text). "Visual+Text" = consistency off,
"Text" / "Visual" = only that module, "-" = the baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import PARTS


def baseline_loss(model, batch, prior, config) -> dict:
    out = model.classifier(batch["image"])
    ce = F.cross_entropy(out.logits, batch["label"])
    return {"total": ce, "ce": ce.detach(), PARTS: {"ce": ce}}


def megl_loss(model, batch, prior, config) -> dict:
    image, label = batch["image"], batch["label"]
    out = model.classifier(image)
    ce = F.cross_entropy(out.logits, label)
    terms = {"ce": ce.detach()}
    parts = {"ce": ce}  # weighted summands of the total
    total = ce
    use_visual = config.use_visual and config.lambda_visual != 0
    use_consistency = config.use_consistency and config.lambda_visual != 0
    if use_consistency and prior is None:
        raise ValueError("megl_loss: the consistency (KL) term needs the prior Ā: pass "
                         "megl.data.mean_mask_prior(train_split), or set use_consistency=False")
    use_text = config.use_text and config.lambda_text != 0
    if not (use_visual or use_consistency or use_text):
        return {"total": total, **terms, PARTS: parts}
    sal = model.gradcam(out, image, label, batch["mask"], batch["has_mask"], prior if use_consistency else None)
    visual = torch.zeros((), device=ce.device)
    if use_visual:
        l1 = sal.l1.mean()
        visual = visual + l1
        terms["l1"] = l1.detach()
    if use_consistency:
        kl = sal.kl.mean()
        visual = visual + config.kl_weight * kl
        terms["kl"] = kl.detach()
    if use_visual or use_consistency:
        parts["visual"] = config.lambda_visual * visual
        total = total + parts["visual"]
        terms["visual"] = visual.detach()
    if use_text:
        text = model.text_loss(out, sal.masked, label, batch["rationale"])
        parts["text"] = config.lambda_text * text
        total = total + parts["text"]
        terms["text"] = text.detach()
    return {"total": total, **terms, PARTS: parts}
