// CUDA kernels of the fused saliency op (DESIGN.md §2) + pybind11 bindings -> megl._saliency_cuda.
//
// No libtorch: the Python glue (megl/ops/backends/cuda.py) passes raw device pointers (0 = absent), shapes, a
// dtype code, eps values, a device index and the current torch stream as an integer; all outputs and one float32
// workspace are preallocated by the glue. The contract and executable spec is megl/ops/backends/torch_explicit.py.
//
// Inputs A, G, I, s, grads are float / __half / __nv_bfloat16 (dtype code 0 / 1 / 2); everything else is float32;
// has_mask is a torch.bool buffer (one byte per sample). Arithmetic is float32 throughout.
//
// Every reduction is deterministic: fixed thread->element maps, warp butterflies, per-block partials written to
// the workspace and reduced in a fixed order by a later kernel. No float atomics anywhere, so results are bitwise
// identical from run to run.
//
// Forward, per sample b (kernels launched in this order on the given stream):
//   fwd_cam_kernel       one block per sample: alpha (warp per k), z (split-k over the block), min/max of
//                        c = relu(z), n = (c - m) / (M - m + eps) into the workspace (B, h, w).
//   fwd_pixel_kernel     grid (tiles, B): s = bilinear(n), masked = I * s, and per-block partial sums of
//                        |s - mask|, Sp = sum(s + eps_kl) and (sample 0's blocks) Sq = sum(prior + eps_kl).
//   fwd_kl_kernel        (only with a prior) grid (tiles, B): reduces Sp, Sq from the partials, then partial sums
//                        of p log(p / q), p = (s + eps_kl) / Sp, q = (prior + eps_kl) / Sq, s recomputed from n.
//   fwd_finalize_kernel  one block per sample: reduces the partials in tile order -> l1, kl, stats[2:4].
// Why a second pass for KL: the one-pass form kl = (1/Sp) sum (s+e) log((s+e)/(prior+e)) + log(Sq/Sp) needs
// no global Sp first, but it subtracts two terms of size |log eps_kl| ~ 18 to get kl (e.g. 0.3 where s ~ 0),
// losing ~1e-5 absolute in float32; with Sp, Sq known every term p log(p/q) is small, as in torch_explicit.
// Backward:
//   bwd_pixel_kernel     grid (tiles, B): g_s (all terms but the per-sample constant -coef * kl of the KL term),
//                        gI, and per-block partials of kl = sum p log(p / q) (recomputed from the stored s, as
//                        torch_explicit does: the contract does not pass kl to backward).
//   bwd_gather_kernel    warp per low-res cell: g_n = upsample^T(g_s + cb) as a gather over the output pixels
//                        whose bilinear taps touch the cell (adjoint_range below); cb = -coef * kl per sample.
//   bwd_cell_kernel      one block per sample: min/max tie terms, g_z (in place over g_n).
//   bwd_gradk_kernel     warp per (b, k): gG = <g_z, A_k> / (h w) broadcast, gA = alpha_k g_z.
//
// The per-element math lives in __host__ __device__ functions shared with host_forward / host_backward, a serial
// float32 CPU emulation exported for the tests: it checks the index, tap and adjoint math against torch on
// machines without a GPU. Only the parallel scaffolding (launch shapes, block reductions) is GPU-only.

#include <pybind11/pybind11.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace megl {

constexpr int NT_CAM = 512;     // fwd_cam_kernel: one block per sample
constexpr int NT_PIX = 256;     // pixel kernels
constexpr int PIX_PER_THREAD = 4;
constexpr int MAX_TILES = 1024;  // pixel blocks per sample; beyond this the grid-stride loop takes over
constexpr int NT_WARPS = 256;   // warp-per-item kernels (gather, gradk): 8 warps a block
constexpr int NT_CELL = 256;    // bwd_cell_kernel
constexpr int MAX_GRID_Y = 65535;

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

// ----------------------------------------------------------------------------------------- block reductions
__device__ __forceinline__ float warp_sum(float v) {
  // xor butterfly: every lane ends with the same bits (each step adds the same pair, commutatively)
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums N values over the block; every thread gets the result. sh holds N * NT/32 floats. Starts with a barrier
// so back-to-back calls sharing sh are safe.
template <int NT, int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* sh) {
  constexpr int NW = NT / 32;
  static_assert(NT % 32 == 0 && NW <= 32, "block size must be a multiple of 32, at most 1024");
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) sh[i * NW + wid] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(lane < NW ? sh[i * NW + lane] : 0.f);  // same in every warp
}

