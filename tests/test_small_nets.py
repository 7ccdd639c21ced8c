"""The DecoyMNIST backbones (megl.models.small): Grad-CAM of the cnn against autograd and Captum, contextual
decomposition through both nets, the mlp's clear Grad-CAM error, and every method for two steps."""
from __future__ import annotations

import pytest
import torch

from megl.config import RANDOM_STANDINS, Config
from megl.data import collate, load_splits, mean_mask_prior
from megl.losses.cdep import RELU_RULES, _resnet_and_input, contextual_decomposition
from megl.models import build_classifier, build_model, train_tokenizer
from megl.models.small import GradCAMUnsupported, MLPClassifier, SmallCNNClassifier
from megl.ops import fused_saliency

DT = torch.float64
GRADCAM_METHODS = ("megl", "gradia", "haics", "res-g", "res-l")


@pytest.mark.parametrize("size,channels,layer,grid", [(28, 1, "conv2", 8), (36, 3, "conv2", 12), (28, 1, "conv1", 24)])
def test_cnn_gradcam_matches_autograd_and_captum(size, channels, layer, grid):
    from captum.attr import LayerGradCam

    torch.manual_seed(0)
    clf = SmallCNNClassifier(10, size, in_channels=channels, gradcam_layer=layer).double().eval()
    assert clf.grid == (grid, grid) and clf.feature_grid == ((size - 4) // 2 - 4,) * 2
    x = torch.rand(3, 3, size, size, dtype=DT)
    if channels == 1:
        x = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)  # grey, as the loader gives it
    target = torch.tensor([1, 4, 7])
    out = clf(x)
    grads = clf.gradcam_gradients(out, target, create_graph=True)
    # differentiable, for the training losses
    assert grads.shape == (3, 50 if layer == "conv2" else 20, grid, grid) and grads.requires_grad
    # autograd via a hook on the tapped layer (the second conv's ReLU)
    store = {}
    layer = clf.net.features[clf.tap - 1]
    h = layer.register_forward_hook(lambda m, i, o: store.update(a=o) or o.retain_grad())
    logits = clf(x).logits
    h.remove()
    logits.gather(1, target[:, None]).sum().backward()
    torch.testing.assert_close(grads, store["a"].grad)
    cam = torch.relu((grads.mean((2, 3), keepdim=True) * out.activations).sum(1))
    ref = LayerGradCam(lambda t: clf(t).logits, layer).attribute(x, target=target, relu_attributions=True)
    torch.testing.assert_close(cam, ref[:, 0])
    sal = fused_saliency(out.activations, grads, x, backend="reference").saliency  # what the losses compare
    assert sal.shape == (3, size, size) and float(sal.detach().min()) >= 0 and float(sal.detach().max()) <= 1
    # explain_forward: the same logits and gradients without the graph below the tap
    e = clf.explain_forward(x)
    torch.testing.assert_close(e.logits, out.logits)
    torch.testing.assert_close(clf.gradcam_gradients(e, target, create_graph=False), grads)


def test_mlp_is_the_rrr_net_and_refuses_gradcam_clearly():
    clf = MLPClassifier(10, 28)
    assert [p.shape for p in clf.parameters()] == [(50, 784), (50,), (30, 50), (30,), (10, 30), (10,)]
    out = clf(torch.rand(2, 3, 28, 28))
    assert out.logits.shape == (2, 10) and not clf.has_gradcam
    with pytest.raises(GradCAMUnsupported, match="needs a convolutional backbone"):
        clf.gradcam_gradients(out, torch.tensor([0, 1]))
    for method in GRADCAM_METHODS:
        with pytest.raises(ValueError, match="convolutional backbone"):
            Config(backbone="mlp", method=method, image_size=32).validate()  # 32: the synthetic data's least


