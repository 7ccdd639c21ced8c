"""The C++/OpenMP backend at the contract level (megl.ops.backends.cpp against torch_explicit, the executable spec):
every output of forward and backward including alpha / cam / stats, thread-count independence, determinism,
bilinear taps, degenerate maps, and the errors of the glue and the extension. The generic backend-vs-reference
checks through `fused_saliency` and autograd live in test_ops.py."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from megl.ops.backends import torch_explicit as spec

from megl.ops.backends import cpp

# test_ops.py::test_cpp_and_triton_are_built fails when the extension is missing; here that is a skip, not 20 errors
pytestmark = pytest.mark.skipif(not cpp.available(), reason=f"cpp backend not built: {cpp.UNAVAILABLE_REASON}")

EPS, EPS_KL = 1e-8, 1e-8
ISAS = cpp._ext.available_isas() if cpp.available() else []


@pytest.fixture(autouse=True, params=ISAS)
def isa(request):
    """Every test runs on each kernel variant this CPU can run (generic SIMD width, and AVX2 where present)."""
    cpp._ext.set_isa(request.param)
    try:
        yield request.param
    finally:
        cpp._ext.set_isa("auto")
FWD_NAMES = ("saliency", "masked", "l1", "kl", "alpha", "cam", "stats")
BWD_NAMES = ("d activations", "d gradients", "d image")


def make(B=3, K=5, h=4, w=6, H=37, W=29, C=3, *, seed=0, has=(True, False, True), mask=True, prior=True):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, K, h, w, generator=g).relu()
    G = torch.randn(B, K, h, w, generator=g) * 0.1 + 0.02
    I = torch.rand(B, C, H, W, generator=g)
    m = torch.rand(B, H, W, generator=g) * (torch.rand(B, H, W, generator=g) > 0.5) if mask else None
    has_mask = torch.tensor([has[b % len(has)] for b in range(B)]) if mask else None
    p = torch.rand(H, W, generator=g) if prior else None
    return A, G, I, m, has_mask, p


def grad_outputs(B, C, H, W, *, seed=1, grad_s=True, grad_masked=True):
    g = torch.Generator().manual_seed(seed)
    gs = torch.randn(B, H, W, generator=g) if grad_s else None
    gm = torch.randn(B, C, H, W, generator=g) if grad_masked else None
    return gs, gm, torch.randn(B, generator=g), torch.randn(B, generator=g)


def assert_rel(got, want, rtol, what):
    """max |got - want| <= rtol * max |want| (relative to the tensor's scale: some gradients are ~1/eps)."""
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale + 1e-30, f"{what}: max error {err:.3g} > {rtol:g} * scale {scale:.3g}"


@contextlib.contextmanager
def threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_both(inputs, grads):
    """Forward of cpp and of the spec; both backwards fed the spec's saved tensors, so that they see the same s/cam."""
    A, G, I, mask, has_mask, prior = inputs
    fwd_ref = spec.forward(A, G, I, mask, has_mask, prior, EPS, EPS_KL)
    fwd_cpp = cpp.forward(A, G, I, mask, has_mask, prior, EPS, EPS_KL)
    s, alpha, cam, stats = fwd_ref[0], fwd_ref[4], fwd_ref[5], fwd_ref[6]
    args = (*grads, A, G, I, mask, has_mask, prior, s, alpha, cam, stats, EPS, EPS_KL)
    return fwd_cpp, fwd_ref, cpp.backward(*args), spec.backward(*args)


# ----------------------------------------------------------------------------- against the spec
CONFIGS = {
    "mask and prior": dict(),
    "no annotated sample": dict(has=(False,)),
    "all annotated": dict(has=(True,)),
    "mask None": dict(mask=False),
    "prior None": dict(prior=False),
    "neither": dict(mask=False, prior=False),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("grad_s,grad_masked", [(True, True), (False, True), (True, False), (False, False)])
def test_forward_and_backward_match_the_spec(config, grad_s, grad_masked):
    inputs = make(**CONFIGS[config])
    B, C, H, W = inputs[2].shape
    fc, fr, bc, br = run_both(inputs, grad_outputs(B, C, H, W, grad_s=grad_s, grad_masked=grad_masked))
    for name, got, want in zip(FWD_NAMES, fc, fr):
        if name == "stats" and inputs[5] is None:  # sum(prior + eps_kl) is unused without a prior
            got, want = got[:, :3], want[:, :3]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_rel(got, want, 1e-5, f"forward {name} ({config})")
    for name, got, want in zip(BWD_NAMES, bc, br):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_rel(got, want, 1e-4, f"backward {name} ({config}, grad_s={grad_s}, grad_masked={grad_masked})")
    if not grad_masked:
        assert torch.equal(bc[2], torch.zeros_like(bc[2]))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 7, 1, 1, 9, 5), (2, 3, 5, 9, 5, 9), (1, 4, 7, 7, 17, 16),
                                   (2, 8, 3, 2, 224, 33)])
