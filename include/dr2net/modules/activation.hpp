#pragma once
//! \file
//! Elementwise functors of the residual functions, run by the backend's for_each_index (a host
//! loop, or a CUDA kernel: the same DR2NET_HD code): the erf-GELU fused with the hidden dropout
//! mask, its derivative with the same mask, and a drop mask applied on its own. Arithmetic is in
//! accumulate_t<T> (T itself on the host; fp32 for bf16/fp16), so masks are bit-identical on
//! both backends. Host and device fp32 results differ within the ulp bounds of the two math
//! libraries' erff/expf (glibc or SLEEF on the host, CUDA's libdevice on the device), not
//! only by contraction.
//!
//!   GELU forward:   a_i = gelu(z_i) * m_i              m_i: DropScale factor (1 when inactive)
//!   GELU backward:  g_i = g_i * m_i * gelu'(z_i)
//!   drop:           dst_i = src_i * m_i

//!
//! On the host, for_each_index runs a functor's `run_range(begin, end)` where it has one: the
//! GELU functors evaluate their float elements there with SLEEF's vector erf/exp
//! (backend/host/vector_math.hpp, where DR2NET_HOST_VECTOR_ERF is 1) and every functor takes
//! its mask factors four elements per Philox evaluation (DropScale::factors). Element i's value
//! is the same whatever range it is run in, a range's partial last vector included; where
//! DR2NET_HOST_VECTOR_ERF is 0 it is also exactly operator()(i)'s. run_range is a host
//! function (host code in a .cu file may call it); a CUDA device pass sees only its
//! declaration, never SLEEF.

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "dr2net/backend/host/gelu.hpp"
#include "dr2net/backend/host/vector_math.hpp"
#include "dr2net/core/compute_type.hpp"
#include "dr2net/core/config.hpp"
#include "dr2net/modules/drop.hpp"

namespace dr2net {

#if !defined(__CUDA_ARCH__)
namespace detail {

// Elements the host range loops take at once: one vector where vector math is compiled in,
// else 8 (two Philox blocks of mask factors).
#if DR2NET_HOST_VECTOR_MATH
inline constexpr std::size_t kHostRangeGroup = simd::kLanes;
#else
inline constexpr std::size_t kHostRangeGroup = 8;
#endif

// body(i, count, f) for consecutive groups [i, i + count) of [begin, end), count <=
// kHostRangeGroup, with f[k] = mask(i + k) (all 1 when the mask is inactive). f holds
// kHostRangeGroup factors; those past `count` belong to indices beyond the group and are unused.
template <class A, class Body>
void for_each_masked_group(std::size_t begin, std::size_t end, const DropScale<A>& mask, Body&& body) {
  constexpr int kGroup = static_cast<int>(kHostRangeGroup);
  alignas(64) A f[kGroup];
  for (int k = 0; k < kGroup; ++k) f[k] = A(1);
  const bool active = mask.active();
  for (std::size_t i = begin; i < end; i += kHostRangeGroup) {
    const std::size_t count = end - i < kHostRangeGroup ? end - i : kHostRangeGroup;
    if (active) mask.template factors<kGroup>(static_cast<std::uint64_t>(i), f);
    body(i, count, f, active);
  }
}

}  // namespace detail
#endif  // !__CUDA_ARCH__

//! a[i] = gelu(z[i]) * mask(i): the MLP's activation with its hidden dropout in one pass.
template <class T>
struct GeluDropForward {
  T* a;                                //!< output (fc2's input), one element per index
  const T* z;                          //!< fc1's output, the pre-activation
  DropScale<accumulate_t<T>> mask;     //!< the hidden dropout (inactive: factor 1)
  //! Writes a[i] from z[i].
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    a[i] = narrow<T>(gelu_erf(widen(z[i])) * mask(static_cast<std::uint64_t>(i)));
  }
  //! Host only: a[i] for i in [begin, end), the same value for element i whatever range it is
  //! run in. Float elements go through SLEEF's vector erf where DR2NET_HOST_VECTOR_ERF is 1;
  //! otherwise each value is operator()(i)'s.
  void run_range(std::size_t begin, std::size_t end) const {
#if !defined(__CUDA_ARCH__)  // a host function: a device pass parses it, never compiles it
    using A = accumulate_t<T>;
    const auto group = [&](std::size_t i, std::size_t count, const A* f, [[maybe_unused]] bool active) {
#if DR2NET_HOST_VECTOR_ERF
      if constexpr (std::is_same_v<T, float>) {
        using namespace detail::simd;
        vfloat v = detail::simd::gelu_erf(load_n(z + i, count, 0.0f));
        if (active) v = mul(v, load(f));
        store_n(a + i, v, count);
        return;
      }
#endif
      for (std::size_t k = 0; k < count; ++k) a[i + k] = narrow<T>(gelu_erf(widen(z[i + k])) * f[k]);
    };
    detail::for_each_masked_group(begin, end, mask, group);
#else
    (void)begin, (void)end;
#endif
  }
};

