#pragma once
//! \file
//! The device reductions, host twins in backend/host/reduce.hpp:
//! max_abs_diff_and_max(CudaContext&, a, b, n), the reconstruction monitor's comparison
//! ((max_i |a_i - b_i|, max_i |b_i|) in double, NaN reported rather than hidden by max);
//! compare_and_restore(CudaContext&, stream, snapshot, n), error-bounded mode's comparison
//! fused with the snapshot restore (the same pair, in the stream type, and stream <- snapshot);
//! count_not_finite(CudaContext&, p, n); stream_checksum(CudaContext&, fixed-point p, n), the
//! exact mode's per-module checksum (a sum modulo 2^64, so bit-identical to the host's).
//!
//! Layers: device-wide function -> two kernels (per-block partials, then one block over the
//! partials) -> cub::BlockReduce (a NaN-propagating max, or a wrapping 64-bit sum).

#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/core/fixed_point.hpp"

namespace dr2net {
namespace cuda_detail {

//! Threads per block of the reduction kernels; the final pass runs one block of this size.
inline constexpr int kReduceThreads = 256;

//! A running (max |a - b|, max |b|).
struct DiffAndMax {
  double diff;  //!< max |a_i - b_i| so far; NaN once any difference was NaN
  double mag;   //!< max |b_i| so far (NaN elements of b leave it unchanged)
};

//! max that keeps a NaN once one was seen: m(NaN, x) = m(x, NaN) = NaN.
__device__ __forceinline__ double nan_max(double a, double b) {
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

//! A stream element in double (bf16/fp16 widen through float; fixed point converts directly,
//! as the host twin does).
template <class T>
__device__ __forceinline__ double as_double(T v) {
  if constexpr (std::is_floating_point_v<T> || is_fixed_point_v<T>) return static_cast<double>(v);
  else return static_cast<double>(static_cast<float>(v));
}

//! cub::BlockReduce operator combining two DiffAndMax partials: nan_max of the differences,
//! plain max of the magnitudes. Associative and commutative, so any reduction tree agrees.
struct DiffAndMaxOp {
  //! The combined partial of `l` and `r`.
  __device__ __forceinline__ DiffAndMax operator()(const DiffAndMax& l, const DiffAndMax& r) const {
    return {nan_max(l.diff, r.diff), l.mag > r.mag ? l.mag : r.mag};
  }
};

//! One partial per block over a grid-stride slice of [0, n).
template <class T>
__global__ void __launch_bounds__(kReduceThreads)
    diff_and_max_partials(const T* a, const T* b, std::size_t n, DiffAndMax* partials) {
  using BlockReduce = cub::BlockReduce<DiffAndMax, kReduceThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  DiffAndMax acc{0.0, 0.0};
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const double bi = as_double(b[i]);
    const double d = as_double(a[i]) - bi;  // NaN when either is NaN
    acc.diff = nan_max(acc.diff, d < 0 ? -d : d);
    const double m = bi < 0 ? -bi : bi;
    acc.mag = m > acc.mag ? m : acc.mag;  // as the host twin: a NaN in b does not set the magnitude
  }
  const DiffAndMax r = BlockReduce(temp).Reduce(acc, DiffAndMaxOp{});
  if (threadIdx.x == 0) partials[blockIdx.x] = r;
}

//! The type compare_and_restore compares in, as its host twin: a floating stream type itself,
//! double for fixed point (and float for 16-bit floating types).
template <class T>
using compare_type_t =
    std::conditional_t<std::is_floating_point_v<T>, T, std::conditional_t<is_fixed_point_v<T>, double, float>>;

//! A stream element in the comparison type U (16-bit floating types through float).
template <class U, class T>
__device__ __forceinline__ U as_compare(T v) {
  if constexpr (std::is_floating_point_v<T> || is_fixed_point_v<T>) return static_cast<U>(v);
  else return static_cast<U>(static_cast<float>(v));
}

//! max(acc, v) keeping a NaN, as one select: v when v > acc or v is NaN, else acc.
template <class U>
__device__ __forceinline__ U nan_keeping_max(U acc, U v) {
  return ((v > acc) | (v != v)) ? v : acc;
}

//! One (max |a - b|, max |b|) partial per block over a grid-stride slice of [0, n), computed
//! in compare_type_t<T> and widened exactly to double; every a[i] is then overwritten by b[i]
//! (a and b must not overlap).
template <class T>
__global__ void __launch_bounds__(kReduceThreads)
    compare_restore_partials(T* a, const T* b, std::size_t n, DiffAndMax* partials) {
  using U = compare_type_t<T>;
  using BlockReduce = cub::BlockReduce<DiffAndMax, kReduceThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  U diff = U(0), mag = U(0);
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const T bv = b[i];
    const U bi = as_compare<U>(bv);
    diff = nan_keeping_max(diff, fabs(as_compare<U>(a[i]) - bi));  // NaN when either is NaN
    const U m = fabs(bi);
    mag = m > mag ? m : mag;  // a NaN of b does not set the magnitude
    a[i] = bv;
  }
  const DiffAndMax r =
      BlockReduce(temp).Reduce(DiffAndMax{static_cast<double>(diff), static_cast<double>(mag)}, DiffAndMaxOp{});
  if (threadIdx.x == 0) partials[blockIdx.x] = r;
}

//! partials[0] <- reduction of partials[0, count), one block of Threads threads. (A template,
//! as every kernel in this header: a plain __global__ function defined in a header would be
//! defined twice in a program with two CUDA translation units including it.)
template <int Threads>
__global__ void __launch_bounds__(Threads) diff_and_max_final(DiffAndMax* partials, int count) {
  using BlockReduce = cub::BlockReduce<DiffAndMax, Threads>;
  __shared__ typename BlockReduce::TempStorage temp;
  DiffAndMax acc{0.0, 0.0};
  for (int i = static_cast<int>(threadIdx.x); i < count; i += Threads) acc = DiffAndMaxOp{}(acc, partials[i]);
  const DiffAndMax r = BlockReduce(temp).Reduce(acc, DiffAndMaxOp{});
  if (threadIdx.x == 0) partials[0] = r;
}

//! Per-block partial sums of a 64-bit term over a grid-stride slice of [0, n); the sum is taken
//! modulo 2^64, so the result does not depend on how the work is split.
template <class Term>
__global__ void __launch_bounds__(kReduceThreads) sum_u64_partials(Term term, std::size_t n, unsigned long long* partials) {
  using BlockReduce = cub::BlockReduce<unsigned long long, kReduceThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  unsigned long long acc = 0;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    acc += term(i);
  const unsigned long long r = BlockReduce(temp).Sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = r;
}

//! partials[0] <- sum of partials[0, count) modulo 2^64, one block of Threads threads.
template <int Threads>
__global__ void __launch_bounds__(Threads) sum_u64_final(unsigned long long* partials, int count) {
  using BlockReduce = cub::BlockReduce<unsigned long long, Threads>;
  __shared__ typename BlockReduce::TempStorage temp;
  unsigned long long acc = 0;
  for (int i = static_cast<int>(threadIdx.x); i < count; i += Threads) acc += partials[i];
  const unsigned long long r = BlockReduce(temp).Sum(acc);
  if (threadIdx.x == 0) partials[0] = r;
}

//! 1 for a NaN or infinite element, else 0.
template <class T>
struct NotFiniteTerm {
  const T* p;  //!< device array tested (stream or compute element type)
  //! 1 when p[i], widened to double, is NaN or +-infinity; else 0.
  __device__ __forceinline__ unsigned long long operator()(std::size_t i) const {
    return fixed::not_finite(as_double(p[i])) ? 1ull : 0ull;
  }
};

//! The stream checksum's term (core/fixed_point.hpp).
template <int B>
struct ChecksumTerm {
  const FixedPoint<B>* p;  //!< device array of the fixed-point stream being checksummed
  //! fixed::checksum_term(i, p[i].raw): a mix of the element's index and raw integer.
  __device__ __forceinline__ unsigned long long operator()(std::size_t i) const {
    return fixed::checksum_term(static_cast<std::uint64_t>(i), p[i].raw);
  }
};

//! Blocks of a two-pass reduction over n > 0 elements: one per kReduceThreads elements, at
//! most four per multiprocessor and 1024 (the final pass reduces the partials in one block).
inline int reduce_blocks(const CudaContext& ctx, std::size_t n) {
  const std::size_t wanted = (n + kReduceThreads - 1) / kReduceThreads;
  return static_cast<int>(std::min<std::size_t>(
      wanted, std::min<std::size_t>(1024, static_cast<std::size_t>(ctx.multiprocessor_count()) * 4)));
}

//! sum_i term(i) modulo 2^64 on the context's stream; waits for the result.
template <class Term>
std::uint64_t sum_u64(CudaContext& ctx, Term term, std::size_t n) {
  if (n == 0) return 0;
  const int blocks = reduce_blocks(ctx, n);
  auto partials = ctx.allocate<unsigned long long>(static_cast<std::size_t>(blocks), MemoryCategory::Other);
  sum_u64_partials<Term><<<blocks, kReduceThreads, 0, ctx.stream()>>>(term, n, partials.data());
  DR2NET_CUDA_CHECK_LAUNCH("dr2net sum_u64_partials");
  sum_u64_final<kReduceThreads><<<1, kReduceThreads, 0, ctx.stream()>>>(partials.data(), blocks);
  DR2NET_CUDA_CHECK_LAUNCH("dr2net sum_u64_final");
  unsigned long long r = 0;
  DR2NET_CUDA_CHECK(cudaMemcpyAsync(&r, partials.data(), sizeof r, cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  return static_cast<std::uint64_t>(r);
}

//! Reduces `blocks` DiffAndMax partials (from diff_and_max_partials or
//! compare_restore_partials) in one block, copies the result back and waits for it.
inline std::pair<double, double> finish_diff_and_max(CudaContext& ctx, DiffAndMax* partials, int blocks) {
  diff_and_max_final<kReduceThreads><<<1, kReduceThreads, 0, ctx.stream()>>>(partials, blocks);
  DR2NET_CUDA_CHECK_LAUNCH("dr2net diff_and_max_final");
  DiffAndMax r{};
  DR2NET_CUDA_CHECK(cudaMemcpyAsync(&r, partials, sizeof r, cudaMemcpyDeviceToHost, ctx.stream()));
  ctx.synchronize();
  return {r.diff, r.mag};
}

}  // namespace cuda_detail

//! Number of NaN or infinite elements among p[0, n), a device array of float, double, bf16,
//! fp16 or fixed point (which always counts 0: it has no non-finite values). Host twin:
//! backend/host/context.hpp. Runs on ctx's stream after the work queued there and waits
//! for the count; allocates a small metered (Other) buffer of per-block partials.
//! n == 0 returns 0 without a launch. Launch and copy failures throw dr2net::Error.
template <class T>
std::size_t count_not_finite(CudaContext& ctx, const T* p, std::size_t n) {
  return static_cast<std::size_t>(cuda_detail::sum_u64(ctx, cuda_detail::NotFiniteTerm<T>{p}, n));
}

//! The 64-bit checksum of p[0, n), a fixed-point stream in device memory with B fractional
//! bits: sum_i fixed::checksum_term(i, raw_i) modulo 2^64, bit-identical to the host's
//! stream_checksum whatever the grid. The exact mode takes it of each module's overwritten
//! stream in the forward and again after reconstructing it in the backward; any difference
//! means the residual function is not deterministic. Waits for the result; errors as
//! count_not_finite.
template <int B>
std::uint64_t stream_checksum(CudaContext& ctx, const FixedPoint<B>* p, std::size_t n) {
  return cuda_detail::sum_u64(ctx, cuda_detail::ChecksumTerm<B>{p}, n);
}

//! (max_i |a_i - b_i|, max_i |b_i|) over device arrays a[0, n) and b[0, n), computed in
//! double: the reconstruction monitor compares a reconstructed stream `a` with a reference
//! copy `b` and divides the first by the second. A NaN in either array makes the first
//! value NaN (not hidden by max); NaNs of b do not enter the second. n == 0 gives (0, 0).
//! Runs on ctx's stream and waits for the result; launch and copy failures throw
//! dr2net::Error.
template <class T>
std::pair<double, double> max_abs_diff_and_max(CudaContext& ctx, const T* a, const T* b, std::size_t n) {
  if (n == 0) return {0.0, 0.0};
  using cuda_detail::DiffAndMax;
  const int blocks = cuda_detail::reduce_blocks(ctx, n);
  auto partials = ctx.allocate<DiffAndMax>(static_cast<std::size_t>(blocks), MemoryCategory::Other);
  cuda_detail::diff_and_max_partials<T>
      <<<blocks, cuda_detail::kReduceThreads, 0, ctx.stream()>>>(a, b, n, partials.data());
  DR2NET_CUDA_CHECK_LAUNCH("dr2net diff_and_max_partials");
  return cuda_detail::finish_diff_and_max(ctx, partials.data(), blocks);
}

//! Error-bounded mode's snapshot restore fused with its comparison, on device arrays
//! stream[0, n) and snapshot[0, n) (no overlap): returns (max_i |stream_i - snapshot_i|,
//! max_i |snapshot_i|) computed in the stream type (double for fixed point), widened exactly
//! to double, and leaves stream_i = snapshot_i. A NaN difference makes the first value NaN;
//! NaNs of the snapshot do not enter the second. Bit-identical to the host twin
//! (backend/host/reduce.hpp) whatever the grid: both are maxima of the same values. n == 0
//! gives (0, 0) without a launch. Runs on ctx's stream and waits for the result; launch and
//! copy failures throw dr2net::Error.
template <class T>
std::pair<double, double> compare_and_restore(CudaContext& ctx, T* stream, const T* snapshot, std::size_t n) {
  if (n == 0) return {0.0, 0.0};
  using cuda_detail::DiffAndMax;
  const int blocks = cuda_detail::reduce_blocks(ctx, n);
  auto partials = ctx.allocate<DiffAndMax>(static_cast<std::size_t>(blocks), MemoryCategory::Other);
  cuda_detail::compare_restore_partials<T>
      <<<blocks, cuda_detail::kReduceThreads, 0, ctx.stream()>>>(stream, snapshot, n, partials.data());
  DR2NET_CUDA_CHECK_LAUNCH("dr2net compare_restore_partials");
  return cuda_detail::finish_diff_and_max(ctx, partials.data(), blocks);
}

}  // namespace dr2net