@pytest.mark.parametrize("C", [1, 3, 4])
def test_odd_shapes_and_channel_counts(shape, C):
    B, K, h, w, H, W = shape
    inputs = make(B, K, h, w, H, W, C, has=(False, True))
    fc, fr, bc, br = run_both(inputs, grad_outputs(B, C, H, W))
    for name, got, want in zip(FWD_NAMES, fc, fr):
        assert_rel(got, want, 1e-5, f"forward {name} {shape} C={C}")
    # gA, gI; gG is checked by the next test (with K = 1 or a 1x1 map it is pure cancellation, true value 0)
    for name, got, want in zip(BWD_NAMES, bc, br):
        if name != "d gradients" or (K > 1 and h * w > 1):
            assert_rel(got, want, 1e-4, f"backward {name} {shape} C={C}")


def test_gradient_of_gradients_is_exactly_cancelling_for_one_channel():
    # With K = 1, alpha only scales cam, and min-max normalisation is scale invariant: d/dG = 0 exactly.
    # Both backends then return rounding noise; it must stay at rounding level of the summed terms.
    inputs = make(2, 1, 5, 6, 31, 23)
    fc, fr, bc, br = run_both(inputs, grad_outputs(2, 3, 31, 23))
    A, alpha = inputs[0], fr[4]
    terms = (br[0].abs().max() / alpha.abs().max()) * A.abs().max()  # the size of g_z * A summed in gG
    assert bc[1].abs().max() <= 1e-6 * terms


def test_constant_cam_and_relu_killing_everything():
    # Constant cam (integer activations, alpha = 0.25: every backend computes it exactly): max = min, n = 0,
    # gradients ~ 1/eps. Compared relative to their scale.
    B, K, h, w, H, W = 2, 6, 5, 7, 23, 41
    A = torch.randint(1, 4, (B, K, 1, 1)).float().expand(B, K, h, w).contiguous()
    G = torch.full((B, K, h, w), 0.25)
    _, _, I, mask, has_mask, prior = make(B, K, h, w, H, W, has=(True, False))
    fc, fr, bc, br = run_both((A, G, I, mask, has_mask, prior), grad_outputs(B, 3, H, W))
    assert torch.equal(fc[0], torch.zeros_like(fc[0]))
    assert br[0].abs().max() > 1e3  # the 1/eps regime, so the comparison below means something
    for name, got, want in zip(BWD_NAMES, bc, br):
        if name != "d gradients":
            assert_rel(got, want, 1e-4, f"constant cam {name}")
    # all z <= 0: relu kills every entry; s = 0, p uniform, no gradient reaches A or G
    fc, fr, bc, br = run_both((A, -G, I, mask, has_mask, prior), grad_outputs(B, 3, H, W))
    assert torch.equal(fc[0], torch.zeros_like(fc[0]))
    assert_rel(fc[3], fr[3], 1e-5, "relu-killed kl")
    assert torch.equal(bc[0], torch.zeros_like(bc[0])) and torch.equal(bc[1], torch.zeros_like(bc[1]))
    assert_rel(bc[2], br[2], 1e-6, "relu-killed d image")


def test_prior_with_zeros_and_uniform_saliency():
    A, G, I, mask, has_mask, prior = make(3, 4, 7, 7, 64, 48, has=(False,))
    prior[:20] = 0  # q = eps_kl / sum there: log q ~ -30, the KL and its gradient are large
    fc, fr, bc, br = run_both((A, G, I, mask, has_mask, prior), grad_outputs(3, 3, 64, 48, grad_s=False,
                                                                                grad_masked=False))
    assert_rel(fc[3], fr[3], 1e-5, "kl with zeros in the prior")
    for name, got, want in zip(BWD_NAMES, bc, br):
        assert_rel(got, want, 1e-4, f"kl-only {name}")


