#pragma once
//! \file
//! Exact (erf) GELU, as timm's nn.GELU() computes it, and its derivative. The per-element
//! arithmetic is DR2NET_HD_INLINE so a CUDA kernel evaluates the same expressions.

#include <cstddef>

#include "dr2net/backend/host/math.hpp"
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

}  // namespace dr2net
