"""Triton backend vs the PyTorch reference (autograd), forward and all three input gradients.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before megl is imported), which
is the path CI exercises: these tests must run, not skip, without a GPU. The interpreter is slow, so the shape
grid is a covering subset (every value of B, K, (h, w), (H, W) at least once), 224x224 mostly at B=1.
"""
from __future__ import annotations

import pytest
import torch

from megl.ops import backends, fused_saliency, fused_saliency_reference
from megl.ops.backends import torch_explicit
from megl.ops.backends import triton as triton_backend

EPS, EPS_KL = 1e-8, 1e-8


def _inputs(B, K, h, w, H, W, *, C=3, seed=0, has_mask="mixed", prior="rand", mask=True):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(B, K, h, w, generator=gen)
    G = torch.randn(B, K, h, w, generator=gen)
    I = torch.rand(B, C, H, W, generator=gen)
    m = torch.rand(B, H, W, generator=gen) if mask else None
    sel = None
    if mask:
        sel = {"mixed": torch.arange(B) % 2 == 0, "none": torch.zeros(B, dtype=torch.bool),
               "all": torch.ones(B, dtype=torch.bool)}[has_mask]
    q = None
    if prior == "rand":
        q = torch.rand(H, W, generator=gen)
    elif prior == "zeros":  # a prior that is exactly zero on most of the image: log(eps_kl) terms
        q = torch.zeros(H, W)
        q[H // 3: H // 2, W // 4: W // 2] = torch.rand(H // 2 - H // 3, W // 2 - W // 4, generator=gen)
    return A, G, I, m, sel, q


def _grad_outputs(B, C, H, W, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, W, generator=gen), torch.randn(B, C, H, W, generator=gen),
            torch.randn(B, generator=gen), torch.randn(B, generator=gen))


def _run(fn, A, G, I, mask, has_mask, prior, grads):
    """Outputs and d(Σ grads · outputs)/d(A, G, I): random grad_outputs != 1 on every output."""
    A, G, I = (t.clone().requires_grad_(True) for t in (A, G, I))
    out = fn(A, G, I, mask, has_mask, prior)
    loss = sum((o * g).sum() for o, g in zip(out, grads))
    gA, gG, gI = torch.autograd.grad(loss, (A, G, I))
    return [o.detach() for o in out], (gA, gG, gI)


def _triton(*args):
    return fused_saliency(*args, eps=EPS, eps_kl=EPS_KL, backend="triton")


def _reference(*args):
    return fused_saliency_reference(*args, eps=EPS, eps_kl=EPS_KL)


