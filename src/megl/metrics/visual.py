"""Visual explainability: agreement of a saliency map with a human mask (paper §4.2, EGL survey §5.1.5).

Both maps are binarised at the same threshold t (default 0.5): S = saliency ≥ t, M = mask ≥ t. Per sample,

    IoU = |S ∩ M| / |S ∪ M|          (1 when both are empty: nothing to find and nothing claimed)
    precision = |S ∩ M| / |S|,  recall = |S ∩ M| / |M|,  F1 = 2PR/(P+R)   (0/0 counts as 0)

mIoU and the explanation precision / recall / F1 are the means of these over the samples that have a mask.
Saliency maps are expected min-max normalised to [0, 1] (what `fused_saliency` returns).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check(saliency: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    if saliency.dim() == 2:
        saliency = saliency[None]
    if mask.dim() == 2:
        mask = mask[None]
    if saliency.shape != mask.shape:
        raise ValueError(
            f"saliency {tuple(saliency.shape)} and mask {tuple(mask.shape)} must have the same (B, H, W) shape; "
            "upsample the saliency to the mask's resolution first (fused_saliency already returns image size)")
    return saliency.detach(), mask.detach().to(saliency.device)


def pixel_scores(saliency: Tensor, mask: Tensor, threshold: float = 0.5) -> dict[str, Tensor]:
    """Per-sample IoU, precision, recall and F1 of (saliency ≥ t) against (mask ≥ t); each a (B,) float tensor."""
    s, m = _check(saliency, mask)
    s = (s >= threshold).flatten(1)
    m = (m >= threshold).flatten(1)
    inter = (s & m).sum(1).double()
    union = (s | m).sum(1).double()
    ns, nm = s.sum(1).double(), m.sum(1).double()
    zero = torch.zeros_like(inter)
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    prec = torch.where(ns > 0, inter / ns.clamp_min(1), zero)
    rec = torch.where(nm > 0, inter / nm.clamp_min(1), zero)
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp_min(1e-300), zero)
    return {"iou": iou, "precision": prec, "recall": rec, "f1": f1}


def iou(saliency: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Per-sample IoU of the binarised maps, (B,)."""
    return pixel_scores(saliency, mask, threshold)["iou"]


class VisualMetrics:
    """Accumulates per-sample scores over batches; `compute()` averages over the annotated samples.

    >>> acc = VisualMetrics(threshold=0.5)
    >>> acc.update(saliency, mask, has_mask)   # per batch
    >>> acc.compute()   # {"miou", "exp_precision", "exp_recall", "exp_f1", "n_annotated", "threshold"}
    """

    def __init__(self, threshold: float = 0.5):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self._scores: dict[str, list[Tensor]] = {"iou": [], "precision": [], "recall": [], "f1": []}

    def update(self, saliency: Tensor, mask: Tensor, has_mask: Tensor | None = None) -> dict[str, Tensor]:
        s, m = _check(saliency, mask)
        keep = torch.ones(s.shape[0], dtype=torch.bool) if has_mask is None else has_mask.detach().cpu().bool()
        if keep.shape != (s.shape[0],):
            raise ValueError(f"has_mask must be (B,) = ({s.shape[0]},), got {tuple(keep.shape)}")
        scores = pixel_scores(s, m, self.threshold)
        for k, v in scores.items():
            self._scores[k].append(v.cpu()[keep])
        return scores

    def compute(self) -> dict[str, float | int | None]:
        n = sum(int(v.numel()) for v in self._scores["iou"])
        out: dict[str, float | int | None] = {"n_annotated": n, "threshold": self.threshold}
        for key, name in (("iou", "miou"), ("precision", "exp_precision"), ("recall", "exp_recall"), ("f1", "exp_f1")):
            out[name] = float(torch.cat(self._scores[key]).mean()) if n else None
        return out


def visual_metrics(saliency: Tensor, mask: Tensor, has_mask: Tensor | None = None,
                   threshold: float = 0.5) -> dict[str, float | int | None]:
    """mIoU and explanation precision / recall / F1 over the samples with `has_mask` (all when None).

    Values are None when no sample is annotated (a mean over nothing is not 0).
    """
    acc = VisualMetrics(threshold)
    acc.update(saliency, mask, has_mask)
    return acc.compute()
