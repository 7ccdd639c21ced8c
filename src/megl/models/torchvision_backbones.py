"""Any torchvision (or timm) classification model as a megl classifier, with a default Grad-CAM layer per family.

`register_target_layer(family, layer, reshape)` fills a small registry (in the spirit of timm's model registry)
that `default_target_layer(model or name)` reads: the family is the longest registered prefix of the model's
name. `TorchvisionClassifier` wraps the network for `megl.train` through `megl.GradCAM`'s stages, so the
closed-form / autograd choice, the hooks and the reshape are the same as for a user's own loop; the features that
SDTG reads (Z_I) are the target layer's grid, one token per Grad-CAM cell, whatever the family.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from megl.data.transforms import normalize_imagenet
from megl.gradcam import GradCAM, swin_reshape, vit_reshape

from .classifier import Classifier, ClassifierOutput, load_state_dict_file

TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class TargetLayer:
    layer: str  # dotted path inside the model
    reshape: Optional[Callable[[Tensor], Tensor]] = None
    note: str = ""


_REGISTRY: dict[str, TargetLayer] = {}


def register_target_layer(family: str, layer: str, reshape: Optional[Callable] = None, note: str = "") -> None:
    """Register the default Grad-CAM layer of the models whose name starts with `family` ("resnet",
    "timm:vit_"). The longest matching prefix wins."""
    _REGISTRY[family] = TargetLayer(layer, reshape, note)


# torchvision: the last feature map before the head, where the closed form applies if the head is GAP + linear
for _family, _layer, _note in [
    ("resnet", "layer4", "GAP + fc: closed form"), ("resnext", "layer4", "closed form"),
    ("wide_resnet", "layer4", "closed form"),
    ("densenet", "features", "norm5; a ReLU follows, so autograd"),
    ("mobilenet_v2", "features", "GAP + dropout + linear: closed form"),
    ("mobilenet_v3", "features", "an MLP head follows: autograd"),
    ("efficientnet", "features", "GAP + dropout + linear: closed form"),
    ("convnext", "features", "a LayerNorm follows the pooling: autograd"),
    ("regnet", "trunk_output", "closed form"), ("shufflenet", "conv5", "closed form"),
    ("mnasnet", "layers", "closed form"), ("googlenet", "inception5b", "closed form"),
    ("inception", "Mixed_7c", "closed form"), ("vgg", "features", "MLP head: autograd"),
    ("alexnet", "features", "MLP head: autograd"),
]:
    register_target_layer(_family, _layer, None, _note)
register_target_layer("vit", "encoder.layers.-1.ln_1", vit_reshape,
                      "the last block's input norm: its output block reaches the head only through the class token")
register_target_layer("swin", "norm", swin_reshape, "the final LayerNorm, channels last; GAP + head: closed form")
# timm (tested: resnet, efficientnet, convnext, vit)
for _family, _layer in [("timm:resnet", "layer4"), ("timm:resnext", "layer4"), ("timm:efficientnet", "bn2"),
                        ("timm:mobilenetv3", "blocks"), ("timm:convnext", "stages"), ("timm:regnet", "final_conv")]:
    register_target_layer(_family, _layer)
register_target_layer("timm:vit_", "blocks.-1.norm1", vit_reshape)
register_target_layer("timm:deit", "blocks.-1.norm1", vit_reshape)
register_target_layer("timm:swin", "norm", swin_reshape)


def model_name_of(model_or_name: Union[str, nn.Module]) -> str:
    if isinstance(model_or_name, str):
        return model_or_name
    model = getattr(model_or_name, "_orig_mod", model_or_name)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):  # a timm model
        return TIMM_PREFIX + cfg["architecture"]
    return type(model).__name__.lower()


def default_target_layer(model_or_name: Union[str, nn.Module]) -> tuple[str, Optional[Callable]]:
    """(layer path, reshape) registered for the model's family; ValueError naming the fix when none is."""
    name = model_name_of(model_or_name)
    aliases = {"visiontransformer": "vit", "swintransformer": "swin", "efficientnet": "efficientnet",
               "mobilenetv2": "mobilenet_v2", "mobilenetv3": "mobilenet_v3"}
    name = aliases.get(name, name)
    match = max((f for f in _REGISTRY if name.startswith(f)), key=len, default=None)
    if match is None:
        raise ValueError(f"no default Grad-CAM target layer for {name!r}; pass one (GradCAM(model, 'path.to.layer') "
                         f"or --set target_layer=path.to.layer); registered families: {', '.join(sorted(_REGISTRY))}")
    t = _REGISTRY[match]
    return t.layer, t.reshape


# ----------------------------------------------------------------------------- building
def torchvision_classification_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def is_supported_backbone(name: str) -> bool:
    """A torchvision classification model name, or timm:NAME (timm installed and the name known to it)."""
    if name.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:
            return False
        return timm.is_model(name[len(TIMM_PREFIX):])
    return name in torchvision_classification_models()


