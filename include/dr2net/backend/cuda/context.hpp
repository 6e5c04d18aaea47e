#pragma once
//! \file
//! The CUDA backend's context: one stream, cuBLAS and cuBLASLt handles with their workspace,
//! and one allocator (the device's stream-ordered cudaMallocAsync pool) through which every
//! library allocation goes, metered by the same categories as the host backend. The meter,
//! not nvidia-smi, is where peak bytes come from. Host twin: backend/host/context.hpp.
//! The context leaves the thread's current device and the pool's settings as it found them
//! (backend/cuda/device_scope.hpp).
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

#include "dr2net/backend/cuda/device_scope.hpp"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"

namespace dr2net {

namespace cuda_detail {

//! The runtime's current device, for BasicDeviceScope.
struct RuntimeDeviceApi {
  int current() const {
    int d = 0;
    DR2NET_CUDA_CHECK(cudaGetDevice(&d));
    return d;
  }
  void make_current(int device) const { DR2NET_CUDA_CHECK(cudaSetDevice(device)); }
  void restore(int device) const noexcept {
    if (cudaSetDevice(device) != cudaSuccess) (void)cudaGetLastError();  // nothing left pending
  }
};

//! The process's one record of raised pool release thresholds (see ReleaseThresholdShare).
inline ReleaseThresholdShare<cudaMemPool_t>& release_threshold_share() {
  static ReleaseThresholdShare<cudaMemPool_t> share;
  return share;
}

}  // namespace cuda_detail

//! Makes a CUDA device the calling thread's current device for the scope's lifetime, then
//! makes the previously current one current again (no call when they are the same). Kernel
//! launches and cuBLAS calls on a context need its device current: hold one of these
//! (CudaContext::device_scope()) around work on a context whose device is not the thread's
//! current one. Throws dr2net::Error when the device cannot be made current.
class CudaDeviceScope {
 public:
  //! Makes `device` current until the scope ends.
  explicit CudaDeviceScope(int device) : scope_({}, device) {}
  //! The device that was current before the scope.
  int previous() const noexcept { return scope_.previous(); }

