// Kernels of megl._saliency_cpu (see saliency_cpu.cpp). Included twice by saliency_cpu.cpp, inside namespace
// `generic` and, on x86-64 with GCC, inside namespace `avx2` under `#pragma GCC target("avx2")`: the same source
// compiled for 4- and 8-wide SIMD, picked at run time by the CPU's features. No include guard and no #include here
// on purpose: every standard header is included by saliency_cpu.cpp before the target pragma, so that inline
// library code is never compiled for AVX2 (the linker could otherwise hand that copy to the generic path).

using i64 = std::int64_t;

constexpr i64 kRowsPerTask = 16;  // fixed, never derived from the thread count (see above)

// Bilinear taps along one axis, align_corners=False, computed in float as ATen's CPU kernel does
// (area_pixel_compute_source_index + guard_index_and_lambda). s then agrees with F.interpolate to a few ulps:
// ATen rounds the blend of the four taps in its own order.
struct Taps {
  std::vector<i64> i0, i1;
  std::vector<float> w0, w1;
  std::vector<double> total;  // total[i] = sum over outputs of the weight on input i: upsample^T(1)

  Taps(i64 in, i64 out) : i0(out), i1(out), w0(out), w1(out), total(in, 0.0) {
    const float scale = static_cast<float>(in) / static_cast<float>(out);
    for (i64 p = 0; p < out; ++p) {
      const float src = std::max(scale * (static_cast<float>(p) + 0.5f) - 0.5f, 0.0f);
      const i64 lo = std::min(static_cast<i64>(std::floor(src)), in - 1);
      const float l1 = std::min(std::max(src - static_cast<float>(lo), 0.0f), 1.0f);
      i0[p] = lo;
      i1[p] = lo < in - 1 ? lo + 1 : lo;
      w0[p] = 1.0f - l1;
      w1[p] = l1;
      total[i0[p]] += w0[p];
      total[i1[p]] += w1[p];
    }
  }
};

struct Shape {
  i64 B, K, h, w, C, H, W;
  i64 hw() const { return h * w; }
  i64 HW() const { return H * W; }
  i64 tasks_per_sample() const { return (H + kRowsPerTask - 1) / kRowsPerTask; }
};

template <typename T>
T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

void check_shape(const Shape& sh) {
  if (sh.B < 0 || sh.K < 0 || sh.C < 0 || sh.h < 1 || sh.w < 1 || sh.H < 1 || sh.W < 1)
    throw std::invalid_argument(
        "megl._saliency_cpu: bad shape B=" + std::to_string(sh.B) + " K=" + std::to_string(sh.K) +
        " h=" + std::to_string(sh.h) + " w=" + std::to_string(sh.w) + " C=" + std::to_string(sh.C) +
        " H=" + std::to_string(sh.H) + " W=" + std::to_string(sh.W) + ": spatial sizes must be >= 1");
}

struct Required {
  const char* name;
  std::uintptr_t ptr;
  i64 numel;  // an empty tensor may have a null data pointer
};

void check_required(std::initializer_list<Required> tensors) {
  for (const auto& [name, p, numel] : tensors)
    if (p == 0 && numel > 0)
      throw std::invalid_argument(std::string("megl._saliency_cpu: required tensor '") + name +
                                  "' got a null pointer; pass tensor.data_ptr() of a contiguous float32 tensor");
}

#ifdef _OPENMP
int thread_count(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }
#else  // built without OpenMP (e.g. Apple clang): the pragmas are ignored, one thread
int thread_count(int) { return 1; }
#endif

