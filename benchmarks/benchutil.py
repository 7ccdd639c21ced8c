"""Shared helpers of the megl benchmark suites: devices, quick mode, timing, peak bandwidths, byte models.

Conventions (those of the usual GPU benchmark suites):
- the device is synchronised *inside* the timed function, so a round is a finished computation;
- warm-up rounds run first (torch.compile / Triton / cuDNN autotuning happen there, never in the timings);
- every benchmark records device, dtype, batch, shapes, backend or model and parameter counts in
  `benchmark.extra_info`, with `suite` naming the table of `python -m megl.bench_report` it belongs to;
- FPS = batch / latency (the report computes it from the median).

Quick mode (`MEGL_BENCH_QUICK=1`, and implied by `--benchmark-disable`, the CI smoke run) shrinks every shape
so that one pass over all suites takes well under two minutes on a 2-core CPU; numbers from quick mode are
labelled as such (extra_info["quick"]) and are not the benchmark.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable, Optional

import torch

# ----------------------------------------------------------------------------------------------- switches


def env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def quick() -> bool:
    """Small shapes: the CI smoke run (`--benchmark-disable` sets it, see conftest.py) or MEGL_BENCH_QUICK=1."""
    return env_flag("MEGL_BENCH_QUICK")


def has_cuda() -> bool:
    return torch.cuda.is_available() and not env_flag("MEGL_BENCH_NO_CUDA")


def devices() -> list[str]:
    """Devices to benchmark: always the CPU (the CPU shapes are small enough), plus CUDA when present."""
    return ["cpu", "cuda"] if has_cuda() else ["cpu"]


def main_device() -> str:
    """The device the model-level suites (Table 5, training step) run on: CUDA when present, else the CPU."""
    forced = os.environ.get("MEGL_BENCH_DEVICE")
    if forced:
        return forced
    return "cuda" if has_cuda() else "cpu"


def triton_skip_reason(device: str) -> Optional[str]:
    """Why the Triton backend is not timed here (None when it is)."""
    if device != "cuda":
        return ("Triton on CPU runs only in the interpreter (TRITON_INTERPRET=1), which is orders of magnitude "
                "slower than compiled code: not a benchmark; Triton is timed on CUDA devices only")
    if env_flag("TRITON_INTERPRET"):
        return ("TRITON_INTERPRET=1 is set in this process (tests/conftest.py sets it; run `pytest benchmarks` "
                "on its own): Triton would run interpreted on the GPU")
    return None


# ----------------------------------------------------------------------------------------------- devices


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


# Peak DRAM bandwidth of common cards, bytes/s (vendor data sheets). Matched against
# torch.cuda.get_device_name() in order, first match wins: keep the specific names first.
PEAK_BANDWIDTH = [
    ("GH200", 4.0e12),  # GH200 96 GB HBM3 (the 144 GB HBM3e version: 4.9 TB/s)
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # H100 SXM5 80 GB HBM3 ("NVIDIA H100 80GB HBM3")
    ("H800 PCIe", 2.0e12),
    ("H800", 3.35e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100-SXM4-40GB", 1.555e12),
    ("A100-PCIE-40GB", 1.555e12),
    ("A100", 1.555e12),
    ("A800", 2.039e12),
    ("L40S", 0.864e12),
    ("L40", 0.864e12),
    ("A40", 0.696e12),
    ("A10G", 0.600e12),
    ("A10", 0.600e12),
    ("L4", 0.300e12),
    ("V100", 0.900e12),
    ("T4", 0.320e12),
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
    ("RTX A6000", 0.768e12),
    ("RTX 6000 Ada", 0.960e12),
]


def peak_bandwidth(device) -> tuple[Optional[float], str]:
    """(peak bytes/s, where the number comes from) for a CUDA device; (None, reason) when unknown."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, "not a CUDA device"
    name = torch.cuda.get_device_name(device)
    for key, bw in PEAK_BANDWIDTH:
        if key.lower() in name.lower():
            return bw, f"table entry {key!r}"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:  # double data rate
        return 2.0 * clock_khz * 1e3 * bus_bits / 8, "memory_clock_rate x memory_bus_width (DDR)"
    return None, f"unknown card {name!r}"


# ----------------------------------------------------------------------------------------------- timing


def base_info(device, dtype=None, **extra) -> dict:
    info = {
        "device": str(torch.device(device).type),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": quick(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "nproc": os.cpu_count(),
    }
    if dtype is not None:
        info["dtype"] = str(dtype).replace("torch.", "")
    info.update(extra)
    return info


