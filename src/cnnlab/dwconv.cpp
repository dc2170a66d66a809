// Depthwise 3x3 convolution on CPU for channels_last tensors: forward, input gradient, weight gradient.
//
// Built on first use by cnnlab/dwconv.py (torch.utils.cpp_extension.load_inline) and registered as
// torch.ops.cnnlab_dwconv.{forward,backward}; the caller allocates the outputs.
//
// Layout: x is (N, H, W, C) in memory, output channel o = c * M + j reads input channel c (depth
// multiplier M = Co / C); the weight comes as w9 (9, Co): tap kh * 3 + kw, then output channel,
// in the accumulation type A (float for float32 and bfloat16, double for float64).
//
// The work goes row by row: the three input rows a row of output needs are converted to A, repeated
// M times per channel and zero-padded into a small per-thread ring of rows (which stays in the L1/L2
// cache), so the inner loops are plain multiply-adds over contiguous channel vectors that the
// compiler vectorises. The input gradient is the same gather over padded gradient rows (a transposed
// convolution, one pass per stride phase), summed over the M copies of each input channel; the
// weight gradient keeps a (9, Co) block per thread and reduces the blocks in a fixed order, so the
// result does not depend on scheduling.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using cnnlab::Acc;
using cnnlab::narrow;
using cnnlab::widen;

constexpr int64_t kPad = 2;  // zero columns on each side of a gradient row (enough for stride <= 2, padding <= 1)

struct Geometry {
  int64_t N, C, H, W, M, Co, Ho, Wo, stride, pad;
};

// ---------------------------------------------------------------- row preparation
// An input row (W, C) -> (pad + W + pad, Co): each channel repeated M times, zero columns around it.
template <int M, typename T, typename A>
void expand_row_m(const T* src, A* dst, const Geometry& g, int64_t m) {
  const int64_t mm = M ? M : m, Co = g.C * mm;
  std::fill(dst, dst + g.pad * Co, A(0));
  std::fill(dst + (g.pad + g.W) * Co, dst + (2 * g.pad + g.W) * Co, A(0));
  A* out = dst + g.pad * Co;
  for (int64_t i = 0; i < g.W * g.C; ++i) {
    const A v = widen(src[i]);
    for (int64_t j = 0; j < mm; ++j) out[i * mm + j] = v;
  }
}

template <typename T, typename A>
void expand_row(const T* src, A* dst, const Geometry& g) {
  if (g.M == 1) return expand_row_m<1>(src, dst, g, 1);
  if (g.M == 2) return expand_row_m<2>(src, dst, g, 2);
  expand_row_m<0>(src, dst, g, g.M);
}

// A gradient row (Wo, Co) -> (kPad + Wo + kPad, Co) in the accumulation type.
template <typename T, typename A>
void pad_grad_row(const T* src, A* dst, const Geometry& g) {
  std::fill(dst, dst + kPad * g.Co, A(0));
  std::fill(dst + (kPad + g.Wo) * g.Co, dst + (2 * kPad + g.Wo) * g.Co, A(0));
  A* out = dst + kPad * g.Co;
  for (int64_t i = 0; i < g.Wo * g.Co; ++i) out[i] = widen(src[i]);
}

// The input gradient of a row from its (W, Co) sums: add the M copies of each input channel.
template <int M, typename T, typename A>
void sum_copies(const A* src, T* dst, int64_t n, int64_t m) {
  const int64_t mm = M ? M : m;
  for (int64_t i = 0; i < n; ++i) {
    A v = 0;
    for (int64_t j = 0; j < mm; ++j) v += src[i * mm + j];
    narrow(v, dst[i]);
  }
}

// Three prepared rows (a ring keyed by image and row), refilled only when a row is new.
template <typename A>
struct RowRing {
  std::vector<A> data;
  int64_t len;
  int64_t key[3] = {-1, -1, -1};
  explicit RowRing(int64_t len) : data(3 * len), len(len) {}
  template <typename Fill>
  const A* get(int64_t id, int64_t row, Fill fill) {
    const int64_t slot = row % 3;
    A* p = data.data() + slot * len;
    if (key[slot] != id) {
      fill(p);
      key[slot] = id;
    }
    return p;
  }
};

// ---------------------------------------------------------------- the multiply-add kernels
// Explicit 64-byte vectors (GCC/Clang vector extensions; two or four registers where the CPU's are
// narrower): left alone, GCC vectorises these loops across the wrong axis, with gathers.
typedef float VecF __attribute__((vector_size(64)));
typedef double VecD __attribute__((vector_size(64)));
template <typename A> struct Vec { using type = VecF; };
template <> struct Vec<double> { using type = VecD; };
template <typename A> constexpr int64_t kLanes = sizeof(typename Vec<A>::type) / sizeof(A);

