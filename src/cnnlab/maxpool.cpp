// 2x2 max-pooling with stride 2 on CPU, for channels_last or NCHW tensors, forward and backward.
//
// Built on first use by cnnlab/ext.py and registered as torch.ops.cnnlab_maxpool.{forward,backward}.
//
// Forward writes the maximum of each 2x2 window and which of its four values it was (one byte,
// 0..3 in the order (0,0), (0,1), (1,0), (1,1)); torch keeps an int64 index per output value, eight
// times the bytes, freshly allocated each step. Backward writes every input gradient once, the
// output gradient where the window's maximum was and 0 elsewhere, instead of zero-filling the input
// gradient and scattering into it. As torch: the first of equal values wins, and a NaN wins (the
// last NaN of the window). Rows and columns left over by an odd size get no output and a zero gradient.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cstdint>

namespace {

using cnnlab::Acc;
using cnnlab::widen;

// y[k] = max over the window a[k], b[k], c[k], d[k] (in that order), idx[k] = its place 0..3
template <typename T>
inline void window_max(const T* a, const T* b, const T* c, const T* d, T* y, uint8_t* idx, int64_t n) {
  using A = typename Acc<T>::type;
  for (int64_t k = 0; k < n; ++k) {
    A m = widen(a[k]);
    T v = a[k];
    uint8_t j = 0;
    const T* in[3] = {b, c, d};
    for (int q = 0; q < 3; ++q) {
      const A u = widen(in[q][k]);
      const bool take = (u > m) | (u != u);
      m = take ? u : m;
      v = take ? in[q][k] : v;
      j = take ? uint8_t(q + 1) : j;
    }
    y[k] = v;
    idx[k] = j;
  }
}

// the input gradient of one window: g where idx says, 0 in the other three places
template <typename T>
inline void window_grad(const T* g, const uint8_t* idx, T* a, T* b, T* c, T* d, int64_t n) {
  const T zero(0);
  for (int64_t k = 0; k < n; ++k) {
    const uint8_t j = idx[k];
    a[k] = j == 0 ? g[k] : zero;
    b[k] = j == 1 ? g[k] : zero;
    c[k] = j == 2 ? g[k] : zero;
    d[k] = j == 3 ? g[k] : zero;
  }
}

template <typename T>
inline void fill_zero(T* p, int64_t n) {
  const T zero(0);
  for (int64_t k = 0; k < n; ++k) p[k] = zero;
}

// channels_last: x is (N, H, W, C) in memory; one output row (n, ho) at a time
template <typename T>
void forward_cl(const T* x, T* y, uint8_t* idx, int64_t N, int64_t H, int64_t W, int64_t C) {
  const int64_t Ho = H / 2, Wo = W / 2;
  at::parallel_for(0, N * Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* top = x + ((r / Ho) * H + 2 * (r % Ho)) * W * C;
      const T* bottom = top + W * C;
      for (int64_t wo = 0; wo < Wo; ++wo) {
        const int64_t o = (r * Wo + wo) * C, i = 2 * wo * C;
        window_max(top + i, top + i + C, bottom + i, bottom + i + C, y + o, idx + o, C);
      }
    }
  });
}

template <typename T>
void backward_cl(const T* g, const uint8_t* idx, T* gx, int64_t N, int64_t H, int64_t W, int64_t C) {
  const int64_t Ho = H / 2, Wo = W / 2;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {  // input row r = (n, h): rows of odd h are done with h - 1
      const int64_t n = r / H, h = r % H;
      T* row = gx + r * W * C;
      if (h >= 2 * Ho) {  // the row left over by an odd H
        fill_zero(row, W * C);
        continue;
      }
      if (h % 2) continue;
      const int64_t o0 = (n * Ho + h / 2) * Wo * C;
      for (int64_t wo = 0; wo < Wo; ++wo) {
        const int64_t o = o0 + wo * C, i = 2 * wo * C;
        window_grad(g + o, idx + o, row + i, row + i + C, row + W * C + i, row + W * C + i + C, C);
      }
      if (W % 2) {
        fill_zero(row + 2 * Wo * C, C);
        fill_zero(row + W * C + 2 * Wo * C, C);
      }
    }
  });
}

// NCHW: N * C planes of H x W values; one output row of one plane at a time
template <typename T>
void forward_planes(const T* x, T* y, uint8_t* idx, int64_t P, int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2;
  at::parallel_for(0, P * Ho, 16, [&](int64_t begin, int64_t end) {
    T a[64], b[64], c[64], d[64];
    for (int64_t r = begin; r < end; ++r) {
      const T* top = x + ((r / Ho) * H + 2 * (r % Ho)) * W;
      const T* bottom = top + W;
      for (int64_t w0 = 0; w0 < Wo; w0 += 64) {  // deinterleave the even and odd columns, 64 at a time
        const int64_t n = std::min<int64_t>(64, Wo - w0);
        for (int64_t k = 0; k < n; ++k) {
          const int64_t i = 2 * (w0 + k);
          a[k] = top[i];
          b[k] = top[i + 1];
          c[k] = bottom[i];
          d[k] = bottom[i + 1];
        }
        window_max(a, b, c, d, y + r * Wo + w0, idx + r * Wo + w0, n);
      }
    }
  });
}

