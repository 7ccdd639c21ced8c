"""`fused_saliency`: validation, backend dispatch and the `torch.library` custom op with autograd.

The op is registered as `megl::fused_saliency_fwd` / `megl::fused_saliency_bwd` so that code calling it
compiles with `torch.compile(fullgraph=True)`: the compiler sees two opaque ops with fake (shape-only)
implementations, and backend resolution ("auto") happens inside them, at run time.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends.torch_explicit import acc_dtype
from .reference import EPS, EPS_KL, SaliencyOutput, fused_saliency_reference

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_auto_choice: dict[tuple, str] = {}


# ----------------------------------------------------------------------------- dispatch
def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, key: tuple = ()) -> str:
    """The concrete backend for `backend` ('auto' or a name) on this device and dtype."""
    if backend != "auto":
        _check_backend_dtype(backend, device, dtype)
        return backend
    if dtype == torch.float64:
        return "torch"  # kernels are single precision; the explicit-backward PyTorch path is exact
    if device.type == "cpu":
        return "cpp" if dtype == torch.float32 and backends.is_available("cpp") else "torch"
    if device.type == "cuda":
        candidates = [b for b in ("cuda", "triton") if backends.is_available(b)]
        if len(candidates) <= 1:
            return candidates[0] if candidates else "torch"
        return _auto_choice.get((device.index, dtype) + key, "")  # "" -> measured by the caller
    return "torch"


def _check_backend_dtype(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    if backend == "torch":
        return
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got {device.type} tensors: move them with .cuda() or use backend='cpp'")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, got {device.type}: use backend='cuda' or 'triton' there")
    allowed = GPU_DTYPES if device.type == "cuda" else (torch.float32,)
    if dtype not in allowed:
        raise TypeError(
            f"backend {backend!r} on {device.type} takes {', '.join(str(d).split('.')[-1] for d in allowed)}, got {dtype}: "
            "cast with .float(), or use backend='torch' / 'reference' (which also take float64)"
        )


def _measure_fastest(candidates, args) -> str:
    """Time each GPU backend's forward on the real inputs once; the fastest wins for this shape."""
    timings = {}
    for name in candidates:
        mod = backends.load(name)
        mod.forward(*args)  # warm-up (compiles Triton kernels)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            mod.forward(*args)
        end.record()
        torch.cuda.synchronize()
        timings[name] = start.elapsed_time(end)
    return min(timings, key=timings.get)


def _concrete(backend: str, A: Tensor, I: Tensor, args) -> str:
    key = (tuple(A.shape), tuple(I.shape))
    name = resolve_backend(backend, A.device, A.dtype, key)
    if name == "":
        name = _measure_fastest(("cuda", "triton"), args)
        _auto_choice[(A.device.index, A.dtype) + key] = name
    return name


