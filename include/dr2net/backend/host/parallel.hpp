#pragma once
//! \file
//! The host backend's one parallel loop, on the OpenMP thread pool: work split into fixed
//! chunks whose boundaries depend on the problem alone, never on the number of threads.
//!
//! Every parallel host kernel (for_each_index, the row kernels, the GEMM blocks, the batched
//! GEMMs) goes through parallel_for. Because a chunk is the same whichever thread runs it and
//! however many threads there are, a kernel whose chunks are independent, or whose per-chunk
//! partial results are combined afterwards in chunk order, gives bit-identical results at any
//! thread count.
//!
//! OpenMP is optional: a translation unit compiled without it (no `_OPENMP`) runs every chunk
//! in order on the calling thread. Compile every translation unit of a program alike.

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>

#include "dr2net/core/error.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace dr2net {

//! True when this translation unit was compiled with OpenMP: only then do host kernels run on
//! more than one thread.
inline constexpr bool host_openmp_enabled() noexcept {
#if defined(_OPENMP)
  return true;
#else
  return false;
#endif
}

//! Most threads a host context accepts (HostContextOptions::threads or the environment).
inline constexpr int kMaxHostThreads = 4096;

namespace detail {

//! A thread count from environment variable `name`: 0 when unset or empty; throws when it is
//! not a whole number in [1, kMaxHostThreads]. OMP_NUM_THREADS may be a comma-separated list
//! (one count per nesting level): its first entry counts.
inline int thread_count_from_env(const char* name) {
  const char* raw = std::getenv(name);
  if (raw == nullptr) return 0;
  std::string s(raw);
  if (const auto comma = s.find(','); comma != std::string::npos) s.resize(comma);
  const auto first = s.find_first_not_of(" \t"), last = s.find_last_not_of(" \t");
  if (first == std::string::npos) return 0;
  s = s.substr(first, last - first + 1);
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(s.c_str(), &end, 10);
  DR2NET_CHECK(errno == 0 && end != s.c_str() && *end == '\0' && v >= 1 && v <= kMaxHostThreads, "environment variable ",
               name, " = \"", raw, "\" is not a thread count (a whole number from 1 to ", kMaxHostThreads, ")");
  return static_cast<int>(v);
}

//! Processors available to this process: OpenMP's count (which follows the affinity mask)
//! when compiled with it, else std::thread::hardware_concurrency(), at least 1.
inline int available_processors() {
#if defined(_OPENMP)
  const int n = omp_get_num_procs();
#else
  const int n = static_cast<int>(std::thread::hardware_concurrency());
#endif
  return n < 1 ? 1 : (n > kMaxHostThreads ? kMaxHostThreads : n);
}

}  // namespace detail

//! The number of threads host kernels use for a requested count: `requested` itself when
//! positive; for 0 the environment's DR2NET_NUM_THREADS, else OMP_NUM_THREADS (its first
//! entry), else the processors available. Without OpenMP the answer is 1 whatever was asked.
//! Throws dr2net::Error for a negative or too large request and for an environment value that
//! is not a whole number from 1 to kMaxHostThreads, naming the value.
inline int resolve_host_threads(int requested) {
  DR2NET_CHECK(requested >= 0 && requested <= kMaxHostThreads, "host thread count ", requested,
               " is out of range: 0 (from the environment) or 1 to ", kMaxHostThreads);
  int n = requested;
  if (n == 0) n = detail::thread_count_from_env("DR2NET_NUM_THREADS");
  if (n == 0) n = detail::thread_count_from_env("OMP_NUM_THREADS");
  if (n == 0) n = detail::available_processors();
  return host_openmp_enabled() ? n : 1;
}

//! True while the calling thread is inside an active OpenMP parallel region (never without
//! OpenMP). parallel_for then runs its chunks on the calling thread: no nested pools.
inline bool in_host_parallel_region() noexcept {
#if defined(_OPENMP)
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

//! Number of chunks of `chunk` items that cover n items: ceil(n / chunk) (chunk >= 1).
inline constexpr std::size_t chunk_count(std::size_t n, std::size_t chunk) noexcept {
  return n == 0 ? 0 : (n - 1) / chunk + 1;
}

//! Runs body(begin, end) once for every chunk [c * chunk, min(n, (c + 1) * chunk)) of [0, n),
//! on up to `threads` threads of the OpenMP pool; returns when all chunks are done.
//!
//! The chunks are fixed by n and chunk alone; which thread runs which chunk, and in what
//! order, is not specified, so chunks must not write to the same memory. With one chunk, one
//! thread, inside an active parallel region, or without OpenMP, the chunks run in order on
//! the calling thread. When bodies throw, the exception of the lowest chunk that threw is
//! rethrown after the others have stopped (chunks after it may be skipped), so the error
//! reported does not depend on the thread count either. Throws dr2net::Error when chunk is 0.
template <class Body>
void parallel_for(int threads, std::size_t n, std::size_t chunk, const Body& body) {
  DR2NET_CHECK(chunk >= 1, "parallel_for over ", n, " items: the chunk size must be at least 1");
  const std::size_t chunks = chunk_count(n, chunk);
  const auto range = [&](std::size_t c) {
    const std::size_t begin = c * chunk;
    body(begin, n - begin < chunk ? n : begin + chunk);
  };
#if defined(_OPENMP)
  if (threads > 1 && chunks > 1 && !in_host_parallel_region()) {
    const int team = chunks < static_cast<std::size_t>(threads) ? static_cast<int>(chunks) : threads;
    std::atomic<std::size_t> failed{chunks};  // lowest chunk that threw so far (chunks: none)
    std::exception_ptr error;
    const auto count = static_cast<std::int64_t>(chunks);
#pragma omp parallel for num_threads(team) schedule(dynamic, 1)
    for (std::int64_t ci = 0; ci < count; ++ci) {
      const auto c = static_cast<std::size_t>(ci);
      if (c > failed.load(std::memory_order_relaxed)) continue;
      try {
        range(c);
      } catch (...) {
#pragma omp critical(dr2net_parallel_for_error)
        {
          if (c < failed.load(std::memory_order_relaxed)) {
            failed.store(c, std::memory_order_relaxed);
            error = std::current_exception();
          }
        }
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#else
  (void)threads;
#endif
  for (std::size_t c = 0; c < chunks; ++c) range(c);
}

}  // namespace dr2net
