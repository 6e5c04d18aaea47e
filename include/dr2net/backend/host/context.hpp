#pragma once
//! \file
//! The host (CPU) backend's context: allocations through one place, metered by category.
//! It is both a usable backend and the oracle that device results are compared against.

#include <cstddef>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>

#include "dr2net/backend/host/parallel.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/fixed_point.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"

namespace dr2net {

//! Settings of a HostContext, fixed when it is constructed.
struct HostContextOptions {
  //! Fill every new floating-point allocation with NaN, so reading memory that was never
  //! written shows up as NaN in results instead of passing silently. Tests turn it on.
  bool poison_allocations = false;
  //! Most bytes the meter may hold at once (0: no limit). An allocation or a reservation
  //! (reserve_bytes) that would take the meter's total above it is refused with an error naming
  //! what was asked for, instead of being attempted.
  std::size_t memory_limit = 0;
  //! Threads the host kernels run on (the OpenMP pool, backend/host/parallel.hpp). 0: from
  //! the environment, DR2NET_NUM_THREADS, else OMP_NUM_THREADS, else the processors available.
  //! Results are bit-identical whatever the count: work is split into chunks fixed by the
  //! problem alone and partial results are combined in chunk order. Without OpenMP the
  //! context runs on one thread whatever is asked. Negative values are refused.
  int threads = 0;
};

class HostContext;

//! An owning, metered host allocation of `size()` elements of T (64-byte aligned).
template <class T>
class HostBuffer {
 public:
  //! Holds nothing: null data(), size() 0, nothing metered. Obtain real buffers from HostContext::allocate().
  HostBuffer() = default;
  //! Takes over `o`'s memory and its meter record; `o` is left empty.
  HostBuffer(HostBuffer&& o) noexcept { swap(o); }
  //! Frees this buffer's memory (and its meter record), then takes over `o`'s; `o` is left empty.
  HostBuffer& operator=(HostBuffer&& o) noexcept {
    HostBuffer tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  ~HostBuffer() { reset(); }

  //! First element (64-byte aligned), or null when empty().
  T* data() const noexcept { return data_; }
  //! Number of elements of T held (not bytes).
  std::size_t size() const noexcept { return size_; }
  //! True when the buffer holds no memory.
  bool empty() const noexcept { return size_ == 0; }

  //! A contiguous view of the first shape.numel() elements.
  TensorView<T> view(const Shape& shape) const {
    DR2NET_CHECK(static_cast<std::size_t>(shape.numel()) <= size_, "view of shape ", shape,
                 " needs ", shape.numel(), " elements but the buffer holds ", size_);
    return TensorView<T>(data_, shape);
  }
  //! All elements as a rank-1 view.
  TensorView<T> flat() const { return TensorView<T>(data_, Shape{static_cast<std::int64_t>(size_)}); }

  //! Frees the memory now and removes its bytes from the owning context's meter; the buffer is
  //! then empty. The destructor does the same, so the context must outlive its buffers.
  void reset() noexcept {
    if (data_) {
      ::operator delete(static_cast<void*>(data_), std::align_val_t{kAlignment});
      if (meter_) meter_->remove(category_, size_ * sizeof(T));
    }
    data_ = nullptr;
    size_ = 0;
    meter_ = nullptr;
  }

  //! Exchanges memory, size and meter record with `o`; nothing is allocated, freed or re-metered.
  void swap(HostBuffer& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    std::swap(meter_, o.meter_);
    std::swap(category_, o.category_);
  }

 private:
  friend class HostContext;
  static constexpr std::size_t kAlignment = 64;

  T* data_ = nullptr;
  std::size_t size_ = 0;
  MemoryMeter* meter_ = nullptr;
  MemoryCategory category_ = MemoryCategory::Other;
};

//! Resources of the host backend. Every library allocation goes through allocate().
class HostContext {
 public:
  //! Host memory: views of this backend's buffers and parameters are TensorView<T, HostSpace>.
  using memory_space = HostSpace;
  //! Bytes every allocation's address is a multiple of (what the stack also aligns each slice
  //! of its arenas to).
  static constexpr std::size_t allocation_alignment = 64;
  //! A context with the given options and an empty meter. Neither copyable nor movable: buffers and
  //! reservations keep a pointer to its meter. Resolves the thread count now (threads());
  //! throws dr2net::Error for a negative HostContextOptions::threads or a malformed
  //! DR2NET_NUM_THREADS / OMP_NUM_THREADS, naming the value.
  explicit HostContext(HostContextOptions options = {})
      : options_(options), threads_(resolve_host_threads(options.threads)) {}
  HostContext(const HostContext&) = delete;
  HostContext& operator=(const HostContext&) = delete;

  //! The byte accounting of every allocation and reservation made through this context; callers
  //! may reset_peaks() on it to start a measurement window.
  MemoryMeter& meter() noexcept { return meter_; }
  //! Read-only access to the same meter (current and peak bytes per category).
  const MemoryMeter& meter() const noexcept { return meter_; }
  //! The options the context was constructed with.
  const HostContextOptions& options() const noexcept { return options_; }
  //! Threads this context's kernels run on: HostContextOptions::threads, or the environment's
  //! count when that is 0 (resolve_host_threads); 1 without OpenMP. Fixed for the context's life.
  int threads() const noexcept { return threads_; }

