// BatchNorm in training mode fused with the activation (ReLU or GELU) and dropout that follow it, on
// CPU, for channels_last or NCHW tensors: forward and backward in two passes over memory each.
//
// Built on first use by cnnlab/ext.py and registered as torch.ops.cnnlab_bnact.{forward,backward,keep_mask}.
//
// Layouts: channels_last x is (N, H, W, C) in memory, a (R = N * H * W, C) matrix worked in tiles of
// whole rows; NCHW x is N * C planes of H * W values, one channel each. Per-channel sums are kept
// in the accumulation type A over a tile or plane and added into double, in a fixed order, so the
// result does not depend on scheduling (for a given thread count).
//
// Dropout draws no random tensor: an element is kept when a hash of (its tile or plane, its place
// there, the seed) is at least p * 2^32, so backward recomputes the mask from the seed instead of
// storing it, and BN's output z (for the ReLU mask or GELU's derivative) is recomputed from x and
// the per-channel scale and shift (with fma, so both passes agree). GELU is the exact one,
// z * Phi(z), with Phi from a polynomial erf (absolute error < 1.5e-7) in float32 and bfloat16.
// Torch's modules (batch_norm, relu, dropout) write and read six more full-size tensors.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using cnnlab::Acc;
using cnnlab::narrow;
using cnnlab::widen;

