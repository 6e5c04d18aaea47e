#pragma once
//! \file
//! How the CUDA backend's checks treat the runtime's per-thread pending error. Plain C++ over
//! a `Source` of that state, so that a host test drives it with a fake runtime;
//! backend/cuda/error.hpp plugs in the real one (cudaGetLastError, cudaPeekAtLastError).
//!
//! The CUDA runtime keeps one pending error per host thread: a failed call sets it, a
//! successful call leaves it alone, cudaGetLastError returns and clears it, and
//! cudaPeekAtLastError returns it without clearing. A sticky error (a fault inside a kernel)
//! is never cleared: the process's CUDA context is unusable and every later call returns it.
//! Two rules follow, so that an error is reported once, where it happened:
//!
//!  - a check that reports a failed call clears what that call left pending (take()), so the
//!    next kernel launch's check does not report it again under the kernel's name;
//!  - a launch check takes what was pending *before* the launch (an unchecked failure
//!    elsewhere) and judges the launch by what is pending after it; an error that was sticky
//!    before the launch is reported as such, not as the kernel's own failure.
//!
//! A `Source` provides `code_type`, a `static constexpr code_type success`, `code_type take()`
//! (return and clear: cudaGetLastError), `code_type peek()` (return only: cudaPeekAtLastError)
//! and `std::string describe(code_type)`.

#include <string>

#include "dr2net/core/error.hpp"

namespace dr2net::cuda_detail {

//! Clears what a failed call left pending and says whether an error is still pending after
//! that (a sticky one, which no call clears).
template <class Source>
bool clear_reported(const Source& src) {
  (void)src.take();
  return src.peek() != Source::success;
}

//! Throws dr2net::Error "CUDA call `call` failed: <describe(e)>" at file:line, after clearing
//! the pending error the call left (noted in the message when it is sticky).
template <class Source>
[[noreturn]] void throw_failed_call(const Source& src, typename Source::code_type e, const char* call,
                                    const char* file, int line) {
  const bool sticky = clear_reported(src);
  throw Error(std::string("CUDA call `") + call + "` failed: " + src.describe(e) +
                  (sticky ? " (a sticky error: the device context is unusable, every later CUDA call fails)" : ""),
              file, line);
}

//! Throws dr2net::Error "<library> call `call` failed: <status>" at file:line for a failed call
//! of a library over the runtime (cuBLAS): what the library left pending in the runtime is
//! cleared too, and named in the message when there was something.
template <class Source>
[[noreturn]] void throw_failed_library_call(const Source& src, const char* library, const std::string& status,
                                            const char* call, const char* file, int line) {
  const typename Source::code_type pending = src.take();
  std::string m = std::string(library) + " call `" + call + "` failed: " + status;
  if (pending != Source::success) m += "; the CUDA runtime reports " + src.describe(pending);
  throw Error(m, file, line);
}

//! The check of one kernel launch: construct it directly before the `<<<...>>>` launch and
//! call after() directly behind it (DR2NET_CUDA_LAUNCH does both).
template <class Source>
class LaunchCheck {
 public:
  //! Takes (and so clears, unless sticky) what is pending before the launch.
  LaunchCheck(Source src, const char* kernel, const char* file, int line)
      : src_(src), kernel_(kernel), file_(file), line_(line) {
    before_ = src_.take();
    sticky_before_ = before_ != Source::success && src_.peek() != Source::success;
  }

  //! What was pending before the launch (success when nothing was); not this launch's error.
  typename Source::code_type pending_before() const { return before_; }

  //! Throws dr2net::Error "launch of <kernel> failed: ..." when the launch failed; an error
  //! that was pending before the launch is not blamed on it: a non-sticky one was cleared by
  //! the constructor (and is named only if the launch fails too), a sticky one is reported as
  //! already pending. Clears what it reports.
  void after() const {
    const typename Source::code_type e = src_.take();
    if (e == Source::success) return;
    std::string m = std::string("launch of ") + kernel_ + " failed: " + src_.describe(e);
    if (sticky_before_)
      m += " (already pending before this launch, so not this kernel's: earlier device work failed and the "
           "device context is unusable)";
    else if (before_ != Source::success)
      m += "; an earlier, unrelated failure (" + src_.describe(before_) + ") was pending and was cleared first";
    throw Error(m, file_, line_);
  }

 private:
  Source src_;
  const char* kernel_;
  const char* file_;
  int line_;
  typename Source::code_type before_{};
  bool sticky_before_ = false;
};

//! The check of a launch made without a LaunchCheck in front of it: whatever is pending is
//! the launch's failure or, when the code before it left an error unchecked, that error
//! (dr2net's own checks leave nothing pending). Clears what it reports.
template <class Source>
void check_launch_after(const Source& src, const char* kernel, const char* file, int line) {
  const typename Source::code_type e = src.take();
  if (e == Source::success) return;
  const bool sticky = src.peek() != Source::success;
  throw Error(std::string("launch of ") + kernel + " failed: " + src.describe(e) +
                  (sticky ? " (a sticky error: earlier device work may have failed; the device context is unusable)"
                          : ""),
              file, line);
}

}  // namespace dr2net::cuda_detail