  //! `count` elements of T, metered under `category`. A byte count that overflows, one over
  //! HostContextOptions::memory_limit and an out-of-memory all throw dr2net::Error naming the
  //! bytes, the category and `what` (the tensor, when the caller names it).
  template <class T>
  HostBuffer<T> allocate(std::size_t count, MemoryCategory category, const char* what = "host buffer") {
    static_assert(std::is_trivially_copyable_v<T>, "host buffers hold trivially copyable elements");
    HostBuffer<T> b;
    if (count == 0) return b;
    const std::size_t bytes = checked::bytes(checked::to_int64(count, what), sizeof(T), what);
    check_limit(bytes, category, what);
    void* p = nullptr;
    try {
      p = ::operator new(bytes, std::align_val_t{HostBuffer<T>::kAlignment});
    } catch (const std::bad_alloc&) {
      DR2NET_FAIL("host out of memory allocating ", bytes, " bytes (", MemoryMeter::human_bytes(bytes), ") of ",
                  category_name(category), " for ", what, " while the meter holds ", meter_.current_total(), " bytes");
    }
    b.data_ = static_cast<T*>(p);
    b.size_ = count;
    b.meter_ = &meter_;
    b.category_ = category;
    meter_.add(category, bytes);
    if constexpr (std::is_floating_point_v<T>) {
      if (options_.poison_allocations)
        for (std::size_t i = 0; i < bytes / sizeof(T); ++i) b.data_[i] = std::numeric_limits<T>::quiet_NaN();
    }
    return b;
  }

  //! Makes `buffer` hold at least `count` elements, reallocating only when it must.
  template <class T>
  void reserve(HostBuffer<T>& buffer, std::size_t count, MemoryCategory category, const char* what = "host buffer") {
    if (buffer.size() >= count) return;
    buffer.reset();
    buffer = allocate<T>(count, category, what);
  }

  //! Records `bytes` of `category` that something else owns (parameters held by a module, say)
  //! for as long as the returned reservation lives, after the same memory_limit check as
  //! allocate(); `what` names them in the error.
  MeterReservation reserve_bytes(MemoryCategory category, std::size_t bytes, const char* what) {
    check_limit(bytes, category, what);
    return MeterReservation(meter_, category, bytes);
  }

 private:
  void check_limit(std::size_t bytes, MemoryCategory category, const char* what) const {
    const std::size_t limit = options_.memory_limit;
    if (limit == 0) return;
    const std::size_t held = meter_.current_total();
    DR2NET_CHECK(bytes <= limit && held <= limit - bytes, "host memory limit: ", what, " needs ", bytes, " bytes (",
                 MemoryMeter::human_bytes(bytes), ") of ", category_name(category), " while the meter holds ", held,
                 " bytes, over the limit of ", limit, " bytes (", MemoryMeter::human_bytes(limit), ")");
  }

  HostContextOptions options_;
  int threads_ = 1;
  MemoryMeter meter_;
};

//! dst[0, n) <- src[0, n): reading library memory back (host memory already; a plain copy).
template <class T>
void copy_to_host(HostContext&, T* dst, const T* src, std::size_t n) {
  if (n > 0) std::memcpy(dst, src, n * sizeof(T));
}

//! Elements per chunk of for_each_index: [0, n) is cut at multiples of this, whatever the
//! thread count (a multiple of 64, so SIMD bodies see whole vectors but in the last chunk).
inline constexpr std::size_t kHostElementChunk = 8192;

//! Whether an elementwise functor provides the host-only range method
//! `void run_range(std::size_t begin, std::size_t end) const`, which for_each_index then calls
//! per chunk instead of fn(i) per element. It must produce for every element i in
//! [begin, end) exactly what it produces for i in any other range (tails handled by the same
//! vector arithmetic, not a scalar fallback that rounds differently).
template <class Fn>
concept HostRangeFunctor = requires(const Fn& fn, std::size_t begin, std::size_t end) { fn.run_range(begin, end); };

//! Runs `fn(i)` for i in [0, n): the host form of an elementwise kernel launch. Block code
//! calls this with the same functor objects a device backend launches. [0, n) is split into
//! chunks of kHostElementChunk elements that run on the context's threads (threads()), in
//! no particular order; each chunk calls fn.run_range(begin, end) when the functor has it
//! (HostRangeFunctor), else fn(i) for its i in order. So fn(i) for distinct i may run
//! concurrently: each element's work must write only memory of its own (flags that several
//! elements may set to the same value aside). Results do not depend on the thread count.
template <class Fn>
void for_each_index(HostContext& ctx, std::size_t n, const Fn& fn) {
  parallel_for(ctx.threads(), n, kHostElementChunk, [&fn](std::size_t begin, std::size_t end) {
    if constexpr (HostRangeFunctor<Fn>) {
      fn.run_range(begin, end);
    } else {
      for (std::size_t i = begin; i < end; ++i) fn(i);
    }
  });
}

}  // namespace dr2net

// The reductions (max_abs_diff_and_max, compare_and_restore, count_not_finite,
// stream_checksum) need HostContext complete: included after it.
#include "dr2net/backend/host/reduce.hpp"
