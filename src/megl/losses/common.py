"""Helpers shared by the comparison methods' losses (GRADIA, HAICS, RES, RRR, CDEP).

Every method is written in two layers:

* a core loss on plain tensors (saliency maps, masks, logits, ...) that the tests check against hand-computed
  values on tiny cases, and
* a thin adapter `fn(model, batch, prior, config) -> dict[str, Tensor]` (the registry contract of
  `megl.losses`) that runs `model.classifier`, takes its Grad-CAM gradients and calls the core loss.

Only annotated samples (`batch["has_mask"]`) contribute an explanation loss; every sample gets cross-entropy.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megl.ops import SaliencyOutput, fused_saliency

BATCH_KEYS = ("image", "label", "mask", "has_mask")


def hparam(config: Any, name: str, default: Any) -> Any:
    """A method hyperparameter from the run config, else the paper default.

    Looked up, in order, in `config.method_args[name]` (megl.config.Config's dict of comparison-method
    hyper-parameters, e.g. `--set method_args.res_eta=0.05`), `config.<name>`, and `config[name]` /
    `config["method_args"][name]` when the config is a mapping. `None` values fall back to the default.
    """
    if config is None:
        return default
    if isinstance(config, Mapping):
        args = config.get("method_args")
        if isinstance(args, Mapping) and args.get(name) is not None:
            return args[name]
        value = config.get(name)
        return default if value is None else value
    args = getattr(config, "method_args", None)
    if isinstance(args, Mapping) and args.get(name) is not None:
        return args[name]
    value = getattr(config, name, None)
    return default if value is None else value


def saliency_target_of(config: Any) -> str:
    """Which score an explanation loss explains: `config.saliency_target` ("logit" when unset)."""
    return str(hparam(config, "saliency_target", "logit"))


def backend_of(config: Any) -> str:
    """The fused op's backend: `config.saliency_backend` (megl.config.Config), else 'auto'."""
    return str(hparam(config, "saliency_backend", None) or hparam(config, "backend", "auto"))


def check_batch(batch: Mapping[str, Any], method: str) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(
            f"{method}: the batch lacks {', '.join(missing)}; it must be a dict as returned by megl.data.collate "
            f"with keys {', '.join(BATCH_KEYS)}"
        )
    image, mask = batch["image"], batch["mask"]
    if image.dim() != 4:
        raise ValueError(f"{method}: batch['image'] must be (B, C, H, W), got shape {tuple(image.shape)}")
    if tuple(mask.shape) != (image.shape[0], *image.shape[-2:]):
        raise ValueError(
            f"{method}: batch['mask'] must be (B, H, W) = {(image.shape[0], *image.shape[-2:])}, "
            f"got {tuple(mask.shape)}"
        )


def classifier_of(model: torch.nn.Module, method: str) -> torch.nn.Module:
    """`model.classifier` (MEGLModel) or the model itself when it is a bare classifier."""
    clf = getattr(model, "classifier", None)
    if clf is None:
        if hasattr(model, "gradcam_gradients"):
            return model
        raise AttributeError(
            f"{method}: the model has no .classifier (expected a MEGLModel from megl.models.build_model)")
    return clf


def upcast(t: Tensor) -> Tensor:
    """Half-precision tensors to float32 for the loss arithmetic; float32 / float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def cross_entropy(logits: Tensor, label: Tensor) -> Tensor:
    return F.cross_entropy(upcast(logits), label.long())


def n_annotated(has_mask: Tensor) -> Tensor:
    """Number of annotated samples as a float tensor, at least 1 (so an unannotated batch gives a 0 loss)."""
    return has_mask.float().sum().clamp_min(1.0)


class GradCamPass(NamedTuple):
    logits: Tensor
    saliency: SaliencyOutput  # from the fused op: saliency (B,H,W), masked, l1 (B,), kl (B,)
    cam_size: tuple[int, int]  # (h, w) of the Grad-CAM layer


SALIENCY_TARGETS = ("logit", "log_prob")


def training_gradients(classifier: torch.nn.Module, out: Any, target: Tensor, saliency_target: str = "logit",
                       create_graph: bool = True) -> Tensor:
    """Grad-CAM gradients for an explanation loss: of the target's logit (classic Grad-CAM) or of its
    log-probability. The logit's map shows only evidence *for* the class (after the ReLU); a network can keep
    reading a decoy through evidence *against* the other classes, which that map never shows. The log-probability
    map, ∂ log p_y/∂A = ∂z_y/∂A − Σ_c p_c ∂z_c/∂A, shows both (docs/recipe.md, "negative evidence")."""
    if saliency_target == "logit":  # the classifier's own Grad-CAM (create_graph is its default)
        if create_graph:
            return classifier.gradcam_gradients(out, target)
        return classifier.gradcam_gradients(out, target, create_graph=False)
    if saliency_target != "log_prob":
        raise ValueError(f"saliency_target {saliency_target!r}: choose one of {', '.join(SALIENCY_TARGETS)}")
    from megl.ops import autograd_gradcam_gradients

    return autograd_gradcam_gradients(F.log_softmax(upcast(out.logits), dim=1), out.activations, target,
                                      create_graph=create_graph)


def gradcam_pass(classifier: torch.nn.Module, batch: Mapping[str, Any], *, backend: str = "auto",
                 target: Optional[Tensor] = None, saliency_target: str = "logit") -> GradCamPass:
    """One classifier forward plus the differentiable Grad-CAM of `target` (default: the label) via the fused op.

    The fused op also returns the per-sample L1 to the mask (0 for unannotated samples), which GRADIA uses as is.
    """
    image = batch["image"]
    out = classifier(image)
    target = batch["label"] if target is None else target
    grads = training_gradients(classifier, out, target, saliency_target).to(out.activations.dtype)
    sal = fused_saliency(out.activations, grads, image, batch["mask"].to(image.dtype), batch["has_mask"].bool(),
                         None, backend=backend)
    return GradCamPass(out.logits, sal, tuple(out.activations.shape[-2:]))


PARTS = "parts"  # key of the weighted, undetached summands of "total" (megl.train measures their gradients)


def method_gradcam_pass(model: torch.nn.Module, batch: Mapping[str, Any], config: Any, method: str) -> GradCamPass:
    """The start every Grad-CAM method's adapter shares: check the batch, find the classifier, run `gradcam_pass`
    with the config's backend and saliency target."""
    check_batch(batch, method)
    return gradcam_pass(classifier_of(model, method), batch, backend=backend_of(config),
                        saliency_target=saliency_target_of(config))


def result(ce: Tensor, visual: Tensor, weight: float, **parts: Tensor) -> dict[str, Tensor]:
    """The registry's loss dict: total = ce + weight * visual, plus the parts for logging."""
    out = {"total": ce + weight * visual, "ce": ce.detach(), "visual": visual.detach(),
           PARTS: {"ce": ce, "visual": weight * visual}}
    out.update({k: v.detach() for k, v in parts.items()})
    return out
