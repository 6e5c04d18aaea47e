#pragma once
//! \file
//! The CUDA backend's two pieces of process- and thread-wide state, handled so that a
//! context leaves them as it found them. Plain C++ over a small `Api`, so that a host test
//! drives them with a fake runtime; backend/cuda/context.hpp plugs in the real one.
//!
//!  - The current device is per host thread (cudaSetDevice). BasicDeviceScope makes a device
//!    current for one scope and then restores the caller's, so a context on device 1 does not
//!    leave a thread that works on device 0 pointing at device 1.
//!  - A device's default memory pool is shared by the whole process. ReleaseThresholdShare
//!    raises its release threshold while at least one context uses the pool and restores the
//!    value it found when the last one lets go, whatever order the contexts end in.

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>

namespace dr2net::cuda_detail {

//! Makes `device` current for the scope's lifetime. `Api` provides `int current()` and
//! `void make_current(int)` (both may throw) and `void restore(int) noexcept`.
template <class Api>
class BasicDeviceScope {
 public:
  //! Remembers the current device and makes `device` current (no call when it already is).
  BasicDeviceScope(Api api, int device) : api_(api), previous_(api_.current()) {
    if (previous_ != device) {
      api_.make_current(device);
      changed_ = true;
    }
  }
  BasicDeviceScope(const BasicDeviceScope&) = delete;
  BasicDeviceScope& operator=(const BasicDeviceScope&) = delete;
  //! Makes the remembered device current again, when the constructor changed it.
  ~BasicDeviceScope() {
    if (changed_) api_.restore(previous_);
  }
  //! The device that was current before the scope.
  int previous() const noexcept { return previous_; }

 private:
  Api api_;
  int previous_;
  bool changed_ = false;
};

//! One process-wide record per memory pool of who holds its release threshold raised: the
//! first holder saves the pool's threshold and sets the wanted one, the last restores the saved.
template <class Pool>
class ReleaseThresholdShare {
 public:
  //! One more holder of `pool`; the first reads its threshold with `get()` (keeping it) and
  //! sets `wanted` with `set(value)`. Nothing is recorded when either throws.
  template <class Get, class Set>
  void acquire(Pool pool, std::uint64_t wanted, Get&& get, Set&& set) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(pool);
    if (it != entries_.end()) {
      ++it->second.holders;
      return;
    }
    const std::uint64_t saved = get();
    set(wanted);
    entries_.emplace(pool, Entry{1, saved});
  }

  //! One holder of `pool` fewer; the last one calls `set(saved)` with the threshold the first
  //! found (`set` must not throw). A pool nobody acquired is ignored.
  template <class Set>
  void release(Pool pool, Set&& set) noexcept {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(pool);
    if (it == entries_.end()) return;
    if (--it->second.holders > 0) return;
    set(it->second.saved);
    entries_.erase(it);
  }

  //! How many holders `pool` has now (0 when none).
  std::size_t holders(Pool pool) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = entries_.find(pool);
    return it == entries_.end() ? 0 : it->second.holders;
  }

 private:
  struct Entry {
    std::size_t holders;
    std::uint64_t saved;
  };
  mutable std::mutex mutex_;
  std::map<Pool, Entry> entries_;
};

}  // namespace dr2net::cuda_detail
