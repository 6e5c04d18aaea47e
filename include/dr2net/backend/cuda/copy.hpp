#pragma once
//! \file
//! Host <-> device copies on a context's stream, for tests, tools and loading parameters.
//! Copies to the host wait for the stream, so the data is there when they return.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <vector>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/core/memory_meter.hpp"

namespace dr2net {

//! dst[0, n) <- src[0, n) (host memory to device memory).
template <class T>
void copy_to_device(CudaContext& ctx, T* dst, const T* src, std::size_t n) {
  if (n == 0) return;
  DR2NET_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyHostToDevice, ctx.stream()));
  ctx.synchronize();  // the source may be pageable memory the caller frees next
}

//! dst[0, n) <- src[0, n) (device memory to host memory); waits for the copy.
template <class T>
void copy_to_host(CudaContext& ctx, T* dst, const T* src, std::size_t n) {
  if (n == 0) return;
  DR2NET_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
}

//! dst[0, n) <- src[0, n), both device memory, stream-ordered (no wait).
template <class T>
void copy_on_device(CudaContext& ctx, T* dst, const T* src, std::size_t n) {
  if (n == 0) return;
  DR2NET_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToDevice, ctx.stream()));
}

//! A new device buffer holding a copy of host data.
template <class T>
DeviceBuffer<T> to_device(CudaContext& ctx, const std::vector<T>& host, MemoryCategory category = MemoryCategory::Other) {
  DeviceBuffer<T> b = ctx.allocate<T>(host.size(), category);
  copy_to_device(ctx, b.data(), host.data(), host.size());
  return b;
}

//! The first n elements of device memory, copied to a host vector.
template <class T>
std::vector<T> to_host(CudaContext& ctx, const T* device, std::size_t n) {
  std::vector<T> out(n);
  copy_to_host(ctx, out.data(), device, n);
  return out;
}

}  // namespace dr2net