 private:
  cuda_detail::BasicDeviceScope<cuda_detail::RuntimeDeviceApi> scope_;
};

//! Settings of a CudaContext, fixed when it is constructed.
struct CudaContextOptions {
  int device = 0;  //!< CUDA device ordinal
  //! Fill every new non-integer allocation with all-one bytes (NaN in fp64/fp32/bf16/fp16),
  //! so device code that reads memory nobody wrote shows NaN in results. Tests turn it on.
  bool poison_allocations = false;
  //! Bytes of the GEMM workspace that cuBLASLt (each matmul) and cuBLAS (cublasSetWorkspace)
  //! share, allocated through the context on first GEMM and metered as Other. 32 MiB is what
  //! cuBLAS recommends on Hopper (4 MiB on older GPUs); 0 runs both libraries without one.
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
  DeviceView<T> view(const Shape& shape) const {
    DR2NET_CHECK(static_cast<std::size_t>(shape.numel()) <= size_, "view of shape ", shape, " needs ",
                 shape.numel(), " elements but the device buffer holds ", size_);
    return DeviceView<T>(data_, shape);
  }
  //! All elements as a rank-1 view (of device memory).
  DeviceView<T> flat() const { return DeviceView<T>(data_, Shape{static_cast<std::int64_t>(size_)}); }

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
  //! Device memory: views of this backend's buffers and parameters are DeviceView<T>.
  using memory_space = DeviceSpace;
  //! Bytes every allocation's address is a multiple of (the stream-ordered pool gives at least
  //! 256), and what the stack aligns each slice of its arenas to (cuBLASLt and 16-byte vectors).
  static constexpr std::size_t allocation_alignment = 256;
  //! Opens device `options.device`: sets its default memory pool to keep freed blocks (release
  //! threshold unlimited, while any context uses the pool: the last one to end restores what
  //! it found), and creates a non-blocking stream (no implicit synchronisation with the legacy
  //! default stream). The cuBLAS handles and the GEMM workspace are created later, on first
  //! use. The device is current only while the constructor runs: the caller's current device
  //! is restored (see device_scope() for the rule on later calls). Throws dr2net::Error when
  //! no CUDA device is usable (the CUDA error string, or a device count of 0), when the
  //! ordinal is out of range, or when any of these CUDA calls fails; no error is left pending.
  explicit CudaContext(CudaContextOptions options = {}) : options_(options) {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) (void)cudaGetLastError();  // reported here, not by the next check
    DR2NET_CHECK(e == cudaSuccess && count > 0, "no usable CUDA device: ",
                 e == cudaSuccess ? std::string("device count is 0") : cuda_detail::describe(e));
    DR2NET_CHECK(options.device >= 0 && options.device < count, "CUDA device ", options.device,
                 " requested but only ", count, " present");
    const CudaDeviceScope scope(options.device);
    DR2NET_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, options.device));
    cudaMemPool_t pool = nullptr;
    DR2NET_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, options.device));
    // Keep freed blocks in the pool (no trimming at every synchronisation): the meter counts
    // what the library holds; the pool reuses what it has freed.
    cuda_detail::release_threshold_share().acquire(
        pool, std::numeric_limits<std::uint64_t>::max(),
        [pool] {
          std::uint64_t v = 0;
          DR2NET_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &v));
          return v;
        },
        [pool](std::uint64_t v) {
          DR2NET_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &v));
        });
    pool_ = pool;  // from here on the destructor lets go of the threshold
    try {
      DR2NET_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    } catch (...) {
      release_pool();
      throw;
    }
  }
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;
  //! Frees what the context holds (on its device, restoring the caller's current device),
  //! waits for its stream, and gives back its hold on the pool's release threshold. Errors are
  //! swallowed (a destructor does not throw) and leave nothing pending but a sticky error.
  ~CudaContext() {
    const cuda_detail::BasicDeviceScope<QuietDeviceApi> scope({}, options_.device);
    extensions_.clear();
    if (lt_) cublasLtDestroy(lt_);
    if (blas_) cublasDestroy(blas_);
    workspace_.reset();  // after the handles that use it; freed in stream order
    (void)cudaStreamSynchronize(stream_);
    (void)cudaStreamDestroy(stream_);
    release_pool();
    (void)cudaGetLastError();
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
  //! Makes the context's device current until the returned scope ends, then the caller's.
  //! The rule: the context makes its device current only around its own calls (construction,
  //! allocation, frees, handle creation, destruction); kernel launches and cuBLAS calls made
  //! on it (the library's functions, the stack) need the device current on the calling
  //! thread. With one device (ordinal 0, every thread's default) nothing is to do; with
  //! several, hold `const auto scope = ctx.device_scope();` around the work on each context.
  CudaDeviceScope device_scope() const { return CudaDeviceScope(options_.device); }
  //! Streaming multiprocessors of that device (queried once at construction), used to size grids.
  int multiprocessor_count() const noexcept { return sm_count_; }

  //! Waits for everything queued on the context's stream; throws what a kernel raised.
  void synchronize() const { DR2NET_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

  //! The cuBLAS handle (created on first use on the context's device, bound to the stream).
  //! Its kernels use the context's metered GEMM workspace (gemm_workspace(), set with
  //! cublasSetWorkspace after cublasSetStream, which resets it), never cuBLAS's own pool; what
  //! cuBLAS itself allocates for the handle when it is created (its default workspace pool,
  //! sized by the CUBLAS_WORKSPACE_CONFIG environment variable) is outside the meter.
  cublasHandle_t blas() {
    if (!blas_) {
      void* workspace = gemm_workspace();
      const CudaDeviceScope scope(options_.device);
      cublasHandle_t h = nullptr;
      DR2NET_CUBLAS_CHECK(cublasCreate(&h));
      try {
        DR2NET_CUBLAS_CHECK(cublasSetStream(h, stream_));
        DR2NET_CUBLAS_CHECK(cublasSetWorkspace(h, workspace, workspace_.size()));
      } catch (...) {
        cublasDestroy(h);
        throw;
      }
      blas_ = h;
    }
    return blas_;
  }
  //! The cuBLASLt handle (created on first use, on the context's device).
  cublasLtHandle_t blas_lt() {
    if (!lt_) {
      const CudaDeviceScope scope(options_.device);
      DR2NET_CUBLAS_CHECK(cublasLtCreate(&lt_));
    }
    return lt_;
  }
  //! The GEMM workspace, allocated on first use through the context (category Other): each
  //! cublasLtMatmul is given it, and the cuBLAS handle uses it (cublasSetWorkspace). Both
  //! libraries run on the context's one stream, in order, so they never use it at once.
  void* gemm_workspace() {
    if (workspace_.empty() && options_.gemm_workspace_bytes > 0)
      workspace_ = allocate<std::byte>(options_.gemm_workspace_bytes, MemoryCategory::Other);
    return workspace_.data();
  }
  //! Bytes of the GEMM workspace allocated so far: 0 until gemm_workspace() (or blas()) is
  //! first called, then CudaContextOptions::gemm_workspace_bytes.
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
    const CudaDeviceScope scope(options_.device);
    void* p = nullptr;
    const cudaError_t e = cudaMallocFromPoolAsync(&p, bytes, pool_, stream_);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // clear the (non-sticky) error so the context stays usable
      std::size_t free_b = 0, total_b = 0;
      if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) (void)cudaGetLastError();
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
    {
      const cuda_detail::BasicDeviceScope<QuietDeviceApi> scope({}, options_.device);
      if (cudaFreeAsync(p, stream_) != cudaSuccess) (void)cudaGetLastError();  // nothing left pending
    }
    if (metered) meter_.remove(category, bytes);
  }

  //! The current device for noexcept paths (frees, the destructor): failures are cleared and
  //! ignored (a device that cannot be made current leaves the caller's as it was).
  struct QuietDeviceApi {
    int current() const noexcept {
      int d = 0;
      if (cudaGetDevice(&d) != cudaSuccess) (void)cudaGetLastError();
      return d;
    }
    void make_current(int device) const noexcept { restore(device); }
    void restore(int device) const noexcept {
      if (cudaSetDevice(device) != cudaSuccess) (void)cudaGetLastError();
    }
  };

  //! Gives back this context's hold on the pool's release threshold (once).
  void release_pool() noexcept {
    if (!pool_) return;
    const cudaMemPool_t pool = pool_;
    cuda_detail::release_threshold_share().release(pool, [pool](std::uint64_t v) noexcept {
      if (cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &v) != cudaSuccess) (void)cudaGetLastError();
    });
    pool_ = nullptr;
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