template <typename A, typename V = typename Vec<A>::type>
inline V loadv(const A* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename A, typename V>
inline void storev(A* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }

// The 3x3 stencil over one row of output: out[pos] = sum_{kh, kw} rows[kh][(pos * S + kw) * Co] *
// w[kh][REV ? 2 - kw : kw] (REV: the input gradient, a correlation with the mirrored kernel); a
// null row counts as zeros. U positions at a time: each input vector is loaded once for the (up
// to) three taps that read it, and U accumulator chains are in flight.
template <int S, int U> constexpr int kWindow = (U - 1) * S + 3;  // input columns U positions read

template <int S, int U, typename A, typename V>
inline void load_window(const A* row, int64_t p, int64_t Co, V* v) {
  for (int j = 0; j < kWindow<S, U>; ++j) v[j] = loadv(row + (p * S + j) * Co);
}

template <int S, int U, typename A, typename V>
inline void stencil_u(const A* const* rows, const V* wk, int64_t Co, int64_t p, A* out, int64_t out_step) {
  V acc[U] = {};
  for (int kh = 0; kh < 3; ++kh) {
    if (!rows[kh]) continue;
    V v[kWindow<S, U>];
    load_window<S, U>(rows[kh], p, Co, v);
    for (int kw = 0; kw < 3; ++kw)
      for (int u = 0; u < U; ++u) acc[u] += v[u * S + kw] * wk[kh * 3 + kw];
  }
  for (int u = 0; u < U; ++u) storev(out + (p + u) * out_step, acc[u]);
}

template <int S, bool REV, typename A>
void stencil_vec(const A* const* rows, const A* w9, int64_t Co, int64_t npos, A* out, int64_t out_step) {
  using V = typename Vec<A>::type;
  V wk[9];
  for (int k = 0; k < 9; ++k) wk[k] = loadv(w9 + (REV ? k / 3 * 3 + 2 - k % 3 : k) * Co);
  int64_t p = 0;
  for (; p + 4 <= npos; p += 4) stencil_u<S, 4>(rows, wk, Co, p, out, out_step);
  for (; p < npos; ++p) stencil_u<S, 1>(rows, wk, Co, p, out, out_step);
}

template <bool REV, typename A>
void stencil_row(const A* const* rows, const A* w9, int64_t Co, int64_t npos, int64_t stride, A* out,
                 int64_t out_step) {
  for (int64_t ob = 0; ob < Co; ob += (Co - ob >= kLanes<A> ? kLanes<A> : 1)) {
    const A* r[3];
    for (int kh = 0; kh < 3; ++kh) r[kh] = rows[kh] ? rows[kh] + ob : nullptr;
    if (Co - ob >= kLanes<A> && stride == 1) {
      stencil_vec<1, REV>(r, w9 + ob, Co, npos, out + ob, out_step);
    } else if (Co - ob >= kLanes<A>) {
      stencil_vec<2, REV>(r, w9 + ob, Co, npos, out + ob, out_step);
    } else {  // a channel left over after the vectors
      for (int64_t p = 0; p < npos; ++p) {
        A acc = 0;
        for (int kh = 0; kh < 3; ++kh)
          for (int kw = 0; r[kh] && kw < 3; ++kw)
            acc += r[kh][(p * stride + kw) * Co] * w9[(kh * 3 + (REV ? 2 - kw : kw)) * Co + ob];
        out[p * out_step + ob] = acc;
      }
    }
  }
}

// A row of taps given one by one: out[pos] = sum_t src[t][pos * Co] * w[t], for the input
// gradient of stride 2, where which taps reach an input column depends on its phase.
template <typename A>
void tap_row(const A* const* src, const A* const* w, int nt, int64_t Co, int64_t npos, A* out, int64_t out_step) {
  using V = typename Vec<A>::type;
  for (int64_t ob = 0; ob < Co; ob += (Co - ob >= kLanes<A> ? kLanes<A> : 1)) {
    if (Co - ob >= kLanes<A>) {
      V wk[9];
      for (int t = 0; t < nt; ++t) wk[t] = loadv(w[t] + ob);
      for (int64_t p = 0; p < npos; ++p) {
        V acc = {};
        for (int t = 0; t < nt; ++t) acc += loadv(src[t] + p * Co + ob) * wk[t];
        storev(out + p * out_step + ob, acc);
      }
    } else {
      for (int64_t p = 0; p < npos; ++p) {
        A acc = 0;
        for (int t = 0; t < nt; ++t) acc += src[t][p * Co + ob] * w[t][ob];
        out[p * out_step + ob] = acc;
      }
    }
  }
}

// The weight gradient of one output row: gw[kh][kw] += sum_pos g[pos] * rows[kh][(pos * S + kw) * Co],
// nine accumulators in registers, U positions at a time (each input vector loaded once).
template <int S, int U, typename A, typename V>
inline void wgrad_u(const A* const* rows, const A* g, int64_t Co, int64_t p, V* acc) {
  V gv[U];
  for (int u = 0; u < U; ++u) gv[u] = loadv(g + (p + u) * Co);
  for (int kh = 0; kh < 3; ++kh) {
    if (!rows[kh]) continue;
    V v[kWindow<S, U>];
    load_window<S, U>(rows[kh], p, Co, v);
    for (int kw = 0; kw < 3; ++kw)
      for (int u = 0; u < U; ++u) acc[kh * 3 + kw] += gv[u] * v[u * S + kw];
  }
}

template <int S, typename A>
void wgrad_vec(const A* const* rows, const A* g, int64_t Co, int64_t npos, A* gw) {
  using V = typename Vec<A>::type;
  V acc[9];
  for (int k = 0; k < 9; ++k) acc[k] = loadv(gw + k * Co);
  int64_t p = 0;
  for (; p + 4 <= npos; p += 4) wgrad_u<S, 4>(rows, g, Co, p, acc);
  for (; p < npos; ++p) wgrad_u<S, 1>(rows, g, Co, p, acc);
  for (int k = 0; k < 9; ++k) storev(gw + k * Co, acc[k]);
}

template <typename A>
void wgrad_row(const A* const* rows, const A* g, int64_t Co, int64_t npos, int64_t stride, A* gw) {
  for (int64_t ob = 0; ob < Co; ob += (Co - ob >= kLanes<A> ? kLanes<A> : 1)) {
    const A* r[3];
    for (int kh = 0; kh < 3; ++kh) r[kh] = rows[kh] ? rows[kh] + ob : nullptr;
    if (Co - ob >= kLanes<A> && stride == 1) {
      wgrad_vec<1>(r, g + ob, Co, npos, gw + ob);
    } else if (Co - ob >= kLanes<A>) {
      wgrad_vec<2>(r, g + ob, Co, npos, gw + ob);
    } else {
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; r[kh] && kw < 3; ++kw) {
          A acc = gw[(kh * 3 + kw) * Co + ob];
          for (int64_t p = 0; p < npos; ++p) acc += g[p * Co + ob] * r[kh][(p * stride + kw) * Co];
          gw[(kh * 3 + kw) * Co + ob] = acc;
        }
    }
  }
}

