#pragma once
//! \file
//! Row-major GEMMs on the device with host_gemm's contract (backend/host/gemm.hpp), so every
//! device function reads like its host twin:
//!
//!   device_gemm:                 C[m, n] = alpha op(A) op(B) + beta C  (+ bias[n] on every row)
//!   device_gemm_strided_batched: the same for `batch` matrices at fixed element strides
//!
//! Row-major C is column-major C^T = op(B)^T op(A)^T, so both call the column-major libraries
//! with A and B swapped and the transposes unchanged. device_gemm goes through cuBLASLt
//! (cublasLtMatmul, with the BIAS epilogue when a bias is given); the batched form through
//! cublasGemmStridedBatchedEx. Both accumulate in fp32 (fp64 for double); TF32 only for float
//! and only when asked. beta == 0 never reads C (it may hold NaN poison).
//! When cuBLASLt offers no algorithm (an epilogue a type lacks, say), device_gemm falls back to
//! writing the bias into C and one cublasGemmEx with beta = 1: same result, one more pass.

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/backend/host/gemm.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/modules/cuda/types.cuh"

namespace dr2net {
namespace cuda_detail {

inline cublasOperation_t cublas_op(Transpose t) { return t == Transpose::No ? CUBLAS_OP_N : CUBLAS_OP_T; }

inline int checked_int(std::int64_t v, const char* what) {
  DR2NET_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "device gemm: ", what, " = ", v,
               " is outside cuBLAS's int range");
  return static_cast<int>(v);
}

//! c[r, j] = bias[j] for r < rows, j < cols (leading dimension ldc).
template <class T>
__global__ void broadcast_rows(T* c, const T* bias, std::int64_t rows, std::int64_t cols, std::int64_t ldc) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * cols; i += stride)
    c[(i / cols) * ldc + i % cols] = bias[i % cols];
}

//! Owns the cuBLASLt descriptors of one call.
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  LtDescriptors() = default;
  LtDescriptors(const LtDescriptors&) = delete;
  LtDescriptors& operator=(const LtDescriptors&) = delete;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

//! The column-major cublasGemmEx that device_gemm falls back to.
template <class T>
void gemm_ex(CudaContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
             acc_t<T> alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb, acc_t<T> beta, T* c,
             std::int64_t ldc, bool allow_tf32) {
  constexpr cudaDataType_t dt = cuda_data_type<T>();
  DR2NET_CUBLAS_CHECK(cublasGemmEx(ctx.blas(), cublas_op(tb), cublas_op(ta), checked_int(n, "n"), checked_int(m, "m"),
                                   checked_int(k, "k"), &alpha, b, dt, checked_int(ldb, "ldb"), a, dt,
                                   checked_int(lda, "lda"), &beta, c, dt, checked_int(ldc, "ldc"),
                                   cublas_compute_type<T>(allow_tf32), CUBLAS_GEMM_DEFAULT));
}

}  // namespace cuda_detail

