"""CUDA backend: megl._saliency_cuda (csrc/saliency_cuda.cu) and its glue megl/ops/backends/cuda.py.

Three layers, so that machines without a GPU still check most of it:
1. the compiled module imports and exposes its functions wherever nvcc exists (the static CUDA runtime makes the
   import work without a GPU): this is how CI proves the CUDA code compiled;
2. host_forward / host_backward, a serial CPU emulation built from the kernels' own __host__ __device__ pieces
   (bilinear taps, the adjoint's source ranges, the per-pixel and per-cell formulas), against torch_explicit;
3. @pytest.mark.gpu: the kernels themselves against backend="torch" on a CUDA device: odd shapes, edge cases,
   grad outputs != 1, float16 / bfloat16 with the flash-attention rule
   |cuda - fp32 ref| <= 2 |torch same dtype - fp32 ref| + atol, determinism and non-default streams.
"""
from __future__ import annotations

import importlib
import itertools
import os
import shutil

import pytest
import torch

from megl.ops import backends, fused_saliency
from megl.ops.backends import torch_explicit
from megl.ops.reference import EPS, EPS_KL

try:
    from megl import _saliency_cuda as ext
except ImportError:
    ext = None


def _nvcc_found() -> bool:
    """Mirrors setup.py's find_nvcc: where it finds nvcc, the install builds megl._saliency_cuda."""
    if os.environ.get("MEGL_SKIP_CUDA", "0") not in ("", "0"):
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


HAS_GPU = torch.cuda.is_available()
needs_ext = pytest.mark.skipif(ext is None, reason="megl._saliency_cuda is not built (no nvcc at install time)")
needs_gpu = pytest.mark.skipif(not HAS_GPU or ext is None, reason="needs a CUDA device and megl._saliency_cuda")

SHAPES = [  # (B, K, h, w, C, H, W)
    (B, K, h, w, 3, H, W)
    for B, K, (h, w), (H, W) in itertools.product((1, 3), (1, 7, 64), ((1, 1), (7, 7), (5, 9)), ((224, 224), (33, 47)))
]
BIG_SHAPES = [
    (1, 7, 7, 7, 3, 1100, 1000),  # more pixel blocks than MAX_TILES: the grid-stride loops take over
    (2, 5, 40, 30, 3, 224, 224),  # h*w > 512 threads: fwd_cam_kernel walks several pixel chunks
    (2, 600, 3, 3, 1, 33, 47),  # large K over few cells: split-k in fwd_cam_kernel, one channel
    (2, 3, 33, 47, 2, 33, 47),  # H == h: scale 1, taps with zero weight
]
CASES = ["random", "no_mask", "no_prior", "neither", "none_annotated", "all_annotated", "prior_zeros",
         "constant_cam", "relu_kills"]


