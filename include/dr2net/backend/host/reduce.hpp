#pragma once
//! \file
//! The host backend's reductions: the reconstruction monitor's comparison
//! (max_abs_diff_and_max), error-bounded mode's fused comparison and snapshot restore
//! (compare_and_restore), the non-finite count (count_not_finite) and exact mode's stream
//! checksum (stream_checksum). Device twins: backend/cuda/reduce.cuh.
//!
//! Every reduction cuts [0, n) into chunks of kHostReduceChunk elements (boundaries fixed by
//! n alone), reduces each chunk to a partial on the context's threads (parallel_for) and
//! combines the partials in chunk order on the calling thread. Within a chunk the loop keeps
//! kHostReduceLanes independent accumulators, element i going to lane i mod kHostReduceLanes
//! of its chunk, so the compiler can keep them in vector registers; the bodies are branchless
//! (comparisons become selects and masks). The results are exact functions of the data (a
//! maximum of absolute values, a count, a sum modulo 2^64), so they are bit-identical at any
//! thread count, on any partition, and between this backend and the device's.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/backend/host/parallel.hpp"
#include "dr2net/core/fixed_point.hpp"

namespace dr2net {

//! Elements per chunk of the host reductions: [0, n) is cut at multiples of this whatever the
//! thread count, and the chunks' partial results are combined in chunk order.
inline constexpr std::size_t kHostReduceChunk = 8192;
//! Independent accumulators per chunk of a host reduction (element i of a chunk goes to lane
//! i mod kHostReduceLanes); kHostReduceChunk is a multiple of it.
inline constexpr std::size_t kHostReduceLanes = 16;
static_assert(kHostReduceChunk % kHostReduceLanes == 0, "a reduction chunk holds whole lane groups");

namespace detail {

//! The type a host comparison is done in: the element type itself when it is a floating type,
//! double otherwise (fixed-point streams).
template <class T>
using reduce_compare_t = std::conditional_t<std::is_floating_point_v<T>, T, double>;

//! A running (max |a - b|, max |b|) in U: diff is NaN once any difference was NaN.
template <class U>
struct HostDiffAndMax {
  U diff;  //!< max |a_i - b_i| so far, NaN when one was NaN
  U mag;   //!< max |b_i| so far (NaN values of b leave it unchanged)
};

//! max(acc, v) that keeps a NaN: the result is v when v > acc or v is NaN, else acc (so a NaN
//! acc stays). Written as one select, so a loop of it vectorises.
template <class U>
inline U nan_keeping_max(U acc, U v) {
  return ((v > acc) | (v != v)) ? v : acc;
}

//! max(acc, v) that ignores a NaN v (the magnitude of a NaN does not count).
template <class U>
inline U plain_max(U acc, U v) {
  return v > acc ? v : acc;
}

//! Element i of a stream in the comparison type U.
template <class U, class T>
inline U as_compare(const T& v) {
  return static_cast<U>(v);
}

//! The (diff, mag) partial of elements [begin, end) of a and b, in U: lane k accumulates the
//! elements begin + k, begin + k + L, ... (L = kHostReduceLanes), tail included, and the lanes
//! are combined in lane order. With Restore, b[i] is copied over a[i] after it is read (one
//! pass that compares and restores; a and b must not overlap).
template <class U, bool Restore, class T>
HostDiffAndMax<U> diff_and_max_range(std::conditional_t<Restore, T*, const T*> __restrict a,
                                     const T* __restrict b, std::size_t begin, std::size_t end) {
  constexpr std::size_t L = kHostReduceLanes;
  U diff[L], mag[L];
  for (std::size_t k = 0; k < L; ++k) diff[k] = mag[k] = U(0);
  const auto step = [&](std::size_t k, std::size_t i) {
    const U bi = as_compare<U>(b[i]);
    const U d = std::abs(as_compare<U>(a[i]) - bi);  // NaN when either is NaN (or both infinite alike)
    diff[k] = nan_keeping_max(diff[k], d);
    mag[k] = plain_max(mag[k], std::abs(bi));
    if constexpr (Restore) a[i] = b[i];
  };
  std::size_t i = begin;
  for (; end - i >= L; i += L)
    for (std::size_t k = 0; k < L; ++k) step(k, i + k);
  for (std::size_t k = 0; i + k < end; ++k) step(k, i + k);
  HostDiffAndMax<U> r{diff[0], mag[0]};
  for (std::size_t k = 1; k < L; ++k) r = {nan_keeping_max(r.diff, diff[k]), plain_max(r.mag, mag[k])};
  return r;
}

//! Reduces [0, n) chunk by chunk: partial(begin, end) for every chunk [c K, min(n, (c+1) K))
//! (K = kHostReduceChunk) on the context's threads, then init combined with each partial in
//! chunk order. Chunks are taken in groups of at most kGroup, whose partials live on the
//! stack; a group's chunks run in parallel, groups one after another.
template <class P, class Partial, class Combine>
P reduce_fixed_chunks(HostContext& ctx, std::size_t n, P init, const Partial& partial, const Combine& combine) {
  constexpr std::size_t kGroup = 64;
  constexpr std::size_t kGroupElements = kGroup * kHostReduceChunk;
  P total = init;
  for (std::size_t g = 0; g < n; g += kGroupElements) {
    const std::size_t len = n - g < kGroupElements ? n - g : kGroupElements;
    P parts[kGroup];
    parallel_for(ctx.threads(), len, kHostReduceChunk, [&](std::size_t begin, std::size_t end) {
      parts[begin / kHostReduceChunk] = partial(g + begin, g + end);
    });
    const std::size_t chunks = chunk_count(len, kHostReduceChunk);
    for (std::size_t c = 0; c < chunks; ++c) total = combine(total, parts[c]);
  }
  return total;
}

//! (max |a - b|, max |b|) over [0, n) in U, restoring b over a with Restore.
template <class U, bool Restore, class T>
HostDiffAndMax<U> diff_and_max(HostContext& ctx, std::conditional_t<Restore, T*, const T*> a, const T* b,
                               std::size_t n) {
  return reduce_fixed_chunks(
      ctx, n, HostDiffAndMax<U>{U(0), U(0)},
      [a, b](std::size_t begin, std::size_t end) { return diff_and_max_range<U, Restore, T>(a, b, begin, end); },
      [](const HostDiffAndMax<U>& l, const HostDiffAndMax<U>& r) {
        return HostDiffAndMax<U>{nan_keeping_max(l.diff, r.diff), plain_max(l.mag, r.mag)};
      });
}

//! Number of NaN or infinite elements of p[begin, end), lane-wise as diff_and_max_range. The
//! lanes count in an unsigned integer as wide as T, so the mask arithmetic vectorises.
template <class T>
std::size_t count_not_finite_range(const T* __restrict p, std::size_t begin, std::size_t end) {
  using Count = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  constexpr std::size_t L = kHostReduceLanes;
  Count bad[L] = {};
  std::size_t i = begin;
  for (; end - i >= L; i += L)
    for (std::size_t k = 0; k < L; ++k) bad[k] += static_cast<Count>(!(p[i + k] - p[i + k] == T(0)));
  for (std::size_t k = 0; i + k < end; ++k) bad[k] += static_cast<Count>(!(p[i + k] - p[i + k] == T(0)));
  std::size_t total = 0;
  for (std::size_t k = 0; k < L; ++k) total += static_cast<std::size_t>(bad[k]);
  return total;
}

}  // namespace detail

//! (max_i |a_i - b_i|, max_i |b_i|) over a[0, n) and b[0, n), computed in double: the
//! monitor's comparison of a reconstructed stream `a` with a reference `b` (the stack input
//! or its kept sample). A NaN in either array makes the first value NaN (never hidden by the
//! max); NaNs of b do not enter the second. n == 0 gives (0, 0). Branchless, on the context's
//! threads with a fixed partition (see the file comment), bit-identical at any thread count
//! and to the device twin (backend/cuda/reduce.cuh).
template <class T>
std::pair<double, double> max_abs_diff_and_max(HostContext& ctx, const T* a, const T* b, std::size_t n) {
  const auto r = detail::diff_and_max<double, false, T>(ctx, a, b, n);
  return {r.diff, r.mag};
}

//! Error-bounded mode's snapshot restore, fused with the comparison that precedes it: one pass
//! over `stream`[0, n) and `snapshot`[0, n) that returns (max_i |stream_i - snapshot_i|,
//! max_i |snapshot_i|) and leaves stream_i = snapshot_i. The comparison is done in the stream
//! type when it is a floating type (float streams compare in float: |a - b| is rounded once,
//! to the stream's precision), in double for fixed-point streams, and widened exactly to
//! double for the result. A NaN difference makes the first value NaN; a NaN of the snapshot
//! does not enter the second. The buffers must not overlap. n == 0 gives (0, 0) and writes
//! nothing. Branchless, on the context's threads with a fixed partition; bit-identical at any
//! thread count and to the device twin.
template <class T>
std::pair<double, double> compare_and_restore(HostContext& ctx, T* stream, const T* snapshot, std::size_t n) {
  using U = detail::reduce_compare_t<T>;
  const auto r = detail::diff_and_max<U, true, T>(ctx, stream, snapshot, n);
  return {static_cast<double>(r.diff), static_cast<double>(r.mag)};
}

//! Number of NaN or infinite elements in p[0, n): the non-finite checks of parameter gradients
//! and the diagnosis that names a bad tensor. Fixed-point elements always count 0 (they have
//! no non-finite values). Branchless for floating types; on the context's threads with a
//! fixed partition, so the count does not depend on the thread count.
template <class T>
std::size_t count_not_finite(HostContext& ctx, const T* p, std::size_t n) {
  return detail::reduce_fixed_chunks(
      ctx, n, std::size_t{0},
      [p](std::size_t begin, std::size_t end) -> std::size_t {
        if constexpr (std::is_floating_point_v<T>) {
          return detail::count_not_finite_range(p, begin, end);
        } else {
          std::size_t bad = 0;
          for (std::size_t i = begin; i < end; ++i) bad += fixed::not_finite(static_cast<double>(p[i])) ? 1 : 0;
          return bad;
        }
      },
      [](std::size_t l, std::size_t r) { return l + r; });
}

//! The 64-bit checksum of a fixed-point stream: sum of checksum_term(i, raw_i) modulo 2^64
//! (order-independent, so every backend's reduction, and every thread count, gives the same
//! value). On the context's threads with a fixed partition.
template <int B>
std::uint64_t stream_checksum(HostContext& ctx, const FixedPoint<B>* p, std::size_t n) {
  return detail::reduce_fixed_chunks(
      ctx, n, std::uint64_t{0},
      [p](std::size_t begin, std::size_t end) {
        std::uint64_t sum = 0;
        for (std::size_t i = begin; i < end; ++i) sum += fixed::checksum_term(i, p[i].raw);
        return sum;
      },
      [](std::uint64_t l, std::uint64_t r) { return l + r; });
}

}  // namespace dr2net
