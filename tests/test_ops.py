"""The fused saliency op: the reference (gradcheck, by hand), dispatch, validation, torch.library integration and
Grad-CAM. Backends against the reference: test_saliency_matrix.py."""
import inspect

import pytest
import torch

from megl import ops
from megl.ops import backends, fused_saliency, fused_saliency_reference, gap_linear_gradcam_gradients
from saliency_cases import make_inputs


# ----------------------------------------------------------------------------- the reference itself
@pytest.mark.parametrize("with_mask,with_prior", [(True, True), (True, False), (False, True), (False, False)])
def test_reference_gradcheck(with_mask, with_prior):
    A, G, I, mask, has_mask, prior = make_inputs((2, 3, 3, 4, 3, 7, 9), dtype=torch.float64)
    kw = dict(mask=mask if with_mask else None, has_mask=has_mask if with_mask else None, prior=prior if with_prior else None)
    # The full Jacobian of all four outputs: every grad_output, not just ones.
    assert torch.autograd.gradcheck(
        lambda a, g, i: fused_saliency_reference(a, g, i, **kw), tuple(t.requires_grad_() for t in (A, G, I))
    )


def test_reference_semantics_by_hand():
    # One sample, one channel, 1x2 map: z = alpha * A with alpha = mean(G) = 2.
    A = torch.tensor([[[[1.0, 3.0]]]], dtype=torch.float64)
    G = torch.full_like(A, 2.0)
    I = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    mask = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    out = fused_saliency_reference(A, G, I, mask, torch.tensor([True]), eps=0.0)
    torch.testing.assert_close(out.saliency, torch.tensor([[[0.0, 1.0]]], dtype=torch.float64))
    assert out.l1.item() == 0.0 and out.kl.item() == 0.0
    prior = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    out = fused_saliency_reference(A, G, I, prior=prior, eps=0.0, eps_kl=1e-15)
    # p = (0, 1), q = (1/2, 1/2): KL = 1 * log(1 / 0.5)  (eps_kl keeps 0 log 0 finite)
    assert abs(out.kl.item() - torch.log(torch.tensor(2.0, dtype=torch.float64)).item()) < 1e-9


# ----------------------------------------------------------------------------- through fused_saliency
# (every backend against the float64 reference: test_saliency_matrix.py)
CPU_BACKENDS = ["torch", "cpp"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    A, G, I, mask, has_mask, prior = make_inputs((3, 8, 7, 7, 3, 40, 40))
    A_nc = A.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    I_nc = I[:, :, ::1, :].permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    G_nc = gap_linear_gradcam_gradients(torch.randn(5, 8), torch.tensor([0, 4, 2]), (7, 7))  # an expanded view
    assert not A_nc.is_contiguous() and not I_nc.is_contiguous() and not G_nc.is_contiguous()
    got = fused_saliency(A_nc, G_nc, I_nc, mask, has_mask, prior, backend=backend)
    want = fused_saliency_reference(A, G_nc.contiguous(), I, mask, has_mask, prior)
    for o, r in zip(got, want):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- dispatch
def test_auto_dispatch_on_cpu_picks_cpp(monkeypatch):
    monkeypatch.delenv("MEGL_BACKEND", raising=False)
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpp"
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float64) == "torch"


def test_env_var_overrides_auto(monkeypatch):
    A, G, I, *_ = make_inputs((2, 3, 4, 4, 3, 16, 16))
    calls = []
    real = backends.load

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(backends, "load", spy)
    monkeypatch.setenv("MEGL_BACKEND", "torch")
    fused_saliency(A, G, I)
    assert calls == ["torch"]
    calls.clear()
    fused_saliency(A, G, I, backend="cpp")  # an explicit backend beats the env var
    assert calls == ["cpp"]


def test_cpp_and_triton_are_built():
    # CI installs the package the way a user does; both must be there on a CPU machine.
    assert backends.is_available("cpp"), backends.load("cpp")
    assert backends.is_available("triton"), backends.load("triton")


def test_unavailable_backend_names_the_fix():
    if torch.cuda.is_available():
        pytest.skip("the cuda backend is available on this machine")
    with pytest.raises(backends.BackendUnavailable, match="cuda.*pip install"):
        backends.load("cuda")


def test_extension_import_reasons():
    ext, reason = backends.import_extension("_no_such_extension")
    assert ext is None and "megl._no_such_extension could not be imported" in reason
    # A module without the kernels (a placeholder or an old build) is refused as stale, not used.
    ext, reason = backends.import_extension("ops.reference")
    assert ext is None and "stale build" in reason and "rebuild" in reason


def test_backend_names_agree_with_the_messages():
    assert inspect.ismodule(ops.reference)  # the submodule, not shadowed by a function of that name
    assert "reference" in backends.available_backends()
    with pytest.raises(ValueError, match="unknown megl backend module 'reference'; choose one of torch, cpp, cuda, "
                                         "triton; 'reference' has no module: use fused_saliency"):
        backends.load("reference")


