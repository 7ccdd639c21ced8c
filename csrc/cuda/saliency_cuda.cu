// megl._saliency_cuda: launches the CUDA kernels of the fused saliency op (kernels.cuh) on torch's current stream,
// and binds them, and the host emulation (emulation.cuh), with pybind11. Layout of csrc/cuda/:
//   math.cuh        per-element math, __host__ __device__ (shared by the kernels and the emulation)
//   kernels.cuh     the kernels: launch constants, block reductions, __global__ functions
//   args.cuh        host-side checks, workspace sizes, raw pointers -> FwdArgs / BwdArgs
//   emulation.cuh   serial CPU versions of forward / backward built from math.cuh, for tests without a GPU
//
// No libtorch: the Python glue (megl/ops/backends/cuda.py) passes raw device pointers (0 = absent), shapes, a
// dtype code, eps values, a device index and the current torch stream as an integer; all outputs and one float32
// workspace are preallocated by the glue. The contract and executable spec is megl/ops/backends/torch_explicit.py;
// the math is written up in docs/fused-op.md.
//
// Inputs A, G, I, s, grads are float / __half / __nv_bfloat16 (dtype code 0 / 1 / 2); everything else is float32;
// has_mask is a torch.bool buffer (one byte per sample). Arithmetic is float32 throughout.
//
// Forward, per sample b (kernels launched in this order on the given stream):
//   fwd_cam_kernel       one block per sample: alpha (warp per k), z (split-k over the block), min/max of
//                        c = relu(z), n = (c - m) / (M - m + eps) into the workspace (B, h, w).
//   fwd_pixel_kernel     grid (tiles, B): s = bilinear(n), masked = I * s, and per-block partial sums of
//                        |s - mask|, Sp = sum(s + eps_kl) and (sample 0's blocks) Sq = sum(prior + eps_kl).
//   fwd_kl_kernel        (only with a prior) grid (tiles, B): reduces Sp, Sq from the partials, then partial sums
//                        of p log(p / q), p = (s + eps_kl) / Sp, q = (prior + eps_kl) / Sq, s recomputed from n.
//   fwd_finalize_kernel  one block per sample: reduces the partials in tile order -> l1, kl, stats[2:4].
// KL in two passes (docs/fused-op.md, "KL in float32"): with Sp, Sq known every term p log(p/q) is small.
// Backward:
//   bwd_pixel_kernel     grid (tiles, B): g_s (all terms but the per-sample constant -coef * kl of the KL term),
//                        gI, and per-block partials of kl = sum p log(p / q) (recomputed from the stored s, as
//                        torch_explicit does: the contract does not pass kl to backward).
//   bwd_gather_kernel    warp per low-res cell: g_n = upsample^T(g_s + cb) as a gather over the output pixels
//                        whose bilinear taps touch the cell (adjoint_range in math.cuh); cb = -coef * kl per sample.
//   bwd_cell_kernel      one block per sample: min/max tie terms, g_z (in place over g_n).
//   bwd_gradk_kernel     warp per (b, k): gG = <g_z, A_k> / (h w) broadcast, gA = alpha_k g_z.
//

#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include "args.cuh"
#include "emulation.cuh"

namespace megl {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("megl._saliency_cuda: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err) +
                             ". Check that the GPU's architecture is among those the extension was built for "
                             "(TORCH_CUDA_ARCH_LIST at install time) and that the driver supports this CUDA "
                             "version; an earlier asynchronous error on this device also surfaces here "
                             "(rerun with CUDA_LAUNCH_BLOCKING=1 to find it).");
  }
}

// Makes `device` current in this extension's own (static) CUDA runtime, which does not see torch's device guard
// as state of its own. Both runtimes use the device's primary context, and the glue calls this inside
// `with torch.cuda.device(device)`, so this only re-asserts what torch already made current: nothing to restore
// (restoring a stale "previous" device of this runtime would switch torch's context under it).
void use_device(int device) {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (device < 0 || device >= count)
    fail("device index " + std::to_string(device) + " is out of range (" + std::to_string(count) + " CUDA devices visible)");
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) check_cuda(err, (std::string("launching ") + kernel).c_str());
}

unsigned grid_y(int B) { return (unsigned)std::min(B, MAX_GRID_Y); }

template <typename T>
void launch_forward(const FwdArgs<T>& a, const Dims& d, cudaStream_t st) {
  fwd_cam_kernel<T, NT_CAM><<<(unsigned)d.B, NT_CAM, 0, st>>>(a, d);
  check_launch("fwd_cam_kernel");
  fwd_pixel_kernel<T, NT_PIX><<<dim3((unsigned)d.tiles, grid_y(d.B)), NT_PIX, 0, st>>>(a, d);
  check_launch("fwd_pixel_kernel");
  if (a.prior != nullptr) {
    fwd_kl_kernel<T, NT_PIX><<<dim3((unsigned)d.tiles, grid_y(d.B)), NT_PIX, 0, st>>>(a, d);
    check_launch("fwd_kl_kernel");
  }
  // same NT as fwd_kl_kernel: reduce_tiles() then gives it the same Sp, Sq bits
  fwd_finalize_kernel<T, NT_PIX><<<(unsigned)d.B, NT_PIX, 0, st>>>(a, d);
  check_launch("fwd_finalize_kernel");
}

