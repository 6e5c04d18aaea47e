#pragma once
//! \file
//! The CUDA backend's context: one stream, cuBLAS and cuBLASLt handles with their workspace,
//! and one allocator (the device's stream-ordered cudaMallocAsync pool) through which every
//! library allocation goes, metered by the same categories as the host backend. The meter,
//! not nvidia-smi, is where peak bytes come from. Host twin: backend/host/context.hpp.
//! Host-compilable (needs the CUDA toolkit's headers, not nvcc); kernels live in *.cuh.

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <typeindex>
#include <typeinfo>
#include <unordered_map>
#include <utility>

#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"

namespace dr2net {

//! Settings of a CudaContext, fixed when it is constructed.
struct CudaContextOptions {
  int device = 0;  //!< CUDA device ordinal
  //! Fill every new non-integer allocation with all-one bytes (NaN in fp64/fp32/bf16/fp16),
  //! so device code that reads memory nobody wrote shows NaN in results. Tests turn it on.
  bool poison_allocations = false;
  //! Bytes of cuBLASLt workspace (allocated on first GEMM, metered as Other).
  std::size_t gemm_workspace_bytes = std::size_t{32} << 20;
};

class CudaContext;

//! An owning, metered device allocation of `size()` elements of T. Freed stream-ordered on
//! its context's stream, so it must not outlive the context.
template <class T>
class DeviceBuffer {
 public:
  //! Holds nothing: null data(), size() 0, no context. Obtain real buffers from CudaContext::allocate().
  DeviceBuffer() = default;
  //! Takes over `o`'s device memory and its meter record; `o` is left empty. No CUDA call.
  DeviceBuffer(DeviceBuffer&& o) noexcept { swap(o); }
  //! Frees this buffer's memory (stream-ordered, see reset()), then takes over `o`'s; `o` is left empty.
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    DeviceBuffer tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }

  //! Device pointer to the first element, or null when empty(); not dereferenceable on the host.
  T* data() const noexcept { return data_; }
  //! Number of elements of T held (not bytes).
  std::size_t size() const noexcept { return size_; }
  //! True when the buffer holds no memory.
  bool empty() const noexcept { return size_ == 0; }

  //! A contiguous view (of device memory) of the first shape.numel() elements.
  TensorView<T> view(const Shape& shape) const {
    DR2NET_CHECK(static_cast<std::size_t>(shape.numel()) <= size_, "view of shape ", shape, " needs ",
                 shape.numel(), " elements but the device buffer holds ", size_);
    return TensorView<T>(data_, shape);
  }
  //! All elements as a rank-1 view (of device memory).
  TensorView<T> flat() const { return TensorView<T>(data_, Shape{static_cast<std::int64_t>(size_)}); }

  //! Frees the memory with cudaFreeAsync on the context's stream, so kernels already queued on
  //! that stream may still use it (work on other streams must be synchronised by the caller
  //! first), and removes its bytes from the meter unless it came from allocate_unmetered().
  //! Does not wait for the device. The buffer is then empty. The destructor does the same.
  inline void reset() noexcept;

  //! Exchanges memory, size, context and meter record with `o`; nothing is allocated, freed or re-metered.
  void swap(DeviceBuffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(ctx_, o.ctx_);
    std::swap(category_, o.category_);
    std::swap(metered_, o.metered_);
  }

 private:
  friend class CudaContext;
  T* data_ = nullptr;
  std::size_t size_ = 0;
  CudaContext* ctx_ = nullptr;
  MemoryCategory category_ = MemoryCategory::Other;
  bool metered_ = true;  //!< false: allocate_unmetered (another owner records the bytes)
};

