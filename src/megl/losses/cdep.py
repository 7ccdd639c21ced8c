"""CDEP, Contextual Decomposition Explanation Penalization (Rieger, Singh, Murdoch & Yu, 2020, "Interpretations are
useful: penalizing explanations to align neural networks with prior knowledge", ICML; EGL survey §3.2.1, §4.6):

    L = CE(y, f(I)) + λ · mean_{b ∈ V, k} softmax([β_bk, γ_bk])₀         (the paper's score, "share")
    L = CE(y, f(I)) + λ · mean_{b ∈ V, k} |β_bk − mean_k' β_bk'|         (megl's default, "centred_l1")

Contextual decomposition (CD; Murdoch et al. 2018, Singh et al. 2019) splits every activation of the network into
β (the part due to a feature group s of the input) and γ (the rest, including interactions), with β + γ equal to
the real activation at every layer. CDEP penalises the importance of the group the model should not use: here
s = 1 − A, the region outside the human mask of an annotated sample. Exactly as the reference code
(github.com/laura-rieger/deep-explanation-penalization, `cd.cd` + `softmax(stack((rel, irrel)))[:, 0].mean()`),
the penalised region is CD's "relevant" argument, and the penalty is its softmax share of every class score,
averaged over classes and annotated samples. The input split is made on the normalised image,
β₀ = s ⊙ x̃, γ₀ = (1 − s) ⊙ x̃.

Propagation rules (reference `cd.py`), extended to torchvision's ResNet:
  conv / linear / batch norm (affine):  β' = Wβ + b·|Wβ|/(|Wβ| + |Wγ| + 1e-19),   γ' = Wγ + b − (bias share of β)
  ReLU:                                 β' = relu(β),  γ' = relu(β + γ) − relu(β)
  max-pool:                             both gathered at the argmax of β + γ
  average pool, flatten:                linear, no bias
  residual block:                       both branches propagated, added part by part, then the ReLU rule.
Batch norm uses the statistics the module itself uses: running statistics in eval mode, and in train mode the
batch statistics of β + γ — which are those of the real forward pass, so the decomposition still sums to the
logits. (The reference puts the model in eval mode; its networks have no batch norm on the CD path.)

The paper's loss has two loopholes, measured on DecoyMNIST (docs/decoy_mnist.md): the share is met by raising
every class's γ at once, which changes no decision, and CD's ReLU rule charges the group nothing for what it does
through other features (a swatch that switches a digit unit off). megl's defaults close both (our extension):
`cdep_score="centred_l1"` sees only what the group does to the logits' differences, and `cdep_relu="group"`
(γ' = relu(γ)) charges the group with every interaction, so γ is the net on the rest alone. On DecoyMNIST's mlp
they lift CDEP from 84.7 % to 93.2 %, on its hard cnn from 71.2 % to 97.0 %. `cdep_relu="reference"`,
`cdep_score="share"` is the paper's loss; `cdep_relu="symmetric"` (the two-player Shapley split) is kept for the
diagnosis.

Default λ = 0.3, chosen with the two options above on the validation split of megl.train's default data
(docs/recipe.md §3). The CDEP code's ISIC (skin-cancer image) sweep uses regularizer_rate ∈ {10, 100} with its own
score; the EGL survey's image re-run tried {0, 0.1, 10}. CD rules exist for CNNs only: a ViT backbone raises a
clear error.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .common import check_batch, classifier_of, cross_entropy, hparam, result, upcast

DEFAULTS = {"cdep_lambda": 0.3, "cdep_relu": "group", "cdep_score": "centred_l1"}
RELU_RULES = ("reference", "symmetric", "group")
SCORES = ("share", "centred_l1")
STAB = 1e-19  # the reference's stabilizing_constant (10e-20)

try:  # torchvision blocks, if available
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
except ImportError:  # pragma: no cover
    BasicBlock = Bottleneck = ResNet = ()  # type: ignore[assignment,misc]


class CDUnsupported(TypeError):
    """The network contains a layer without a contextual-decomposition rule."""


# ----------------------------------------------------------------------------- rules
def _split_bias(rel: Tensor, irrel: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Share an additive bias between the parts in proportion to |rel| and |irrel| (reference propagate_conv_linear)."""
    if bias is None:
        return rel, irrel
    share = rel.abs() / (rel.abs() + irrel.abs() + STAB)
    rel_b = bias * share
    return rel + rel_b, irrel + (bias - rel_b)


def _bias_shape(bias: Tensor, like: Tensor) -> Tensor:
    return bias.view(1, -1, *([1] * (like.dim() - 2))) if like.dim() > 2 else bias


