"""Loader for the on-disk Object-ME / Action-ME format (docs/data-format.md):

    <root>/exp_annotation.json   {id: {"class_id": int, "ans": str, "image_path": str, "visual_exp": str,
                                       "exp": [str, ...], "split": "train"|"val"|"test" (optional)}}
    <root>/images/<basename of image_path>
    <root>/<visual_exp>          .npy mask (H,W) or (k,H,W) (k annotators, averaged), float or uint8; "" = none
    <root>/classes.json          optional: the class list (written by megl's writers; pins ids without samples)

Paths in the file are trusted only inside <root>: an absolute `image_path` / `visual_exp` or one with `..` is
refused (the item skipped, the mask dropped) unless `allow_external_paths=True`, so a dataset from elsewhere
cannot read arbitrary local files into training or the report. Symlinks inside <root> (convert --link) are
followed: they were placed by whoever built the dataset here.

Everything is validated here, at load time; problems become counted skips (or dropped masks) summarised in a
`LoadReport` and one DataWarning at the end, or a DataError with `strict=True`. `__getitem__` never meets
unvalidated data.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .dataset import DataError, DataWarning, ExplanationDataset, ImageRecord, read_image_file
from .transforms import normalize_mask_array, resize_mask

ANNOTATION_FILE = "exp_annotation.json"
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
ASPECT_TOLERANCE = 0.02  # a mask of another resolution fits its image when the aspect ratios agree this closely


@dataclass
class LoadReport:
    """What `load_splits` kept, skipped (whole items) and dropped (masks only), with reasons."""

    root: str
    total: int = 0
    loaded: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)        # (item id, reason, detail)
    masks_dropped: list[tuple[str, str, str]] = field(default_factory=list)  # item kept without its mask
    notes: list[str] = field(default_factory=list)

    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(r for _, r, _ in self.skipped))

    def mask_drop_counts(self) -> dict[str, int]:
        return dict(Counter(r for _, r, _ in self.masks_dropped))

    @property
    def clean(self) -> bool:
        return not (self.skipped or self.masks_dropped or self.notes)

    def brief(self) -> str:
        """One line: how many items were loaded and skipped, by reason (for an error message)."""
        skips = ", ".join(f"{r}: {n}" for r, n in sorted(self.skip_counts().items(), key=lambda kv: -kv[1]))
        return f"loaded {self.loaded} of {self.total} items" + (f"; skipped {skips}" if skips else "")

    def summary(self, examples: int = 3) -> str:
        lines = [f"{self.root}: loaded {self.loaded} of {self.total} items"]
        for title, entries in (("skipped items", self.skipped), ("dropped masks (item kept)", self.masks_dropped)):
            if not entries:
                continue
            lines.append(f"  {title}: {len(entries)}")
            by = defaultdict(list)
            for ident, reason, detail in entries:
                by[reason].append((ident, detail))
            for reason, items in sorted(by.items(), key=lambda kv: -len(kv[1])):
                lines.append(f"    {reason}: {len(items)}")
                for ident, detail in items[:examples]:
                    lines.append(f"      {ident}: {detail}")
                if len(items) > examples:
                    lines.append(f"      ... and {len(items) - examples} more")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


class _Problems:
    """Collects skips/drops; raises at once in strict mode."""

    def __init__(self, report: LoadReport, strict: bool):
        self.report, self.strict = report, strict

    def skip(self, ident: str, reason: str, detail: str) -> None:
        if self.strict:
            raise DataError(f"item {ident!r}: {reason}: {detail}")
        self.report.skipped.append((ident, reason, detail))

    def drop_mask(self, ident: str, reason: str, detail: str) -> None:
        if self.strict:
            raise DataError(f"item {ident!r}: {reason}: {detail}")
        self.report.masks_dropped.append((ident, reason, detail))


def read_mask(path: str | Path, image_hw: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Read a `.npy` visual explanation -> (H, W) float32 in [0, 1] (annotators averaged, min-max normalised).

    Raises DataError naming the problem: missing file, not a numeric (H,W)/(k,H,W) array, non-finite values,
    a constant map, or a shape whose aspect ratio does not match `image_hw` (masks at another resolution with
    the same aspect ratio are accepted and resized with the image).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"mask file {path} does not exist: fix visual_exp or set it to \"\" (no mask)")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # ValueError, OSError, pickle refusal, truncated file...
        raise DataError(f"mask file {path} is not a readable .npy array ({type(e).__name__}: {e}): re-save it with "
                        "numpy.save of an (H,W) or (k,H,W) float/uint8 array") from e
    if not isinstance(arr, np.ndarray) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DataError(f"mask file {path} holds dtype {getattr(arr, 'dtype', type(arr))}, not numbers: "
                        "save a float in [0,1] or uint8 array")
    if arr.ndim not in (2, 3) or 0 in arr.shape:
        raise DataError(f"mask file {path} has shape {arr.shape}: expected (H,W) or (k,H,W) with k annotators")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise DataError(f"mask file {path} contains NaN or inf values: replace them (e.g. numpy.nan_to_num)")
    h, w = arr.shape[-2:]
    if image_hw is not None:
        ih, iw = image_hw
        if (h, w) != (ih, iw) and abs((h / w) / (ih / iw) - 1.0) > ASPECT_TOLERANCE:
            raise DataError(f"mask file {path} is {h}x{w} but its image is {ih}x{iw} (different aspect ratio): "
                            "the mask must be drawn on this image")
    norm = normalize_mask_array(arr)
    if norm is None:
        raise DataError(f"mask file {path} is constant (min == max = {float(arr.min())}): it marks nothing; "
                        "set visual_exp to \"\" for items without a visual explanation")
    return norm


OUTSIDE = "path outside the dataset"
OUTSIDE_FIX = "pass allow_external_paths=True (--set allow_external_paths=true) if you trust this dataset"


def _leaves_root(rel: str) -> bool:
    """Absolute, or climbing out with '..': decided on the text, so symlinks placed inside the root still work."""
    p = PurePath(rel)
    return p.is_absolute() or ".." in p.parts


def _resolve_image(root: Path, image_path: str, allow_external: bool) -> Optional[Path]:
    p = Path(image_path)
    inside = allow_external or not _leaves_root(image_path)
    for cand in (root / "images" / p.name, root / p if inside else None, p if p.is_absolute() and inside else None):
        if cand is not None and cand.is_file():
            return cand
    return None


def _norm(s: str) -> str:
    return " ".join(str(s).strip().lower().split())


class _Pairs(dict):
    """A JSON object that also keeps its key/value pairs in order, duplicates included."""

    def __init__(self, pairs):
        super().__init__(pairs)
        self.pairs = pairs


def _read_annotations(root: Path, annotation: str) -> list[tuple[str, Any]]:
    path = root / annotation
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a directory")
    if not path.is_file():
        raise DataError(f"{path} not found: a dataset root holds {annotation} (+ images/); convert raw data with "
                        "`python -m megl.data.convert vqax|actx ...` or write synthetic data with "
                        "`python -m megl.data.synthetic --out DIR`")
    try:  # keep every (id, item) pair: a dict would silently keep the last of two items with one id
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_Pairs)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    if isinstance(data, dict):
        items = [(str(k), v) for k, v in data.pairs]
    elif isinstance(data, list):
        items = [(str(i), v) for i, v in enumerate(data)]
    else:
        raise DataError(f"{path} must hold an object {{id: item}} (or a list of items), got {type(data).__name__}")
    if not items:
        raise DataError(f"{path} holds no items: the dataset is empty")
    return items


def _read_class_file(root: Path) -> Optional[list[str]]:
    path = root / "classes.json"
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); fix or delete it") from e
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path} must be a non-empty JSON list of class names; fix or delete it")
    if len({_norm(n) for n in names}) != len(names):
        raise DataError(f"{path} lists a class name twice; class names must be unique")
    return names


def _parse_class_id(v: Any) -> Optional[int]:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v)
    return None


def _assign_classes(items, class_names, probs: _Problems, report: LoadReport):
    """-> (class_names, {id: label}). Items whose class is missing, out of range or inconsistent are skipped."""
    labels = {}
    if class_names is not None:
        C = len(class_names)
        by_name = {_norm(n): k for k, n in enumerate(class_names)}
        for ident, it in items:
            cid, ans = it.get("class_id"), it.get("ans")
            if cid is not None:
                k = _parse_class_id(cid)
                if k is None:
                    probs.skip(ident, "bad class_id", f"class_id {cid!r} is not an integer")
                elif not 0 <= k < C:
                    probs.skip(ident, "class_id out of range", f"class_id {k} not in [0, {C}) of the class list")
                elif ans is not None and _norm(ans) != _norm(class_names[k]):
                    probs.skip(ident, "class_id inconsistent with ans",
                               f"class_id {k} is {class_names[k]!r} but ans is {ans!r}")
                else:
                    labels[ident] = k
            elif isinstance(ans, str) and _norm(ans) in by_name:
                labels[ident] = by_name[_norm(ans)]
            else:
                probs.skip(ident, "no class", f"no class_id and ans {ans!r} is not in the class list")
        return list(class_names), labels

    with_id = [(ident, it) for ident, it in items if it.get("class_id") is not None]
    if not with_id:  # vocabulary from the answers alone
        answers = sorted({_norm(it["ans"]) for _, it in items if isinstance(it.get("ans"), str) and it["ans"].strip()})
        by_name = {a: k for k, a in enumerate(answers)}
        for ident, it in items:
            ans = it.get("ans")
            if isinstance(ans, str) and _norm(ans) in by_name:
                labels[ident] = by_name[_norm(ans)]
            else:
                probs.skip(ident, "no class", "neither class_id nor a non-empty ans")
        if answers:
            report.notes.append(f"no class_id in the file: {len(answers)} classes numbered by sorted ans")
        return answers, labels

    parsed = {}
    for ident, it in items:
        if it.get("class_id") is None:
            continue
        k = _parse_class_id(it["class_id"])
        if k is None:
            probs.skip(ident, "bad class_id", f"class_id {it['class_id']!r} is not an integer")
        elif k < 0:
            probs.skip(ident, "class_id out of range", f"class_id {k} is negative")
        else:
            parsed[ident] = k
    votes = defaultdict(Counter)     # id -> answers
    id_votes = defaultdict(Counter)  # answer -> ids
    for ident, it in items:
        if ident in parsed and isinstance(it.get("ans"), str) and it["ans"].strip():
            votes[parsed[ident]][_norm(it["ans"])] += 1
            id_votes[_norm(it["ans"])][parsed[ident]] += 1
    C = max(parsed.values()) + 1 if parsed else 0
    names = []
    for k in range(C):
        if votes[k]:
            names.append(sorted(votes[k].items(), key=lambda kv: (-kv[1], kv[0]))[0][0])
        else:
            names.append(f"class_{k}")
    used = set(parsed.values())
    unused = [k for k in range(C) if k not in used]
    if unused:
        report.notes.append(f"class ids {unused[:10]}{'...' if len(unused) > 10 else ''} have no item, yet the "
                            f"largest class_id {C - 1} makes {C} classes: a stray class_id? fix it, or add "
                            "classes.json with the class list")
    gaps = [k for k in range(C) if not votes[k] and k in used]
    if gaps:
        report.notes.append(f"class ids {gaps[:10]}{'...' if len(gaps) > 10 else ''} have no ans in the file; named "
                            "class_<id> (add classes.json with the class list to name them)")
    owner = {a: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for a, c in id_votes.items()}
    for ident, it in items:
        ans = it.get("ans")
        if ident in parsed:
            k = parsed[ident]
            if isinstance(ans, str) and ans.strip():
                a = _norm(ans)
                if a != names[k]:
                    probs.skip(ident, "class_id inconsistent with ans",
                               f"class_id {k} is {names[k]!r} in most items but this one says ans={ans!r}")
                    continue
                if owner[a] != k:
                    probs.skip(ident, "class_id inconsistent with ans",
                               f"ans {ans!r} has class_id {owner[a]} in most items but {k} here")
                    continue
            labels[ident] = k
        elif it.get("class_id") is None:
            a = _norm(ans) if isinstance(ans, str) else None
            if a is not None and a in names:
                labels[ident] = names.index(a)
            else:
                probs.skip(ident, "no class", f"no class_id and ans {ans!r} is not a known class")
    return names, labels


def _seeded_split(idents: Sequence[str], labels: dict, seed: int, val_fraction: float, test_fraction: float,
                  parts=("train", "val", "test")) -> dict[str, str]:
    """Stratified (per class) seeded assignment of `idents` to train / val / test."""
    rng = np.random.default_rng(seed)
    by_class = defaultdict(list)
    for ident in idents:
        by_class[labels[ident]].append(ident)
    out = {}
    for k in sorted(by_class):
        group = by_class[k]
        order = rng.permutation(len(group))
        n_test = int(round(test_fraction * len(group))) if "test" in parts else 0
        n_val = int(round(val_fraction * len(group))) if "val" in parts else 0
        excess = n_test + n_val - (len(group) - 1)  # keep at least one training image per class
        if excess > 0:
            cut = min(n_val, excess)
            n_val, n_test = n_val - cut, max(n_test - (excess - cut), 0)
        for rank, j in enumerate(order):
            out[group[j]] = "test" if rank < n_test else ("val" if rank < n_test + n_val else "train")
    return out


def load_splits(
    root: str | Path,
    image_size: int = 224,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    *,
    expand_train_rationales: bool = True,
    class_names: Optional[Sequence[str]] = None,
    strict: bool = False,
    cache_images: Optional[bool] = None,
    max_cache_bytes: int = 1 << 30,
    annotation: str = ANNOTATION_FILE,
    allow_external_paths: bool = False,
) -> dict[str, ExplanationDataset]:
    """Read an Object-ME / Action-ME style dataset -> {"train", "val", "test"} ExplanationDatasets.

    - Images: RGB, resized to image_size × image_size; masks: averaged over annotators, min-max normalised,
      resized with the same bilinear resize (a mask of another resolution is fine if its aspect ratio matches).
    - Classes: `class_names` if given, else <root>/classes.json, else from class_id / ans (majority name per id).
    - Splits: the per-item "split" key is honoured; items without one (all of them, if no item has one) get a
      seeded split stratified by class (val_fraction / test_fraction); when the file names no val item, val is
      carved from train with the same seed.
    - Training items are (image, rationale) pairs unless `expand_train_rationales=False`; val/test have one item
      per image with all rationales as references.
    - Bad data (missing/unreadable images, missing/malformed/mis-shaped masks, bad class ids, no rationale, bad
      split names) is skipped and counted in the `LoadReport` at `ds.report` (one DataWarning summarises it);
      `strict=True` raises DataError at the first problem instead. An empty result raises DataError.
    - `cache_images`: keep decoded images in memory (default: when they fit in `max_cache_bytes`); otherwise
      they are decoded again per item (they were all decoded once here, so a bad file fails now, not mid-epoch).
    - `allow_external_paths`: read image_path / visual_exp that are absolute or contain '..' (default: refused).
    """
    root = Path(root)
    if image_size < 8:
        raise ValueError(f"load_splits: image_size must be >= 8, got {image_size}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"load_splits: need 0 <= val_fraction, test_fraction and val+test < 1 "
                         f"(got {val_fraction}, {test_fraction})")
    raw = _read_annotations(root, annotation)
    report = LoadReport(root=str(root), total=len(raw))
    probs = _Problems(report, strict)
    if class_names is None:
        class_names = _read_class_file(root)

    # structure, text and split key
    items, seen = [], set()
    for ident, it in raw:
        if ident in seen:
            probs.skip(ident, "duplicate id", "the id appears twice; ids must be unique")
            continue
        seen.add(ident)
        if not isinstance(it, dict):
            probs.skip(ident, "not an object", f"item is a {type(it).__name__}, expected an object with class_id, "
                                               "ans, image_path, visual_exp, exp")
            continue
        exp = it.get("exp")
        exp = [exp] if isinstance(exp, str) else exp
        texts = [" ".join(t.split()) for t in exp if isinstance(t, str) and t.strip()] if isinstance(exp, list) else []
        if not texts:
            probs.skip(ident, "no rationale", f"exp must be a non-empty list of strings, got {it.get('exp')!r}")
            continue
        if not isinstance(it.get("image_path"), str) or not it["image_path"].strip():
            probs.skip(ident, "no image_path", f"image_path must be a non-empty string, got {it.get('image_path')!r}")
            continue
        split = it.get("split")
        if split is not None:
            if not isinstance(split, str) or split.strip().lower() not in SPLIT_ALIASES:
                probs.skip(ident, "bad split", f"split {split!r} is not one of train / val / test")
                continue
            split = SPLIT_ALIASES[split.strip().lower()]
        items.append((ident, {**it, "exp": texts, "split": split}))

    names, labels = _assign_classes(items, class_names, probs, report)
    items = [(ident, it) for ident, it in items if ident in labels]

    # images and masks (decoded once here)
    n_cache = len(items) * 3 * image_size * image_size
    cache = cache_images if cache_images is not None else n_cache <= max_cache_bytes
    if cache_images is None and not cache:
        report.notes.append(f"images not cached ({n_cache / 2**30:.1f} GiB > max_cache_bytes): decoded per item")
    kept = []
    for ident, it in items:
        path = _resolve_image(root, it["image_path"], allow_external_paths)
        if path is None and _leaves_root(it["image_path"]) and not allow_external_paths:
            probs.skip(ident, OUTSIDE, f"image_path {it['image_path']!r} is not inside {root}: {OUTSIDE_FIX}")
            continue
        if path is None:
            probs.skip(ident, "missing image", f"{it['image_path']} not found under {root / 'images'} or {root}")
            continue
        try:
            from PIL import Image

            with Image.open(path) as im:
                hw = (im.height, im.width)
            pixels = read_image_file(path, image_size)
        except Exception as e:  # PIL raises several types for bad files
            probs.skip(ident, "unreadable image", f"{path}: {type(e).__name__}: {e}")
            continue
        mask = None
        vis = it.get("visual_exp")
        if vis not in (None, ""):
            if not isinstance(vis, str):
                probs.drop_mask(ident, "malformed mask", f"visual_exp must be a path string or \"\", got {vis!r}")
            elif _leaves_root(vis) and not allow_external_paths:
                probs.drop_mask(ident, OUTSIDE, f"visual_exp {vis!r} is not inside {root}: {OUTSIDE_FIX}")
            else:
                try:
                    m = read_mask(root / vis, hw)
                    mask = resize_mask(torch.from_numpy(m), image_size)
                except DataError as e:
                    msg = str(e)
                    reason = ("missing mask" if "does not exist" in msg else "mask shape mismatch" if "aspect" in msg
                              else "constant mask" if "constant" in msg else "malformed mask")
                    probs.drop_mask(ident, reason, msg)
        kept.append((ident, it, path, pixels if cache else None, mask))

    # splits
    has_split = [ident for ident, it, *_ in kept if it["split"] is not None]
    assign = {ident: it["split"] for ident, it, *_ in kept if it["split"] is not None}
    unassigned = [ident for ident, it, *_ in kept if it["split"] is None]
    if unassigned:
        assign.update(_seeded_split(unassigned, labels, seed, val_fraction, test_fraction))
        if has_split:
            report.notes.append(f"{len(unassigned)} items without a split key were split with seed {seed} "
                                f"(val {val_fraction}, test {test_fraction})")
    if has_split and val_fraction > 0 and not any(s == "val" for s in assign.values()):
        train_ids = [i for i, s in assign.items() if s == "train"]
        carved = _seeded_split(train_ids, labels, seed, val_fraction / (1 - test_fraction), 0.0, ("train", "val"))
        assign.update(carved)
        report.notes.append(f"no item has split 'val': carved {sum(s == 'val' for s in carved.values())} "
                            f"validation images from train with seed {seed}")

    report.loaded = len(kept)
    if not kept:
        raise DataError(f"no usable item in {root / annotation}: {report.brief()}; see "
                        "megl.data.load_splits(root).report or strict=True for the items")
    out = {}
    for split in SPLITS:
        rows = [k for k in kept if assign[k[0]] == split]
        records = [ImageRecord(id=ident, label=labels[ident], references=it["exp"], has_mask=m is not None,
                               meta={"source": str(p)}) for ident, it, p, _, m in rows]
        masks = {i: m for i, (_, _, _, _, m) in enumerate(rows) if m is not None}
        if cache:
            images = (torch.stack([px for *_, px, _ in rows]) if rows
                      else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8))
            kw = {"images": images}
        else:
            kw = {"image_paths": [str(p) for _, _, p, _, _ in rows]}
        out[split] = ExplanationDataset(records, names, image_size, masks=masks, split=split, report=report,
                                        expand_rationales=(split == "train" and expand_train_rationales), **kw)
    untrained = sorted(set(range(len(names))) - {r.label for r in out["train"].records})
    if untrained:
        shown = ", ".join(names[k] for k in untrained[:10]) + (", ..." if len(untrained) > 10 else "")
        report.notes.append(f"{len(untrained)} of {len(names)} classes have no training image: {shown} (the model "
                            "cannot learn them; add training items, or drop them from the class list)")
    if out["train"].num_images == 0:
        raise DataError(f"the training split of {root} is empty ({report.loaded} usable items, none in train): "
                        "check the items' split keys or lower val_fraction / test_fraction")
    if not report.clean:
        warnings.warn(report.summary(), DataWarning, stacklevel=2)
    return out
