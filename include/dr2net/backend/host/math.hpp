#pragma once
//! \file
//! Scalar math that host kernels and their CUDA twins share: overloads on float and double
//! that call the C library's global functions, which CUDA also provides in device code
//! (std:: overloads are host-only there).

#include <math.h>

#include "dr2net/core/config.hpp"

namespace dr2net::detail {

DR2NET_HD_INLINE float erf_of(float x) { return ::erff(x); }
DR2NET_HD_INLINE double erf_of(double x) { return ::erf(x); }
DR2NET_HD_INLINE float exp_of(float x) { return ::expf(x); }
DR2NET_HD_INLINE double exp_of(double x) { return ::exp(x); }
DR2NET_HD_INLINE float sqrt_of(float x) { return ::sqrtf(x); }
DR2NET_HD_INLINE double sqrt_of(double x) { return ::sqrt(x); }

}  // namespace dr2net::detail
