"""HAICS (Shen et al., 2021, "Human-AI Interactive and Continuous Sensemaking: A Case Study of Image
Classification using Scribble Attention Maps", CHI EA; used as a baseline in RES, Gao et al. 2022 and in the MEGL
paper's Table 2): cross-entropy plus a binary cross-entropy between the Grad-CAM map and the human annotation on
the annotated pixels.

    L = CE(y, f(I)) + λ · (1/|P|) Σ_{(b,p,q) ∈ P} BCE(Â_bpq, A_bpq),   P = annotated pixels of annotated samples

In HAICS the annotation is a scribble map (some pixels marked relevant, some irrelevant, the rest unlabelled);
Object-ME / Action-ME masks label every pixel of an annotated image (1 relevant, 0 not), so P is every pixel of
every sample with has_mask, unless `annotated_pixels` says otherwise. Default λ = 30, chosen by megl.sweep on
megl.train's default data (docs/recipe.md §3); the paper's is 1 (the RES reference code, github.com/YuyangGao/RES,
`--transforms HAICS`, adds the BCE term unweighted).
Â is clamped to [ε, 1 − ε] (ε = 1e-4) before the log: Grad-CAM maps reach exactly 0 and 1 after min-max
normalisation, where BCE and its gradient are infinite.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import cross_entropy, hparam, method_gradcam_pass, result

DEFAULTS = {"haics_lambda": 30.0, "haics_eps": 1e-4}


def haics_visual_loss(saliency: Tensor, mask: Tensor, has_mask: Tensor, annotated_pixels: Optional[Tensor] = None,
                      eps: float = DEFAULTS["haics_eps"]) -> Tensor:
    """Mean BCE(Â, A) over the annotated pixels of the annotated samples; 0 when there are none.

    saliency, mask: (B, H, W) in [0, 1]; has_mask: (B,) bool; annotated_pixels: optional (B, H, W) {0,1}
    weights marking which pixels carry a label (default: all pixels of annotated samples).
    """
    if saliency.shape != mask.shape:
        raise ValueError(f"haics: saliency {tuple(saliency.shape)} and mask {tuple(mask.shape)} must have one shape")
    weight = has_mask.bool()[:, None, None].to(saliency.dtype).expand_as(saliency)
    if annotated_pixels is not None:
        weight = weight * annotated_pixels.to(saliency.dtype)
    bce = F.binary_cross_entropy(saliency.clamp(eps, 1.0 - eps), mask.to(saliency.dtype), reduction="none")
    return (bce * weight).sum() / weight.sum().clamp_min(1.0)


def haics_loss(model: torch.nn.Module, batch: Mapping[str, Any], prior: Any = None,
               config: Any = None) -> dict[str, Tensor]:
    p = method_gradcam_pass(model, batch, config, "haics")
    ce = cross_entropy(p.logits, batch["label"])
    eps = float(hparam(config, "haics_eps", DEFAULTS["haics_eps"]))
    visual = haics_visual_loss(p.saliency.saliency, batch["mask"], batch["has_mask"], eps=eps)
    return result(ce, visual, float(hparam(config, "haics_lambda", DEFAULTS["haics_lambda"])))
