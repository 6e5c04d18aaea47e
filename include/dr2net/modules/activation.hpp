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

#include <cstddef>
#include <cstdint>

#include "dr2net/backend/host/gelu.hpp"
#include "dr2net/core/compute_type.hpp"
#include "dr2net/core/config.hpp"
#include "dr2net/modules/drop.hpp"

namespace dr2net {

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
