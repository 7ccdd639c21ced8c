// CPU (C++17 + OpenMP) kernels of megl's fused saliency op (docs/fused-op.md); the executable spec is
// megl/ops/backends/torch_explicit.py. Bound with pybind11 as megl._saliency_cpu. No libtorch: the glue in
// megl/ops/backends/cpp.py passes data pointers (as integers) of contiguous float32 tensors, their shapes and
// preallocated outputs. A null pointer (0) stands for an absent optional tensor.
//
// Per sample the work splits into a tiny low-resolution part (alpha, cam, min/max, K x h x w) and one pass over
// the H x W pixels. The pixel pass is cut into tasks of kRowsPerTask output rows; every reduction is first summed
// per task and then over tasks in a fixed order, so results are bitwise identical for any number of threads
// (no float atomics anywhere).
//
// The kernels live in kernels.h, compiled here twice: `generic` (the compiler's baseline, SSE2 on
// x86-64) and `avx2` (8-wide; x86-64 with GCC only). The first call picks avx2 when the CPU has it; set_isa() pins
// one (tests compare both with the reference). Results agree to rounding: SIMD reductions sum in a width-dependent
// order, and each path on its own is deterministic for any thread count.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEGL_HAVE_AVX2_PATH 1
#else
#define MEGL_HAVE_AVX2_PATH 0
#endif

namespace {
namespace generic {
#include "kernels.h"
}  // namespace generic

#if MEGL_HAVE_AVX2_PATH
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#include "kernels.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

using generic::i64;

// -1: not chosen yet; 0: generic; 1: avx2.
int g_isa = -1;

bool cpu_has_avx2() {
#if MEGL_HAVE_AVX2_PATH
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

bool use_avx2() {
  if (g_isa < 0) g_isa = cpu_has_avx2() ? 1 : 0;
  return g_isa == 1;
}

const char* isa_name() { return use_avx2() ? "avx2" : "generic"; }

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_isa = cpu_has_avx2() ? 1 : 0;
  } else if (name == "generic") {
    g_isa = 0;
  } else if (name == "avx2") {
    if (!cpu_has_avx2())
      throw std::invalid_argument(MEGL_HAVE_AVX2_PATH ? "megl._saliency_cpu.set_isa: this CPU has no AVX2"
                                                      : "megl._saliency_cpu.set_isa: built without the AVX2 path "
                                                        "(it needs GCC on x86-64)");
    g_isa = 1;
  } else {
    throw std::invalid_argument("megl._saliency_cpu.set_isa: unknown ISA '" + name +
                                "'; choose 'auto', 'generic' or 'avx2'");
  }
}

// generic::fn or avx2::fn, the same source compiled for the ISA in use.
#if MEGL_HAVE_AVX2_PATH
#define MEGL_ISA_CALL(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : generic::fn(__VA_ARGS__))
#else
#define MEGL_ISA_CALL(fn, ...) generic::fn(__VA_ARGS__)
#endif

std::vector<std::string> available_isas() {
  std::vector<std::string> out{"generic"};
  if (cpu_has_avx2()) out.push_back("avx2");
  return out;
}

}  // namespace


PYBIND11_MODULE(_saliency_cpu, m) {
  m.doc() = "megl fused saliency op, C++/OpenMP CPU kernels (raw pointers to contiguous float32 tensors; 0 = None)";
  m.def(
      "forward",
      [](std::uintptr_t A, std::uintptr_t G, std::uintptr_t I, std::uintptr_t mask, std::uintptr_t has_mask,
         std::uintptr_t prior, i64 B, i64 K, i64 h, i64 w, i64 C, i64 H, i64 W, double eps, double eps_kl,
         std::uintptr_t s, std::uintptr_t masked, std::uintptr_t l1, std::uintptr_t kl, std::uintptr_t alpha,
         std::uintptr_t cam, std::uintptr_t stats, int num_threads) {
        py::gil_scoped_release release;
        MEGL_ISA_CALL(forward, A, G, I, mask, has_mask, prior, B, K, h, w, C, H, W, eps, eps_kl, s, masked, l1, kl,
                      alpha, cam, stats, num_threads);
      },
      py::arg("A"), py::arg("G"), py::arg("I"), py::arg("mask"), py::arg("has_mask"), py::arg("prior"), py::arg("B"),
      py::arg("K"), py::arg("h"), py::arg("w"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("eps"),
      py::arg("eps_kl"), py::arg("s"), py::arg("masked"), py::arg("l1"), py::arg("kl"), py::arg("alpha"),
      py::arg("cam"), py::arg("stats"), py::arg("num_threads") = 0,
      "Writes saliency (B,H,W), masked (B,C,H,W), l1, kl (B,), alpha (B,K), cam (B,h,w), stats (B,4).");
  m.def(
      "backward",
      [](std::uintptr_t grad_s, std::uintptr_t grad_masked, std::uintptr_t grad_l1, std::uintptr_t grad_kl,
         std::uintptr_t A, std::uintptr_t I, std::uintptr_t mask, std::uintptr_t has_mask, std::uintptr_t prior,
         std::uintptr_t s, std::uintptr_t alpha, std::uintptr_t cam, std::uintptr_t stats, i64 B, i64 K, i64 h, i64 w,
         i64 C, i64 H, i64 W, double eps, double eps_kl, std::uintptr_t gA, std::uintptr_t gG, std::uintptr_t gI,
         int num_threads) {
        py::gil_scoped_release release;
        MEGL_ISA_CALL(backward, grad_s, grad_masked, grad_l1, grad_kl, A, I, mask, has_mask, prior, s, alpha, cam,
                      stats, B, K, h, w, C, H, W, eps, eps_kl, gA, gG, gI, num_threads);
      },
      py::arg("grad_s"), py::arg("grad_masked"), py::arg("grad_l1"), py::arg("grad_kl"), py::arg("A"), py::arg("I"),
      py::arg("mask"), py::arg("has_mask"), py::arg("prior"), py::arg("s"), py::arg("alpha"), py::arg("cam"),
      py::arg("stats"), py::arg("B"), py::arg("K"), py::arg("h"), py::arg("w"), py::arg("C"), py::arg("H"),
      py::arg("W"), py::arg("eps"), py::arg("eps_kl"), py::arg("gA"), py::arg("gG"), py::arg("gI"),
      py::arg("num_threads") = 0,
      "Writes grad_activations, grad_gradients (B,K,h,w) and grad_image (B,C,H,W).");
  m.def("isa", &isa_name, "The kernel variant in use: 'avx2' or 'generic'.");
  m.def("set_isa", &set_isa, py::arg("name"), "Pin the kernel variant: 'auto', 'generic' or 'avx2'.");
  m.def("available_isas", &available_isas, "Kernel variants this build can run on this CPU.");
}