// Natural log of a float that `omp simd` loops can vectorise (libm's logf is a scalar call, and this is the pixel
// pass's only transcendental). Cephes' logf: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = f - f^2/2 + f^3 P(f),
// f = m - 1 (exact), ln 2 split in two parts. Within 1 ulp of the exact result for every positive float, subnormals
// included (checked exhaustively); 0 -> -inf, inf -> inf, negative or NaN -> NaN.
// Every float op runs unconditionally and cases are blended with integer masks, not selected: under -ftrapping-math
// (the default) GCC will not if-convert a conditionally executed float op, and a branch stops vectorisation.
inline float log_f(float x) {
  const auto bits = [](float v) { std::uint32_t u; std::memcpy(&u, &v, sizeof u); return u; };
  const auto from_bits = [](std::uint32_t u) { float v; std::memcpy(&v, &u, sizeof v); return v; };
  const auto mask = [](bool b) { return 0u - static_cast<std::uint32_t>(b); };  // all ones if b
  const std::uint32_t u = bits(x), mag = u & 0x7fffffffu;
  const std::uint32_t sub = mask((u & 0x7f800000u) == 0);              // subnormal or zero: scale by 2^23
  const std::uint32_t v = (bits(x * 0x1p23f) & sub) | (u & ~sub);
  const std::uint32_t mant = v & 0x007fffffu;
  const std::uint32_t low = mask(mant < 0x003504f3u);                  // 1.mant < sqrt(2): m = 1.mant, else 1.mant / 2
  const float e = static_cast<float>(static_cast<std::int32_t>(((v >> 23) & 0xffu) - 126u - (low & 1u) - (sub & 23u)));
  const float f = from_bits(mant | (0x3f000000u + (low & 0x00800000u))) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  const float r = (f + y) + 0.693359375f * e;
  // special inputs: add -inf (x = 0), inf (x = inf) or NaN (x < 0 or NaN); otherwise add 0
  const std::uint32_t special = (mask(mag == 0) & 0xff800000u) | (mask(u == 0x7f800000u) & 0x7f800000u) |
                                (mask(mag > 0x7f800000u || (u >> 31 != 0 && mag != 0)) & 0x7fc00000u);
  return r + from_bits(special);
}

// q over the image, q = (prior + eps_kl) / S_q: the same for every sample.
std::vector<float> prior_q(const float* prior, float sum_q, float eps_kl, i64 n, int nt) {
  std::vector<float> q(n);
#pragma omp parallel for simd num_threads(nt) schedule(static)
  for (i64 i = 0; i < n; ++i) q[i] = (prior[i] + eps_kl) / sum_q;
  return q;
}

// The KL term of one pixel, as every backend computes it (docs/fused-op.md, "KL in float32"): with S_p known,
// p = (s + eps_kl) / S_p and one log of the ratio p / q, so every term is small and nothing large cancels.
inline float kl_term(float s, float q, float eps_kl, float sum_p, float& log_pq) {
  const float p = (s + eps_kl) / sum_p;
  log_pq = log_f(p / q);
  return p * log_pq;
}

// Σ_x p log(p / q) over one output row; with kGrad also gs[x] += ckl log(p / q), the KL term of the backward's g_s.
template <bool kGrad>
inline float kl_row(const float* srow, const float* qrow, i64 W, float eps_kl, float sum_p, float ckl, float* gs) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (i64 x = 0; x < W; ++x) {
    float log_pq;
    acc += kl_term(srow[x], qrow[x], eps_kl, sum_p, log_pq);
    if (kGrad) gs[x] += ckl * log_pq;
  }
  return acc;
}

// c = relu(cam) normalised to [0, 1] with the given min/max, in float exactly as the reference computes n.
inline void normalise(const float* cam, float lo, float hi, float eps, i64 hw, float* n) {
  const float d = (hi - lo) + eps;
  for (i64 i = 0; i < hw; ++i) n[i] = (std::max(cam[i], 0.0f) - lo) / d;
}

