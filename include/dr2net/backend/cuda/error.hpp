#pragma once
//! \file
//! CUDA, cuBLAS/cuBLASLt and kernel-launch failures as dr2net::Error: the message carries the
//! failed call as written, the error's name and description, and the source location.
//! Host-compilable: needs the CUDA toolkit's headers, not nvcc.

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>

#include "dr2net/core/error.hpp"

namespace dr2net::cuda_detail {

//! "cudaErrorMemoryAllocation (out of memory)"
inline std::string describe(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + " (" + cudaGetErrorString(e) + ")";
}
//! "cuBLAS status 13 (the function failed to launch on the GPU)": the numeric status and
//! cuBLAS's description (cuBLASLt returns the same status type).
inline std::string describe(cublasStatus_t s) {
  return std::string("cuBLAS status ") + std::to_string(static_cast<int>(s)) + " (" + cublasGetStatusString(s) + ")";
}

//! Throws dr2net::Error "CUDA call `call` failed: <describe(e)>" located at file:line (the
//! expansion site of DR2NET_CUDA_CHECK). Out of line so the check macro stays small.
[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  throw Error(std::string("CUDA call `") + call + "` failed: " + describe(e), file, line);
}
//! Throws dr2net::Error "cuBLAS call `call` failed: <describe(s)>" located at file:line (the
//! expansion site of DR2NET_CUBLAS_CHECK).
[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  throw Error(std::string("cuBLAS call `") + call + "` failed: " + describe(s), file, line);
}

//! Throws for a failed launch (bad configuration, too many resources), naming the kernel.
//! Faults while a kernel runs surface at the next synchronising call's check.
inline void check_launch(const char* kernel, const char* file, int line) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw Error(std::string("launch of ") + kernel + " failed: " + describe(e), file, line);
}

}  // namespace dr2net::cuda_detail

//! Evaluates a CUDA runtime call once; anything but cudaSuccess throws dr2net::Error whose
//! message quotes the call's text and the error's name and description, at this source line.
//! A statement (`DR2NET_CUDA_CHECK(cudaMemsetAsync(p, 0, n, s));`), usable in host code only.
#define DR2NET_CUDA_CHECK(call)                                                      \
  do {                                                                               \
    const cudaError_t dr2net_cuda_status_ = (call);                                  \
    if (dr2net_cuda_status_ != cudaSuccess)                                          \
      ::dr2net::cuda_detail::throw_cuda(dr2net_cuda_status_, #call, __FILE__, __LINE__); \
  } while (0)

//! Evaluates a cuBLAS or cuBLASLt call once; anything but CUBLAS_STATUS_SUCCESS throws
//! dr2net::Error quoting the call's text and the numeric status with its description.
#define DR2NET_CUBLAS_CHECK(call)                                                      \
  do {                                                                                 \
    const cublasStatus_t dr2net_cublas_status_ = (call);                               \
    if (dr2net_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                \
      ::dr2net::cuda_detail::throw_cublas(dr2net_cublas_status_, #call, __FILE__, __LINE__); \
  } while (0)

//! Checks the launch just made with cudaGetLastError (which also clears a pending
//! non-sticky error); on failure throws dr2net::Error "launch of <kernel> failed: ...".
//! `kernel` is a C string naming the kernel. Place it directly after the `<<<...>>>` launch.
#define DR2NET_CUDA_CHECK_LAUNCH(kernel) ::dr2net::cuda_detail::check_launch(kernel, __FILE__, __LINE__)