// ---------------------------------------------------------------- forward
template <typename T>
void forward_impl(const T* x, const typename Acc<T>::type* w9, T* out, const Geometry& g) {
  using A = typename Acc<T>::type;
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    RowRing<A> ring((g.W + 2 * g.pad) * g.Co);
    std::vector<A> tmp(std::is_same<T, A>::value ? 0 : g.Wo * g.Co);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.Ho, oh = r % g.Ho;
      const A* rows[3];
      for (int kh = 0; kh < 3; ++kh) {
        const int64_t ih = oh * g.stride - g.pad + kh;
        rows[kh] = (ih < 0 || ih >= g.H) ? nullptr
            : ring.get(n * g.H + ih, ih, [&](A* dst) { expand_row(x + (n * g.H + ih) * g.W * g.C, dst, g); });
      }
      T* o = out + r * g.Wo * g.Co;
      if constexpr (std::is_same<T, A>::value) {
        stencil_row<false>(rows, w9, g.Co, g.Wo, g.stride, o, g.Co);
      } else {
        stencil_row<false>(rows, w9, g.Co, g.Wo, g.stride, tmp.data(), g.Co);
        for (int64_t i = 0; i < g.Wo * g.Co; ++i) narrow(tmp[i], o[i]);
      }
    }
  });
}

