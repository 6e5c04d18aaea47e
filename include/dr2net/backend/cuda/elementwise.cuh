#pragma once
//! \file
//! for_each_index(CudaContext&, n, fn): the device form of an elementwise pass. Block code
//! calls it with the same DR2NET_HD functor objects the host backend loops over
//! (backend/host/context.hpp); this launches them.
//!
//! Layers: for_each_index (device-wide) -> a grid-stride kernel -> VectorAccess (per thread).
//! Functors that declare their operands (core/operands.hpp; the fused combines and
//! conversions do) move 16 bytes of their narrowest operand per load and store, as
//! vector_access.cuh derives from the declaration alone: a few head elements bring every
//! operand to a vector boundary, the body runs vectorised, the tail element by element. When
//! the operands cannot be brought to a common boundary together, the whole pass runs element
//! by element. Either way the arithmetic is the functor's own operator().

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/backend/cuda/vector_access.cuh"

namespace dr2net {
namespace cuda_detail {

//! Threads per block of the elementwise kernels (also their __launch_bounds__).
inline constexpr int kElementwiseThreads = 256;

//! fn(i) for i in [0, n), grid-stride.
template <class Fn>
__global__ void __launch_bounds__(kElementwiseThreads) elementwise_kernel(Fn fn, std::size_t n) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) fn(i);
}

//! Elements [0, head) and [head + vectors*V, n) one by one; vectors [head + v*V, head + (v+1)*V)
//! with wide loads. head < V and the tail < V, so the first threads of the grid take them.
template <class Fn>
__global__ void __launch_bounds__(kElementwiseThreads)
    vectorized_kernel(Fn fn, std::size_t n, std::size_t head, std::size_t vectors) {
  using Access = VectorAccess<Fn>;
  constexpr auto V = static_cast<std::size_t>(Access::width);
  const std::size_t tid = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  const std::size_t tail_begin = head + vectors * V;
  if (tid < head) fn(tid);
  if (tid < n - tail_begin) fn(tail_begin + tid);
  for (std::size_t v = tid; v < vectors; v += stride) Access::apply(fn, head + v * V);
}

//! Enough blocks to fill the device a few times over; the kernels stride over the rest.
inline unsigned grid_for(const CudaContext& ctx, std::size_t work) {
  const std::size_t wanted = (work + kElementwiseThreads - 1) / kElementwiseThreads;
  const std::size_t cap = static_cast<std::size_t>(ctx.multiprocessor_count()) * 8;
  return static_cast<unsigned>(std::max<std::size_t>(1, std::min(wanted, cap)));
}

}  // namespace cuda_detail

//! Runs fn(i) for i in [0, n) on the context's stream (asynchronously). `Fn` is a
//! trivially copyable DR2NET_HD functor whose pointers are device memory; it is copied into
//! the kernel's arguments, so `fn` itself may go out of scope on return, but the memory it
//! points to must live until the stream has run the pass. Each index is visited exactly once,
//! in no particular order and in parallel, so fn(i) may write only element i of its outputs
//! (shared flags excepted, where every writer stores the same value).
//! n == 0 launches nothing. A rejected launch throws dr2net::Error naming the kernel; a fault
//! inside the kernel surfaces at the next synchronising call (ctx.synchronize(), a copy to
//! the host).
template <class Fn>
void for_each_index(CudaContext& ctx, std::size_t n, const Fn& fn) {
  if (n == 0) return;
  using Access = cuda_detail::VectorAccess<Fn>;
  if constexpr (Access::enabled) {
    constexpr int V = Access::width;
    cuda_detail::OperandAddress ops[Access::count];
    Access::addresses(fn, ops);
    const int phase = cuda_detail::common_phase(ops, V);
    if (phase >= 0) {
      const std::size_t head = std::min<std::size_t>(n, static_cast<std::size_t>((V - phase) % V));
      const std::size_t vectors = (n - head) / static_cast<std::size_t>(V);
      const std::size_t work = std::max<std::size_t>(vectors, static_cast<std::size_t>(V));
      DR2NET_CUDA_LAUNCH("dr2net vectorized elementwise kernel",
                         cuda_detail::vectorized_kernel<Fn><<<cuda_detail::grid_for(ctx, work),
                                                              cuda_detail::kElementwiseThreads, 0, ctx.stream()>>>(
                             fn, n, head, vectors));
      return;
    }
  }
  DR2NET_CUDA_LAUNCH("dr2net elementwise kernel",
                     cuda_detail::elementwise_kernel<Fn>
                     <<<cuda_detail::grid_for(ctx, n), cuda_detail::kElementwiseThreads, 0, ctx.stream()>>>(fn, n));
}

//! for_each_index without the vectorised path: always one fn(i) per element, whatever
//! operands `Fn` declares. Same contract and errors as for_each_index; tests use it as
//! the vectorised path's twin.
template <class Fn>
void for_each_index_scalar(CudaContext& ctx, std::size_t n, const Fn& fn) {
  if (n == 0) return;
  DR2NET_CUDA_LAUNCH("dr2net elementwise kernel",
                     cuda_detail::elementwise_kernel<Fn>
                     <<<cuda_detail::grid_for(ctx, n), cuda_detail::kElementwiseThreads, 0, ctx.stream()>>>(fn, n));
}

}  // namespace dr2net