//! Resources of the CUDA backend. Not copyable or movable: buffers point back to it.
class CudaContext {
 public:
  //! Opens device `options.device`: makes it the calling thread's current device, sets its
  //! default memory pool to keep freed blocks (release threshold unlimited), and creates a
  //! non-blocking stream (no implicit synchronisation with the legacy default stream). The cuBLAS
  //! handles and the GEMM workspace are created later, on first use. Throws dr2net::Error when no
  //! CUDA device is usable (the CUDA error string, or a device count of 0), when the ordinal is out of
  //! range, or when any of these CUDA calls fails.
  explicit CudaContext(CudaContextOptions options = {}) : options_(options) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    DR2NET_CHECK(e == cudaSuccess && count > 0, "no usable CUDA device: ",
                 e == cudaSuccess ? std::string("device count is 0") : cuda_detail::describe(e));
    DR2NET_CHECK(options.device >= 0 && options.device < count, "CUDA device ", options.device,
                 " requested but only ", count, " present");
    DR2NET_CUDA_CHECK(cudaSetDevice(options.device));
    DR2NET_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, options.device));
    DR2NET_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool_, options.device));
    // Keep freed blocks in the pool (no trimming at every synchronisation): the meter counts
    // what the library holds; the pool reuses what it has freed.
    std::uint64_t keep = std::numeric_limits<std::uint64_t>::max();
    DR2NET_CUDA_CHECK(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep));
    DR2NET_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;
  ~CudaContext() {
    extensions_.clear();
    workspace_.reset();
    if (lt_) cublasLtDestroy(lt_);
    if (blas_) cublasDestroy(blas_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }

  //! The byte accounting of every metered allocation and reservation made through this context
  //! (what the library holds, not what the pool has cached); reset_peaks() starts a window.
  MemoryMeter& meter() noexcept { return meter_; }
  //! Read-only access to the same meter.
  const MemoryMeter& meter() const noexcept { return meter_; }
  //! The options the context was constructed with.
  const CudaContextOptions& options() const noexcept { return options_; }

  //! The context's one stream: every kernel, copy, allocation and free of the library is queued
  //! on it, in order. A caller mixing in its own streams must synchronise with it (events or
  //! synchronize()).
  cudaStream_t stream() const noexcept { return stream_; }
  //! CUDA ordinal of the device the context opened.
  int device() const noexcept { return options_.device; }
  //! Streaming multiprocessors of that device (queried once at construction), used to size grids.
  int multiprocessor_count() const noexcept { return sm_count_; }

  //! Waits for everything queued on the context's stream; throws what a kernel raised.
  void synchronize() const { DR2NET_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  //! The cuBLAS handle (created on first use, bound to the stream).
  cublasHandle_t blas() {
    if (!blas_) {
      DR2NET_CUBLAS_CHECK(cublasCreate(&blas_));
      DR2NET_CUBLAS_CHECK(cublasSetStream(blas_, stream_));
    }
    return blas_;
  }
  //! The cuBLASLt handle (created on first use).
  cublasLtHandle_t blas_lt() {
    if (!lt_) DR2NET_CUBLAS_CHECK(cublasLtCreate(&lt_));
    return lt_;
  }
  //! The cuBLASLt workspace, allocated on first use through the context (category Other).
  void* gemm_workspace() {
    if (workspace_.empty() && options_.gemm_workspace_bytes > 0)
      workspace_ = allocate<std::byte>(options_.gemm_workspace_bytes, MemoryCategory::Other);
    return workspace_.data();
  }
  //! Bytes of the cuBLASLt workspace allocated so far: 0 until gemm_workspace() is first called,
  //! then CudaContextOptions::gemm_workspace_bytes.
  std::size_t gemm_workspace_bytes() const noexcept { return workspace_.size(); }

  //! The context's one object of type X, default-constructed on first use and destroyed with
  //! the context: state that device functions keep per context (cuBLASLt GEMM plans, say).
  template <class X>
  X& extension() {
    std::shared_ptr<void>& slot = extensions_[std::type_index(typeid(X))];
    if (!slot) slot = std::make_shared<X>();
    return *static_cast<X*>(slot.get());
  }

  //! `count` elements of T from the stream-ordered pool, metered under `category`.
  //! A byte count that overflows and an out-of-memory throw, saying what was asked (`what`,
  //! the tensor when the caller names it, its bytes and category) and what the meter held.
  template <class T>
  DeviceBuffer<T> allocate(std::size_t count, MemoryCategory category, const char* what = "device buffer") {
    return allocate_impl<T>(count, category, what, true);
  }

  //! Like allocate(), but the bytes are not put on the meter: for memory that another owner
  //! records once with reserve_bytes (a ReversibleStack records its layers' parameters and
  //! gradients; metering them here too would count every byte twice). `category` names the
  //! memory in errors.
  template <class T>
  DeviceBuffer<T> allocate_unmetered(std::size_t count, MemoryCategory category, const char* what) {
    return allocate_impl<T>(count, category, what, false);
  }

  //! Makes `buffer` hold at least `count` elements, reallocating only when it must.
  template <class T>
  void reserve(DeviceBuffer<T>& buffer, std::size_t count, MemoryCategory category,
               const char* what = "device buffer") {
    if (buffer.size() >= count) return;
    buffer.reset();
    buffer = allocate<T>(count, category, what);
  }

  //! Records `bytes` of `category` that something else owns for as long as the returned
  //! reservation lives; `what` names them (the host twin checks them against its memory limit).
  MeterReservation reserve_bytes(MemoryCategory category, std::size_t bytes, const char* what) {
    (void)what;
    return MeterReservation(meter_, category, bytes);
  }

 private:
  template <class T>
  friend class DeviceBuffer;

  template <class T>
  DeviceBuffer<T> allocate_impl(std::size_t count, MemoryCategory category, const char* what, bool metered) {
    static_assert(std::is_trivially_copyable_v<T>, "device buffers hold trivially copyable elements");
    DeviceBuffer<T> b;
    if (count == 0) return b;
    const std::size_t bytes = checked::bytes(checked::to_int64(count, what), sizeof(T), what);
    void* p = nullptr;
    const cudaError_t e = cudaMallocFromPoolAsync(&p, bytes, pool_, stream_);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // clear the (non-sticky) error so the context stays usable
      std::size_t free_b = 0, total_b = 0;
      (void)cudaMemGetInfo(&free_b, &total_b);
      DR2NET_FAIL("device out of memory allocating ", bytes, " bytes (", MemoryMeter::human_bytes(bytes), ") of ",
                  category_name(category), " for ", what, " while the meter holds ", meter_.current_total(),
                  " bytes (", cuda_detail::describe(e), "; device reports ", free_b, " of ", total_b, " bytes free)");
    }
    b.data_ = static_cast<T*>(p);
    b.size_ = count;
    b.ctx_ = this;
    b.category_ = category;
    b.metered_ = metered;
    if (metered) meter_.add(category, bytes);
    if constexpr (!std::is_integral_v<T> && !std::is_same_v<T, std::byte>) {
      if (options_.poison_allocations) DR2NET_CUDA_CHECK(cudaMemsetAsync(p, 0xFF, bytes, stream_));
    }
    return b;
  }

  void release(void* p, MemoryCategory category, std::size_t bytes, bool metered) noexcept {
    (void)cudaFreeAsync(p, stream_);
    if (metered) meter_.remove(category, bytes);
  }

  CudaContextOptions options_;
  int sm_count_ = 1;
  cudaMemPool_t pool_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  MemoryMeter meter_;
  DeviceBuffer<std::byte> workspace_;
  std::unordered_map<std::type_index, std::shared_ptr<void>> extensions_;
};

template <class T>
void DeviceBuffer<T>::reset() noexcept {
  if (data_ && ctx_) ctx_->release(data_, category_, size_ * sizeof(T), metered_);
  data_ = nullptr;
  size_ = 0;
  ctx_ = nullptr;
}

}  // namespace dr2net
