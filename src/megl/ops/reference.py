"""Pure-PyTorch fused saliency: the oracle every kernel backend is checked against.

Semantics (docs/fused-op.md), per sample b:
    alpha_k = mean_ij G_kij ;  z = sum_k alpha_k A_k ;  c = relu(z)
    n = (c - min c) / (max c - min c + eps)           (normalised at low resolution)
    s = bilinear_upsample(n, (H, W), align_corners=False)
    masked = image * s
    l1 = mean |s - mask|              (0 where has_mask is false or mask is None)
    kl = sum p log(p / q)             (0 where has_mask is true or prior is None)
         p = (s + eps_kl) / sum(s + eps_kl),  q = (prior + eps_kl) / sum(prior + eps_kl)
Everything here is differentiable by autograd, so it also serves `torch.autograd.gradcheck`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

EPS = 1e-8
EPS_KL = 1e-8


class SaliencyOutput(NamedTuple):
    saliency: torch.Tensor  # (B, H, W) in [0, 1]
    masked: torch.Tensor  # (B, C, H, W) = image * saliency
    l1: torch.Tensor  # (B,) per-sample L1 to the mask
    kl: torch.Tensor  # (B,) per-sample KL to the prior


def gradcam_lowres(activations: torch.Tensor, gradients: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Min-max normalised Grad-CAM at the resolution of the activations: (B, h, w)."""
    alpha = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((alpha * activations).sum(dim=1))
    lo = cam.amin(dim=(1, 2), keepdim=True)
    hi = cam.amax(dim=(1, 2), keepdim=True)
    return (cam - lo) / (hi - lo + eps)


def upsample(n: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) upsampling of (B, h, w) maps to (B, H, W)."""
    return F.interpolate(n.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def fused_saliency_reference(
    activations: torch.Tensor,
    gradients: torch.Tensor,
    image: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    has_mask: Optional[torch.Tensor] = None,
    prior: Optional[torch.Tensor] = None,
    *,
    eps: float = EPS,
    eps_kl: float = EPS_KL,
) -> SaliencyOutput:
    """The op's definition, on inputs as `fused_saliency` passes them (has_mask given with mask)."""
    assert mask is None or has_mask is not None, "fused_saliency fills has_mask in; pass it with mask"
    H, W = image.shape[-2:]
    B = image.shape[0]
    s = upsample(gradcam_lowres(activations, gradients, eps), (H, W))
    masked = image * s.unsqueeze(1)
    zeros = s.new_zeros(B)
    if mask is not None:
        l1 = torch.where(has_mask, (s - mask).abs().mean(dim=(1, 2)), zeros)
    else:
        l1 = zeros
    if prior is not None:
        p = s + eps_kl
        p = p / p.sum(dim=(1, 2), keepdim=True)
        q = prior + eps_kl
        q = q / q.sum()
        kl = (p * (p.log() - q.log())).sum(dim=(1, 2))
        kl = kl if has_mask is None else torch.where(has_mask, zeros, kl)
    else:
        kl = zeros
    return SaliencyOutput(s, masked, l1, kl)
