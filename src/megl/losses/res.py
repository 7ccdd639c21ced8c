"""RES-G and RES-L (Gao et al., 2022, "RES: A Robust Framework for Guiding Visual Explanation", KDD; EGL survey
§3.2.1 eq. 9-10 and §5.1.6): explanation supervision that is robust to inaccurate region boundaries and to
incomplete annotations.

    L = CE(y, f(I)) + λ · [ max(0, L_thr − η) + L_imp ]

    L_thr = (1/|P|) Σ_{P} |tanh(k (Â − a)) − A|          P = pixels with A ≠ 0 (the "effective area")
    L_imp = mean_{annotated b, p, q} |Â − g(A)|

Â: differentiable Grad-CAM map of the ground-truth class (the fused op's saliency), A: the human mask
(positive values = relevant; negative values, if a dataset has counterfactual marks, = must be excluded).
a: the threshold that best separates the explanation at the annotated pixels, found each batch by the authors'
brute-force solver (`bf_threshold`, no gradient); tanh(k(Â − a)) is the differentiable surrogate of the binarised
explanation (survey eq. 10). η: the slack that tolerates boundary noise. g: the imputation of the incomplete
annotation — RES-G: a fixed 3×3 Gaussian filter at the Grad-CAM grid; RES-L: a learnable convolution on the
binary mask (the "S1" shallow imputation: one Conv2d with kernel 2r, stride r, padding r/2, where r = image size
/ Grad-CAM size — (64, 32, 16) at 224 px → 7×7 in the paper), min-max normalised.

Defaults (reference code github.com/YuyangGao/RES, RES.py and its README run lines for RES-G / RES-L), except
λ = 30, chosen for both by megl.sweep on megl.train's default data (docs/recipe.md §3; the reference adds the
attention loss unweighted, λ = 1), η = 0.1 (`--eta 0.1`; the EGL survey's re-run used 0.01),
k = 5 (`torch.tanh(5*(att_maps - a))`), imputation regulariser weight 0 (`--reg 0.0`, as the survey also sets).
Maps are compared at image resolution (the paper: at the 7×7 Grad-CAM grid), so all methods share one saliency.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .common import classifier_of, cross_entropy, hparam, method_gradcam_pass, result

DEFAULTS = {"res_lambda": 30.0, "res_eta": 0.1, "res_tanh_scale": 5.0, "res_reg": 0.0}
BF_EPS = 1e-4  # RES.py BF_solver: "v = x[idx] + epsilon" for negative candidates
NORM_EPS = 1e-6  # RES.py: "temp / (torch.max(temp) + 1e-6)"


# ----------------------------------------------------------------------------- threshold a (survey eq. 10)
@torch.no_grad()
def bf_threshold(x: Tensor, y: Tensor, eps: float = BF_EPS) -> Tensor:
    """The RES brute-force threshold: the candidate value v that satisfies the largest share of constraints
    "explanation ≥ v on positive pixels" and "explanation < v on negative pixels" (each set weighted by 1/size).

    Candidates are the explanation values at positive pixels and (value + eps) at negative pixels, tried in that
    order (negatives first); the first best one wins, as in RES.py's loop. O(N log N) by sorting instead of the
    reference O(N²) loops. x, y: any shape (flattened); returns a 0-d tensor (0 when no pixel is labelled).
    """
    x, y = x.detach().flatten(), y.detach().flatten()
    neg, pos = x[y < 0], x[y > 0]
    n_neg, n_pos = neg.numel(), pos.numel()
    if n_neg + n_pos == 0:
        return x.new_zeros(())
    cand = torch.cat([neg + eps, pos])
    below_neg = torch.searchsorted(neg.sort().values, cand, side="left")  # #negatives strictly below v
    at_or_above_pos = n_pos - torch.searchsorted(pos.sort().values, cand, side="left")  # #positives >= v
    # share_neg + share_pos, scaled by n_neg * n_pos to stay in exact integers
    score = below_neg * max(n_pos, 1) + at_or_above_pos * max(n_neg, 1)
    if int(score.max()) == 0:
        return x.new_zeros(())
    return cand[torch.argmax(score)]


# ----------------------------------------------------------------------------- imputations g(A)
def _smooth3(x: Tensor) -> Tensor:
    """3×3 Gaussian blur of (B,1,h,w): OpenCV's GaussianBlur(ksize=3, sigma=0) kernel [1/4, 1/2, 1/4]⊗[1/4, 1/2, 1/4]
    with its default reflect-101 border, as in RES.py."""
    k1 = x.new_tensor([0.25, 0.5, 0.25])
    kernel = (k1[:, None] * k1[None, :])[None, None]
    mode = "reflect" if min(x.shape[-2:]) >= 2 else "replicate"
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode=mode), kernel)


def _upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def gaussian_imputation(mask: Tensor, cam_size: tuple[int, int]) -> Tensor:
    """RES-G's fixed imputation: positive part of the mask, area-resized to the Grad-CAM grid, 3×3 Gaussian blur,
    divided by its max (+1e-6), bilinearly upsampled back to the mask's size. (B, H, W) -> (B, H, W)."""
    H, W = mask.shape[-2:]
    lo = F.adaptive_avg_pool2d(mask.clamp_min(0).unsqueeze(1), cam_size)
    blurred = _smooth3(lo)
    blurred = blurred / (blurred.amax(dim=(2, 3), keepdim=True) + NORM_EPS)
    return _upsample(blurred, (H, W)).squeeze(1)


