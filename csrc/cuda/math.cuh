// The per-element math of megl's CUDA kernels: __host__ __device__ functions, so that the host emulation
// (emulation.cuh) runs the very code the GPU runs. Semantics: docs/fused-op.md; the executable spec is
// megl/ops/backends/torch_explicit.py. Arithmetic is float32 throughout; inputs may be float / __half / bfloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

namespace megl {

// ----------------------------------------------------------------------------------------- dtype conversions
template <typename T> __host__ __device__ __forceinline__ float to_f(T v);
template <> __host__ __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __host__ __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __host__ __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round to nearest even, as torch's .to(float16 / bfloat16).
template <typename T> __host__ __device__ __forceinline__ T from_f(float v);
template <> __host__ __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __host__ __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ----------------------------------------------------------------------------------------- shapes and arguments
struct Dims {
  int B, K, h, w, C, H, W;
  int hw, HW;
  float sh, sw;  // bilinear source scales h / H and w / W
  int tiles;     // pixel blocks per sample (grid.x of the pixel kernels)
};

template <typename T>
struct FwdArgs {
  const T* A;
  const T* G;
  const T* I;
  const float* mask;        // may be null
  const uint8_t* has_mask;  // may be null
  const float* prior;       // may be null
  float eps, eps_kl;
  T* s;
  T* masked;
  float* l1;
  float* kl;
  float* alpha;
  float* cam;
  float* stats;
  float* nbuf;      // workspace (B, h, w): normalised low-res map n
  float* partials;  // workspace (B, tiles, 4): [sum |s - mask|, Sp, Sq (sample 0 only), sum p log(p/q)]
};

template <typename T>
struct BwdArgs {
  const T* grad_s;       // may be null (zero)
  const T* grad_masked;  // may be null (zero)
  const float* grad_l1;
  const float* grad_kl;
  const T* A;
  const T* I;
  const float* mask;
  const uint8_t* has_mask;
  const float* prior;
  const T* s;
  const float* alpha;
  const float* cam;
  const float* stats;
  float eps, eps_kl;
  T* gA;
  T* gG;
  T* gI;
  float* gsw;       // workspace (B, H, W): g_s without the per-sample KL constant
  float* gn;        // workspace (B, h, w): g_n, then g_z in place
  float* partials;  // workspace (B, tiles): partial sums of kl
};

// ----------------------------------------------------------------------------------------- bilinear taps
// torch's upsample_bilinear2d, align_corners=False, no scale factor given (F.interpolate(size=...)):
//   scale = in / out;  src = max(scale * (dst + 0.5) - 0.5, 0);  i0 = (int)src;  i1 = i0 + (i0 < in - 1);
//   l1 = src - i0;  l0 = 1 - l1;  value = l0 * x[i0] + l1 * x[i1]   (separably in y then x).
struct Lerp {
  int i0, i1;
  float l0, l1;
};

__host__ __device__ __forceinline__ float src_scale(int in, int out) { return (float)in / (float)out; }

__host__ __device__ __forceinline__ Lerp lerp_taps(int dst, float scale, int in) {
  float src = scale * ((float)dst + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int i0 = (int)src;        // floor, src >= 0
  if (i0 > in - 1) i0 = in - 1;  // never taken for out >= in (src < in - 0.5); guards rounding
  Lerp t;
  t.i0 = i0;
  t.i1 = i0 < in - 1 ? i0 + 1 : i0;
  t.l1 = src - (float)i0;
  t.l0 = 1.f - t.l1;
  return t;
}

// Weight of low-res index i in output position t (both taps may coincide at the border; their weights add).
__host__ __device__ __forceinline__ float tap_weight(const Lerp& t, int i, bool& hit) {
  hit = (t.i0 == i) || (t.i1 == i);
  return (t.i0 == i ? t.l0 : 0.f) + (t.i1 == i ? t.l1 : 0.f);
}

__host__ __device__ __forceinline__ float bilerp(const float* n, int w, const Lerp& ty, const Lerp& tx) {
  const float* r0 = n + (int64_t)ty.i0 * w;
  const float* r1 = n + (int64_t)ty.i1 * w;
  return ty.l0 * (tx.l0 * r0[tx.i0] + tx.l1 * r0[tx.i1]) + ty.l1 * (tx.l0 * r1[tx.i0] + tx.l1 * r1[tx.i1]);
}

struct Range {
  int lo, hi;  // inclusive; empty when lo > hi
};

// Output positions p whose taps reference low-res index i. A tap hits i iff i0(p) == i or i1(p) == i, i.e.
// i0(p) in {i - 1, i} (i1 = i0 + 1 below the border, i1 = i0 at it), i.e. src(p) in [i - 1, i + 1) or src(p)
// clamped to 0 when i <= 1. src is non-decreasing in p, so this is one contiguous run:
//   (i - 0.5) / scale - 0.5 <= p < (i + 1.5) / scale - 0.5.
// The bounds are padded by 2 against rounding of scale; tap_weight() then decides membership exactly with the
// same lerp_taps() the forward used, so padding only costs a few empty iterations.
__host__ __device__ __forceinline__ Range adjoint_range(int i, float scale, int in, int out) {
  const float lo = ((float)i - 0.5f) / scale - 0.5f;
  const float hi = ((float)i + 1.5f) / scale - 0.5f;
  Range r;
  r.lo = (int)floorf(lo) - 2;
  r.hi = (int)ceilf(hi) + 2;
  if (r.lo < 0) r.lo = 0;
  if (r.hi > out - 1) r.hi = out - 1;
  (void)in;
  return r;
}

// g_n at low-res cell (y, x) = sum over output pixels (p, q) of wy(p) wx(q) (g[p, q] + cb): the adjoint of the
// bilinear upsample as a gather (deterministic, no atomics). `lane` of `nlanes` workers takes every nlanes-th
// column; the caller sums the lanes.
__host__ __device__ __forceinline__ float gather_cell(const float* g, const Dims& d, int y, int x, float cb, int lane,
                                                      int nlanes) {
  const Range rr = adjoint_range(y, d.sh, d.h, d.H);
  const Range rc = adjoint_range(x, d.sw, d.w, d.W);
  float acc = 0.f;
  for (int p = rr.lo; p <= rr.hi; ++p) {
    bool hy;
    const float wy = tap_weight(lerp_taps(p, d.sh, d.h), y, hy);
    if (!hy) continue;  // uniform across lanes
    const float* row = g + (int64_t)p * d.W;
    for (int q = rc.lo + lane; q <= rc.hi; q += nlanes) {
      bool hx;
      const float wx = tap_weight(lerp_taps(q, d.sw, d.w), x, hx);
      if (hx) acc += (wy * wx) * (row[q] + cb);
    }
  }
  return acc;
}

// ----------------------------------------------------------------------------------------- per-element math
__host__ __device__ __forceinline__ bool sample_has_mask(const uint8_t* has_mask, int64_t b) {
  return has_mask != nullptr && has_mask[b] != 0;
}

// s at output pixel q of sample b, from the normalised low-res map n (B, h, w).
__host__ __device__ __forceinline__ float saliency_at(const float* nbuf, const Dims& d, int64_t b, int q) {
  const int y = q / d.W, x = q - y * d.W;
  return bilerp(nbuf + b * d.hw, d.w, lerp_taps(y, d.sh, d.h), lerp_taps(x, d.sw, d.w));
}

// p log(p / q) at one pixel, p = (s + eps_kl) / Sp, q = (prior + eps_kl) / Sq. One log of the ratio (torch_explicit
// takes log p - log q: the same up to rounding, and this keeps full relative precision when p ~ q).
__host__ __device__ __forceinline__ float kl_term(float s, float prior, float eps_kl, float Sp, float Sq, float& lpq) {
  const float p = (s + eps_kl) / Sp;
  const float q = (prior + eps_kl) / Sq;
  lpq = logf(p / q);
  return p * lpq;
}

// One output pixel q of sample b: writes s and masked, accumulates the forward's partial sums
// v[0] += |s - mask| (do_l1), v[1] += s + eps_kl, v[2] += prior + eps_kl (with_q).
template <typename T>
__host__ __device__ __forceinline__ void fwd_pixel(const FwdArgs<T>& a, const Dims& d, int64_t b, int q, bool do_l1,
                                                   bool with_q, float (&v)[3]) {
  const float s = saliency_at(a.nbuf, d, b, q);
  const int64_t pix = b * d.HW + q;
  a.s[pix] = from_f<T>(s);
  for (int c = 0; c < d.C; ++c) {
    const int64_t idx = (b * d.C + c) * (int64_t)d.HW + q;
    a.masked[idx] = from_f<T>(to_f(a.I[idx]) * s);  // fp32 s, as torch_explicit (not the rounded one)
  }
  if (do_l1) v[0] += fabsf(s - a.mask[pix]);
  v[1] += s + a.eps_kl;
  if (with_q) v[2] += a.prior[q] + a.eps_kl;
}

__host__ __device__ __forceinline__ void finalize_sample(float sum_l1, float sp, float sq, float sum_kl, bool do_l1,
                                                         bool do_kl, bool has_prior, int HW, float* l1, float* kl,
                                                         float* stats) {
  *l1 = do_l1 ? sum_l1 / (float)HW : 0.f;
  *kl = do_kl ? sum_kl : 0.f;
  stats[2] = sp;
  stats[3] = has_prior ? sq : 0.f;
}

// Per-sample coefficients of g_s (torch_explicit.backward):
//   w_l1 = grad_l1 / (H W) where the sample has a mask;  coef = w_kl / Sp with w_kl = grad_kl where it has none.
struct SampleCoef {
  bool do_l1, do_kl;
  float w_l1, coef, Sp, Sq;
};

template <typename T>
__host__ __device__ __forceinline__ SampleCoef sample_coef(const BwdArgs<T>& a, const Dims& d, int64_t b) {
  const bool hm = sample_has_mask(a.has_mask, b);
  SampleCoef c;
  c.do_l1 = a.mask != nullptr && hm;
  c.w_l1 = c.do_l1 ? a.grad_l1[b] / (float)d.HW : 0.f;
  const float w_kl = (a.prior != nullptr && !hm) ? a.grad_kl[b] : 0.f;
  c.Sp = a.stats[b * 4 + 2];
  c.Sq = a.stats[b * 4 + 3];
  c.coef = w_kl / c.Sp;
  c.do_kl = a.prior != nullptr && !hm && w_kl != 0.f;  // w_kl == 0: the KL term adds nothing
  return c;
}

// One output pixel of the backward: gI, and g_s = grad_s + sum_c grad_masked I + w_l1 sign(s - mask)
// + coef log(p/q) (the -coef kl part is added in the gather, as cb). Accumulates p log(p/q) into kl_acc.
template <typename T>
__host__ __device__ __forceinline__ void bwd_pixel(const BwdArgs<T>& a, const Dims& d, int64_t b, int q,
                                                   const SampleCoef& sc, float& kl_acc) {
  const int64_t pix = b * d.HW + q;
  const float sv = to_f(a.s[pix]);
  float g = a.grad_s != nullptr ? to_f(a.grad_s[pix]) : 0.f;
  if (a.grad_masked != nullptr) {
    float t = 0.f;
    for (int c = 0; c < d.C; ++c) {
      const int64_t idx = (b * d.C + c) * (int64_t)d.HW + q;
      const float go = to_f(a.grad_masked[idx]);
      t += go * to_f(a.I[idx]);
      a.gI[idx] = from_f<T>(go * sv);
    }
    g += t;
  } else {
    for (int c = 0; c < d.C; ++c) a.gI[(b * d.C + c) * (int64_t)d.HW + q] = from_f<T>(0.f);
  }
  if (sc.do_l1) {
    const float df = sv - a.mask[pix];
    g += sc.w_l1 * (float)((df > 0.f) - (df < 0.f));  // torch.sign: 0 at equality
  }
  if (sc.do_kl) {
    float lpq;
    kl_acc += kl_term(sv, a.prior[q], a.eps_kl, sc.Sp, sc.Sq, lpq);
    g += sc.coef * lpq;
  }
  a.gsw[pix] = g;
}

// Min-max normalisation backward, per cell (d = M - m + eps, n = (c - m) / d):
//   g_m = sum g_n (n - 1) / d,  g_M = -sum g_n n / d,  counts of cells at the min / max (ties split evenly).
__host__ __device__ __forceinline__ void cell_terms(float z, float gn, float m, float M, float dd, float (&v)[4]) {
  const float c = fmaxf(z, 0.f);
  const float n = (c - m) / dd;
  v[0] += (gn * (n - 1.f)) / dd;
  v[1] += (-gn * n) / dd;
  v[2] += c == m ? 1.f : 0.f;
  v[3] += c == M ? 1.f : 0.f;
}

// g_z = [z > 0] (g_n / d + g_m [c == m] / #min + g_M [c == M] / #max)
__host__ __device__ __forceinline__ float cell_gz(float z, float gn, float m, float M, float dd, const float (&v)[4]) {
  const float c = fmaxf(z, 0.f);
  const float gc = gn / dd + (c == m && v[2] > 0.f ? v[0] / v[2] : 0.f) + (c == M && v[3] > 0.f ? v[1] / v[3] : 0.f);
  return z > 0.f ? gc : 0.f;
}

// ----------------------------------------------------------------------------------------- Grad-CAM at low res
// Sum of x[i] over i = lane, lane + nlanes, ... (a warp's lanes on the GPU; lane 0 of 1 on the host).
template <typename T>
__host__ __device__ __forceinline__ float strided_sum(const T* x, int n, int lane, int nlanes) {
  float acc = 0.f;
  for (int i = lane; i < n; i += nlanes) acc += to_f(x[i]);
  return acc;
}

// z at cell ij summed over k = k0, k0 + kstep, ... < K (one split-k group on the GPU; all of k on the host).
template <typename T>
__host__ __device__ __forceinline__ float cam_partial(const float* alpha, const T* A, int hw, int K, int ij, int k0,
                                                      int kstep) {
  float acc = 0.f;
  for (int k = k0; k < K; k += kstep) acc += alpha[k] * to_f(A[(int64_t)k * hw + ij]);
  return acc;
}

__host__ __device__ __forceinline__ void minmax_relu(float z, float& lo, float& hi) {
  const float c = fmaxf(z, 0.f);
  lo = fminf(lo, c);
  hi = fmaxf(hi, c);
}

// n = (relu(z) - m) / (M - m + eps), the min-max normalised map that the pixel kernels upsample.
__host__ __device__ __forceinline__ float normalised(float z, float lo, float hi, float eps) {
  return (fmaxf(z, 0.f) - lo) / ((hi - lo) + eps);
}

// ----------------------------------------------------------------------------------------- backward, per sample
// g_n's per-sample constant of the KL term, -coef * kl (added to every g_s pixel inside the gather).
__host__ __device__ __forceinline__ float kl_shift(const SampleCoef& sc, float kl) { return sc.do_kl ? -sc.coef * kl : 0.f; }

// <g_z, A_k> over one sample's cells, lanes split the cells.
template <typename T>
__host__ __device__ __forceinline__ float dot_gz_A(const float* gz, const T* Ak, int hw, int lane, int nlanes) {
  float acc = 0.f;
  for (int ij = lane; ij < hw; ij += nlanes) acc += gz[ij] * to_f(Ak[ij]);
  return acc;
}

// gA = alpha_k g_z and gG = <g_z, A_k> / (h w) at cells ij = lane, lane + nlanes, ... of channel k of sample b.
template <typename T>
__host__ __device__ __forceinline__ void store_gradk(const BwdArgs<T>& a, const Dims& d, int64_t b, int k, float dot,
                                                     int lane, int nlanes) {
  const float* gz = a.gn + b * d.hw;
  const int64_t off = (b * d.K + k) * (int64_t)d.hw;
  const T gg = from_f<T>(dot / (float)d.hw);
  const float al = a.alpha[b * d.K + k];
  for (int ij = lane; ij < d.hw; ij += nlanes) {
    a.gA[off + ij] = from_f<T>(al * gz[ij]);
    a.gG[off + ij] = gg;
  }
}

}  // namespace megl
