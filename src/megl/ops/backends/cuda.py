"""CUDA backend: the glue between torch tensors and the pybind11 module `megl._saliency_cuda`.

The extension does not link libtorch (it links the static CUDA runtime): it takes data pointers of contiguous CUDA
tensors (0 for an absent optional tensor), their shapes, a dtype code and the current torch stream as an integer,
and launches its kernels on that stream. Outputs and one float32 workspace are allocated here, with torch's caching
allocator on the current stream, so they are safe to free as soon as this returns. Same contract as
`torch_explicit.py`: A, G, I (and grad_s, grad_masked, s) in float32 / float16 / bfloat16, the rest float32;
arithmetic in float32. Results are deterministic (no atomics).
"""
from __future__ import annotations

import torch

from megl.ops.backends import import_extension

NAME = "cuda"

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Not built (no nvcc at install time, or MEGL_SKIP_CUDA=1) or stale.
_ext, _IMPORT_REASON = import_extension("_saliency_cuda")
UNAVAILABLE_REASON = _IMPORT_REASON


def available() -> bool:
    global UNAVAILABLE_REASON
    if _ext is None:
        UNAVAILABLE_REASON = _IMPORT_REASON
        return False
    if not torch.cuda.is_available():
        UNAVAILABLE_REASON = "torch.cuda.is_available() is False (no CUDA device visible, or a CPU-only torch build)"
        return False
    UNAVAILABLE_REASON = None
    return True


def _ptr(t: torch.Tensor | None, name: str, device: torch.device, dtype: torch.dtype | tuple = torch.float32) -> int:
    if t is None:
        return 0
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.device != device or t.dtype not in dtypes or not t.is_contiguous():
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"megl cuda backend: {name} must be a contiguous {want} tensor on {device}, got {t.dtype} on {t.device}"
            f"{'' if t.is_contiguous() else ' (not contiguous)'}; call it through megl.ops.fused_saliency, "
            "which converts its inputs"
        )
    return t.data_ptr()


def _check_inputs(A: torch.Tensor, G: torch.Tensor, I: torch.Tensor) -> int:
    if A.device.type != "cuda":
        raise ValueError(f"megl cuda backend needs CUDA tensors, got activations on {A.device}: move them with .cuda()")
    if A.dtype not in _DTYPE_CODES:
        raise TypeError(
            f"megl cuda backend takes float32, float16 or bfloat16, got {A.dtype}: cast with .float(), or use "
            "backend='torch' (which also takes float64)"
        )
    for name, t in (("gradients", G), ("image", I)):
        if t.dtype != A.dtype:
            raise TypeError(f"megl cuda backend: {name} are {t.dtype} but activations are {A.dtype}; pass one dtype")
    return _DTYPE_CODES[A.dtype]


def _f32(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=torch.float32).contiguous()


def forward(A, G, I, mask, has_mask, prior, eps, eps_kl):
    code = _check_inputs(A, G, I)
    B, K, h, w = A.shape
    _, C, H, W = I.shape
    dev = A.device
    with torch.cuda.device(dev):
        # locals, not temporaries: the kernels read them after _ptr has returned their address
        mask, prior = _f32(mask, dev), _f32(prior, dev)
        f32 = dict(dtype=torch.float32, device=dev)
        s, masked = torch.empty(B, H, W, dtype=I.dtype, device=dev), torch.empty_like(I)
        l1, kl, alpha = torch.empty(B, **f32), torch.empty(B, **f32), torch.empty(B, K, **f32)
        cam, stats = torch.empty(B, h, w, **f32), torch.empty(B, 4, **f32)
        if B == 0:
            return s, masked, l1, kl, alpha, cam, stats
        n_ws = _ext.forward_workspace(B, K, h, w, C, H, W)
        ws = torch.empty(n_ws, **f32)
        dt = A.dtype
        _ext.forward(
            code, B, K, h, w, C, H, W,
            _ptr(A, "activations", dev, dt), _ptr(G, "gradients", dev, dt), _ptr(I, "image", dev, dt),
            _ptr(mask, "mask", dev), _ptr(has_mask, "has_mask", dev, torch.bool), _ptr(prior, "prior", dev),
            float(eps), float(eps_kl),
            s.data_ptr(), masked.data_ptr(), l1.data_ptr(), kl.data_ptr(), alpha.data_ptr(), cam.data_ptr(),
            stats.data_ptr(), ws.data_ptr(), n_ws, dev.index, torch.cuda.current_stream(dev).cuda_stream,
        )
    return s, masked, l1, kl, alpha, cam, stats


def backward(grad_s, grad_masked, grad_l1, grad_kl, A, G, I, mask, has_mask, prior, s, alpha, cam, stats, eps, eps_kl):
    code = _check_inputs(A, G, I)
    B, K, h, w = A.shape
    _, C, H, W = I.shape
    dev, dt = A.device, A.dtype
    with torch.cuda.device(dev):
        # locals, not temporaries: the kernels read them after _ptr has returned their address
        cast = lambda t: None if t is None else t.to(device=dev, dtype=dt).contiguous()  # noqa: E731
        grad_s, grad_masked, s = cast(grad_s), cast(grad_masked), cast(s)
        grad_l1, grad_kl = _f32(grad_l1, dev), _f32(grad_kl, dev)
        alpha, cam, stats = _f32(alpha, dev), _f32(cam, dev), _f32(stats, dev)
        mask, prior = _f32(mask, dev), _f32(prior, dev)
        gA, gG, gI = torch.empty_like(A), torch.empty_like(G), torch.empty_like(I)
        if B == 0:
            return gA, gG, gI
        n_ws = _ext.backward_workspace(B, K, h, w, C, H, W)
        ws = torch.empty(n_ws, dtype=torch.float32, device=dev)
        _ext.backward(
            code, B, K, h, w, C, H, W,
            _ptr(grad_s, "grad_s", dev, dt), _ptr(grad_masked, "grad_masked", dev, dt),
            _ptr(grad_l1, "grad_l1", dev), _ptr(grad_kl, "grad_kl", dev),
            _ptr(A, "activations", dev, dt), _ptr(I, "image", dev, dt), _ptr(mask, "mask", dev),
            _ptr(has_mask, "has_mask", dev, torch.bool), _ptr(prior, "prior", dev), _ptr(s, "saliency", dev, dt),
            _ptr(alpha, "alpha", dev), _ptr(cam, "cam", dev), _ptr(stats, "stats", dev), float(eps), float(eps_kl),
            gA.data_ptr(), gG.data_ptr(), gI.data_ptr(), ws.data_ptr(), n_ws, dev.index,
            torch.cuda.current_stream(dev).cuda_stream,
        )
    return gA, gG, gI
