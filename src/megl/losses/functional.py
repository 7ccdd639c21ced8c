"""The explanation losses as plain functions of a `megl.GradCAM` output, for a training loop of your own.

    cam = megl.GradCAM(model, "layer4")
    out = cam(images, labels)                       # explain the true class while training
    loss = F.cross_entropy(out.logits, labels) + 1.0 * megl.losses.gradia(out, masks, has_mask)

Each returns the explanation term alone (a scalar tensor; 0 when no sample is annotated); add the cross-entropy
and choose the weight yourself (the method modules' DEFAULTS hold the papers' λ). `mask` is (B, H, W) in [0, 1]
at the image's resolution, `has_mask` (B,) bool marks the annotated samples (default: all). They are thin
wrappers of the cores that `python -m megl.train --method ...` uses, so both give the same numbers.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .gradia import gradia_visual_loss
from .haics import DEFAULTS as HAICS_DEFAULTS
from .haics import haics_visual_loss
from .res import DEFAULTS as RES_DEFAULTS
from .res import ResImputation, gaussian_imputation, res_visual_loss
from .rrr import DEFAULTS as RRR_DEFAULTS, _math_attention, input_gradients, rrr_penalty


def _masks(out, mask: Tensor, has_mask: Optional[Tensor], who: str) -> tuple[Tensor, Tensor]:
    s = out.saliency
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(s.shape):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{who}: mask must be (B, H, W) = {tuple(s.shape)} like the saliency, got {got}; "
                         "resize masks with their images")
    if has_mask is None:
        has_mask = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    elif tuple(has_mask.shape) != (s.shape[0],):
        raise ValueError(f"{who}: has_mask must be ({s.shape[0]},) booleans, got shape {tuple(has_mask.shape)}")
    return mask.to(device=s.device, dtype=s.dtype), has_mask.to(s.device).bool()


def gradia(out, mask: Tensor, has_mask: Optional[Tensor] = None) -> Tensor:
    """GRADIA: mean over annotated samples of mean |Â − A| (the fused op's per-sample L1)."""
    mask, has_mask = _masks(out, mask, has_mask, "gradia")
    return gradia_visual_loss(out.terms(mask, has_mask).l1, has_mask)


def haics(out, mask: Tensor, has_mask: Optional[Tensor] = None, annotated_pixels: Optional[Tensor] = None,
          eps: float = HAICS_DEFAULTS["haics_eps"]) -> Tensor:
    """HAICS: mean BCE(Â, A) over the annotated pixels of the annotated samples."""
    mask, has_mask = _masks(out, mask, has_mask, "haics")
    return haics_visual_loss(out.saliency, mask, has_mask, annotated_pixels, eps=eps)


def res_g(out, mask: Tensor, has_mask: Optional[Tensor] = None, *, eta: float = RES_DEFAULTS["res_eta"],
          tanh_scale: float = RES_DEFAULTS["res_tanh_scale"], reg: float = RES_DEFAULTS["res_reg"]) -> Tensor:
    """RES-G: thresholded-explanation loss with slack η plus L1 to the Gaussian-imputed mask."""
    mask, has_mask = _masks(out, mask, has_mask, "res_g")
    imputed = gaussian_imputation(mask, out.cam_size)
    return res_visual_loss(out.saliency, mask, has_mask, imputed, eta=eta, tanh_scale=tanh_scale, reg=reg).visual


def res_l(out, mask: Tensor, has_mask: Optional[Tensor], imputation: nn.Module, *,
          eta: float = RES_DEFAULTS["res_eta"], tanh_scale: float = RES_DEFAULTS["res_tanh_scale"],
          reg: float = RES_DEFAULTS["res_reg"]) -> Tensor:
    """RES-L: as RES-G with a learnable imputation, `megl.losses.ResImputation(image_size // cam_size)`; put its
    parameters in the optimizer."""
    if not isinstance(imputation, nn.Module):
        raise TypeError("res_l: imputation must be an nn.Module such as megl.losses.ResImputation(ratio), with "
                        "ratio = image size // Grad-CAM size (out.image.shape[-1] // out.cam_size[-1])")
    mask, has_mask = _masks(out, mask, has_mask, "res_l")
    imputed = imputation(mask, out.cam_size).to(out.saliency.dtype)
    return res_visual_loss(out.saliency, mask, has_mask, imputed, eta=eta, tanh_scale=tanh_scale, reg=reg).visual


def visual(out, mask: Optional[Tensor] = None, has_mask: Optional[Tensor] = None,
           prior: Optional[Tensor] = None) -> Tensor:
    """MEGL's visual term: batch mean of L1(Â, A) on annotated samples and KL(Â ‖ prior) on the others
    (prior: the (H, W) mean mask, megl.data.mean_mask_prior). Either part may be omitted (mask / prior None)."""
    if mask is None and prior is None:
        raise ValueError("visual: give mask (the L1 term), prior (the KL term) or both")
    if mask is not None:
        mask, has_mask = _masks(out, mask, has_mask, "visual")
    elif has_mask is not None:
        raise ValueError("visual: has_mask was given without mask")
    if prior is not None and tuple(prior.shape) != tuple(out.saliency.shape[-2:]):
        raise ValueError(f"visual: prior must be (H, W) = {tuple(out.saliency.shape[-2:])}, got {tuple(prior.shape)}")
    terms = out.terms(mask, has_mask, prior)
    return terms.l1.mean() + terms.kl.mean()


def rrr(model: Callable[[Tensor], Tensor], images: Tensor, mask: Tensor, has_mask: Optional[Tensor] = None, *,
        logits: Optional[Tensor] = None, score: str = RRR_DEFAULTS["rrr_score"]) -> Tensor:
    """RRR on the input gradient g = ∂Σ log p̂ / ∂images (double backward), over annotated samples, / B.

    score="share" (megl's default): each image's share of Σ g² outside the mask; score="reference" (the paper):
    Σ ((1 − A) ⊙ g)². megl/losses/rrr.py says why the share is the default.

    Either pass `logits` computed from `images` (which must require grad: `images.requires_grad_()` before the
    forward, so one forward serves cross-entropy and RRR), or let it run `model(images)` itself."""
    if mask.dim() != 3 or mask.shape[0] != images.shape[0] or mask.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"rrr: mask must be (B, H, W) = {(images.shape[0], *images.shape[-2:])}, got {tuple(mask.shape)}")
    if has_mask is None:
        has_mask = torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
    if logits is None:
        images = images.detach().requires_grad_(True)
        with _math_attention():
            logits = model(images)
            logits = getattr(logits, "logits", logits)
    elif not images.requires_grad:
        raise ValueError("rrr: logits were given, so images must require grad and be their input "
                         "(images.requires_grad_() before the forward)")
    with _math_attention():
        grad = input_gradients(logits, images)
    return rrr_penalty(grad, mask.to(grad.dtype), has_mask.to(grad.device), score)


__all__ = ["ResImputation", "gradia", "haics", "res_g", "res_l", "rrr", "visual"]