//! g[i] = g[i] * mask(i) * gelu'(z[i]): dL/dz from dL/da, in place.
template <class T>
struct GeluDropBackward {
  T* g;                                //!< in: dL/da; out: dL/dz
  const T* z;                          //!< the pre-activation the forward saw
  DropScale<accumulate_t<T>> mask;     //!< the forward's hidden dropout
  //! Updates g[i].
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    g[i] = narrow<T>(widen(g[i]) * mask(static_cast<std::uint64_t>(i)) * gelu_erf_derivative(widen(z[i])));
  }
  //! Host only: g[i] for i in [begin, end), the same value for element i whatever range it is
  //! run in. Float elements go through SLEEF's vector erf and exp where
  //! DR2NET_HOST_VECTOR_ERF is 1; otherwise each value is operator()(i)'s.
  void run_range(std::size_t begin, std::size_t end) const {
#if !defined(__CUDA_ARCH__)  // a host function: a device pass parses it, never compiles it
    using A = accumulate_t<T>;
    const auto group = [&](std::size_t i, std::size_t count, const A* f, [[maybe_unused]] bool active) {
#if DR2NET_HOST_VECTOR_ERF
      if constexpr (std::is_same_v<T, float>) {
        using namespace detail::simd;
        vfloat gv = load_n(g + i, count, 0.0f);
        if (active) gv = mul(gv, load(f));  // g * m * gelu'(z), in operator()'s order (m == 1 inactive)
        store_n(g + i, mul(gv, detail::simd::gelu_erf_derivative(load_n(z + i, count, 0.0f))), count);
        return;
      }
#endif
      for (std::size_t k = 0; k < count; ++k)
        g[i + k] = narrow<T>(widen(g[i + k]) * f[k] * gelu_erf_derivative(widen(z[i + k])));
    };
    detail::for_each_masked_group(begin, end, mask, group);
#else
    (void)begin, (void)end;
#endif
  }
};

//! dst[i] = src[i] * mask(i) (dst may be src): an output's drop-path and dropout.
template <class T>
struct DropApply {
  T* dst;                              //!< output elements
  const T* src;                        //!< input elements, indexed like dst; may equal dst
  DropScale<accumulate_t<T>> mask;     //!< element i of dst and src is element i of the masked tensor
  //! Masks and scales element `i`.
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    dst[i] = narrow<T>(widen(src[i]) * mask(static_cast<std::uint64_t>(i)));
  }
  //! Host only: dst[i] for i in [begin, end), each exactly operator()(i)'s value, with the
  //! mask's factors taken a group at a time.
  void run_range(std::size_t begin, std::size_t end) const {
#if !defined(__CUDA_ARCH__)  // a host function: a device pass parses it, never compiles it
    using A = accumulate_t<T>;
    detail::for_each_masked_group(begin, end, mask, [&](std::size_t i, std::size_t count, const A* f, bool) {
      for (std::size_t k = 0; k < count; ++k) dst[i + k] = narrow<T>(widen(src[i + k]) * f[k]);
    });
#else
    (void)begin, (void)end;
#endif
  }
};

