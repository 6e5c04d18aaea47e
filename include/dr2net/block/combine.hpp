#pragma once
//! \file
//! The fused elementwise passes of a Dr²Net module, written once for host and device.
//! Each kernel functor is applied as `k(i)` for every element i by a backend's
//! for_each_index(); the arithmetic is in the precision policy's accumulate type.

#include <cstddef>

#include "dr2net/core/config.hpp"

namespace dr2net {

//! Forward of one module, in place over the x stream:
//!   y_i = alpha * y_{i-1} + f + beta * x_{i-1}   (f = F(y_{i-1}); written over x_{i-1})
//! Evaluated as (alpha*y + f) + beta*x, so (alpha, beta) = (1, 0) yields exactly y + f.
template <class S, class C, class A>
struct ForwardCombine {
  S* x;        //!< in: x_{i-1}; out: y_i
  const S* y;  //!< y_{i-1} = x_i
  const C* f;  //!< F(y_{i-1})
  A alpha, beta;
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    x[i] = static_cast<S>(alpha * static_cast<A>(y[i]) + static_cast<A>(f[i]) + beta * static_cast<A>(x[i]));
  }
};

//! The part of a module's forward that does not involve F, in place over the x stream:
//!   x <- alpha * y + beta * x
//! used when F then adds its output into x itself (ResidualFunction's adds-into members).
template <class S, class A>
struct ForwardPreCombine {
  S* x;        //!< in: x_{i-1}; out: alpha y_{i-1} + beta x_{i-1}
  const S* y;  //!< y_{i-1}
  A alpha, beta;
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    x[i] = static_cast<S>(alpha * static_cast<A>(y[i]) + beta * static_cast<A>(x[i]));
  }
};

//! Inverse of one module, in place over the y stream:
//!   x_{i-1} = (y_i - alpha * x_i - f) / beta   (f = F(x_i); written over y_i)
template <class S, class C, class A>
struct InverseCombine {
  S* y;        //!< in: y_i; out: x_{i-1}
  const S* x;  //!< x_i = y_{i-1}
  const C* f;  //!< F(x_i)
  A alpha, beta;
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    y[i] = static_cast<S>((static_cast<A>(y[i]) - alpha * static_cast<A>(x[i]) - static_cast<A>(f[i])) / beta);
  }
};

//! Gradient of one module after F's backward, in place over both gradient buffers:
//!   dL/dy_{i-1} = gx_i + alpha * gy_i + J^T gy_i   (written over gx_i)
//!   dL/dx_{i-1} = beta * gy_i                      (written over gy_i)
//! With `jt == nullptr`, J^T gy has already been accumulated into gx by F's backward.
//! With `reconstruct`, the inverse x_{i-1} = (y_i - alpha x_i - f)/beta happens in the same pass.
template <class S, class C, class A, bool Reconstruct>
struct BackwardCombine {
  S* gx;        //!< in: gx_i (+ J^T gy_i); out: dL/dy_{i-1}
  S* gy;        //!< in: gy_i; out: dL/dx_{i-1}
  const C* jt;  //!< J^T gy_i when kept apart from gx (mixed precision), else nullptr
  S* y;         //!< Reconstruct only: in y_i, out x_{i-1}
  const S* x;   //!< Reconstruct only: x_i
  const C* f;   //!< Reconstruct only: F(x_i)
  A alpha, beta;
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    const A g = static_cast<A>(gy[i]);
    A gxi = static_cast<A>(gx[i]) + alpha * g;
    if (jt != nullptr) gxi += static_cast<A>(jt[i]);
    gx[i] = static_cast<S>(gxi);
    gy[i] = static_cast<S>(beta * g);
    if constexpr (Reconstruct) {
      y[i] = static_cast<S>((static_cast<A>(y[i]) - alpha * static_cast<A>(x[i]) - static_cast<A>(f[i])) / beta);
    }
  }
};

//! dst = src, converting between stream and compute types.
template <class From, class To>
struct ConvertCopy {
  To* dst;
  const From* src;
  DR2NET_HD_INLINE void operator()(std::size_t i) const { dst[i] = static_cast<To>(src[i]); }
};

//! dst = value
template <class T>
struct Fill {
  T* dst;
  T value;
  DR2NET_HD_INLINE void operator()(std::size_t i) const { dst[i] = value; }
};

//! dst = a * (u + v): the stack's input gradient gx_0 + gy_0 (a = 1) and mean output (a = 1/2).
template <class S, class A>
struct ScaledSum {
  S* dst;
  const S* u;
  const S* v;
  A a;
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    dst[i] = static_cast<S>(a * (static_cast<A>(u[i]) + static_cast<A>(v[i])));
  }
};

//! dst = a * src
template <class S, class A>
struct Scale {
  S* dst;
  const S* src;
  A a;
  DR2NET_HD_INLINE void operator()(std::size_t i) const { dst[i] = static_cast<S>(a * static_cast<A>(src[i])); }
};

}  // namespace dr2net
