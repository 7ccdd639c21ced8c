"""Triton backend of the fused saliency op: glue between the contract of `torch_explicit` and the kernels in
`triton_kernels.py` (a module of its own, imported here only if `triton` imports).

The kernels run compiled on a CUDA device, or on CPU tensors in Triton's interpreter when TRITON_INTERPRET=1
was set before megl was imported (kernels are defined at import time, interpreted or not; float32 only there).
"""
from __future__ import annotations

from typing import Optional

import torch

NAME = "triton"
INTERPRET_HINT = "set TRITON_INTERPRET=1 before importing megl to run Triton kernels on CPU"

try:
    from megl.ops.backends import triton_kernels as _kernels

    _IMPORT_ERROR: Optional[str] = None
except Exception as err:  # triton missing or broken (any import-time error): report why instead of failing
    _kernels = None
    _IMPORT_ERROR = f"{type(err).__name__}: {err}"


def availability(import_error: Optional[str], cuda_available: bool, interpreted: bool) -> tuple[bool, Optional[str]]:
    """Whether Triton kernels can run, and if not why (a message naming the fix). Pure: tests call it directly."""
    if import_error is not None:
        return False, f"triton is not importable ({import_error})"
    if not cuda_available and not interpreted:
        return False, f"no CUDA device and Triton's interpreter is off: {INTERPRET_HINT}"
    return True, None


def _decide() -> tuple[bool, Optional[str]]:
    interpreted = bool(_kernels is not None and _kernels.INTERPRET)
    return availability(_IMPORT_ERROR, torch.cuda.is_available(), interpreted)


_OK, UNAVAILABLE_REASON = _decide()


def available() -> bool:
    global _OK, UNAVAILABLE_REASON
    _OK, UNAVAILABLE_REASON = _decide()
    return _OK


def _check_device(A: torch.Tensor) -> None:
    if not available():
        raise RuntimeError(f"megl backend 'triton' is not available: {UNAVAILABLE_REASON}")
    if _kernels.INTERPRET:
        if A.dtype != torch.float32:
            raise TypeError(f"Triton's interpreter (TRITON_INTERPRET=1) runs float32 only here, got {A.dtype}: cast with .float()")
    elif A.device.type != "cuda":
        raise ValueError(
            f"megl backend 'triton' got {A.device.type} tensors but its kernels were compiled for the GPU "
            f"(TRITON_INTERPRET was not 1 when megl was imported): move the tensors to CUDA, or {INTERPRET_HINT}"
        )


def forward(A, G, I, mask, has_mask, prior, eps, eps_kl):
    _check_device(A)
    return _kernels.saliency_forward(A, G, I, mask, has_mask, prior, float(eps), float(eps_kl))


def backward(grad_s, grad_masked, grad_l1, grad_kl, A, G, I, mask, has_mask, prior, s, alpha, cam, stats, eps, eps_kl):
    _check_device(A)
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    return _kernels.saliency_backward(
        grad_s, grad_masked, f32(grad_l1), f32(grad_kl), A, G, I, mask, has_mask, prior, s, alpha, cam, stats,
        float(eps), float(eps_kl),
    )
