#pragma once
//! \file
//! column_sums(ctx, rows, cols, fn, out0, out1): for every column j,
//!
//!   out0[j] += sum_r fn(r, j).first,   out1[j] += sum_r fn(r, j).second   (out1 may be null)
//!
//! accumulated in fp32 (fp64 for double) and deterministic: no atomics, every sum taken in a
//! fixed order. The bias gradient of a Linear and the weight/bias gradients of a LayerNorm.
//!
//! Layers: column_sums -> partials kernel (a 32 x 8 thread tile per 32 columns and one chunk
//! of rows; the 8 row-threads' sums combined in shared memory) -> final kernel (one thread per
//! column adds the chunks' partials in order and writes out0/out1).

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/modules/cuda/types.cuh"

namespace dr2net {
namespace cuda_detail {

//! Two running sums (the second unused by single-output callers).
template <class A>
struct SumPair {
  A first, second;
};

inline constexpr int kColumnTile = 32, kColumnRowThreads = 8;

template <class A, class Fn>
__global__ void __launch_bounds__(kColumnTile * kColumnRowThreads)
    column_sum_partials(std::int64_t rows, std::int64_t cols, std::int64_t rows_per_chunk, Fn fn, A* partials) {
  __shared__ A s0[kColumnRowThreads][kColumnTile + 1], s1[kColumnRowThreads][kColumnTile + 1];
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kColumnTile + threadIdx.x;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_chunk;
  const std::int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  A a0 = 0, a1 = 0;
  if (j < cols)
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += kColumnRowThreads) {
      const SumPair<A> v = fn(r, j);
      a0 += v.first;
      a1 += v.second;
    }
  s0[threadIdx.y][threadIdx.x] = a0;
  s1[threadIdx.y][threadIdx.x] = a1;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    A t0 = 0, t1 = 0;
    for (int k = 0; k < kColumnRowThreads; ++k) {
      t0 += s0[k][threadIdx.x];
      t1 += s1[k][threadIdx.x];
    }
    partials[(2 * static_cast<std::int64_t>(blockIdx.y)) * cols + j] = t0;
    partials[(2 * static_cast<std::int64_t>(blockIdx.y) + 1) * cols + j] = t1;
  }
}

template <class T, class A>
__global__ void column_sum_final(const A* partials, std::int64_t chunks, std::int64_t cols, T* out0, T* out1) {
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  A t0 = 0, t1 = 0;
  for (std::int64_t c = 0; c < chunks; ++c) {
    t0 += partials[2 * c * cols + j];
    t1 += partials[(2 * c + 1) * cols + j];
  }
  out0[j] = narrow<T>(widen(out0[j]) + t0);
  if (out1 != nullptr) out1[j] = narrow<T>(widen(out1[j]) + t1);
}

}  // namespace cuda_detail

//! out0[j] += sum_r fn(r, j).first, out1[j] += sum_r fn(r, j).second (see the file comment).
//! fn is a __device__-callable object returning cuda_detail::SumPair<acc_t<T>>.
template <class T, class Fn>
void column_sums(CudaContext& ctx, std::int64_t rows, std::int64_t cols, const Fn& fn, T* out0, T* out1 = nullptr) {
  using A = cuda_detail::acc_t<T>;
  if (rows <= 0 || cols <= 0) return;
  // About 256 rows per chunk, at most 128 chunks: enough blocks to fill the device.
  const std::int64_t chunks = std::min<std::int64_t>(128, (rows + 255) / 256);
  const std::int64_t per_chunk = (rows + chunks - 1) / chunks;
  auto partials = ctx.allocate<A>(static_cast<std::size_t>(2 * chunks * cols), MemoryCategory::Scratch);
  const dim3 grid(static_cast<unsigned>((cols + cuda_detail::kColumnTile - 1) / cuda_detail::kColumnTile),
                  static_cast<unsigned>(chunks));
  const dim3 block(cuda_detail::kColumnTile, cuda_detail::kColumnRowThreads);
  cuda_detail::column_sum_partials<A, Fn><<<grid, block, 0, ctx.stream()>>>(rows, cols, per_chunk, fn, partials.data());
  DR2NET_CUDA_CHECK_LAUNCH("dr2net column_sum_partials");
  cuda_detail::column_sum_final<T, A>
      <<<static_cast<unsigned>((cols + 255) / 256), 256, 0, ctx.stream()>>>(partials.data(), chunks, cols, out0, out1);
  DR2NET_CUDA_CHECK_LAUNCH("dr2net column_sum_final");
}

namespace cuda_detail {

//! fn(r, j) = (dy[r, j], 0): a Linear's bias gradient.
template <class T>
struct ColumnOf {
  const T* dy;
  std::int64_t cols;
  __device__ SumPair<acc_t<T>> operator()(std::int64_t r, std::int64_t j) const {
    return {widen(dy[r * cols + j]), acc_t<T>(0)};
  }
};

}  // namespace cuda_detail
}  // namespace dr2net
