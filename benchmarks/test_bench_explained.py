"""Explained inference: what a saliency map costs on top of the classifier, at Table 5's setting (batch 1,
bf16 on CUDA, fp32 on CPU, 224 px, random weights, target = the predicted class).

- ResNet18: one forward pass with the layer4 activations kept; closed-form gradients of the GAP + linear head
  (`gap_linear_gradcam_gradients`, no autograd) and the fused op.
- ViT-B/16: Grad-CAM on the patch tokens after the last block's first LayerNorm (ln_1, CLS dropped, 14x14
  grid), the layer megl.models.ViTClassifier taps (at the last block's *output* the patch tokens would get no
  gradient: only CLS reaches the head). The forward runs without autograd up to that point; only the last
  block, the final LayerNorm and the head are differentiated (`torch.autograd.grad`, no create_graph), then
  the fused op.

impl "torchvision": the torchvision models with the taps above, written here (no autograd graph where none is
needed). impl "megl.models" (when the package has it): the project's classifier as deployed, parameters
trainable, and the calls of `MEGLModel.explain` (`explain_forward`, `gradcam_gradients`, fused op) against that classifier's forward under inference_mode.
"""
from __future__ import annotations

import pytest
import torch

import benchutil
from benchutil import DISPLAY, build_classifier, image_size
from megl import ops


def _resnet_parts(m):
    body = torch.nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    return body


def resnet_explained(m, body, x):
    with torch.inference_mode():
        A = body(x)
        logits = m.fc(torch.flatten(m.avgpool(A), 1))
        target = logits.argmax(1)
        G = ops.gap_linear_gradcam_gradients(m.fc.weight, target, A.shape[-2:])
        return logits, ops.fused_saliency(A, G, x).saliency


def vit_explained(m, x):
    with torch.no_grad():
        t = m._process_input(x)
        t = torch.cat([m.class_token.expand(t.shape[0], -1, -1), t], dim=1)
        enc = m.encoder
        t = enc.dropout(t + enc.pos_embedding)
        for layer in enc.layers[:-1]:
            t = layer(t)
        last = enc.layers[-1]
        y0 = last.ln_1(t)
    with torch.enable_grad():
        y = y0.detach().requires_grad_(True)  # the Grad-CAM layer
        a, _ = last.self_attention(y, y, y, need_weights=False)
        h = t + last.dropout(a)
        h = h + last.mlp(last.ln_2(h))
        logits = m.heads(enc.ln(h)[:, 0])
        target = logits.argmax(1)
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), y)
    B, N, D = y.shape
    side = int(round((N - 1) ** 0.5))
    A = y.detach()[:, 1:].transpose(1, 2).reshape(B, D, side, side)
    G = grad[:, 1:].transpose(1, 2).reshape(B, D, side, side)
    with torch.no_grad():
        return logits.detach(), ops.fused_saliency(A, G, x).saliency


def megl_models_explain(clf, x):
    """What MEGLModel.explain does, on the classifier alone."""
    out = clf.explain_forward(x)
    target = out.logits.argmax(1)
    with torch.set_grad_enabled(out.activations.requires_grad):
        grads = clf.gradcam_gradients(out, target, create_graph=False)
    with torch.no_grad():
        sal = ops.fused_saliency(out.activations, grads, x)
    return out.logits.detach(), sal.saliency


def _impls():
    out = ["torchvision"]
    try:
        import megl.models  # noqa: F401

        out.append("megl.models")
    except ImportError:
        pass
    return out


def _build(impl, model_name, size, device, dtype):
    if impl == "torchvision":
        m = build_classifier(model_name, size)
        for p in m.parameters():
            p.requires_grad_(False)
    else:
        from megl.config import Config
        from megl.models import build_classifier as megl_build_classifier

        torch.manual_seed(0)
        # at 224 px the paper's ResNet18 (max-pool stem, layer4 stride 2: 7×7 maps), as the torchvision impl
        paper = size >= 224
        config = Config(backbone=model_name, image_size=size, resnet_stem_maxpool=paper,
                        resnet_layer4_stride=2 if paper else 1)
        m = megl_build_classifier(config, benchutil.NUM_CLASSES)
        if model_name == "vit_b_16":  # torchvision zero-initialises the head
            torch.nn.init.normal_(m.head.head.weight, std=0.02)
    return m.to(device=device, dtype=dtype).eval()


@pytest.mark.parametrize("mode", ["classifier", "classifier+saliency"])
@pytest.mark.parametrize("model_name", ["resnet18", "vit_b_16"])
@pytest.mark.parametrize("impl", _impls())
def test_explained_inference(benchmark, impl, model_name, mode):
    device = benchutil.main_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = image_size()
    m = _build(impl, model_name, size, device, dtype)
    x = torch.rand(1, 3, size, size, device=device, dtype=dtype)
    logits_of = (lambda o: o) if impl == "torchvision" else (lambda o: o.logits)
    if mode == "classifier":
        def fn():
            with torch.inference_mode():
                return m(x)
    elif impl == "megl.models":
        def fn():
            return megl_models_explain(m, x)
    elif model_name == "resnet18":
        body = _resnet_parts(m)

        def fn():
            return resnet_explained(m, body, x)
    else:
        def fn():
            return vit_explained(m, x)

    if mode != "classifier":  # the explained path predicts what the classifier predicts
        with torch.inference_mode():
            ref = logits_of(m(x))
        logits, s = fn()
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(logits.float(), ref.float(), atol=tol, rtol=tol)
        assert s.shape == (1, size, size)

    benchmark.group = f"explained inference {device} {str(dtype)[6:]} {DISPLAY[model_name]} batch=1"
    benchmark.extra_info.update(benchutil.base_info(
        device, dtype, suite="explained", impl=impl, model=model_name, label=DISPLAY[model_name], mode=mode,
        batch=1, image_size=size, params=benchutil.count_params(m),
        backend=ops.resolve_backend("auto", torch.device(device), dtype) or "auto",
    ))
    benchutil.measure(benchmark, fn, device, max_rounds=500)