template <typename T>
void launch_backward(const BwdArgs<T>& a, const Dims& d, cudaStream_t st) {
  constexpr int WPB = NT_WARPS / 32;
  bwd_pixel_kernel<T, NT_PIX><<<dim3((unsigned)d.tiles, grid_y(d.B)), NT_PIX, 0, st>>>(a, d);
  check_launch("bwd_pixel_kernel");
  const int64_t cells = (int64_t)d.B * d.hw;
  const int64_t gblocks = (cells + WPB - 1) / WPB;
  if (gblocks > INT_MAX) fail("B * h * w is too large for the gather kernel's grid");
  bwd_gather_kernel<T, NT_WARPS><<<(unsigned)gblocks, NT_WARPS, 0, st>>>(a, d);
  check_launch("bwd_gather_kernel");
  bwd_cell_kernel<T, NT_CELL><<<(unsigned)d.B, NT_CELL, 0, st>>>(a, d);
  check_launch("bwd_cell_kernel");
  if (d.K > 0) {
    bwd_gradk_kernel<T, NT_WARPS><<<dim3((unsigned)((d.K + WPB - 1) / WPB), grid_y(d.B)), NT_WARPS, 0, st>>>(a, d);
    check_launch("bwd_gradk_kernel");
  }
}

// Calls f(T{}) with T the element type of dtype code 0 / 1 / 2.
template <typename F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__half{});
    case 2: return f(__nv_bfloat16{});
    default: check_dtype(dtype);
  }
}

// What every launch checks before it touches the GPU; false when there is nothing to launch (B = 0).
bool ready_to_launch(const Dims& d, int dtype, std::uintptr_t mask, std::uintptr_t has_mask, int64_t workspace_numel,
                     int64_t workspace_needed, int device) {
  check_dtype(dtype);
  if (d.B == 0) return false;
  check_common(mask, has_mask);
  if (workspace_numel < workspace_needed) fail("workspace too small; size it with forward_workspace() / backward_workspace()");
  use_device(device);
  return true;
}

void forward_py(int dtype, int64_t B, int64_t K, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W,
                std::uintptr_t A, std::uintptr_t G, std::uintptr_t I, std::uintptr_t mask, std::uintptr_t has_mask,
                std::uintptr_t prior, double eps, double eps_kl, std::uintptr_t s, std::uintptr_t masked,
                std::uintptr_t l1, std::uintptr_t kl, std::uintptr_t alpha, std::uintptr_t cam, std::uintptr_t stats,
                std::uintptr_t workspace, int64_t workspace_numel, int device, std::uintptr_t stream) {
  const Dims d = make_dims(B, K, h, w, C, H, W);
  if (B > 0) {
    require_all({{s, "saliency"}, {l1, "l1"}, {kl, "kl"}, {cam, "cam"}, {stats, "stats"}, {workspace, "workspace"}});
    if (K > 0) require_all({{A, "activations"}, {G, "gradients"}, {alpha, "alpha"}});  // K = 0: empty tensors
    if (C > 0) require_all({{I, "image"}, {masked, "masked"}});
  }
  if (!ready_to_launch(d, dtype, mask, has_mask, workspace_numel, forward_workspace(B, K, h, w, C, H, W), device)) return;
  float* nbuf = mptr<float>(workspace);
  float* partials = nbuf + B * d.hw;
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    launch_forward(fwd_args<T>(A, G, I, mask, has_mask, prior, eps, eps_kl, s, masked, l1, kl, alpha, cam, stats, nbuf,
                               partials), d, reinterpret_cast<cudaStream_t>(stream));
  });
}

void backward_py(int dtype, int64_t B, int64_t K, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W,
                 std::uintptr_t grad_s, std::uintptr_t grad_masked, std::uintptr_t grad_l1, std::uintptr_t grad_kl,
                 std::uintptr_t A, std::uintptr_t I, std::uintptr_t mask, std::uintptr_t has_mask,
                 std::uintptr_t prior, std::uintptr_t s, std::uintptr_t alpha, std::uintptr_t cam,
                 std::uintptr_t stats, double eps, double eps_kl, std::uintptr_t gA, std::uintptr_t gG,
                 std::uintptr_t gI, std::uintptr_t workspace, int64_t workspace_numel, int device,
                 std::uintptr_t stream) {
  const Dims d = make_dims(B, K, h, w, C, H, W);
  if (B > 0) {
    require_all({{grad_l1, "grad_l1"}, {grad_kl, "grad_kl"}, {s, "saliency"}, {cam, "cam"}, {stats, "stats"},
                 {workspace, "workspace"}});
    if (K > 0) require_all({{A, "activations"}, {alpha, "alpha"}, {gA, "grad_activations"}, {gG, "grad_gradients"}});
    if (C > 0) require_all({{I, "image"}, {gI, "grad_image"}});
  }
  if (!ready_to_launch(d, dtype, mask, has_mask, workspace_numel, backward_workspace(B, K, h, w, C, H, W), device))
    return;
  float* gsw = mptr<float>(workspace);
  float* gn = gsw + B * d.HW;
  float* partials = gn + B * d.hw;
  with_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    launch_backward(bwd_args<T>(grad_s, grad_masked, grad_l1, grad_kl, A, I, mask, has_mask, prior, s, alpha, cam,
                                stats, eps, eps_kl, gA, gG, gI, gsw, gn, partials), d,
                    reinterpret_cast<cudaStream_t>(stream));
  });
}