// ---------------------------------------------------------------- backward
// One image's input-gradient row ih, from the padded gradient rows (a transposed convolution).
// Stride 1: the mirrored stencil. Stride 2: per phase q (columns iw = q, q + 2, ...) the taps that
// land on an output position.
template <typename T, typename A>
void input_grad_row(const T* grad, int64_t n, int64_t ih, const A* w9, const Geometry& g, RowRing<A>& ring,
                    A* tmp, T* gx) {
  const int64_t s = g.stride;
  const A* grow[3] = {nullptr, nullptr, nullptr};
  for (int kh = 0; kh < 3; ++kh) {
    const int64_t t = ih + g.pad - kh;
    if (t < 0 || t % s || t / s >= g.Ho) continue;
    const int64_t oh = t / s;
    grow[kh] = ring.get(n * g.Ho + oh, oh, [&](A* dst) { pad_grad_row(grad + (n * g.Ho + oh) * g.Wo * g.Co, dst, g); });
  }
  A* dst = tmp;  // the (W, Co) sums; with multiplier 1 in the storage type, the gradient row itself
  if constexpr (std::is_same<T, A>::value) {
    if (g.M == 1) dst = gx;
  }
  if (s == 1) {  // column iw, tap kw reads gradient column iw + pad - kw
    const A* rows[3];
    for (int kh = 0; kh < 3; ++kh) rows[kh] = grow[kh] ? grow[kh] + (kPad + g.pad - 2) * g.Co : nullptr;
    stencil_row<true>(rows, w9, g.Co, g.W, 1, dst, g.Co);
  } else {
    for (int64_t q = 0; q < s && q < g.W; ++q) {
      const A* src[9];
      const A* w[9];
      int nt = 0;
      for (int kh = 0; kh < 3; ++kh) {
        for (int kw = 0; grow[kh] && kw < 3; ++kw) {
          const int64_t d = q + g.pad - kw;  // position a reads gradient column a + d / s
          if (((d % s) + s) % s) continue;
          src[nt] = grow[kh] + (kPad + d / s) * g.Co;  // d is a multiple of s here
          w[nt] = w9 + (kh * 3 + kw) * g.Co;
          ++nt;
        }
      }
      tap_row<A>(src, w, nt, g.Co, (g.W - q + s - 1) / s, dst + q * g.Co, s * g.Co);
    }
  }
  if (dst != tmp) return;
  if (g.M == 1) return sum_copies<1>(tmp, gx, g.W * g.C, 1);
  if (g.M == 2) return sum_copies<2>(tmp, gx, g.W * g.C, 2);
  sum_copies<0>(tmp, gx, g.W * g.C, g.M);
}

template <typename T, typename A>
void weight_grad_row(const T* x, const T* grad, int64_t n, int64_t oh, const Geometry& g, RowRing<A>& xring,
                     RowRing<A>& gring, A* gw) {
  const A* rows[3];
  for (int kh = 0; kh < 3; ++kh) {
    const int64_t ih = oh * g.stride - g.pad + kh;
    rows[kh] = (ih < 0 || ih >= g.H) ? nullptr
        : xring.get(n * g.H + ih, ih, [&](A* dst) { expand_row(x + (n * g.H + ih) * g.W * g.C, dst, g); });
  }
  const A* grow = gring.get(n * g.Ho + oh, oh, [&](A* dst) { pad_grad_row(grad + (n * g.Ho + oh) * g.Wo * g.Co, dst, g); });
  wgrad_row(rows, grow + kPad * g.Co, g.Co, g.Wo, g.stride, gw);
}

template <typename T>
void backward_impl(const T* grad, const T* x, const typename Acc<T>::type* w9, T* gx,
                   typename Acc<T>::type* gw9, const Geometry& g) {
  using A = typename Acc<T>::type;
  // fixed chunks of images, one weight-gradient block each, summed in chunk order: deterministic
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(g.N, at::get_num_threads()));
  std::vector<A> parts(gw9 ? chunks * 9 * g.Co : 0, A(0));
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    RowRing<A> xring((g.W + 2 * g.pad) * g.Co), gring((g.Wo + 2 * kPad) * g.Co);
    std::vector<A> tmp(g.W * g.Co);
    for (int64_t c = cb; c < ce; ++c) {
      for (int64_t n = c * g.N / chunks; n < (c + 1) * g.N / chunks; ++n) {
        // one pass over the gradient rows: after row oh, every input row whose taps reach no
        // further than oh gets its gradient (the ring still holds rows oh - 2 .. oh)
        int64_t ih = 0;
        for (int64_t oh = 0; oh <= g.Ho; ++oh) {
          if (gw9 && oh < g.Ho) weight_grad_row(x, grad, n, oh, g, xring, gring, parts.data() + c * 9 * g.Co);
          const int64_t ready = oh < g.Ho ? std::min(g.H, oh * g.stride - g.pad + g.stride) : g.H;
          for (; gx && ih < ready; ++ih)
            input_grad_row(grad, n, ih, w9, g, gring, tmp.data(), gx + (n * g.H + ih) * g.W * g.C);
        }
      }
    }
  });
  if (gw9) {
    std::fill(gw9, gw9 + 9 * g.Co, A(0));
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t i = 0; i < 9 * g.Co; ++i) gw9[i] += parts[c * 9 * g.Co + i];
  }
}

