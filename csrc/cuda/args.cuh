// Host-side argument handling of megl._saliency_cuda, shared by the launchers and the host emulation: shape
// checks (Dims), workspace sizes, raw pointers (as integers from Python; 0 = absent) into FwdArgs / BwdArgs.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "kernels.cuh"

namespace megl {

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("megl._saliency_cuda: " + what); }

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

}  // namespace megl