def backbone_error(name: str) -> str:
    import difflib

    close = difflib.get_close_matches(name, torchvision_classification_models(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (f"backbone {name!r} is neither megl's resnet18 / vit_b_16 / mlp / cnn nor a torchvision classification model"
            f"{hint}; see torchvision.models.list_models(module=torchvision.models), or timm:NAME with timm installed")


def build_network(name: str, num_classes: int, image_size: int) -> nn.Module:
    """A torchvision / timm network with random weights and `num_classes` outputs."""
    if name.startswith(TIMM_PREFIX):
        import timm

        kwargs = {}
        if any(k in name for k in ("vit", "deit", "swin")):
            kwargs["img_size"] = image_size
        return timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes, **kwargs)
    import torchvision

    if name not in torchvision_classification_models():
        raise ValueError(backbone_error(name))
    kwargs = {"image_size": image_size} if name.startswith("vit_") else {}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def load_backbone_weights(net: nn.Module, path: str) -> None:
    """Load a state dict for the same architecture; the classifier head (whose shape differs) stays random."""
    own = net.state_dict()
    sd = load_state_dict_file(path)
    sd = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    last = max(linears, key=lambda n: list(own).index(n + ".weight"), default="")  # the classifier head
    stray = [k for k in missing if not k.startswith(last + ".")]
    if stray:
        raise ValueError(f"{path}: not a state dict of this architecture ({len(stray)} weights missing, e.g. "
                         f"{stray[:3]}); check classifier_weights against --backbone")


MIN_GRID = 4  # cells per side below which a Grad-CAM map cannot localise an object (a warning names the fix)


class TorchvisionClassifier(Classifier):
    """A torchvision / timm classification network for megl.train: images in [0, 1] (ImageNet-normalised inside),
    Grad-CAM at `target_layer` (default: the family's), Z_I = the target layer's grid as tokens."""

    def __init__(self, name: str, num_classes: int, image_size: int, target_layer: Optional[str] = None,
                 weights: Optional[str] = None, bn_momentum: Optional[float] = None):
        super().__init__()
        self.name = name
        self.net = build_network(name, num_classes, image_size)
        if bn_momentum is not None:
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = bn_momentum
        if weights is not None:
            load_backbone_weights(self.net, weights)
        reshape = None
        if target_layer is None:
            target_layer, reshape = default_target_layer(name)
        else:
            try:  # a custom layer in a token family still needs the family's reshape
                reshape = default_target_layer(name)[1]
            except ValueError:
                pass
        self.cam = GradCAM(self.net, target_layer, reshape, normalize=normalize_imagenet)
        self.target_layer = self.cam.layer_path
        was = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                A = self.cam.activations(self.cam.forward(torch.zeros(1, 3, image_size, image_size),
                                                          create_graph=False)[1])
        finally:
            self.net.train(was)
        self.grid = tuple(A.shape[-2:])
        self.feature_dim = A.shape[1]
        if min(self.grid) < MIN_GRID:  # e.g. a 32x-downsampling family at megl's 32 px default
            warnings.warn(
                f"{name}: Grad-CAM's grid at {self.target_layer!r} is {self.grid[0]}x{self.grid[1]} at "
                f"image_size={image_size}, too coarse for a map to say where the object is; raise --set "
                f"image_size (about {MIN_GRID * image_size // min(self.grid)} px) or pick an earlier layer with "
                f"--set target_layer=...", UserWarning, stacklevel=2)

    @property
    def mode(self) -> str:
        return self.cam.mode

    def forward(self, image01: Tensor) -> ClassifierOutput:
        logits, raw = self.cam.forward(image01, create_graph=torch.is_grad_enabled())
        A = self.cam.activations(raw)
        out = _Output(logits, A, A.flatten(2).transpose(1, 2))
        out.layer_output = raw  # what autograd differentiates (A may be a reshape of it)
        out.dropout_scale = self.cam.dropout_scale(raw)  # this forward's, whatever forwards come before the gradients
        return out

    def gradcam_gradients(self, out: ClassifierOutput, target: Tensor, create_graph: bool = True) -> Tensor:
        raw = getattr(out, "layer_output", None)
        if raw is None:
            raise TypeError("gradcam_gradients: pass the output of this classifier's forward")
        return self.cam.gradients(out.logits, raw, target.long(), create_graph=create_graph,
                                  spatial=tuple(out.activations.shape[-2:]), dropout_scale=out.dropout_scale)

    def explain_forward(self, image01: Tensor) -> ClassifierOutput:
        if self.cam.mode == "closed-form":
            with torch.no_grad():  # the closed form needs no graph
                return self(image01)
        with torch.enable_grad():
            return self(image01)

    @property
    def head(self) -> nn.Module:
        return self.cam._head.linear if self.cam._head is not None else None


class _Output(ClassifierOutput):
    """ClassifierOutput that also carries the raw layer output (an attribute, so tuple unpacking is unchanged)."""


__all__ = ["TargetLayer", "TorchvisionClassifier", "build_network", "default_target_layer", "is_supported_backbone",
           "register_target_layer"]