int runtime_version() {
  int v = 0;
  check_cuda(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
  return v;
}

}  // namespace megl

PYBIND11_MODULE(_saliency_cuda, m) {
  using namespace megl;
  namespace py = pybind11;
  m.doc() =
      "CUDA kernels of megl's fused saliency op (raw device pointers; no libtorch). Use it through "
      "megl.ops.fused_saliency(..., backend='cuda'); megl/ops/backends/cuda.py is the glue.";
  m.attr("DTYPE_FLOAT32") = 0;
  m.attr("DTYPE_FLOAT16") = 1;
  m.attr("DTYPE_BFLOAT16") = 2;
  m.def("forward_workspace", &forward_workspace, "float32 workspace elements forward() needs", py::arg("B"),
        py::arg("K"), py::arg("h"), py::arg("w"), py::arg("C"), py::arg("H"), py::arg("W"));
  m.def("backward_workspace", &backward_workspace, "float32 workspace elements backward() needs", py::arg("B"),
        py::arg("K"), py::arg("h"), py::arg("w"), py::arg("C"), py::arg("H"), py::arg("W"));
  m.def("forward", &forward_py, "Launch the forward kernels on `stream` (asynchronous)", py::arg("dtype"),
        py::arg("B"), py::arg("K"), py::arg("h"), py::arg("w"), py::arg("C"), py::arg("H"), py::arg("W"),
        py::arg("A"), py::arg("G"), py::arg("I"), py::arg("mask"), py::arg("has_mask"), py::arg("prior"),
        py::arg("eps"), py::arg("eps_kl"), py::arg("s"), py::arg("masked"), py::arg("l1"), py::arg("kl"),
        py::arg("alpha"), py::arg("cam"), py::arg("stats"), py::arg("workspace"), py::arg("workspace_numel"),
        py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward_py, "Launch the backward kernels on `stream` (asynchronous)", py::arg("dtype"),
        py::arg("B"), py::arg("K"), py::arg("h"), py::arg("w"), py::arg("C"), py::arg("H"), py::arg("W"),
        py::arg("grad_s"), py::arg("grad_masked"), py::arg("grad_l1"), py::arg("grad_kl"), py::arg("A"),
        py::arg("I"), py::arg("mask"), py::arg("has_mask"), py::arg("prior"), py::arg("s"), py::arg("alpha"),
        py::arg("cam"), py::arg("stats"), py::arg("eps"), py::arg("eps_kl"), py::arg("gA"), py::arg("gG"),
        py::arg("gI"), py::arg("workspace"), py::arg("workspace_numel"), py::arg("device"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("host_forward", &host_forward_py,
        "Serial CPU emulation of forward (float32 CPU pointers), sharing the kernels' per-element code; for tests",
        py::arg("B"), py::arg("K"), py::arg("h"), py::arg("w"), py::arg("C"), py::arg("H"), py::arg("W"),
        py::arg("A"), py::arg("G"), py::arg("I"), py::arg("mask"), py::arg("has_mask"), py::arg("prior"),
        py::arg("eps"), py::arg("eps_kl"), py::arg("s"), py::arg("masked"), py::arg("l1"), py::arg("kl"),
        py::arg("alpha"), py::arg("cam"), py::arg("stats"));
  m.def("host_backward", &host_backward_py,
        "Serial CPU emulation of backward (float32 CPU pointers), sharing the kernels' per-element code; for tests",
        py::arg("B"), py::arg("K"), py::arg("h"), py::arg("w"), py::arg("C"), py::arg("H"), py::arg("W"),
        py::arg("grad_s"), py::arg("grad_masked"), py::arg("grad_l1"), py::arg("grad_kl"), py::arg("A"),
        py::arg("I"), py::arg("mask"), py::arg("has_mask"), py::arg("prior"), py::arg("s"), py::arg("alpha"),
        py::arg("cam"), py::arg("stats"), py::arg("eps"), py::arg("eps_kl"), py::arg("gA"), py::arg("gG"),
        py::arg("gI"));
  m.def("runtime_version", &runtime_version, "CUDA runtime version the extension was linked with (e.g. 13000)");
}
