"""Builds megl's compiled backends. Neither module links libtorch, so the wheel works with any torch.

- megl._saliency_cpu: C++/OpenMP kernels + pybind11 bindings (always).
- megl._saliency_cuda: CUDA kernels compiled by nvcc + pybind11 bindings, linked against the static CUDA
  runtime, built when nvcc is found (CUDA_HOME, then PATH). MEGL_SKIP_CUDA=1 skips it.
  TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0+PTX") picks the GPU architectures; default: Ampere and Hopper.
"""
import os
import shutil
import subprocess
import sys

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def find_nvcc():
    if os.environ.get("MEGL_SKIP_CUDA", "0") not in ("", "0"):
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def gencode_flags(arch_list):
    flags = []
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.removesuffix("+PTX").replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc, everything else with the host compiler (with OpenMP)."""

    def build_extension(self, ext):
        if not any(src.endswith(".cu") for src in ext.sources):
            return super().build_extension(ext)
        nvcc = ext.nvcc
        objects = []
        os.makedirs(self.build_temp, exist_ok=True)
        for src in ext.sources:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
                   "-Xcompiler", "-fvisibility=hidden", *[f"-I{d}" for d in ext.include_dirs],
                   f"-I{sysconfig_include()}", *gencode_flags(os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS))]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(obj)
        cuda_lib = os.path.join(os.path.dirname(os.path.dirname(nvcc)), "lib64")
        self.compiler.link_shared_object(
            objects, self.get_ext_fullpath(ext.name), library_dirs=[cuda_lib],
            libraries=["cudart_static", "dl", "rt", "pthread"], target_lang="c++",
        )


def sysconfig_include():
    import sysconfig
    return sysconfig.get_paths()["include"]


openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
ext_modules = [
    Extension(
        "megl._saliency_cpu",
        sources=["csrc/saliency_cpu.cpp"],
        depends=["csrc/saliency_cpu_kernels.h"],  # included twice (generic + AVX2), see saliency_cpu.cpp
        include_dirs=[pybind11.get_include()],
        language="c++",
        extra_compile_args=["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", *openmp],  # -g0: no debug info (5 MB)
        extra_link_args=openmp,
    )
]
nvcc = find_nvcc()
if nvcc:
    cuda_ext = Extension("megl._saliency_cuda", sources=["csrc/saliency_cuda.cu"], include_dirs=[pybind11.get_include()])
    cuda_ext.nvcc = nvcc
    ext_modules.append(cuda_ext)
else:
    print("megl: nvcc not found (or MEGL_SKIP_CUDA=1): building without the CUDA backend", flush=True)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
