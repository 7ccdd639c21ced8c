"""The fused op's test vocabulary, shared by every op test: shapes, edge cases, inputs, runners, one tolerance rule.

Every backend is checked against one oracle, `fused_saliency_reference` in float64 on the same (rounded) inputs,
with flash-attention's rule: |backend - fp64 ref| <= 2 |PyTorch in the backend's dtype - fp64 ref| + atol, where
"PyTorch in the dtype" is the reference run in float32, and for float16 / bfloat16 the torch backend (inputs in
that dtype, float32 arithmetic, as the op is defined: the reference run in float16 underflows eps = 1e-8 to 0).
"""
from __future__ import annotations

import functools
from typing import Optional

import pytest
import torch

from megl.ops import BackendUnavailable, backends, fused_saliency, fused_saliency_reference

# (B, K, h, w, C, H, W). Every value of each factor at least once; 224 x 224 only where it matters (ResNet18's 7x7
# layer4 map, and a low-res map larger than one CUDA block). The Triton interpreter makes every shape cost.
SHAPES = [
    (1, 64, 7, 7, 3, 224, 224),  # ResNet18 layer4 at 224 px
    (3, 7, 5, 9, 3, 33, 47),  # odd sizes: non-integer scales; several tasks (cpp) and blocks (cuda) per sample
    (3, 1, 7, 7, 1, 33, 47),  # K = 1: d/dG is exactly 0 (normalisation is scale invariant), pure cancellation; C = 1
    (2, 7, 1, 1, 3, 33, 47),  # a 1x1 map: min = max, s = 0
    (1, 2, 1, 1, 4, 9, 5),  # tiny image; C = 4 (no fixed-C fast path in cpp)
    (2, 3, 33, 47, 2, 33, 47),  # H = h: scale 1, taps with zero weight
    (1, 5, 40, 30, 3, 80, 64),  # h*w > 512: CUDA's fwd_cam_kernel walks several chunks
]
# Only for backends on a CUDA device (the Triton interpreter is too slow for them on CPU).
GPU_SHAPES = [
    (1, 7, 7, 7, 3, 1100, 1000),  # more pixel blocks than the CUDA kernels' MAX_TILES: grid-stride loops
    (2, 600, 3, 3, 1, 33, 47),  # large K over few cells: split-k in fwd_cam_kernel
]
# The edge cases, one name and one construction each (see make_inputs).
CASES = ["random", "no_mask", "no_prior", "neither", "none_annotated", "all_annotated", "prior_zeros",
         "constant_cam", "relu_kills"]
CASE_SHAPE = SHAPES[1]  # where every case runs: K >= 2, annotated and unannotated samples, several tiles
# The matrix: every shape with random inputs, every edge case on CASE_SHAPE.
MATRIX = [(s, "random") for s in SHAPES] + [(CASE_SHAPE, c) for c in CASES if c != "random"]

EPS, EPS_KL = 1e-8, 1e-8
OUTPUTS = ("saliency", "masked", "l1", "kl")
GRADS = ("d activations", "d gradients", "d image")


def shape_id(shape) -> str:
    B, K, h, w, C, H, W = shape
    return f"B{B}K{K}_{h}x{w}_C{C}_{H}x{W}"


