"""pytest configuration of the benchmark suites (`pytest benchmarks --benchmark-only`).

- `--benchmark-disable` (the CI smoke: each benchmark function runs once, untimed) turns on quick mode
  (small shapes, MEGL_BENCH_QUICK=1) unless MEGL_BENCH_QUICK=0 is set explicitly.
- TRITON_INTERPRET is deliberately *not* set here: interpreted Triton is not a benchmark, and setting it would
  make Triton on a GPU run interpreted too. The Triton backend is timed on CUDA only.
- MEGL_BENCH_THREADS=N sets torch's CPU threads (default: torch's own choice, one per core; 1 in quick mode).
  On a CPU shared with other jobs use 1: OpenMP thread teams stall when one of their threads is descheduled
  (measured here: ResNet18 forward 10x slower with 2 threads than with 1 at load 11 on 2 cores).
- Hugging Face stays offline: every model here is built from a config with random weights.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    disabled = False
    try:
        disabled = bool(config.getoption("benchmark_disable"))
    except ValueError:  # pytest-benchmark not installed: the suites skip themselves
        pass
    if disabled and os.environ.get("MEGL_BENCH_QUICK", "") == "":
        os.environ["MEGL_BENCH_QUICK"] = "1"
    threads = os.environ.get("MEGL_BENCH_THREADS", "")
    if threads == "" and os.environ.get("MEGL_BENCH_QUICK", "0") not in ("", "0"):
        threads = "1"  # the smoke run: one thread is robust on a shared CI runner
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))


def pytest_report_header(config):
    import torch

    import benchutil

    mode = "quick (small shapes)" if benchutil.quick() else "full"
    cuda = torch.cuda.get_device_name() if benchutil.has_cuda() else "none"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return [f"megl benchmarks: mode={mode}, cuda={cuda}, cpu threads={torch.get_num_threads()}, "
            f"nproc={os.cpu_count()}, load(1m)={load:.2f}"]
