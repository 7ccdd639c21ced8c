"""C++/OpenMP CPU backend: the glue between torch tensors and the pybind11 module `megl._saliency_cpu`.

The extension does not link libtorch: it takes data pointers of contiguous float32 CPU tensors (0 for an absent
optional tensor), their shapes, and outputs preallocated here. Same contract as `torch_explicit.py`.
It runs on `torch.get_num_threads()` OpenMP threads; results do not depend on the thread count.
"""
from __future__ import annotations

import torch

from megl.ops.backends import import_extension

NAME = "cpp"

# Not built or stale: the registry reports the reason and how to build it.
_ext, UNAVAILABLE_REASON = import_extension("_saliency_cpu")


def available() -> bool:
    return _ext is not None


def _ptr(t: torch.Tensor | None, name: str, dtype: torch.dtype = torch.float32) -> int:
    if t is None:
        return 0
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(
            f"megl cpp backend: {name} must be a contiguous {dtype} CPU tensor, got {t.dtype} on {t.device}"
            f"{'' if t.is_contiguous() else ' (not contiguous)'}; call it through megl.ops.fused_saliency, "
            "which converts its inputs"
        )
    return t.data_ptr()


def forward(A, G, I, mask, has_mask, prior, eps, eps_kl):
    B, K, h, w = A.shape
    _, C, H, W = I.shape
    f32 = dict(dtype=torch.float32)
    s, masked = torch.empty(B, H, W, **f32), torch.empty(B, C, H, W, **f32)
    l1, kl, alpha = torch.empty(B, **f32), torch.empty(B, **f32), torch.empty(B, K, **f32)
    cam, stats = torch.empty(B, h, w, **f32), torch.empty(B, 4, **f32)
    _ext.forward(
        _ptr(A, "activations"), _ptr(G, "gradients"), _ptr(I, "image"), _ptr(mask, "mask"),
        _ptr(has_mask, "has_mask", torch.bool), _ptr(prior, "prior"), B, K, h, w, C, H, W, float(eps), float(eps_kl),
        s.data_ptr(), masked.data_ptr(), l1.data_ptr(), kl.data_ptr(), alpha.data_ptr(), cam.data_ptr(),
        stats.data_ptr(), torch.get_num_threads(),
    )
    return s, masked, l1, kl, alpha, cam, stats


def backward(grad_s, grad_masked, grad_l1, grad_kl, A, G, I, mask, has_mask, prior, s, alpha, cam, stats, eps, eps_kl):
    B, K, h, w = A.shape
    _, C, H, W = I.shape
    # locals, not temporaries: the extension reads them after _ptr has returned their address
    grad_l1, grad_kl = grad_l1.to(torch.float32).contiguous(), grad_kl.to(torch.float32).contiguous()
    gA, gG, gI = torch.empty_like(A), torch.empty_like(G), torch.empty_like(I)
    _ext.backward(
        _ptr(grad_s, "grad_s"), _ptr(grad_masked, "grad_masked"), _ptr(grad_l1, "grad_l1"),
        _ptr(grad_kl, "grad_kl"), _ptr(A, "activations"), _ptr(I, "image"), _ptr(mask, "mask"),
        _ptr(has_mask, "has_mask", torch.bool), _ptr(prior, "prior"), _ptr(s, "saliency"), _ptr(alpha, "alpha"),
        _ptr(cam, "cam"), _ptr(stats, "stats"), B, K, h, w, C, H, W, float(eps), float(eps_kl),
        gA.data_ptr(), gG.data_ptr(), gI.data_ptr(), torch.get_num_threads(),
    )
    return gA, gG, gI
