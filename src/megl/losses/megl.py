"""MEGL's objective (docs/methods.md) and the CE-only baseline.

    L = CE + λ_text·L_text + λ_vis·[1_V·L1(Â, A) + w_KL·(1 − 1_V)·KL(Â ‖ Ā)] + λ_bg·L_bg

(w_KL = config.kl_weight; the paper's form is w_KL = 1. L_bg, `background_loss`, is megl's extension;
λ_bg = config.lambda_background = 0 is the paper's objective.)

Â is the Grad-CAM saliency of the ground-truth class, from the fused op, whose per-sample l1 (0 on samples without
a mask) and kl (0 on samples with one) are averaged over the batch. Ablation switches (paper Table 4):
use_visual (the L1 term), use_consistency (the KL term), use_text (SDTG's L_text). "Visual+Text" = consistency off,
"Text" / "Visual" = only that module, "-" = the baseline.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megl.config import BACKGROUND_MODES

SWAP_MODES = ("swap", "transplant")  # the modes that paste another annotated image's object

from .common import PARTS


def baseline_loss(model, batch, prior, config) -> dict:
    out = model.classifier(batch["image"])
    ce = F.cross_entropy(out.logits, batch["label"])
    return {"total": ce, "ce": ce.detach(), PARTS: {"ce": ce}}


def remove_object(image: torch.Tensor, mask: torch.Tensor, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """I ⊙ (1 − A) + c ⊙ A: the annotated region painted over with the batch's mean colour c, so what is left
    (background, decoys) is all the classifier can read. c is shared by the batch: a per-image fill would carry
    that image's decoy colour into the painted region."""
    keep = (1 - mask.to(image.dtype)).unsqueeze(1)  # (B, 1, H, W)
    if fill is None:
        fill = batch_colour(image)
    return image * keep + fill * (1 - keep)


def batch_colour(image: torch.Tensor) -> torch.Tensor:
    return image.detach().mean((0, 2, 3), keepdim=True)


def swap_composite(image: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor,
                   mode: str = "swap") -> tuple[torch.Tensor, torch.Tensor]:
    """(composites, donor indices): the object of image idx[k + 1] (cyclically) on the background of image idx[k],
    as `background_loss`'s swap modes build them; idx holds at least two annotated images."""
    donor = idx.roll(-1)
    paste = mask[donor].to(image.dtype)
    if mode == "transplant":
        paste = torch.maximum(paste, mask[idx].to(image.dtype))
        host = image[idx]
    else:
        host = remove_object(image[idx], mask[idx], batch_colour(image))
    paste = paste.unsqueeze(1)
    return host * (1 - paste) + image[donor] * paste, donor


def outside_l1(saliency: torch.Tensor, mask: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of Â over the pixels the mask leaves out (A = 0): the part of L1(Â, A) that says where the
    evidence must not be, without the part that asks Â to fill all of A (0 on samples without a mask)."""
    return torch.where(has_mask, (saliency * (1 - mask.to(saliency.dtype))).mean(dim=(1, 2)),
                       saliency.new_zeros(()))


def _logits(classifier, x: torch.Tensor) -> torch.Tensor:
    out = classifier(x)
    return getattr(out, "logits", out)  # megl's classifiers return an output object, plain models a tensor


def background_loss(classifier, image: torch.Tensor, mask: torch.Tensor, has_mask: Optional[torch.Tensor] = None,
                    label: Optional[torch.Tensor] = None, mode: str = "uniform") -> torch.Tensor:
    """The counterfactual the mask defines, on the annotated samples (0 when there are none):

    uniform: with its object painted out, an image is evidence for no class: mean KL(uniform ‖ p(· | I ⊙ (1 − A) +
             c ⊙ A)).
    swap:    annotated image k + 1's object pasted onto image k's background (its own object painted out) must be
             classified as the pasted object's label: mean CE. The composite still shows an object, so the network
             cannot tell counterfactuals from real images by the missing object, as it can under `uniform`.
    transplant: the same CE, but image k + 1 fills the union of both masks, so k's object region holds k + 1's
             own background instead of a flat colour. On textured or noisy images a painted region is a silhouette
             of k's object that marks every composite (docs/decoy_mnist.md); a decoy of k + 1 lying under k's
             object would be carried along, so it suits decoys away from the objects (corners).

    Grad-CAM terms cannot ask for either, because a cell over the object may read a decoy through its receptive
    field (docs/recipe.md §4)."""
    if mode not in BACKGROUND_MODES:
        raise ValueError(f"background: mode must be one of {', '.join(BACKGROUND_MODES)}, got {mode!r}")
    if has_mask is None:
        has_mask = torch.ones(image.shape[0], dtype=torch.bool, device=image.device)
    if tuple(mask.shape) != (image.shape[0], *image.shape[-2:]):
        raise ValueError(f"background: mask must be (B, H, W) = {(image.shape[0], *image.shape[-2:])} like the "
                         f"images, got {tuple(mask.shape)}")
    idx = has_mask.nonzero().squeeze(1)
    if mode in SWAP_MODES:
        if label is None:
            raise ValueError(f"background: mode {mode!r} needs the labels (label=...)")
        if idx.numel() < 2:  # no other object to paste
            return image.new_zeros(())
        composite, donor = swap_composite(image, mask, idx, mode)
        return F.cross_entropy(_logits(classifier, composite).float(), label[donor])
    if idx.numel() == 0:
        return image.new_zeros(())
    logits = _logits(classifier, remove_object(image[idx], mask[idx], batch_colour(image)))
    logp = F.log_softmax(logits.float(), dim=1)
    kl = -logp.mean(1) - torch.log(torch.tensor(float(logits.shape[1]), device=logp.device))
    return kl.mean()


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
    if config.lambda_background:
        bg = background_loss(model.classifier, image, batch["mask"], batch["has_mask"], label, config.background_mode)
        parts["background"] = config.lambda_background * bg
        total = total + parts["background"]
        terms["background"] = bg.detach()
    if not (use_visual or use_consistency or use_text):
        return {"total": total, **terms, PARTS: parts}
    sal = model.gradcam(out, image, label, batch["mask"], batch["has_mask"], prior if use_consistency else None)
    visual = torch.zeros((), device=ce.device)
    if use_visual:
        l1 = sal.l1.mean() if config.visual_l1 == "both" else outside_l1(sal.saliency, batch["mask"],
                                                                          batch["has_mask"]).mean()
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
