"""Explained inference: what a saliency map costs on top of the classifier, at Table 5's setting (batch 1,
bf16 on CUDA, fp32 on CPU, 224 px, random weights, target = the predicted class).

- ResNet18: one forward pass with the layer4 activations kept; closed-form gradients of the GAP + linear head
  (`gap_linear_gradcam_gradients`, no autograd) and the fused op.
- ViT-B/16: Grad-CAM on the tokens entering the last encoder block (CLS dropped, 14x14 grid; at the last
  block's *output* the patch tokens get no gradient, since only CLS reaches the head). The forward runs without
  autograd up to that point; only the last block, the final LayerNorm and the head are differentiated
  (`torch.autograd.grad`, no create_graph), then the fused op.
"""
from __future__ import annotations

import pytest
import torch

import benchutil
from megl import ops
from test_bench_table5 import DISPLAY, build_classifier, image_size


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
    with torch.enable_grad():
        tap = t.detach().requires_grad_(True)
        logits = m.heads(enc.ln(enc.layers[-1](tap))[:, 0])
        target = logits.argmax(1)
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), tap)
    B, N, D = tap.shape
    side = int(round((N - 1) ** 0.5))
    A = tap.detach()[:, 1:].transpose(1, 2).reshape(B, D, side, side)
    G = grad[:, 1:].transpose(1, 2).reshape(B, D, side, side)
    with torch.no_grad():
        return logits.detach(), ops.fused_saliency(A, G, x).saliency


@pytest.mark.parametrize("mode", ["classifier", "classifier+saliency"])
@pytest.mark.parametrize("model_name", ["resnet18", "vit_b_16"])
def test_explained_inference(benchmark, model_name, mode):
    device = benchutil.main_device()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = image_size()
    m = build_classifier(model_name, size).to(device=device, dtype=dtype).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.rand(1, 3, size, size, device=device, dtype=dtype)
    if mode == "classifier":
        def fn():
            with torch.inference_mode():
                return m(x)
    elif model_name == "resnet18":
        body = _resnet_parts(m)

        def fn():
            return resnet_explained(m, body, x)
    else:
        def fn():
            return vit_explained(m, x)

    if mode != "classifier":  # the explained path predicts what the classifier predicts
        with torch.inference_mode():
            ref = m(x)
        logits, s = fn()
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(logits.float(), ref.float(), atol=tol, rtol=tol)
        assert s.shape == (1, size, size)

    benchmark.group = f"explained inference {device} {str(dtype)[6:]} {DISPLAY[model_name]} batch=1"
    benchmark.extra_info.update(benchutil.base_info(
        device, dtype, suite="explained", model=model_name, label=DISPLAY[model_name], mode=mode, batch=1,
        image_size=size, params=benchutil.count_params(m),
        backend=ops.resolve_backend("auto", torch.device(device), dtype) or "auto",
    ))
    benchutil.measure(benchmark, fn, device, max_rounds=500)
