"""RRR, "Right for the Right Reasons" (Ross, Hughes & Doshi-Velez, 2017, IJCAI; EGL survey §3.2.1 eq. 7):
penalise the input gradients of the log-probabilities inside the region the model should ignore.

    L = (1/B) Σ_b [ CE(y_b, f(I_b)) + λ₁ Σ_{c,p,q} ( R_bpq · ∂/∂I_bcpq Σ_k log p̂_bk )² ]

R = 1 − A on annotated samples (the irrelevant region; A is the human mask, broadcast over colour channels) and
R = 0 on unannotated ones, which therefore get cross-entropy only. The gradient is taken with respect to the raw
image in [0, 1] (the classifier normalises inside), with `create_graph=True` so the penalty trains the network
(double backward). Both sums run over the batch, as in the paper (Σ_n), so the total is divided by B.

Two scores (`method_args.rrr_score`):
- `reference`: the paper's sum above. The paper and its reference code use λ₁ = 1000 (github.com/dtak/rrr,
  `l2_grads=1000`) for DecoyMNIST's four corner squares; megl.decoy_mnist pins this score with its own λ.
- `share` (megl's default, our extension): each annotated image's *share* of its squared input gradient that lies
  outside the mask, Σ (R·g)² / Σ g², summed over annotated images and divided by B. The reference sum can be met
  by shrinking every input gradient at once, and on the quick Table 2 data it is (docs/recipe.md §6c): the squared
  gradient outside the mask falls ~100× against plain CE while the decoy box's share of it rises up to 5×, and the
  nets follow the decoy as often as plain CE. A share cannot be met by scale.

Defaults `share` and λ₁ = 1, chosen on validation accuracy (docs/recipe.md §3): on megl.train's default data
share λ₁ = 0.3 / 1 / 3 against the reference at its best λ₁ (10, of 1 … 1000) tie; on the quick Table 2 data
share λ₁ = 1 scores 0.901 ± 0.055 against the reference's 0.786 ± 0.059 at 1 and 0.672 ± 0.149 at 10. The
paper's third term, λ₂‖θ‖² (λ₂ = 1e-4), is plain weight decay and is left to the optimiser so that every method
shares it. (The EGL survey's re-run used λ₁ = 1.)
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import check_batch, classifier_of, cross_entropy, hparam, result, upcast

DEFAULTS = {"rrr_lambda": 1.0, "rrr_score": "share"}
SCORES = ("reference", "share")


def input_gradients(logits: Tensor, image: Tensor) -> Tensor:
    """∂/∂image of Σ_b Σ_k log softmax(logits)_bk, kept in the graph (create_graph=True)."""
    if not image.requires_grad:
        raise ValueError("rrr: the image must require grad and be the input the logits were computed from")
    (grad,) = torch.autograd.grad(F.log_softmax(upcast(logits), dim=1).sum(), image, create_graph=True)
    return grad


def rrr_penalty(grad: Tensor, mask: Tensor, has_mask: Tensor, score: str = DEFAULTS["rrr_score"]) -> Tensor:
    """reference: (1/B) Σ_b Σ_{c,p,q} ((1 − A_bpq) · grad_bcpq)² over annotated b. share: (1/B) Σ_b of
    Σ ((1 − A) · grad)² / Σ grad², each annotated image's share of its squared gradient outside the mask.
    grad: (B, C, H, W); mask: (B, H, W)."""
    if grad.shape[0] != mask.shape[0] or grad.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"rrr: gradients {tuple(grad.shape)} and mask {tuple(mask.shape)} do not match (B, ·, H, W)")
    if score not in SCORES:
        raise ValueError(f"rrr: rrr_score must be one of {', '.join(SCORES)}, got {score!r} "
                         "(--set method_args.rrr_score=reference)")
    irrelevant = (1.0 - mask.to(grad.dtype)) * has_mask.bool()[:, None, None].to(grad.dtype)
    outside = (irrelevant.unsqueeze(1) * grad) ** 2
    if score == "share":
        total = (grad ** 2).flatten(1).sum(1)
        return (outside.flatten(1).sum(1) / (total + torch.finfo(total.dtype).tiny)).sum() / grad.shape[0]
    return outside.sum() / grad.shape[0]


def _math_attention():
    """Double backward needs the math SDPA kernel (the fused ones have no second derivative)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def rrr_terms(forward: Callable[[Tensor], Tensor], image: Tensor, label: Tensor, mask: Tensor, has_mask: Tensor,
              lam: float = DEFAULTS["rrr_lambda"], score: str = DEFAULTS["rrr_score"]) -> dict[str, Tensor]:
    """CE + λ₁ · penalty for a function `forward(image) -> logits` (one forward pass serves both terms)."""
    x = image.detach().requires_grad_(True)
    with _math_attention():
        logits = forward(x)
        ce = cross_entropy(logits, label)
        if bool(has_mask.bool().any()):
            penalty = rrr_penalty(input_gradients(logits, x), mask, has_mask, score)
        else:
            penalty = logits.sum() * 0.0
    return result(ce, penalty, lam)


def rrr_loss(model: torch.nn.Module, batch: Mapping[str, Any], prior: Any = None,
             config: Any = None) -> dict[str, Tensor]:
    check_batch(batch, "rrr")
    clf = classifier_of(model, "rrr")
    lam = float(hparam(config, "rrr_lambda", DEFAULTS["rrr_lambda"]))
    score = str(hparam(config, "rrr_score", DEFAULTS["rrr_score"]))
    return rrr_terms(lambda x: clf(x).logits, batch["image"], batch["label"], batch["mask"], batch["has_mask"], lam,
                     score)
