"""Fused differentiable Grad-CAM saliency, masked image and explanation losses (docs/fused-op.md)."""
from .backends import BackendUnavailable, available_backends
from .fused import fused_saliency, resolve_backend
from .gradcam import autograd_gradcam_gradients, gap_linear_gradcam_gradients
from .reference import SaliencyOutput, fused_saliency_reference

__all__ = [
    "BackendUnavailable", "SaliencyOutput", "autograd_gradcam_gradients", "available_backends", "fused_saliency",
    "fused_saliency_reference", "gap_linear_gradcam_gradients", "resolve_backend",
]