# ----------------------------------------------------------------------------------------------------- inputs
def make_inputs(shape, case="random", dtype=torch.float32, device="cpu", seed=0):
    """(A, G, I, mask, has_mask, prior) for `case`, drawn in float64 and rounded to `dtype` (mask, prior too)."""
    B, K, h, w, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    A = torch.randn(B, K, h, w, **f64)
    G = torch.randn(B, K, h, w, **f64) + 0.2
    I = torch.rand(B, C, H, W, **f64)
    mask = torch.rand(B, H, W, **f64)
    mask[:, : H // 3] = 0.0  # exact zeros and ones, so sign(s - mask) meets ties at s = 0 and s = 1
    mask[:, H - H // 4:] = 1.0
    has_mask = torch.arange(B) % 2 == 0
    prior = torch.rand(H, W, **f64)
    if case == "no_mask":
        mask, has_mask = None, None
    elif case == "no_prior":
        prior = None
    elif case == "neither":
        mask, has_mask, prior = None, None, None
    elif case == "none_annotated":
        has_mask = torch.zeros(B, dtype=torch.bool)
    elif case == "all_annotated":
        has_mask = torch.ones(B, dtype=torch.bool)
    elif case == "prior_zeros":  # log q ~ log(eps_kl) on half the image; KL on every sample
        prior[: H // 2] = 0.0
        has_mask = torch.zeros(B, dtype=torch.bool)
    elif case == "constant_cam":
        if K < 2:
            raise ValueError("constant_cam needs K >= 2 (two channels that sum to a constant)")
        # z = 0.5 a + 0.5 (8 - a) = 4 in every cell, exactly in any dtype and summation order (small integers,
        # alpha = 0.5): max = min, d = eps, gradients ~ 1/eps. A varies over cells, so d/dG does not cancel.
        a = torch.randint(0, 5, (B, 1, h, w), generator=g).double()
        A = torch.cat([a, 8.0 - a, torch.zeros(B, K - 2, h, w, dtype=torch.float64)], dim=1)
        G = torch.full_like(A, 0.5)
    elif case == "relu_kills":  # alpha > 0 and A < 0: z < 0 everywhere, c = relu(z) = 0, no gradient to A or G
        A, G = -A.abs() - 0.1, G.abs() + 0.1
    elif case != "random":
        raise ValueError(f"unknown case {case!r}; choose one of {CASES}")
    def to(t):
        return None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    return tuple(to(t) for t in (A, G, I, mask, has_mask, prior))


def make_grad_outputs(shape, dtype=torch.float32, device="cpu", seed=1, which=OUTPUTS):
    """Upstream gradients != 1 for (saliency, masked, l1, kl); None for the outputs not in `which`."""
    B, K, h, w, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    shapes = dict(saliency=(B, H, W), masked=(B, C, H, W), l1=(B,), kl=(B,))
    grads = {name: torch.randn(shapes[name], generator=g, dtype=torch.float64) for name in OUTPUTS}
    return tuple(grads[name].to(device=device, dtype=dtype) if name in which else None for name in OUTPUTS)


# ----------------------------------------------------------------------------------------------------- runners
def run(fn, inputs, grad_outputs):
    """Outputs of fn(A, G, I, mask, has_mask, prior) and d(Σ grad_output · output)/d(A, G, I)."""
    A, G, I, mask, has_mask, prior = inputs
    A, G, I = (t.detach().clone().requires_grad_() for t in (A, G, I))
    out = fn(A, G, I, mask, has_mask, prior)
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    loss = sum((o.to(acc) * g.to(acc)).sum() for o, g in zip(out, grad_outputs) if g is not None)
    grads = torch.autograd.grad(loss, (A, G, I), allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip((A, G, I), grads)]
    return [o.detach() for o in out], grads


def reference(A, G, I, mask, has_mask, prior):
    return fused_saliency_reference(A, G, I, mask, has_mask, prior, eps=EPS, eps_kl=EPS_KL)


def _reference_run_on(inputs, grads):
    up = lambda t: t.double() if t is not None and t.is_floating_point() else t  # noqa: E731
    return run(reference, [up(t) for t in inputs], [up(g) for g in grads])


@functools.cache  # every (shape, case) of the matrix, a few MB each: each backend and ISA reuses it
def oracle(shape, case, dtype, device, which=OUTPUTS):
    """(fp64 reference, PyTorch in `dtype`) on the same rounded inputs: the two sides of the tolerance rule."""
    inputs = make_inputs(shape, case, dtype, device)
    grads = make_grad_outputs(shape, dtype, device, which=which)
    ref64 = _reference_run_on(inputs, grads)
    if dtype == torch.float64:
        return ref64, ref64
    same = reference if dtype == torch.float32 else backend_fn("torch")
    return ref64, run(same, inputs, grads)


class CudaEmulation:
    """The CUDA module's serial host emulation (csrc/cuda/emulation.cuh: the kernels' own device functions run on
    the CPU), behind the backend contract of megl/ops/backends/torch_explicit.py. float32 CPU tensors."""

    def __init__(self, ext):
        self.ext = ext

    @staticmethod
    def _p(t: Optional[torch.Tensor]) -> int:
        return 0 if t is None else t.data_ptr()

    def forward(self, A, G, I, mask, has_mask, prior, eps=EPS, eps_kl=EPS_KL):
        B, K, h, w = A.shape
        _, C, H, W = I.shape
        f = dict(dtype=torch.float32)
        out = (torch.empty(B, H, W, **f), torch.empty(B, C, H, W, **f), torch.empty(B, **f), torch.empty(B, **f),
               torch.empty(B, K, **f), torch.empty(B, h, w, **f), torch.empty(B, 4, **f))
        p = self._p
        self.ext.host_forward(B, K, h, w, C, H, W, p(A), p(G), p(I), p(mask), p(has_mask), p(prior), eps, eps_kl,
                              *(p(t) for t in out))
        return out

    def backward(self, grad_s, grad_masked, grad_l1, grad_kl, A, G, I, mask, has_mask, prior, s, alpha, cam, stats,
                 eps=EPS, eps_kl=EPS_KL):
        B, K, h, w = A.shape
        _, C, H, W = I.shape
        gA, gG, gI = torch.empty_like(A), torch.empty_like(G), torch.empty_like(I)
        p = self._p
        self.ext.host_backward(B, K, h, w, C, H, W, p(grad_s), p(grad_masked), p(grad_l1), p(grad_kl), p(A), p(I),
                               p(mask), p(has_mask), p(prior), p(s), p(alpha), p(cam), p(stats), eps, eps_kl,
                               p(gA), p(gG), p(gI))
        return gA, gG, gI

    def __call__(self, A, G, I, mask, has_mask, prior):
        """The emulation as a differentiable function of (A, G, I), as fused_saliency wires a backend."""
        emu = self

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, A, G, I):
                s, masked, l1, kl, alpha, cam, stats = emu.forward(A, G, I, mask, has_mask, prior)
                ctx.save_for_backward(A, G, I, s, alpha, cam, stats)
                return s, masked, l1, kl

            @staticmethod
            def backward(ctx, g_s, g_masked, g_l1, g_kl):
                A, G, I, s, alpha, cam, stats = ctx.saved_tensors
                c = lambda g: g.contiguous()  # noqa: E731
                return emu.backward(c(g_s), c(g_masked), c(g_l1), c(g_kl), A, G, I, mask, has_mask, prior, s,
                                    alpha, cam, stats)

        return Fn.apply(A, G, I)


def cuda_extension():
    try:
        from megl import _saliency_cuda
    except ImportError as err:
        return None, f"megl._saliency_cuda is not built ({err}); build it where nvcc exists"
    return _saliency_cuda, None


def backend_fn(backend: str):
    """fn(A, G, I, mask, has_mask, prior) running `backend` ('cuda-emulation': the CUDA host emulation), or a
    pytest skip naming why it cannot run here."""
    if backend == "cuda-emulation":
        ext, reason = cuda_extension()
        if ext is None:
            pytest.skip(reason)
        return CudaEmulation(ext)
    try:
        backends.load(backend)
    except BackendUnavailable as err:
        pytest.skip(str(err))
    return lambda A, G, I, mask, has_mask, prior: fused_saliency(
        A, G, I, mask, has_mask, prior, eps=EPS, eps_kl=EPS_KL, backend=backend
    )


# ----------------------------------------------------------------------------------------------------- tolerance
# atol, relative to the size of each output (max |fp64 ref|; for d gradients the size of the g_z * A terms it sums),
# on top of 2x the reference's own error in the same dtype. float32, measured on MATRIX (CPU), max over the 7 tensors
# of |err| / scale: fp32 reference 1.1e-6, cpp 8.2e-7 (generic ISA the same), triton 7.1e-7, cuda-emulation 1.4e-6.
# What exceeds 2x the reference's error, (err - 2 err_ref) / scale: cpp 0, triton 1.0e-7, cuda-emulation 1.1e-6
# (d activations, its serial float row sums where H = h), hence atol = 2e-6. KL alone, in the two-pass form: cpp
# 2.3e-7, triton 3.3e-7, cuda-emulation 1.4e-6; the one-pass forms cpp and triton had before were 2.2e-6 and 3.9e-6
# on a first version of this matrix, and would have set this atol instead.
# float16 / bfloat16 (GPU only): the atol of the earlier CUDA tests with the same rule.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def scales(ref64_out, ref64_grads, inputs) -> list[float]:
    """Size of each of the 7 compared tensors: max |value|, except d gradients = <g_z, A_k> / hw, a sum that can
    cancel to 0 (exactly, for K = 1) whose rounding is that of its terms, max |g_z| max |A|."""
    A = inputs[0].double()
    big = lambda t: t.abs().max().item() if t.numel() else 0.0  # noqa: E731
    alpha = inputs[1].double().mean(dim=(2, 3))
    gz = big(ref64_grads[0]) / max(big(alpha), 1e-30)
    return [big(t) for t in ref64_out] + [big(ref64_grads[0]), gz * big(A), big(ref64_grads[2])]


def errors(got, ref64, same, inputs):
    """Per compared tensor: (name, |got - ref64|, |same - ref64|, scale), max over elements."""
    scale = scales(*ref64, inputs)
    out = []
    for name, g, r, s, sc in zip(OUTPUTS + GRADS, got[0] + got[1], ref64[0] + ref64[1], same[0] + same[1], scale):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        err = lambda t: (t.double().cpu() - r.cpu()).abs().max().item() if r.numel() else 0.0  # noqa: E731
        out.append((name, err(g), err(s), sc))
    return out


def assert_matches(got, ref64, same, inputs, dtype, what=""):
    for name, err, err_same, scale in errors(got, ref64, same, inputs):
        bound = 2 * err_same + ATOL[dtype] * scale
        assert err <= bound, (f"{what} {name}: error {err:.3g} > {bound:.3g} = 2 x PyTorch-in-{dtype}'s "
                              f"{err_same:.3g} + atol x scale {scale:.3g}")