def measure(
    benchmark,
    fn: Callable[[], object],
    device,
    *,
    warmup: int = 2,
    max_time: Optional[float] = None,
    min_rounds: int = 3,
    max_rounds: int = 200,
    rounds: Optional[int] = None,
):
    """Time `fn()` (which must leave no work queued: it is wrapped with a device sync) with pytest-benchmark.

    Runs `warmup` untimed calls, estimates the per-call time, then picks the number of rounds so that the
    timed part takes about `max_time` seconds (MEGL_BENCH_MAX_TIME, default 2 s on CPU, 1 s on CUDA), within
    [min_rounds, max_rounds]. Sub-millisecond calls are batched into iterations of a round so that the timer
    resolution and the Python overhead of the harness do not dominate. Under `--benchmark-disable` it runs
    `fn` once and returns its result. `rounds` fixes the number of rounds (no calibration call).
    """
    def timed():
        out = fn()
        sync(device)
        return out

    if benchmark.disabled:  # pedantic() runs it once, untimed
        return benchmark.pedantic(timed)
    benchmark.extra_info.setdefault("warmup_rounds", max(warmup, 1) + (0 if rounds else 1))
    if rounds:  # fixed rounds, no calibration call (minutes-long calls)
        return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=max(warmup, 1))

    for _ in range(max(warmup, 1)):
        timed()
    t0 = time.perf_counter()
    timed()
    per_call = max(time.perf_counter() - t0, 1e-7)
    if max_time is None:
        default = 1.0 if torch.device(device).type == "cuda" else 2.0
        max_time = float(os.environ.get("MEGL_BENCH_MAX_TIME", default))
    iterations = 1
    if per_call < 1e-3:  # group fast calls: about 1 ms of work per round
        iterations = min(100, max(1, int(1e-3 / per_call)))
    rounds = int(max_time / (per_call * iterations))
    rounds = max(min_rounds, min(max_rounds, rounds))
    return benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=0)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- models

NUM_CLASSES = 40  # Object-ME's classes: 11.2 M (ResNet18) and 85.8 M (ViT-B/16) parameters, the paper's 11M / 85M
DISPLAY = {"resnet18": "MEGL-ResNet18", "vit_b_16": "MEGL-ViT-B/16", "llava-1.5-7b": "LLaVA-1.5-7B (prefill)"}


def image_size() -> int:
    return 64 if quick() else 224


def build_classifier(name: str, size: int):
    """The deployed MEGL classifier: a torchvision model with random weights (seeded)."""
    import torchvision

    torch.manual_seed(0)
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=NUM_CLASSES)
    if name == "vit_b_16":
        model = torchvision.models.vit_b_16(num_classes=NUM_CLASSES, image_size=size)
        # torchvision zero-initialises the head: every logit would be 0 and every Grad-CAM map empty
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model
    raise ValueError(name)


# ----------------------------------------------------------------------------------------------- byte model


def fused_bytes(B, K, h, w, C, H, W, dtype, *, mask: bool, prior: bool, direction: str) -> int:
    """Bytes the fused op must move between DRAM and the chip, if every tensor of the backend contract
    (megl/ops/backends/torch_explicit.py) is read or written exactly once.

    forward reads A, G (B·K·h·w, input dtype), image I (B·C·H·W), mask (B·H·W, fp32), prior (H·W, fp32);
    writes saliency s (B·H·W) and masked I⊙s (B·C·H·W) in the input dtype, plus the fp32 side outputs
    l1, kl (B), alpha (B·K), cam (B·h·w), stats (B·4).
    backward reads grad_masked (B·C·H·W), grad_l1, grad_kl (B), A, I, mask, prior, s and alpha, cam, stats;
    writes gA, gG (B·K·h·w) and gI (B·C·H·W). G itself is not needed (alpha is saved).
    "fwdbwd" is the sum of both (what one training step's use of the op costs).
    """
    e = torch.empty((), dtype=dtype).element_size()
    f32 = 4
    act = B * K * h * w
    img = B * C * H * W
    pix = B * H * W
    side = f32 * (2 * B + B * K + B * h * w + 4 * B)
    fwd = 2 * act * e + img * e + (pix * f32 if mask else 0) + (H * W * f32 if prior else 0)
    fwd += pix * e + img * e + side
    bwd = img * e + 2 * B * f32 + act * e + img * e + (pix * f32 if mask else 0) + (H * W * f32 if prior else 0)
    bwd += pix * e + side - 2 * B * f32  # alpha, cam, stats read back (l1/kl are not)
    bwd += 2 * act * e + img * e
    if direction == "fwd":
        return int(fwd)
    if direction == "fwdbwd":
        return int(fwd + bwd)
    raise ValueError(direction)


def mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None

