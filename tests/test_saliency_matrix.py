"""Every backend of the fused op against the float64 reference: backends x shapes x edge cases x dtypes, forward
outputs and the gradients of all three inputs under grad_outputs != 1 on every output (tests/saliency_cases.py).

A backend that cannot run here is skipped with the reason (no GPU, module not built); test_ops.py asserts that the
CPU backends are built, so a skip here never hides a missing CPU build.
"""
from __future__ import annotations

import pytest
import torch

from megl.ops.backends import triton as triton_backend
from saliency_cases import (
    CASE_SHAPE, CASES, GPU_SHAPES, MATRIX, assert_matches, backend_fn, make_grad_outputs,
    make_inputs, oracle, run, shape_id,
)

GPU = torch.cuda.is_available()
LOW = (torch.float16, torch.bfloat16)
TRITON_DEVICE = "cpu" if triton_backend._kernels is None or triton_backend._kernels.INTERPRET else "cuda"


def _targets():
    """(backend, device, dtype) this machine can run, plus the cuda backend (skipped with its reason off a GPU)."""
    out = [("torch", "cpu", torch.float64), ("torch", "cpu", torch.float32), ("cpp", "cpu", torch.float32),
           ("cuda-emulation", "cpu", torch.float32)]
    out += [("triton", TRITON_DEVICE, d) for d in (torch.float32,) + (LOW if TRITON_DEVICE == "cuda" else ())]
    out += [("cuda", "cuda", d) for d in (torch.float32,) + (LOW if GPU else ())]
    out += [("torch", "cuda", torch.float32)] if GPU else []  # in LOW it is the yardstick (saliency_cases.oracle)
    return out


TARGETS = _targets()


def _params():
    """(shape, case) outermost, so that the cached oracle serves every backend of one (shape, case) in a row."""
    cells = MATRIX + [(s, "random") for s in GPU_SHAPES]
    return [
        pytest.param(b, dev, dt, s, c, id=f"{shape_id(s)}-{c}-{b}-{str(dt)[6:]}")
        for s, c in cells for dt in (torch.float64, torch.float32) + LOW for b, dev, d in TARGETS
        if d == dt and (s not in GPU_SHAPES or dev == "cuda")
    ]


@pytest.mark.parametrize("backend,device,dtype,shape,case", _params())
def test_matches_fp64_reference(backend, device, dtype, shape, case):
    fn = backend_fn(backend)
    inputs = make_inputs(shape, case, dtype, device)
    got = run(fn, inputs, make_grad_outputs(shape, dtype, device))
    assert_matches(got, *oracle(shape, case, dtype, device), inputs, dtype, f"{backend} {dtype} {case}")
    assert got[0][0].dtype == got[0][1].dtype == dtype, "saliency and masked come in the inputs' dtype"


# grad_s / grad_masked None (an output nobody differentiates): the kernels' HAS_GRAD_* / null-pointer paths
WHICH = [("saliency",), ("masked",), ("l1", "kl")]


@pytest.mark.parametrize("which", WHICH, ids="+".join)
@pytest.mark.parametrize("backend,device,dtype", [t for t in TARGETS if t[2] == torch.float32], ids=str)
def test_missing_grad_outputs(backend, device, dtype, which):
    fn = backend_fn(backend)
    shape = CASE_SHAPE
    inputs = make_inputs(shape, "random", dtype, device)
    got = run(fn, inputs, make_grad_outputs(shape, dtype, device, which=which))
    assert_matches(got, *oracle(shape, "random", dtype, device, which), inputs, dtype, f"{backend} {which}")
    if "masked" not in which:
        assert (got[1][2] == 0).all()


@pytest.mark.parametrize("backend,device,dtype", [t for t in TARGETS if t[2] == torch.float32], ids=str)
def test_repeated_calls_are_bitwise_identical(backend, device, dtype):
    fn = backend_fn(backend)
    shape = CASE_SHAPE
    inputs = make_inputs(shape, "random", dtype, device)
    grads = make_grad_outputs(shape, dtype, device)
    first, again = run(fn, inputs, grads), run(fn, inputs, grads)
    for a, b in zip(first[0] + first[1], again[0] + again[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES)
def test_cases_mean_what_they_say(case):
    """The edge cases really are edges, so that matching the reference on them means something."""
    (out, grads), _ = oracle(CASE_SHAPE, case, torch.float32, "cpu")
    s, masked, l1, kl = out
    gA, gG, gI = grads
    annotated = make_inputs(CASE_SHAPE, case)[4]
    if case in ("constant_cam", "relu_kills"):
        assert (s == 0).all() and (masked == 0).all()
    else:
        assert s.amax() > 0.5 and gA.abs().amax() > 0 and gG.abs().amax() > 0
    if case == "constant_cam":
        assert gA.abs().amax() > 1e3  # the 1/eps regime: the scale-relative tolerance is what makes it pass
    if case == "relu_kills":
        assert (gA == 0).all() and (gG == 0).all()
    if case in ("no_mask", "neither", "none_annotated", "prior_zeros"):
        assert (l1 == 0).all()
    if case in ("no_prior", "neither", "all_annotated"):
        assert (kl == 0).all()
    if annotated is not None:  # l1 where a sample is annotated, kl where it is not
        assert ((l1 > 0) == annotated).all()
        if case != "no_prior":
            assert ((kl > 0) == ~annotated).all()
    if case == "no_mask":
        assert (kl > 0).all()