// ------------------------------------------------------------------------------------------------- forward
void forward(std::uintptr_t A_, std::uintptr_t G_, std::uintptr_t I_, std::uintptr_t mask_, std::uintptr_t has_mask_,
             std::uintptr_t prior_, i64 B, i64 K, i64 h, i64 w, i64 C, i64 H, i64 W, double eps_d, double eps_kl_d,
             std::uintptr_t s_, std::uintptr_t masked_, std::uintptr_t l1_, std::uintptr_t kl_, std::uintptr_t alpha_,
             std::uintptr_t cam_, std::uintptr_t stats_, int num_threads) {
  const Shape sh{B, K, h, w, C, H, W};
  check_shape(sh);
  check_required({{"activations", A_, B * K * h * w}, {"gradients", G_, B * K * h * w}, {"image", I_, B * C * H * W},
                  {"saliency", s_, B * H * W}, {"masked", masked_, B * C * H * W}, {"l1", l1_, B}, {"kl", kl_, B},
                  {"alpha", alpha_, B * K}, {"cam", cam_, B * h * w}, {"stats", stats_, B * 4}});
  if (mask_ != 0 && has_mask_ == 0)
    throw std::invalid_argument("megl._saliency_cpu.forward: mask given without has_mask; pass a (B,) bool tensor");
  const float *A = ptr<const float>(A_), *G = ptr<const float>(G_), *I = ptr<const float>(I_);
  const float *mask = ptr<const float>(mask_), *prior = ptr<const float>(prior_);
  const bool* has_mask = ptr<const bool>(has_mask_);
  float *s = ptr<float>(s_), *masked = ptr<float>(masked_), *l1 = ptr<float>(l1_), *kl = ptr<float>(kl_);
  float *alpha = ptr<float>(alpha_), *cam = ptr<float>(cam_), *stats = ptr<float>(stats_);
  const float eps = static_cast<float>(eps_d), eps_kl = static_cast<float>(eps_kl_d);
  const int nt = thread_count(num_threads);
  const i64 hw = sh.hw(), HW = sh.HW(), T = sh.tasks_per_sample();
  const Taps ty(h, H), tx(w, W);

  auto wants_kl = [&](i64 b) { return prior != nullptr && (has_mask == nullptr || !has_mask[b]); };
  auto wants_l1 = [&](i64 b) { return mask != nullptr && has_mask[b]; };

  double sum_q = 0.0;
  if (prior != nullptr)
    for (i64 i = 0; i < HW; ++i) sum_q += static_cast<double>(prior[i] + eps_kl);
  bool any_kl = false;
  for (i64 b = 0; b < B; ++b) any_kl = any_kl || wants_kl(b);
  const std::vector<float> qv = any_kl ? prior_q(prior, static_cast<float>(sum_q), eps_kl, HW, nt) : std::vector<float>();

  // Low resolution, per sample: alpha, cam, min/max, n, and n interpolated along x only (nh, h x W), from which
  // each output row is one blend of two nh rows. sum(s) follows from n by linearity: sum_yx n * total_y * total_x.
  std::vector<float> nh(B * h * W);
  std::vector<double> sum_p(B);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (i64 b = 0; b < B; ++b) {
    const float *Ab = A + b * K * hw, *Gb = G + b * K * hw;
    std::vector<double> z(hw, 0.0);
    for (i64 k = 0; k < K; ++k) {
      double g = 0.0;
      for (i64 i = 0; i < hw; ++i) g += Gb[k * hw + i];
      const float a = static_cast<float>(g / static_cast<double>(hw));
      alpha[b * K + k] = a;
      for (i64 i = 0; i < hw; ++i) z[i] += static_cast<double>(a) * Ab[k * hw + i];
    }
    float* camb = cam + b * hw;
    float lo = INFINITY, hi = -INFINITY;
    for (i64 i = 0; i < hw; ++i) {
      camb[i] = static_cast<float>(z[i]);
      const float c = std::max(camb[i], 0.0f);
      lo = std::min(lo, c);
      hi = std::max(hi, c);
    }
    std::vector<float> n(hw);
    normalise(camb, lo, hi, eps, hw, n.data());
    double total = 0.0;
    for (i64 y = 0; y < h; ++y) {
      float* row = nh.data() + (b * h + y) * W;
      const float* ny = n.data() + y * w;
      for (i64 q = 0; q < W; ++q) row[q] = ny[tx.i0[q]] * tx.w0[q] + ny[tx.i1[q]] * tx.w1[q];
      for (i64 x = 0; x < w; ++x) total += static_cast<double>(ny[x]) * ty.total[y] * tx.total[x];
    }
    sum_p[b] = total + static_cast<double>(HW) * eps_kl;
    float* st = stats + b * 4;
    st[0] = lo;
    st[1] = hi;
    st[2] = static_cast<float>(sum_p[b]);
    st[3] = prior != nullptr ? static_cast<float>(sum_q) : 0.0f;
  }

  // Full resolution: s, masked, and per-task partial sums of |s - mask| and p log(p / q). S_p is known already, from
  // the low-res map, so the KL is summed in its accurate form in this same pass.
  std::vector<double> part_l1(B * T, 0.0), part_kl(B * T, 0.0);
#pragma omp parallel for num_threads(nt) schedule(dynamic)
  for (i64 t = 0; t < B * T; ++t) {
    const i64 b = t / T, p0 = (t % T) * kRowsPerTask, p1 = std::min(p0 + kRowsPerTask, H);
    const bool do_l1 = wants_l1(b), do_kl = wants_kl(b);
    const float sp = stats[b * 4 + 2];  // the float S_p the backward reads
    double acc_l1 = 0.0, acc_kl = 0.0;
    for (i64 p = p0; p < p1; ++p) {
      const float *n0 = nh.data() + (b * h + ty.i0[p]) * W, *n1 = nh.data() + (b * h + ty.i1[p]) * W;
      const float wy0 = ty.w0[p], wy1 = ty.w1[p];
      float* srow = s + (b * H + p) * W;
#pragma omp simd
      for (i64 q = 0; q < W; ++q) srow[q] = n0[q] * wy0 + n1[q] * wy1;
      for (i64 c = 0; c < C; ++c) {
        const float* Ir = I + ((b * C + c) * H + p) * W;
        float* Mr = masked + ((b * C + c) * H + p) * W;
#pragma omp simd
        for (i64 q = 0; q < W; ++q) Mr[q] = Ir[q] * srow[q];
      }
      if (do_l1) {
        const float* mrow = mask + (b * H + p) * W;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (i64 q = 0; q < W; ++q) acc += std::fabs(srow[q] - mrow[q]);
        acc_l1 += acc;
      }
      if (do_kl) acc_kl += kl_row<false>(srow, qv.data() + p * W, W, eps_kl, sp, 0.0f, nullptr);
    }
    part_l1[t] = acc_l1;
    part_kl[t] = acc_kl;
  }

  for (i64 b = 0; b < B; ++b) {
    double sl1 = 0.0, skl = 0.0;
    for (i64 j = 0; j < T; ++j) sl1 += part_l1[b * T + j], skl += part_kl[b * T + j];
    l1[b] = wants_l1(b) ? static_cast<float>(sl1 / static_cast<double>(HW)) : 0.0f;
    kl[b] = wants_kl(b) ? static_cast<float>(skl) : 0.0f;
  }
}

