// megl's CUDA kernels and their launch constants: the parallel scaffolding (launch shapes, warp and block
// reductions) around the per-element math of math.cuh. Every reduction is deterministic: fixed thread -> element
// maps, warp butterflies, per-block partials reduced in a fixed order by a later kernel; no float atomics.
#pragma once

#include "math.cuh"

namespace megl {

constexpr int NT_CAM = 512;     // fwd_cam_kernel: one block per sample
constexpr int NT_PIX = 256;     // pixel kernels
constexpr int PIX_PER_THREAD = 4;
constexpr int MAX_TILES = 1024;  // pixel blocks per sample; beyond this the grid-stride loop takes over
constexpr int NT_WARPS = 256;   // warp-per-item kernels (gather, gradk): 8 warps a block
constexpr int NT_CELL = 256;    // bwd_cell_kernel
constexpr int MAX_GRID_Y = 65535;

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
    const float sum = warp_sum(strided_sum(G + (int64_t)k * hw, hw, lane, 32));
    if (lane == 0) alpha[k] = sum / (float)hw;
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
    part[threadIdx.x] = ks < ksplit && ij < hw ? cam_partial(alpha, A, hw, K, ij, ks, ksplit) : 0.f;
    __syncthreads();
    if ((int)threadIdx.x < P && ij < hw) {  // threadIdx.x < P <=> ks == 0, p == threadIdx.x
      float z = 0.f;
      for (int j = 0; j < ksplit; ++j) z += part[j * P + p];
      cam[ij] = z;
      minmax_relu(z, lo, hi);
    }
    __syncthreads();  // part is rewritten by the next chunk
  }
  block_minmax<NT>(lo, hi, red);  // its barriers also publish cam to the block
  if (threadIdx.x == 0) {
    a.stats[b * 4 + 0] = lo;
    a.stats[b * 4 + 1] = hi;
  }
  float* nb = a.nbuf + b * hw;
  for (int ij = threadIdx.x; ij < hw; ij += NT) nb[ij] = normalised(cam[ij], lo, hi, a.eps);
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
  if (sc.do_kl)  // kl_b from the pixel kernel's partials, in a fixed order (same bits in every warp of b)
    cb = kl_shift(sc, warp_sum(strided_sum(a.partials + b * d.tiles, d.tiles, lane, 32)));
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


template <typename T, int NT>
__global__ void __launch_bounds__(NT) bwd_gradk_kernel(BwdArgs<T> a, Dims d) {
  const int lane = threadIdx.x & 31;
  const int k = blockIdx.x * (NT / 32) + (threadIdx.x >> 5);  // one warp per k
  if (k >= d.K) return;                                       // whole warps leave; no block barriers here
  for (int64_t b = blockIdx.y; b < d.B; b += gridDim.y) {
    const float dot = warp_sum(dot_gz_A(a.gn + b * d.hw, a.A + (b * d.K + k) * (int64_t)d.hw, d.hw, lane, 32));
    store_gradk(a, d, b, k, dot, lane, 32);
  }
}

}  // namespace megl
