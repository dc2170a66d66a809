// What cnnlab's CPU kernels share (dwconv.cpp, bnact.cpp): conversion between a tensor's storage
// type and the type sums are kept in, and dispatch on the dtype. Built by cnnlab/ext.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace cnnlab {

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(c10::BFloat16 v) {
  uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void narrow(float v, float& d) { d = v; }
inline void narrow(double v, double& d) { d = v; }
inline void narrow(float v, c10::BFloat16& d) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &v, 4);
  d.x = std::isnan(v) ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// the accumulation type: float for float32 and bfloat16 storage, double for float64
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// f(T()) for the storage type T of a float32, float64 or bfloat16 tensor
template <typename F>
void dispatch(at::ScalarType t, const char* op, F f) {
  if (t == at::kFloat) return f(float());
  if (t == at::kDouble) return f(double());
  if (t == at::kBFloat16) return f(c10::BFloat16());
  TORCH_CHECK(false, op, ": float32, float64 or bfloat16 only");
}

}  // namespace cnnlab