inline uint32_t fmix(uint32_t h) {  // murmur3's finaliser: every input bit reaches every output bit
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Dropout draws: a tile's hash, then one per element of the tile; uniform over 32 bits, independent
// across tiles, elements and seeds. One multiply-xor round per element, in 32-bit lanes.
inline uint32_t tile_draw(uint64_t t, uint64_t seed) {
  const uint32_t h = fmix((uint32_t(t) * 0x9E3779B1u) ^ uint32_t(seed));
  return fmix(h ^ (uint32_t(t >> 32) * 0x85EBCA77u) ^ uint32_t(seed >> 32));
}
inline uint32_t draw(uint32_t tile, uint32_t j) { return fmix(tile ^ (j * 0x9E3779B1u)); }

// the activation after BN: none, ReLU, or GELU (exact: z * Phi(z))
enum Kind : int64_t { kNone = 0, kRelu = 1, kGelu = 2 };

struct Act {
  int64_t kind;
  bool dropout;
  uint32_t threshold;  // kept when draw >= threshold
  double keep_scale;   // 1 / (1 - p)
  uint64_t seed;
};

Act make_act(int64_t kind, double p, int64_t seed) {
  TORCH_CHECK(kind == kNone || kind == kRelu || kind == kGelu, "bnact: act must be 0 (none), 1 (ReLU) or 2 (GELU)");
  TORCH_CHECK(p >= 0 && p < 1, "bnact: dropout probability must be in [0, 1)");
  const double t = std::min(std::round(p * 4294967296.0), 4294967295.0);
  return Act{kind, p > 0, uint32_t(t), 1.0 / (1.0 - p), uint64_t(seed)};
}

// exp(x) for x <= 0 in float, vectorisable: 2^k times a degree-6 polynomial on |r| <= ln2 / 2
// (relative error ~2e-7); below -87, and for NaN (whose NaN the caller's z carries on), it gives
// exp(-87), ~1.6e-38, so the int conversion below stays defined. (No std::max, whose reference
// result, and no std::floor, which may not raise "inexact", keep the compiler from vectorising.)
inline float exp_nonpositive(float x) {
  x = x >= -87.0f ? x : -87.0f;
  const float k = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // x / ln2 rounded to an integer (1.5 * 2^23 trick)
  const float r = std::fma(k, -1.42860677e-06f, std::fma(k, -0.693145751953125f, x));  // x - k ln2, in two parts
  float q = 1.0f / 720;
  q = std::fma(q, r, 1.0f / 120);
  q = std::fma(q, r, 1.0f / 24);
  q = std::fma(q, r, 1.0f / 6);
  q = std::fma(q, r, 0.5f);
  q = std::fma(q, r, 1.0f);
  q = std::fma(q, r, 1.0f);
  const int32_t bits = (int32_t(k) + 127) << 23;  // 2^k, k in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, 4);
  return q * scale;
}

// The standard normal's cdf Phi(z) and density phi(z). Float: erf(|z| / sqrt 2) from Abramowitz &
// Stegun 7.1.26 (absolute error < 1.5e-7), which needs the same exp(-z^2 / 2) as the density.
inline void normal(float z, float& cdf, float& pdf) {
  const float e = exp_nonpositive(-0.5f * z * z);
  const float t = 1.0f / std::fma(0.3275911f * 0.70710678f, std::fabs(z), 1.0f);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float tail = 0.5f * poly * e;  // Phi(-|z|)
  cdf = z < 0.0f ? tail : 1.0f - tail;
  pdf = 0.398942280f * e;
}
inline void normal(double z, double& cdf, double& pdf) {
  cdf = 0.5 * std::erfc(-z * 0.70710678118654752);
  pdf = 0.39894228040143268 * std::exp(-0.5 * z * z);
}

// The work goes by tiles of whole rows, about kTile values: each loop runs over a tile as one flat
// vector (long, whatever C is), with the per-channel numbers repeated to the tile's length.
constexpr int64_t kTile = 512;

struct Tiles {
  int64_t R, C, rows, count;  // rows per tile, number of tiles
  Tiles(int64_t R_, int64_t C_) : R(R_), C(C_), rows(std::max<int64_t>(1, kTile / C_)), count((R_ + rows - 1) / rows) {}
  int64_t begin(int64_t t) const { return t * rows * C; }                               // first value of tile t
  int64_t size(int64_t t) const { return (std::min(R, (t + 1) * rows) - t * rows) * C; }  // values in tile t
  int64_t length() const { return rows * C; }
};

// per-channel values repeated over a tile: out[j] = v[j % C]
template <typename A>
std::vector<A> repeat(const A* v, const Tiles& t) {
  std::vector<A> out(t.length());
  for (int64_t j = 0; j < t.length(); ++j) out[j] = v[j % t.C];
  return out;
}

// The dropout factors of tile t: 1 / (1 - p) where kept, 0 where dropped.
template <typename A>
void drop_factors(int64_t t, int64_t n, const Act& a, A* f) {
  const uint32_t th = tile_draw(uint64_t(t), a.seed);
  const A s = A(a.keep_scale);
  for (uint32_t j = 0; j < uint32_t(n); ++j) f[j] = draw(th, j) >= a.threshold ? s : A(0);
}

// What reaches the output from BN's output z: the activation, then times the dropout factor.
template <int64_t ACT, bool DROP, typename A>
inline A activate(A z, A keep) {
  if (ACT == kRelu) z = z < A(0) ? A(0) : z;
  if (ACT == kGelu) {
    A cdf, pdf;
    normal(z, cdf, pdf);
    z = z * cdf;
  }
  return DROP ? z * keep : z;
}

// The gradient reaching z from the gradient dy of the output.
template <int64_t ACT, bool DROP, typename A>
inline A gate(A dy, A z, A keep) {
  if (ACT == kRelu) dy = z > A(0) ? dy : A(0);
  if (ACT == kGelu) {  // d/dz z Phi(z) = Phi(z) + z phi(z)
    A cdf, pdf;
    normal(z, cdf, pdf);
    dy = dy * std::fma(z, pdf, cdf);
  }
  return DROP ? dy * keep : dy;
}

// f(ACT, DROP) with the activation and dropout of a as compile-time constants, so the inner loops
// have no branches
template <typename F>
void with_flags(const Act& a, F f) {
  auto drop = [&](auto act) {
    if (a.dropout) return f(act, std::true_type());
    f(act, std::false_type());
  };
  if (a.kind == kRelu) return drop(std::integral_constant<int64_t, kRelu>());
  if (a.kind == kGelu) return drop(std::integral_constant<int64_t, kGelu>());
  drop(std::integral_constant<int64_t, kNone>());
}

// Two per-channel sums: f(t, a1, a2) adds tile t's values into the tile-long sums a1 and a2, kept
// in A for about kFold values per thread, then folded per channel into double; threads take
// contiguous chunks of tiles, and the chunks are summed in a fixed order.
constexpr int64_t kFold = 8192;

template <typename A, typename F>
void channel_sums(const Tiles& tiles, F f, std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t C = tiles.C, L = tiles.length();
  const int64_t fold = std::max<int64_t>(1, kFold / L);  // tiles between folds
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles.count / (2 * fold)));
  std::vector<double> p1(chunks * C, 0.0), p2(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<A> a1(L), a2(L);
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t t0 = k * tiles.count / chunks, t1 = (k + 1) * tiles.count / chunks;
      for (int64_t b = t0; b < t1; b += fold) {
        std::fill(a1.begin(), a1.end(), A(0));
        std::fill(a2.begin(), a2.end(), A(0));
        for (int64_t t = b; t < std::min(b + fold, t1); ++t) f(t, a1.data(), a2.data());
        for (int64_t r = 0; r < tiles.rows; ++r)
          for (int64_t c = 0; c < C; ++c) {
            p1[k * C + c] += a1[r * C + c];
            p2[k * C + c] += a2[r * C + c];
          }
      }
    }
  });
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  for (int64_t k = 0; k < chunks; ++k)
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += p1[k * C + c];
      s2[c] += p2[k * C + c];
    }
}

