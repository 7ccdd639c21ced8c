"""Image classifiers f with Grad-CAM taps: torchvision ResNet18 and ViT-B/16.

Each returns `ClassifierOutput(logits, activations (B,K,h,w), features (B,h*w,D))`; `gradcam_gradients(out, target)`
gives d logit_target / d activations:
- ResNet18: activations = layer4 output (4×4 at 64 px by default: layer4 stride 1; 7×7 at 224 px as in the paper); gradients in closed form (GAP + linear head, docs/fused-op.md), which stay
  differentiable w.r.t. fc.weight without any second-order autograd; features Z_I = the layer4 grid as tokens.
- ViT-B/16: activations = the patch tokens entering the last block's attention (the output of its ln_1, as
  pytorch-grad-cam taps `blocks[-1].norm1`; the last block's *output* patch tokens cannot be used: the head reads
  only the CLS token after them, so their gradient is zero), reshaped to (B,D,g,g); gradients by autograd with
  create_graph; features Z_I = the final (layer-normed) patch tokens.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import torchvision
from torch import Tensor, nn

from megl.data.transforms import normalize_imagenet
from megl.errors import WeightsError
from megl.ops import autograd_gradcam_gradients, gap_linear_gradcam_gradients


class ClassifierOutput(NamedTuple):
    logits: Tensor  # (B, num_classes)
    activations: Tensor  # (B, K, h, w) Grad-CAM layer
    features: Tensor  # (B, h*w, D) Z_I, the classifier's visual tokens for SDTG


def load_state_dict_file(path: str) -> dict:
    """A torchvision state dict from .safetensors or a torch file (.pth/.pt, loaded with weights_only)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"classifier weights {path!r} not found; fix classifier_weights or set it to null")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a tensor file, a pickle with code (weights_only refuses it)
        raise WeightsError(f"classifier_weights {path!r} cannot be read ({type(e).__name__}: {str(e)[:200]}): give a "
                           "torchvision state dict saved with torch.save or safetensors") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise WeightsError(f"classifier_weights {path!r} holds no state dict of tensors")
    return sd


def load_into(net: nn.Module, sd: dict, path: str, what: str, ignore: str) -> None:
    """Load `sd` (without the keys starting with `ignore`, the task head) into `net`, or name what does not fit."""
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise WeightsError(f"{path}: not a torchvision {what} state dict matching this model ({detail})") from None
    missing = [k for k in missing if not k.startswith(ignore)]
    if unexpected or missing:
        raise WeightsError(f"{path}: not a torchvision {what} state dict matching this model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")


class Classifier(nn.Module):
    has_gradcam = True  # False: no spatial layer (megl.models.small.MLPClassifier)
    grid: tuple[int, int]  # Grad-CAM map size h, w
    feature_dim: int  # D of the features

    def gradcam_gradients(self, out: ClassifierOutput, target: Tensor, create_graph: bool = True) -> Tensor:
        """d logit_target / d activations, (B, K, h, w); differentiable (create_graph) for training."""
        raise NotImplementedError

    def explain_forward(self, image01: Tensor) -> ClassifierOutput:
        """Inference forward from which `gradcam_gradients(out, t, create_graph=False)` works, with no more
        autograd graph than that needs. Default: the full graph."""
        with torch.enable_grad():
            return self(image01)