// ---------------------------------------------------------------- checks and dispatch
Geometry geometry(const at::Tensor& x, const at::Tensor& w9, int64_t out_h, int64_t out_w, int64_t stride,
                  int64_t pad) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), "dwconv: x must be 4-D channels_last");
  TORCH_CHECK(w9.dim() == 2 && w9.size(0) == 9 && w9.is_contiguous(), "dwconv: w9 must be a contiguous (9, Co) tensor");
  TORCH_CHECK(stride >= 1 && stride <= 2 && pad >= 0 && pad <= 1, "dwconv: stride 1-2 and padding 0-1 only");
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), 0, w9.size(1), out_h, out_w, stride, pad};
  TORCH_CHECK(g.C > 0 && g.Co % g.C == 0, "dwconv: output channels must be a multiple of input channels");
  g.M = g.Co / g.C;
  TORCH_CHECK(g.Ho == (g.H + 2 * pad - 3) / stride + 1 && g.Wo == (g.W + 2 * pad - 3) / stride + 1 && g.Ho > 0 && g.Wo > 0,
              "dwconv: output size does not match");
  return g;
}

void forward(const at::Tensor& x, const at::Tensor& w9, const at::Tensor& out, int64_t stride, int64_t pad) {
  const Geometry g = geometry(x, w9, out.size(2), out.size(3), stride, pad);
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_contiguous(at::MemoryFormat::ChannelsLast) &&
              out.size(0) == g.N && out.size(1) == g.Co, "dwconv: bad output tensor");
  cnnlab::dispatch(x.scalar_type(), "dwconv", [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    TORCH_CHECK(w9.scalar_type() == c10::CppTypeToScalarType<A>::value, "dwconv: w9 has the wrong dtype");
    forward_impl<T>(x.const_data_ptr<T>(), w9.const_data_ptr<A>(), out.mutable_data_ptr<T>(), g);
  });
}

// grad_x or grad_w9 may be empty (not wanted)
void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w9, const at::Tensor& grad_x,
              const at::Tensor& grad_w9, int64_t stride, int64_t pad) {
  const Geometry g = geometry(x, w9, grad.size(2), grad.size(3), stride, pad);
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && grad.is_contiguous(at::MemoryFormat::ChannelsLast) &&
              grad.size(0) == g.N && grad.size(1) == g.Co, "dwconv: bad gradient tensor");
  const bool want_x = grad_x.numel() > 0, want_w = grad_w9.numel() > 0;
  TORCH_CHECK(!want_x || (grad_x.sizes() == x.sizes() && grad_x.scalar_type() == x.scalar_type() &&
                          grad_x.is_contiguous(at::MemoryFormat::ChannelsLast)), "dwconv: bad grad_x tensor");
  TORCH_CHECK(!want_w || (grad_w9.sizes() == w9.sizes() && grad_w9.scalar_type() == w9.scalar_type() &&
                          grad_w9.is_contiguous()), "dwconv: bad grad_w9 tensor");
  cnnlab::dispatch(x.scalar_type(), "dwconv", [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    TORCH_CHECK(w9.scalar_type() == c10::CppTypeToScalarType<A>::value, "dwconv: w9 has the wrong dtype");
    backward_impl<T>(grad.const_data_ptr<T>(), x.const_data_ptr<T>(), w9.const_data_ptr<A>(),
                     want_x ? grad_x.mutable_data_ptr<T>() : nullptr, want_w ? grad_w9.mutable_data_ptr<A>() : nullptr, g);
  });
}

}  // namespace

TORCH_LIBRARY(cnnlab_dwconv, m) {
  m.def("forward(Tensor x, Tensor w9, Tensor(a!) out, int stride, int padding) -> ()", &forward);
  m.def("backward(Tensor grad, Tensor x, Tensor w9, Tensor(a!) grad_x, Tensor(b!) grad_w9, int stride, int padding) -> ()",
        &backward);
}