template <int NT>
__device__ __forceinline__ void block_minmax(float& lo, float& hi, float* sh) {
  constexpr int NW = NT / 32;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  __syncthreads();
  if (lane == 0) {
    sh[wid] = lo;
    sh[NW + wid] = hi;
  }
  __syncthreads();
  lo = lane < NW ? sh[lane] : INFINITY;
  hi = lane < NW ? sh[NW + lane] : -INFINITY;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
}

// Sum of one slot of sample b's per-tile partials, in a fixed order: every block that calls this with the same
// NT gets the same bits (fwd_kl_kernel and fwd_finalize_kernel both need Sp and Sq).
template <int NT>
__device__ __forceinline__ float reduce_tiles(const float* partials, int64_t b, int tiles, int slot, float* sh) {
  float v[1] = {0.f};
  for (int t = threadIdx.x; t < tiles; t += NT) v[0] += partials[(b * tiles + t) * 4 + slot];
  block_sum<NT, 1>(v, sh);
  return v[0];
}

// ----------------------------------------------------------------------------------------- forward kernels
template <typename T, int NT>
__global__ void __launch_bounds__(NT) fwd_cam_kernel(FwdArgs<T> a, Dims d) {
  __shared__ float part[NT];
  __shared__ float red[2 * (NT / 32)];
  const int64_t b = blockIdx.x;
  const int hw = d.hw, K = d.K;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* __restrict__ A = a.A + b * K * hw;
  const T* __restrict__ G = a.G + b * K * hw;
  float* alpha = a.alpha + b * K;  // written then read here: no const / __restrict__ (no read-only cache)
  float* cam = a.cam + b * hw;

  // alpha_k = mean_ij G_kij, a warp per k (warp-uniform loop: full-mask shuffles are safe)
  for (int k = warp; k < K; k += NT / 32) {
    const T* Gk = G + (int64_t)k * hw;
    float acc = 0.f;
    for (int i = lane; i < hw; i += 32) acc += to_f(Gk[i]);
    acc = warp_sum(acc);
    if (lane == 0) alpha[k] = acc / (float)hw;
  }
  __syncthreads();  // alpha (global) visible to the whole block

  // z_ij = sum_k alpha_k A_kij. Pixels in chunks of P = min(hw, NT); the NT / P thread groups split k
  // (group ks takes k = ks, ks + ksplit, ...), then thread p (< P) adds the group partials in order.
  const int P = hw < NT ? hw : NT;
  const int ksplit = NT / P;
  const int p = threadIdx.x % P, ks = threadIdx.x / P;
  float lo = INFINITY, hi = -INFINITY;
  for (int base = 0; base < hw; base += P) {  // block-uniform trip count
    const int ij = base + p;
    float acc = 0.f;
    if (ks < ksplit && ij < hw) {
      for (int k = ks; k < K; k += ksplit) acc += alpha[k] * to_f(A[(int64_t)k * hw + ij]);
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    if ((int)threadIdx.x < P && ij < hw) {  // threadIdx.x < P <=> ks == 0, p == threadIdx.x
      float z = 0.f;
      for (int j = 0; j < ksplit; ++j) z += part[j * P + p];
      cam[ij] = z;
      const float c = fmaxf(z, 0.f);
      lo = fminf(lo, c);
      hi = fmaxf(hi, c);
    }
    __syncthreads();  // part is rewritten by the next chunk
  }
  block_minmax<NT>(lo, hi, red);  // its barriers also publish cam to the block
  const float dd = (hi - lo) + a.eps;
  if (threadIdx.x == 0) {
    a.stats[b * 4 + 0] = lo;
    a.stats[b * 4 + 1] = hi;
  }
  float* nb = a.nbuf + b * hw;
  for (int ij = threadIdx.x; ij < hw; ij += NT) nb[ij] = (fmaxf(cam[ij], 0.f) - lo) / dd;
}

template <typename T, int NT>
__global__ void __launch_bounds__(NT) fwd_pixel_kernel(FwdArgs<T> a, Dims d) {
  __shared__ float red[3 * (NT / 32)];
  for (int64_t b = blockIdx.y; b < d.B; b += gridDim.y) {  // block-uniform
    const bool do_l1 = a.mask != nullptr && sample_has_mask(a.has_mask, b);
    const bool with_q = b == 0 && a.prior != nullptr;  // sum(prior + eps_kl) is the same for all samples
    float v[3] = {0.f, 0.f, 0.f};
    // int is safe: make_dims() checks HW + tiles * NT fits
    for (int q = blockIdx.x * NT + threadIdx.x; q < d.HW; q += d.tiles * NT) fwd_pixel(a, d, b, q, do_l1, with_q, v);
    block_sum<NT, 3>(v, red);
    if (threadIdx.x == 0) {
      float* out = a.partials + (b * d.tiles + blockIdx.x) * 4;
      out[0] = v[0];
      out[1] = v[1];
      out[2] = v[2];
      out[3] = 0.f;  // fwd_kl_kernel's slot; 0 where it does not run
    }
  }
}

template <typename T, int NT>
__global__ void __launch_bounds__(NT) fwd_kl_kernel(FwdArgs<T> a, Dims d) {
  __shared__ float red[NT / 32];
  for (int64_t b = blockIdx.y; b < d.B; b += gridDim.y) {  // block-uniform
    if (sample_has_mask(a.has_mask, b)) continue;          // kl is 0 for annotated samples
    const float Sp = reduce_tiles<NT>(a.partials, b, d.tiles, 1, red);
    const float Sq = reduce_tiles<NT>(a.partials, 0, d.tiles, 2, red);
    float v[1] = {0.f};
    float lpq;
    for (int q = blockIdx.x * NT + threadIdx.x; q < d.HW; q += d.tiles * NT)
      v[0] += kl_term(saliency_at(a.nbuf, d, b, q), a.prior[q], a.eps_kl, Sp, Sq, lpq);
    block_sum<NT, 1>(v, red);
    // slot 3 is read by fwd_finalize_kernel only (a later launch): no block of this kernel reads it
    if (threadIdx.x == 0) a.partials[(b * d.tiles + blockIdx.x) * 4 + 3] = v[0];
  }
}

template <typename T, int NT>
__global__ void __launch_bounds__(NT) fwd_finalize_kernel(FwdArgs<T> a, Dims d) {
  __shared__ float red[NT / 32];
  const int64_t b = blockIdx.x;
  const float sum_l1 = reduce_tiles<NT>(a.partials, b, d.tiles, 0, red);
  const float Sp = reduce_tiles<NT>(a.partials, b, d.tiles, 1, red);
  const float Sq = reduce_tiles<NT>(a.partials, 0, d.tiles, 2, red);  // sample 0's blocks hold the prior sums
  const float sum_kl = reduce_tiles<NT>(a.partials, b, d.tiles, 3, red);
  if (threadIdx.x == 0) {
    const bool hm = sample_has_mask(a.has_mask, b);
    finalize_sample(sum_l1, Sp, Sq, sum_kl, a.mask != nullptr && hm, a.prior != nullptr && !hm, a.prior != nullptr,
                    d.HW, a.l1 + b, a.kl + b, a.stats + b * 4);
  }
}

// ----------------------------------------------------------------------------------------- backward kernels
template <typename T, int NT>
__global__ void __launch_bounds__(NT) bwd_pixel_kernel(BwdArgs<T> a, Dims d) {
  __shared__ float red[NT / 32];
  for (int64_t b = blockIdx.y; b < d.B; b += gridDim.y) {  // block-uniform
    const SampleCoef sc = sample_coef(a, d, b);
    float v[1] = {0.f};
    for (int q = blockIdx.x * NT + threadIdx.x; q < d.HW; q += d.tiles * NT) bwd_pixel(a, d, b, q, sc, v[0]);
    block_sum<NT, 1>(v, red);
    if (threadIdx.x == 0) a.partials[b * d.tiles + blockIdx.x] = v[0];
  }
}

template <typename T, int NT>
__global__ void __launch_bounds__(NT) bwd_gather_kernel(BwdArgs<T> a, Dims d) {
  const int lane = threadIdx.x & 31;
  const int64_t item = (int64_t)blockIdx.x * (NT / 32) + (threadIdx.x >> 5);  // one warp per (b, cell)
  if (item >= (int64_t)d.B * d.hw) return;  // whole warps leave; no block barriers in this kernel
  const int64_t b = item / d.hw;
  const int cell = (int)(item - b * d.hw);
  const int y = cell / d.w, x = cell - y * d.w;
  const SampleCoef sc = sample_coef(a, d, b);
  float cb = 0.f;
  if (sc.do_kl) {  // kl_b from the pixel kernel's partials, in a fixed order (same bits in every warp of b)
    float kl = 0.f;
    for (int t = lane; t < d.tiles; t += 32) kl += a.partials[b * d.tiles + t];
    cb = -sc.coef * warp_sum(kl);
  }
  const float acc = warp_sum(gather_cell(a.gsw + b * d.HW, d, y, x, cb, lane, 32));
  if (lane == 0) a.gn[item] = acc;
}

template <typename T, int NT>
__global__ void __launch_bounds__(NT) bwd_cell_kernel(BwdArgs<T> a, Dims d) {
  __shared__ float red[4 * (NT / 32)];
  const int64_t b = blockIdx.x;
  const float* cam = a.cam + b * d.hw;
  float* gn = a.gn + b * d.hw;
  const float m = a.stats[b * 4 + 0], M = a.stats[b * 4 + 1];
  const float dd = (M - m) + a.eps;
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  for (int ij = threadIdx.x; ij < d.hw; ij += NT) cell_terms(cam[ij], gn[ij], m, M, dd, v);
  block_sum<NT, 4>(v, red);  // barrier: all reads of gn above precede the in-place writes below
  for (int ij = threadIdx.x; ij < d.hw; ij += NT) gn[ij] = cell_gz(cam[ij], gn[ij], m, M, dd, v);
}

// <g_z, A_k> over one sample's cells, lanes split the cells.
template <typename T>
__host__ __device__ __forceinline__ float dot_gz_A(const float* gz, const T* Ak, int hw, int lane, int nlanes) {
  float acc = 0.f;
  for (int ij = lane; ij < hw; ij += nlanes) acc += gz[ij] * to_f(Ak[ij]);
  return acc;
}

template <typename T, int NT>
__global__ void __launch_bounds__(NT) bwd_gradk_kernel(BwdArgs<T> a, Dims d) {
  const int lane = threadIdx.x & 31;
  const int k = blockIdx.x * (NT / 32) + (threadIdx.x >> 5);  // one warp per k
  if (k >= d.K) return;                                       // whole warps leave; no block barriers here
  for (int64_t b = blockIdx.y; b < d.B; b += gridDim.y) {
    const float* gz = a.gn + b * d.hw;
    const int64_t off = (b * d.K + k) * (int64_t)d.hw;
    const float dot = warp_sum(dot_gz_A(gz, a.A + off, d.hw, lane, 32));
    const T gg = from_f<T>(dot / (float)d.hw);
    const float al = a.alpha[b * d.K + k];
    for (int ij = lane; ij < d.hw; ij += 32) {
      a.gA[off + ij] = from_f<T>(al * gz[ij]);
      a.gG[off + ij] = gg;
    }
  }
}

// ----------------------------------------------------------------------------------------- host side
[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("megl._saliency_cuda: " + what); }

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

int pixel_tiles(int64_t HW) {
  const int64_t per_block = (int64_t)NT_PIX * PIX_PER_THREAD;
  return (int)std::max<int64_t>(1, std::min<int64_t>(MAX_TILES, (HW + per_block - 1) / per_block));
}

Dims make_dims(int64_t B, int64_t K, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W) {
  if (B < 0 || K < 0 || C < 0) fail("negative batch, channel or C size");
  if (h <= 0 || w <= 0) fail("the Grad-CAM map is empty (h = " + std::to_string(h) + ", w = " + std::to_string(w) + "); pass non-empty activations");
  if (H < h || W < w) fail("the image (" + std::to_string(H) + "x" + std::to_string(W) + ") is smaller than the Grad-CAM map (" + std::to_string(h) + "x" + std::to_string(w) + ")");
  // pixel indices are int inside the kernels, and the grid-stride step q + tiles * NT must not overflow
  if (H * W > (int64_t)INT_MAX - (int64_t)MAX_TILES * NT_PIX) fail("H * W = " + std::to_string(H * W) + " pixels is too large for one image (limit about 2^31); split the image");
  if (K > INT_MAX || C > INT_MAX || B > INT_MAX) fail("batch, channel or C dimension too large");
  Dims d;
  d.B = (int)B; d.K = (int)K; d.h = (int)h; d.w = (int)w; d.C = (int)C; d.H = (int)H; d.W = (int)W;
  d.hw = (int)(h * w);
  d.HW = (int)(H * W);
  d.sh = src_scale(d.h, d.H);
  d.sw = src_scale(d.w, d.W);
  d.tiles = pixel_tiles(H * W);
  return d;
}

// Workspace sizes in float32 elements (the glue allocates them with torch's caching allocator).
int64_t forward_workspace(int64_t B, int64_t K, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W) {
  const Dims d = make_dims(B, K, h, w, C, H, W);
  return B * d.hw + B * d.tiles * 4;
}
int64_t backward_workspace(int64_t B, int64_t K, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W) {
  const Dims d = make_dims(B, K, h, w, C, H, W);
  return B * d.HW + B * d.hw + B * d.tiles;
}

template <typename T>
const T* cptr(std::uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <typename T>
T* mptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

void require_all(std::initializer_list<std::pair<std::uintptr_t, const char*>> pointers) {
  for (const auto& [p, name] : pointers)
    if (p == 0) fail(std::string(name) + " is a null pointer; it is required (pass tensor.data_ptr())");
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

template <typename T>
FwdArgs<T> fwd_args(std::uintptr_t A, std::uintptr_t G, std::uintptr_t I, std::uintptr_t mask,
                    std::uintptr_t has_mask, std::uintptr_t prior, double eps, double eps_kl, std::uintptr_t s,
                    std::uintptr_t masked, std::uintptr_t l1, std::uintptr_t kl, std::uintptr_t alpha,
                    std::uintptr_t cam, std::uintptr_t stats, float* nbuf, float* partials) {
  FwdArgs<T> a;
  a.A = cptr<T>(A); a.G = cptr<T>(G); a.I = cptr<T>(I);
  a.mask = cptr<float>(mask); a.has_mask = cptr<uint8_t>(has_mask); a.prior = cptr<float>(prior);
  a.eps = (float)eps; a.eps_kl = (float)eps_kl;
  a.s = mptr<T>(s); a.masked = mptr<T>(masked); a.l1 = mptr<float>(l1); a.kl = mptr<float>(kl);
  a.alpha = mptr<float>(alpha); a.cam = mptr<float>(cam); a.stats = mptr<float>(stats);
  a.nbuf = nbuf; a.partials = partials;
  return a;
}

template <typename T>
BwdArgs<T> bwd_args(std::uintptr_t grad_s, std::uintptr_t grad_masked, std::uintptr_t grad_l1, std::uintptr_t grad_kl,
                    std::uintptr_t A, std::uintptr_t I, std::uintptr_t mask, std::uintptr_t has_mask,
                    std::uintptr_t prior, std::uintptr_t s, std::uintptr_t alpha, std::uintptr_t cam,
                    std::uintptr_t stats, double eps, double eps_kl, std::uintptr_t gA, std::uintptr_t gG,
                    std::uintptr_t gI, float* gsw, float* gn, float* partials) {
  BwdArgs<T> a;
  a.grad_s = cptr<T>(grad_s); a.grad_masked = cptr<T>(grad_masked);
  a.grad_l1 = cptr<float>(grad_l1); a.grad_kl = cptr<float>(grad_kl);
  a.A = cptr<T>(A); a.I = cptr<T>(I);
  a.mask = cptr<float>(mask); a.has_mask = cptr<uint8_t>(has_mask); a.prior = cptr<float>(prior);
  a.s = cptr<T>(s); a.alpha = cptr<float>(alpha); a.cam = cptr<float>(cam); a.stats = cptr<float>(stats);
  a.eps = (float)eps; a.eps_kl = (float)eps_kl;
  a.gA = mptr<T>(gA); a.gG = mptr<T>(gG); a.gI = mptr<T>(gI);
  a.gsw = gsw; a.gn = gn; a.partials = partials;
  return a;
}

void check_dtype(int dtype) {
  if (dtype < 0 || dtype > 2) fail("unknown dtype code " + std::to_string(dtype) + " (0 = float32, 1 = float16, 2 = bfloat16)");
}

void check_common(std::uintptr_t mask, std::uintptr_t has_mask) {
  if (mask != 0 && has_mask == 0) fail("mask given without has_mask; pass a (B,) bool has_mask (all True when every sample has a mask)");
}

void forward_py(int dtype, int64_t B, int64_t K, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W,
                std::uintptr_t A, std::uintptr_t G, std::uintptr_t I, std::uintptr_t mask, std::uintptr_t has_mask,
                std::uintptr_t prior, double eps, double eps_kl, std::uintptr_t s, std::uintptr_t masked,
                std::uintptr_t l1, std::uintptr_t kl, std::uintptr_t alpha, std::uintptr_t cam, std::uintptr_t stats,
                std::uintptr_t workspace, int64_t workspace_numel, int device, std::uintptr_t stream) {
  const Dims d = make_dims(B, K, h, w, C, H, W);
  check_dtype(dtype);
  if (B == 0) return;
  require_all({{s, "saliency"}, {l1, "l1"}, {kl, "kl"}, {cam, "cam"}, {stats, "stats"}, {workspace, "workspace"}});
  if (K > 0) require_all({{A, "activations"}, {G, "gradients"}, {alpha, "alpha"}});  // K = 0: empty tensors
  if (C > 0) require_all({{I, "image"}, {masked, "masked"}});
  check_common(mask, has_mask);
  if (workspace_numel < forward_workspace(B, K, h, w, C, H, W)) fail("workspace too small; size it with forward_workspace()");
  float* ws = mptr<float>(workspace);
  float* nbuf = ws;
  float* partials = ws + B * d.hw;
  use_device(device);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch_forward(fwd_args<float>(A, G, I, mask, has_mask, prior, eps, eps_kl, s, masked, l1, kl, alpha, cam, stats, nbuf, partials), d, st); break;
    case 1: launch_forward(fwd_args<__half>(A, G, I, mask, has_mask, prior, eps, eps_kl, s, masked, l1, kl, alpha, cam, stats, nbuf, partials), d, st); break;
    case 2: launch_forward(fwd_args<__nv_bfloat16>(A, G, I, mask, has_mask, prior, eps, eps_kl, s, masked, l1, kl, alpha, cam, stats, nbuf, partials), d, st); break;
    default: check_dtype(dtype);
  }
}

void backward_py(int dtype, int64_t B, int64_t K, int64_t h, int64_t w, int64_t C, int64_t H, int64_t W,
                 std::uintptr_t grad_s, std::uintptr_t grad_masked, std::uintptr_t grad_l1, std::uintptr_t grad_kl,
                 std::uintptr_t A, std::uintptr_t I, std::uintptr_t mask, std::uintptr_t has_mask,
                 std::uintptr_t prior, std::uintptr_t s, std::uintptr_t alpha, std::uintptr_t cam,
                 std::uintptr_t stats, double eps, double eps_kl, std::uintptr_t gA, std::uintptr_t gG,
                 std::uintptr_t gI, std::uintptr_t workspace, int64_t workspace_numel, int device,
                 std::uintptr_t stream) {
  const Dims d = make_dims(B, K, h, w, C, H, W);
  check_dtype(dtype);
  if (B == 0) return;
  require_all({{grad_l1, "grad_l1"}, {grad_kl, "grad_kl"}, {s, "saliency"}, {cam, "cam"}, {stats, "stats"},
               {workspace, "workspace"}});
  if (K > 0) require_all({{A, "activations"}, {alpha, "alpha"}, {gA, "grad_activations"}, {gG, "grad_gradients"}});
  if (C > 0) require_all({{I, "image"}, {gI, "grad_image"}});
  check_common(mask, has_mask);
  if (workspace_numel < backward_workspace(B, K, h, w, C, H, W)) fail("workspace too small; size it with backward_workspace()");
  float* ws = mptr<float>(workspace);
  float* gsw = ws;
  float* gn = gsw + B * d.HW;
  float* partials = gn + B * d.hw;
  use_device(device);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
#define MEGL_BWD_ARGS(T) \
  bwd_args<T>(grad_s, grad_masked, grad_l1, grad_kl, A, I, mask, has_mask, prior, s, alpha, cam, stats, eps, eps_kl, gA, gG, gI, gsw, gn, partials)
  switch (dtype) {
    case 0: launch_backward(MEGL_BWD_ARGS(float), d, st); break;
    case 1: launch_backward(MEGL_BWD_ARGS(__half), d, st); break;
    case 2: launch_backward(MEGL_BWD_ARGS(__nv_bfloat16), d, st); break;
    default: check_dtype(dtype);
  }
#undef MEGL_BWD_ARGS
}

// ----------------------------------------------------------------------------------------- host emulation
// Serial float32 versions of the same pipeline on CPU pointers, built from the same __host__ __device__ pieces.
// For tests on machines without a GPU: they pin down tap / adjoint-range / formula bugs, not the parallel parts.
// Sums over pixels go row by row in float, rows in double, so summation error stays below the tolerances.

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
  double sq = 0.0;
  if (a.prior != nullptr) {
    for (int y = 0; y < d.H; ++y) {
      float row = 0.f;
      for (int x = 0; x < d.W; ++x) row += a.prior[y * d.W + x] + a.eps_kl;
      sq += row;
    }
  }
  for (int64_t b = 0; b < d.B; ++b) {
    const float* Ab = a.A + b * d.K * d.hw;
    const float* Gb = a.G + b * d.K * d.hw;
    for (int k = 0; k < d.K; ++k) {
      float acc = 0.f;
      for (int i = 0; i < d.hw; ++i) acc += Gb[(int64_t)k * d.hw + i];
      a.alpha[b * d.K + k] = acc / (float)d.hw;
    }
    float lo = INFINITY, hi = -INFINITY;
    for (int ij = 0; ij < d.hw; ++ij) {
      float z = 0.f;
      for (int k = 0; k < d.K; ++k) z += a.alpha[b * d.K + k] * Ab[(int64_t)k * d.hw + ij];
      a.cam[b * d.hw + ij] = z;
      lo = std::min(lo, std::max(z, 0.f));
      hi = std::max(hi, std::max(z, 0.f));
    }
    a.stats[b * 4 + 0] = lo;
    a.stats[b * 4 + 1] = hi;
    const float dd = (hi - lo) + a.eps;
    for (int ij = 0; ij < d.hw; ++ij) a.nbuf[b * d.hw + ij] = (std::max(a.cam[b * d.hw + ij], 0.f) - lo) / dd;
    const bool hm = sample_has_mask(a.has_mask, b);
    const bool do_l1 = a.mask != nullptr && hm, do_kl = a.prior != nullptr && !hm;
    double tot[2] = {0.0, 0.0};
    for (int y = 0; y < d.H; ++y) {
      float v[3] = {0.f, 0.f, 0.f};
      for (int x = 0; x < d.W; ++x) fwd_pixel(a, d, b, y * d.W + x, do_l1, false, v);
      tot[0] += v[0];
      tot[1] += v[1];
    }
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
    const SampleCoef sc = sample_coef(a, d, b);
    double kl = 0.0;
    for (int y = 0; y < d.H; ++y) {
      float row = 0.f;
      for (int x = 0; x < d.W; ++x) bwd_pixel(a, d, b, y * d.W + x, sc, row);
      kl += row;
    }
    const float cb = sc.do_kl ? -sc.coef * (float)kl : 0.f;
    for (int cell = 0; cell < d.hw; ++cell)
      a.gn[b * d.hw + cell] = gather_cell(a.gsw + b * d.HW, d, cell / d.w, cell % d.w, cb, 0, 1);
    const float m = a.stats[b * 4 + 0], M = a.stats[b * 4 + 1];
    const float dd = (M - m) + a.eps;
    const float* camb = a.cam + b * d.hw;
    float* gz = a.gn + b * d.hw;
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    for (int ij = 0; ij < d.hw; ++ij) cell_terms(camb[ij], gz[ij], m, M, dd, v);
    for (int ij = 0; ij < d.hw; ++ij) gz[ij] = cell_gz(camb[ij], gz[ij], m, M, dd, v);
    for (int k = 0; k < d.K; ++k) {
      const int64_t off = (b * d.K + k) * (int64_t)d.hw;
      const float gg = dot_gz_A(gz, a.A + off, d.hw, 0, 1) / (float)d.hw;
      const float al = a.alpha[b * d.K + k];
      for (int ij = 0; ij < d.hw; ++ij) {
        a.gA[off + ij] = al * gz[ij];
        a.gG[off + ij] = gg;
      }
    }
  }
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
