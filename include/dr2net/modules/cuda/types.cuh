#pragma once
//! \file
//! Element types of the device residual functions: the accumulation type of a compute type
//! (fp32 for fp32/bf16/fp16, fp64 for fp64), conversions between them usable on host and
//! device, and the cudaDataType / cuBLAS compute type of each.

// nvcc in C++20 mode warns (#3189) where a line of the host headers starts with the word
// `module` (the Philox stream code names a variable so); it is an identifier there. Every
// header of this directory includes this one first.
#ifdef __NVCC__
#pragma nv_diag_suppress 3189
#endif

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <library_types.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "dr2net/core/compute_type.hpp"

namespace dr2net::cuda_detail {

//! What reductions and GEMMs of compute type T accumulate in (dr2net::accumulate_t): double
//! for double, float otherwise.
template <class T>
using acc_t = accumulate_t<T>;
using dr2net::narrow;
using dr2net::widen;

//! The cudaDataType of a compute type.
template <class T>
constexpr cudaDataType_t cuda_data_type() {
  if constexpr (std::is_same_v<T, double>) return CUDA_R_64F;
  else if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return CUDA_R_16BF;
  else {
    static_assert(std::is_same_v<T, __half>, "device functions compute in double, float, bf16 or fp16");
    return CUDA_R_16F;
  }
}

//! cuBLAS compute type of T's GEMMs: fp64 for double, fp32 otherwise (TF32 tensor cores for
//! float only when the precision policy allows them).
template <class T>
constexpr cublasComputeType_t cublas_compute_type(bool allow_tf32) {
  if constexpr (std::is_same_v<T, double>) return CUBLAS_COMPUTE_64F;
  else if constexpr (std::is_same_v<T, float>) return allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  else return CUBLAS_COMPUTE_32F;
}

//! Largest power of two (at most 256) that divides the address: what cuBLASLt may assume.
inline std::uint32_t pointer_alignment(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t al = 256;
  while (al > 1 && a % al != 0) al >>= 1;
  return al;
}

//! n rounded up to a multiple of m.
constexpr std::size_t round_up(std::size_t n, std::size_t m) { return (n + m - 1) / m * m; }

}  // namespace dr2net::cuda_detail
