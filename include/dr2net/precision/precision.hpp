#pragma once
//! \file
//! Precision policies: what the streams are stored in, what residual functions compute in,
//! and what the fused combine accumulates in.

#include <concepts>
#include <string_view>
#include <type_traits>

namespace dr2net {

//! A precision policy. `Stream` is the storage type of the two streams and their gradients;
//! `Compute` is the type residual functions read and write (their `value_type`);
//! `Accumulate` is the type of the combine arithmetic y = alpha*y + f + beta*x.
//! bf16/fp16 compute over fp32/fp64 streams slots in as another instantiation once a
//! backend provides those compute types.
template <class Stream, class Compute, class Accumulate, bool AllowTf32 = false>
struct PrecisionPolicy {
  using stream_type = Stream;
  using compute_type = Compute;
  using accumulate_type = Accumulate;
  //! Whether device GEMMs may use TF32 tensor cores for fp32 compute.
  static constexpr bool allow_tf32 = AllowTf32;
};

using Fp64 = PrecisionPolicy<double, double, double>;
using Fp32 = PrecisionPolicy<float, float, float>;
//! fp64 streams and combine arithmetic, fp32 residual functions.
using Fp64StreamsFp32Compute = PrecisionPolicy<double, float, double>;

template <class P>
concept Precision = requires {
  typename P::stream_type;
  typename P::compute_type;
  typename P::accumulate_type;
  { P::allow_tf32 } -> std::convertible_to<bool>;
};

//! A short name for logs and JSON: "fp32", "fp64", "fp64/fp32".
template <class P>
constexpr std::string_view precision_name() {
  using S = typename P::stream_type;
  using C = typename P::compute_type;
  if constexpr (std::is_same_v<S, double> && std::is_same_v<C, double>) return "fp64";
  else if constexpr (std::is_same_v<S, float> && std::is_same_v<C, float>) return "fp32";
  else if constexpr (std::is_same_v<S, double> && std::is_same_v<C, float>) return "fp64/fp32";
  else return "custom";
}

//! Unit roundoff of a floating type (2^-24 for float, 2^-53 for double).
template <class T>
constexpr double unit_roundoff() {
  if constexpr (std::is_same_v<T, float>) return 5.9604644775390625e-08;
  else if constexpr (std::is_same_v<T, double>) return 1.1102230246251565e-16;
  else return 3.90625e-03;  // 8-bit significands (bf16) as the conservative default
}

}  // namespace dr2net
