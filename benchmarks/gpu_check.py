"""Every GPU-side claim of megl, checked by one command on a CUDA machine:

    python benchmarks/gpu_check.py --out DIR        # from the repository root; about 8 minutes on an H100/H200

Steps, each a subprocess with its own time limit, run in order (a failed step does not stop the next):

  build      the extensions in place for the visible GPU (MEGL_REQUIRE_CUDA=1: a CUDA build failure is a failure)
  op-tests   the op's tests on CUDA: cuda and triton backends against the reference, fp32 / bf16 / fp16
  compile    torch.compile(fullgraph=True) of the op on CUDA, fwd + bwd, every GPU backend vs eager reference
  kernels    kernel benchmarks against the eager and compiled reference, with achieved GB/s
  table5     paper Table 5 (MEGL-ResNet18, MEGL-ViT-B/16, LLaVA-1.5-7B prefill) in bf16 at batch 1
  train      MEGL training steps on CUDA with the tiny CLIP and LLM (flash-attention when it imports)
  report     the benchmark JSON as Markdown tables (python -m megl.bench_report)

It writes DIR/gpu_check.json (per step: status, seconds, exit code, the output's tail) and DIR/gpu_check.md, plus
each step's full log and the benchmark JSON. On a machine without CUDA it says what it would run and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The matrix runs its cuda / compiled-Triton / low-precision columns only where a GPU is; test_backend_triton.py is
# left out: it checks the CPU interpreter path, which TRITON_INTERPRET=0 turns off.
OP_TESTS = ["tests/test_saliency_matrix.py", "tests/test_backend_cuda.py", "tests/test_ops.py"]

COMPILE_CHECK = r"""
import torch
from megl.ops import fused_saliency, available_backends
torch.manual_seed(0)
dev = "cuda"
B, K, h, w, H, W = 8, 256, 7, 7, 224, 224
for dtype in (torch.float32, torch.bfloat16):
    A = torch.randn(B, K, h, w, device=dev, dtype=dtype, requires_grad=True)
    G = torch.randn(B, K, h, w, device=dev, dtype=dtype, requires_grad=True)
    I = torch.rand(B, 3, H, W, device=dev, dtype=dtype, requires_grad=True)
    mask = (torch.rand(B, H, W, device=dev) > 0.5).float()
    has = torch.arange(B, device=dev) % 2 == 0
    prior = torch.rand(H, W, device=dev)
    def loss(backend):
        out = fused_saliency(A, G, I, mask=mask, has_mask=has, prior=prior, backend=backend)
        return out.l1.sum() + out.kl.sum() + (out.masked.float() * 0.5).sum()
    ref = loss("reference")
    ref_grads = torch.autograd.grad(ref, (A, G, I))
    for backend in [b for b in available_backends() if b in ("cuda", "triton", "torch")]:
        f = torch.compile(lambda: loss(backend), fullgraph=True)
        val = f()
        grads = torch.autograd.grad(val, (A, G, I))
        err = max(float((g.float() - r.float()).abs().max() / (r.float().abs().max() + 1e-6))
                  for g, r in zip(grads, ref_grads))
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        ok = abs(float(val - ref)) <= tol * (abs(float(ref)) + 1) and err <= tol
        print(f"compile {backend} {dtype}: loss {float(val):.6g} vs eager reference {float(ref):.6g}, "
              f"max rel grad err {err:.2e} -> {'ok' if ok else 'MISMATCH'}")
        assert ok, (backend, dtype)
