#pragma once
//! \file
//! Compute types and their accumulation types, shared by every backend: which element types a
//! residual function may compute in, what its GEMMs and reductions accumulate in, and the
//! conversions between the two (usable on host and device alike). No backend header is needed:
//! a backend admits its own 16-bit types by specialising is_compute_type.

#include <type_traits>

#include "dr2net/core/config.hpp"

namespace dr2net {

//! Types a residual function may compute in: the standard floating types, and any type a
//! backend declares by specialising this trait (a device backend's bf16 and fp16 types).
template <class T>
struct is_compute_type : std::is_floating_point<T> {};
//! is_compute_type<T>::value: whether a residual function may declare `value_type = T`.
template <class T>
inline constexpr bool is_compute_type_v = is_compute_type<T>::value;

//! What reductions, GEMM scalars and saved LayerNorm statistics of compute type T are held in:
//! double for double, float for everything else (float itself, bf16, fp16). For the host's
//! compute types (float, double) it is T itself.
template <class T>
using accumulate_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

//! T -> its accumulation type (exact: bf16 and fp16 widen exactly to float).
template <class T>
DR2NET_HD_INLINE accumulate_t<T> widen(T v) {
  return static_cast<accumulate_t<T>>(v);
}

//! An accumulated value rounded to T (round to nearest even); the identity for T = A.
template <class T, class A>
DR2NET_HD_INLINE T narrow(A v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) return static_cast<T>(v);
  else return T(static_cast<float>(v));
}

}  // namespace dr2net
