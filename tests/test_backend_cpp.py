"""What is specific to the C++/OpenMP backend (megl._saliency_cpu): its ISA variants, thread-count independence,
exact bilinear taps, empty tensors, and the errors of the glue and the extension. The auto-chosen ISA is checked
against the float64 reference in test_saliency_matrix.py; the other ISAs are checked here on the same matrix."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from megl.ops.backends import cpp
from megl.ops.backends import torch_explicit as spec
from saliency_cases import EPS, EPS_KL, MATRIX, assert_matches, backend_fn, make_grad_outputs, make_inputs, oracle, \
    run, shape_id

# test_ops.py::test_cpp_and_triton_are_built fails when the extension is missing; here that is a skip, not 20 errors
pytestmark = pytest.mark.skipif(not cpp.available(), reason=f"cpp backend not built: {cpp.UNAVAILABLE_REASON}")

ISAS = cpp._ext.available_isas() if cpp.available() else []
DEFAULT_ISA = ISAS[-1] if ISAS else None  # what "auto" picks: the widest variant the CPU runs
FWD_NAMES = ("saliency", "masked", "l1", "kl", "alpha", "cam", "stats")
BWD_NAMES = ("d activations", "d gradients", "d image")


@contextlib.contextmanager
def pinned(isa):
    cpp._ext.set_isa(isa)
    try:
        yield
    finally:
        cpp._ext.set_isa("auto")


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def forward_backward(inputs, grads):
    """cpp's forward, and its backward from its own saved tensors."""
    A, G, I, mask, has_mask, prior = inputs
    fwd = cpp.forward(A, G, I, mask, has_mask, prior, EPS, EPS_KL)
    s, alpha, cam, stats = fwd[0], fwd[4], fwd[5], fwd[6]
    return fwd + tuple(cpp.backward(*grads, A, G, I, mask, has_mask, prior, s, alpha, cam, stats, EPS, EPS_KL))


# ----------------------------------------------------------------------------- ISA variants
@pytest.mark.parametrize("shape,case", MATRIX, ids=[f"{shape_id(s)}-{c}" for s, c in MATRIX])
def test_every_other_isa_matches_the_reference(shape, case):
    others = [isa for isa in ISAS if isa != DEFAULT_ISA]
    if not others:
        pytest.skip(f"this CPU runs one kernel variant ({DEFAULT_ISA}), checked by test_saliency_matrix.py")
    fn = backend_fn("cpp")
    inputs = make_inputs(shape, case)
    for isa in others:
        with pinned(isa):
            got = run(fn, inputs, make_grad_outputs(shape))
        assert_matches(got, *oracle(shape, case, torch.float32, "cpu"), inputs, torch.float32, f"cpp[{isa}] {case}")


def test_isa_selection_and_its_errors():
    for isa in ISAS:
        with pinned(isa):
            assert cpp._ext.isa() == isa
    assert cpp._ext.isa() == DEFAULT_ISA
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        cpp._ext.set_isa("sse9")
    if "avx2" not in ISAS:
        with pytest.raises(ValueError, match="AVX2"):
            cpp._ext.set_isa("avx2")


# ----------------------------------------------------------------------------- threads and exactness
@pytest.mark.parametrize("isa", ISAS)
def test_results_do_not_depend_on_the_thread_count(isa):
    # 3 samples x 4 row tasks: every thread count splits the work differently; the sums must not care.
    shape = (3, 9, 5, 7, 3, 61, 45)
    inputs, grads = make_inputs(shape), make_grad_outputs(shape)
    with pinned(isa):
        results = []
        for n in (1, 2, 3):
            with threads(n):
                results.append(forward_backward(inputs, grads))
    for n, other in zip((2, 3), results[1:]):
        for name, a, b in zip(FWD_NAMES + BWD_NAMES, results[0], other):
            assert torch.equal(a, b), f"{name} differs between 1 and {n} threads ({isa})"


