"""Triton kernels of megl (imported by `megl.ops.backends.triton`; needs the `triton` package).

Set TRITON_INTERPRET=1 before importing this package to run the kernels on CPU tensors (interpreter, float32).
"""
from .saliency import INTERPRET, saliency_backward, saliency_forward

__all__ = ["INTERPRET", "saliency_backward", "saliency_forward"]
