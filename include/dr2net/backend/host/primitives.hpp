#pragma once
//! \file
//! The host backend's primitives in the form every backend provides them: each takes the
//! backend context first and has the same contract as its CUDA twin (backend/cuda/primitives.cuh),
//! so residual functions (modules/linear.hpp, layer_norm.hpp, vit_attention.hpp, vit_mlp.hpp)
//! are written once over these names and instantiated for HostContext and CudaContext.
//!
//!   gemm                     C = alpha op(A) op(B) + beta C                 (row-major)
//!   gemm_bias_add            D = alpha op(A) op(B) + bias + scale * addend  (a Linear's forward)
//!   gemm_strided_batched     C_i = alpha op(A_i) op(B_i) + beta C_i, X_i = X + i stride_x
//!   layer_norm_forward       y, mean, rstd of rows of width d
//!   layer_norm_backward      dx += J^T dy, dgamma += ..., dbeta += ...
//!   softmax_rows_inplace     softmax of each row, in place
//!   softmax_rows_backward_inplace   g <- scale p (g - rowsum(g p))
//!   column_sums_add          out[j] += sum_r x[r, j]
//!   for_each_index           fn(i) for i < n (backend/host/context.hpp)
//!
//! Scalars (alpha, beta, scale, eps) and LayerNorm statistics are of accumulate_t<T>, which is
//! T itself for the host's compute types (float, double). `allow_tf32` is accepted for the
//! common signature and ignored: the host has no TF32 arithmetic. Every call is synchronous.

#include <algorithm>
#include <cstdint>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/backend/host/gemm.hpp"
#include "dr2net/backend/host/layer_norm.hpp"
#include "dr2net/backend/host/softmax.hpp"
#include "dr2net/core/compute_type.hpp"

namespace dr2net {

//! C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, row-major: host_gemm's contract.
template <class T>
void gemm(HostContext&, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
          accumulate_t<T> alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb, accumulate_t<T> beta,
          T* c, std::int64_t ldc, bool /*allow_tf32*/ = false) {
  host_gemm<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

//! D[m, n] = alpha op(A) op(B) + bias[n] (every row; none when null) + scale * addend[m, n],
//! row-major with leading dimension ldd for D and addend. `addend` may be D itself; scale == 0
//! never reads it. The GEMM accumulates onto (bias + scale * addend), as the device's epilogue.
template <class T>
void gemm_bias_add(HostContext&, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                   accumulate_t<T> alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb, const T* bias,
                   accumulate_t<T> scale, const T* addend, T* d, std::int64_t ldd, bool /*allow_tf32*/ = false) {
  for (std::int64_t r = 0; r < m; ++r) {
    T* dr = d + r * ldd;
    if (scale == T(0)) {
      if (bias != nullptr) std::copy(bias, bias + n, dr);
      else std::fill(dr, dr + n, T(0));
    } else {
      const T* ar = addend + r * ldd;
      for (std::int64_t j = 0; j < n; ++j) dr[j] = scale * ar[j] + (bias != nullptr ? bias[j] : T(0));
    }
  }
  host_gemm<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, T(1), d, ldd);
}

//! For i < batch: C_i = alpha op(A_i) op(B_i) + beta C_i, X_i = X + i * stride_x, each a gemm.
template <class T>
void gemm_strided_batched(HostContext&, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                          accumulate_t<T> alpha, const T* a, std::int64_t lda, std::int64_t stride_a, const T* b,
                          std::int64_t ldb, std::int64_t stride_b, accumulate_t<T> beta, T* c, std::int64_t ldc,
                          std::int64_t stride_c, std::int64_t batch, bool /*allow_tf32*/ = false) {
  DR2NET_CHECK(batch >= 0, "gemm_strided_batched: batch must not be negative, got ", batch);
  for (std::int64_t i = 0; i < batch; ++i)
    host_gemm<T>(ta, tb, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta, c + i * stride_c, ldc);
}

//! y = LayerNorm(x) for `rows` rows of width d; writes each row's mean and rstd.
template <class T>
void layer_norm_forward(HostContext&, const T* x, std::int64_t rows, std::int64_t d, const T* gamma, const T* beta,
                        accumulate_t<T> eps, T* y, accumulate_t<T>* mean, accumulate_t<T>* rstd) {
  layer_norm_forward<T>(x, rows, d, gamma, beta, eps, y, mean, rstd);
}

//! Backward of layer_norm_forward; accumulates dx, dgamma and dbeta.
template <class T>
void layer_norm_backward(HostContext&, const T* x, const accumulate_t<T>* mean, const accumulate_t<T>* rstd,
                         const T* gamma, const T* dy, std::int64_t rows, std::int64_t d, T* dx, T* dgamma, T* dbeta) {
  layer_norm_backward<T>(x, mean, rstd, gamma, dy, rows, d, dx, dgamma, dbeta);
}

//! softmax of each of `rows` rows of `cols` elements (leading dimension ld), in place.
template <class T>
void softmax_rows_inplace(HostContext&, T* s, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  softmax_rows_inplace<T>(s, rows, cols, ld);
}

//! g <- scale * p (g - rowsum(g p)) for each row, in place over g.
template <class T>
void softmax_rows_backward_inplace(HostContext&, const T* p, T* g, std::int64_t rows, std::int64_t cols,
                                   std::int64_t ld, accumulate_t<T> scale) {
  softmax_rows_backward_inplace<T>(p, g, rows, cols, ld, scale);
}

//! out[j] += sum over r < rows of x[r * cols + j], for j < cols (a Linear's bias gradient).
template <class T>
void column_sums_add(HostContext&, std::int64_t rows, std::int64_t cols, const T* x, T* out) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < cols; ++j) out[j] += x[r * cols + j];
}

}  // namespace dr2net
