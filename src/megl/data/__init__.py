"""Data with the paper's three kinds of supervision: class label, visual explanation (mask, some samples),
textual rationales (all samples). See docs/architecture.md for the batch contract and docs/data-format.md for the
on-disk format.

- `synthetic.make_splits(SyntheticConfig())`: procedural default, no files needed; `synthetic.write_dataset`.
- `load_splits(root)`: the on-disk Object-ME / Action-ME format (validated at load time; `LoadReport`).
- `python -m megl.data.convert vqax|actx ...`: raw VQA-X / ACT-X releases -> that format.
- `mean_mask_prior(train_split)`, `statistics(splits)` / `format_statistics`, transforms.
"""
from .dataset import DataError, DataWarning, ExplanationDataset, ImageRecord, collate
from .loader import LoadReport, load_splits, read_mask
from .prior import mean_mask_prior
from .stats import format_statistics, statistics
from .transforms import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, clip_preprocess, normalize_imagenet,
                         resize, resize_mask, to_classifier_input)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "DataError", "DataWarning", "ExplanationDataset", "IMAGENET_MEAN", "IMAGENET_STD",
    "ImageRecord", "LoadReport", "clip_preprocess", "collate", "format_statistics", "load_splits",
    "mean_mask_prior", "normalize_imagenet", "read_mask", "resize", "resize_mask", "statistics",
    "to_classifier_input",
]
