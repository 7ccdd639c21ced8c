"""What is specific to the CUDA backend, megl._saliency_cuda (csrc/cuda/) and its glue megl/ops/backends/cuda.py.

Checked against the float64 reference in test_saliency_matrix.py: the kernels on a GPU (backend 'cuda', every
dtype), and everywhere the module is built the host emulation ('cuda-emulation'), which runs the kernels' own
__host__ __device__ functions serially on the CPU. Here: the module compiled (the static CUDA runtime imports
without a GPU, which is how CI proves the CUDA code compiles), its argument errors, the adjoint of the upsample,
and on a GPU determinism and the current stream.
"""
from __future__ import annotations

import importlib
import os
import shutil

import pytest
import torch

from megl.ops import backends
from megl.ops.backends import torch_explicit
from saliency_cases import EPS, EPS_KL, CudaEmulation, cuda_extension, make_grad_outputs, make_inputs

ext, WHY_NOT_BUILT = cuda_extension()
HAS_GPU = torch.cuda.is_available()
needs_ext = pytest.mark.skipif(ext is None, reason=str(WHY_NOT_BUILT))
needs_gpu = pytest.mark.skipif(not HAS_GPU or ext is None, reason="needs a CUDA device and megl._saliency_cuda")


def _nvcc_found() -> bool:
    """Mirrors setup.py's find_nvcc: where it finds nvcc, the install builds megl._saliency_cuda."""
    if os.environ.get("MEGL_SKIP_CUDA", "0") not in ("", "0"):
        return False
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


# ----------------------------------------------------------------------------- the module compiled
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
    mask = torch.zeros(1, 4, 4)
    with pytest.raises(ValueError, match="mask given without has_mask"):
        CudaEmulation(ext).forward(*make_inputs((1, 2, 2, 2, 3, 4, 4))[:3], mask, None, None)


@pytest.mark.skipif(HAS_GPU, reason="checks the message given where no GPU is visible")
def test_backend_unavailable_without_gpu_says_why():
    from megl.ops.backends import cuda

    assert not cuda.available()
    assert cuda.UNAVAILABLE_REASON
    with pytest.raises(backends.BackendUnavailable, match="cuda"):
        backends.load("cuda")


# ----------------------------------------------------------------------------- host emulation
@needs_ext
def test_host_adjoint_is_the_transpose_of_upsampling():
    """<up(n), g> == <n, up^T(g)> for the gather, on shapes where the padded source ranges matter."""
    emu = CudaEmulation(ext)
    for h, w, H, W in ((1, 1, 5, 3), (7, 7, 224, 224), (5, 9, 33, 47), (3, 4, 3, 4), (6, 5, 13, 101)):
        torch.manual_seed(h * 100 + W)
        A = torch.randn(1, 1, h, w)
        G = torch.ones(1, 1, h, w)
        I = torch.ones(1, 1, H, W)
        g = torch.randn(1, H, W)
        s, _, _, _, alpha, cam, stats = emu.forward(A, G, I, None, None, None)
        n = (cam.clamp_min(0) - stats[:, 0, None, None]) / (stats[:, 1] - stats[:, 0] + EPS)[:, None, None]
        gn = torch_explicit._upsample_adjoint(g, h, w)
        lhs, rhs = (s * g).sum().item(), (n * gn).sum().item()
        assert abs(lhs - rhs) <= 1e-4 * max(1.0, abs(lhs)), (h, w, H, W, lhs, rhs)


# ----------------------------------------------------------------------------- the kernels on a GPU
@pytest.mark.gpu
@needs_gpu
def test_gpu_deterministic_and_honours_the_current_stream():
    shape = (3, 64, 7, 7, 3, 224, 224)
    inputs = make_inputs(shape, device="cuda")
    grads = make_grad_outputs(shape, device="cuda")
    cuda = backends.load("cuda")

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
