"""GRADIA (Gao et al., 2022, "Aligning eyes between humans and deep neural network through interactive attention
alignment", CSCW; EGL survey §3.2.1 and §5.1.6): cross-entropy plus an L1 loss between the model's Grad-CAM map
and the human positive mask, on the annotated samples only.

    L = CE(y, f(I)) + λ · mean_{b ∈ V} mean_pq |Â_b − A_b|

Â: differentiable Grad-CAM of the ground-truth class, min-max normalised (the fused op's saliency), A: mask.
Default λ = 30, chosen by megl.sweep on megl.train's default data (validation accuracy, 3 seeds, 1/3/10/30;
docs/recipe.md §3). The paper's λ is 1: the reference implementation adds the attention loss unweighted (`loss =
task_loss + attention_loss` in GRADIA.py and RES.py of github.com/YuyangGao/GRADIA / YuyangGao/RES), averaging
the L1 over the annotated samples and pixels; `--set method_args.gradia_lambda=1` gives it. The paper's Grad-CAM
map is 7×7 (labels resized to it); here the map is compared at image resolution after bilinear upsampling, as
MEGL does, so that all methods share one saliency.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from .common import cross_entropy, hparam, method_gradcam_pass, n_annotated, result

DEFAULTS = {"gradia_lambda": 30.0}


def gradia_visual_loss(per_sample_l1: Tensor, has_mask: Tensor) -> Tensor:
    """Mean of the per-sample L1 (mean_pq |Â − A|) over the annotated samples; 0 when none is annotated."""
    has_mask = has_mask.bool()
    return (per_sample_l1 * has_mask).sum() / n_annotated(has_mask)


def gradia_loss(model: torch.nn.Module, batch: Mapping[str, Any], prior: Any = None,
                config: Any = None) -> dict[str, Tensor]:
    p = method_gradcam_pass(model, batch, config, "gradia")
    ce = cross_entropy(p.logits, batch["label"])
    visual = gradia_visual_loss(p.saliency.l1, batch["has_mask"])
    return result(ce, visual, float(hparam(config, "gradia_lambda", DEFAULTS["gradia_lambda"])))