//! C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C (+ bias[n] added to every row when bias is
//! not null), row-major with leading dimensions lda, ldb, ldc; host_gemm's contract on the device.
template <class T>
void device_gemm(CudaContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                 cuda_detail::acc_t<T> alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb,
                 cuda_detail::acc_t<T> beta, T* c, std::int64_t ldc, const T* bias = nullptr,
                 bool allow_tf32 = false) {
  using namespace cuda_detail;
  using A = acc_t<T>;
  if (m == 0 || n == 0) return;
  constexpr cudaDataType_t dt = cuda_data_type<T>();
  constexpr cudaDataType_t scale = std::is_same_v<T, double> ? CUDA_R_64F : CUDA_R_32F;
  LtDescriptors d;
  DR2NET_CUBLAS_CHECK(cublasLtMatmulDescCreate(&d.op, cublas_compute_type<T>(allow_tf32), scale));
  // Column-major roles: A' = row-major B, B' = row-major A, D' = C^T (n x m).
  const cublasOperation_t opa = cublas_op(tb), opb = cublas_op(ta);
  DR2NET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
  DR2NET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
  if (bias != nullptr) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bias_type = dt;
    DR2NET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    DR2NET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    DR2NET_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
  }
  const auto u = [](std::int64_t v) { return static_cast<std::uint64_t>(v); };
  DR2NET_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.a, dt, u(tb == Transpose::No ? n : k), u(tb == Transpose::No ? k : n), ldb));
  DR2NET_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.b, dt, u(ta == Transpose::No ? k : m), u(ta == Transpose::No ? m : k), lda));
  DR2NET_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d.c, dt, u(n), u(m), ldc));

  void* workspace = ctx.gemm_workspace();
  const std::size_t ws_bytes = ctx.gemm_workspace_bytes();
  DR2NET_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d.pref));
  DR2NET_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                           sizeof ws_bytes));
  // The heuristic assumes 256-byte aligned operands unless told otherwise; views into saved
  // internals need not be, so tell it what each pointer really is.
  const std::uint32_t al_a = pointer_alignment(b), al_b = pointer_alignment(a), al_c = pointer_alignment(c),
                      al_bias = bias ? pointer_alignment(bias) : 256u;
  (void)al_bias;
  DR2NET_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof al_a));
  DR2NET_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof al_b));
  DR2NET_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c));
  DR2NET_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof al_c));
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  const cublasStatus_t hs =
      cublasLtMatmulAlgoGetHeuristic(ctx.blas_lt(), d.op, d.a, d.b, d.c, d.c, d.pref, 1, &heuristic, &found);
  if (hs == CUBLAS_STATUS_SUCCESS && found > 0 && (bias == nullptr || al_bias >= static_cast<std::uint32_t>(sizeof(T)))) {
    DR2NET_CUBLAS_CHECK(cublasLtMatmul(ctx.blas_lt(), d.op, &alpha, b, d.a, a, d.b, &beta, c, d.c, c, d.c,
                                       &heuristic.algo, workspace, ws_bytes, ctx.stream()));
    return;
  }
  // Fallback: C = bias (broadcast) then C = alpha op(A) op(B) + 1 * C.
  A beta_fb = beta;
  if (bias != nullptr) {
    DR2NET_CHECK(beta == A(0), "device_gemm: a bias with beta != 0 is not supported without cuBLASLt's epilogue");
    const std::int64_t total = m * n;
    const int blocks = static_cast<int>(std::min<std::int64_t>((total + 255) / 256, 4096));
    broadcast_rows<T><<<blocks, 256, 0, ctx.stream()>>>(c, bias, m, n, ldc);
    DR2NET_CUDA_CHECK_LAUNCH("dr2net broadcast_rows (gemm bias)");
    beta_fb = A(1);
  }
  gemm_ex<T>(ctx, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta_fb, c, ldc, allow_tf32);
}

//! For i < batch: C_i = alpha op(A_i) op(B_i) + beta C_i with X_i = X + i * stride_x, all
//! row-major as device_gemm (the attention's per-head GEMMs: strides step over heads).
template <class T>
void device_gemm_strided_batched(CudaContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n,
                                 std::int64_t k, cuda_detail::acc_t<T> alpha, const T* a, std::int64_t lda,
                                 std::int64_t stride_a, const T* b, std::int64_t ldb, std::int64_t stride_b,
                                 cuda_detail::acc_t<T> beta, T* c, std::int64_t ldc, std::int64_t stride_c,
                                 std::int64_t batch, bool allow_tf32 = false) {
  using namespace cuda_detail;
  if (m == 0 || n == 0 || batch == 0) return;
  constexpr cudaDataType_t dt = cuda_data_type<T>();
  DR2NET_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      ctx.blas(), cublas_op(tb), cublas_op(ta), checked_int(n, "n"), checked_int(m, "m"), checked_int(k, "k"), &alpha,
      b, dt, checked_int(ldb, "ldb"), stride_b, a, dt, checked_int(lda, "lda"), stride_a, &beta, c, dt,
      checked_int(ldc, "ldc"), stride_c, checked_int(batch, "batch"), cublas_compute_type<T>(allow_tf32),
      CUBLAS_GEMM_DEFAULT));
}

}  // namespace dr2net
