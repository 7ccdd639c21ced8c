"""Kernel suite (issue 2): the fused saliency op, forward and forward+backward, every backend against the eager
PyTorch reference and `torch.compile(reference)`.

CPU: B=16, K=512, 7x7 -> 224x224, fp32 (the shapes of ResNet18 layer4 at 224 px, a training batch).
CUDA (when present): B=64, fp32 and bf16, plus achieved bandwidth against the card's peak (byte model:
`benchutil.fused_bytes`). Half the batch carries a mask (L1 term), the other half uses the prior (KL term).
The backward seeds the masked image and both losses (what MEGL's training step back-propagates: the masked
image feeds CLIP in SDTG, the losses the visual term); `saliency` itself gets no gradient.

Backends come from `megl.ops.available_backends()` at run time; the ones missing here are skipped with the
reason megl gives. Triton is timed on CUDA only (see benchutil.triton_skip_reason).
"""
from __future__ import annotations

import pytest
import torch

import benchutil
from megl import ops
from megl.ops import backends as _backends

VARIANTS = ["reference", "compiled", "torch", "cpp", "cuda", "triton"]
LABEL = {
    "reference": "eager reference",
    "compiled": "torch.compile(reference)",
    "torch": "torch (explicit backward)",
    "cpp": "cpp (C++/OpenMP)",
    "cuda": "cuda (CUDA C++)",
    "triton": "triton",
}


def _configs():
    out = []
    for device in benchutil.devices():
        if device == "cpu":
            out.append(pytest.param("cpu", torch.float32, id="cpu-fp32"))
        else:
            out.append(pytest.param("cuda", torch.float32, id="cuda-fp32"))
            out.append(pytest.param("cuda", torch.bfloat16, id="cuda-bf16"))
    return out


def _shape(device):
    if benchutil.quick():
        return dict(B=4, K=64, h=7, w=7, C=3, H=56, W=56)
    if device == "cpu":
        return dict(B=16, K=512, h=7, w=7, C=3, H=224, W=224)
    return dict(B=64, K=512, h=7, w=7, C=3, H=224, W=224)


def make_inputs(device, dtype, B, K, h, w, C, H, W, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, K, h, w, generator=g).relu_()  # post-ReLU activations, like layer4's
    G = torch.randn(B, K, h, w, generator=g) * 1e-3
    I = torch.rand(B, C, H, W, generator=g)
    mask = (torch.rand(B, H, W, generator=g) > 0.7).float()
    has_mask = torch.arange(B) % 2 == 0
    prior = torch.rand(H, W, generator=g) + 0.1
    A, G, I = (t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (A, G, I))
    return A, G, I, mask.to(device), has_mask.to(device), prior.to(device)


def _skip_reason(variant, device, dtype):
    if variant in ("reference", "compiled"):
        return None
    if variant == "triton":
        reason = benchutil.triton_skip_reason(device)
        if reason:
            return reason
    if variant == "cpp" and device != "cpu":
        return "the cpp backend runs on CPU tensors only"
    if variant == "cuda" and device != "cuda":
        return "the cuda backend needs a CUDA device"
    if variant == "cpp" and dtype != torch.float32:
        return "the cpp backend takes float32 only"
    try:
        _backends.load(variant)
    except _backends.BackendUnavailable as err:
        return str(err)
    return None


def _op(variant):
    if variant == "reference":
        return ops.fused_saliency_reference
    if variant == "compiled":
        torch._dynamo.reset()  # fresh caches: one compile per test, never the recompile limit
        return torch.compile(ops.fused_saliency_reference, dynamic=False)
    return lambda *args: ops.fused_saliency(*args, backend=variant)


def _tolerance(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("direction", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device,dtype", _configs())
def test_fused_saliency(benchmark, device, dtype, variant, direction):
    reason = _skip_reason(variant, device, dtype)
    if reason:
        pytest.skip(reason)
    shape = _shape(device)
    B, K, h, w, C, H, W = (shape[k] for k in "B K h w C H W".split())
    bwd = direction == "fwdbwd"
    A, G, I, mask, has_mask, prior = make_inputs(device, dtype, **shape, requires_grad=bwd)
    op = _op(variant)

    # Correctness first: a fast wrong kernel is no result. Compared with the fp32 reference.
    ref = ops.fused_saliency_reference(A.detach().float(), G.detach().float(), I.detach().float(), mask, has_mask, prior)
    with torch.no_grad():
        out = op(A.detach(), G.detach(), I.detach(), mask, has_mask, prior)
    for name, a, b in zip(("saliency", "masked", "l1", "kl"), out, ref):
        torch.testing.assert_close(a.float(), b, **_tolerance(dtype), msg=lambda m: f"{variant} {name}: {m}")

    if bwd:
        g_masked = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        g_loss = torch.ones(B, device=device, dtype=torch.float32)

        def fn():
            o = op(A, G, I, mask, has_mask, prior)
            return torch.autograd.grad((o.masked, o.l1, o.kl), (A, G, I), (g_masked, g_loss.to(o.l1.dtype), g_loss.to(o.kl.dtype)))
    else:

        def fn():
            with torch.no_grad():
                return op(A, G, I, mask, has_mask, prior)

    benchmark.group = f"kernel {device} {str(dtype)[6:]} B={B} K={K} {h}x{w}->{H}x{W} {direction}"
    nbytes = benchutil.fused_bytes(B, K, h, w, C, H, W, dtype, mask=True, prior=True, direction=direction)
    peak, peak_src = benchutil.peak_bandwidth(device)
    benchmark.extra_info.update(benchutil.base_info(
        device, dtype, suite="kernel", backend=variant, label=LABEL[variant], direction=direction,
        batch=B, shape=dict(activations=[B, K, h, w], image=[B, C, H, W]), mask="half the batch", prior=True,
        bytes=nbytes, peak_bandwidth=peak, peak_bandwidth_source=peak_src,
    ))
    benchutil.measure(benchmark, fn, device, warmup=3 if variant == "compiled" else 2)