class ResNet18Classifier(Classifier):
    def __init__(self, num_classes: int, image_size: int, stem_maxpool: bool = True, layer4_stride: int = 2,
                 weights: Optional[str] = None):
        super().__init__()
        net = torchvision.models.resnet18(weights=None)
        if weights is not None:
            load_into(net, load_state_dict_file(weights), weights, "resnet18", ignore="fc.")
        net.fc = nn.Linear(512, num_classes)
        if not stem_maxpool:
            net.maxpool = nn.Identity()
        if layer4_stride not in (1, 2):
            raise ValueError(f"resnet_layer4_stride must be 1 or 2, got {layer4_stride}")
        # layer4 stride 1 (output stride 16, as CAM-based segmentation does) doubles the Grad-CAM resolution at
        # the cost of layer4 only; weight shapes are unchanged, so ImageNet weights still load
        net.layer4[0].conv1.stride = (layer4_stride, layer4_stride)
        net.layer4[0].downsample[0].stride = (layer4_stride, layer4_stride)
        self.net = net
        side = image_size
        for stride in (2, 2 if stem_maxpool else 1, 1, 2, 2, layer4_stride):  # conv1, maxpool, layer1..4
            side = -(-side // stride)
        self.grid = (side, side)
        self.feature_dim = 512

    def forward(self, image01: Tensor) -> ClassifierOutput:
        n = self.net
        x = normalize_imagenet(image01)
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        a = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        logits = n.fc(a.mean(dim=(2, 3)))
        return ClassifierOutput(logits, a, a.flatten(2).transpose(1, 2))

    def gradcam_gradients(self, out: ClassifierOutput, target: Tensor, create_graph: bool = True) -> Tensor:
        return gap_linear_gradcam_gradients(self.net.fc.weight, target, tuple(out.activations.shape[-2:]))

    def explain_forward(self, image01: Tensor) -> ClassifierOutput:
        with torch.no_grad():  # the closed form needs no graph
            return self(image01)

    @property
    def head(self) -> nn.Linear:
        return self.net.fc


class ViTClassifier(Classifier):
    def __init__(self, num_classes: int, image_size: int, patch_size: int = 16, num_layers: int = 12,
                 num_heads: int = 12, hidden_dim: int = 768, mlp_dim: int = 3072, weights: Optional[str] = None):
        super().__init__()
        from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

        net = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                                num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes)
        if weights is not None:
            sd = {k: v for k, v in load_state_dict_file(weights).items() if not k.startswith("heads.")}
            if "encoder.pos_embedding" in sd and sd["encoder.pos_embedding"].shape != net.encoder.pos_embedding.shape:
                sd = interpolate_embeddings(image_size, patch_size, sd)
            load_into(net, sd, weights, "vit", ignore="heads.")
        self.net = net
        g = image_size // patch_size
        self.grid = (g, g)
        self.feature_dim = hidden_dim

    def forward(self, image01: Tensor) -> ClassifierOutput:
        if not torch.is_grad_enabled():
            return self._top(self._trunk(image01))
        # The training loss differentiates Grad-CAM's gradients again (double backward); only the math SDPA
        # kernel has a second derivative (the fused CPU/flash kernels raise "derivative ... not implemented").
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return self._top(self._trunk(image01))

    def explain_forward(self, image01: Tensor) -> ClassifierOutput:
        """No graph below the Grad-CAM layer and no double backward: the blocks before the last run without
        autograd, and the activations are a leaf that only the last block, final LayerNorm and head read."""
        with torch.no_grad():
            x = self._trunk(image01)
        with torch.enable_grad():
            return self._top(x, leaf_activations=True)

    def _trunk(self, image01: Tensor) -> Tensor:
        """Tokens (B, 1 + h*w, D) entering the last block."""
        n = self.net
        x = n._process_input(normalize_imagenet(image01))
        x = torch.cat([n.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        enc = n.encoder
        x = enc.dropout(x + enc.pos_embedding)
        for blk in list(enc.layers)[:-1]:
            x = blk(x)
        return x

    def _top(self, x: Tensor, leaf_activations: bool = False) -> ClassifierOutput:
        n, enc = self.net, self.net.encoder
        last = enc.layers[-1]
        y = last.ln_1(x)
        B, g, D = x.shape[0], self.grid, y.shape[-1]
        act = y[:, 1:].transpose(1, 2).reshape(B, D, *g)  # Grad-CAM layer; the rest of the net reads it back
        if leaf_activations:
            act = act.detach().requires_grad_(True)
        y = torch.cat([y[:, :1], act.flatten(2).transpose(1, 2)], dim=1)
        y, _ = last.self_attention(y, y, y, need_weights=False)
        x = x + last.dropout(y)
        x = x + last.mlp(last.ln_2(x))
        x = enc.ln(x)
        logits = n.heads(x[:, 0])
        return ClassifierOutput(logits, act, x[:, 1:])

    def gradcam_gradients(self, out: ClassifierOutput, target: Tensor, create_graph: bool = True) -> Tensor:
        if not out.activations.requires_grad:
            raise RuntimeError("ViT Grad-CAM needs autograd: run the classifier with gradients enabled "
                               "(model.saliency does this for you)")
        return autograd_gradcam_gradients(out.logits, out.activations, target, create_graph=create_graph)

    @property
    def head(self) -> nn.Module:
        return self.net.heads


def build_classifier(config, num_classes: int) -> Classifier:
    if config.backbone == "resnet18":
        return ResNet18Classifier(num_classes, config.image_size, config.resnet_stem_maxpool,
                                  config.resnet_layer4_stride, config.classifier_weights)
    if config.backbone == "vit_b_16":
        return ViTClassifier(num_classes, config.image_size, config.vit_patch_size, config.vit_layers,
                             config.vit_heads, config.vit_hidden, config.vit_mlp, config.classifier_weights)
    if config.backbone in ("mlp", "cnn"):  # the DecoyMNIST nets (megl.models.small)
        from .small import MLPClassifier, SmallCNNClassifier

        if config.backbone == "mlp":
            return MLPClassifier(num_classes, config.image_size, in_channels=config.small_net_channels,
                                 input_range=config.mlp_input)
        return SmallCNNClassifier(num_classes, config.image_size, in_channels=config.small_net_channels,
                                  gradcam_layer=config.cnn_gradcam_layer)
    # any other torchvision classification model (or timm:NAME), Grad-CAM at its family's layer or target_layer
    from .torchvision_backbones import TorchvisionClassifier

    return TorchvisionClassifier(config.backbone, num_classes, config.image_size,
                                 getattr(config, "target_layer", None), config.classifier_weights,
                                 bn_momentum=config.bn_momentum)


__all__ = ["Classifier", "ClassifierOutput", "ResNet18Classifier", "ViTClassifier", "build_classifier"]