// Mean and biased variance per channel from sums of (x - first) and its square over R values.
template <typename A>
void moments(const std::vector<double>& s1, const std::vector<double>& s2, const std::vector<A>& first, double R,
             A* mean, A* var) {
  for (size_t c = 0; c < first.size(); ++c) {
    const double m = s1[c] / R;
    mean[c] = A(double(first[c]) + m);
    var[c] = A(std::max(s2[c] / R - m * m, 0.0));
  }
}

// From the backward sums (of g and of g * (x - mean)) over R values: the bias and weight sums, and
// per channel grad_x = w * (g - k1 - (x - mean) * k2).
template <typename A>
void backward_coefficients(const std::vector<double>& s1, const std::vector<double>& s2, double R, const A* invstd,
                           const A* weight, A* sum_g, A* sum_gd, std::vector<A>& k1, std::vector<A>& k2,
                           std::vector<A>& w) {
  const size_t C = s1.size();
  k1.resize(C);
  k2.resize(C);
  w.resize(C);
  for (size_t c = 0; c < C; ++c) {
    sum_g[c] = A(s1[c]);
    sum_gd[c] = A(s2[c]);
    k1[c] = A(s1[c] / R);
    k2[c] = A(s2[c] / R * double(invstd[c]) * double(invstd[c]));
    w[c] = weight[c] * invstd[c];
  }
}

// Mean and biased variance per channel, from sums shifted by the mean of the first tile (exact
// when the mean is large against the spread, where E[x^2] - E[x]^2 would cancel).
template <typename T>
void stats_impl(const T* x, const Tiles& tiles, typename Acc<T>::type* mean, typename Acc<T>::type* var) {
  using A = typename Acc<T>::type;
  std::vector<A> first(tiles.C);
  const int64_t rows0 = tiles.size(0) / tiles.C;
  for (int64_t c = 0; c < tiles.C; ++c) {
    double sum = 0;
    for (int64_t r = 0; r < rows0; ++r) sum += double(widen(x[r * tiles.C + c]));
    first[c] = A(sum / double(rows0));
  }
  const std::vector<A> shift = repeat(first.data(), tiles);
  std::vector<double> s1, s2;
  channel_sums<A>(tiles, [&](int64_t t, A* a1, A* a2) {
    const T* xt = x + tiles.begin(t);
    const int64_t n = tiles.size(t);
    #pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const A d = widen(xt[j]) - shift[j];
      a1[j] += d;
      a2[j] += d * d;
    }
  }, s1, s2);
  moments(s1, s2, first, double(tiles.R), mean, var);
}

template <int64_t ACT, bool DROP, typename T>
void forward_impl(const T* x, const typename Acc<T>::type* scale_c, const typename Acc<T>::type* shift_c, T* out,
                  const Tiles& tiles, const Act& a) {
  using A = typename Acc<T>::type;
  const std::vector<A> scale = repeat(scale_c, tiles), shift = repeat(shift_c, tiles);
  at::parallel_for(0, tiles.count, 4, [&](int64_t tb, int64_t te) {
    std::vector<A> keep(DROP ? tiles.length() : 0);
    for (int64_t t = tb; t < te; ++t) {
      const T* xt = x + tiles.begin(t);
      T* ot = out + tiles.begin(t);
      const int64_t n = tiles.size(t);
      if (DROP) drop_factors(t, n, a, keep.data());
      #pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        narrow(activate<ACT, DROP>(std::fma(widen(xt[j]), scale[j], shift[j]), DROP ? keep[j] : A(1)), ot[j]);
    }
  });
}