# ----------------------------------------------------------------------------- inputs
def make_inputs(shape, case="random", seed=0, device="cpu", dtype=torch.float32):
    B, K, h, w, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, K, h, w, generator=g)
    G = torch.randn(B, K, h, w, generator=g) + 0.2
    I = torch.rand(B, C, H, W, generator=g)
    mask = torch.rand(B, H, W, generator=g)
    mask[:, : H // 3] = 0.0  # exact zeros and ones too, so sign(s - mask) meets ties at s = 0
    mask[:, -(H // 4):] = 1.0
    has_mask = torch.arange(B) % 2 == 0
    prior = torch.rand(H, W, generator=g)
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
    elif case == "prior_zeros":
        prior[: H // 2] = 0.0
        has_mask = torch.zeros(B, dtype=torch.bool)
    elif case == "constant_cam":
        # z = alpha_0 a_0 + sum_k alpha_k 0: the same bits in every cell whatever the summation order or FMA use,
        # so max == min and d = eps in every backend (a near-constant z would be ill-conditioned instead)
        A = torch.zeros(B, K, h, w)
        A[:, 0] = 0.75
        G[:, 0] = G[:, 0].abs() + 0.1
    elif case == "relu_kills":  # alpha > 0, A < 0: z < 0 everywhere, c = relu(z) = 0
        A = -A.abs() - 0.1
        G = G.abs() + 0.1
    to = lambda t, dt=None: None if t is None else t.to(device=device, dtype=dt or t.dtype)  # noqa: E731
    return (to(A, dtype), to(G, dtype), to(I, dtype), to(mask), to(has_mask), to(prior))


def make_grads(shape, seed=1, device="cpu", dtype=torch.float32):
    """Upstream gradients != 1 for (saliency, masked, l1, kl)."""
    B, K, h, w, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, W, generator=g).to(device, dtype), torch.randn(B, C, H, W, generator=g).to(device, dtype),
        torch.randn(B, generator=g).to(device), torch.randn(B, generator=g).to(device),
    )


# ----------------------------------------------------------------------------- comparison
def assert_close(actual, expected, name, tol, scale=None, floor=1e-6):
    """|actual - expected| <= tol * scale + floor elementwise, scale = max|expected| unless given."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs()
    bound = tol * scale + floor
    worst = err.max().item() if err.numel() else 0.0
    assert worst <= bound, f"{name}: max |error| {worst:.3g} > {bound:.3g} (tol {tol} x scale {scale:.3g} + {floor})"


def grad_scales(gA_ref, A, alpha):
    """gG = <g_z, A_k> / (h w) can cancel to ~0 (constant CAM), so its error scale is max|g_z| max|A|."""
    gz_max = gA_ref.abs().max().item() / max(alpha.abs().max().item(), 1e-30)
    return gz_max * A.abs().max().item()


def compare_forward(got, ref, tol=2e-5):
    names = ("saliency", "masked", "l1", "kl", "alpha", "cam", "stats")
    # l1, kl and stats are fp32 sums over H*W pixels in a different order on each side: their rounding
    # difference grows like sqrt(H*W) ulps (about 1.8e-5 relative at 224 x 224), so the bound grows with it
    n_pix = got[0].shape[-1] * got[0].shape[-2]
    reduced_tol = max(tol, 4e-7 * n_pix ** 0.5)
    for name, a, e in zip(names, got, ref):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        assert_close(a, e, name, reduced_tol if name in ("l1", "kl", "stats") else tol)


def compare_backward(got, ref, A, alpha, tol=2e-5):
    gA, gG, gI = got
    rA, rG, rI = ref
    for name, a, e in (("grad activations", gA, rA), ("grad gradients", gG, rG), ("grad image", gI, rI)):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
    assert_close(gA, rA, "grad activations", tol)
    assert_close(gG, rG, "grad gradients", tol, scale=grad_scales(rA, A, alpha))
    assert_close(gI, rI, "grad image", tol)


# ----------------------------------------------------------------------------- 1. the module compiled
@pytest.mark.skipif(not _nvcc_found(), reason="nvcc not found or MEGL_SKIP_CUDA set: the CUDA module is not built")
def test_cuda_extension_compiled_and_imports():
    mod = importlib.import_module("megl._saliency_cuda")
    for name in ("forward", "backward", "forward_workspace", "backward_workspace", "host_forward", "host_backward",
                 "runtime_version"):
        assert callable(getattr(mod, name, None)), f"megl._saliency_cuda lacks {name}(): stale or placeholder build"
    assert (mod.DTYPE_FLOAT32, mod.DTYPE_FLOAT16, mod.DTYPE_BFLOAT16) == (0, 1, 2)
    assert mod.runtime_version() >= 11000  # static runtime: answers without a GPU
    # (B, h, w) normalised map + 4 partial sums per pixel block (49 blocks of 1024 pixels for 224x224)
    assert mod.forward_workspace(2, 5, 7, 7, 3, 224, 224) == 2 * 49 + 2 * 49 * 4
    assert mod.backward_workspace(2, 5, 7, 7, 3, 224, 224) == 2 * 224 * 224 + 2 * 49 + 2 * 49


@needs_ext
def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="Grad-CAM map is empty"):
        ext.forward_workspace(1, 1, 0, 7, 3, 8, 8)
    with pytest.raises(ValueError, match="smaller than the Grad-CAM map"):
        ext.backward_workspace(1, 1, 9, 9, 3, 8, 8)
    with pytest.raises(ValueError, match="null pointer"):
        ext.forward(0, 1, 1, 2, 2, 1, 4, 4, 0, 0, 0, 0, 0, 0, 1e-8, 1e-8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="dtype code"):
        n = 1 << 20  # fake non-null pointers: the dtype is checked before anything is launched or touched
        ext.forward(7, 1, 1, 2, 2, 1, 4, 4, n, n, n, 0, 0, 0, 1e-8, 1e-8, n, n, n, n, n, n, n, n, 10**6, 0, 0)


@pytest.mark.skipif(HAS_GPU, reason="checks the message given where no GPU is visible")
def test_backend_unavailable_without_gpu_says_why():
    from megl.ops.backends import cuda

    assert not cuda.available()
    assert cuda.UNAVAILABLE_REASON
    with pytest.raises(backends.BackendUnavailable, match="cuda"):
        backends.load("cuda")


# ----------------------------------------------------------------------------- 2. host emulation vs torch_explicit
def _p(t):
    return 0 if t is None else t.data_ptr()


def host_forward(A, G, I, mask, has_mask, prior, eps=EPS, eps_kl=EPS_KL):
    B, K, h, w = A.shape
    _, C, H, W = I.shape
    f = dict(dtype=torch.float32)
    out = (torch.empty(B, H, W, **f), torch.empty(B, C, H, W, **f), torch.empty(B, **f), torch.empty(B, **f),
           torch.empty(B, K, **f), torch.empty(B, h, w, **f), torch.empty(B, 4, **f))
    ext.host_forward(B, K, h, w, C, H, W, _p(A), _p(G), _p(I), _p(mask), _p(has_mask), _p(prior), eps, eps_kl,
                     *(_p(t) for t in out))
    return out


def host_backward(grad_s, grad_masked, grad_l1, grad_kl, A, G, I, mask, has_mask, prior, s, alpha, cam, stats,
                  eps=EPS, eps_kl=EPS_KL):
    B, K, h, w = A.shape
    _, C, H, W = I.shape
    gA, gG, gI = torch.empty_like(A), torch.empty_like(G), torch.empty_like(I)
    ext.host_backward(B, K, h, w, C, H, W, _p(grad_s), _p(grad_masked), _p(grad_l1), _p(grad_kl), _p(A), _p(I),
                      _p(mask), _p(has_mask), _p(prior), _p(s), _p(alpha), _p(cam), _p(stats), eps, eps_kl,
                      _p(gA), _p(gG), _p(gI))
    return gA, gG, gI


def _check_host(shape, case, grads_given=(True, True)):
    inputs = make_inputs(shape, case)
    ref = torch_explicit.forward(*inputs, EPS, EPS_KL)
    got = host_forward(*inputs)
    compare_forward(got, ref)
    g_s, g_m, g_l1, g_kl = make_grads(shape)
    g_s = g_s if grads_given[0] else None
    g_m = g_m if grads_given[1] else None
    s, alpha, cam, stats = ref[0], ref[4], ref[5], ref[6]  # both backwards from the same saved tensors
    rback = torch_explicit.backward(g_s, g_m, g_l1, g_kl, *inputs, s, alpha, cam, stats, EPS, EPS_KL)
    hback = host_backward(g_s, g_m, g_l1, g_kl, *inputs, s, alpha, cam, stats)
    compare_backward(hback, rback, inputs[0], alpha)


# torch_explicit on CPU is the slow side here (~1 s a 224x224 shape on a busy runner): 224 x 224 is sampled
HOST_SHAPES = [s for s in SHAPES if s[5] == 33] + [
    (1, 7, 7, 7, 3, 224, 224), (3, 64, 5, 9, 3, 224, 224), (1, 1, 1, 1, 3, 224, 224)] + BIG_SHAPES[1:]


@needs_ext
@pytest.mark.parametrize("shape", HOST_SHAPES, ids=str)
def test_host_emulation_matches_torch_shapes(shape):
    _check_host(shape, "random")


@needs_ext
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(3, 7, 5, 9, 3, 33, 47), (2, 4, 7, 7, 3, 224, 224)], ids=str)
def test_host_emulation_matches_torch_cases(shape, case):
    _check_host(shape, case)


@needs_ext
@pytest.mark.parametrize("grads_given", [(False, True), (True, False), (False, False)], ids=str)
def test_host_emulation_missing_upstream_grads(grads_given):
    _check_host((3, 7, 5, 9, 3, 33, 47), "random", grads_given)


@needs_ext
def test_host_adjoint_is_the_transpose_of_upsampling():
    """<up(n), g> == <n, up^T(g)> for the gather, on shapes where the padded source ranges matter."""
    for h, w, H, W in ((1, 1, 5, 3), (7, 7, 224, 224), (5, 9, 33, 47), (3, 4, 3, 4), (6, 5, 13, 101)):
        torch.manual_seed(h * 100 + W)
        A = torch.randn(1, 1, h, w)
        G = torch.ones(1, 1, h, w)
        I = torch.ones(1, 1, H, W)
        g = torch.randn(1, H, W)
        s, _, _, _, alpha, cam, stats = host_forward(A, G, I, None, None, None)
        n = (cam.clamp_min(0) - stats[:, 0, None, None]) / (stats[:, 1] - stats[:, 0] + EPS)[:, None, None]
        gn = torch_explicit._upsample_adjoint(g, h, w)
        lhs, rhs = (s * g).sum().item(), (n * gn).sum().item()
        assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(lhs)), (h, w, H, W, lhs, rhs)


# ----------------------------------------------------------------------------- 3. the kernels on a GPU
def _cuda_mod():
    return backends.load("cuda")


def _run_autograd(backend, inputs, grads):
    A, G, I, mask, has_mask, prior = inputs
    A, G, I = (t.detach().clone().requires_grad_(True) for t in (A, G, I))
    out = fused_saliency(A, G, I, mask, has_mask, prior, backend=backend)
    g_s, g_m, g_l1, g_kl = grads
    loss = ((out.saliency.float() * g_s.float()).sum() + (out.masked.float() * g_m.float()).sum()
            + (out.l1 * g_l1).sum() + (out.kl * g_kl).sum())
    return out, torch.autograd.grad(loss, (A, G, I))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", SHAPES + BIG_SHAPES, ids=str)
def test_gpu_matches_torch_shapes(shape):
    _gpu_compare(shape, "random")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(3, 7, 5, 9, 3, 33, 47), (2, 64, 7, 7, 3, 224, 224)], ids=str)
def test_gpu_matches_torch_cases(shape, case):
    _gpu_compare(shape, case)


def _gpu_compare(shape, case):
    inputs = make_inputs(shape, case, device="cuda")
    grads = make_grads(shape, device="cuda")
    cuda = _cuda_mod()
    # the backend functions directly: every output, including alpha / cam / stats
    ref = torch_explicit.forward(*inputs, EPS, EPS_KL)
    got = cuda.forward(*inputs, EPS, EPS_KL)
    compare_forward(got, ref)
    s, alpha, cam, stats = ref[0], ref[4], ref[5], ref[6]
    rback = torch_explicit.backward(*grads, *inputs, s, alpha, cam, stats, EPS, EPS_KL)
    cback = cuda.backward(*grads, *inputs, s, alpha, cam, stats, EPS, EPS_KL)
    compare_backward(cback, rback, inputs[0], alpha)
    # through fused_saliency: the custom op, autograd, cuda forward feeding cuda backward
    out_t, grads_t = _run_autograd("torch", inputs, grads)
    out_c, grads_c = _run_autograd("cuda", inputs, grads)
    for name, a, e in zip(("saliency", "masked", "l1", "kl"), out_c, out_t):
        assert_close(a, e, name, 2e-5)
    compare_backward(grads_c, grads_t, inputs[0], alpha)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("grads_given", [(False, True), (True, False), (False, False)], ids=str)
def test_gpu_missing_upstream_grads(grads_given):
    shape = (3, 7, 5, 9, 3, 33, 47)
    inputs = make_inputs(shape, device="cuda")
    g_s, g_m, g_l1, g_kl = make_grads(shape, device="cuda")
    g_s = g_s if grads_given[0] else None
    g_m = g_m if grads_given[1] else None
    cuda = _cuda_mod()
    s, _, _, _, alpha, cam, stats = cuda.forward(*inputs, EPS, EPS_KL)
    rback = torch_explicit.backward(g_s, g_m, g_l1, g_kl, *inputs, s, alpha, cam, stats, EPS, EPS_KL)
    cback = cuda.backward(g_s, g_m, g_l1, g_kl, *inputs, s, alpha, cam, stats, EPS, EPS_KL)
    compare_backward(cback, rback, inputs[0], alpha)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(3, 64, 7, 7, 3, 224, 224), (1, 7, 5, 9, 3, 33, 47), (3, 1, 1, 1, 3, 33, 47)], ids=str)
def test_gpu_low_precision_flash_attention_rule(shape, dtype, atol):
    """|cuda - fp32 ref| <= 2 |torch same dtype - fp32 ref| + atol * max|ref|, for outputs and gradients."""
    inputs = make_inputs(shape, device="cuda", dtype=dtype)
    grads = make_grads(shape, device="cuda", dtype=dtype)
    inputs32 = tuple(None if t is None else (t.float() if t.is_floating_point() else t) for t in inputs)
    grads32 = tuple(t.float() for t in grads)
    out_ref, g_ref = _run_autograd("torch", inputs32, grads32)
    out_pt, g_pt = _run_autograd("torch", inputs, grads)
    out_cu, g_cu = _run_autograd("cuda", inputs, grads)
    names = ("saliency", "masked", "l1", "kl", "grad activations", "grad gradients", "grad image")
    for name, ref, pt, cu in zip(names, (*out_ref, *g_ref), (*out_pt, *g_pt), (*out_cu, *g_cu)):
        assert cu.dtype == pt.dtype, f"{name}: dtype {cu.dtype} != torch backend's {pt.dtype}"
        ref, pt, cu = ref.double(), pt.double(), cu.double()
        err_cu = (cu - ref).abs().max().item()
        err_pt = (pt - ref).abs().max().item()
        bound = 2 * err_pt + atol * max(ref.abs().max().item(), 1e-3)
        assert err_cu <= bound, f"{name} ({dtype}): cuda error {err_cu:.3g} > 2 x torch's {err_pt:.3g} + atol"


@pytest.mark.gpu
@needs_gpu
def test_gpu_deterministic_and_honours_the_current_stream():
    shape = (3, 64, 7, 7, 3, 224, 224)
    inputs = make_inputs(shape, device="cuda")
    grads = make_grads(shape, device="cuda")
    cuda = _cuda_mod()

    def run():
        fwd = cuda.forward(*inputs, EPS, EPS_KL)
        s, _, _, _, alpha, cam, stats = fwd
        return (*fwd, *cuda.backward(*grads, *inputs, s, alpha, cam, stats, EPS, EPS_KL))

    first = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # launched on a side stream, read back after syncing with it
        second = run()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(first, second):
        assert torch.equal(a, b), "the CUDA backend is not bitwise deterministic (or ignored the current stream)"


@pytest.mark.gpu
@needs_gpu
def test_gpu_gradcheck_through_fused_op_float32_vs_float64_reference():
    """Gradients of the cuda op (fp32) match the float64 torch backend's to fp32 accuracy."""
    shape = (2, 3, 4, 5, 2, 9, 11)
    inputs = make_inputs(shape, device="cuda")
    grads = make_grads(shape, device="cuda")
    inputs64 = tuple(None if t is None else (t.double() if t.is_floating_point() else t) for t in inputs)
    out64, g64 = _run_autograd("torch", inputs64, tuple(t.double() for t in grads))
    out32, g32 = _run_autograd("cuda", inputs, grads)
    for name, a, e in zip(("saliency", "masked", "l1", "kl"), out32, out64):
        assert_close(a, e, name, 1e-5)
    compare_backward(tuple(g.double() for g in g32), g64, inputs64[0], inputs64[1].mean(dim=(2, 3)), tol=1e-4)
