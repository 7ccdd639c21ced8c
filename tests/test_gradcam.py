"""megl.GradCAM: agreement with pytorch-grad-cam per family, closed-form detection, hook hygiene, errors, gradients,
no graph under no_grad, autocast, the functional losses and torchvision backbones in megl's classifier contract."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import megl
from megl.gradcam import GradCAM, NotReachingLogits
from megl.models.torchvision_backbones import default_target_layer

S = 64  # image side: the smallest at which every family below has a Grad-CAM map of at least 2x2


def calibrate(model: nn.Module, size: int = S) -> nn.Module:
    """Random init, BatchNorm statistics from two random batches (the defaults make some nets' features vanish,
    and a map of 1e-15 values is all rounding), Linear weights large enough for non-trivial maps; eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.05)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 3, size, size))
    return model.eval()


def tiny_vit(num_classes=5):
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=S, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=num_classes)


def tiny_swin(num_classes=5):
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=num_classes)


FAMILIES = {  # name -> (builder, family for the default layer, expected path)
    # resnet50's blocks with narrower 3x3 convs (width_per_group 16): the same code path at a quarter of the cost;
    # benchmarks/test_bench_gradcam.py::test_full_size_agreement runs the stock nets at 224 px
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=5, width_per_group=16), "resnet50", "closed-form"),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=5), "densenet121", "autograd"),
    "mobilenet_v3_large": (lambda: torchvision.models.mobilenet_v3_large(num_classes=5), "mobilenet_v3_large",
                           "autograd"),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=5), "efficientnet_b0", "closed-form"),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=5), "convnext_tiny", "autograd"),
    "vit (2 blocks)": (tiny_vit, "vit_b_16", "autograd"),
    "swin (2 stages)": (tiny_swin, "swin_t", "closed-form"),
}


def pgc_map(model, layer, reshape, x, targets):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    # clone: pytorch-grad-cam keeps the activation tensor itself on CPU (a copy on GPU), so an in-place op after
    # the layer (DenseNet's ReLU) would change what it reads; the clone gives its GPU behaviour on CPU
    transform = (lambda t: reshape(t).clone()) if reshape is not None else (lambda t: t.clone())
    cam = pgc.GradCAM(model=model, target_layers=[layer], reshape_transform=transform)
    try:
        return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets]))
    finally:
        cam.activations_and_grads.release()


def renormalise(s):  # pytorch-grad-cam min-max normalises again after its resize
    lo, hi = s.amin(dim=(1, 2), keepdim=True), s.amax(dim=(1, 2), keepdim=True)
    return (s - lo) / (hi - lo + 1e-7)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_map_equals_pytorch_grad_cam_and_trains(name):
    build, family, expected_mode = FAMILIES[name]
    torch.manual_seed(0)
    model = calibrate(build())
    layer, reshape = default_target_layer(family)
    x = torch.rand(3, 3, S, S, generator=torch.Generator().manual_seed(1))
    cam = GradCAM(model, layer, reshape)
    out = cam(x)
    if bool((out.saliency.detach().amax(dim=(1, 2)) == 0).any()):
        # an empty map (every gradient-weighted sum negative: common for random transformers) has no gradient;
        # explain, per sample, the class whose map is largest instead
        raw = [torch.relu((o.gradients.mean((2, 3), keepdim=True) * o.activations).sum(1)).amax(dim=(1, 2))
               for o in (cam(x, targets=c) for c in range(5))]
        out = cam(x, targets=torch.stack(raw, 1).argmax(1))
    assert cam.mode == out.mode == expected_mode
    assert out.saliency.shape == (3, S, S) and out.logits.shape == (3, 5) and out.masked.shape == x.shape
    assert out.saliency.dtype == torch.float32
    ref = pgc_map(model, cam.layer, reshape, x, out.targets)
    assert float((renormalise(out.saliency.detach()) - ref).abs().max()) < 1e-4
    # a loss on the map reaches parameters below the target layer, not only the head
    model.zero_grad()
    (out.saliency * torch.rand_like(out.saliency)).sum().backward()
    below = [p for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(below) > 2, "the saliency loss moved (almost) no parameters"
    first = next(model.parameters())  # the stem
    assert first.grad is not None and first.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- closed form: detection and value
class GapNet(nn.Module):
    def __init__(self, tail: nn.Module = None, p: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1))
        self.act = nn.ReLU()
        self.tail = tail if tail is not None else nn.Identity()
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        a = self.tail(self.act(self.body(x)))
        return self.fc(self.drop(torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)))


