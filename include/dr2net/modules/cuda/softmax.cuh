#pragma once
//! \file
//! Row softmax on the device and its backward, in place, one thread block per row with
//! cub::BlockReduce in fp32 (fp64 for double). Host twin: backend/host/softmax.hpp.
//!
//!   forward:  p_j = exp(s_j - max_k s_k) / sum_k exp(s_k - max_k s_k)
//!   backward: ds_j = scale * p_j (dp_j - sum_k dp_k p_k)

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <cstdint>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/backend/host/math.hpp"
#include "dr2net/modules/cuda/types.cuh"

namespace dr2net {
namespace cuda_detail {

inline constexpr int kSoftmaxThreads = 128;

struct MaxOp {
  template <class A>
  __device__ __forceinline__ A operator()(const A& a, const A& b) const {
    return a > b ? a : b;
  }
};

template <class T>
__global__ void __launch_bounds__(kSoftmaxThreads) softmax_rows_kernel(T* s, std::int64_t cols, std::int64_t ld) {
  using A = acc_t<T>;
  using BlockReduce = cub::BlockReduce<A, kSoftmaxThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  __shared__ A s_max, s_inv;
  T* row = s + static_cast<std::int64_t>(blockIdx.x) * ld;
  A mx = -INFINITY;
  for (std::int64_t j = threadIdx.x; j < cols; j += kSoftmaxThreads) mx = MaxOp{}(mx, widen(row[j]));
  mx = BlockReduce(temp).Reduce(mx, MaxOp{});
  if (threadIdx.x == 0) s_max = mx;
  __syncthreads();
  mx = s_max;
  A sum = 0;
  for (std::int64_t j = threadIdx.x; j < cols; j += kSoftmaxThreads) sum += detail::exp_of(widen(row[j]) - mx);
  sum = BlockReduce(temp).Sum(sum);
  if (threadIdx.x == 0) s_inv = A(1) / sum;
  __syncthreads();
  const A inv = s_inv;
  // exp recomputed rather than stored in T in between: one rounding to T, as in fp32 on the host.
  for (std::int64_t j = threadIdx.x; j < cols; j += kSoftmaxThreads) row[j] = narrow<T>(detail::exp_of(widen(row[j]) - mx) * inv);
}

template <class T>
__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_rows_backward_kernel(const T* p, T* g, std::int64_t cols, std::int64_t ld, acc_t<T> scale) {
  using A = acc_t<T>;
  using BlockReduce = cub::BlockReduce<A, kSoftmaxThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  __shared__ A s_dot;
  const T* pr = p + static_cast<std::int64_t>(blockIdx.x) * ld;
  T* gr = g + static_cast<std::int64_t>(blockIdx.x) * ld;
  A dot = 0;
  for (std::int64_t j = threadIdx.x; j < cols; j += kSoftmaxThreads) dot += widen(gr[j]) * widen(pr[j]);
  dot = BlockReduce(temp).Sum(dot);
  if (threadIdx.x == 0) s_dot = dot;
  __syncthreads();
  dot = s_dot;
  for (std::int64_t j = threadIdx.x; j < cols; j += kSoftmaxThreads)
    gr[j] = narrow<T>(scale * widen(pr[j]) * (widen(gr[j]) - dot));
}

inline unsigned row_grid(std::int64_t rows) {
  DR2NET_CHECK(rows >= 0 && rows <= 0x7fffffff, "row kernels: ", rows, " rows exceed the grid's range");
  return static_cast<unsigned>(rows);
}

}  // namespace cuda_detail

//! softmax of each of `rows` rows of `cols` elements (leading dimension ld), in place.
template <class T>
void softmax_rows_inplace(CudaContext& ctx, T* s, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  if (rows == 0 || cols == 0) return;
  cuda_detail::softmax_rows_kernel<T><<<cuda_detail::row_grid(rows), cuda_detail::kSoftmaxThreads, 0, ctx.stream()>>>(s, cols, ld);
  DR2NET_CUDA_CHECK_LAUNCH("dr2net softmax_rows_kernel");
}

//! g <- scale * p (g - rowsum(g p)) for each row, in place over g.
template <class T>
void softmax_rows_backward_inplace(CudaContext& ctx, const T* p, T* g, std::int64_t rows, std::int64_t cols,
                                   std::int64_t ld, cuda_detail::acc_t<T> scale) {
  if (rows == 0 || cols == 0) return;
  cuda_detail::softmax_rows_backward_kernel<T>
      <<<cuda_detail::row_grid(rows), cuda_detail::kSoftmaxThreads, 0, ctx.stream()>>>(p, g, cols, ld, scale);
  DR2NET_CUDA_CHECK_LAUNCH("dr2net softmax_rows_backward_kernel");
}

}  // namespace dr2net
