"""Table-1-style statistics (samples, textual, visual, classes) of a set of splits."""
from __future__ import annotations

from typing import Mapping

from .dataset import ExplanationDataset

SPLIT_ORDER = ("train", "val", "test")


def _row(datasets) -> dict[str, int]:
    labels = {r.label for ds in datasets for r in ds.records}
    return {
        "samples": sum(ds.num_images for ds in datasets),
        "textual": sum(1 for ds in datasets for r in ds.records if r.references),
        "visual": sum(1 for ds in datasets for r in ds.records if r.has_mask),
        "rationales": sum(len(r.references) for ds in datasets for r in ds.records),
        "classes": len(labels),
    }


def statistics(splits: Mapping[str, ExplanationDataset]) -> dict:
    """Counts per image (not per expanded item), as in the paper's Table 1.

    Returns {"samples", "textual", "visual", "rationales", "classes", "class_vocabulary", "per_split": {name: row}}:
    samples = images, textual = images with ≥1 rationale, visual = images with a mask, rationales = total
    rationale count, classes = distinct labels present (class_vocabulary = size of the class list).
    """
    if not splits:
        raise ValueError("statistics: no splits given")
    names = sorted(splits, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99, s))
    out = _row([splits[n] for n in names])
    out["class_vocabulary"] = max(len(splits[n].class_names) for n in names)
    out["per_split"] = {n: _row([splits[n]]) for n in names}
    return out


def format_statistics(stats: dict, name: str = "dataset") -> str:
    """A Markdown table in the layout of the paper's Table 1, with one row per split and the total."""
    head = "| Dataset | Total Samples | Textual Exp. | Visual Exp. | # Classes | Rationales |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]

    def fmt(label, r):
        return (f"| {label} | {r['samples']:,} | {r['textual']:,} | {r['visual']:,} | {r['classes']:,} | "
                f"{r['rationales']:,} |")

    for split, r in stats.get("per_split", {}).items():
        lines.append(fmt(f"{name} / {split}", r))
    lines.append(fmt(f"**{name}**", stats))
    return "\n".join(lines)
