"""megl.bench_report on a small pytest-benchmark JSON built here: the numbers and ratios it prints."""
import json

import pytest

from megl import bench_report


def _bench(name, median, **info):
    return {
        "group": info.pop("group", None), "name": name, "fullname": f"benchmarks/x.py::{name}",
        "stats": {"min": median * 0.9, "max": median * 1.5, "mean": median * 2.0, "median": median, "rounds": 5},
        "extra_info": info,
    }


CPU = dict(device="cpu", device_name="Test CPU", dtype="float32", threads=1, loadavg_1m=3.0, nproc=2, quick=False,
           torch="2.x")
GPU = dict(device="cuda", device_name="NVIDIA H100 80GB HBM3", dtype="bfloat16", quick=False, torch="2.x")


def _data():
    shape = dict(activations=[16, 512, 7, 7], image=[16, 3, 224, 224])
    gshape = dict(activations=[64, 512, 7, 7], image=[64, 3, 224, 224])
    k = dict(CPU, suite="kernel", shape=shape, mask="half the batch", bytes=10**8)
    kg = dict(GPU, suite="kernel", shape=gshape, mask="half the batch", bytes=10**9, peak_bandwidth=2.0e12,
              peak_bandwidth_source="table entry 'H100 PCIe'")
    benches = [
        # Table 5, CPU: LLaVA measured -> speedups
        _bench("r18", 0.010, **CPU, suite="table5", model="resnet18", label="MEGL-ResNet18", variant="eager",
               params=11_197_032, batch=1),
        _bench("vit", 0.020, **CPU, suite="table5", model="vit_b_16", label="MEGL-ViT-B/16", variant="eager",
               params=85_829_416, batch=1),
        _bench("llava", 0.500, **CPU, suite="table5", model="llava-1.5-7b", label="LLaVA-1.5-7B (prefill)",
               variant="eager", params=7_063_427_072, batch=1, is_reference_row=True, seq_len=636, image_tokens=576),
        # Table 5, GPU: no LLaVA row
        _bench("r18g", 0.002, **GPU, suite="table5", model="resnet18", label="MEGL-ResNet18", variant="eager",
               params=11_197_032, batch=1),
        # explained inference
        _bench("e1", 0.010, **CPU, suite="explained", model="resnet18", mode="classifier", batch=1,
               impl="torchvision"),
        _bench("e2", 0.012, **CPU, suite="explained", model="resnet18", mode="classifier+saliency",
               batch=1, impl="torchvision"),
        # kernel, CPU
        _bench("kref", 0.004, **k, backend="reference", direction="fwd"),
        _bench("kref2", 0.010, **k, backend="reference", direction="fwdbwd"),
        _bench("kcomp", 0.002, **k, backend="compiled", direction="fwd"),
        _bench("kcomp2", 0.008, **k, backend="compiled", direction="fwdbwd"),
        _bench("kcpp", 0.001, **k, backend="cpp", direction="fwd"),
        _bench("kcpp2", 0.002, **k, backend="cpp", direction="fwdbwd"),
        # kernel, CUDA: 1e9 bytes in 1 ms = 1000 GB/s = 50% of 2 TB/s
        _bench("gref", 0.004, **kg, backend="reference", direction="fwd"),
        _bench("gcuda", 0.001, **kg, backend="cuda", direction="fwd"),
        _bench("gcuda2", 0.004, **dict(kg, bytes=2 * 10**9), backend="cuda", direction="fwdbwd"),
        # peers
        _bench("p1", 0.100, **CPU, suite="peers", method="megl-closed-form", label="megl closed form", batch=16,
               image_size=224, model="resnet18"),
        _bench("p2", 0.500, **CPU, suite="peers", method="pytorch-grad-cam", label="pytorch-grad-cam GradCAM",
               batch=16, image_size=224, model="resnet18"),
        # training step
        _bench("s1", 0.100, **CPU, suite="train_step", step="ce", label="cross-entropy step", model="resnet18",
               batch=16, image_size=224),
        _bench("s2", 0.150, **CPU, suite="train_step", step="explanation-guided", label="explanation-guided step",
               model="resnet18", batch=16, image_size=224),
        _bench("s3", 0.400, **CPU, suite="train_step", step="megl", label="full MEGL step", model="resnet18",
               batch=16, image_size=224),
    ]
    return {"machine_info": {"cpu": {"brand_raw": "Test CPU"}, "python_version": "3.11"},
            "datetime": "2026-01-01T00:00:00", "benchmarks": benches}


@pytest.fixture
def report():
    return bench_report.render(_data())


def _row(text, first_cell, occurrence=0):
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) > occurrence, f"no row {first_cell!r} in\n{text}"
    return [c.strip() for c in rows[occurrence].strip("|").split("|")]


def test_table5_latency_fps_speedup(report):
    assert _row(report, "MEGL-ResNet18") == ["MEGL-ResNet18", "11.2M", "10.00", "100.0", "50.00×"]
    assert _row(report, "MEGL-ViT-B/16") == ["MEGL-ViT-B/16", "85.8M", "20.00", "50.00", "25.00×"]
    assert _row(report, "LLaVA-1.5-7B (prefill)") == ["LLaVA-1.5-7B (prefill)", "7063.4M", "500.0", "2.00",
                                                      "1.00× (reference)"]
    assert "| Model | Parameters | Latency (ms) | FPS | Speedup |" in report


