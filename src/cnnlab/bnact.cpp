// BatchNorm in training mode fused with the ReLU and dropout that follow it, on CPU, for
// channels_last tensors: forward and backward in two passes over memory each.
//
// Built on first use by cnnlab/ext.py and registered as torch.ops.cnnlab_bnact.{forward,backward,keep_mask}.
//
// Layout: x is (N, H, W, C) in memory, seen here as a (R = N * H * W, C) matrix. Per-channel sums
// are kept in the accumulation type A over blocks of rows and added into double per chunk of rows;
// the chunks are summed in a fixed order, so the result does not depend on scheduling.
//
// Dropout draws no random tensor: element (r, c) is kept when a hash of (r, c, seed) is at least
// p * 2^32, so backward recomputes the mask from the seed instead of storing it, and the ReLU mask
// is recomputed from x and the per-channel scale and shift (with fma, so both passes agree).
// Torch's composite (batch_norm, relu, dropout) writes and reads six more full-size tensors.

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

constexpr int64_t kBlock = 64;  // rows summed in A before adding into double
constexpr int64_t kLanes = 4;   // rows r, r + 1, ... add into kLanes separate sums: no chain of dependent adds

inline uint32_t fmix(uint32_t h) {  // murmur3's finaliser: every input bit reaches every output bit
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Dropout draws: a block's hash, then one per element of the block; uniform over 32 bits, independent
// across blocks, elements and seeds. One multiply-xor round per element, in 32-bit lanes.
inline uint32_t block_draw(uint64_t b, uint64_t seed) {
  const uint32_t h = fmix((uint32_t(b) * 0x9E3779B1u) ^ uint32_t(seed));
  return fmix(h ^ (uint32_t(b >> 32) * 0x85EBCA77u) ^ uint32_t(seed >> 32));
}
inline uint32_t draw(uint32_t block, uint32_t j) { return fmix(block ^ (j * 0x9E3779B1u)); }

struct Act {
  bool relu;
  bool dropout;
  uint32_t threshold;  // kept when draw >= threshold
  float keep_scale;    // 1 / (1 - p)
  uint64_t seed;
};

Act make_act(bool relu, double p, int64_t seed) {
  TORCH_CHECK(p >= 0 && p < 1, "bnact: dropout probability must be in [0, 1)");
  const double t = std::min(std::round(p * 4294967296.0), 4294967295.0);
  return Act{relu, p > 0, uint32_t(t), float(1.0 / (1.0 - p)), uint64_t(seed)};
}

// The dropout factors of a block of kDropRows rows: 1 / (1 - p) where kept, 0 where dropped; block b's
// hash, then one draw per element of the block. A loop in 32-bit lanes the compiler vectorises, long
// enough for few channels; the loops that use the factors are then plain multiplies.
constexpr int64_t kDropRows = 16;

template <typename A>
struct DropFactors {
  const Act& a;
  int64_t C;
  std::vector<A> f;
  int64_t block = -1;

  DropFactors(const Act& act, int64_t channels) : a(act), C(channels), f(kDropRows * channels) {}

  const A* row(int64_t r) {  // the factors of row r (recomputed when r enters another block)
    const int64_t b = r / kDropRows;
    if (b != block) {
      const uint32_t bh = block_draw(uint64_t(b), a.seed), n = uint32_t(kDropRows * C);
      const A s = A(a.keep_scale);
      for (uint32_t j = 0; j < n; ++j) f[j] = draw(bh, j) >= a.threshold ? s : A(0);
      block = b;
    }
    return f.data() + (r - b * kDropRows) * C;
  }
};

// What reaches the output from BN's output z: ReLU, then times the dropout factor.
template <bool RELU, bool DROP, typename A>
inline A activate(A z, A keep) {
  if (RELU) z = z < A(0) ? A(0) : z;
  return DROP ? z * keep : z;
}

// The gradient reaching z from the gradient dy of the output.
template <bool RELU, bool DROP, typename A>
inline A gate(A dy, A z, A keep) {
  if (RELU) dy = z > A(0) ? dy : A(0);
  return DROP ? dy * keep : dy;
}

// f<RELU, DROP>() with the flags of a as compile-time constants, so the inner loops have no branches
template <typename F>
void with_flags(const Act& a, F f) {
  if (a.relu && a.dropout) return f(std::true_type(), std::true_type());
  if (a.relu) return f(std::true_type(), std::false_type());
  if (a.dropout) return f(std::false_type(), std::true_type());
  f(std::false_type(), std::false_type());
}

// Two per-channel sums over rows: f(rb, re, a1, a2) adds rows rb..re-1 into a1 and a2, row r into
// lane r % kLanes (a1 + (r % kLanes) * C); chunked for threads and summed in a fixed order.
template <typename A, typename F>
void channel_sums(int64_t R, int64_t C, F f, std::vector<double>& s1, std::vector<double>& s2) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R / (4 * kBlock)));
  std::vector<double> p1(chunks * C, 0.0), p2(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<A> a1(kLanes * C), a2(kLanes * C);
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t r0 = k * R / chunks, r1 = (k + 1) * R / chunks;
      for (int64_t b = r0; b < r1; b += kBlock) {
        std::fill(a1.begin(), a1.end(), A(0));
        std::fill(a2.begin(), a2.end(), A(0));
        f(b, std::min(b + kBlock, r1), a1.data(), a2.data());
        for (int64_t l = 0; l < kLanes; ++l)
          for (int64_t c = 0; c < C; ++c) {
            p1[k * C + c] += a1[l * C + c];
            p2[k * C + c] += a2[l * C + c];
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

// Mean and biased variance per channel, from sums shifted by the first row (exact when the mean
// is large against the spread, where E[x^2] - E[x]^2 would cancel).
template <typename T>
void stats_impl(const T* x, int64_t R, int64_t C, typename Acc<T>::type* mean, typename Acc<T>::type* var) {
  using A = typename Acc<T>::type;
  std::vector<A> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = widen(x[c]);
  std::vector<double> s1, s2;
  channel_sums<A>(R, C, [&](int64_t rb, int64_t re, A* a1, A* a2) {
    for (int64_t r = rb; r < re; ++r) {
      const T* row = x + r * C;
      A *l1 = a1 + (r % kLanes) * C, *l2 = a2 + (r % kLanes) * C;
      #pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A d = widen(row[c]) - shift[c];
        l1[c] += d;
        l2[c] += d * d;
      }
    }
  }, s1, s2);
  for (int64_t c = 0; c < C; ++c) {
    const double m = s1[c] / double(R);
    mean[c] = A(double(shift[c]) + m);
    var[c] = A(std::max(s2[c] / double(R) - m * m, 0.0));
  }
}

template <bool RELU, bool DROP, typename T>
void forward_impl(const T* x, const typename Acc<T>::type* scale, const typename Acc<T>::type* shift, T* out,
                  int64_t R, int64_t C, const Act& a) {
  using A = typename Acc<T>::type;
  at::parallel_for(0, R, 256, [&](int64_t rb, int64_t re) {
    DropFactors<A> drop(a, DROP ? C : 0);
    for (int64_t r = rb; r < re; ++r) {
      const T* row = x + r * C;
      T* orow = out + r * C;
      const A* keep = DROP ? drop.row(r) : nullptr;
      #pragma omp simd
      for (int64_t c = 0; c < C; ++c)
        narrow(activate<RELU, DROP>(std::fma(widen(row[c]), scale[c], shift[c]), DROP ? keep[c] : A(1)), orow[c]);
    }
  });
}

// grad_x = weight * invstd * (g - mean(g) - (x - mean) * invstd^2 * mean(g * (x - mean))), g = gate(dy)
template <bool RELU, bool DROP, typename T>
void backward_impl(const T* dy, const T* x, const typename Acc<T>::type* mean, const typename Acc<T>::type* invstd,
                   const typename Acc<T>::type* weight, const typename Acc<T>::type* scale,
                   const typename Acc<T>::type* shift, T* gx, typename Acc<T>::type* sum_g,
                   typename Acc<T>::type* sum_gd, int64_t R, int64_t C, const Act& a) {
  using A = typename Acc<T>::type;
  std::vector<double> s1, s2;
  channel_sums<A>(R, C, [&](int64_t rb, int64_t re, A* a1, A* a2) {
    DropFactors<A> drop(a, DROP ? C : 0);
    for (int64_t r = rb; r < re; ++r) {
      const T *row = x + r * C, *grow = dy + r * C;
      const A* keep = DROP ? drop.row(r) : nullptr;
      A *l1 = a1 + (r % kLanes) * C, *l2 = a2 + (r % kLanes) * C;
      #pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A v = widen(row[c]);
        const A g = gate<RELU, DROP>(widen(grow[c]), std::fma(v, scale[c], shift[c]), DROP ? keep[c] : A(1));
        l1[c] += g;
        l2[c] += g * (v - mean[c]);
      }
    }
  }, s1, s2);
  std::vector<A> k1(C), k2(C), w(C);
  for (int64_t c = 0; c < C; ++c) {
    sum_g[c] = A(s1[c]);
    sum_gd[c] = A(s2[c]);
    k1[c] = A(s1[c] / double(R));
    k2[c] = A(s2[c] / double(R) * double(invstd[c]) * double(invstd[c]));
    w[c] = weight[c] * invstd[c];
  }
  if (!gx) return;
  at::parallel_for(0, R, 256, [&](int64_t rb, int64_t re) {
    DropFactors<A> drop(a, DROP ? C : 0);
    for (int64_t r = rb; r < re; ++r) {
      const T *row = x + r * C, *grow = dy + r * C;
      T* orow = gx + r * C;
      const A* keep = DROP ? drop.row(r) : nullptr;
      #pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A v = widen(row[c]);
        const A g = gate<RELU, DROP>(widen(grow[c]), std::fma(v, scale[c], shift[c]), DROP ? keep[c] : A(1));
        narrow(w[c] * (g - k1[c] - (v - mean[c]) * k2[c]), orow[c]);
      }
    }
  });
}