template <typename T>
void backward_planes(const T* g, const uint8_t* idx, T* gx, int64_t P, int64_t H, int64_t W) {
  const int64_t Ho = H / 2, Wo = W / 2;
  at::parallel_for(0, P * H, 16, [&](int64_t begin, int64_t end) {
    T a[64], b[64], c[64], d[64];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = r / H, h = r % H;
      T* row = gx + r * W;
      if (h >= 2 * Ho) {
        fill_zero(row, W);
        continue;
      }
      if (h % 2) continue;
      const int64_t o0 = (p * Ho + h / 2) * Wo;
      for (int64_t w0 = 0; w0 < Wo; w0 += 64) {
        const int64_t n = std::min<int64_t>(64, Wo - w0);
        window_grad(g + o0 + w0, idx + o0 + w0, a, b, c, d, n);
        for (int64_t k = 0; k < n; ++k) {
          const int64_t i = 2 * (w0 + k);
          row[i] = a[k];
          row[i + 1] = b[k];
          row[W + i] = c[k];
          row[W + i + 1] = d[k];
        }
      }
      if (W % 2) {
        row[W - 1] = T(0);
        row[2 * W - 1] = T(0);
      }
    }
  });
}

void check(const at::Tensor& x, const char* op, bool channels_last) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, op, ": a 4-d CPU tensor is needed");
  TORCH_CHECK(channels_last ? x.is_contiguous(at::MemoryFormat::ChannelsLast) : x.is_contiguous(), op,
              ": the tensor is not contiguous in the layout given");
}

// (out, idx): out (N, C, H / 2, W / 2) in x's layout, idx the same shape and layout in uint8
void forward(const at::Tensor& x, const at::Tensor& out, const at::Tensor& idx, bool channels_last) {
  check(x, "maxpool forward", channels_last);
  check(out, "maxpool forward", channels_last);
  check(idx, "maxpool forward", channels_last);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(out.sizes() == idx.sizes() && out.size(0) == N && out.size(1) == C && out.size(2) == H / 2 &&
                  out.size(3) == W / 2 && out.scalar_type() == x.scalar_type() && idx.scalar_type() == at::kByte,
              "maxpool forward: out and idx must be (N, C, H / 2, W / 2), of x's dtype and uint8");
  cnnlab::dispatch(x.scalar_type(), "maxpool forward", [&](auto t) {
    using T = decltype(t);
    if (channels_last)
      forward_cl(x.const_data_ptr<T>(), out.data_ptr<T>(), idx.data_ptr<uint8_t>(), N, H, W, C);
    else
      forward_planes(x.const_data_ptr<T>(), out.data_ptr<T>(), idx.data_ptr<uint8_t>(), N * C, H, W);
  });
}

void backward(const at::Tensor& grad, const at::Tensor& idx, const at::Tensor& grad_x, bool channels_last) {
  check(grad, "maxpool backward", channels_last);
  check(idx, "maxpool backward", channels_last);
  check(grad_x, "maxpool backward", channels_last);
  const int64_t N = grad_x.size(0), C = grad_x.size(1), H = grad_x.size(2), W = grad_x.size(3);
  TORCH_CHECK(grad.sizes() == idx.sizes() && grad.size(0) == N && grad.size(1) == C && grad.size(2) == H / 2 &&
                  grad.size(3) == W / 2 && grad.scalar_type() == grad_x.scalar_type() && idx.scalar_type() == at::kByte,
              "maxpool backward: grad and idx must be (N, C, H / 2, W / 2), grad of grad_x's dtype, idx uint8");
  cnnlab::dispatch(grad.scalar_type(), "maxpool backward", [&](auto t) {
    using T = decltype(t);
    if (channels_last)
      backward_cl(grad.const_data_ptr<T>(), idx.const_data_ptr<uint8_t>(), grad_x.data_ptr<T>(), N, H, W, C);
    else
      backward_planes(grad.const_data_ptr<T>(), idx.const_data_ptr<uint8_t>(), grad_x.data_ptr<T>(), N * C, H, W);
  });
}

}  // namespace

TORCH_LIBRARY(cnnlab_maxpool, m) {
  m.def("forward(Tensor x, Tensor(a!) out, Tensor(b!) idx, bool channels_last) -> ()", &forward);
  m.def("backward(Tensor grad, Tensor idx, Tensor(a!) grad_x, bool channels_last) -> ()", &backward);
}
