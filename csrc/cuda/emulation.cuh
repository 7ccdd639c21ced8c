// The host emulation of megl._saliency_cuda: the forward and backward pipelines run serially on float32 CPU
// pointers, calling the kernels' own __host__ __device__ functions (math.cuh) stage by stage, so that machines
// without a GPU test the math the GPU runs: taps, adjoint ranges, the Grad-CAM / min-max stage, the per-pixel and
// per-cell formulas. Only the parallel scaffolding (launch shapes, block reductions) is GPU-only. Sums over pixels
// go row by row in float, rows in double, so the summation error stays below the tests' tolerance.
#pragma once

#include <vector>

#include "args.cuh"

namespace megl {

void host_forward_py(int64_t B, int64_t K, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W, std::uintptr_t A,
                     std::uintptr_t G, std::uintptr_t I, std::uintptr_t mask, std::uintptr_t has_mask,
                     std::uintptr_t prior, double eps, double eps_kl, std::uintptr_t s, std::uintptr_t masked,
                     std::uintptr_t l1, std::uintptr_t kl, std::uintptr_t alpha, std::uintptr_t cam,
                     std::uintptr_t stats) {
  const Dims d = make_dims(B, K, h, w, C, H, W);
  check_common(mask, has_mask);
  std::vector<float> nbuf((size_t)(B * d.hw));
  FwdArgs<float> a = fwd_args<float>(A, G, I, mask, has_mask, prior, eps, eps_kl, s, masked, l1, kl, alpha, cam, stats,
                                     nbuf.data(), nullptr);
  double sq = 0.0;  // Sq = sum(prior + eps_kl), summed with sample 0's pixels as fwd_pixel_kernel does
  for (int64_t b = 0; b < d.B; ++b) {
    // fwd_cam_kernel: alpha, z, min / max of relu(z), n
    const float* Ab = a.A + b * d.K * d.hw;
    const float* Gb = a.G + b * d.K * d.hw;
    for (int k = 0; k < d.K; ++k) a.alpha[b * d.K + k] = strided_sum(Gb + (int64_t)k * d.hw, d.hw, 0, 1) / (float)d.hw;
    float lo = INFINITY, hi = -INFINITY;
    for (int ij = 0; ij < d.hw; ++ij) {
      const float z = cam_partial(a.alpha + b * d.K, Ab, d.hw, d.K, ij, 0, 1);
      a.cam[b * d.hw + ij] = z;
      minmax_relu(z, lo, hi);
    }
    a.stats[b * 4 + 0] = lo;
    a.stats[b * 4 + 1] = hi;
    for (int ij = 0; ij < d.hw; ++ij) a.nbuf[b * d.hw + ij] = normalised(a.cam[b * d.hw + ij], lo, hi, a.eps);
    // fwd_pixel_kernel: s, masked and the sums of |s - mask|, s + eps_kl (and prior + eps_kl for sample 0)
    const bool hm = sample_has_mask(a.has_mask, b);
    const bool do_l1 = a.mask != nullptr && hm, do_kl = a.prior != nullptr && !hm, with_q = b == 0 && a.prior != nullptr;
    double tot[3] = {0.0, 0.0, 0.0};
    for (int y = 0; y < d.H; ++y) {
      float v[3] = {0.f, 0.f, 0.f};
      for (int x = 0; x < d.W; ++x) fwd_pixel(a, d, b, y * d.W + x, do_l1, with_q, v);
      for (int i = 0; i < 3; ++i) tot[i] += v[i];
    }
    if (with_q) sq = tot[2];
    // fwd_kl_kernel and fwd_finalize_kernel
    double kl = 0.0;
    if (do_kl) {
      float lpq;
      for (int y = 0; y < d.H; ++y) {
        float row = 0.f;
        for (int x = 0; x < d.W; ++x) {
          const int q = y * d.W + x;
          row += kl_term(saliency_at(a.nbuf, d, b, q), a.prior[q], a.eps_kl, (float)tot[1], (float)sq, lpq);
        }
        kl += row;
      }
    }
    finalize_sample((float)tot[0], (float)tot[1], (float)sq, (float)kl, do_l1, do_kl, a.prior != nullptr, d.HW,
                    a.l1 + b, a.kl + b, a.stats + b * 4);
  }
}

void host_backward_py(int64_t B, int64_t K, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W,
                      std::uintptr_t grad_s, std::uintptr_t grad_masked, std::uintptr_t grad_l1,
                      std::uintptr_t grad_kl, std::uintptr_t A, std::uintptr_t I, std::uintptr_t mask,
                      std::uintptr_t has_mask, std::uintptr_t prior, std::uintptr_t s, std::uintptr_t alpha,
                      std::uintptr_t cam, std::uintptr_t stats, double eps, double eps_kl, std::uintptr_t gA,
                      std::uintptr_t gG, std::uintptr_t gI) {
  const Dims d = make_dims(B, K, h, w, C, H, W);
  check_common(mask, has_mask);
  std::vector<float> gsw((size_t)(B * d.HW)), gn((size_t)(B * d.hw));
  BwdArgs<float> a = bwd_args<float>(grad_s, grad_masked, grad_l1, grad_kl, A, I, mask, has_mask, prior, s, alpha, cam,
                                     stats, eps, eps_kl, gA, gG, gI, gsw.data(), gn.data(), nullptr);
  for (int64_t b = 0; b < d.B; ++b) {
    // bwd_pixel_kernel
    const SampleCoef sc = sample_coef(a, d, b);
    double kl = 0.0;
    for (int y = 0; y < d.H; ++y) {
      float row = 0.f;
      for (int x = 0; x < d.W; ++x) bwd_pixel(a, d, b, y * d.W + x, sc, row);
      kl += row;
    }
    // bwd_gather_kernel
    const float cb = kl_shift(sc, (float)kl);
    for (int cell = 0; cell < d.hw; ++cell)
      a.gn[b * d.hw + cell] = gather_cell(a.gsw + b * d.HW, d, cell / d.w, cell % d.w, cb, 0, 1);
    // bwd_cell_kernel
    const float m = a.stats[b * 4 + 0], M = a.stats[b * 4 + 1];
    const float dd = (M - m) + a.eps;
    const float* camb = a.cam + b * d.hw;
    float* gz = a.gn + b * d.hw;
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    for (int ij = 0; ij < d.hw; ++ij) cell_terms(camb[ij], gz[ij], m, M, dd, v);
    for (int ij = 0; ij < d.hw; ++ij) gz[ij] = cell_gz(camb[ij], gz[ij], m, M, dd, v);
    // bwd_gradk_kernel
    for (int k = 0; k < d.K; ++k)
      store_gradk(a, d, b, k, dot_gz_A(gz, a.A + (b * d.K + k) * (int64_t)d.hw, d.hw, 0, 1), 0, 1);
  }
}

}  // namespace megl
