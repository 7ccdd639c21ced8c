"""Faithfulness of a saliency map to the model (EGL survey §2.2.1; ERASER, DeYoung et al. 2020), for images.

For a sample x with target class y (default: the class the model predicts on x), a saliency map s and a
fraction k, let T_k be the ⌈k·H·W⌉ pixels with the highest saliency (ties broken by pixel order) and b a
baseline image. With p(y|·) = predict_proba(·)[y]:

    x \\ T_k  = x with the pixels of T_k replaced by b          (salient evidence removed)
    x | T_k   = x with every pixel outside T_k replaced by b    (only the salient evidence kept)

    comprehensiveness_k = p(y|x) − p(y | x \\ T_k)    higher = the map found what the model relies on
    sufficiency_k       = p(y|x) − p(y | x | T_k)     lower  = the salient pixels alone support the prediction

Comprehensiveness and sufficiency are the means over k ∈ `fractions` (default 5, 10, 20, 50 %), as ERASER
averages over its bins. A model whose output ignores the image scores exactly 0 on both.
Baselines: "mean" (each image's per-channel mean colour, the default: no out-of-range black patch), "zero",
a number, or a tensor broadcastable to (B, C, H, W).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

DEFAULT_FRACTIONS: tuple[float, ...] = (0.05, 0.10, 0.20, 0.50)


def _baseline(images: Tensor, baseline) -> Tensor:
    if isinstance(baseline, str):
        if baseline == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        if baseline == "zero":
            return torch.zeros_like(images)
        raise ValueError(f"unknown baseline {baseline!r}; use 'mean', 'zero', a number or a tensor")
    return torch.as_tensor(baseline, dtype=images.dtype, device=images.device).expand_as(images)


def top_fraction_mask(saliency: Tensor, fraction: float) -> Tensor:
    """(B, H, W) bool: the ⌈fraction·H·W⌉ most salient pixels of each map (stable order on ties)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    b, h, w = saliency.shape
    n = min(h * w, max(1, math.ceil(fraction * h * w - 1e-9)))
    order = torch.argsort(saliency.reshape(b, -1).float(), dim=1, descending=True, stable=True)
    keep = torch.zeros(b, h * w, dtype=torch.bool, device=saliency.device)
    keep.scatter_(1, order[:, :n], True)
    return keep.reshape(b, h, w)


@torch.no_grad()
def comprehensiveness_sufficiency(
    predict_proba: Callable[[Tensor], Tensor],
    images: Tensor,
    saliency: Tensor,
    target: Tensor | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    baseline="mean",
) -> dict[str, Tensor]:
    """Per-sample comprehensiveness and sufficiency (see the module docstring).

    predict_proba: images (B, C, H, W) -> class probabilities (B, num_classes).
    images (B, C, H, W); saliency (B, H, W) at image resolution; target (B,) or None (= predicted class).
    Returns {"comprehensiveness": (B,), "sufficiency": (B,), "target": (B,), "p_full": (B,),
             "comprehensiveness@k": (B,), "sufficiency@k": (B,) for each k}.
    """
    if images.dim() != 4 or saliency.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"images must be (B, C, H, W) and saliency (B, H, W) at the same size; got "
                         f"{tuple(images.shape)} and {tuple(saliency.shape)} (upsample the saliency first)")
    if not fractions:
        raise ValueError("fractions is empty; pass e.g. (0.05, 0.1, 0.2, 0.5)")

    def proba(x: Tensor) -> Tensor:
        p = predict_proba(x)
        if p.dim() != 2 or p.shape[0] != x.shape[0]:
            raise ValueError(f"predict_proba must return (B, num_classes) probabilities, got {tuple(p.shape)}")
        return p.float()

    p_full = proba(images)
    if target is None:
        target = p_full.argmax(1)
    target = target.to(p_full.device).long()
    pick = lambda p: p.gather(1, target[:, None])[:, 0]  # noqa: E731
    py = pick(p_full)
    base = _baseline(images, baseline)
    out: dict[str, Tensor] = {"target": target, "p_full": py}
    comps, suffs = [], []
    for k in fractions:
        top = top_fraction_mask(saliency.to(images.device), float(k))[:, None]  # (B, 1, H, W)
        comp = py - pick(proba(torch.where(top, base, images)))
        suff = py - pick(proba(torch.where(top, images, base)))
        out[f"comprehensiveness@{k:g}"], out[f"sufficiency@{k:g}"] = comp, suff
        comps.append(comp)
        suffs.append(suff)
    out["comprehensiveness"] = torch.stack(comps).mean(0)
    out["sufficiency"] = torch.stack(suffs).mean(0)
    return out