def _check_finite(A: Tensor, G: Tensor, alpha: Tensor, cam: Tensor) -> None:
    """NaN/Inf in the inputs propagate into alpha (from G) or cam (from A and alpha): checking those small
    outputs costs microseconds, where scanning A and G costs a pass over both. On a GPU the check is one
    host sync per forward (one combined flag); MEGL_CHECK_FINITE=0 removes it."""
    if os.environ.get("MEGL_CHECK_FINITE", "1") == "0":
        return
    if bool(torch.isfinite(alpha).all() & torch.isfinite(cam).all()):
        return
    culprit = "gradients" if not bool(torch.isfinite(G).all()) else "activations"
    raise ValueError(
        f"fused_saliency: {culprit} contain NaN or Inf; the model diverged or its input is corrupt "
        "(lower the learning rate, check the data; MEGL_CHECK_FINITE=0 skips this check)"
    )


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("megl::fused_saliency_fwd", mutates_args=())
def _fwd(
    A: Tensor, G: Tensor, I: Tensor, mask: Optional[Tensor], has_mask: Optional[Tensor], prior: Optional[Tensor],
    eps: float, eps_kl: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    assert mask is None or has_mask is not None, "fused_saliency fills has_mask in"
    args = (A, G, I, mask, has_mask, prior, eps, eps_kl)
    out = tuple(backends.load(_concrete(backend, A, I, args)).forward(*args))
    _check_finite(A, G, alpha=out[4], cam=out[5])
    return out


@_fwd.register_fake
def _(A, G, I, mask, has_mask, prior, eps, eps_kl, backend):
    B, K, h, w = A.shape
    f32 = dict(dtype=acc_dtype(A.dtype), device=A.device)
    return (
        I.new_empty(B, *I.shape[-2:]), torch.empty_like(I), A.new_empty(B, **f32), A.new_empty(B, **f32),
        A.new_empty(B, K, **f32), A.new_empty(B, h, w, **f32), A.new_empty(B, 4, **f32),
    )


@torch.library.custom_op("megl::fused_saliency_bwd", mutates_args=())
def _bwd(
    grad_s: Optional[Tensor], grad_masked: Optional[Tensor], grad_l1: Tensor, grad_kl: Tensor,
    A: Tensor, G: Tensor, I: Tensor, mask: Optional[Tensor], has_mask: Optional[Tensor], prior: Optional[Tensor],
    s: Tensor, alpha: Tensor, cam: Tensor, stats: Tensor, eps: float, eps_kl: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    name = _concrete(backend, A, I, (A, G, I, mask, has_mask, prior, eps, eps_kl))
    return tuple(
        backends.load(name).backward(
            grad_s, grad_masked, grad_l1, grad_kl, A, G, I, mask, has_mask, prior, s, alpha, cam, stats, eps, eps_kl
        )
    )


@_bwd.register_fake
def _(grad_s, grad_masked, grad_l1, grad_kl, A, G, I, *rest):
    return torch.empty_like(A), torch.empty_like(G), torch.empty_like(I)


def _setup_context(ctx, inputs, output):
    A, G, I, mask, has_mask, prior, eps, eps_kl, backend = inputs
    s, _, _, _, alpha, cam, stats = output
    ctx.save_for_backward(A, G, I, mask, has_mask, prior, s, alpha, cam, stats)
    ctx.consts = (eps, eps_kl, backend)
    # an output that gets no gradient (often the saliency) arrives as None, not as a zero tensor to fill and read
    ctx.set_materialize_grads(False)


def _backward(ctx, g_s, g_masked, g_l1, g_kl, *_unused):
    A, G, I, mask, has_mask, prior, s, alpha, cam, stats = ctx.saved_tensors
    B = A.shape[0]
    zeros = lambda g: g.to(stats.dtype).contiguous() if g is not None else stats.new_zeros(B)  # noqa: E731
    gA, gG, gI = _bwd(
        None if g_s is None else g_s.contiguous(), None if g_masked is None else g_masked.contiguous(),
        zeros(g_l1), zeros(g_kl), A, G, I, mask, has_mask, prior, s, alpha, cam, stats, *ctx.consts,
    )
    return gA, gG, gI, None, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def _validate(A, G, I, mask, has_mask, prior):
    for name, t in (("activations", A), ("gradients", G), ("image", I)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fused_saliency: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"fused_saliency: {name} must be 4-D (B, channels, height, width), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"fused_saliency: {name} must be a floating-point tensor, got {t.dtype}: cast with .float()")
    if A.shape != G.shape:
        raise ValueError(f"fused_saliency: gradients {tuple(G.shape)} must have the shape of activations {tuple(A.shape)}")
    B, _, h, w = A.shape
    _, _, H, W = I.shape
    if I.shape[0] != B:
        raise ValueError(f"fused_saliency: batch sizes differ: activations have B={B}, image has B={I.shape[0]}")
    if H < h or W < w:
        raise ValueError(f"fused_saliency: image {H}x{W} is smaller than the Grad-CAM map {h}x{w}; pass the input image, not a feature map")
    if has_mask is not None and mask is None:
        raise ValueError("fused_saliency: has_mask was given without mask; pass the (B, H, W) masks too, or drop has_mask")
    if mask is not None and tuple(mask.shape) != (B, H, W):
        raise ValueError(f"fused_saliency: mask must have shape (B, H, W) = {(B, H, W)}, got {tuple(mask.shape)}; resize masks with their image")
    if has_mask is not None and tuple(has_mask.shape) != (B,):
        raise ValueError(f"fused_saliency: has_mask must have shape (B,) = ({B},), got {tuple(has_mask.shape)}")
    if prior is not None and tuple(prior.shape) != (H, W):
        raise ValueError(f"fused_saliency: prior must have shape (H, W) = {(H, W)}, got {tuple(prior.shape)}")
    for name, t in (("gradients", G), ("image", I), ("mask", mask), ("has_mask", has_mask), ("prior", prior)):
        if t is not None and t.device != A.device:
            raise ValueError(f"fused_saliency: {name} is on {t.device} but activations are on {A.device}; move all inputs to one device")


def fused_saliency(
    activations: Tensor,
    gradients: Tensor,
    image: Tensor,
    mask: Optional[Tensor] = None,
    has_mask: Optional[Tensor] = None,
    prior: Optional[Tensor] = None,
    *,
    eps: float = EPS,
    eps_kl: float = EPS_KL,
    backend: str = "auto",
) -> SaliencyOutput:
    """Differentiable Grad-CAM saliency, the masked image and the L1 / KL explanation losses in one op.

    activations, gradients: (B, K, h, w) of the Grad-CAM layer (gradients of the target class score).
    image: (B, C, H, W). mask: (B, H, W) human explanations in [0, 1]; has_mask: (B,) bool, which samples
    carry one (default: all, when mask is given). prior: (H, W) mean mask for the KL term.
    Returns (saliency (B,H,W), masked (B,C,H,W), l1 (B,), kl (B,)); differentiable w.r.t. activations,
    gradients and image. backend: 'auto' (env MEGL_BACKEND overrides), 'reference', 'torch', 'cpp',
    'cuda' or 'triton'.
    """
    _validate(activations, gradients, image, mask, has_mask, prior)
    if backend == "auto":
        backend = os.environ.get("MEGL_BACKEND", "auto")
    if backend not in backends.NAMES + ("auto",):
        raise ValueError(f"unknown megl backend {backend!r}; choose one of {', '.join(backends.NAMES)} or 'auto'")
    dtype = activations.dtype
    gradients, image = gradients.to(dtype), image.to(dtype)
    if mask is not None and has_mask is None:  # the one place the default is filled in: every backend gets has_mask
        has_mask = torch.ones(image.shape[0], dtype=torch.bool, device=image.device)
    if has_mask is not None:
        has_mask = has_mask.to(torch.bool).contiguous()
    if backend == "reference":
        return fused_saliency_reference(activations, gradients, image, mask, has_mask, prior, eps=eps, eps_kl=eps_kl)
    if backend != "auto":
        _check_backend_dtype(backend, activations.device, dtype)
    acc = acc_dtype(dtype)
    f32 = lambda t: None if t is None else t.to(acc).contiguous()  # noqa: E731
    s, masked, l1, kl, *_ = _fwd(
        activations.contiguous(), gradients.contiguous(), image.contiguous(), f32(mask), has_mask,
        f32(prior), float(eps), float(eps_kl), backend,
    )
    return SaliencyOutput(s, masked, l1, kl)