"""


def steps(out: Path, python: str) -> list[dict]:
    tests = [t for t in OP_TESTS if (ROOT / t).exists()]
    gpu_env = {"TRITON_INTERPRET": "0", "MEGL_BENCH_THREADS": "8"}  # tests/conftest.py defaults it to 1
    return [
        dict(name="build", timeout=240, env={"MEGL_REQUIRE_CUDA": "1"},
             cmd=[python, "setup.py", "build_ext", "--inplace"],
             what="compile megl._saliency_cpu and megl._saliency_cuda for the visible GPU"),
        dict(name="op-tests", timeout=240, env=gpu_env,
             cmd=[python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *tests,
                  f"--junitxml={out / 'op-tests.xml'}"],
             what="the op's test matrix on CUDA (cuda, triton, torch backends; fp32, bf16, fp16)"),
        dict(name="compile", timeout=180, env=gpu_env, cmd=[python, "-c", COMPILE_CHECK],
             what="torch.compile(fullgraph=True) of the op, fwd+bwd, each GPU backend vs the eager reference"),
        dict(name="kernels", timeout=180, env=gpu_env,
             cmd=[python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_bench_kernels.py",
                  "--benchmark-only", f"--benchmark-json={out / 'kernels.json'}"],
             what="kernel latency vs eager and torch.compile reference, achieved GB/s (B=64, fp32 and bf16)"),
        dict(name="table5", timeout=300, env=gpu_env,
             cmd=[python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_bench_table5.py",
                  "--benchmark-only", f"--benchmark-json={out / 'table5.json'}"],
             what="paper Table 5 at bf16, batch 1: MEGL-ResNet18, MEGL-ViT-B/16, LLaVA-1.5-7B prefill"),
        dict(name="train", timeout=180, env=gpu_env,
             cmd=[python, "-m", "megl.train", "--device", "cuda", "--epochs", "1", "--no-progress",
                  "--set", "max_steps_per_epoch=5", "--set", "num_overlays=0", "--out", str(out / "train-run")],
             what="MEGL training steps on CUDA (tiny CLIP + tiny LLM, flash-attention 2 when flash_attn imports)"),
        dict(name="report", timeout=60, env={},
             cmd=["sh", "-c", " && ".join(
                 f"{{ [ ! -f {out / j}.json ] || {python} -m megl.bench_report {out / j}.json --out {out / j}.md; }}"
                 for j in ("kernels", "table5"))],
             what="Markdown tables of the benchmark JSON"),
    ]


def run_step(step: dict, out: Path, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", **step["env"])
    log = out / f"{step['name']}.log"
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(step["cmd"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, f"timed out after {timeout:.0f} s"
    text = log.read_text(errors="replace")
    return {"status": status, "rc": rc, "seconds": round(time.time() - t0, 1), "what": step["what"],
            "tail": text[-3000:]}


def summary_md(env: dict, results: dict) -> str:
    lines = ["# megl GPU check", "", f"- device: {env.get('device')}", f"- torch {env.get('torch')}, "
             f"CUDA {env.get('cuda')}, triton {env.get('triton')}, flash_attn {env.get('flash_attn')}", "",
             "| step | status | seconds | what |", "|---|---|---:|---|"]
    lines += [f"| {n} | {r['status']} | {r['seconds']} | {r['what']} |" for n, r in results.items()]
    for name, r in results.items():
        if r["status"] != "passed":
            lines += ["", f"## {name}: last lines", "", "```", *r["tail"].splitlines()[-25:], "```"]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import importlib.util

    import torch

    def version(mod):
        if importlib.util.find_spec(mod) is None:
            return "not installed"
        try:
            return __import__(mod).__version__
        except Exception as err:  # a broken build (flash-attn) is worth reporting, not fatal
            return f"broken ({type(err).__name__})"

    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "triton": version("triton"), "flash_attn": version("flash_attn")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json, gpu_check.md and logs")
    ap.add_argument("--only", help="comma-separated step names (default: all)")
    ap.add_argument("--budget", type=float, default=540,
                    help="seconds for all steps together (default 540: one 10-minute device command with room to "
                         "spare); a step gets what is left, at most its own limit")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    args = ap.parse_args(argv)
    plan = steps(args.out.resolve(), sys.executable)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s["name"] for s in plan}
        if unknown:
            ap.error(f"--only: unknown step(s) {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(s['name'] for s in plan)}")
        plan = [s for s in plan if s["name"] in wanted]
    env = environment()
    if args.dry_run or env["device"] is None:
        if env["device"] is None:
            print("gpu_check: no CUDA device visible (torch.cuda.is_available() is False); on a CUDA machine "
                  "this would run:")
        for s in plan:
            print(f"  {s['name']:<9} ({s['timeout']:>3} s max) {s['what']}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results, deadline = {}, time.time() + args.budget
    for s in plan:
        left = deadline - time.time()
        if left < 10:
            results[s["name"]] = {"status": "not run (budget spent)", "rc": None, "seconds": 0, "what": s["what"],
                                  "tail": ""}
        else:
            print(f"gpu_check: {s['name']}: {s['what']} ...", flush=True)
            results[s["name"]] = r = run_step(s, args.out.resolve(), min(s["timeout"], left))
            print(f"gpu_check: {s['name']}: {r['status']} in {r['seconds']} s", flush=True)
        # rewritten after every step: a run cut short still leaves what it measured
        (args.out / "gpu_check.json").write_text(json.dumps({"environment": env, "steps": results}, indent=2))
        (args.out / "gpu_check.md").write_text(summary_md(env, results))
    print((args.out / "gpu_check.md").read_text())
    return 0 if all(r["status"] == "passed" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
