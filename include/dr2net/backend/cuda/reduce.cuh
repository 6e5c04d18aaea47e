#pragma once
//! \file
//! max_abs_diff_and_max(CudaContext&, a, b, n): the reconstruction monitor's comparison,
//! (max_i |a_i - b_i|, max_i |b_i|) in double, NaN reported rather than hidden by max.
//! Host twin: backend/host/context.hpp.
//!
//! Layers: device-wide function -> two kernels (per-block partials, then one block over the
//! partials) -> cub::BlockReduce with a NaN-propagating max.

#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/error.hpp"

namespace dr2net {
namespace cuda_detail {

inline constexpr int kReduceThreads = 256;

//! A running (max |a - b|, max |b|).
struct DiffAndMax {
  double diff;
  double mag;
};

//! max that keeps a NaN once one was seen: m(NaN, x) = m(x, NaN) = NaN.
__device__ __forceinline__ double nan_max(double a, double b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

//! A stream element in double (bf16/fp16 widen through float).
template <class T>
__device__ __forceinline__ double as_double(T v) {
  if constexpr (std::is_floating_point_v<T>) return static_cast<double>(v);
  else return static_cast<double>(static_cast<float>(v));
}

struct DiffAndMaxOp {
  __device__ __forceinline__ DiffAndMax operator()(const DiffAndMax& l, const DiffAndMax& r) const {
    return {nan_max(l.diff, r.diff), l.mag > r.mag ? l.mag : r.mag};
  }
};

//! One partial per block over a grid-stride slice of [0, n).
template <class T>
__global__ void __launch_bounds__(kReduceThreads)
    diff_and_max_partials(const T* a, const T* b, std::size_t n, DiffAndMax* partials) {
  using BlockReduce = cub::BlockReduce<DiffAndMax, kReduceThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  DiffAndMax acc{0.0, 0.0};
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double bi = as_double(b[i]);
    const double d = as_double(a[i]) - bi;  // NaN when either is NaN
    acc.diff = nan_max(acc.diff, d < 0 ? -d : d);
    const double m = bi < 0 ? -bi : bi;
    acc.mag = m > acc.mag ? m : acc.mag;  // as the host twin: a NaN in b does not set the magnitude
  }
  const DiffAndMax r = BlockReduce(temp).Reduce(acc, DiffAndMaxOp{});
  if (threadIdx.x == 0) partials[blockIdx.x] = r;
}

//! partials[0] <- reduction of partials[0, count), one block.
__global__ void __launch_bounds__(kReduceThreads) diff_and_max_final(DiffAndMax* partials, int count) {
  using BlockReduce = cub::BlockReduce<DiffAndMax, kReduceThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  DiffAndMax acc{0.0, 0.0};
  for (int i = static_cast<int>(threadIdx.x); i < count; i += kReduceThreads) acc = DiffAndMaxOp{}(acc, partials[i]);
  const DiffAndMax r = BlockReduce(temp).Reduce(acc, DiffAndMaxOp{});
  if (threadIdx.x == 0) partials[0] = r;
}

}  // namespace cuda_detail

//! max_i |a_i - b_i| and max_i |b_i| over device arrays, in double; waits for the result.
template <class T>
std::pair<double, double> max_abs_diff_and_max(CudaContext& ctx, const T* a, const T* b, std::size_t n) {
  if (n == 0) return {0.0, 0.0};
  using cuda_detail::DiffAndMax;
  const std::size_t blocks_wanted = (n + cuda_detail::kReduceThreads - 1) / cuda_detail::kReduceThreads;
  const int blocks = static_cast<int>(std::min<std::size_t>(
      blocks_wanted, std::min<std::size_t>(1024, static_cast<std::size_t>(ctx.multiprocessor_count()) * 4)));
  auto partials = ctx.allocate<DiffAndMax>(static_cast<std::size_t>(blocks), MemoryCategory::Other);
  cuda_detail::diff_and_max_partials<T>
      <<<blocks, cuda_detail::kReduceThreads, 0, ctx.stream()>>>(a, b, n, partials.data());
  DR2NET_CUDA_CHECK_LAUNCH("dr2net diff_and_max_partials");
  cuda_detail::diff_and_max_final<<<1, cuda_detail::kReduceThreads, 0, ctx.stream()>>>(partials.data(), blocks);
  DR2NET_CUDA_CHECK_LAUNCH("dr2net diff_and_max_final");
  DiffAndMax r{};
  DR2NET_CUDA_CHECK(cudaMemcpyAsync(&r, partials.data(), sizeof r, cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  return {r.diff, r.mag};
}

}  // namespace dr2net