// grad_x = weight * invstd * (g - mean(g) - (x - mean) * invstd^2 * mean(g * (x - mean))), g = gate(dy)
template <int64_t ACT, bool DROP, typename T>
void backward_impl(const T* dy, const T* x, const typename Acc<T>::type* mean_c, const typename Acc<T>::type* invstd,
                   const typename Acc<T>::type* weight, const typename Acc<T>::type* scale_c,
                   const typename Acc<T>::type* shift_c, T* gx, typename Acc<T>::type* sum_g,
                   typename Acc<T>::type* sum_gd, const Tiles& tiles, const Act& a) {
  using A = typename Acc<T>::type;
  const int64_t R = tiles.R;
  const std::vector<A> scale = repeat(scale_c, tiles), shift = repeat(shift_c, tiles), mean = repeat(mean_c, tiles);
  std::vector<double> s1, s2;
  channel_sums<A>(tiles, [&](int64_t t, A* a1, A* a2) {
    thread_local std::vector<A> keep;
    const T *xt = x + tiles.begin(t), *gt = dy + tiles.begin(t);
    const int64_t n = tiles.size(t);
    if (DROP) {
      keep.resize(tiles.length());
      drop_factors(t, n, a, keep.data());
    }
    const A* kp = DROP ? keep.data() : nullptr;
    #pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const A v = widen(xt[j]);
      const A g = gate<ACT, DROP>(widen(gt[j]), std::fma(v, scale[j], shift[j]), DROP ? kp[j] : A(1));
      a1[j] += g;
      a2[j] += g * (v - mean[j]);
    }
  }, s1, s2);
  std::vector<A> k1c, k2c, wc;
  backward_coefficients(s1, s2, double(R), invstd, weight, sum_g, sum_gd, k1c, k2c, wc);
  if (!gx) return;
  const std::vector<A> k1 = repeat(k1c.data(), tiles), k2 = repeat(k2c.data(), tiles), w = repeat(wc.data(), tiles);
  at::parallel_for(0, tiles.count, 4, [&](int64_t tb, int64_t te) {
    std::vector<A> keep(DROP ? tiles.length() : 0);
    for (int64_t t = tb; t < te; ++t) {
      const T *xt = x + tiles.begin(t), *gt = dy + tiles.begin(t);
      T* ot = gx + tiles.begin(t);
      const int64_t n = tiles.size(t);
      if (DROP) drop_factors(t, n, a, keep.data());
      #pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const A v = widen(xt[j]);
        const A g = gate<ACT, DROP>(widen(gt[j]), std::fma(v, scale[j], shift[j]), DROP ? keep[j] : A(1));
        narrow(w[j] * (g - k1[j] - (v - mean[j]) * k2[j]), ot[j]);
      }
    }
  });
}

// ---------------------------------------------------------------- NCHW: planes of one channel
// Plane p = n * C + c holds channel c's H * W values, so the per-channel numbers are scalars in
// each loop; plane p's dropout draws use tile number p.
struct Planes {
  int64_t N, C, HW;
};

// Two per-channel sums: f(p, j0, j1, a1, a2) sums values j0..j1-1 of plane p into a1 and a2 (at
// most kFold values, then added into double); planes in parallel, each plane's sums kept apart
// and added per channel in plane order.
template <typename A, typename F>
void plane_sums(const Planes& g, F f, std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t P = g.N * g.C;
  std::vector<double> q1(P, 0.0), q2(P, 0.0);
  at::parallel_for(0, P, 4, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p)
      for (int64_t j0 = 0; j0 < g.HW; j0 += kFold) {
        A a1 = A(0), a2 = A(0);
        f(p, j0, std::min(j0 + kFold, g.HW), a1, a2);
        q1[p] += a1;
        q2[p] += a2;
      }
  });
  s1.assign(g.C, 0.0);
  s2.assign(g.C, 0.0);
  for (int64_t p = 0; p < P; ++p) {
    s1[p % g.C] += q1[p];
    s2[p % g.C] += q2[p];
  }
}

