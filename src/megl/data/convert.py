"""Convert the raw VQA-X / ACT-X releases (and MNIST, as DecoyMNIST) to the Object-ME / Action-ME on-disk format.

    python -m megl.data.convert vqax --exp train=textual/train_exp_anno.json --exp test=textual/test_exp_anno.json \\
        --questions v2_OpenEnded_mscoco_train2014_questions.json --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json --annotations v2_mscoco_val2014_annotations.json \\
        --images coco/train2014 --images coco/val2014 --visual visual/test --out data/object-me
    python -m megl.data.convert actx --exp train=textual/exp_train_split.json --exp test=textual/exp_test_split.json \\
        --images mpii/images --visual visual/test --out data/action-me
    python -m megl.data.convert decoy-mnist --mnist data/MNIST/raw --out data/decoy-mnist --mask corners

Every filter that decides which samples and classes survive is an option with its default shown in --help; the
converter prints how many entries each filter removed and Table-1-style statistics of the result.
Masks: files in --visual folders named <sample id>.npy|png|jpg (one annotator) or <sample id>_<k>.<ext> (annotator k);
they are written as masks/<id>.npy (the id made file-safe and unique), (H,W) or (k,H,W) float32 in [0,1].
The dataset is built in a staging folder beside --out and swapped in when complete: a failure leaves --out as it
was, and an input inside --out (re-converting from a dataset's own images) is never deleted or overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from megl.errors import UserError, cli
from megl.files import build_then_swap, safe_stem

from .stats import format_statistics

MASK_EXTS = (".npy", ".png", ".jpg", ".jpeg", ".bmp")


class ConvertError(UserError):
    """A fatal input problem: printed as one clear line by `main` (exit status 1)."""


# ----------------------------------------------------------------------------- input helpers
def _named(specs: Iterable[str]) -> list[tuple[Optional[str], Path]]:
    """["train=path", "path"] -> [("train", Path), (None, Path)]."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if sep and name in ("train", "val", "test"):
            out.append((name, Path(path)))
        elif sep and not Path(spec).exists():
            raise ConvertError(f"--exp {spec!r}: the split name before '=' must be train, val or test")
        else:
            out.append((None, Path(spec)))
    return out


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConvertError(f"{what} file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{what} file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})")


