"""Builds megl's compiled backends. Neither module links libtorch, so the wheel works with any torch.

- megl._saliency_cpu: C++/OpenMP kernels + pybind11 bindings (always).
- megl._saliency_cuda: CUDA kernels compiled by nvcc + pybind11 bindings, linked against the static CUDA runtime.
  Optional: built when a CUDA toolkit and a GPU architecture to build for are found (see cuda_build.py for the
  search order and the architecture policy). When it cannot be built, the install goes on without it and says why;
  MEGL_REQUIRE_CUDA=1 makes that an error, MEGL_SKIP_CUDA=1 skips it.
"""
import json
import os
import subprocess
import sys
import sysconfig

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # build isolation does not put it there
import cuda_build  # noqa: E402

REQUIRE_CUDA = cuda_build.env_flag(os.environ, "MEGL_REQUIRE_CUDA")
BUILD_INFO = {"cuda_skipped": None}  # installed as megl/_build_info.json: the cuda backend's error repeats the reason


def skip_cuda(reason: str) -> None:
    """One line on stderr (pip shows it with -v), or a failed install under MEGL_REQUIRE_CUDA=1."""
    if REQUIRE_CUDA:
        sys.exit(f"megl: MEGL_REQUIRE_CUDA=1 but the CUDA module cannot be built: {reason}")
    print(f"megl: building without the CUDA backend: {reason}", file=sys.stderr, flush=True)
    BUILD_INFO["cuda_skipped"] = reason


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc, everything else with the host compiler (with OpenMP). A failed CUDA build
    is skipped (the CPU module is what every install needs), unless MEGL_REQUIRE_CUDA=1."""

    def run(self):
        super().run()
        out = os.path.join(os.path.dirname(self.get_ext_fullpath("megl._saliency_cpu")), "_build_info.json")
        with open(out, "w") as f:
            json.dump(BUILD_INFO, f)

    def build_extension(self, ext):
        if not any(src.endswith(".cu") for src in ext.sources):
            return super().build_extension(ext)
        try:
            self.build_cuda(ext)
        except Exception as err:  # nvcc or the linker failed: name it, keep the CPU build
            skip_cuda(f"{type(err).__name__}: {err}")

    def build_cuda(self, ext):
        objects = []
        os.makedirs(self.build_temp, exist_ok=True)
        for src in ext.sources:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [ext.nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                   "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
                   *[f"-I{d}" for d in ext.include_dirs], f"-I{sysconfig.get_paths()['include']}",
                   *cuda_build.gencode_flags(ext.archs)]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(obj)
        self.compiler.link_shared_object(
            objects, self.get_ext_fullpath(ext.name), library_dirs=[ext.cuda_lib],
            libraries=["cudart_static", "dl", "rt", "pthread"], target_lang="c++",
        )


openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
ext_modules = [
    Extension(
        "megl._saliency_cpu",
        sources=["csrc/cpu/saliency_cpu.cpp"],
        depends=["csrc/cpu/kernels.h"],  # included twice (generic + AVX2), see saliency_cpu.cpp
        include_dirs=[pybind11.get_include()],
        language="c++",
        extra_compile_args=["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", *openmp],  # -g0: no debug info (5 MB)
        extra_link_args=openmp,
    )
]
try:
    nvcc, cuda_root, cuda_lib = cuda_build.find_cuda()
    archs = cuda_build.cuda_archs()
except cuda_build.CudaSkipped as skipped:
    skip_cuda(str(skipped))
else:
    print(f"megl: building the CUDA backend with {nvcc} for {';'.join(archs)}", file=sys.stderr, flush=True)
    cuda_ext = Extension("megl._saliency_cuda", sources=["csrc/cuda/saliency_cuda.cu"], include_dirs=[pybind11.get_include()])
    cuda_ext.nvcc, cuda_ext.cuda_lib, cuda_ext.archs = nvcc, cuda_lib, archs
    ext_modules.append(cuda_ext)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
