#pragma once
//! \file
//! The CUDA backend's primitives under the names and contracts of the host's
//! (backend/host/primitives.hpp), so that one residual-function body serves both backends:
//! gemm, gemm_bias_add and gemm_strided_batched through cuBLAS/cuBLASLt, layer_norm_forward/
//! backward and softmax_rows_inplace/backward_inplace (their kernels), column_sums_add and
//! for_each_index. Every call only enqueues work on the context's stream; pointers are device
//! memory. Scalars are of accumulate_t<T> (float for float/bf16/fp16, double for double).

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cstdint>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/elementwise.cuh"
#include "dr2net/modules/cuda/column_sum.cuh"
#include "dr2net/modules/cuda/gemm.cuh"
#include "dr2net/modules/cuda/layer_norm.cuh"
#include "dr2net/modules/cuda/softmax.cuh"

namespace dr2net {

//! C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, row-major (cuBLASLt); float GEMMs may use
//! TF32 tensor cores when allow_tf32.
template <class T>
void gemm(CudaContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
          accumulate_t<T> alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb, accumulate_t<T> beta,
          T* c, std::int64_t ldc, bool allow_tf32 = false) {
  device_gemm<T>(ctx, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, nullptr, allow_tf32);
}

//! D = alpha op(A) op(B) + bias (every row; none when null) + scale * addend in one cuBLASLt
//! call (BIAS epilogue, beta = scale, C = addend); addend may be D; scale == 0 never reads it.
template <class T>
void gemm_bias_add(CudaContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                   accumulate_t<T> alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb, const T* bias,
                   accumulate_t<T> scale, const T* addend, T* d, std::int64_t ldd, bool allow_tf32 = false) {
  device_gemm_into<T>(ctx, ta, tb, m, n, k, alpha, a, lda, b, ldb, scale, scale == accumulate_t<T>(0) ? d : addend,
                      d, ldd, bias, allow_tf32);
}

//! For i < batch: C_i = alpha op(A_i) op(B_i) + beta C_i, X_i = X + i * stride_x: one
//! cublasGemmStridedBatchedEx.
template <class T>
void gemm_strided_batched(CudaContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n,
                          std::int64_t k, accumulate_t<T> alpha, const T* a, std::int64_t lda, std::int64_t stride_a,
                          const T* b, std::int64_t ldb, std::int64_t stride_b, accumulate_t<T> beta, T* c,
                          std::int64_t ldc, std::int64_t stride_c, std::int64_t batch, bool allow_tf32 = false) {
  device_gemm_strided_batched<T>(ctx, ta, tb, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc,
                                 stride_c, batch, allow_tf32);
}

//! out[j] += sum over r < rows of x[r * cols + j] (accumulated in fp32/fp64, then rounded).
template <class T>
void column_sums_add(CudaContext& ctx, std::int64_t rows, std::int64_t cols, const T* x, T* out) {
  column_sums<T>(ctx, rows, cols, cuda_detail::ColumnOf<T>{x, cols}, out);
}

}  // namespace dr2net
