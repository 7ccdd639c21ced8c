"""Evaluation reports: Markdown tables in the layout of the paper's Tables 2 and 3, and an HTML page of samples.

Table 2: Backbone | Method | Accuracy | Precision | Recall | F1 Score | mIoU  (macro-averaged classification)
Table 3: Method | CLIPScore | B4 | M | R | S | C                          (BLEU-4, METEOR, ROUGE-L, SPICE, CIDEr)
Missing values (not computed, unavailable) print as "n/a". The HTML report links its images as PNG files in a
folder next to it (relative links), so the folder can be moved or zipped as a whole.
"""
from __future__ import annotations

import html
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from megl.overlays import mask_overlay, save_png, saliency_overlay, to_hwc
from megl.tables import markdown_table

BACKBONE_NAMES = {"resnet18": "ResNet18", "vit_b_16": "ViT-B/16"}
METHOD_NAMES = {"baseline": "-", "megl": "MEGL", "gradia": "GRADIA", "haics": "HAICS", "res-g": "RES-G",
                "res-l": "RES-L", "rrr": "RRR", "cdep": "CDEP"}
TABLE2_COLUMNS = (("accuracy", "Accuracy"), ("precision", "Precision"), ("recall", "Recall"), ("f1", "F1 Score"),
                  ("miou", "mIoU"))
TABLE3_COLUMNS = (("clipscore", "CLIPScore"), ("bleu4", "B4"), ("meteor", "M"), ("rouge_l", "R"), ("spice", "S"),
                  ("cider", "C"))
EXTRA_COLUMNS = (("exp_precision", "Exp. Precision"), ("exp_recall", "Exp. Recall"), ("exp_f1", "Exp. F1"),
                 ("comprehensiveness", "Comp. ↑"), ("sufficiency", "Suff. ↓"), ("miou_prior", "mIoU of prior"),
                 ("clipscore_references", "CLIPScore of references"))


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def display_backbone(name: str) -> str:
    return BACKBONE_NAMES.get(name, name)


def display_method(name: str) -> str:
    return METHOD_NAMES.get(name, name)


def table2(rows: Sequence[Mapping[str, Any]], dataset: str = "") -> str:
    """Paper Table 2 layout. rows: {"backbone", "method", "accuracy", "precision", "recall", "f1", "miou"}."""
    header = ["Backbone", "Method"] + [f"{title}" for _, title in TABLE2_COLUMNS]
    body = [[display_backbone(r.get("backbone", "")), display_method(r.get("method", ""))]
            + [fmt(r.get(k)) for k, _ in TABLE2_COLUMNS] for r in rows]
    title = "Table 2. Classification and visual explainability" + (f" ({dataset})" if dataset else "")
    return f"**{title}**\n\n" + markdown_table(header, body)


def table3(rows: Sequence[Mapping[str, Any]], dataset: str = "") -> str:
    """Paper Table 3 layout. rows: {"method" (e.g. "MEGL-ResNet18"), "clipscore", "bleu4", "meteor", "rouge_l",
    "spice", "cider"}. B4/M/R/S/C: BLEU-4, METEOR, ROUGE-L, SPICE, CIDEr."""
    header = ["Method"] + [title for _, title in TABLE3_COLUMNS]
    body = [[r.get("method", "")] + [fmt(r.get(k)) for k, _ in TABLE3_COLUMNS] for r in rows]
    title = "Table 3. Textual explanation quality" + (f" ({dataset})" if dataset else "")
    return f"**{title}**\n\n" + markdown_table(header, body)