class ResImputation(nn.Module):
    """RES-L's learnable imputation ("S1"): Conv2d(1, 1, 2r, stride r, padding r//2) on the binary positive mask,
    landing on the Grad-CAM grid, min-max normalised per sample, upsampled to the image for comparison."""

    def __init__(self, ratio: int):
        super().__init__()
        if ratio < 1:
            raise ValueError(f"ResImputation: ratio (image size / Grad-CAM size) must be >= 1, got {ratio}")
        self.ratio = int(ratio)
        self.conv = nn.Conv2d(1, 1, kernel_size=2 * self.ratio, stride=self.ratio, padding=self.ratio // 2)

    def forward(self, mask: Tensor, cam_size: tuple[int, int]) -> Tensor:
        H, W = mask.shape[-2:]
        x = (mask > 0).to(self.conv.weight.dtype).unsqueeze(1)
        y = self.conv(x)
        if tuple(y.shape[-2:]) != tuple(cam_size):  # odd ratios / sizes: land exactly on the Grad-CAM grid
            y = F.adaptive_avg_pool2d(y, cam_size)
        y = y - y.amin(dim=(2, 3), keepdim=True)
        y = y / (y.amax(dim=(2, 3), keepdim=True) + NORM_EPS)
        return _upsample(y, (H, W)).squeeze(1)


# ----------------------------------------------------------------------------- the loss
class ResTerms(NamedTuple):
    visual: Tensor  # max(0, L_thr - eta) + L_imp (+ reg term)
    threshold: Tensor  # L_thr before the slack
    imputation: Tensor  # L_imp
    a: Tensor  # the batch threshold


def res_visual_loss(saliency: Tensor, mask: Tensor, has_mask: Tensor, imputed: Tensor, *,
                    eta: float = DEFAULTS["res_eta"], tanh_scale: float = DEFAULTS["res_tanh_scale"],
                    reg: float = DEFAULTS["res_reg"]) -> ResTerms:
    """RES explanation loss over the annotated samples (all (B, H, W); has_mask (B,) bool). 0 when none."""
    if not (saliency.shape == mask.shape == imputed.shape):
        raise ValueError(
            f"res: saliency {tuple(saliency.shape)}, mask {tuple(mask.shape)} and imputed {tuple(imputed.shape)} "
            "must have one shape (B, H, W)"
        )
    has_mask = has_mask.bool()
    zero = saliency.sum() * 0.0
    if not bool(has_mask.any()):
        return ResTerms(zero, zero.detach(), zero.detach(), saliency.new_zeros(()))
    s, y, g = saliency[has_mask], mask[has_mask].to(saliency.dtype), imputed[has_mask]
    a = bf_threshold(s, y)
    area = (y != 0).to(s.dtype)
    thr = ((torch.tanh(tanh_scale * (s - a)) - y).abs() * area).sum() / area.sum().clamp_min(1.0)
    imp = (s - g).abs().mean()
    visual = torch.relu(thr - eta) + imp
    if reg:
        visual = visual + reg * F.mse_loss(g, y.clamp_min(0))
    return ResTerms(visual, thr.detach(), imp.detach(), a)


def _res_loss(model, batch, config, imputation: str) -> dict[str, Tensor]:
    name = f"res-{imputation}"
    p = method_gradcam_pass(model, batch, config, name)
    clf = classifier_of(model, name)
    mask = batch["mask"].to(p.saliency.saliency.dtype)
    if imputation == "g":
        imputed = gaussian_imputation(mask, p.cam_size)
    else:
        imp = _imputation_of(model, clf)
        if imp is None:
            raise RuntimeError(
                "res-l: the learnable imputation is not registered on the model; call "
                "megl.losses.res.setup_res_l(model, config) before building the optimizer (megl.models.build_model "
                "does so: the registry names it as res-l's setup)"
            )
        imputed = imp(mask, p.cam_size)
    ce = cross_entropy(p.logits, batch["label"])
    terms = res_visual_loss(
        p.saliency.saliency, mask, batch["has_mask"], imputed,
        eta=float(hparam(config, "res_eta", DEFAULTS["res_eta"])),
        tanh_scale=float(hparam(config, "res_tanh_scale", DEFAULTS["res_tanh_scale"])),
        reg=float(hparam(config, "res_reg", DEFAULTS["res_reg"])),
    )
    return result(ce, terms.visual, float(hparam(config, "res_lambda", DEFAULTS["res_lambda"])),
                  threshold=terms.threshold, imputation=terms.imputation, a=terms.a)


def res_g_loss(model: torch.nn.Module, batch: Mapping[str, Any], prior: Any = None,
               config: Any = None) -> dict[str, Tensor]:
    return _res_loss(model, batch, config, "g")


def res_l_loss(model: torch.nn.Module, batch: Mapping[str, Any], prior: Any = None,
               config: Any = None) -> dict[str, Tensor]:
    return _res_loss(model, batch, config, "l")


def _imputation_of(model: nn.Module, clf: nn.Module) -> Optional[nn.Module]:
    return getattr(clf, "res_imputation", None) or getattr(model, "res_imputation", None)


def _image_hw(image_size: Any) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def setup_res_l(model: torch.nn.Module, config: Any = None, image_size: Optional[Any] = None) -> nn.Module:
    """Register RES-L's learnable imputation as `model.classifier.res_imputation` (so it is in the classifier's
    parameter group, hence the optimizer, and in checkpoints). Idempotent.

    Call once after building the model and before building the optimizer or loading a RES-L checkpoint.
    The conv's stride is image size / Grad-CAM size, found by one dummy forward of the classifier.
    """
    clf = classifier_of(model, "res-l")
    existing = _imputation_of(model, clf)
    if existing is not None:
        return existing
    size = image_size if image_size is not None else hparam(config, "image_size", None)
    if size is None:
        raise ValueError("setup_res_l: the image size is unknown; pass image_size= or a config with .image_size")
    H, W = _image_hw(size)
    param = next(clf.parameters())
    was_training = clf.training
    clf.eval()
    try:
        with torch.no_grad():
            h, w = clf(torch.zeros(1, 3, H, W, device=param.device, dtype=param.dtype)).activations.shape[-2:]
    finally:
        clf.train(was_training)
    module = ResImputation(max(1, round(min(H / h, W / w)))).to(device=param.device)
    clf.add_module("res_imputation", module)
    return module