template <typename T>
void stats_planes(const T* x, const Planes& g, typename Acc<T>::type* mean, typename Acc<T>::type* var) {
  using A = typename Acc<T>::type;
  std::vector<A> first(g.C);  // the shift: each channel's mean over the first image
  for (int64_t c = 0; c < g.C; ++c) {
    double sum = 0;
    for (int64_t j = 0; j < g.HW; ++j) sum += double(widen(x[c * g.HW + j]));
    first[c] = A(sum / double(g.HW));
  }
  std::vector<double> s1, s2;
  plane_sums<A>(g, [&](int64_t p, int64_t j0, int64_t j1, A& a1, A& a2) {
    const T* xp = x + p * g.HW;
    const A k = first[p % g.C];
    #pragma omp simd reduction(+ : a1, a2)
    for (int64_t j = j0; j < j1; ++j) {
      const A d = widen(xp[j]) - k;
      a1 += d;
      a2 += d * d;
    }
  }, s1, s2);
  moments(s1, s2, first, double(g.N * g.HW), mean, var);
}

template <int64_t ACT, bool DROP, typename T>
void forward_planes(const T* x, const typename Acc<T>::type* scale, const typename Acc<T>::type* shift, T* out,
                    const Planes& g, const Act& a) {
  using A = typename Acc<T>::type;
  at::parallel_for(0, g.N * g.C, 4, [&](int64_t pb, int64_t pe) {
    std::vector<A> keep(DROP ? g.HW : 0);
    for (int64_t p = pb; p < pe; ++p) {
      const T* xp = x + p * g.HW;
      T* op = out + p * g.HW;
      const A sc = scale[p % g.C], sh = shift[p % g.C];
      if (DROP) drop_factors(p, g.HW, a, keep.data());
      #pragma omp simd
      for (int64_t j = 0; j < g.HW; ++j)
        narrow(activate<ACT, DROP>(std::fma(widen(xp[j]), sc, sh), DROP ? keep[j] : A(1)), op[j]);
    }
  });
}

template <int64_t ACT, bool DROP, typename T>
void backward_planes(const T* dy, const T* x, const typename Acc<T>::type* mean, const typename Acc<T>::type* invstd,
                     const typename Acc<T>::type* weight, const typename Acc<T>::type* scale,
                     const typename Acc<T>::type* shift, T* gx, typename Acc<T>::type* sum_g,
                     typename Acc<T>::type* sum_gd, const Planes& g, const Act& a) {
  using A = typename Acc<T>::type;
  std::vector<double> s1, s2;
  plane_sums<A>(g, [&](int64_t p, int64_t j0, int64_t j1, A& a1, A& a2) {
    thread_local std::vector<A> keep;
    const T *xp = x + p * g.HW, *gp = dy + p * g.HW;
    const int64_t c = p % g.C;
    const A sc = scale[c], sh = shift[c], m = mean[c];
    if (DROP && j0 == 0) {  // once per plane, before its first range
      keep.resize(g.HW);
      drop_factors(p, g.HW, a, keep.data());
    }
    const A* kp = DROP ? keep.data() : nullptr;
    #pragma omp simd reduction(+ : a1, a2)
    for (int64_t j = j0; j < j1; ++j) {
      const A v = widen(xp[j]);
      const A gr = gate<ACT, DROP>(widen(gp[j]), std::fma(v, sc, sh), DROP ? kp[j] : A(1));
      a1 += gr;
      a2 += gr * (v - m);
    }
  }, s1, s2);
  std::vector<A> k1, k2, w;
  backward_coefficients(s1, s2, double(g.N * g.HW), invstd, weight, sum_g, sum_gd, k1, k2, w);
  if (!gx) return;
  at::parallel_for(0, g.N * g.C, 4, [&](int64_t pb, int64_t pe) {
    std::vector<A> keep(DROP ? g.HW : 0);
    for (int64_t p = pb; p < pe; ++p) {
      const T *xp = x + p * g.HW, *gp = dy + p * g.HW;
      T* op = gx + p * g.HW;
      const int64_t c = p % g.C;
      const A sc = scale[c], sh = shift[c], m = mean[c], wc = w[c], k1c = k1[c], k2c = k2[c];
      if (DROP) drop_factors(p, g.HW, a, keep.data());
      #pragma omp simd
      for (int64_t j = 0; j < g.HW; ++j) {
        const A v = widen(xp[j]);
        const A gr = gate<ACT, DROP>(widen(gp[j]), std::fma(v, sc, sh), DROP ? keep[j] : A(1));
        narrow(wc * (gr - k1c - (v - m) * k2c), op[j]);
      }
    }
  });
}