def _assert_close(name, got, ref, rtol=1e-4, atol=1e-5):
    """|got - ref| <= atol * max(1, max|ref|) + rtol * |ref| (scale-aware: some gradients are ~1/eps)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, f"{name}: {got.shape}/{got.dtype} vs {ref.shape}/{ref.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs()
    bad = err > atol * scale + rtol * ref.abs()
    assert not bad.any(), f"{name}: max abs err {err.max().item():.3e} (max |ref| {scale:.3e}), {int(bad.sum())} bad"
    return err.max().item() / scale


def _compare(A, G, I, mask, has_mask, prior, grad_atol=1e-5):
    B, C, H, W = I.shape
    grads = _grad_outputs(B, C, H, W)
    out_t, g_t = _run(_triton, A, G, I, mask, has_mask, prior, grads)
    out_r, g_r = _run(_reference, A, G, I, mask, has_mask, prior, grads)
    for name, got, ref in zip(("saliency", "masked", "l1", "kl"), out_t, out_r):
        _assert_close(name, got, ref)
    for name, got, ref in zip(("grad activations", "grad gradients", "grad image"), g_t, g_r):
        _assert_close(name, got, ref, atol=grad_atol)
    return out_r, g_r


def test_triton_backend_is_available_on_cpu_with_interpreter():
    # conftest sets TRITON_INTERPRET=1: the interpreter path must really run here, never be skipped
    assert triton_backend.available(), triton_backend.UNAVAILABLE_REASON
    assert backends.is_available("triton")


# (B, K, h, w, H, W): every value of each factor at least once; 224x224 (4x2 tiles, the last ones partial) at B=1
SHAPES = [
    (1, 64, 7, 7, 224, 224),
    (1, 7, 5, 9, 224, 224),
    (3, 1, 7, 7, 33, 47),
    (3, 7, 7, 7, 33, 47),
    (3, 64, 5, 9, 33, 47),
    (1, 1, 1, 1, 33, 47),
    (3, 7, 1, 1, 33, 47),
]


@pytest.mark.parametrize("B,K,h,w,H,W", SHAPES)
def test_matches_reference(B, K, h, w, H, W):
    out_r, g_r = _compare(*_inputs(B, K, h, w, H, W, seed=B * 100 + K))
    if h * w > 1:  # the comparison would pass vacuously if everything were zero
        assert out_r[0].abs().max() > 0.5 and g_r[0].abs().max() > 0 and g_r[2].abs().max() > 0


@pytest.mark.parametrize(
    "case", ["no_annotated", "all_annotated", "prior_zeros", "mask_none", "prior_none", "both_none"]
)
def test_mask_and_prior_cases(case):
    kw = dict(no_annotated=dict(has_mask="none"), all_annotated=dict(has_mask="all"), prior_zeros=dict(prior="zeros"),
              mask_none=dict(mask=False), prior_none=dict(prior=None), both_none=dict(mask=False, prior=None))[case]
    A, G, I, mask, has_mask, prior = _inputs(3, 7, 5, 9, 33, 47, seed=7, **kw)
    out_r, _ = _compare(A, G, I, mask, has_mask, prior)
    l1, kl = out_r[2], out_r[3]
    if case == "no_annotated":
        assert (l1 == 0).all() and (kl > 0).all()
    if case == "all_annotated":
        assert (l1 > 0).all() and (kl == 0).all()
    if case in ("mask_none", "both_none"):
        assert (l1 == 0).all()


def test_constant_cam():
    # z = 0.5 * A0 + 0.5 * (8 - A0) = 4 exactly at every cell (small integers): min == max, n = 0, d = eps.
    # A varies over cells so that grad gradients = Σ g_z A / hw does not cancel to rounding noise.
    B, K, h, w, H, W = 2, 2, 5, 9, 33, 47
    a0 = torch.randint(0, 5, (B, 1, h, w), generator=torch.Generator().manual_seed(2)).float()
    A = torch.cat([a0, 8.0 - a0], dim=1)
    G = torch.full((B, K, h, w), 0.5)
    _, _, I, mask, has_mask, prior = _inputs(B, K, h, w, H, W, seed=3)
    # d = eps: g_c = (g_n - mean g_n) / eps cancels in float32, so ~1e-5 relative differences are expected
    out_r, g_r = _compare(A, G, I, mask, has_mask, prior, grad_atol=1e-4)
    assert (out_r[0] == 0).all()
    assert g_r[0].abs().max() > 1e3  # the 1/eps scale is real: the comparison above is scale-aware


def test_relu_kills_everything():
    B, K, h, w, H, W = 3, 7, 7, 7, 33, 47
    A = -torch.rand(B, K, h, w) - 0.1
    G = torch.rand(B, K, h, w) + 0.1  # alpha > 0 and A < 0: z < 0 everywhere
    _, _, I, mask, has_mask, prior = _inputs(B, K, h, w, H, W, seed=4)
    # d = eps: g_c = (g_n - mean g_n) / eps cancels in float32, so ~1e-5 relative differences are expected
    out_r, g_r = _compare(A, G, I, mask, has_mask, prior, grad_atol=1e-4)
    assert (out_r[0] == 0).all() and (g_r[0] == 0).all() and (g_r[1] == 0).all()


@pytest.mark.parametrize("which", ["only_s", "only_masked", "only_losses"])
def test_backward_with_missing_grad_outputs(which):
    """grad_s / grad_masked None (HAS_GRAD_* off) against the explicit-backward spec, on multi-tile small blocks."""
    from megl.kernels import saliency as kernels

    A, G, I, mask, has_mask, prior = _inputs(2, 7, 5, 9, 33, 47, seed=11)
    B, C, H, W = I.shape
    gs, gm, gl1, gkl = _grad_outputs(B, C, H, W, seed=5)
    gs = gs if which == "only_s" else None
    gm = gm if which == "only_masked" else None
    if which != "only_losses":
        gl1, gkl = torch.zeros(B), torch.zeros(B)
    fwd_ref = torch_explicit.forward(A, G, I, mask, has_mask, prior, EPS, EPS_KL)
    # 16x32 tiles: 3x2 tiles, the last row and column partial, so the tile reductions are exercised
    fwd = kernels.saliency_forward(A, G, I, mask, has_mask, prior, EPS, EPS_KL, block_r=16, block_c=32)
    for name, got, ref in zip(("s", "masked", "l1", "kl", "alpha", "cam", "stats"), fwd, fwd_ref):
        _assert_close(name, got, ref)
    s, _, _, _, alpha, cam, stats = fwd_ref
    args = (gs, gm, gl1, gkl, A, G, I, mask, has_mask, prior, s, alpha, cam, stats, EPS, EPS_KL)
    got = kernels.saliency_backward(*args, block_r=16, block_c=32)
    ref = torch_explicit.backward(*args)
    for name, g, r in zip(("gA", "gG", "gI"), got, ref):
        _assert_close(name, g, r)
    assert ref[0].abs().max() > 0
    assert (got[2] == 0).all() == (gm is None)


def test_deterministic():
    A, G, I, mask, has_mask, prior = _inputs(2, 7, 5, 9, 33, 47, seed=9)
    grads = _grad_outputs(2, 3, 33, 47)
    out1, g1 = _run(_triton, A, G, I, mask, has_mask, prior, grads)
    out2, g2 = _run(_triton, A, G, I, mask, has_mask, prior, grads)
    assert all(torch.equal(a, b) for a, b in zip(out1 + list(g1), out2 + list(g2)))


def test_unavailable_reason_when_interpreter_off():
    ok, reason = triton_backend.availability(None, cuda_available=False, interpreted=False)
    assert not ok
    assert "set TRITON_INTERPRET=1 before importing megl to run Triton kernels on CPU" in reason
    assert "no CUDA device" in reason
    ok, reason = triton_backend.availability("ModuleNotFoundError: No module named 'triton'", False, True)
    assert not ok and "triton is not importable" in reason and "No module named 'triton'" in reason
    assert triton_backend.availability(None, cuda_available=True, interpreted=False) == (True, None)
    assert triton_backend.availability(None, cuda_available=False, interpreted=True) == (True, None)


def test_registry_reports_the_reason(monkeypatch):
    """backends.load('triton') turns the reason into its error when the interpreter is off and no GPU exists."""
    monkeypatch.setattr(triton_backend._kernels, "INTERPRET", False)
    monkeypatch.setattr(triton_backend.torch.cuda, "is_available", lambda: False)
    with pytest.raises(backends.BackendUnavailable, match="set TRITON_INTERPRET=1 before importing megl"):
        backends.load("triton")


def test_rejects_cpu_tensors_when_compiled(monkeypatch):
    """Kernels compiled for the GPU (interpreter off at import) cannot take CPU tensors: say how to fix it."""
    monkeypatch.setattr(triton_backend._kernels, "INTERPRET", False)
    monkeypatch.setattr(triton_backend.torch.cuda, "is_available", lambda: True)
    A, G, I, mask, has_mask, prior = _inputs(1, 1, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 before importing megl"):
        triton_backend.forward(A, G, I, mask, has_mask, prior, EPS, EPS_KL)