// One output row of the image terms of the backward: gs = grad_s + sum_c g_out I and g_I = g_out s (g_I = 0 and
// gs = grad_s where grad_masked is absent). Row pointers at channel 0, channels `cs` apart. One fused pass per row
// for the usual channel counts; any other C takes per-channel passes through `sum_c`.
template <int kC>
inline void image_terms_fixed(i64 cs, i64 W, const float* grad_s, const float* go, const float* Ir, const float* srow,
                              float* gIr, float* gs) {
#pragma omp simd
  for (i64 q = 0; q < W; ++q) {
    float acc = go[q] * Ir[q];
    gIr[q] = go[q] * srow[q];
    for (int c = 1; c < kC; ++c) {
      acc += go[c * cs + q] * Ir[c * cs + q];
      gIr[c * cs + q] = go[c * cs + q] * srow[q];
    }
    gs[q] = grad_s != nullptr ? grad_s[q] + acc : acc;
  }
}

inline void image_terms(i64 C, i64 cs, i64 W, const float* grad_s, const float* go, const float* Ir, const float* srow,
                        float* gIr, float* gs, float* sum_c) {
  if (go == nullptr || C == 0) {
    if (grad_s != nullptr)
      std::memcpy(gs, grad_s, W * sizeof(float));
    else
      std::fill_n(gs, W, 0.0f);
    for (i64 c = 0; c < C; ++c) std::fill_n(gIr + c * cs, W, 0.0f);
    return;
  }
  if (C == 3) return image_terms_fixed<3>(cs, W, grad_s, go, Ir, srow, gIr, gs);
  if (C == 1) return image_terms_fixed<1>(cs, W, grad_s, go, Ir, srow, gIr, gs);
  for (i64 c = 0; c < C; ++c) {
    const float *g = go + c * cs, *x = Ir + c * cs;
    float* gx = gIr + c * cs;
#pragma omp simd
    for (i64 q = 0; q < W; ++q) {
      sum_c[q] = (c == 0 ? 0.0f : sum_c[q]) + g[q] * x[q];
      gx[q] = g[q] * srow[q];
    }
  }
#pragma omp simd
  for (i64 q = 0; q < W; ++q) gs[q] = grad_s != nullptr ? grad_s[q] + sum_c[q] : sum_c[q];
}