// ---------------------------------------------------------------- checks and dispatch
int64_t rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), "bnact: x must be 4-D channels_last");
  TORCH_CHECK(x.size(1) > 0 && x.numel() > x.size(1), "bnact: need more than 1 value per channel");
  return x.numel() / x.size(1);
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
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& weight,
                                                       const at::Tensor& bias,
                                                       const std::optional<at::Tensor>& running_mean,
                                                       const std::optional<at::Tensor>& running_var, double momentum,
                                                       double eps, bool relu, double p, int64_t seed) {
  const int64_t R = rows(x), C = x.size(1);
  const Act a = make_act(relu, p, seed);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({C}, weight.options()), invstd = at::empty({C}, weight.options());
  cnnlab::dispatch(x.scalar_type(), "bnact", [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    A *m = channel_ptr<A>(mean, C, "weight"), *is = channel_ptr<A>(invstd, C, "weight");
    std::vector<A> var(C), scale, shift;
    stats_impl<T>(x.const_data_ptr<T>(), R, C, m, var.data());
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
    with_flags(a, [&](auto relu_, auto drop_) {
      forward_impl<decltype(relu_)::value, decltype(drop_)::value, T>(x.const_data_ptr<T>(), scale.data(),
                                                                     shift.data(), out.mutable_data_ptr<T>(), R, C, a);
    });
  });
  return {out, mean, invstd};
}

