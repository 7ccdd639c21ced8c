"""megl.GradCAM on torchvision models (random weights): what guidance costs in a training step, and the map
against pytorch-grad-cam.

- train step (suite "gradcam_train"): one forward + backward of the model (a loss on the logits) against
  `out = megl.GradCAM(model, layer)(x, y)` + backward of a loss on logits *and* saliency, on the closed-form
  families (resnet50, efficientnet_b0, swin_t), train mode, fp32, batch 16 on CPU. The goal: ≤ 1.15×.
- map (suite "gradcam_map"): an inference map, megl (`torch.no_grad()`) against pytorch-grad-cam `GradCAM`
  (which needs a backward pass and goes through numpy / cv2), eval mode, batch 16. The goal: ≥ 3× faster.
- `test_full_size_agreement` (not a benchmark; run with -s to see the numbers): the map equals pytorch-grad-cam's
  after its re-normalisation, on seven families at 224 px, batch 2.

    OMP_NUM_THREADS=2 pytest benchmarks/test_bench_gradcam.py --benchmark-only --benchmark-json BENCH.json
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

import benchutil
import megl
from megl.models.torchvision_backbones import default_target_layer

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

NUM_CLASSES = benchutil.NUM_CLASSES
CLOSED_FORM = ["resnet50", "efficientnet_b0", "swin_t"]
AGREEMENT = ["resnet50", "densenet121", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t"]


def _shape():
    return (2, 64) if benchutil.quick() else (16, 224)


def build(name: str, size: int) -> torch.nn.Module:
    """Random weights; BatchNorm statistics of two random batches (the default statistics make some nets'
    features vanish); Linear weights N(0, 0.05) (torchvision zero-initialises the ViT head)."""
    torch.manual_seed(0)
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, size, size))
    return model


_MODELS: dict = {}


def _model(name, size):
    if (name, size) not in _MODELS:
        _MODELS[(name, size)] = build(name, size)
    return _MODELS[(name, size)]


def _data(B, S):
    g = torch.Generator().manual_seed(0)
    return torch.rand(B, 3, S, S, generator=g), torch.randint(0, NUM_CLASSES, (B,), generator=g), \
        (torch.rand(B, S, S, generator=g) > 0.5).float()


@pytest.mark.parametrize("variant", ["model fwd+bwd", "megl.GradCAM fwd+bwd"])
@pytest.mark.parametrize("name", CLOSED_FORM)
def test_train_step(benchmark, name, variant):
    B, S = _shape()
    model = _model(name, S).train()
    x, y, mask = _data(B, S)
    layer, reshape = default_target_layer(name)
    cam = megl.GradCAM(model, layer, reshape)

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def guided():
        model.zero_grad(set_to_none=True)
        out = cam(x, y)
        (F.cross_entropy(out.logits, y) + megl.losses.gradia(out, mask)).backward()

    fn = plain if variant.startswith("model") else guided
    fn()
    benchmark.group = f"gradcam train step cpu fp32 {name} B={B} {S}px"
    benchmark.extra_info.update(benchutil.base_info(
        "cpu", torch.float32, suite="gradcam_train", model=name, variant=variant, batch=B, image_size=S,
        gradcam_mode=cam.mode, params=benchutil.count_params(model)))
    benchutil.measure(benchmark, fn, "cpu", warmup=1)


@pytest.mark.parametrize("method", ["megl.GradCAM (no_grad)", "pytorch-grad-cam"])
@pytest.mark.parametrize("name", CLOSED_FORM)
def test_map(benchmark, name, method):
    B, S = _shape()
    model = _model(name, S).eval()
    x, y, _ = _data(B, S)
    layer, reshape = default_target_layer(name)
    cam = megl.GradCAM(model, layer, reshape)
    if method.startswith("megl"):
        def fn():
            with torch.no_grad():
                return cam(x, y).saliency
    else:
        ref = pgc.GradCAM(model=model, target_layers=[cam.layer], reshape_transform=reshape)
        targets = [ClassifierOutputTarget(int(t)) for t in y]

        def fn():
            return ref(input_tensor=x, targets=targets)
    try:
        fn()
        benchmark.group = f"gradcam map cpu fp32 {name} B={B} {S}px"
        benchmark.extra_info.update(benchutil.base_info(
            "cpu", torch.float32, suite="gradcam_map", model=name, method=method, batch=B, image_size=S,
            gradcam_mode=cam.mode, params=benchutil.count_params(model)))
        benchutil.measure(benchmark, fn, "cpu", warmup=1)
    finally:
        if not method.startswith("megl"):
            ref.activations_and_grads.release()


@pytest.mark.parametrize("name", AGREEMENT)
def test_full_size_agreement(name):
    """megl.GradCAM's map = pytorch-grad-cam's after its re-normalisation, max abs diff < 1e-4 (224 px, B=2)."""
    S = 64 if benchutil.quick() else 224
    model = build(name, S).eval()
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    layer, reshape = default_target_layer(name)
    cam = megl.GradCAM(model, layer, reshape)
    out = cam(x)
    s = out.saliency.detach()
    lo, hi = s.amin(dim=(1, 2), keepdim=True), s.amax(dim=(1, 2), keepdim=True)
    s = (s - lo) / (hi - lo + 1e-7)
    # the clone: on CPU pytorch-grad-cam keeps the layer's output tensor itself, which DenseNet's in-place ReLU
    # then changes; the clone gives what it computes on a GPU (a copy at hook time)
    transform = (lambda t: reshape(t).clone()) if reshape is not None else (lambda t: t.clone())
    ref = pgc.GradCAM(model=model, target_layers=[cam.layer], reshape_transform=transform)
    try:
        r = torch.from_numpy(ref(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in out.targets]))
    finally:
        ref.activations_and_grads.release()
    diff = float((s - r).abs().max())
    model.zero_grad()
    out.saliency.mean().backward()
    moved = sum(int(p.grad is not None and bool(p.grad.abs().sum() > 0)) for p in model.parameters())
    print(f"\nagreement {name} {S}px B=2 layer={cam.layer_path} mode={cam.mode} max|diff|={diff:.2e} "
          f"params with gradient {moved}/{len(list(model.parameters()))} empty maps {int((s.amax((1, 2)) == 0).sum())}")
    assert diff < 1e-4
