#pragma once
//! \file
//! Elementwise functors of the device ViT functions, run by for_each_index(CudaContext&, ...):
//! fused erf-GELU with the hidden dropout mask, its derivative with the same mask, and a drop
//! mask applied in the accumulation type. The math is the host's DR2NET_HD code
//! (backend/host/gelu.hpp, modules/drop.hpp) evaluated in fp32 (fp64 for double), so masks
//! are bit-identical to the host's and fp32 results differ from it only by contraction.
//!
//!   GELU forward:   a_i = gelu(z_i) * m_i              m_i: DropScale factor (1 when inactive)
//!   GELU backward:  g_i = g_i * m_i * gelu'(z_i)
//!   drop:           dst_i = src_i * m_i

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cstddef>
#include <cstdint>

#include "dr2net/backend/host/gelu.hpp"
#include "dr2net/core/config.hpp"
#include "dr2net/modules/cuda/types.cuh"
#include "dr2net/modules/drop.hpp"

namespace dr2net::cuda_detail {

template <class T>
struct GeluDropForward {
  T* a;
  const T* z;
  DropScale<acc_t<T>> mask;
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    a[i] = narrow<T>(gelu_erf(widen(z[i])) * mask(static_cast<std::uint64_t>(i)));
  }
};

template <class T>
struct GeluDropBackward {
  T* g;
  const T* z;
  DropScale<acc_t<T>> mask;
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    g[i] = narrow<T>(widen(g[i]) * mask(static_cast<std::uint64_t>(i)) * gelu_erf_derivative(widen(z[i])));
  }
};

template <class T>
struct DropApply {
  T* dst;
  const T* src;
  DropScale<acc_t<T>> mask;
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    dst[i] = narrow<T>(widen(src[i]) * mask(static_cast<std::uint64_t>(i)));
  }
};

}  // namespace dr2net::cuda_detail
