"""The backend contract, written in plain PyTorch with the backward of docs/fused-op.md spelled out.

Every backend module (cpp, cuda, triton, this one) exposes the same two functions; the custom op in
`megl.ops.fused` calls them. Inputs arrive validated and contiguous:

    A, G      (B, K, h, w)  same dtype (float32; float16/bfloat16 allowed on GPU backends)
    I         (B, C, H, W)  same dtype as A
    mask      (B, H, W) float32 or None;  has_mask (B,) bool or None (never None when mask is given: fused.py
              fills the default, all annotated, in)
    prior     (H, W) float32 or None
    grad_s    (B, H, W) or None, grad_masked (B, C, H, W) or None  (None means zero)
    grad_l1, grad_kl (B,) float32, never None

forward  -> saliency (B,H,W) and masked (B,C,H,W) in I's dtype; l1, kl (B,), alpha (B,K), cam (B,h,w) = z
            (pre-relu), stats (B,4) = [min c, max c, sum(s + eps_kl), sum(prior + eps_kl)], all float32
            (float64 when the inputs are float64: only the torch backend takes those).
backward -> gA, gG in A's dtype, gI in I's dtype. Accumulate in float32 whatever the input dtype.

This module is also the portable fallback: it is what `backend="torch"` runs.
"""
from __future__ import annotations

import torch

from megl.ops.reference import upsample

NAME = "torch"


def available() -> bool:
    return True


def _upsample_adjoint(g, h, w):
    """Adjoint of bilinear upsampling (the gather that scatters g back to the low-res grid)."""
    B, H, W = g.shape
    gn = torch.ops.aten.upsample_bilinear2d_backward(g.unsqueeze(1), [H, W], [B, 1, h, w], False, None, None)
    return gn.squeeze(1)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(A, G, I, mask, has_mask, prior, eps, eps_kl):
    B, _, H, W = I.shape
    acc = acc_dtype(A.dtype)
    A32, G32, I32 = A.to(acc), G.to(acc), I.to(acc)
    alpha = G32.mean(dim=(2, 3))
    cam = torch.einsum("bk,bkhw->bhw", alpha, A32)
    c = cam.clamp_min(0)
    lo, hi = c.amin(dim=(1, 2)), c.amax(dim=(1, 2))
    n = (c - lo[:, None, None]) / (hi - lo + eps)[:, None, None]
    s = upsample(n, (H, W))
    masked = I32 * s.unsqueeze(1)
    zeros = s.new_zeros(B)
    l1 = torch.where(has_mask, (s - mask).abs().mean(dim=(1, 2)), zeros) if mask is not None else s.new_zeros(B)
    sum_p = (s + eps_kl).sum(dim=(1, 2))
    if prior is not None:
        sum_q = (prior + eps_kl).sum().expand(B)
        kl = _kl(s, prior, sum_p, sum_q, eps_kl)[0]
        if has_mask is not None:
            kl = torch.where(has_mask, zeros, kl)
    else:
        sum_q, kl = s.new_zeros(B), s.new_zeros(B)
    stats = torch.stack([lo, hi, sum_p, sum_q], dim=1)
    return s.to(I.dtype), masked.to(I.dtype), l1, kl, alpha, cam, stats


def backward(grad_s, grad_masked, grad_l1, grad_kl, A, G, I, mask, has_mask, prior, s, alpha, cam, stats, eps, eps_kl):
    B, C, H, W = I.shape
    h, w = cam.shape[-2:]
    acc = acc_dtype(A.dtype)
    A32, I32, s32 = A.to(acc), I.to(acc), s.to(acc)
    g_s = grad_s.to(acc).clone() if grad_s is not None else s32.new_zeros(B, H, W)
    if grad_masked is not None:
        g_s += (grad_masked.to(acc) * I32).sum(dim=1)
        gI = grad_masked.to(acc) * s32.unsqueeze(1)
    else:
        gI = torch.zeros_like(I32)
    if mask is not None:
        w_l1 = torch.where(has_mask, grad_l1.to(acc), s32.new_zeros(B)) / (H * W)
        g_s += w_l1[:, None, None] * torch.sign(s32 - mask)
    if prior is not None:
        w_kl = grad_kl.to(acc) if has_mask is None else torch.where(has_mask, s32.new_zeros(B), grad_kl.to(acc))
        kl, logpq = _kl(s32, prior, stats[:, 2], stats[:, 3], eps_kl)
        g_s += (w_kl / stats[:, 2])[:, None, None] * (logpq - kl[:, None, None])
    g_n = _upsample_adjoint(g_s, h, w)
    c = cam.clamp_min(0)
    lo, hi = stats[:, 0, None, None], stats[:, 1, None, None]
    d = hi - lo + eps
    n = (c - lo) / d
    g_m = (g_n * (n - 1) / d).sum(dim=(1, 2), keepdim=True)
    g_M = (-g_n * n / d).sum(dim=(1, 2), keepdim=True)
    at_min, at_max = (c == lo).float(), (c == hi).float()  # ties split evenly, as amin/amax do
    g_c = g_n / d + g_m * at_min / at_min.sum(dim=(1, 2), keepdim=True) + g_M * at_max / at_max.sum(dim=(1, 2), keepdim=True)
    g_z = g_c * (cam > 0)
    gA = alpha[:, :, None, None] * g_z.unsqueeze(1)
    gG = torch.einsum("bhw,bkhw->bk", g_z, A32)[:, :, None, None].expand_as(A32) / (h * w)
    return gA.to(A.dtype), gG.contiguous().to(G.dtype), gI.to(I.dtype)


def _kl(s, prior, sum_p, sum_q, eps_kl):
    """(KL(p ‖ q) per sample, log(p / q)) for p = (s + eps_kl) / sum_p, q = (prior + eps_kl) / sum_q: the two-pass
    form every backend uses (docs/fused-op.md, "KL in float32"), one log of the ratio."""
    p = (s + eps_kl) / sum_p[:, None, None]
    logpq = (p / ((prior + eps_kl) / sum_q[:, None, None])).log()
    return (p * logpq).sum(dim=(1, 2)), logpq
