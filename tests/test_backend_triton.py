"""What is specific to the Triton backend (megl/ops/backends/triton.py, kernels in triton_kernels.py): when it can
run and what it says when it cannot, and the tile reductions on tiles smaller than the default. Checked against the
float64 reference in test_saliency_matrix.py, on CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before
megl is imported): the path CI exercises, so it must run, not skip, without a GPU."""
from __future__ import annotations

import pytest
import torch

from megl.ops import backends
from megl.ops.backends import triton as triton_backend
from saliency_cases import EPS, EPS_KL, assert_matches, make_grad_outputs, make_inputs, oracle, run


def test_triton_backend_is_available_on_cpu_with_interpreter():
    assert triton_backend.available(), triton_backend.UNAVAILABLE_REASON
    assert backends.is_available("triton")


def test_small_tiles():
    """16x32 tiles on a 33x47 image: 3x2 tiles, the last row and column partial, so that every tile reduction
    (forward partial sums, backward adjoint grids) sums several tiles."""
    kernels = triton_backend._kernels
    shape = (3, 7, 5, 9, 3, 33, 47)
    inputs = make_inputs(shape)
    tiles = dict(block_r=16, block_c=32)

    def small_tiles(A, G, I, mask, has_mask, prior):
        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, A, G, I):
                out = kernels.saliency_forward(A, G, I, mask, has_mask, prior, EPS, EPS_KL, **tiles)
                ctx.save_for_backward(A, G, I, out[0], *out[4:])
                return out[:4]

            @staticmethod
            def backward(ctx, g_s, g_m, g_l1, g_kl):
                A, G, I, s, alpha, cam, stats = ctx.saved_tensors
                return kernels.saliency_backward(g_s, g_m, g_l1.contiguous(), g_kl.contiguous(), A, G, I, mask,
                                                 has_mask, prior, s, alpha, cam, stats, EPS, EPS_KL, **tiles)

        return Fn.apply(A, G, I)

    got = run(small_tiles, inputs, make_grad_outputs(shape))
    assert_matches(got, *oracle(shape, "random", torch.float32, "cpu"), inputs, torch.float32, "16x32 tiles")


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
    A, G, I, mask, has_mask, prior = make_inputs((1, 1, 1, 1, 3, 4, 4))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 before importing megl"):
        triton_backend.forward(A, G, I, mask, has_mask, prior, EPS, EPS_KL)