def test_saliency_is_torch_bilinear_upsampling():
    # An exact cam (integer activations, alpha a power of two), so both sides upsample the same n: the taps and
    # weights must be F.interpolate's (align_corners=False) for up-scales that are not integer. A wrong tap or a
    # half-pixel shift costs ~1e-2; what remains is rounding order (ATen's kernel sums in its own), a few ulps.
    for (h, w), (H, W) in [((2, 3), (7, 11)), ((5, 9), (33, 47)), ((7, 7), (224, 224)), ((3, 1), (3, 13))]:
        A = torch.randint(0, 8, (1, 2, h, w)).float()
        G = torch.full((1, 2, h, w), 0.5)
        I = torch.ones(1, 1, H, W)
        s = cpp.forward(A, G, I, None, None, None, EPS, EPS_KL)[0]
        c = (0.5 * A.sum(1)).clamp_min(0)
        n = (c - c.amin()) / (c.amax() - c.amin() + EPS)
        want = F.interpolate(n[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(s, want, rtol=0, atol=5e-7, msg=lambda m: f"{(h, w)} -> {(H, W)}: {m}")


def test_empty_batch_and_no_channels():
    # Empty tensors may have a null data pointer; the extension must not mistake them for missing inputs.
    A, G, I, mask, has_mask, prior = make(0, 4, 3, 3, 8, 8)
    out = cpp.forward(A, G, I, mask, has_mask, prior, EPS, EPS_KL)
    assert [tuple(t.shape) for t in out] == [(0, 8, 8), (0, 3, 8, 8), (0,), (0,), (0, 4), (0, 3, 3), (0, 4)]
    grads = cpp.backward(None, None, torch.zeros(0), torch.zeros(0), A, G, I, mask, has_mask, prior,
                         out[0], out[4], out[5], out[6], EPS, EPS_KL)
    assert [tuple(t.shape) for t in grads] == [(0, 4, 3, 3), (0, 4, 3, 3), (0, 3, 8, 8)]
    # K = 0: cam = 0 everywhere, s = 0, still a KL and an image gradient
    fc, fr, bc, br = run_both(make(2, 0, 3, 3, 8, 8, has=(True, False)), grad_outputs(2, 3, 8, 8))
    for name, got, want in zip(FWD_NAMES + BWD_NAMES, fc + bc, fr + br):
        assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-7), name


# ----------------------------------------------------------------------------- threads and determinism
def test_results_do_not_depend_on_the_thread_count():
    # 3 samples x 4 row tasks: every thread count splits the work differently; the sums must not care.
    inputs = make(3, 9, 5, 7, 61, 45, has=(True, False, False))
    grads = grad_outputs(3, 3, 61, 45)
    results = []
    for n in (1, 2, 3):
        with threads(n):
            A, G, I, mask, has_mask, prior = inputs
            fwd = cpp.forward(A, G, I, mask, has_mask, prior, EPS, EPS_KL)
            s, alpha, cam, stats = fwd[0], fwd[4], fwd[5], fwd[6]
            bwd = cpp.backward(*grads, A, G, I, mask, has_mask, prior, s, alpha, cam, stats, EPS, EPS_KL)
            results.append(fwd + bwd)
    for n, other in zip((2, 3), results[1:]):
        for name, a, b in zip(FWD_NAMES + BWD_NAMES, results[0], other):
            assert torch.equal(a, b), f"{name} differs between 1 and {n} threads"


def test_repeated_calls_are_bitwise_identical():
    inputs = make(2, 6, 7, 7, 50, 50, has=(False, True))
    grads = grad_outputs(2, 3, 50, 50)
    first = run_both(inputs, grads)
    for _ in range(3):
        again = run_both(inputs, grads)
        for a, b in zip(first[0] + first[2], again[0] + again[2]):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- errors
def test_glue_rejects_what_the_kernels_cannot_read():
    A, G, I, mask, has_mask, prior = make(2, 3, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="image must be a contiguous torch.float32 CPU tensor.*not contiguous"):
        cpp.forward(A, G, I.transpose(2, 3), mask, has_mask, prior, EPS, EPS_KL)
    with pytest.raises(ValueError, match="activations must be a contiguous torch.float32 CPU tensor, got torch.float64"):
        cpp.forward(A.double(), G, I, mask, has_mask, prior, EPS, EPS_KL)
    with pytest.raises(ValueError, match="prior must be a contiguous torch.float32"):
        cpp.forward(A, G, I, mask, has_mask, prior.half(), EPS, EPS_KL)


def test_extension_rejects_null_pointers_and_bad_shapes():
    A, G, I, *_ = make(1, 2, 3, 3, 6, 6)
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


def test_isa_selection_and_its_errors(isa):
    assert cpp._ext.isa() == isa
    cpp._ext.set_isa("auto")
    assert cpp._ext.isa() == ISAS[-1]  # the widest variant the CPU runs
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        cpp._ext.set_isa("sse9")
    if "avx2" not in ISAS:
        with pytest.raises(ValueError, match="AVX2"):
            cpp._ext.set_isa("avx2")