// ---------------------------------------------------------------- checks and dispatch
// x is 4-D, with more than one value per channel, in the layout the caller names
void check_input(const at::Tensor& x, bool channels_last) {
  TORCH_CHECK(x.dim() == 4, "bnact: x must be 4-D");
  TORCH_CHECK(x.size(1) > 0 && x.numel() > x.size(1), "bnact: need more than 1 value per channel");
  TORCH_CHECK(x.is_contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              "bnact: x must be ", channels_last ? "channels_last" : "contiguous (NCHW)");
}

template <typename A>
A* channel_ptr(const at::Tensor& t, int64_t C, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.is_contiguous() &&
              t.scalar_type() == c10::CppTypeToScalarType<A>::value, "bnact: ", what, " must be a contiguous (C,) "
              "tensor in the accumulation dtype");
  return static_cast<A*>(t.data_ptr());
}

// z = x * scale + shift: BN's output with the batch statistics, computed once here for both passes
template <typename A>
void affine(const A* weight, const A* bias, const A* mean, const A* invstd, int64_t C, std::vector<A>& scale,
            std::vector<A>& shift) {
  scale.resize(C);
  shift.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = weight[c] * invstd[c];
    shift[c] = bias[c] - mean[c] * scale[c];
  }
}

// (out, mean, invstd); running_mean and running_var (when given) move towards the batch's mean and
// unbiased variance by ``momentum``, as torch's BatchNorm does
// (out, mean, invstd) for x channels_last (cl) or NCHW; running_mean and running_var (when given)
// move towards the batch's mean and unbiased variance by ``momentum``, as torch's BatchNorm does.
// out has x's layout.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& bias,
                                                       const std::optional<at::Tensor>& running_mean,
                                                       const std::optional<at::Tensor>& running_var, double momentum,
                                                       double eps, int64_t act, double p, int64_t seed, bool cl) {
  check_input(x, cl);
  const int64_t C = x.size(1), R = x.numel() / C;
  const Planes planes{x.size(0), C, x.size(2) * x.size(3)};
  const Act a = make_act(act, p, seed);
  at::Tensor out = at::empty_like(x, cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty({C}, weight.options()), invstd = at::empty({C}, weight.options());
  cnnlab::dispatch(x.scalar_type(), "bnact", [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    A *m = channel_ptr<A>(mean, C, "weight"), *is = channel_ptr<A>(invstd, C, "weight");
    std::vector<A> var(C), scale, shift;
    if (cl)
      stats_impl<T>(x.const_data_ptr<T>(), Tiles(R, C), m, var.data());
    else
      stats_planes<T>(x.const_data_ptr<T>(), planes, m, var.data());
    for (int64_t c = 0; c < C; ++c) is[c] = A(1) / std::sqrt(var[c] + A(eps));
    if (running_mean && running_mean->defined()) {
      A* rm = channel_ptr<A>(*running_mean, C, "running_mean");
      for (int64_t c = 0; c < C; ++c) rm[c] += A(momentum) * (m[c] - rm[c]);
    }
    if (running_var && running_var->defined()) {
      A* rv = channel_ptr<A>(*running_var, C, "running_var");
      const A unbias = A(double(R) / double(R - 1));
      for (int64_t c = 0; c < C; ++c) rv[c] += A(momentum) * (var[c] * unbias - rv[c]);
    }
    affine(channel_ptr<A>(weight, C, "weight"), channel_ptr<A>(bias, C, "bias"), m, is, C, scale, shift);
    with_flags(a, [&](auto act_, auto drop_) {
      constexpr int64_t ACT = decltype(act_)::value;
      constexpr bool DROP = decltype(drop_)::value;
      if (cl)
        forward_impl<ACT, DROP, T>(x.const_data_ptr<T>(), scale.data(), shift.data(), out.mutable_data_ptr<T>(),
                                    Tiles(R, C), a);
      else
        forward_planes<ACT, DROP, T>(x.const_data_ptr<T>(), scale.data(), shift.data(), out.mutable_data_ptr<T>(),
                                      planes, a);
    });
  });
  return {out, mean, invstd};
}

// (grad_x, grad_weight, grad_bias); grad_x is empty unless want_x; grad has x's layout
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& weight, const at::Tensor& bias,
                                                        const at::Tensor& mean, const at::Tensor& invstd, int64_t act,
                                                        double p, int64_t seed, bool want_x, bool cl) {
  check_input(x, cl);
  const int64_t C = x.size(1), R = x.numel() / C;
  const Planes planes{x.size(0), C, x.size(2) * x.size(3)};
  const auto layout = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous(layout),
              "bnact: grad must have x's shape, dtype and layout");
  const Act a = make_act(act, p, seed);
  at::Tensor grad_x = want_x ? at::empty_like(x, layout) : at::Tensor();
  at::Tensor grad_w = at::empty({C}, weight.options()), grad_b = at::empty({C}, weight.options());
  cnnlab::dispatch(x.scalar_type(), "bnact", [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const A *m = channel_ptr<A>(mean, C, "mean"), *is = channel_ptr<A>(invstd, C, "invstd");
    const A* w = channel_ptr<A>(weight, C, "weight");
    A *gw = channel_ptr<A>(grad_w, C, "weight"), *gb = channel_ptr<A>(grad_b, C, "weight");
    std::vector<A> scale, shift;
    affine(w, channel_ptr<A>(bias, C, "bias"), m, is, C, scale, shift);
    T* gx = want_x ? grad_x.mutable_data_ptr<T>() : nullptr;
    with_flags(a, [&](auto act_, auto drop_) {
      constexpr int64_t ACT = decltype(act_)::value;
      constexpr bool DROP = decltype(drop_)::value;
      if (cl)
        backward_impl<ACT, DROP, T>(grad.const_data_ptr<T>(), x.const_data_ptr<T>(), m, is, w, scale.data(),
                                     shift.data(), gx, gb, gw, Tiles(R, C), a);
      else
        backward_planes<ACT, DROP, T>(grad.const_data_ptr<T>(), x.const_data_ptr<T>(), m, is, w, scale.data(),
                                       shift.data(), gx, gb, gw, planes, a);
    });
    for (int64_t c = 0; c < C; ++c) gw[c] *= is[c];  // sum(g * (x - mean)) * invstd
  });
  return {grad_x, grad_w, grad_b};
}

