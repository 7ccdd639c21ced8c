"""The one-command GPU check (benchmarks/gpu_check.py) on a machine without CUDA: it plans, and its plan is sound."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_plan_names_every_claim_and_existing_files(tmp_path):
    plan = gpu_check.steps(tmp_path, sys.executable)
    assert [s["name"] for s in plan] == ["build", "op-tests", "compile", "kernels", "table5", "train", "report"]
    for s in plan:
        for arg in s["cmd"]:
            if isinstance(arg, str) and arg.startswith(("tests/", "benchmarks/")):
                assert (ROOT / arg).exists(), arg
    op_tests = next(s for s in plan if s["name"] == "op-tests")
    assert "tests/test_saliency_matrix.py" in op_tests["cmd"]
    assert op_tests["env"]["TRITON_INTERPRET"] == "0"  # compiled Triton on the GPU, not the interpreter


def test_without_cuda_it_says_what_it_would_run_and_exits_0(tmp_path):
    if torch.cuda.is_available():
        return
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "gc")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "no CUDA device visible" in res.stdout and "table5" in res.stdout
    assert not (tmp_path / "gc").exists()  # nothing written


def test_unknown_step_is_one_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--only", "nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown step(s) nope" in res.stderr and "Traceback" not in res.stderr


def test_summary_shows_failures_with_their_tail():
    results = {"build": {"status": "passed", "seconds": 1.0, "what": "b", "tail": ""},
               "compile": {"status": "failed", "seconds": 2.0, "what": "c", "tail": "AssertionError: cuda"}}
    md = gpu_check.summary_md({"device": "H200"}, results)
    assert "| compile | failed | 2.0 | c |" in md and "## compile: last lines" in md and "AssertionError: cuda" in md
    assert "## build" not in md


def test_a_step_past_its_limit_is_reported_not_hung(tmp_path):
    step = {"name": "slow", "env": {}, "what": "sleeps", "cmd": [sys.executable, "-c", "import time; time.sleep(30)"]}
    r = gpu_check.run_step(step, tmp_path, timeout=1)
    assert r["status"] == "timed out after 1 s" and r["seconds"] < 20
