"""`ExplanationDataset` (one split) and `collate` (the batch contract of docs/architecture.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from megl.errors import UserError

from .transforms import image_to_tensor

BATCH_KEYS = ("image", "label", "mask", "has_mask", "rationale", "references", "id")


class DataError(UserError, ValueError):
    """Bad input data: the message names the file / item, the problem and the fix."""


class DataWarning(UserWarning):
    """Data problems that were handled (counted skips, dropped masks, fallbacks)."""


@dataclass
class ImageRecord:
    """One image of a split: everything but the pixels (which live in the dataset's image store)."""

    id: str
    label: int
    references: list[str]
    has_mask: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def read_image_file(path: str | Path, size: int) -> Tensor:
    """Decode an image file to a (3, size, size) uint8 tensor (RGB; square resize, masks get the same resize)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return image_to_tensor(arr, size)


class ExplanationDataset(Dataset):
    """Images with a class label, rationales for all, and a mask for some.

    Items (dicts) follow the batch contract: `image` (3,H,W) float32 in [0,1] (not normalised), `label` int,
    `mask` (H,W) float32 (zeros when absent), `has_mask` bool, `rationale` str, `references` list[str], `id` str.

    `expand_rationales=True` makes every (image, rationale) pair an item (text training: an image with three
    rationales appears three times per epoch, `id` stays the image id); False gives one item per image with
    `rationale` = the first reference (evaluation). `expanded(flag)` returns the other view, sharing storage.

    Pixels come from `images` (an (N,3,S,S) uint8 tensor) or are decoded lazily from `image_paths`
    (validated at load time by the loader, so a bad file never surfaces mid-epoch).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        class_names: Sequence[str],
        image_size: int,
        *,
        images: Optional[Tensor] = None,
        image_paths: Optional[Sequence[str]] = None,
        masks: Optional[dict[int, Tensor]] = None,
        expand_rationales: bool = False,
        split: str = "",
        report: Any = None,
    ):
        if (images is None) == (image_paths is None):
            raise ValueError("ExplanationDataset: give exactly one of images= (uint8 tensor) or image_paths=")
        n = len(records)
        if images is not None:
            if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, image_size, image_size):
                raise ValueError(f"ExplanationDataset: images must be uint8 (N, 3, {image_size}, {image_size}), "
                                 f"got {images.dtype} {tuple(images.shape)}")
            if images.shape[0] != n:
                raise ValueError(f"ExplanationDataset: {images.shape[0]} images for {n} records")
        if image_paths is not None and len(image_paths) != n:
            raise ValueError(f"ExplanationDataset: {len(image_paths)} image paths for {n} records")
        masks = dict(masks or {})
        for i, r in enumerate(records):
            if not r.references or not all(isinstance(t, str) and t for t in r.references):
                raise ValueError(f"ExplanationDataset: item {r.id!r} needs at least one non-empty rationale")
            if not 0 <= r.label < len(class_names):
                raise ValueError(f"ExplanationDataset: item {r.id!r} label {r.label} outside [0, {len(class_names)})")
            if r.has_mask != (i in masks):
                raise ValueError(f"ExplanationDataset: item {r.id!r} has_mask={r.has_mask} but mask "
                                 f"{'present' if i in masks else 'absent'}")
            if i in masks and tuple(masks[i].shape) != (image_size, image_size):
                raise ValueError(f"ExplanationDataset: mask of {r.id!r} has shape {tuple(masks[i].shape)}, "
                                 f"expected ({image_size}, {image_size})")
        self.records = list(records)
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.split = split
        self.report = report
        self._images = images
        self._paths = list(image_paths) if image_paths is not None else None
        self._masks = {i: m.to(torch.float16) for i, m in masks.items()}  # [0,1] masks; half the memory
        self._zero_mask = torch.zeros(self.image_size, self.image_size)
        self.expand_rationales = bool(expand_rationales)
        if self.expand_rationales:
            self._index = [(i, j) for i, r in enumerate(self.records) for j in range(len(r.references))]
        else:
            self._index = [(i, 0) for i in range(n)]

    # -- views and per-image accessors
    def expanded(self, expand_rationales: bool = True) -> "ExplanationDataset":
        """The same split with one item per (image, rationale) pair (True) or per image (False)."""
        new = object.__new__(ExplanationDataset)
        new.__dict__.update(self.__dict__)
        new.expand_rationales = bool(expand_rationales)
        new._index = ([(i, j) for i, r in enumerate(self.records) for j in range(len(r.references))]
                      if expand_rationales else [(i, 0) for i in range(len(self.records))])
        return new

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_images(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> Tensor:
        """(num_images,) int64 labels, one per image (not per expanded item)."""
        return torch.tensor([r.label for r in self.records], dtype=torch.int64)

    @property
    def has_masks(self) -> Tensor:
        """(num_images,) bool, one per image."""
        return torch.tensor([r.has_mask for r in self.records], dtype=torch.bool)

    def image(self, i: int) -> Tensor:
        """Image i (per-image index) as (3, S, S) float32 in [0, 1]."""
        if self._images is not None:
            img = self._images[i]
        else:
            try:
                img = read_image_file(self._paths[i], self.image_size)
            except (OSError, ValueError) as e:  # validated at load time; only an external change gets here
                raise DataError(f"image {self._paths[i]} of item {self.records[i].id!r} became unreadable after "
                                f"loading ({e}); restore the file or reload the dataset") from e
        return img.float().div_(255.0)

    def mask(self, i: int) -> Tensor:
        """Mask of image i as (S, S) float32 in [0, 1]; zeros when the image has none."""
        m = self._masks.get(i)
        return self._zero_mask.clone() if m is None else m.float()

    # -- Dataset protocol
    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, k: int) -> dict[str, Any]:
        if k < 0:
            k += len(self)
        i, j = self._index[k]
        r = self.records[i]
        return {
            "image": self.image(i),
            "label": r.label,
            "mask": self.mask(i),
            "has_mask": r.has_mask,
            "rationale": r.references[j],
            "references": list(r.references),
            "id": r.id,
        }

    def __repr__(self) -> str:
        return (f"ExplanationDataset(split={self.split!r}, images={self.num_images}, items={len(self)}, "
                f"masks={len(self._masks)}, classes={self.num_classes}, image_size={self.image_size})")


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """List of items -> batch dict (docs/architecture.md): image (B,3,H,W) float32, label (B,) int64,
    mask (B,H,W) float32, has_mask (B,) bool, rationale list[str], references list[list[str]], id list[str]."""
    if len(items) == 0:
        raise ValueError("collate: got an empty list of items")
    missing = [k for k in BATCH_KEYS if k not in items[0]]
    if missing:
        raise KeyError(f"collate: items lack keys {missing}; items must come from ExplanationDataset")
    return {
        "image": torch.stack([it["image"] for it in items]).float(),
        "label": torch.tensor([int(it["label"]) for it in items], dtype=torch.int64),
        "mask": torch.stack([it["mask"] for it in items]).float(),
        "has_mask": torch.tensor([bool(it["has_mask"]) for it in items], dtype=torch.bool),
        "rationale": [it["rationale"] for it in items],
        "references": [list(it["references"]) for it in items],
        "id": [it["id"] for it in items],
    }