// The dropout keep-mask of a call (1 = kept), in memory order: for a channels_last tensor out is
// (N * H * W, C); for NCHW, (N * C, H * W), one plane per row. For tests and for inspection.
void keep_mask(const at::Tensor& out, double p, int64_t seed, bool channels_last) {
  TORCH_CHECK(out.scalar_type() == at::kBool && out.dim() == 2 && out.is_contiguous() && out.size(1) > 0,
              "bnact: keep_mask needs a contiguous 2-D bool tensor");
  const Act a = make_act(kNone, p, seed);
  bool* o = out.mutable_data_ptr<bool>();
  const Tiles tiles(out.size(0), out.size(1));
  const int64_t count = channels_last ? tiles.count : out.size(0);
  std::vector<float> keep(channels_last ? tiles.length() : out.size(1));
  for (int64_t t = 0; t < count; ++t) {
    const int64_t n = channels_last ? tiles.size(t) : out.size(1), begin = channels_last ? tiles.begin(t) : t * n;
    drop_factors(t, n, a, keep.data());
    for (int64_t j = 0; j < n; ++j) o[begin + j] = !a.dropout || keep[j] > 0;
  }
}

}  // namespace

TORCH_LIBRARY(cnnlab_bnact, m) {
  m.def("forward(Tensor x, Tensor weight, Tensor bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "float momentum, float eps, int act, float p, int seed, bool channels_last) -> (Tensor, Tensor, Tensor)",
        &forward);
  m.def("backward(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor invstd, int act, float p, "
        "int seed, bool want_x, bool channels_last) -> (Tensor, Tensor, Tensor)", &backward);
  m.def("keep_mask(Tensor(a!) out, float p, int seed, bool channels_last) -> ()", &keep_mask);
}
