"""Classification metrics: accuracy and macro-averaged precision / recall / F1 (paper Table 2)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _as_long_1d(x, name: str) -> Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class indices, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        raise ValueError(f"{name} must hold integer class indices, got {t.dtype}; pass logits.argmax(-1)")
    return t.long()


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> Tensor:
    """(C, C) counts, rows = true class, columns = predicted class."""
    t, p = _as_long_1d(y_true, "y_true"), _as_long_1d(y_pred, "y_pred")
    if t.numel() != p.numel():
        raise ValueError(f"y_true has {t.numel()} items but y_pred has {p.numel()}")
    if t.numel() and min(int(t.min()), int(p.min())) < 0:
        raise ValueError("class indices must be >= 0")
    c = num_classes if num_classes is not None else (int(max(t.max(), p.max())) + 1 if t.numel() else 0)
    if t.numel() and int(max(t.max(), p.max())) >= c:
        raise ValueError(f"a class index is >= num_classes={c}")
    return torch.bincount(t * c + p, minlength=c * c).reshape(c, c)


def classification_metrics(y_true, y_pred, labels: Sequence[int] | None = None) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1, as sklearn computes them with `zero_division=0`.

    Per class c: P_c = TP/(TP+FP), R_c = TP/(TP+FN), F1_c = 2 P_c R_c / (P_c + R_c); any 0/0 counts as 0.
    Macro = unweighted mean over `labels` (default: the classes that occur in y_true or y_pred, sklearn's
    default; pass `labels=range(num_classes)` to also count classes absent from both as 0). Macro F1 is the
    mean of per-class F1, not the F1 of macro P and R.
    """
    t, p = _as_long_1d(y_true, "y_true"), _as_long_1d(y_pred, "y_pred")
    if t.numel() == 0:
        raise ValueError("no samples: y_true is empty")
    if labels is None:
        labels = torch.unique(torch.cat([t, p])).tolist()
    labels = [int(c) for c in labels]
    n = max(labels + [int(t.max()), int(p.max())]) + 1
    cm = confusion_matrix(t, p, n).double()
    tp = cm.diagonal()
    pred_pos, true_pos = cm.sum(0), cm.sum(1)
    idx = torch.tensor(labels, dtype=torch.long)
    tp, pred_pos, true_pos = tp[idx], pred_pos[idx], true_pos[idx]
    prec = torch.where(pred_pos > 0, tp / pred_pos.clamp_min(1), torch.zeros_like(tp))
    rec = torch.where(true_pos > 0, tp / true_pos.clamp_min(1), torch.zeros_like(tp))
    denom = prec + rec
    f1 = torch.where(denom > 0, 2 * prec * rec / denom.clamp_min(1e-300), torch.zeros_like(tp))
    return {
        "accuracy": float((t == p).double().mean()),
        "precision": float(prec.mean()),
        "recall": float(rec.mean()),
        "f1": float(f1.mean()),
    }