//! Moves attention operands between the token-row layout [B, N, G, H, hd] (what a Linear reads
//! and writes: row b N + n, column (g H + h) hd + e) and the head-major layout
//! [G, B, H, N, hd] (contiguous N x hd blocks, so one strided-batched GEMM covers all B x H
//! heads with stride N hd). G = 3 for q, k, v; G = 1 for the attention output. Element i of
//! `dst` is written (one thread per destination element).
template <class T>
struct HeadLayout {
  T* dst;               //!< destination, B N G H hd elements
  const T* src;         //!< source in the other layout (never dst)
  std::int64_t batch;     //!< B
  std::int64_t tokens;    //!< N
  std::int64_t groups;    //!< G: 3 for q, k, v; 1 for the attention output
  std::int64_t heads;     //!< H
  std::int64_t head_dim;  //!< hd
  bool to_heads;        //!< true: rows -> heads (dst head-major); false: heads -> rows
  //! Copies the element that lands at dst[i].
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    const auto k = static_cast<std::int64_t>(i);
    if (to_heads) {  // dst [G, B, H, N, hd]
      const std::int64_t e = k % head_dim, n = (k / head_dim) % tokens, h = (k / (head_dim * tokens)) % heads;
      const std::int64_t b = (k / (head_dim * tokens * heads)) % batch, g = k / (head_dim * tokens * heads * batch);
      dst[i] = src[((b * tokens + n) * groups + g) * heads * head_dim + h * head_dim + e];
    } else {  // dst [B, N, G, H, hd]
      const std::int64_t e = k % head_dim, h = (k / head_dim) % heads, g = (k / (head_dim * heads)) % groups;
      const std::int64_t n = (k / (head_dim * heads * groups)) % tokens, b = k / (head_dim * heads * groups * tokens);
      dst[i] = src[(((g * batch + b) * heads + h) * tokens + n) * head_dim + e];
    }
  }
  //! Host only: dst[i] for i in [begin, end), exactly operator()(i)'s values, moving whole
  //! head_dim-wide runs with the index decomposed once per range (not five divisions per element).
  void run_range(std::size_t begin, std::size_t end) const {
#if !defined(__CUDA_ARCH__)  // a host function: a device pass parses it, never compiles it
    if (begin >= end) return;
    const auto k0 = static_cast<std::int64_t>(begin);
    std::int64_t e = k0 % head_dim;
    std::int64_t i = k0;
    const auto last = static_cast<std::int64_t>(end);
    if (to_heads) {  // dst [G, B, H, N, hd] in order: e, then n, h, b, g
      std::int64_t n = (k0 / head_dim) % tokens, h = (k0 / (head_dim * tokens)) % heads;
      std::int64_t b = (k0 / (head_dim * tokens * heads)) % batch, g = k0 / (head_dim * tokens * heads * batch);
      while (i < last) {
        const std::int64_t run = head_dim - e < last - i ? head_dim - e : last - i;
        const T* from = src + ((b * tokens + n) * groups + g) * heads * head_dim + h * head_dim + e;
        for (std::int64_t j = 0; j < run; ++j) dst[i + j] = from[j];
        i += run;
        e = 0;
        if (++n == tokens) { n = 0; if (++h == heads) { h = 0; if (++b == batch) { b = 0; ++g; } } }
      }
    } else {  // dst [B, N, G, H, hd] in order: e, then h, g, n, b
      std::int64_t h = (k0 / head_dim) % heads, g = (k0 / (head_dim * heads)) % groups;
      std::int64_t n = (k0 / (head_dim * heads * groups)) % tokens, b = k0 / (head_dim * heads * groups * tokens);
      while (i < last) {
        const std::int64_t run = head_dim - e < last - i ? head_dim - e : last - i;
        const T* from = src + (((g * batch + b) * heads + h) * tokens + n) * head_dim + e;
        for (std::int64_t j = 0; j < run; ++j) dst[i + j] = from[j];
        i += run;
        e = 0;
        if (++h == heads) { h = 0; if (++g == groups) { g = 0; if (++n == tokens) { n = 0; ++b; } } }
      }
    }
#else
    (void)begin;
    (void)end;
#endif
  }
};

}  // namespace dr2net