def extra_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Beyond the paper: pixel precision/recall/F1 of the saliency (survey §5.1.5), faithfulness (§2.2.1)."""
    header = ["Method"] + [title for _, title in EXTRA_COLUMNS]
    body = [[r.get("method", "")] + [fmt(r.get(k)) for k, _ in EXTRA_COLUMNS] for r in rows]
    return "**Explanation details (beyond the paper)**\n\n" + markdown_table(header, body)


def rows_from_metrics(metrics: Mapping[str, Any], backbone: str, method: str) -> tuple[dict, dict]:
    """(Table 2 row, Table 3 row) from an `evaluate_split` result."""
    text = metrics.get("text") or {}
    row2 = {"backbone": backbone, "method": method, **{k: metrics.get(k) for k, _ in TABLE2_COLUMNS}}
    label = display_method(method)
    label = (f"{label}-{display_backbone(backbone)}" if label != "-" else display_backbone(backbone))
    row3 = {"method": label, "clipscore": metrics.get("clipscore"),
            **{k: text.get(k) for k in ("bleu4", "meteor", "rouge_l", "spice", "cider")}}
    row3.update({k: metrics.get(k) for k, _ in EXTRA_COLUMNS})
    return row2, row3


def markdown_report(metrics: Mapping[str, Any], backbone: str, method: str, dataset: str = "",
                    notes: Sequence[str] = ()) -> str:
    row2, row3 = rows_from_metrics(metrics, backbone, method)
    parts = [table2([row2], dataset), table3([row3], dataset), extra_table([row3])]
    if notes:
        parts.append("\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts) + "\n"

# ------------------------------------------------------------------ HTML
def write_html_report(samples: Sequence[Mapping[str, Any]], out_dir: str, *, title: str,
                      class_names: Sequence[str], summary_markdown: str = "", notes: Sequence[str] = (),
                      filename: str = "report.html", images_dirname: str = "report_images",
                      scale: Optional[int] = None) -> str:
    """Write `out_dir/filename` and its PNGs under `out_dir/images_dirname/`; returns the HTML path.

    samples: dicts with "id", "image" (3,H,W) in [0,1], "saliency" (H,W), "mask" (H,W), "has_mask", "label",
    "pred", optional "generated" (str) and "references" (list[str]).
    """
    img_dir = os.path.join(out_dir, images_dirname)
    os.makedirs(img_dir, exist_ok=True)
    cards = []
    for n, s in enumerate(samples):
        h = int(s["image"].shape[-1])
        k = scale or max(1, 192 // max(h, 1))
        stem = f"{n:03d}_" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(s["id"]))[:40]
        files = {"image": f"{stem}_image.png", "saliency": f"{stem}_saliency.png", "mask": f"{stem}_mask.png"}
        save_png(os.path.join(img_dir, files["image"]), to_hwc(s["image"]), k)
        save_png(os.path.join(img_dir, files["saliency"]), saliency_overlay(s["image"], s["saliency"]), k)
        if s.get("has_mask"):
            save_png(os.path.join(img_dir, files["mask"]), mask_overlay(s["image"], s["mask"]), k)
        label, pred = int(s["label"]), int(s["pred"])
        ok = label == pred
        figs = [_figure(f"{images_dirname}/{files['image']}", "image"),
                _figure(f"{images_dirname}/{files['saliency']}", "saliency (Grad-CAM, predicted class)")]
        figs.append(_figure(f"{images_dirname}/{files['mask']}", "human mask") if s.get("has_mask")
                    else '<figure class="none"><div>no human mask</div><figcaption>human mask</figcaption></figure>')
        text = ""
        if s.get("generated") is not None:
            refs = "".join(f"<li>{html.escape(r)}</li>" for r in s.get("references", []))
            text = (f'<p><b>Generated:</b> {html.escape(s["generated"]) or "<i>(empty)</i>"}</p>'
                    f"<p><b>References:</b></p><ul>{refs}</ul>")
        iou = f' &middot; IoU {s["iou"]:.3f}' if s.get("has_mask") and s.get("iou") is not None else ""
        cards.append(
            f'<div class="card"><h3>{html.escape(str(s["id"]))}</h3><div class="figs">{"".join(figs)}</div>'
            f'<p class="{"ok" if ok else "bad"}">predicted <b>{html.escape(class_names[pred])}</b> &middot; '
            f'true <b>{html.escape(class_names[label])}</b> {"&#10003;" if ok else "&#10007;"}{iou}</p>{text}</div>')
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; }}
td, th {{ border: 1px solid #bbb; padding: 3px 8px; text-align: right; font-size: 13px; }}
th {{ background: #eee; }}
td:first-child, th:first-child {{ text-align: left; }}
.card {{ border: 1px solid #ccc; border-radius: 6px; padding: 8px 12px; margin: 12px 0; }}
.card h3 {{ margin: 2px 0 6px; font-size: 15px; }}
.figs {{ display: flex; gap: 10px; }}
figure {{ margin: 0; text-align: center; font-size: 12px; }}
figure img {{ width: 192px; height: 192px; image-rendering: pixelated; border: 1px solid #999; }}
figure.none div {{ width: 192px; height: 192px; border: 1px dashed #999; display: flex; align-items: center;
                  justify-content: center; color: #888; }}
.ok {{ color: #176317; }} .bad {{ color: #b01010; }}
ul {{ margin: 2px 0; }} p {{ margin: 4px 0; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{_markdown_tables_to_html(summary_markdown)}
<ul>{notes_html}</ul>
<h2>Samples ({len(samples)})</h2>
{"".join(cards)}
</body></html>
"""
    path = os.path.join(out_dir, filename)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def _figure(src: str, caption: str) -> str:
    return f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}"><figcaption>{caption}</figcaption></figure>'


def _markdown_tables_to_html(md: str) -> str:
    """The few Markdown constructs `markdown_report` emits: **titles**, pipe tables, '- ' notes (skipped)."""
    out, rows = [], []

    def flush():
        if rows:
            head, body = rows[0], rows[2:]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.startswith("**") and line.endswith("**"):
            out.append(f"<h3>{html.escape(line.strip('*'))}</h3>")
    flush()
    return "\n".join(out)