// ------------------------------------------------------------------------------------------------ backward
// g_s = grad_s + sum_c g_out I + w_l1 sign(s - mask) + w_kl (log(p/q) - kl) / sum_p, fused with g_I = g_out s and
// the adjoint of the upsampling. kl is not an input, so the constant -w_kl kl / sum_p is left out of the pixel
// pass (which sums kl on the way) and added afterwards at low resolution as -w_kl kl / sum_p * upsample^T(1).
void backward(std::uintptr_t grad_s_, std::uintptr_t grad_masked_, std::uintptr_t grad_l1_, std::uintptr_t grad_kl_,
              std::uintptr_t A_, std::uintptr_t I_, std::uintptr_t mask_, std::uintptr_t has_mask_,
              std::uintptr_t prior_, std::uintptr_t s_, std::uintptr_t alpha_, std::uintptr_t cam_,
              std::uintptr_t stats_, i64 B, i64 K, i64 h, i64 w, i64 C, i64 H, i64 W, double eps_d, double eps_kl_d,
              std::uintptr_t gA_, std::uintptr_t gG_, std::uintptr_t gI_, int num_threads) {
  const Shape sh{B, K, h, w, C, H, W};
  check_shape(sh);
  check_required({{"grad_l1", grad_l1_, B}, {"grad_kl", grad_kl_, B}, {"activations", A_, B * K * h * w},
                  {"image", I_, B * C * H * W}, {"saliency", s_, B * H * W}, {"alpha", alpha_, B * K},
                  {"cam", cam_, B * h * w}, {"stats", stats_, B * 4}, {"grad_activations", gA_, B * K * h * w},
                  {"grad_gradients", gG_, B * K * h * w}, {"grad_image", gI_, B * C * H * W}});
  if (mask_ != 0 && has_mask_ == 0)
    throw std::invalid_argument("megl._saliency_cpu.backward: mask given without has_mask; pass a (B,) bool tensor");
  const float *grad_s = ptr<const float>(grad_s_), *grad_masked = ptr<const float>(grad_masked_);
  const float *grad_l1 = ptr<const float>(grad_l1_), *grad_kl = ptr<const float>(grad_kl_);
  const float *A = ptr<const float>(A_), *I = ptr<const float>(I_), *mask = ptr<const float>(mask_);
  const float *prior = ptr<const float>(prior_), *s = ptr<const float>(s_), *alpha = ptr<const float>(alpha_);
  const float *cam = ptr<const float>(cam_), *stats = ptr<const float>(stats_);
  const bool* has_mask = ptr<const bool>(has_mask_);
  float *gA = ptr<float>(gA_), *gG = ptr<float>(gG_), *gI = ptr<float>(gI_);
  const float eps = static_cast<float>(eps_d), eps_kl = static_cast<float>(eps_kl_d);
  const int nt = thread_count(num_threads);
  const i64 hw = sh.hw(), HW = sh.HW(), T = sh.tasks_per_sample();
  const Taps ty(h, H), tx(w, W);

  // Per-sample weights of the loss terms; a zero weight skips the term (it would add exactly 0).
  std::vector<float> w_l1(B, 0.0f), c_kl(B, 0.0f);
  bool any_kl = false;
  for (i64 b = 0; b < B; ++b) {
    if (mask != nullptr && has_mask[b]) w_l1[b] = grad_l1[b] / static_cast<float>(HW);
    if (prior != nullptr && (has_mask == nullptr || !has_mask[b])) c_kl[b] = grad_kl[b] / stats[b * 4 + 2];
    any_kl = any_kl || c_kl[b] != 0.0f;
  }
  const std::vector<float> qv = any_kl ? prior_q(prior, stats[3], eps_kl, HW, nt) : std::vector<float>();  // S_q: any b

  // Pixel pass: per task, g_s rows are folded into gh (h x W, rows weighted by the y taps; at most kRowsPerTask
  // terms each, float) and then along x into a per-task low-res partial (h x w, double: thousands of terms).
  std::vector<double> part_gn(B * T * hw, 0.0), part_kl(B * T, 0.0);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> gs(W), sum_c(W);
    std::vector<float> gh(h * W);
#pragma omp for schedule(dynamic)
    for (i64 t = 0; t < B * T; ++t) {
      const i64 b = t / T, p0 = (t % T) * kRowsPerTask, p1 = std::min(p0 + kRowsPerTask, H);
      const i64 ya = ty.i0[p0], yb = ty.i1[p1 - 1];  // low-res rows this task touches
      std::fill(gh.begin() + ya * W, gh.begin() + (yb + 1) * W, 0.0f);
      const float wl1 = w_l1[b], ckl = c_kl[b];
      const float sp = stats[b * 4 + 2];
      double acc_kl = 0.0;
      for (i64 p = p0; p < p1; ++p) {
        const float* srow = s + (b * H + p) * W;
        image_terms(C, H * W, W, grad_s == nullptr ? nullptr : grad_s + (b * H + p) * W,
                    grad_masked == nullptr ? nullptr : grad_masked + (b * C * H + p) * W, I + (b * C * H + p) * W,
                    srow, gI + (b * C * H + p) * W, gs.data(), sum_c.data());
        if (wl1 != 0.0f) {
          const float* mrow = mask + (b * H + p) * W;
#pragma omp simd
          for (i64 q = 0; q < W; ++q) {
            const float d = srow[q] - mrow[q];
            gs[q] += d > 0.0f ? wl1 : d < 0.0f ? -wl1 : 0.0f;  // wl1 * sign(d), sign(0) = 0 as torch.sign
          }
        }
        if (ckl != 0.0f) acc_kl += kl_row<true>(srow, qv.data() + p * W, W, eps_kl, sp, ckl, gs.data());
        float *g0 = gh.data() + ty.i0[p] * W, *g1 = gh.data() + ty.i1[p] * W;
        const float wy0 = ty.w0[p], wy1 = ty.w1[p];
#pragma omp simd
        for (i64 q = 0; q < W; ++q) g0[q] += wy0 * gs[q];
#pragma omp simd
        for (i64 q = 0; q < W; ++q) g1[q] += wy1 * gs[q];
      }
      double* part = part_gn.data() + t * hw;
      for (i64 y = ya; y <= yb; ++y) {
        const float* g = gh.data() + y * W;
        double* py = part + y * w;
        for (i64 q = 0; q < W; ++q) {
          py[tx.i0[q]] += tx.w0[q] * g[q];
          py[tx.i1[q]] += tx.w1[q] * g[q];
        }
      }
      part_kl[t] = acc_kl;
    }
  }

  // Low resolution, per sample: reduce the partials in task order, then through min-max normalisation and relu.
  std::vector<float> gz(B * hw);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (i64 b = 0; b < B; ++b) {
    std::vector<double> gn(hw, 0.0);
    for (i64 j = 0; j < T; ++j) {
      const double* part = part_gn.data() + (b * T + j) * hw;
      for (i64 i = 0; i < hw; ++i) gn[i] += part[i];
    }
    const float* st = stats + b * 4;
    if (c_kl[b] != 0.0f) {
      double kl = 0.0;
      for (i64 j = 0; j < T; ++j) kl += part_kl[b * T + j];
      const double shift = static_cast<double>(c_kl[b]) * kl;
      for (i64 y = 0; y < h; ++y)
        for (i64 x = 0; x < w; ++x) gn[y * w + x] -= shift * ty.total[y] * tx.total[x];
    }
    const float lo = st[0], hi = st[1];
    const double d = static_cast<double>((hi - lo) + eps);
    const float* camb = cam + b * hw;
    std::vector<float> n(hw);
    normalise(camb, lo, hi, eps, hw, n.data());
    double g_min = 0.0, g_max = 0.0;
    i64 n_min = 0, n_max = 0;
    for (i64 i = 0; i < hw; ++i) {
      g_min += gn[i] * (n[i] - 1.0) / d;
      g_max -= gn[i] * n[i] / d;
      const float c = std::max(camb[i], 0.0f);
      n_min += c == lo;
      n_max += c == hi;
    }
    // The gradient of min (max) is shared evenly by the tied entries, as torch.amin / amax do.
    for (i64 i = 0; i < hw; ++i) {
      const float c = std::max(camb[i], 0.0f);
      double g = gn[i] / d;
      if (c == lo) g += g_min / static_cast<double>(n_min);
      if (c == hi) g += g_max / static_cast<double>(n_max);
      gz[b * hw + i] = camb[i] > 0.0f ? static_cast<float>(g) : 0.0f;
    }
  }

  // g_A = alpha_k g_z ;  g_G = sum_ij g_z A_k / (h w), the same at every (i, j).
#pragma omp parallel for num_threads(nt) schedule(static)
  for (i64 bk = 0; bk < B * K; ++bk) {
    const float* g = gz.data() + (bk / K) * hw;
    const float* Ak = A + bk * hw;
    float *gAk = gA + bk * hw, *gGk = gG + bk * hw;
    const float a = alpha[bk];
    double dot = 0.0;
    for (i64 i = 0; i < hw; ++i) {
      gAk[i] = a * g[i];
      dot += static_cast<double>(g[i]) * Ak[i];
    }
    const float v = static_cast<float>(dot / static_cast<double>(hw));
    std::fill_n(gGk, hw, v);
  }
}
