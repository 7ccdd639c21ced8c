"""Markdown tables from a pytest-benchmark JSON file of the megl benchmark suites.

    pytest benchmarks --benchmark-only --benchmark-json BENCH.json
    python -m megl.bench_report BENCH.json [--out BENCH.md] [--stat median|mean|min]

Tables (each benchmark says which one it belongs to in `extra_info["suite"]`):
- Table 5 (paper §4.7): Model | Parameters | Latency (ms) | FPS | Speedup, FPS = batch / latency, speedup =
  FPS / FPS of the LLaVA-1.5-7B row of the same device and dtype (absent unless that row was measured);
- the fused saliency kernel: fwd and fwd+bwd latency per backend, speedups against the eager reference and
  `torch.compile(reference)`, achieved bandwidth (bytes of the byte model / time) and % of peak on CUDA;
- Grad-CAM against pytorch-grad-cam and Captum; explained inference; the training step with its ratios.
Latency is the median of the rounds by default (robust on a shared machine); `--stat` picks another.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from typing import Optional

from megl.tables import markdown_table

STATS = ("median", "mean", "min")
SUITES = ("table5", "explained", "kernel", "peers", "train_step", "gradcam_train", "gradcam_map")


# ----------------------------------------------------------------------------------------------- formatting
def fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    if ms < 1:
        return f"{ms:.3f}"
    if ms < 100:
        return f"{ms:.2f}"
    return f"{ms:.1f}"


def fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x:.2f}" if x < 100 else f"{x:.1f}"


def fmt_ratio(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x:.2f}×" if x < 100 else f"{x:.1f}×"


def fmt_params(n: Optional[int]) -> str:
    """Millions, as the paper writes them (11M, 85M, 7063M), with one decimal."""
    if n is None:
        return "—"
    return f"{n / 1e6:.1f}M"


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den == 0:
        return None
    return num / den


# ----------------------------------------------------------------------------------------------- loading
class Row(dict):
    """One benchmark: its extra_info plus `seconds` (the chosen statistic), `name`, `group`, `rounds`."""


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list): "
                         "write one with `pytest benchmarks --benchmark-only --benchmark-json FILE`")
    return data


def rows_of(data: dict, stat: str = "median") -> list[Row]:
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
    out = []
    for b in data.get("benchmarks", []):
        stats = b.get("stats") or {}
        if stat not in stats:
            continue
        r = Row(b.get("extra_info") or {})
        r["seconds"] = float(stats[stat])
        r["name"] = b.get("name") or b.get("fullname", "?")
        r["group"] = b.get("group")
        r["rounds"] = stats.get("rounds")
        out.append(r)
    return out


def _dtype_key(r: Row) -> tuple:
    return (r.get("device_name") or r.get("device", "?"), r.get("dtype", "?"))


def _grouped(rows: list[Row], key) -> "OrderedDict[tuple, list[Row]]":
    groups: OrderedDict = OrderedDict()
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def _setting(r: Row, *extra: str) -> str:
    parts = [f"{r.get('device_name') or r.get('device', '?')}", r.get("dtype", "?")]
    parts += [e for e in extra if e]
    if r.get("threads") and r.get("device") == "cpu":
        parts.append(f"{r['threads']} thread(s)")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------- Table 5
_T5_ORDER = {"resnet18": 0, "vit_b_16": 1, "llava-1.5-7b": 9}
_T5_NAMES = {"resnet18": "MEGL-ResNet18", "vit_b_16": "MEGL-ViT-B/16", "llava-1.5-7b": "LLaVA-1.5-7B (prefill)"}


def _is_llava_reference(r: Row) -> bool:
    return r.get("model") == "llava-1.5-7b" and r.get("is_reference_row", not r.get("quick", False))


def table5(rows: list[Row]) -> str:
    out = []
    # One section per device: the LLaVA row may run in another dtype than the classifiers (bf16 on a small host)
    t5 = [r for r in rows if r.get("suite") == "table5"]
    for key, rs in _grouped(t5, lambda r: r.get("device_name") or r.get("device", "?")).items():
        rs.sort(key=lambda r: (_T5_ORDER.get(r.get("model"), 5), r.get("variant") != "eager", r.get("label", "")))
        dtypes = list(OrderedDict.fromkeys(r.get("dtype", "?") for r in rs))
        ref = next((r for r in rs if _is_llava_reference(r)), None)
        ref_fps = ratio(ref.get("batch", 1), ref["seconds"]) if ref else None
        body = []
        for r in rs:
            fps = ratio(r.get("batch", 1), r["seconds"])
            name = r.get("label") or _T5_NAMES.get(r.get("model"), r.get("model", r["name"]))
            if len(dtypes) > 1:
                name += f" [{r.get('dtype', '?')}]"
            if r is ref:
                speed = "1.00× (reference)"
            else:
                speed = fmt_ratio(ratio(fps, ref_fps)) if ref_fps else "—"
            body.append([name, fmt_params(r.get("params")), fmt_ms(r["seconds"]), fmt_rate(fps), speed])
        batch = rs[0].get("batch", 1)
        head = dict(rs[0], dtype=" + ".join(dtypes))
        out.append(f"### Table 5 — {_setting(head, f'batch {batch}')}\n")
        out.append(markdown_table(["Model", "Parameters", "Latency (ms)", "FPS", "Speedup"], body))
        notes = []
        if ref is None:
            tiny = [r for r in rs if r.get("model") == "llava-1.5-7b"]
            if tiny:
                notes.append("The LLaVA row here is the tiny quick-mode config (same classes and code path, "
                             f"{fmt_params(tiny[0].get('params'))} parameters; the full config has "
                             f"{fmt_params(tiny[0].get('params_full_config'))}): no speedup against it.")
            else:
                notes.append("The LLaVA-1.5-7B row is absent (not measured: on CPU it is opt-in with "
                             "MEGL_BENCH_LLAVA=1), so there is no speedup column to compute.")
        else:
            extra = [f"{ref.get('seq_len')} prompt tokens" if ref.get("seq_len") else "",
                     f"{ref.get('image_tokens')} image tokens" if ref.get("image_tokens") else ""]
            extra = ", ".join(e for e in extra if e)
            notes.append(f"Speedup = FPS / FPS of LLaVA-1.5-7B (one prefill{', ' + extra if extra else ''}, no decoding).")
        out.append("\n" + " ".join(notes) + "\n")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- explained inference
def explained_table(rows: list[Row]) -> str:
    rs = [r for r in rows if r.get("suite") == "explained"]
    if not rs:
        return ""
    out = []
    for key, grp in _grouped(rs, _dtype_key).items():
        body = []
        by_model = _grouped(grp, lambda r: (r.get("model"), r.get("impl", "")))
        for (model, impl), mrs in sorted(by_model.items(), key=lambda kv: (_T5_ORDER.get(kv[0][0], 5), kv[0][1])):
            cls = next((r for r in mrs if r.get("mode") == "classifier"), None)
            exp = next((r for r in mrs if r.get("mode") == "classifier+saliency"), None)
            tc, te = (cls or {}).get("seconds"), (exp or {}).get("seconds")
            over = None if tc is None or te is None else te - tc
            over_s = "—" if over is None else f"{fmt_ms(over) if over >= 0 else '-' + fmt_ms(-over)} ms ({100 * over / tc:+.0f}%)"
            batch = mrs[0].get("batch", 1)
            body.append([_T5_NAMES.get(model, model), impl or "—", fmt_ms(tc), fmt_ms(te), over_s,
                         fmt_rate(ratio(batch, tc)), fmt_rate(ratio(batch, te))])
        batch = grp[0].get("batch", 1)
        out.append(f"### Explained inference — {_setting(grp[0], f'batch {batch}')}\n")
        out.append(markdown_table(["Model", "Implementation", "Classifier (ms)", "Classifier + saliency (ms)", "Overhead", "FPS", "FPS explained"], body))
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- kernel
_K_ORDER = ["reference", "compiled", "torch", "cpp", "cuda", "triton"]
_K_NAMES = {"reference": "eager reference", "compiled": "torch.compile(reference)", "torch": "torch",
            "cpp": "cpp", "cuda": "cuda", "triton": "triton"}


def _shape_key(r: Row) -> str:
    shape = r.get("shape") or {}
    a, i = shape.get("activations"), shape.get("image")
    if a and i:
        return f"B={a[0]}, K={a[1]}, {a[2]}×{a[3]} → {i[2]}×{i[3]}"
    return r.get("group") or "?"


def _gbps(r: Optional[Row]) -> Optional[float]:
    if not r or not r.get("bytes") or not r.get("seconds"):
        return None
    return r["bytes"] / r["seconds"] / 1e9


def kernel_table(rows: list[Row]) -> str:
    rs = [r for r in rows if r.get("suite") == "kernel"]
    if not rs:
        return ""
    out = []
    for key, grp in _grouped(rs, lambda r: _dtype_key(r) + (_shape_key(r),)).items():
        cuda = grp[0].get("device") == "cuda"
        by = {(r.get("backend"), r.get("direction")): r for r in grp}
        backends = sorted({r.get("backend") for r in grp}, key=lambda b: (_K_ORDER.index(b) if b in _K_ORDER else 99, b))
        t = lambda b, d: (by.get((b, d)) or {}).get("seconds")  # noqa: E731
        peak = next((r.get("peak_bandwidth") for r in grp if r.get("peak_bandwidth")), None)
        body = []
        for b in backends:
            row = [_K_NAMES.get(b, b), fmt_ms(t(b, "fwd")), fmt_ms(t(b, "fwdbwd"))]
            for base in ("reference", "compiled"):
                row.append(f"{fmt_ratio(ratio(t(base, 'fwd'), t(b, 'fwd')))} / {fmt_ratio(ratio(t(base, 'fwdbwd'), t(b, 'fwdbwd')))}")
            if cuda:
                cells = []
                for d in ("fwd", "fwdbwd"):
                    g = _gbps(by.get((b, d)))
                    if g is None:
                        cells.append("—")
                    else:
                        cells.append(f"{g:.0f}" + (f" ({100 * g * 1e9 / peak:.0f}%)" if peak else ""))
                row.append(" / ".join(cells))
            body.append(row)
        header = ["Backend", "fwd (ms)", "fwd+bwd (ms)", "vs eager (fwd / fwd+bwd)", "vs compiled (fwd / fwd+bwd)"]
        if cuda:
            header.append("GB/s fwd / fwd+bwd (% of peak)")
        out.append(f"### Fused saliency kernel — {_setting(grp[0], key[2])}\n")
        out.append(markdown_table(header, body))
        if cuda:
            src = next((r.get("peak_bandwidth_source") for r in grp if r.get("peak_bandwidth_source")), "")
            out.append(f"\nPeak bandwidth: {peak / 1e12:.2f} TB/s ({src}). " if peak else "\nPeak bandwidth unknown for this card. ")
            out.append("Bytes: every tensor of the backend contract read or written once "
                       "(benchmarks/benchutil.py `fused_bytes`): forward reads A, G, image, mask, prior and writes "
                       "saliency, masked image and side outputs; backward reads grad_masked, A, image, mask, prior, "
                       "saliency, saved stats and writes gA, gG, gI.")
        masks = grp[0].get("mask")
        if masks:
            out.append(f"\nMask on {masks}, prior given. Speedup = time of the baseline / time of the backend.")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- peers
_P_ORDER = ["megl-closed-form", "megl-autograd", "pytorch-grad-cam", "captum"]


def peers_table(rows: list[Row]) -> str:
    rs = [r for r in rows if r.get("suite") == "peers"]
    if not rs:
        return ""
    out = []
    for key, grp in _grouped(rs, lambda r: _dtype_key(r) + (r.get("batch"), r.get("image_size"))).items():
        grp.sort(key=lambda r: _P_ORDER.index(r.get("method")) if r.get("method") in _P_ORDER else 99)
        base = next((r["seconds"] for r in grp if r.get("method") == "megl-closed-form"), None)
        body = [[r.get("label") or r.get("method"), fmt_ms(r["seconds"]), fmt_rate(ratio(r.get("batch", 1), r["seconds"])),
                 fmt_ratio(ratio(r["seconds"], base))] for r in grp]
        what = f"{grp[0].get('model', 'resnet18')}, batch {key[2]}, {key[3]} px"
        out.append(f"### Grad-CAM maps: megl vs pytorch-grad-cam and Captum — {_setting(grp[0], what)}\n")
        out.append(markdown_table(["Method", "Latency (ms)", "Maps/s", "Time vs megl closed form"], body))
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- training step
_S_ORDER = ["ce", "explanation-guided", "megl"]


def train_table(rows: list[Row]) -> str:
    rs = [r for r in rows if r.get("suite") == "train_step"]
    if not rs:
        return ""
    out = []
    for key, grp in _grouped(rs, lambda r: _dtype_key(r) + (r.get("model"), r.get("batch"), r.get("image_size"))).items():
        grp.sort(key=lambda r: _S_ORDER.index(r.get("step")) if r.get("step") in _S_ORDER else 99)
        t = {r.get("step"): r["seconds"] for r in grp}
        body = [[r.get("label") or r.get("step"), fmt_ms(r["seconds"]), fmt_rate(ratio(1.0, r["seconds"])),
                 fmt_ratio(ratio(r["seconds"], t.get("ce"))), fmt_ratio(ratio(r["seconds"], t.get("explanation-guided")))]
                for r in grp]
        out.append(f"### Training step — {_setting(grp[0], f'{key[2]}, batch {key[3]}, {key[4]} px')}\n")
        out.append(markdown_table(["Step", "Latency (ms)", "Steps/s", "× CE step", "× explanation-guided step"], body))
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- megl.GradCAM
def gradcam_table(rows: list[Row]) -> str:
    """megl.GradCAM on torchvision models: guided train step / plain one, and the map against pytorch-grad-cam."""
    train = [r for r in rows if r.get("suite") == "gradcam_train"]
    maps = [r for r in rows if r.get("suite") == "gradcam_map"]
    if not train and not maps:
        return ""
    models = sorted({r.get("model") for r in train + maps}, key=str)
    body = []
    for m in models:
        t = {r.get("variant"): r for r in train if r.get("model") == m}
        p = {r.get("method"): r for r in maps if r.get("model") == m}
        plain, guided = t.get("model fwd+bwd"), t.get("megl.GradCAM fwd+bwd")
        mine, peer = p.get("megl.GradCAM (no_grad)"), p.get("pytorch-grad-cam")
        mode = next((r.get("gradcam_mode") for r in list(t.values()) + list(p.values()) if r.get("gradcam_mode")), "")
        sec = lambda r: r["seconds"] if r else None  # noqa: E731
        body.append([m, mode, fmt_ms(sec(plain)), fmt_ms(sec(guided)),
                     fmt_ratio(ratio(sec(guided), sec(plain))), fmt_ms(sec(mine)), fmt_ms(sec(peer)),
                     fmt_ratio(ratio(sec(peer), sec(mine)))])
    r0 = (train + maps)[0]
    what = f"batch {r0.get('batch')}, {r0.get('image_size')} px"
    return (f"### megl.GradCAM on torchvision models — {_setting(r0, what)}\n\n"
            + markdown_table(["Model", "Path", "fwd+bwd (ms)", "GradCAM fwd+bwd (ms)", "× fwd+bwd", "megl map (ms)",
                     "pytorch-grad-cam (ms)", "megl speedup"], body) + "\n")


def other_table(rows: list[Row]) -> str:
    rs = [r for r in rows if r.get("suite") not in SUITES]
    if not rs:
        return ""
    return "### Other benchmarks\n\n" + markdown_table(["Benchmark", "Group", "Latency (ms)"],
                                              [[r["name"], r.get("group") or "", fmt_ms(r["seconds"])] for r in rs]) + "\n"


# ----------------------------------------------------------------------------------------------- report
def render(data: dict, stat: str = "median", source: str = "") -> str:
    rows = rows_of(data, stat)
    mi = data.get("machine_info") or {}
    cpu = (mi.get("cpu") or {}).get("brand_raw") or mi.get("processor") or "?"
    head = ["# megl benchmarks", ""]
    meta = [f"source: `{source}`" if source else "", f"date: {data.get('datetime', '?')}",
            f"CPU: {cpu}", f"Python {mi.get('python_version', '?')}",
            f"torch {rows[0].get('torch')}" if rows and rows[0].get("torch") else "",
            f"latency = {stat} of the rounds"]
    head.append(", ".join(m for m in meta if m) + ".")
    loads = [r["loadavg_1m"] for r in rows if r.get("loadavg_1m") is not None]
    if loads:
        nproc = next((r.get("nproc") for r in rows if r.get("nproc")), None)
        head.append(f"Load average (1 min) while measuring: {min(loads):.1f}–{max(loads):.1f}"
                    + (f" on {nproc} cores" if nproc else "") + ".")
    if any(r.get("quick") for r in rows):
        head.append("\n**Quick mode (MEGL_BENCH_QUICK): small shapes for a smoke run; these are not the benchmark.**")
    sections = [table5(rows), explained_table(rows), kernel_table(rows), peers_table(rows), train_table(rows),
                gradcam_table(rows), other_table(rows)]
    sections = [s for s in sections if s.strip()]
    if not sections:
        sections = ["No benchmarks with statistics in this file (was it written with --benchmark-disable?)."]
    return "\n".join(head) + "\n\n" + "\n".join(sections).rstrip() + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megl.bench_report",
                                description="Markdown tables (Table 5, kernel, training step) from a pytest-benchmark JSON file.")
    p.add_argument("json", help="the file written by `pytest benchmarks --benchmark-only --benchmark-json FILE`")
    p.add_argument("--out", help="also write the Markdown to this file")
    p.add_argument("--stat", choices=STATS, default="median", help="which statistic of the rounds is the latency")
    args = p.parse_args(argv)
    try:
        data = load(args.json)
    except (OSError, ValueError) as err:
        print(f"bench_report: {err}", file=sys.stderr)
        return 2
    text = render(data, args.stat, source=args.json)
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