@pytest.mark.parametrize("backbone,mlp_input", [("mlp", "unit"), ("mlp", "signed"), ("cnn", "unit")])
def test_contextual_decomposition_sums_to_the_logits(backbone, mlp_input):
    torch.manual_seed(0)
    clf = build_classifier(Config(backbone=backbone, image_size=28, mlp_input=mlp_input), 10).double()
    image = torch.rand(2, 3, 28, 28, dtype=DT)
    with torch.no_grad():
        net, x = _resnet_and_input(clf, image)
        blob = (torch.rand(2, 28, 28) > 0.5).to(DT)
        for rule in RELU_RULES:
            rel, irrel = contextual_decomposition(net, x, blob, rule)
            torch.testing.assert_close(rel + irrel, clf(image).logits, rtol=1e-8, atol=1e-8)
        # nothing in the group: no share of the logits beyond the biases' split
        rel0, _ = contextual_decomposition(net, x, torch.zeros(2, 28, 28, dtype=DT))
    assert rel0.abs().max() < 1e-12


def test_signed_mlp_input_makes_blank_pixels_count_for_cd():
    """With pixels in [-1, 1] a blank (black) region is -1, not 0, so CD charges it to its group: the reason the
    option exists (docs/decoy_mnist.md)."""
    torch.manual_seed(0)
    black = torch.zeros(2, 3, 28, 28, dtype=DT)
    corner = torch.zeros(2, 28, 28, dtype=DT)
    corner[:, :4, :4] = 1
    rel = {}
    for mode in ("unit", "signed"):
        torch.manual_seed(0)
        clf = MLPClassifier(10, 28, input_range=mode).double()
        with torch.no_grad():
            net, x = _resnet_and_input(clf, black)
            assert float(x.min()) == (-1.0 if mode == "signed" else 0.0)
            rel[mode] = contextual_decomposition(net, x, corner)[0]
    assert rel["unit"].abs().max() == 0 and rel["signed"].abs().max() > 1e-3
    with pytest.raises(ValueError, match="mlp_input"):
        Config(backbone="mlp", method="baseline", image_size=32, mlp_input="zero-one").validate()


@pytest.fixture(scope="module")
def decoy_root(tmp_path_factory):
    from test_decoy_mnist import write_mnist  # tests/ is on sys.path (pytest prepends it)
    from megl.data.convert import main as convert

    tmp = tmp_path_factory.mktemp("decoy")
    out = tmp / "digit"
    convert(["decoy-mnist", "--mnist", str(write_mnist(tmp / "mnist")), "--out", str(out), "--mask", "digit",
             "--mask-fraction", "0.5", "--n-train", "16", "--n-val", "4", "--n-test", "4"])
    return out


def _model(root, backbone, method):
    backbone, _, layer = backbone.partition("-")
    cfg = Config(backbone=backbone, method=method, image_size=28, data_root=str(root), tokenizer_vocab_size=300,
                 **RANDOM_STANDINS,
                 cnn_gradcam_layer=layer or "conv2",
                 tiny_llm_hidden=32, tiny_clip_width=32, clip_image_size=32, saliency_backend="reference").validate()
    splits = load_splits(root, image_size=28)
    train = splits["train"]
    tok = train_tokenizer([t for r in train.records for t in r.references], train.class_names, 300)
    model = build_model(cfg, train.class_names, tok)
    return model, train, mean_mask_prior(train)


@pytest.mark.parametrize("backbone,method", [("cnn", m) for m in ("baseline", "rrr", "cdep") + GRADCAM_METHODS]
                         + [("mlp", m) for m in ("baseline", "rrr", "cdep")] + [("cnn-conv1", "megl")])
def test_every_method_trains_two_steps(decoy_root, backbone, method, one_thread):
    from megl.train import make_optimizer

    model, train, prior = _model(decoy_root, backbone, method)
    opt = make_optimizer(model, model.config)
    before = [p.detach().clone() for p in model.classifier.parameters()]
    ds = train.expanded(False)
    for step in range(2):
        batch = collate([ds[i] for i in range(8 * step, 8 * step + 8)])
        terms = model(batch, prior)
        assert torch.isfinite(terms["total"])
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.classifier.parameters()))
    if method != "baseline":  # the explanation term is there and not trivially zero on a batch with masks
        assert float(terms.get("visual", terms.get("text"))) > 0
    if method == "megl":
        assert {"l1", "kl", "text"} <= set(terms)
