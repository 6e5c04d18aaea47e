#pragma once
//! \file
//! bf16 and fp16 compute on the device: the trait that admits CUDA's 16-bit types as
//! residual-function compute types, and precision policies for them over fp32/fp64 streams.
//! GEMMs and reductions accumulate in fp32 whatever the compute type.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "dr2net/core/compute_type.hpp"
#include "dr2net/precision/precision.hpp"

namespace dr2net {

//! Admits CUDA's bfloat16 (8-bit exponent, 8-bit significand) as a residual-function compute
//! type; device code of this backend computes in it, accumulating in fp32.
template <>
struct is_compute_type<__nv_bfloat16> : std::true_type {};
//! Admits CUDA's IEEE half (fp16: 5-bit exponent, 11-bit significand, largest finite 65504)
//! as a residual-function compute type; device code accumulates in fp32.
template <>
struct is_compute_type<__half> : std::true_type {};

//! bf16 residual functions over fp32 streams; the combine runs in fp32. The streams and
//! their gradients are stored in fp32; F reads a bf16 copy of its input, and its bf16 output
//! is widened inside the fused combine pass.
using Bf16ComputeFp32Streams = PrecisionPolicy<float, __nv_bfloat16, float>;
//! fp16 residual functions over fp32 streams; the combine runs in fp32.
using Fp16ComputeFp32Streams = PrecisionPolicy<float, __half, float>;
//! bf16 residual functions over fp64 streams; the combine runs in fp64.
using Bf16ComputeFp64Streams = PrecisionPolicy<double, __nv_bfloat16, double>;
//! fp32 residual functions that may use TF32 tensor cores in their GEMMs (allow_tf32 = true:
//! cuBLAS rounds the inputs to TF32, fp16's 11-bit significand with fp32's range, and
//! accumulates in fp32); streams and
//! combine in fp32.
using Fp32AllowTf32 = PrecisionPolicy<float, float, float, true>;

}  // namespace dr2net