def test_mask_without_has_mask_means_every_sample_is_annotated():
    A, G, I, mask, _, prior = make_inputs((2, 3, 4, 4, 3, 16, 16))
    for backend in ("reference", "cpp"):
        got = fused_saliency(A, G, I, mask, None, prior, backend=backend)
        want = fused_saliency(A, G, I, mask, torch.ones(2, dtype=torch.bool), prior, backend=backend)
        for o, r in zip(got, want):
            assert torch.equal(o, r), backend
        assert (got.l1 > 0).all() and (got.kl == 0).all()


def test_unknown_backend():
    A, G, I, *_ = make_inputs((1, 2, 2, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="unknown megl backend 'fast'"):
        fused_saliency(A, G, I, backend="fast")


# ----------------------------------------------------------------------------- validation
def _valid():
    return make_inputs((2, 4, 3, 3, 3, 12, 12))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(A=a["A"][0]), "activations must be 4-D"),
        (lambda a: a.update(G=a["G"][:, :2]), "gradients .* must have the shape of activations"),
        (lambda a: a.update(I=a["I"][:1]), "batch sizes differ"),
        (lambda a: a.update(I=a["I"][:, :, :2, :2]), "smaller than the Grad-CAM map"),
        (lambda a: a.update(mask=a["mask"][:, :5]), "mask must have shape"),
        (lambda a: a.update(mask=None), "has_mask was given without mask"),
        (lambda a: a.update(has_mask=a["has_mask"][:1]), "has_mask must have shape"),
        (lambda a: a.update(prior=a["prior"][:3]), "prior must have shape"),
        (lambda a: a.update(A=a["A"].long()), "floating-point"),
        (lambda a: a.update(prior=a["prior"].to("meta")), "prior is on meta"),
    ],
)
def test_validation_errors(mutate, match):
    A, G, I, mask, has_mask, prior = _valid()
    args = dict(A=A, G=G, I=I, mask=mask, has_mask=has_mask, prior=prior)
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_saliency(args["A"], args["G"], args["I"], args["mask"], args["has_mask"], args["prior"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["activations", "gradients"])
def test_non_finite_inputs_are_named(bad, which):
    A, G, I, *_ = _valid()
    (A if which == "activations" else G)[1, 2, 0, 0] = bad
    with pytest.raises(ValueError, match=f"{which} contain NaN or Inf"):
        fused_saliency(A, G, I)


def test_cpp_rejects_double_with_a_fix():
    A, G, I, *_ = make_inputs((1, 2, 2, 2, 3, 4, 4), dtype=torch.float64)
    with pytest.raises(TypeError, match="float64.*backend='torch'"):
        fused_saliency(A, G, I, backend="cpp")


# ----------------------------------------------------------------------------- torch.library integration
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    A, G, I, mask, has_mask, prior = make_inputs((2, 4, 3, 5, 3, 11, 13))
    torch.library.opcheck(
        torch.ops.megl.fused_saliency_fwd.default, (A.requires_grad_(), G, I, mask, has_mask, prior, 1e-8, 1e-8, backend)
    )


def test_torch_compile_fullgraph_matches_eager():
    A, G, I, mask, has_mask, prior = make_inputs((2, 8, 4, 4, 3, 32, 32))
    weight = torch.randn(5, 8, requires_grad=True)
    target = torch.tensor([1, 3])

    def step(A, weight, I):
        G = gap_linear_gradcam_gradients(weight, target, (4, 4))
        out = fused_saliency(A, G, I, mask, has_mask, prior)
        return out.l1.mean() + out.kl.mean() + out.masked.square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(A, weight, I)
    (g_got,) = torch.autograd.grad(got, weight)
    want = step(A, weight, I)
    (g_want,) = torch.autograd.grad(want, weight)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


# ----------------------------------------------------------------------------- Grad-CAM itself
def test_closed_form_gradients_equal_autograd():
    torch.manual_seed(0)
    feats = torch.randn(3, 6, 4, 5, requires_grad=True)
    head = torch.nn.Linear(6, 4)
    logits = head(feats.mean(dim=(2, 3)))
    target = torch.tensor([0, 3, 1])
    want = ops.autograd_gradcam_gradients(logits, feats, target)
    got = gap_linear_gradcam_gradients(head.weight, target, (4, 5))
    torch.testing.assert_close(got, want)
    # and it stays differentiable w.r.t. the weight (what makes the visual loss train the head)
    assert got.requires_grad


def test_gradcam_matches_captum_on_resnet18():
    captum_attr = pytest.importorskip("captum.attr")
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(2, 3, 224, 224)
    target = torch.tensor([3, 7])
    feats = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: feats.update(a=o))
    with torch.no_grad():
        model(x)
    handle.remove()
    G = gap_linear_gradcam_gradients(model.fc.weight.detach(), target, feats["a"].shape[-2:])
    ours = fused_saliency(feats["a"], G, x).saliency

    cam = captum_attr.LayerGradCam(model, model.layer4).attribute(x, target=target, relu_attributions=True)
    lo = cam.amin(dim=(2, 3), keepdim=True)
    hi = cam.amax(dim=(2, 3), keepdim=True)
    cam = (cam - lo) / (hi - lo + 1e-8)  # the op's normalisation: min-max at the map's resolution
    theirs = captum_attr.LayerAttribution.interpolate(cam, (224, 224), interpolate_mode="bilinear").squeeze(1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