// (grad_x, grad_weight, grad_bias); grad_x is empty unless want_x
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& weight, const at::Tensor& bias,
                                                        const at::Tensor& mean, const at::Tensor& invstd, bool relu,
                                                        double p, int64_t seed, bool want_x) {
  const int64_t R = rows(x), C = x.size(1);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
              grad.is_contiguous(at::MemoryFormat::ChannelsLast), "bnact: grad must be channels_last like x");
  const Act a = make_act(relu, p, seed);
  at::Tensor grad_x = want_x ? at::empty_like(x, at::MemoryFormat::ChannelsLast) : at::Tensor();
  at::Tensor grad_w = at::empty({C}, weight.options()), grad_b = at::empty({C}, weight.options());
  cnnlab::dispatch(x.scalar_type(), "bnact", [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const A *m = channel_ptr<A>(mean, C, "mean"), *is = channel_ptr<A>(invstd, C, "invstd");
    const A* w = channel_ptr<A>(weight, C, "weight");
    A *gw = channel_ptr<A>(grad_w, C, "weight"), *gb = channel_ptr<A>(grad_b, C, "weight");
    std::vector<A> scale, shift;
    affine(w, channel_ptr<A>(bias, C, "bias"), m, is, C, scale, shift);
    with_flags(a, [&](auto relu_, auto drop_) {
      backward_impl<decltype(relu_)::value, decltype(drop_)::value, T>(
          grad.const_data_ptr<T>(), x.const_data_ptr<T>(), m, is, w, scale.data(), shift.data(),
          want_x ? grad_x.mutable_data_ptr<T>() : nullptr, gb, gw, R, C, a);
    });
    for (int64_t c = 0; c < C; ++c) gw[c] *= is[c];  // sum(g * (x - mean)) * invstd
  });
  return {grad_x, grad_w, grad_b};
}

// the dropout keep-mask of a call (1 = kept) for an (R, C) matrix: for tests and for inspection
void keep_mask(const at::Tensor& out, double p, int64_t seed) {
  TORCH_CHECK(out.scalar_type() == at::kBool && out.dim() == 2 && out.is_contiguous(),
              "bnact: keep_mask needs a contiguous (R, C) bool tensor");
  const Act a = make_act(false, p, seed);
  bool* o = out.mutable_data_ptr<bool>();
  const int64_t R = out.size(0), C = out.size(1);
  at::parallel_for(0, R, 256, [&](int64_t rb, int64_t re) {
    DropFactors<float> drop(a, C);
    for (int64_t r = rb; r < re; ++r) {
      const float* keep = a.dropout ? drop.row(r) : nullptr;
      for (int64_t c = 0; c < C; ++c) o[r * C + c] = !a.dropout || keep[c] > 0;
    }
  });
}

}  // namespace

TORCH_LIBRARY(cnnlab_bnact, m) {
  m.def("forward(Tensor x, Tensor weight, Tensor bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
        "float momentum, float eps, bool relu, float p, int seed) -> (Tensor, Tensor, Tensor)", &forward);
  m.def("backward(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor invstd, bool relu, float p, "
        "int seed, bool want_x) -> (Tensor, Tensor, Tensor)", &backward);
  m.def("keep_mask(Tensor(a!) out, float p, int seed) -> ()", &keep_mask);
}
