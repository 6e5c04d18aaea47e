#pragma once
//! \file
//! Host <-> device copies on a context's stream, for tests, tools and loading parameters.
//! Copies to the host wait for the stream, so the data is there when they return.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <vector>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/memory_meter.hpp"

namespace dr2net {

//! dst[0, n) <- src[0, n) (host memory to device memory), `n` elements of T.
//! Queued on ctx's stream after the work already there, then waits for the stream, so `src`
//! (pageable or pinned) may be reused or freed as soon as this returns. n == 0 does nothing.
//! A failed copy throws dr2net::Error naming the CUDA call and error (an earlier kernel's
//! fault can surface here too, since this synchronises).
template <class T>
void copy_to_device(CudaContext& ctx, T* dst, const T* src, std::size_t n) {
  if (n == 0) return;
  DR2NET_CUDA_CHECK(cudaMemcpyAsync(dst, src, checked::bytes(checked::to_int64(n, "copy"), sizeof(T), "HostToDevice copy"), cudaMemcpyHostToDevice, ctx.stream()));
  ctx.synchronize();  // the source may be pageable memory the caller frees next
}

//! dst[0, n) <- src[0, n) (device memory to host memory), `n` elements of T; waits for the
//! stream, so the copy sees every kernel queued before it and `dst` is filled on return.
//! n == 0 does nothing. Failures (including a fault of an earlier kernel) throw dr2net::Error.
template <class T>
void copy_to_host(CudaContext& ctx, T* dst, const T* src, std::size_t n) {
  if (n == 0) return;
  DR2NET_CUDA_CHECK(cudaMemcpyAsync(dst, src, checked::bytes(checked::to_int64(n, "copy"), sizeof(T), "DeviceToHost copy"), cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
}

//! dst[0, n) <- src[0, n), both device memory, `n` elements of T; stream-ordered on ctx's
//! stream and asynchronous (no wait): the ranges must not overlap, and both must stay alive
//! until the stream reaches the copy. n == 0 does nothing. A rejected copy throws dr2net::Error.
template <class T>
void copy_on_device(CudaContext& ctx, T* dst, const T* src, std::size_t n) {
  if (n == 0) return;
  DR2NET_CUDA_CHECK(cudaMemcpyAsync(dst, src, checked::bytes(checked::to_int64(n, "copy"), sizeof(T), "DeviceToDevice copy"), cudaMemcpyDeviceToDevice, ctx.stream()));
}

//! A new device buffer of host.size() elements holding a copy of `host`, allocated from ctx's
//! pool and metered under `category` (default MemoryCategory::Other; weights loaded this way
//! pass MemoryCategory::Parameters so the memory report counts them there). Returns once the
//! data is on the device. Out of device memory throws dr2net::Error saying how many bytes
//! were asked for.
template <class T>
DeviceBuffer<T> to_device(CudaContext& ctx, const std::vector<T>& host, MemoryCategory category = MemoryCategory::Other) {
  DeviceBuffer<T> b = ctx.allocate<T>(host.size(), category);
  copy_to_device(ctx, b.data(), host.data(), host.size());
  return b;
}

//! The first n elements at `device` (device memory), copied into a new host vector of size n
//! once every kernel queued before on ctx's stream has finished. Throws as copy_to_host.
template <class T>
std::vector<T> to_host(CudaContext& ctx, const T* device, std::size_t n) {
  std::vector<T> out(n);
  copy_to_host(ctx, out.data(), device, n);
  return out;
}

}  // namespace dr2net
