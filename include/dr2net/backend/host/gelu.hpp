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

//! y[i] = gelu(z[i]): the elementwise functor a backend's for_each_index applies over the
//! MLP's hidden activations (host loop or CUDA kernel alike; pointers in that backend's memory).
template <class T>
struct GeluForward {
  T* y;        //!< output, one element per index (may equal z for an in-place pass)
  const T* z;  //!< pre-activation input, same length as y
  //! Writes y[i] from z[i].
  DR2NET_HD_INLINE void operator()(std::size_t i) const { y[i] = gelu_erf(z[i]); }
};

//! g[i] *= gelu'(z[i]): dL/dz from dL/dy, in place (an elementwise functor for
//! for_each_index, as GeluForward). Needs the saved pre-activation z, not the output.
template <class T>
struct GeluBackward {
  T* g;        //!< in: dL/dy; out: dL/dz, one element per index
  const T* z;  //!< the pre-activation input the forward saw, same length as g
  //! Scales g[i] by gelu'(z[i]).
  DR2NET_HD_INLINE void operator()(std::size_t i) const { g[i] *= gelu_erf_derivative(z[i]); }
};

}  // namespace dr2net