def cd_conv_linear(rel: Tensor, irrel: Tensor, module: nn.Module) -> tuple[Tensor, Tensor]:
    if isinstance(module, nn.Conv2d):
        fn = lambda t: module._conv_forward(t, module.weight, None)  # noqa: E731
    else:
        fn = lambda t: F.linear(t, module.weight)  # noqa: E731
    r, i = fn(rel), fn(irrel)
    bias = None if module.bias is None else _bias_shape(module.bias, r)
    return _split_bias(r, i, bias)


def cd_batchnorm(rel: Tensor, irrel: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """BN as the affine map a·x + c it applies: running statistics in eval mode, batch statistics of rel + irrel in
    train mode (no running-statistics update here; the classifier's own forward does that)."""
    use_batch = bn.training or not bn.track_running_stats or bn.running_mean is None
    if use_batch:
        full = rel + irrel
        mean = full.mean(dim=(0, 2, 3))
        var = full.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    view = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    return _split_bias(rel * view(scale), irrel * view(scale), view(shift))


def cd_relu(rel: Tensor, irrel: Tensor, rule: str = "reference") -> tuple[Tensor, Tensor]:
    """reference: β' = relu(β), so the group's interactions with the rest (e.g. a swatch that switches a digit
    unit off) all go to γ. symmetric: the two-player Shapley split of relu(β + γ), which charges half of each
    interaction to each part. group (ours): γ' = relu(γ), so the group is charged with every interaction and γ is
    the net run on the rest alone (up to the biases' split and max-pool's argmax, both taken from the whole
    input); β is then all that the group changes."""
    full = F.relu(rel + irrel)
    if rule == "group":
        i = F.relu(irrel)
        return full - i, i
    if rule == "symmetric":
        r = 0.5 * (F.relu(rel) + full - F.relu(irrel))
        return r, full - r
    r = F.relu(rel)
    return r, full - r


def cd_maxpool(rel: Tensor, irrel: Tensor, pool: nn.MaxPool2d) -> tuple[Tensor, Tensor]:
    out, idx = F.max_pool2d(rel + irrel, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                            ceil_mode=pool.ceil_mode, return_indices=True)
    flat_idx = idx.flatten(2)
    take = lambda t: t.flatten(2).gather(2, flat_idx).view_as(out)  # noqa: E731
    return take(rel), take(irrel)


def cd_block(rel: Tensor, irrel: Tensor, block: nn.Module, rule: str = "reference") -> tuple[Tensor, Tensor]:
    """torchvision BasicBlock / Bottleneck: relu(main(x) + shortcut(x)) propagated part by part."""
    if isinstance(block, BasicBlock):
        r, i = cd_module(block.conv1, rel, irrel)
        r, i = cd_batchnorm(r, i, block.bn1)
        r, i = cd_relu(r, i, rule)
        r, i = cd_module(block.conv2, r, i)
        r, i = cd_batchnorm(r, i, block.bn2)
    else:
        r, i = cd_module(block.conv1, rel, irrel)
        r, i = cd_relu(*cd_batchnorm(r, i, block.bn1), rule)
        r, i = cd_module(block.conv2, r, i)
        r, i = cd_relu(*cd_batchnorm(r, i, block.bn2), rule)
        r, i = cd_module(block.conv3, r, i)
        r, i = cd_batchnorm(r, i, block.bn3)
    if block.downsample is not None:
        sr, si = cd_module(block.downsample, rel, irrel)
    else:
        sr, si = rel, irrel
    return cd_relu(r + sr, i + si, rule)


def cd_module(module: nn.Module, rel: Tensor, irrel: Tensor, rule: str = "reference") -> tuple[Tensor, Tensor]:
    """Propagate (rel, irrel) through `module` with the CD rules; raises CDUnsupported for unknown layers."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        if isinstance(module, nn.Linear) and rel.dim() > 2:
            rel, irrel = rel.flatten(1), irrel.flatten(1)
        return cd_conv_linear(rel, irrel, module)
    if isinstance(module, nn.BatchNorm2d):
        return cd_batchnorm(rel, irrel, module)
    if isinstance(module, nn.ReLU):
        return cd_relu(rel, irrel, rule)
    if isinstance(module, nn.MaxPool2d):
        return cd_maxpool(rel, irrel, module)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
        return module(rel), module(irrel)
    if isinstance(module, nn.Flatten):
        return module(rel), module(irrel)
    if isinstance(module, nn.Identity):
        return rel, irrel
    if isinstance(module, nn.Dropout):  # one dropout mask for both parts, so they still sum to the output
        keep = module(torch.ones_like(rel))
        return rel * keep, irrel * keep
    if BasicBlock and isinstance(module, (BasicBlock, Bottleneck)):
        return cd_block(rel, irrel, module, rule)
    if ResNet and isinstance(module, ResNet):
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
            rel, irrel = cd_module(getattr(module, name), rel, irrel, rule)
        return cd_module(module.fc, rel.flatten(1), irrel.flatten(1), rule)
    if isinstance(module, nn.Sequential):
        for child in module:
            rel, irrel = cd_module(child, rel, irrel, rule)
        return rel, irrel
    raise CDUnsupported(
        f"cdep: no contextual-decomposition rule for {type(module).__name__}; CDEP is implemented for CNNs built from "
        "Conv2d / BatchNorm2d / ReLU / MaxPool2d / AvgPool / Linear and torchvision ResNet blocks "
        "(use --backbone resnet18)"
    )


def contextual_decomposition(net: nn.Module, x: Tensor, blob: Tensor,
                             relu_rule: str = "reference") -> tuple[Tensor, Tensor]:
    """CD scores of the feature group `blob` for network `net` on input x: (β, γ) with β + γ = net(x).

    x: (B, C, H, W) the network's input (normalised image); blob: (B, H, W) or (B, 1, H, W) in [0, 1].
    """
    if blob.dim() == 3:
        blob = blob.unsqueeze(1)
    blob = blob.to(x.dtype)
    return cd_module(net, blob * x, (1.0 - blob) * x, relu_rule)


def cdep_penalty(rel: Tensor, irrel: Tensor, has_mask: Tensor, score: str = DEFAULTS["cdep_score"]) -> Tensor:
    """share: mean over annotated samples and classes of softmax([rel, irrel])[0] (the penalised group's share, as
    the reference code). centred_l1: mean |β_c − mean_c β| — the group's effect on the logits' differences, which
    is all the decision sees; unlike the share it cannot be met by moving every logit by the same amount."""
    has_mask = has_mask.bool()
    if not bool(has_mask.any()):
        return rel.sum() * 0.0
    if score == "centred_l1":
        r = upcast(rel[has_mask])
        return (r - r.mean(dim=1, keepdim=True)).abs().mean()
    share = torch.softmax(upcast(torch.stack((rel[has_mask], irrel[has_mask]), dim=-1)), dim=-1)[..., 0]
    return share.mean()


# ----------------------------------------------------------------------------- adapter
def _resnet_and_input(clf: nn.Module, image: Tensor) -> tuple[nn.Module, Tensor]:
    """The classifier's CNN and its input for `image` (in [0, 1]).

    A classifier may expose `cd_network() -> (net, prepare)`; otherwise its torchvision ResNet (`.net`, as
    megl.models.ResNet18Classifier holds it) is used with the classifier's ImageNet normalisation. Any other
    classifier (ViT) raises CDUnsupported.
    """
    hook = getattr(clf, "cd_network", None)
    if callable(hook):
        net, prepare = hook()
        return net, prepare(image)
    net = next((getattr(clf, n) for n in ("net", "backbone", "resnet") if isinstance(getattr(clf, n, None), ResNet)),
               None)
    if net is None:
        inner = getattr(clf, "net", None)
        kind = type(inner if inner is not None else clf).__name__
        raise CDUnsupported(
            f"cdep: contextual decomposition is defined for CNNs (ResNet18); this classifier is a {kind}, whose "
            "attention / LayerNorm / GELU layers have no CD rules. Use --backbone resnet18 for CDEP."
        )
    from megl.data.transforms import normalize_imagenet  # what megl.models' classifiers apply inside

    return net, normalize_imagenet(image)


def cdep_loss(model: torch.nn.Module, batch: Mapping[str, Any], prior: Any = None,
              config: Any = None) -> dict[str, Tensor]:
    check_batch(batch, "cdep")
    rule = str(hparam(config, "cdep_relu", DEFAULTS["cdep_relu"]))
    score = str(hparam(config, "cdep_score", DEFAULTS["cdep_score"]))
    if rule not in RELU_RULES or score not in SCORES:
        raise ValueError(f"cdep: cdep_relu must be one of {', '.join(RELU_RULES)} and cdep_score one of "
                         f"{', '.join(SCORES)}; got {rule!r}, {score!r} (--set method_args.cdep_relu=...)")
    clf = classifier_of(model, "cdep")
    net, x = _resnet_and_input(clf, batch["image"])  # fails fast for ViT, before any forward pass
    out = clf(batch["image"])
    ce = cross_entropy(out.logits, batch["label"])
    has_mask = batch["has_mask"].bool()
    if bool(has_mask.any()):
        # CD on the whole batch: in train mode its batch-norm statistics then equal those of the real forward
        blob = (1.0 - batch["mask"].to(x.dtype)) * has_mask[:, None, None].to(x.dtype)
        rel, irrel = contextual_decomposition(net, x, blob, rule)
        penalty = cdep_penalty(rel, irrel, has_mask, score)
    else:
        penalty = out.logits.sum() * 0.0
    return result(ce, penalty, float(hparam(config, "cdep_lambda", DEFAULTS["cdep_lambda"])))
