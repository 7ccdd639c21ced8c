"""Grad-CAM maps, megl against the libraries people use: pytorch-grad-cam `GradCAM` and Captum `LayerGradCam`
+ `LayerAttribution.interpolate`, on the same torchvision ResNet18 (random weights, eval mode), the same batch
and the same target classes, all producing per-sample min-max normalised maps at image resolution.

megl variants:
- closed form: one forward pass (no autograd: d logit / d layer4 = W_fc / (h w) for a GAP + linear head),
  then the fused op (normalise, upsample; the masked image comes for free);
- autograd: the forward pass, `torch.autograd.grad` of the target scores w.r.t. layer4, then the fused op
  (what any head needs; the peers pay this backward pass too, through the whole network).
"""
from __future__ import annotations

import pytest
import torch

import benchutil
from megl import ops

captum_attr = pytest.importorskip("captum.attr")
pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

METHODS = ["megl-closed-form", "megl-autograd", "pytorch-grad-cam", "captum"]
LABEL = {
    "megl-closed-form": "megl: forward + closed-form gradients + fused op",
    "megl-autograd": "megl: forward + autograd gradients + fused op",
    "pytorch-grad-cam": "pytorch-grad-cam GradCAM",
    "captum": "Captum LayerGradCam + LayerAttribution.interpolate",
}
NUM_CLASSES = benchutil.NUM_CLASSES


def _shape(device):
    if benchutil.quick():
        return 2, 64
    return (16, 224) if device == "cpu" else (64, 224)


class Setup:
    def __init__(self, device):
        self.device = device
        self.B, self.S = _shape(device)
        self.model = benchutil.build_classifier("resnet18", self.S).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(self.B, 3, self.S, self.S, generator=g).to(device)
        self.target = torch.randint(0, NUM_CLASSES, (self.B,), generator=g).to(device)
        m = self.model
        self.body = torch.nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
        self.cam = pgc.GradCAM(model=m, target_layers=[m.layer4[-1]])
        self.targets = [ClassifierOutputTarget(int(t)) for t in self.target]
        self.captum = captum_attr.LayerGradCam(m, m.layer4)

    def megl_closed_form(self):
        with torch.no_grad():
            A = self.body(self.x)
            _ = self.model.fc(torch.flatten(self.model.avgpool(A), 1))  # the logits, as deployed
            G = ops.gap_linear_gradcam_gradients(self.model.fc.weight, self.target, A.shape[-2:])
            return ops.fused_saliency(A, G, self.x).saliency

    def megl_autograd(self):
        with torch.enable_grad():
            A = self.body(self.x).requires_grad_(True)
            logits = self.model.fc(torch.flatten(self.model.avgpool(A), 1))
            G = ops.autograd_gradcam_gradients(logits, A, self.target, create_graph=False)
        with torch.no_grad():
            return ops.fused_saliency(A.detach(), G, self.x).saliency

    def pytorch_grad_cam(self):
        for p in self.model.parameters():  # it calls model.zero_grad() and backward(): give it parameters
            p.requires_grad_(True)
        try:
            return torch.from_numpy(self.cam(input_tensor=self.x, targets=self.targets))
        finally:
            for p in self.model.parameters():
                p.requires_grad_(False)
                p.grad = None

    def captum_cam(self):
        attr = self.captum.attribute(self.x, target=self.target, relu_attributions=True)  # (B, 1, h, w)
        lo = attr.amin(dim=(2, 3), keepdim=True)
        hi = attr.amax(dim=(2, 3), keepdim=True)
        attr = (attr - lo) / (hi - lo + 1e-8)  # the same normalisation as Grad-CAM's, before upsampling
        up = captum_attr.LayerAttribution.interpolate(attr, (self.S, self.S), interpolate_mode="bilinear")
        return up.squeeze(1).detach()

    def run(self, method):
        return {
            "megl-closed-form": self.megl_closed_form,
            "megl-autograd": self.megl_autograd,
            "pytorch-grad-cam": self.pytorch_grad_cam,
            "captum": self.captum_cam,
        }[method]()


_SETUPS: dict = {}


def _setup(device) -> Setup:
    if device not in _SETUPS:
        _SETUPS[device] = Setup(device)
    return _SETUPS[device]


@pytest.mark.parametrize("device", benchutil.devices())
def test_peer_maps_agree(device):
    """The four methods compute the same maps (pytorch-grad-cam renormalises after its cv2 resize, hence the
    looser tolerance there). Not a benchmark: runs in the smoke run, skipped by --benchmark-only."""
    s = _setup(device)
    ref = s.run("megl-closed-form").float().cpu()
    torch.testing.assert_close(s.run("megl-autograd").float().cpu(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.run("captum").float().cpu(), ref, atol=1e-4, rtol=1e-4)
    pg = s.run("pytorch-grad-cam").float()
    assert pg.shape == ref.shape
    assert (pg - ref).abs().max() < 0.05, (pg - ref).abs().max()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("device", benchutil.devices())
def test_gradcam_peers(benchmark, device, method):
    s = _setup(device)
    benchmark.group = f"gradcam peers {device} fp32 resnet18 B={s.B} {s.S}px"
    benchmark.extra_info.update(benchutil.base_info(
        device, torch.float32, suite="peers", method=method, label=LABEL[method], model="resnet18",
        batch=s.B, image_size=s.S, params=benchutil.count_params(s.model),
    ))
    benchutil.measure(benchmark, lambda: s.run(method), device)


def teardown_module(module):
    for s in _SETUPS.values():
        s.cam.activations_and_grads.release()  # remove pytorch-grad-cam's hooks
    _SETUPS.clear()