def _texts(v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        return []
    return [" ".join(t.split()) for t in v if isinstance(t, str) and t.strip()]


def _answer_text(v: Any) -> Optional[str]:
    """A label from a str, a list of str, or a VQA-style list of {"answer": ...} (most common wins)."""
    if isinstance(v, str):
        return " ".join(v.strip().lower().split()) or None
    if isinstance(v, list):
        vals = [a.get("answer") if isinstance(a, dict) else a for a in v]
        vals = [" ".join(a.strip().lower().split()) for a in vals if isinstance(a, str) and a.strip()]
        if vals:
            return sorted(Counter(vals).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
    return None


def _parse_int(v: Any) -> Optional[int]:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _answer_type(answer: str) -> str:
    """VQA v2's answer_type, derived from the answer when the annotation file does not give it."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "number" if re.fullmatch(r"\d+(\.\d+)?", answer) else "other"


def _class_list(spec: Optional[str]) -> Optional[list[str]]:
    if not spec:
        return None
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise ConvertError(f"--classes file {path} not found")
        text = path.read_text(encoding="utf-8")
        try:
            names = json.loads(text)
        except json.JSONDecodeError:
            names = text.splitlines()
    else:
        names = spec.split(",")
    names = [" ".join(str(n).strip().lower().split()) for n in names if str(n).strip()]
    if not names:
        raise ConvertError(f"--classes {spec!r} lists no class")
    return names


class _ImageFinder:
    def __init__(self, dirs: list[Path]):
        for d in dirs:
            if not d.is_dir():
                raise ConvertError(f"--images {d} is not a directory")
        self.dirs = dirs

    def find(self, names: Iterable[str]) -> Optional[Path]:
        for name in names:
            for d in self.dirs:
                p = d / name
                if p.is_file():
                    return p
        return None


class _MaskFinder:
    """Masks named <id>.<ext> or <id>_<k>.<ext> in the --visual folders."""

    def __init__(self, dirs: list[Path]):
        self.exact: dict[str, Path] = {}
        self.parts: dict[str, list[tuple[int, Path]]] = defaultdict(list)
        for d in dirs:
            if not d.is_dir():
                raise ConvertError(f"--visual {d} is not a directory")
            for entry in os.scandir(d):
                p = Path(entry.path)
                if not entry.is_file() or p.suffix.lower() not in MASK_EXTS:
                    continue
                self.exact.setdefault(p.stem, p)
                m = re.fullmatch(r"(.+)_(\d+)", p.stem)
                if m:
                    self.parts[m.group(1)].append((int(m.group(2)), p))

    def find(self, keys: Iterable[str]) -> list[Path]:
        for k in keys:
            if k in self.exact:
                return [self.exact[k]]
            if k in self.parts:
                return [p for _, p in sorted(self.parts[k])]
        return []


def _read_mask_file(p: Path) -> np.ndarray:
    if p.suffix.lower() == ".npy":
        a = np.load(p, allow_pickle=False).astype(np.float32)
        if a.ndim == 3 and a.shape[-1] in (1, 3) and a.shape[0] > 4:  # (H,W,C) map saved as an image array
            a = a.mean(axis=-1)
    else:
        from PIL import Image

        with Image.open(p) as im:
            a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if a.max() > 1.0:
        a = a / 255.0
    return a


# ----------------------------------------------------------------------------- the shared back half
def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


class _Writer:
    """Writes images/ and masks/ into the staging folder `stage` of the dataset `out`."""

    def __init__(self, stage: Path, out: Path, link: bool, masks: _MaskFinder):
        self.stage, self.out, self.link, self.masks = stage, out, link, masks
        (stage / "images").mkdir()
        (stage / "masks").mkdir()
        self.placed: dict[str, Path] = {}
        self.mask_names: set[str] = set()
        self.mask_problems: Counter = Counter()

    def image(self, src: Path) -> Optional[str]:
        name, real = src.name, src.resolve()
        if name in self.placed:
            return f"images/{name}" if self.placed[name] == real else None
        dst = self.stage / "images" / name
        if self.link and not _inside(real, self.out):
            os.symlink(real, dst)
        elif _inside(real, self.out):  # the source is replaced by the swap: a hard link keeps its data for free
            try:
                os.link(real, dst)
            except OSError:
                shutil.copy2(real, dst)
        else:
            shutil.copy2(real, dst)
        self.placed[name] = real
        return f"images/{name}"

    def mask(self, ident: str, keys: list[str], image: Path) -> str:
        files = self.masks.find(keys)
        if not files:
            return ""
        try:
            maps = [_read_mask_file(p) for p in files]
        except Exception as e:  # unreadable file: counted, the sample keeps its text and label
            self.mask_problems[f"unreadable ({type(e).__name__})"] += 1
            return ""
        if any(m.ndim not in (2, 3) for m in maps) or len({m.shape[-2:] for m in maps}) != 1:
            self.mask_problems["annotator maps of different shapes or not (H,W) / (k,H,W)"] += 1
            return ""
        from PIL import Image

        try:
            with Image.open(image) as im:
                ih, iw = im.height, im.width
        except Exception as e:  # PIL raises several types; the loader reports the image itself
            self.mask_problems[f"image unreadable ({type(e).__name__})"] += 1
            return ""
        h, w = maps[0].shape[-2:]
        if abs((h / w) / (ih / iw) - 1) > 0.02:
            self.mask_problems["aspect ratio differs from the image"] += 1
            return ""
        arr = np.concatenate([m.reshape(-1, h, w) for m in maps])  # (k, H, W): k annotators
        arr = arr[0] if arr.shape[0] == 1 else arr
        if not arr.max() > arr.min():
            self.mask_problems["constant map"] += 1
            return ""
        rel = f"masks/{safe_stem(ident, self.mask_names)}.npy"
        np.save(self.stage / rel, arr.astype(np.float32))
        return rel


def _select_classes(samples: list[dict], args, dropped: Counter) -> tuple[list[str], list[dict]]:
    counts = Counter(s["ans"] for s in samples)
    explicit = _class_list(args.classes)
    if explicit is not None:
        unknown = [c for c in explicit if c not in counts]
        if unknown:
            print(f"note: --classes {unknown[:10]} have no sample after the other filters", file=sys.stderr)
        keep = set(explicit)
    else:
        ranked = sorted((a for a, c in counts.items() if c >= args.min_count), key=lambda a: (-counts[a], a))
        keep = set(ranked[: args.max_classes] if args.max_classes > 0 else ranked)
    names = sorted(keep) if explicit is None else [c for c in explicit]
    kept = [s for s in samples if s["ans"] in keep]
    dropped["class filter (--classes / --min-count / --max-classes)"] += len(samples) - len(kept)
    return names, kept


def _finish(samples: list[dict], args, dropped: Counter, read: int, title: str, masks: _MaskFinder) -> dict:
    """Class selection, images, masks, json + statistics (shared by both converters)."""
    names, samples = _select_classes(samples, args, dropped)
    if not samples:
        raise ConvertError(f"no sample survived the filters ({dict(dropped)}): loosen them (see --help)")
    out = Path(args.out)
    inputs = [Path(p) for p in [*args.images, *(args.visual or [])]]
    with build_then_swap(out, keep_previous=any(_inside(p, out) for p in inputs)) as stage:
        writer = _Writer(stage.path, out, args.link, masks)
        cid = {n: k for k, n in enumerate(names)}
        ann = {}
        for s in samples:
            rel = writer.image(s["image"])
            if rel is None:
                dropped["image basename clash (two source images with one name)"] += 1
                continue
            item = {"class_id": cid[s["ans"]], "ans": s["ans"], "image_path": rel,
                    "visual_exp": writer.mask(s["id"], s["mask_keys"], s["image"]), "exp": s["exp"]}
            if s.get("split"):
                item["split"] = s["split"]
            item.update(s.get("extra", {}))
            ann[s["id"]] = item
        if not ann:
            raise ConvertError(f"no sample survived the filters ({dict(dropped)}): loosen them (see --help)")
        (stage.path / "classes.json").write_text(json.dumps(names, indent=1))
        (stage.path / "exp_annotation.json").write_text(json.dumps(ann, indent=1))

    stats = _stats(ann, len(names))
    print(f"read {read} entries; wrote {len(ann)} samples to {out}")
    for reason, n in dropped.most_common():
        if n:
            print(f"  dropped {n:>7}  {reason}")
    for reason, n in writer.mask_problems.most_common():
        print(f"  mask ignored {n:>3}  {reason}")
    print(format_statistics(stats, name=title))
    if stage.previous is not None:
        print(f"note: the replaced images/, masks/ and annotation files were inputs of this conversion; they are kept "
              f"in {stage.previous} (delete it when done)")
    return stats


def _stats(ann: dict, n_classes: int) -> dict:
    def row(items):
        return {"samples": len(items), "textual": sum(1 for it in items if it["exp"]),
                "visual": sum(1 for it in items if it["visual_exp"]), "rationales": sum(len(it["exp"]) for it in items),
                "classes": len({it["class_id"] for it in items})}

    items = list(ann.values())
    out = row(items)
    out["class_vocabulary"] = n_classes
    splits = sorted({it.get("split") for it in items if it.get("split")}, key=["train", "val", "test"].index)
    out["per_split"] = {s: row([it for it in items if it.get("split") == s]) for s in splits}
    return out


# ----------------------------------------------------------------------------- VQA-X
def _by_question_id(paths: Optional[list[str]], key: str) -> dict:
    """The records of VQA v2 files ({"questions": [...]} or {"annotations": [...]}) by question id."""
    out = {}
    for path in paths or []:
        data = _load_json(Path(path), f"--{key}")
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ConvertError(f"--{key} {path} must be a VQA v2 {key[:-1]} file {{\"{key}\": [...]}}")
        for r in data[key]:
            out[str(r["question_id"])] = r
    return out


def convert_vqax(args) -> dict:
    exps = _named(args.exp)
    questions, answers = _by_question_id(args.questions, "questions"), _by_question_id(args.annotations, "annotations")
    images = _ImageFinder([Path(d) for d in args.images])
    masks = _MaskFinder([Path(d) for d in args.visual or []])
    types = {t.strip() for t in args.answer_types.split(",") if t.strip()}
    qre = re.compile(args.question_regex, re.IGNORECASE) if args.question_regex else None
    dropped, samples, read, seen_images = Counter(), [], 0, set()
    for split, path in exps:
        data = _load_json(path, "--exp")
        if not isinstance(data, dict):
            raise ConvertError(f"--exp {path} must map question_id -> explanations (or -> an NLE record)")
        if not (questions or answers) and any(isinstance(v, list) for v in data.values()):
            raise ConvertError(f"--exp {path} is the original release ({{question_id: [explanation, ...]}}): give the "
                               "VQA v2 --questions and --annotations files that hold its questions and answers")
        for qid in sorted(data, key=lambda k: (len(str(k)), str(k))):
            read += 1
            entry, qid = data[qid], str(qid)
            if isinstance(entry, dict):  # NLE style: {question, answers, image_id, image_name, explanation}
                exp = _texts(entry.get(args.exp_field_nle))
                q = entry.get("question", "")
                ans = _answer_text(entry.get("answers"))
                atype = _answer_type(ans) if ans else None
                image_id = entry.get("image_id")
                names = [entry["image_name"]] if isinstance(entry.get("image_name"), str) else []
            else:  # original release: {question_id: [explanation, ...]} + VQA v2 questions / annotations
                exp = _texts(entry)
                qrec, arec = questions.get(qid), answers.get(qid)
                if qrec is None and arec is None:
                    dropped["question_id not in --questions / --annotations"] += 1
                    continue
                q = (qrec or {}).get("question", "")
                ans = _answer_text((arec or {}).get("multiple_choice_answer") or (arec or {}).get("answers"))
                atype = (arec or {}).get("answer_type") or (_answer_type(ans) if ans else None)
                image_id = (arec or qrec).get("image_id")
                names = []
            if not exp:
                dropped["no explanation"] += 1
                continue
            if not ans:
                dropped["no answer"] += 1
                continue
            if types and atype not in types:
                dropped[f"answer type not in --answer-types ({atype})"] += 1
                continue
            if qre is not None and not qre.search(q or ""):
                dropped["question does not match --question-regex"] += 1
                continue
            iid = _parse_int(image_id)
            if iid is not None:
                names += [f"COCO_train2014_{iid:012d}.jpg", f"COCO_val2014_{iid:012d}.jpg", f"{iid:012d}.jpg"]
            src = images.find(names)
            if src is None:
                dropped["image not found in --images"] += 1
                continue
            if not args.keep_duplicate_images:
                if src.name in seen_images:
                    dropped["another question on the same image (use --keep-duplicate-images)"] += 1
                    continue
                seen_images.add(src.name)
            samples.append({"id": qid, "ans": ans, "exp": exp, "image": src, "split": split,
                            "mask_keys": [qid], "extra": {"question": q, "source": "vqa-x"}})
    return _finish(samples, args, dropped, read, "Object-ME (converted)", masks)


# ----------------------------------------------------------------------------- ACT-X
def _first(entry: dict, fields: list[str]) -> Any:
    for f in fields:
        if entry.get(f) not in (None, "", []):
            return entry[f]
    return None


def convert_actx(args) -> dict:
    images = _ImageFinder([Path(d) for d in args.images])
    masks = _MaskFinder([Path(d) for d in args.visual or []])
    img_fields = [f.strip() for f in args.image_field.split(",") if f.strip()]
    ans_fields = [f.strip() for f in args.answer_field.split(",") if f.strip()]
    exp_fields = [f.strip() for f in args.exp_field.split(",") if f.strip()]
    dropped, samples, read = Counter(), [], 0
    for split, path in _named(args.exp):
        data = _load_json(path, "--exp")
        entries = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
        if entries is None:
            raise ConvertError(f"--exp {path} must map key -> {{{img_fields[0]}, {ans_fields[0]}, {exp_fields[0]}}}")
        for key, entry in entries:
            read += 1
            key = str(key)
            if not isinstance(entry, dict):
                dropped["entry is not an object"] += 1
                continue
            exp = _texts(_first(entry, exp_fields))
            ans = _answer_text(_first(entry, ans_fields))
            img = _first(entry, img_fields)
            if not exp:
                dropped[f"no explanation (fields {','.join(exp_fields)})"] += 1
                continue
            if not ans:
                dropped[f"no answer (fields {','.join(ans_fields)})"] += 1
                continue
            if img is None:
                dropped[f"no image name (fields {','.join(img_fields)})"] += 1
                continue
            img = os.path.basename(str(img))
            src = images.find([img] if Path(img).suffix else [img + ".jpg", img + ".png", img])
            if src is None:
                dropped["image not found in --images"] += 1
                continue
            samples.append({"id": key, "ans": ans, "exp": exp, "image": src, "split": split,
                            "mask_keys": [key, Path(img).stem], "extra": {"source": "act-x"}})
    return _finish(samples, args, dropped, read, "Action-ME (converted)", masks)


# ----------------------------------------------------------------------------- DecoyMNIST
def convert_decoy_mnist(args) -> dict:
    """MNIST IDX files -> DecoyMNIST in the Object-ME format (megl.data.mnist holds the construction)."""
    from PIL import Image

    from .mnist import CORNERS, DIGITS, DecoyOptions, MNISTError, corners_mask, decoy_splits, rationale

    if not 0.0 <= args.mask_fraction <= 1.0:
        raise ConvertError(f"--mask-fraction {args.mask_fraction} must be in [0, 1]")
    try:
        opts = DecoyOptions(swatch=args.swatch, digit_contrast=args.digit_contrast, noise=args.noise)
        parts = decoy_splits(args.mnist, args.n_train, args.n_val, args.n_test, args.seed, opts)
    except (MNISTError, ValueError) as e:
        raise ConvertError(str(e))
    out = Path(args.out)
    if args.overwrite:
        for sub in ("images", "masks"):
            shutil.rmtree(out / sub, ignore_errors=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if args.mask == "corners":  # one annotation for every image: the four places a swatch may sit
        np.save(out / "masks" / "corners.npy", corners_mask(args.swatch, parts["train"][1].images.shape[1:]))
    n_train = len(parts["train"][0])
    annotated = set(np.random.default_rng([args.seed, 9]).permutation(n_train)[:round(args.mask_fraction * n_train)])
    ann = {}
    for split, (indices, d) in parts.items():
        for j, src in enumerate(indices):
            ident = f"{split}-{int(src):05d}"
            Image.fromarray(d.images[j], mode="L").save(out / "images" / f"{ident}.png")
            mask = ""
            if split != "train" or j in annotated:  # --mask-fraction thins the training annotations only
                if args.mask == "corners":
                    mask = "masks/corners.npy"
                else:
                    mask = f"masks/{ident}.npy"
                    np.save(out / mask, d.digit_mask[j])
            y = int(d.labels[j])
            ann[ident] = {"class_id": y, "ans": DIGITS[y], "image_path": f"images/{ident}.png", "visual_exp": mask,
                          "exp": [rationale(y, d.digit_mask[j])], "split": split,
                          "decoy": {"corner": CORNERS[int(d.corner[j])], "shade": int(d.shade[j])},
                          "source": "decoy-mnist"}
    (out / "classes.json").write_text(json.dumps(list(DIGITS), indent=1))
    (out / "exp_annotation.json").write_text(json.dumps(ann, indent=1))
    settings = {k: getattr(args, k) for k in ("mask", "mask_fraction", "n_train", "n_val", "n_test", "seed",
                                              "swatch", "digit_contrast", "noise")}
    (out / "decoy.json").write_text(json.dumps(settings, indent=1))
    stats = _stats(ann, len(DIGITS))
    print(f"wrote {len(ann)} samples to {out}")
    print(format_statistics(stats, name="DecoyMNIST"))
    return stats


# ----------------------------------------------------------------------------- CLI
def _common(p: argparse.ArgumentParser, min_count: int, max_classes: int) -> None:
    p.add_argument("--images", action="append", required=True, metavar="DIR", help="image folder (repeatable)")
    p.add_argument("--visual", action="append", metavar="DIR",
                   help="mask folder (repeatable): <id>.npy|png|jpg or <id>_<k>.<ext> for annotator k")
    p.add_argument("--out", required=True, type=Path, help="output dataset root")
    p.add_argument("--min-count", type=int, default=min_count,
                   help=f"keep answers with at least this many samples (default: {min_count})")
    p.add_argument("--max-classes", type=int, default=max_classes,
                   help=f"then keep the most frequent this many answers, 0 = all (default: {max_classes})")
    p.add_argument("--classes", default=None,
                   help="explicit class list 'a,b,c' or @file (json list or one per line); overrides the two above")
    p.add_argument("--link", action="store_true", help="symlink images instead of copying them")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out (its images/, masks/ and json files; inputs inside --out are kept)")


def _subcommand(sub, name: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megl.data.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True)
    v = _subcommand(sub, "vqax", help="VQA-X + VQA v2 + COCO -> Object-ME format",
                       description="Fields read: --exp {question_id: [explanation, ...]} (textual/*_exp_anno.json), "
                       "or the NLE-style {question_id: {question, answers: [{answer}], image_id, image_name, "
                       "explanation: [...]}}; --questions {questions: [{question_id, image_id, question}]}; "
                       "--annotations {annotations: [{question_id, image_id, multiple_choice_answer, answer_type}]}. "
                       "Images: COCO_train2014_<image_id:012d>.jpg / COCO_val2014_... / <image_id:012d>.jpg / "
                       "image_name. Sample id = question_id; class = the answer. The paper's exact class filter "
                       "is unpublished; the defaults keep 'other'-type answers and the 40 most frequent ones "
                       "(its class count).")
    v.add_argument("--exp", action="append", required=True, metavar="[SPLIT=]FILE",
                   help="explanation json, optionally tagged train=/val=/test= (repeatable; the tag becomes 'split')")
    v.add_argument("--questions", action="append", metavar="FILE", help="VQA v2 question json (repeatable)")
    v.add_argument("--annotations", action="append", metavar="FILE", help="VQA v2 annotation json (repeatable)")
    v.add_argument("--answer-types", default="other",
                   help="keep these VQA answer_type values, comma-separated; '' = all (default: other)")
    v.add_argument("--question-regex", default="",
                   help="keep questions matching this regex, e.g. '^what (kind|type) of' (default: all)")
    v.add_argument("--keep-duplicate-images", action="store_true",
                   help="keep every question of an image (default: the first question_id per image)")
    v.add_argument("--exp-field-nle", default="explanation", help="explanation field of NLE-style records")
    _common(v, min_count=10, max_classes=40)
    a = _subcommand(sub, "actx", help="ACT-X + MPII -> Action-ME format",
                       description="Fields read: --exp {key: {<image field>, <answer field>, <explanation field>}} "
                       "(textual/exp_*_split.json, or NLE actX_*.json); the first present field of each list "
                       "below is used. Images: <image name> (+ .jpg when it has no extension) in --images. "
                       "Sample id = key; masks are looked up by key, then by image stem.")
    a.add_argument("--exp", action="append", required=True, metavar="[SPLIT=]FILE",
                   help="ACT-X json, optionally tagged train=/val=/test= (repeatable)")
    for flag, fields, what in (("--image-field", "img_id,iid,image_name,image,img_name", "image name fields"),
                               ("--answer-field", "ans,answers,answer,label", "activity label fields"),
                               ("--exp-field", "exp,explanation,explanations", "explanation fields")):
        a.add_argument(flag, default=fields, help=f"{what}, first present wins (default: %(default)s)")
    _common(a, min_count=1, max_classes=0)
    d = _subcommand(sub, "decoy-mnist", help="MNIST IDX files -> DecoyMNIST (Ross et al. 2017) in the Object-ME format",
                       description="A 4x4 swatch in a random corner of every digit, grey shade 255 - 25*label in "
                       "train and val (taken from MNIST's training part) and the shade of a random digit in test "
                       "(MNIST's test part). Masks: corners = 1 except the four corner squares (what RRR / CDEP "
                       "penalise), digit = the dilated strokes (what GRADIA / HAICS / RES / MEGL reward). "
                       "--digit-contrast and --noise make the digit the harder cue (docs/decoy_mnist.md).")
    d.add_argument("--mnist", required=True, type=Path, metavar="DIR",
                   help="folder with MNIST's four IDX files (.gz or raw; DIR, DIR/raw or DIR/MNIST/raw)")
    d.add_argument("--out", required=True, type=Path, help="output dataset root")
    d.add_argument("--mask", choices=("corners", "digit"), default="corners", help="annotation (default: corners)")
    d.add_argument("--mask-fraction", type=float, default=1.0,
                   help="share of training images with a mask; val and test always have one (default: 1.0)")
    d.add_argument("--n-train", type=int, default=50000, help="training digits (default: 50000)")
    d.add_argument("--n-val", type=int, default=10000, help="validation digits, disjoint from train (default: 10000)")
    d.add_argument("--n-test", type=int, default=10000, help="test digits (default: 10000, all of MNIST's test part)")
    d.add_argument("--seed", type=int, default=0, help="subsets, corners, test shades, noise (default: 0)")
    d.add_argument("--swatch", type=int, default=4, help="swatch side in px (default: 4, the paper's)")
    d.add_argument("--digit-contrast", type=float, default=1.0,
                   help="scale the strokes' ink to this fraction (default: 1.0, the paper's)")
    d.add_argument("--noise", type=float, default=0.0,
                   help="std of Gaussian pixel noise in [0,1] units over the whole image (default: 0)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing exp_annotation.json")
    return p


@cli("megl.data.convert")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.dataset == "decoy-mnist":
        if (args.out / "exp_annotation.json").exists() and not args.overwrite:
            raise ConvertError(f"{args.out / 'exp_annotation.json'} exists: pass --overwrite to replace it")
        convert_decoy_mnist(args)
        return 0
    if args.min_count < 1 or args.max_classes < 0:
        raise ConvertError("--min-count must be >= 1 and --max-classes >= 0")
    if args.out.exists() and not args.out.is_dir():
        raise ConvertError(f"--out {args.out} is a file: give the dataset's directory")
    if (args.out / "exp_annotation.json").exists() and not args.overwrite:  # fail before reading the inputs
        raise ConvertError(f"{args.out / 'exp_annotation.json'} exists: pass --overwrite to replace it")
    (convert_vqax if args.dataset == "vqax" else convert_actx)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
