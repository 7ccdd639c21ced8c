"""Saliency and mask overlays: the one place images are drawn for training (`<run>/overlays/`), `megl.predict`
and the evaluation report (`megl.report.write_html_report`).

Arrays are (H, W, 3) floats in [0, 1] until they are written; PNGs are upscaled with nearest-neighbour
interpolation, so each saliency cell stays a visible block.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from torch import Tensor

from megl.files import atomic_write


def jet(x: np.ndarray) -> np.ndarray:
    """The classic 'jet' colour map: (H, W) in [0, 1] -> (H, W, 3) in [0, 1]."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return np.concatenate([r, g, b], -1)


def to_hwc(image01: Tensor) -> np.ndarray:
    if image01.dim() != 3 or image01.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W) in [0, 1], got {tuple(image01.shape)}")
    return image01.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def saliency_overlay(image01: Tensor, saliency: Tensor, alpha: float = 0.5) -> np.ndarray:
    """The image blended with a jet heat map of the (H, W) saliency in [0, 1]."""
    return (1 - alpha) * to_hwc(image01) + alpha * jet(saliency.detach().float().cpu().numpy())


def mask_overlay(image01: Tensor, mask: Tensor, alpha: float = 0.6) -> np.ndarray:
    """The image darkened outside the human mask and tinted green inside."""
    img = to_hwc(image01)
    m = mask.detach().float().cpu().clamp(0, 1).numpy()[..., None]
    green = np.array([0.1, 0.9, 0.2])
    return img * (1 - alpha * m) * (0.35 + 0.65 * m) + alpha * m * green


def mask_image(mask: Tensor) -> np.ndarray:
    """The (H, W) mask as a grey image."""
    return np.repeat(mask.detach().float().cpu().clamp(0, 1).numpy()[..., None], 3, 2)


def save_png(path, arr01: np.ndarray, scale: int = 1) -> None:
    """Write an (H, W, 3) array in [0, 1] as a PNG, `scale`× larger; atomically (a reader never sees half a file)."""
    from PIL import Image

    im = Image.fromarray((np.clip(arr01, 0, 1) * 255).round().astype(np.uint8))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def save_panel(path, image01: Tensor, saliency: Tensor, mask: Optional[Tensor] = None, scale: int = 4) -> None:
    """PNG: image | saliency overlay [| human mask], side by side."""
    panels = [to_hwc(image01), saliency_overlay(image01, saliency)] + ([mask_image(mask)] if mask is not None else [])
    save_png(path, np.concatenate(panels, axis=1), scale)