def test_closed_form_detected_and_equal_to_autograd():
    torch.manual_seed(0)
    net = GapNet()
    x = torch.rand(3, 3, 16, 16)
    closed, auto = GradCAM(net, "act"), GradCAM(net, "act", closed_form=False)
    a, b = closed(x), auto(x)
    assert (closed.mode, auto.mode) == ("closed-form", "autograd")
    torch.testing.assert_close(a.gradients, b.gradients, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.saliency, b.saliency, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(a.saliency.square().sum(), list(net.parameters()), allow_unused=True)
    gb = torch.autograd.grad(b.saliency.square().sum(), list(net.parameters()), allow_unused=True)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("inplace", [False, True])  # EfficientNet's head: Dropout(inplace=True)
def test_closed_form_with_dropout_in_train_mode_uses_this_calls_mask(inplace):
    net = GapNet(p=0.5).train()
    net.drop.inplace = inplace
    x = torch.rand(3, 3, 16, 16)
    closed, auto = GradCAM(net, "act"), GradCAM(net, "act", closed_form=False)
    torch.manual_seed(3)
    a = closed(x)
    torch.manual_seed(3)
    b = auto(x)
    assert closed.mode == "closed-form" and net.training
    live = a.activations.mean(dim=(2, 3)) != 0  # a channel that is 0 everywhere hides its dropout mask
    assert bool(live.float().mean() > 0.5)
    torch.testing.assert_close(a.gradients[live], b.gradients[live], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.saliency, b.saliency, rtol=1e-5, atol=1e-6)


def test_closed_form_keeps_each_forwards_dropout_mask_with_its_output():
    # MEGL's background term runs a second forward (another batch size) before the first one's gradients
    cam = GradCAM(GapNet(p=0.5).train(), "act")
    cam(torch.rand(2, 3, 16, 16))  # the first call picks the path
    t = torch.zeros(4, dtype=torch.long)
    _, raw = cam.forward(torch.rand(4, 3, 16, 16))
    scale = cam.dropout_scale(raw)
    expected = cam.gradients(None, raw, t)
    _, other = cam.forward(torch.rand(2, 3, 16, 16))
    with pytest.raises(RuntimeError, match="another forward has run since"):
        cam.gradients(None, raw, t)
    torch.testing.assert_close(cam.gradients(None, raw, t, dropout_scale=scale), expected)
    assert cam.gradients(None, other, t[:2]).shape[0] == 2


@pytest.mark.parametrize("layer,tail,why", [
    ("body", None, "ReluBackward"),  # a ReLU between the layer and the pooling
    ("act", nn.Conv2d(16, 16, 1), "ConvolutionBackward"),
])
def test_closed_form_not_detected_when_something_else_follows(layer, tail, why):
    torch.manual_seed(0)
    net = GapNet(tail)
    cam = GradCAM(net, layer)
    cam(torch.rand(2, 3, 16, 16))
    assert cam.mode == "autograd" and why in cam.reason
    with pytest.raises(ValueError, match="closed form does not apply"):
        GradCAM(net, layer, closed_form=True)(torch.rand(2, 3, 16, 16))


def test_closed_form_not_detected_for_a_scaled_head():
    class Scaled(GapNet):
        def forward(self, x):
            return 2.0 * super().forward(x)

    cam = GradCAM(Scaled(), "act")
    cam(torch.rand(2, 3, 16, 16))
    assert cam.mode == "autograd" and "not the output of an nn.Linear" in cam.reason


# ----------------------------------------------------------------------------- hygiene
def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_after_calls_and_after_an_exception():
    net = GapNet()
    with GradCAM(net, "act") as cam:
        cam(torch.rand(2, 3, 16, 16))
        assert _hook_count(net) == 0
        cam(torch.rand(2, 3, 16, 16))
        assert _hook_count(net) == 0

    class Boom(GapNet):
        def forward(self, x):
            self.act(self.body(x))
            raise RuntimeError("boom")

    boom = Boom()
    cam = GradCAM(boom, "act")
    with pytest.raises(RuntimeError, match="boom"):
        cam(torch.rand(2, 3, 16, 16))
    assert _hook_count(boom) == 0


def test_mode_left_alone_no_graph_under_no_grad_and_batched():
    torch.manual_seed(0)
    for net, layer in ((GapNet(), "act"), (GapNet(nn.Conv2d(16, 16, 1)), "act")):  # closed form, autograd
        for training in (True, False):
            net.train(training)
            cam = GradCAM(net, layer)
            with torch.no_grad():
                out = cam(torch.rand(3, 3, 16, 16))
            assert net.training is training
            assert not out.saliency.requires_grad and out.logits.grad_fn is None and out.gradients.grad_fn is None
            with torch.inference_mode():
                out = cam(torch.rand(3, 3, 16, 16))
            assert not out.saliency.requires_grad
            out = cam(torch.rand(3, 3, 16, 16), targets=[0, 1, 2])
            assert out.saliency.requires_grad and out.targets.tolist() == [0, 1, 2]


def test_bf16_autocast_gives_float32_maps():
    torch.manual_seed(0)
    net = GapNet()
    x = torch.rand(2, 3, 16, 16)
    cam = GradCAM(net, "act")
    ref = cam(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cam(x, targets=ref.targets)
    assert out.saliency.dtype == torch.float32
    assert float((out.saliency - ref.saliency).detach().abs().max()) < 0.1
    out.saliency.sum().backward()
    assert net.body[0].weight.grad is not None


# ----------------------------------------------------------------------------- errors
def test_bad_layer_path_names_the_children():
    with pytest.raises(ValueError, match=r"no submodule 'actt'.*did you mean 'act'"):
        GradCAM(GapNet(), "actt")
    with pytest.raises(ValueError, match="not a submodule"):
        GradCAM(GapNet(), nn.ReLU())


def test_layer_that_does_not_reach_the_logits_names_a_better_one():
    torch.manual_seed(0)
    vit = tiny_vit()
    nn.init.normal_(vit.heads.head.weight, std=0.05)
    from megl.gradcam import vit_reshape

    cam = GradCAM(vit, "encoder.layers.-1", vit_reshape)  # the last block's output: the head reads its CLS only
    with pytest.raises(NotReachingLogits, match=r"encoder\.layers\.-1\.ln_1"):
        cam(torch.rand(2, 3, S, S))
    net = GapNet()
    net.side = nn.Conv2d(3, 4, 1)  # never called by forward
    with pytest.raises(RuntimeError, match="did not run"):
        GradCAM(net, "side")(torch.rand(2, 3, 8, 8))


def test_bad_inputs():
    cam = GradCAM(GapNet(), "act")
    with pytest.raises(ValueError, match="4-D"):
        cam(torch.rand(3, 16, 16))
    with pytest.raises(TypeError, match="floating point"):
        cam(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        cam(torch.rand(2, 3, 16, 16), targets=[0, 7])
    with pytest.raises(ValueError, match="images are on meta"):
        cam(torch.rand(2, 3, 16, 16, device="meta"))
    with pytest.raises(ValueError, match="2 class indices"):
        cam(torch.rand(2, 3, 16, 16), targets=[0, 1, 2])


# ----------------------------------------------------------------------------- losses as functions
def test_functional_losses_match_the_method_cores_and_train():
    from megl.losses.gradia import gradia_visual_loss

    torch.manual_seed(0)
    net = GapNet()
    x = torch.rand(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    mask = (torch.rand(4, 16, 16) > 0.5).float()
    has = torch.tensor([True, False, True, True])
    prior = torch.rand(16, 16)
    out = GradCAM(net, "act")(x, y)
    l1 = (out.saliency - mask).abs().mean(dim=(1, 2))
    torch.testing.assert_close(megl.losses.gradia(out, mask, has), gradia_visual_loss(l1, has))
    fused = megl.GradCAM(net, "act")(x, y, mask=mask, has_mask=has, prior=prior)
    torch.testing.assert_close(megl.losses.visual(out, mask, has, prior), fused.l1.mean() + fused.kl.mean())
    terms = [megl.losses.gradia(out, mask, has), megl.losses.haics(out, mask, has),
             megl.losses.res_g(out, mask, has), megl.losses.visual(out, mask, has, prior),
             megl.losses.res_l(out, mask, has, megl.losses.ResImputation(2)),
             megl.losses.rrr(net, x, mask, has)]
    for t in terms:
        assert t.dim() == 0 and torch.isfinite(t)
    net.zero_grad()
    (F.cross_entropy(out.logits, y) + sum(terms)).backward()
    assert net.body[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mask must be"):
        megl.losses.gradia(out, mask[:, :8])


def test_loss_names_are_functions_after_the_registry_loads_the_modules():
    from megl.losses import get_method

    for name in ("gradia", "haics", "rrr"):
        get_method(name).resolve("loss")
        assert callable(getattr(megl.losses, name)), name


# ----------------------------------------------------------------------------- torch.compile
def test_compiled_model_closed_form():
    torch.manual_seed(0)
    net = GapNet()
    x = torch.rand(2, 3, 16, 16)
    ref = GradCAM(net, "act")(x)
    cam = GradCAM(torch.compile(net, backend="eager"), "act")
    for _ in range(2):
        out = cam(x)
        torch.testing.assert_close(out.saliency, ref.saliency)
    assert cam.mode == "closed-form"
    out.saliency.sum().backward()


# ----------------------------------------------------------------------------- megl.train backbones, example
def test_any_torchvision_backbone_in_megl_model():
    from megl.config import RANDOM_STANDINS, Config
    from megl.data import collate, mean_mask_prior
    from megl.models import build_model, train_tokenizer
    from megl.runs import make_splits

    cfg = Config(backbone="mobilenet_v3_small", image_size=64, clip_image_size=32, tiny_clip_width=32,
                 **RANDOM_STANDINS,
                 tiny_llm_hidden=32, tokenizer_vocab_size=300, max_new_tokens=4,
                 synthetic={"n_train": 8, "n_val": 2, "n_test": 2, "num_classes": 3, "mask_fraction": 0.5}).validate()
    train = make_splits(cfg)["train"]
    tok = train_tokenizer([t for r in train.records for t in r.references], train.class_names, 300)
    with pytest.warns(UserWarning, match=r"grid at 'features' is 2x2 at image_size=64.*about 128 px"):
        model = build_model(cfg, train.class_names, tok)
    clf = model.classifier
    assert clf.target_layer == "features" and clf.grid == (2, 2) and clf.feature_dim == 576
    bns = [m for m in clf.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 for m in bns)  # torchvision's 0.01 replaced (config.bn_momentum)
    batch = collate([train.expanded(False)[i] for i in range(4)])
    terms = model.loss(batch, mean_mask_prior(train))
    terms["total"].backward()
    assert clf.net.features[0][0].weight.grad.abs().sum() > 0  # the visual + text terms reach the stem
    assert model.sdtg.W_I.weight.grad is not None
    logits, sal = model.explain(batch["image"])
    assert sal.saliency.shape == (4, 64, 64) and not sal.saliency.requires_grad
    custom = Config(backbone="resnet34", target_layer="layer3", image_size=64).validate()
    from megl.models import build_classifier

    assert build_classifier(custom, 3).grid == (4, 4)
    with pytest.raises(ValueError, match="did you mean"):
        Config(backbone="mobilenet_v3_smal").validate()


def test_example_script_runs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_torchvision.py"
    spec = importlib.util.spec_from_file_location("finetune_torchvision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--steps", "2", "--batch-size", "4", "--n-train", "16", "--n-val", "8", "--image-size", "32",
                          "--model", "resnet18"])
    assert result["steps"] == 2 and result["mode"] == "closed-form" and 0 <= result["val_accuracy"] <= 1


def test_backbone_weights_from_a_local_file(tmp_path):
    from megl.models.torchvision_backbones import TorchvisionClassifier

    torch.manual_seed(1)
    donor = torchvision.models.mobilenet_v3_small(num_classes=10)  # another head size: the head stays random
    torch.save(donor.state_dict(), tmp_path / "w.pth")
    with pytest.warns(UserWarning, match="too coarse"):  # 1x1 at 32 px
        clf = TorchvisionClassifier("mobilenet_v3_small", 3, 32, weights=str(tmp_path / "w.pth"))
    assert all(m.momentum == 0.01 for m in clf.net.modules() if isinstance(m, torch.nn.BatchNorm2d))  # kept
    torch.testing.assert_close(clf.net.features[0][0].weight, donor.features[0][0].weight)
    assert clf.net.classifier[3].weight.shape == (3, 1024)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a state dict of this architecture"):
        TorchvisionClassifier("mobilenet_v3_small", 3, 128, weights=str(tmp_path / "other.pth"))
