#pragma once
//! \file
//! CUDA, cuBLAS/cuBLASLt and kernel-launch failures as dr2net::Error: the message carries the
//! failed call as written, the error's name and description, and the source location. Every
//! check clears the runtime error it reports, and DR2NET_CUDA_LAUNCH does not blame a kernel
//! for an error that was pending before its launch (the rules: backend/cuda/error_state.hpp).
//! Host-compilable: needs the CUDA toolkit's headers, not nvcc.

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>

#include "dr2net/backend/cuda/error_state.hpp"
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

//! The runtime's per-thread pending error, as backend/cuda/error_state.hpp's rules read it.
struct RuntimeErrorSource {
  using code_type = cudaError_t;                         //!< the runtime's error code
  static constexpr cudaError_t success = cudaSuccess;    //!< nothing pending
  cudaError_t take() const { return cudaGetLastError(); }  //!< return and clear (unless sticky)
  cudaError_t peek() const { return cudaPeekAtLastError(); }  //!< return only
  std::string describe(cudaError_t e) const { return cuda_detail::describe(e); }  //!< name and description
};

//! Throws dr2net::Error "CUDA call `call` failed: <describe(e)>" located at file:line (the
//! expansion site of DR2NET_CUDA_CHECK), after clearing the pending error the call left, so
//! that the next launch check does not report it again. Out of line so the macro stays small.
[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  throw_failed_call(RuntimeErrorSource{}, e, call, file, line);
}
//! Throws dr2net::Error "cuBLAS call `call` failed: <describe(s)>" located at file:line (the
//! expansion site of DR2NET_CUBLAS_CHECK); a runtime error the library left pending is
//! cleared and named in the message.
[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  throw_failed_library_call(RuntimeErrorSource{}, "cuBLAS", describe(s), call, file, line);
}

//! Throws for a failed launch (bad configuration, too many resources), naming the kernel,
//! judged by what is pending after it (see check_launch_after). Faults while a kernel runs
//! surface at the next synchronising call's check.
inline void check_launch(const char* kernel, const char* file, int line) {
  check_launch_after(RuntimeErrorSource{}, kernel, file, line);
}

//! The real runtime's launch check (see error_state.hpp): clears what is pending before the
//! launch so that an earlier, unrelated failure is not blamed on the kernel.
using RuntimeLaunchCheck = LaunchCheck<RuntimeErrorSource>;

}  // namespace dr2net::cuda_detail

//! Evaluates a CUDA runtime call once; anything but cudaSuccess throws dr2net::Error whose
//! message quotes the call's text and the error's name and description, at this source line,
//! and leaves no non-sticky error pending (the failure is reported here, not by a later check).
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
//! It cannot tell the launch's own failure from one an unchecked call before it left pending
//! (dr2net's checks leave none); DR2NET_CUDA_LAUNCH can, and is preferred for new code.
#define DR2NET_CUDA_CHECK_LAUNCH(kernel) ::dr2net::cuda_detail::check_launch(kernel, __FILE__, __LINE__)

//! Launches and checks one kernel: `DR2NET_CUDA_LAUNCH("name", kern<<<g, b, 0, s>>>(args));`.
//! What was pending before the launch is cleared first and not blamed on the kernel (a sticky
//! error is reported as already pending); a failed launch throws dr2net::Error
//! "launch of <name> failed: ..." at this source line. A statement, host code only.
#define DR2NET_CUDA_LAUNCH(kernel, ...)                                                         \
  do {                                                                                          \
    const ::dr2net::cuda_detail::RuntimeLaunchCheck dr2net_launch_check_({}, kernel, __FILE__, __LINE__); \
    __VA_ARGS__;                                                                                \
    dr2net_launch_check_.after();                                                               \
  } while (0)
