#pragma once
//! \file
//! Exact (erf) GELU, as timm's nn.GELU() computes it, and its derivative. The per-element
//! arithmetic is DR2NET_HD_INLINE so a CUDA kernel evaluates the same expressions. Where
//! DR2NET_HOST_VECTOR_MATH is 1 (backend/host/vector_math.hpp), detail::simd holds the same
//! expressions on float vectors, operation for operation, with SLEEF's erf and exp: the host's
//! fused GELU functors (modules/activation.hpp) run those over their ranges.

#include <cstddef>

#include "dr2net/backend/host/math.hpp"
#include "dr2net/backend/host/vector_math.hpp"
#include "dr2net/core/config.hpp"

namespace dr2net {

//! gelu(x) = 0.5 x (1 + erf(x / sqrt 2)), with T float or double (the types erf is
//! provided for on host and device).
template <class T>
DR2NET_HD_INLINE T gelu_erf(T x) {
  constexpr T kInvSqrt2 = T(0.70710678118654752440);
  return T(0.5) * x * (T(1) + detail::erf_of(x * kInvSqrt2));
}

//! gelu'(x) = 0.5 (1 + erf(x / sqrt 2)) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi);
//! T float or double.
template <class T>
DR2NET_HD_INLINE T gelu_erf_derivative(T x) {
  constexpr T kInvSqrt2 = T(0.70710678118654752440);
  constexpr T kInvSqrt2Pi = T(0.39894228040143267794);
  return T(0.5) * (T(1) + detail::erf_of(x * kInvSqrt2)) + x * kInvSqrt2Pi * detail::exp_of(T(-0.5) * x * x);
}

#if DR2NET_HOST_VECTOR_MATH
namespace detail::simd {
inline namespace DR2NET_DETAIL_SIMD_ISA {

// gelu_erf<float> on a vector: the same operations in the same order, SLEEF's erf for erff.
inline vfloat gelu_erf(vfloat x) {
  constexpr float kInvSqrt2 = float(0.70710678118654752440);
  return mul(mul(broadcast(0.5f), x), add(broadcast(1.0f), erf(mul(x, broadcast(kInvSqrt2)))));
}

// gelu_erf_derivative<float> on a vector, likewise with SLEEF's erf and exp.
inline vfloat gelu_erf_derivative(vfloat x) {
  constexpr float kInvSqrt2 = float(0.70710678118654752440);
  constexpr float kInvSqrt2Pi = float(0.39894228040143267794);
  const vfloat cdf = mul(broadcast(0.5f), add(broadcast(1.0f), erf(mul(x, broadcast(kInvSqrt2)))));
  const vfloat pdf = mul(mul(x, broadcast(kInvSqrt2Pi)), exp(mul(mul(broadcast(-0.5f), x), x)));
  return add(cdf, pdf);
}

}  // inline namespace of the width
}  // namespace detail::simd
#endif  // DR2NET_HOST_VECTOR_MATH

}  // namespace dr2net
