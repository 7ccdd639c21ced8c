"""Tensor transforms shared by the loader, the models and the losses.

Images travel as float32 in [0, 1] (see docs/architecture.md); normalisation happens inside the models.
Every function here is plain tensor ops, so gradients flow through them (CLIP sees I ⊙ Â, which depends on the
classifier through Â).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# open_clip / OpenAI CLIP preprocessing constants
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_image(image01: Tensor, who: str) -> Tensor:
    if not isinstance(image01, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor image, got {type(image01).__name__}")
    if image01.dim() not in (3, 4) or image01.shape[-3] != 3:
        raise ValueError(f"{who}: expected (3, H, W) or (B, 3, H, W) RGB in [0, 1], got shape {tuple(image01.shape)}")
    if not image01.is_floating_point():
        raise TypeError(f"{who}: expected a float image in [0, 1], got {image01.dtype}: divide uint8 images by 255")
    return image01


def _normalize(image01: Tensor, mean, std) -> Tensor:
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=image01.dtype, device=image01.device).view(shape)
    s = torch.tensor(std, dtype=image01.dtype, device=image01.device).view(shape)
    return (image01 - m) / s


def normalize_imagenet(image01: Tensor) -> Tensor:
    """(…, 3, H, W) in [0, 1] -> ImageNet-normalised (the classifier's input)."""
    return _normalize(_check_image(image01, "normalize_imagenet"), IMAGENET_MEAN, IMAGENET_STD)


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize of (…, H, W) float tensors; the one resize used for images AND their masks.

    Antialiased when shrinking (so a large mask does not alias), plain bilinear when enlarging; differentiable.
    """
    if isinstance(size, int):
        size = (size, size)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    y = x.reshape(-1, 1, *x.shape[-2:])
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return y.reshape(*lead, *size)


def resize_mask(mask: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Resize an (…, H, W) mask exactly as its image is resized; values stay in [0, 1]."""
    return resize(mask.float(), size).clamp_(0.0, 1.0)


def to_classifier_input(image01: Tensor, size: int | None = None) -> Tensor:
    """Classifier input: optional resize to `size`, then ImageNet normalisation."""
    image01 = _check_image(image01, "to_classifier_input")
    if size is not None:
        image01 = resize(image01, size)
    return normalize_imagenet(image01)


def clip_preprocess(image01: Tensor, size: int = 224) -> Tensor:
    """CLIP preprocessing as differentiable tensor ops: bilinear resize of the short side to `size`, centre crop,
    CLIP mean/std normalisation. Applied to the masked image I ⊙ Â, so gradients must reach Â."""
    image01 = _check_image(image01, "clip_preprocess")
    h, w = image01.shape[-2:]
    if h != w:  # short side -> size, then centre crop (CLIP's own recipe, with bilinear instead of bicubic)
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        image01 = resize(image01, (nh, nw))
        top, left = (nh - size) // 2, (nw - size) // 2
        image01 = image01[..., top:top + size, left:left + size]
    else:
        image01 = resize(image01, size)
    return _normalize(image01, CLIP_MEAN, CLIP_STD)


def normalize_mask_array(mask: np.ndarray) -> np.ndarray | None:
    """(H, W) or (k, H, W) mask -> (H, W) float32: averaged over annotators, min-max normalised to [0, 1].

    Returns None for a constant mask (min == max), which carries no explanation signal.
    """
    m = np.asarray(mask)
    if m.dtype == np.bool_:
        m = m.astype(np.float32)
    m = m.astype(np.float32)
    if m.ndim == 3:
        m = m.mean(axis=0)
    lo, hi = float(m.min()), float(m.max())
    if not hi > lo:
        return None
    return ((m - lo) / (hi - lo)).astype(np.float32)


def image_to_tensor(array_hwc_uint8: np.ndarray, size: int | None = None) -> Tensor:
    """(H, W, 3) uint8 -> (3, size, size) uint8 tensor, resized with `resize` (same path as masks)."""
    arr = np.ascontiguousarray(array_hwc_uint8)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image_to_tensor: expected (H, W, 3) uint8, got {arr.dtype} {arr.shape}")
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).permute(2, 0, 1)
    if size is not None and tuple(t.shape[-2:]) != (size, size):
        t = resize(t.float(), size).round_().clamp_(0, 255).to(torch.uint8)
    return t.contiguous()
