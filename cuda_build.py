"""Where setup.py finds the CUDA toolkit and which GPU architectures it compiles megl._saliency_cuda for.

The CUDA module is optional: when it cannot be built, `find_cuda()` / `cuda_archs()` raise `CudaSkipped` with the
reason, setup.py builds the CPU module alone and says why (an error instead with MEGL_REQUIRE_CUDA=1).

Toolkit root, first that holds bin/nvcc and the static runtime (lib64/ or lib/ libcudart_static.a):
  1. CUDA_HOME, else CUDA_PATH (taken as given: a wrong one is reported, not silently replaced);
  2. the toolkit behind the `nvcc` on PATH, following symlinks and wrapper scripts that exec the real nvcc;
  3. /usr/local/cuda.

Architectures (compile time grows with each one, minutes on a small CPU):
  1. TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX"), as torch's own extensions read it;
  2. else the GPUs visible to nvidia-smi, the newest also as PTX;
  3. else none: a machine without a GPU skips the module unless TORCH_CUDA_ARCH_LIST asks for one.

Plain Python with no third-party import, so tests can load it without running setup().
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Callable, Mapping, Optional

DEFAULT_ROOT = "/usr/local/cuda"
RUNTIME = "libcudart_static.a"
FIX = ("set CUDA_HOME to the toolkit (the folder with bin/nvcc and lib64/libcudart_static.a), "
       "or MEGL_SKIP_CUDA=1 to build without it")


class CudaSkipped(Exception):
    """The CUDA module will not be built; the message says why and how to change that."""


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def runtime_dir(root: str) -> Optional[str]:
    """The library folder of `root` that holds the static CUDA runtime, or None."""
    for lib in ("lib64", "lib"):
        if os.path.isfile(os.path.join(root, lib, RUNTIME)):
            return os.path.join(root, lib)
    return None


def problem(root: str) -> Optional[str]:
    """Why `root` is not a usable toolkit, or None when it is."""
    if not os.path.isfile(os.path.join(root, "bin", "nvcc")):
        return f"{root} has no bin/nvcc"
    if runtime_dir(root) is None:
        return f"{root} has no lib64/{RUNTIME}"
    return None


def roots_behind(nvcc: str) -> list[str]:
    """Candidate toolkit roots for an `nvcc` found on PATH: the folder above its real file (symlinks followed),
    then those of any absolute `.../bin/nvcc` that a small wrapper script names."""
    real = os.path.realpath(nvcc)
    roots = [os.path.dirname(os.path.dirname(real))]
    try:
        if os.path.getsize(real) < 64 * 1024:  # a script, not the nvcc binary (megabytes)
            with open(real, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            for m in re.finditer(r"(/[^\s'\"$;|&]*)/bin/nvcc\b", text):
                target = os.path.realpath(m.group(1) + "/bin/nvcc")
                if target != real:
                    roots.append(os.path.dirname(os.path.dirname(target)))
    except OSError:
        pass
    return list(dict.fromkeys(roots))


def find_cuda(environ: Mapping[str, str] = os.environ,
              which: Callable[[str], Optional[str]] = shutil.which) -> tuple[str, str, str]:
    """(nvcc, root, library dir) of the CUDA toolkit to build with; CudaSkipped when there is none."""
    if env_flag(environ, "MEGL_SKIP_CUDA"):
        raise CudaSkipped("MEGL_SKIP_CUDA is set")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = environ.get(var)
        if root:
            why = problem(root)
            if why:
                raise CudaSkipped(f"{var}={root} is not a CUDA toolkit ({why}); {FIX}")
            return os.path.join(root, "bin", "nvcc"), root, runtime_dir(root)
    tried = []
    nvcc = which("nvcc")
    for root in (roots_behind(nvcc) if nvcc else []) + [DEFAULT_ROOT]:
        why = problem(root)
        if why is None:
            return os.path.join(root, "bin", "nvcc"), root, runtime_dir(root)
        tried.append(why)
    where = f"nvcc on PATH is {nvcc}, but " if nvcc else "no nvcc on PATH, and "
    raise CudaSkipped(f"no CUDA toolkit found ({where}{'; '.join(tried)}); {FIX}")


def visible_gpu_archs(run=subprocess.run) -> list[str]:
    """Compute capabilities of the GPUs nvidia-smi sees ("9.0"), [] when there is none or no driver."""
    try:
        res = run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                  capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if res.returncode != 0:
        return []
    caps = {line.strip() for line in res.stdout.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip())}
    return sorted(caps, key=lambda c: tuple(int(x) for x in c.split(".")))


def cuda_archs(environ: Mapping[str, str] = os.environ, gpus: Callable[[], list[str]] = visible_gpu_archs) -> list[str]:
    """The architectures to compile for ("8.6", "9.0+PTX", ...); CudaSkipped when there is nothing to build for."""
    listed = environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if listed:
        archs = [a for a in re.split(r"[;, ]+", listed) if a]
        bad = [a for a in archs if not re.fullmatch(r"\d+\.\d+a?(\+PTX)?", a)]
        if bad:
            raise CudaSkipped(f"TORCH_CUDA_ARCH_LIST={listed!r}: cannot read {', '.join(bad)} "
                              "(write e.g. \"8.0;9.0+PTX\")")
        return archs
    found = gpus()
    if not found:
        raise CudaSkipped("no GPU visible (nvidia-smi) and TORCH_CUDA_ARCH_LIST unset; "
                          "set TORCH_CUDA_ARCH_LIST=\"8.0;9.0+PTX\" to build for GPUs this machine does not have")
    return found[:-1] + [found[-1] + "+PTX"]  # PTX of the newest runs on GPUs newer still


def gencode_flags(archs: list[str]) -> list[str]:
    flags = []
    for arch in archs:
        num = arch.removesuffix("+PTX").replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if arch.endswith("+PTX"):
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags
