"""Where Grad-CAM's gradients come from: the closed form for GAP + linear heads, autograd otherwise."""
from __future__ import annotations

import torch
from torch import Tensor


def gap_linear_gradcam_gradients(weight: Tensor, target: Tensor, spatial_shape: tuple[int, int]) -> Tensor:
    """d logit_target / d A for a global-average-pool + linear head: W[target, k] / (h w) at every pixel.

    weight: (num_classes, K) of the linear layer; target: (B,) class indices. Returns (B, K, h, w),
    differentiable w.r.t. `weight` (an expanded view: no memory for the h*w copies).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be (num_classes, K), got shape {tuple(weight.shape)}")
    if target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must be a (B,) integer tensor of class indices, got {tuple(target.shape)} {target.dtype}")
    h, w = spatial_shape
    g = weight[target.long()] / (h * w)
    return g[:, :, None, None].expand(-1, -1, h, w)


def autograd_gradcam_gradients(scores: Tensor, activations: Tensor, target: Tensor, create_graph: bool = True) -> Tensor:
    """d score_target / d activations by autograd (any head), kept in the graph when `create_graph`."""
    picked = scores.gather(1, target.long()[:, None]).sum()
    (grad,) = torch.autograd.grad(picked, activations, create_graph=create_graph)
    return grad