def test_table5_without_llava_says_so(report):
    gpu = report.split("### Table 5 — NVIDIA H100")[1].split("###")[0]
    assert _row(gpu, "MEGL-ResNet18") == ["MEGL-ResNet18", "11.2M", "2.00", "500.0", "—"]
    assert "LLaVA-1.5-7B row is absent" in gpu


def test_kernel_speedups(report):
    cpu = report.split("### Fused saliency kernel — Test CPU")[1].split("###")[0]
    assert "B=16, K=512, 7×7 → 224×224" in report
    assert _row(cpu, "cpp") == ["cpp", "1.00", "2.00", "4.00× / 5.00×", "2.00× / 4.00×"]
    assert _row(cpu, "eager reference") == ["eager reference", "4.00", "10.00", "1.00× / 1.00×", "0.50× / 0.80×"]
    assert "GB/s" not in cpu  # bandwidth only on CUDA


def test_kernel_bandwidth_on_cuda(report):
    gpu = report.split("### Fused saliency kernel — NVIDIA")[1].split("###")[0]
    # fwd: 1e9 B / 1 ms = 1000 GB/s (50% of 2 TB/s); fwd+bwd: 2e9 B / 4 ms = 500 GB/s (25%)
    assert _row(gpu, "cuda") == ["cuda", "1.00", "4.00", "4.00× / —", "— / —", "1000 (50%) / 500 (25%)"]
    assert "2.00 TB/s" in gpu


def test_explained_peers_and_training_ratios(report):
    assert _row(report, "MEGL-ResNet18", occurrence=2) == ["MEGL-ResNet18", "torchvision", "10.00", "12.00",
                                                         "2.00 ms (+20%)", "100.0", "83.33"]
    assert _row(report, "pytorch-grad-cam GradCAM") == ["pytorch-grad-cam GradCAM", "500.0", "32.00", "5.00×"]
    assert _row(report, "cross-entropy step") == ["cross-entropy step", "100.0", "10.00", "1.00×", "0.67×"]
    assert _row(report, "explanation-guided step") == ["explanation-guided step", "150.0", "6.67", "1.50×", "1.00×"]
    assert _row(report, "full MEGL step") == ["full MEGL step", "400.0", "2.50", "4.00×", "2.67×"]


def test_load_and_stat_choice():
    text = bench_report.render(_data(), stat="mean")  # every mean is twice the median
    assert _row(text, "MEGL-ResNet18") == ["MEGL-ResNet18", "11.2M", "20.00", "50.00", "50.00×"]
    assert "Load average (1 min) while measuring: 3.0–3.0 on 2 cores" in text
    with pytest.raises(ValueError):
        bench_report.rows_of(_data(), stat="p99")


def test_cli_writes_markdown(tmp_path, capsys):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(_data()))
    out = tmp_path / "bench.md"
    assert bench_report.main([str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert printed.startswith("# megl benchmarks")


def test_cli_rejects_other_json(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a benchmark file"}))
    assert bench_report.main([str(bad)]) == 2
    assert "pytest-benchmark JSON" in capsys.readouterr().err


def test_disabled_run_has_no_stats():
    data = {"benchmarks": [{"name": "x", "stats": None, "extra_info": {}}]}
    assert "No benchmarks with statistics" in bench_report.render(data)


def test_table5_llava_in_another_dtype_still_the_reference():
    data = _data()
    for b in data["benchmarks"]:
        if b["name"] == "llava":
            b["extra_info"]["dtype"] = "bfloat16"  # MEGL_BENCH_LLAVA_DTYPE=bfloat16 on a small CPU host
    text = bench_report.render(data)
    assert "### Table 5 — Test CPU, float32 + bfloat16" in text
    assert _row(text, "MEGL-ResNet18 [float32]") == ["MEGL-ResNet18 [float32]", "11.2M", "10.00", "100.0", "50.00×"]
    assert _row(text, "LLaVA-1.5-7B (prefill) [bfloat16]")[-1] == "1.00× (reference)"


def test_gradcam_table_ratios():
    info = dict(CPU, batch=16, image_size=224, model="resnet50", gradcam_mode="closed-form")
    data = {"benchmarks": [
        _bench("t1", 1.00, **info, suite="gradcam_train", variant="model fwd+bwd"),
        _bench("t2", 1.10, **info, suite="gradcam_train", variant="megl.GradCAM fwd+bwd"),
        _bench("m1", 0.40, **info, suite="gradcam_map", method="megl.GradCAM (no_grad)"),
        _bench("m2", 1.60, **info, suite="gradcam_map", method="pytorch-grad-cam"),
    ]}
    md = bench_report.render(data)
    row = next(line for line in md.splitlines() if line.startswith("| resnet50"))
    assert "closed-form" in row and "1.10×" in row and "4.00×" in row
    assert "Other benchmarks" not in md
