"""The mean-mask prior Ā (paper Eq. for L_dc): mean of the normalised training masks."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .dataset import DataError, DataWarning, ExplanationDataset


def mean_mask_prior(split: ExplanationDataset, *, on_missing: str = "error") -> Tensor:
    """Ā = (1/n) Σ_k A_k over the n images of `split` that carry a mask -> (H, W) float32 in [0, 1].

    Computed per image (an image with three rationales counts once). Compute it once from the training split
    and save it with the run. With no annotated image Ā is undefined: `on_missing="error"` (default) raises
    DataError; `on_missing="uniform"` returns a constant 1/2 map (uniform after the KL's normalisation) with a
    DataWarning.
    """
    if on_missing not in ("error", "uniform"):
        raise ValueError(f"mean_mask_prior: on_missing must be 'error' or 'uniform', got {on_missing!r}")
    idx = [i for i, r in enumerate(split.records) if r.has_mask]
    size = split.image_size
    if not idx:
        msg = (f"mean_mask_prior: the {split.split or 'given'} split has no image with a visual explanation "
               f"({split.num_images} images), so the prior Ā is undefined")
        if on_missing == "error":
            raise DataError(msg + ": add masks (visual_exp) to some training items, or pass on_missing='uniform' "
                            "to use a uniform prior")
        warnings.warn(msg + "; using a uniform prior instead", DataWarning, stacklevel=2)
        return torch.full((size, size), 0.5, dtype=torch.float32)
    acc = torch.zeros(size, size, dtype=torch.float64)
    for i in idx:
        acc += split.mask(i).double()
    return (acc / len(idx)).float()