@pytest.mark.parametrize("isa", ISAS)
def test_saliency_is_torch_bilinear_upsampling(isa):
    # An exact cam (integer activations, alpha a power of two), so both sides upsample the same n: the taps and
    # weights must be F.interpolate's (align_corners=False) for up-scales that are not integer. A wrong tap or a
    # half-pixel shift costs ~1e-2; what remains is rounding order (ATen's kernel sums in its own), a few ulps.
    for (h, w), (H, W) in [((2, 3), (7, 11)), ((5, 9), (33, 47)), ((7, 7), (224, 224)), ((3, 1), (3, 13))]:
        A = torch.randint(0, 8, (1, 2, h, w)).float()
        G = torch.full((1, 2, h, w), 0.5)
        I = torch.ones(1, 1, H, W)
        with pinned(isa):
            s = cpp.forward(A, G, I, None, None, None, EPS, EPS_KL)[0]
        c = (0.5 * A.sum(1)).clamp_min(0)
        n = (c - c.amin()) / (c.amax() - c.amin() + EPS)
        want = F.interpolate(n[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(s, want, rtol=0, atol=5e-7, msg=lambda m: f"{(h, w)} -> {(H, W)}: {m}")


def test_empty_batch_and_no_channels():
    # Empty tensors may have a null data pointer; the extension must not mistake them for missing inputs.
    A, G, I, mask, has_mask, prior = make_inputs((0, 4, 3, 3, 3, 8, 8))
    out = cpp.forward(A, G, I, mask, has_mask, prior, EPS, EPS_KL)
    assert [tuple(t.shape) for t in out] == [(0, 8, 8), (0, 3, 8, 8), (0,), (0,), (0, 4), (0, 3, 3), (0, 4)]
    grads = cpp.backward(None, None, torch.zeros(0), torch.zeros(0), A, G, I, mask, has_mask, prior,
                         out[0], out[4], out[5], out[6], EPS, EPS_KL)
    assert [tuple(t.shape) for t in grads] == [(0, 4, 3, 3), (0, 4, 3, 3), (0, 3, 8, 8)]
    # K = 0: cam = 0 everywhere, s = 0, still a KL and an image gradient
    shape = (2, 0, 3, 3, 3, 8, 8)
    inputs, grads = make_inputs(shape), make_grad_outputs(shape)
    got = forward_backward(inputs, grads)
    fwd = spec.forward(*inputs, EPS, EPS_KL)
    want = fwd + tuple(spec.backward(*grads, *inputs, fwd[0], fwd[4], fwd[5], fwd[6], EPS, EPS_KL))
    for name, a, b in zip(FWD_NAMES + BWD_NAMES, got, want):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


# ----------------------------------------------------------------------------- errors
def test_glue_rejects_what_the_kernels_cannot_read():
    A, G, I, mask, has_mask, prior = make_inputs((2, 3, 4, 4, 3, 8, 8))
    with pytest.raises(ValueError, match="image must be a contiguous torch.float32 CPU tensor.*not contiguous"):
        cpp.forward(A, G, I.transpose(2, 3), mask, has_mask, prior, EPS, EPS_KL)
    with pytest.raises(ValueError, match="activations must be a contiguous torch.float32 CPU tensor, got torch.float64"):
        cpp.forward(A.double(), G, I, mask, has_mask, prior, EPS, EPS_KL)
    with pytest.raises(ValueError, match="prior must be a contiguous torch.float32"):
        cpp.forward(A, G, I, mask, has_mask, prior.half(), EPS, EPS_KL)


def test_extension_rejects_null_pointers_and_bad_shapes():
    A, G, I, *_ = make_inputs((1, 2, 3, 3, 3, 6, 6))
    outs = [torch.empty(1, 6, 6), torch.empty(1, 3, 6, 6), torch.empty(1), torch.empty(1), torch.empty(1, 2),
            torch.empty(1, 3, 3), torch.empty(1, 4)]
    ptrs = [t.data_ptr() for t in outs]
    with pytest.raises(ValueError, match="required tensor 'gradients' got a null pointer"):
        cpp._ext.forward(A.data_ptr(), 0, I.data_ptr(), 0, 0, 0, 1, 2, 3, 3, 3, 6, 6, EPS, EPS_KL, *ptrs)
    with pytest.raises(ValueError, match="spatial sizes must be >= 1"):
        cpp._ext.forward(A.data_ptr(), G.data_ptr(), I.data_ptr(), 0, 0, 0, 1, 2, 0, 3, 3, 6, 6, EPS, EPS_KL, *ptrs)
    mask = torch.zeros(1, 6, 6)
    with pytest.raises(ValueError, match="mask given without has_mask"):
        cpp._ext.forward(A.data_ptr(), G.data_ptr(), I.data_ptr(), mask.data_ptr(), 0, 0, 1, 2, 3, 3, 3, 6, 6,
                         EPS, EPS_KL, *ptrs)
