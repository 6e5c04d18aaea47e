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
//!
//! Threads: each primitive runs on the context's threads (HostContext::threads()) through
//! parallel_for, on work split independently of the thread count: GEMMs into the fixed blocks
//! of host_gemm_parallel, batched GEMMs into one item per GEMM (each block single-threaded),
//! row kernels into fixed chunks of rows (the single-thread kernels of layer_norm.hpp and
//! softmax.hpp called per chunk), and the sums over rows (LayerNorm's dgamma and dbeta,
//! column_sums_add) into fixed row chunks whose partial sums are added in chunk order. Every
//! result is therefore bit-identical at any thread count. The partial sums live in a
//! per-thread buffer that is only grown (chunks x columns elements, at most 64 chunks) and,
//! like the GEMM's packing buffers, is not metered.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/backend/host/gemm.hpp"
#include "dr2net/backend/host/layer_norm.hpp"
#include "dr2net/backend/host/parallel.hpp"
#include "dr2net/backend/host/softmax.hpp"
#include "dr2net/core/compute_type.hpp"

namespace dr2net {

//! Elements a chunk of rows of the host's row kernels covers at least: a chunk holds
//! max(1, kHostRowChunkElements / width) rows (more when that would make over 64 chunks), a
//! split that depends on the problem alone.
inline constexpr std::int64_t kHostRowChunkElements = 8192;

//! Rows per chunk for `rows` rows of `width` elements: at least kHostRowChunkElements elements
//! per chunk and at most 64 chunks (the bound on the partial sums' buffer). Never depends on
//! the thread count.
inline std::int64_t host_row_chunk(std::int64_t rows, std::int64_t width) {
  const std::int64_t by_size = std::max<std::int64_t>(1, kHostRowChunkElements / std::max<std::int64_t>(1, width));
  const std::int64_t by_count = (rows + 63) / 64;
  return std::max(by_size, by_count);
}

namespace detail {

//! The calling thread's buffer of partial sums, grown to at least `count` elements.
template <class T>
T* partial_sums_buffer(std::size_t count) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

//! fn(first_row, row_count) for each fixed chunk of host_row_chunk(rows, width) rows, on the
//! context's threads.
template <class Fn>
void for_each_row_chunk(HostContext& ctx, std::int64_t rows, std::int64_t width, const Fn& fn) {
  if (rows <= 0) return;
  const auto chunk = static_cast<std::size_t>(host_row_chunk(rows, width));
  parallel_for(ctx.threads(), static_cast<std::size_t>(rows), chunk, [&fn](std::size_t begin, std::size_t end) {
    fn(static_cast<std::int64_t>(begin), static_cast<std::int64_t>(end - begin));
  });
}

}  // namespace detail

//! C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C, row-major: host_gemm's contract.
//! Runs as host_gemm_parallel's fixed blocks on the context's threads.
template <class T>
void gemm(HostContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
          accumulate_t<T> alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb, accumulate_t<T> beta,
          T* c, std::int64_t ldc, bool /*allow_tf32*/ = false) {
  host_gemm_parallel<T>(ctx.threads(), ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

//! D[m, n] = alpha op(A) op(B) + bias[n] (every row; none when null) + scale * addend[m, n],
//! row-major with leading dimension ldd for D and addend. `addend` may be D itself; scale == 0
//! never reads it. The GEMM accumulates onto (bias + scale * addend), as the device's epilogue.
//! Runs as gemm's blocks on the context's threads, each block filling its own part of D first.
template <class T>
void gemm_bias_add(HostContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                   accumulate_t<T> alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb, const T* bias,
                   accumulate_t<T> scale, const T* addend, T* d, std::int64_t ldd, bool /*allow_tf32*/ = false) {
  detail::check_gemm_args(ta, tb, m, n, k, lda, ldb, ldd);
  // D[r0..r1, c0..c1] <- bias + scale * addend, element by element the same whoever fills it.
  const auto fill = [=](std::int64_t r0, std::int64_t r1, std::int64_t c0, std::int64_t c1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      T* dr = d + r * ldd;
      if (scale == T(0)) {
        if (bias != nullptr) std::copy(bias + c0, bias + c1, dr + c0);
        else std::fill(dr + c0, dr + c1, T(0));
      } else {
        const T* ar = addend + r * ldd;
        for (std::int64_t j = c0; j < c1; ++j) dr[j] = scale * ar[j] + (bias != nullptr ? bias[j] : T(0));
      }
    }
  };
  const HostGemmBlocks blocks = host_gemm_blocks(m, n, k);
  if (blocks.count == 1) {
    detail::for_each_row_chunk(ctx, m, n, [&](std::int64_t first, std::int64_t count) { fill(first, first + count, 0, n); });
    host_gemm<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, T(1), d, ldd);
    return;
  }
  const detail::BlasOneThread one_thread;  // set before the workers call OpenBLAS
  const std::int64_t side = blocks.rows ? m : n;
  parallel_for(ctx.threads(), static_cast<std::size_t>(blocks.count), 1, [&](std::size_t first, std::size_t last) {
    for (std::size_t i = first; i < last; ++i) {
      const auto blk = static_cast<std::int64_t>(i);
      const std::int64_t b0 = host_gemm_block_begin(side, blocks.count, blk);
      const std::int64_t b1 = host_gemm_block_begin(side, blocks.count, blk + 1);
      if (blocks.rows) fill(b0, b1, 0, n);
      else fill(0, m, b0, b1);
      host_gemm_block<T>(blocks, blk, ta, tb, m, n, k, alpha, a, lda, b, ldb, T(1), d, ldd);
    }
  });
}

//! For i < batch: C_i = alpha op(A_i) op(B_i) + beta C_i, X_i = X + i * stride_x, each a gemm.
//! The work items are the batch's GEMMs times host_gemm_blocks(m, n, k) blocks of each, every
//! item a single-threaded host_gemm, run in parallel on the context's threads (the
//! attention's B x H GEMMs are small: one GEMM per thread at a time beats threading each).
template <class T>
void gemm_strided_batched(HostContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n,
                          std::int64_t k, accumulate_t<T> alpha, const T* a, std::int64_t lda, std::int64_t stride_a,
                          const T* b, std::int64_t ldb, std::int64_t stride_b, accumulate_t<T> beta, T* c,
                          std::int64_t ldc, std::int64_t stride_c, std::int64_t batch, bool /*allow_tf32*/ = false) {
  DR2NET_CHECK(batch >= 0, "gemm_strided_batched: batch must not be negative, got ", batch);
  if (batch == 0) return;
  detail::check_gemm_args(ta, tb, m, n, k, lda, ldb, ldc);
  if (m == 0 || n == 0) return;
  const HostGemmBlocks blocks = host_gemm_blocks(m, n, k);
  const detail::BlasOneThread one_thread;  // set before the workers call OpenBLAS
  const auto items = static_cast<std::size_t>(batch * blocks.count);
  parallel_for(ctx.threads(), items, 1, [&](std::size_t first, std::size_t last) {
    for (std::size_t item = first; item < last; ++item) {
      const auto i = static_cast<std::int64_t>(item) / blocks.count, blk = static_cast<std::int64_t>(item) % blocks.count;
      host_gemm_block<T>(blocks, blk, ta, tb, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta,
                         c + i * stride_c, ldc);
    }
  });
}

//! y = LayerNorm(x) for `rows` rows of width d; writes each row's mean and rstd. Fixed row
//! chunks of the single-thread kernel, in parallel.
template <class T>
void layer_norm_forward(HostContext& ctx, const T* x, std::int64_t rows, std::int64_t d, const T* gamma, const T* beta,
                        accumulate_t<T> eps, T* y, accumulate_t<T>* mean, accumulate_t<T>* rstd) {
  if (rows <= 0 || d < 1) {  // nothing to split: the kernel does nothing or raises its error
    layer_norm_forward<T>(x, rows, d, gamma, beta, eps, y, mean, rstd);
    return;
  }
  detail::for_each_row_chunk(ctx, rows, d, [&](std::int64_t first, std::int64_t count) {
    layer_norm_forward<T>(x + first * d, count, d, gamma, beta, eps, y + first * d, mean + first, rstd + first);
  });
}

//! Backward of layer_norm_forward; accumulates dx, dgamma and dbeta. Fixed row chunks of the
//! single-thread kernel run in parallel, each adding its dgamma and dbeta into a zeroed
//! partial sum of its own; the partial sums are then added to dgamma and dbeta in chunk order.
//! With a single chunk the kernel adds into dgamma and dbeta directly.
template <class T>
void layer_norm_backward(HostContext& ctx, const T* x, const accumulate_t<T>* mean, const accumulate_t<T>* rstd,
                         const T* gamma, const T* dy, std::int64_t rows, std::int64_t d, T* dx, T* dgamma, T* dbeta) {
  const std::int64_t chunk = rows > 0 && d >= 1 ? host_row_chunk(rows, d) : 0;
  if (chunk == 0 || chunk >= rows) {
    layer_norm_backward<T>(x, mean, rstd, gamma, dy, rows, d, dx, dgamma, dbeta);
    return;
  }
  const std::int64_t chunks = (rows + chunk - 1) / chunk;
  T* partial = detail::partial_sums_buffer<T>(static_cast<std::size_t>(chunks * 2 * d));
  std::fill(partial, partial + chunks * 2 * d, T(0));
  detail::for_each_row_chunk(ctx, rows, d, [&](std::int64_t first, std::int64_t count) {
    T* pg = partial + first / chunk * 2 * d;  // this chunk's dgamma, then its dbeta
    layer_norm_backward<T>(x + first * d, mean + first, rstd + first, gamma, dy + first * d, count, d, dx + first * d,
                           pg, pg + d);
  });
  for (std::int64_t c = 0; c < chunks; ++c) {
    const T* pg = partial + c * 2 * d;
    for (std::int64_t j = 0; j < d; ++j) dgamma[j] += pg[j];
    for (std::int64_t j = 0; j < d; ++j) dbeta[j] += pg[d + j];
  }
}

//! softmax of each of `rows` rows of `cols` elements (leading dimension ld), in place. Fixed
//! row chunks of the single-thread kernel, in parallel.
template <class T>
void softmax_rows_inplace(HostContext& ctx, T* s, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  if (rows <= 0 || cols < 1 || ld < cols) {  // nothing to split: no rows, or the kernel's error
    softmax_rows_inplace<T>(s, rows, cols, ld);
    return;
  }
  detail::for_each_row_chunk(ctx, rows, ld, [&](std::int64_t first, std::int64_t count) {
    softmax_rows_inplace<T>(s + first * ld, count, cols, ld);
  });
}

//! g <- scale * p (g - rowsum(g p)) for each row, in place over g. Fixed row chunks of the
//! single-thread kernel, in parallel.
template <class T>
void softmax_rows_backward_inplace(HostContext& ctx, const T* p, T* g, std::int64_t rows, std::int64_t cols,
                                   std::int64_t ld, accumulate_t<T> scale) {
  if (rows <= 0 || cols < 1 || ld < cols) {
    softmax_rows_backward_inplace<T>(p, g, rows, cols, ld, scale);
    return;
  }
  detail::for_each_row_chunk(ctx, rows, ld, [&](std::int64_t first, std::int64_t count) {
    softmax_rows_backward_inplace<T>(p + first * ld, g + first * ld, count, cols, ld, scale);
  });
}

//! out[j] += sum over r < rows of x[r * cols + j], for j < cols (a Linear's bias gradient).
//! Fixed row chunks sum into partial sums of their own in parallel; the partial sums are then
//! added to out in chunk order (a single chunk adds its rows into out directly).
template <class T>
void column_sums_add(HostContext& ctx, std::int64_t rows, std::int64_t cols, const T* x, T* out) {
  if (rows <= 0 || cols <= 0) return;
  const std::int64_t chunk = host_row_chunk(rows, cols);
  const auto add_rows = [cols, x](std::int64_t first, std::int64_t count, T* sum) {
    for (std::int64_t r = first; r < first + count; ++r) {
      const T* xr = x + r * cols;
      for (std::int64_t j = 0; j < cols; ++j) sum[j] += xr[j];
    }
  };
  if (chunk >= rows) {
    add_rows(0, rows, out);
    return;
  }
  const std::int64_t chunks = (rows + chunk - 1) / chunk;
  T* partial = detail::partial_sums_buffer<T>(static_cast<std::size_t>(chunks * cols));
  std::fill(partial, partial + chunks * cols, T(0));
  detail::for_each_row_chunk(ctx, rows, cols, [&](std::int64_t first, std::int64_t count) {
    add_rows(first, count, partial + first / chunk * cols);
  });
  for (std::int64_t c = 0; c < chunks; ++c) {
    const T* pc = partial + c * cols;
    for (std::int64_t j = 0; j < cols; ++j) out[j] += pc[j];
  }
}

}  // namespace dr2net
