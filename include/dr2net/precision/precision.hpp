#pragma once
//! \file
//! Precision policies: what the streams are stored in, what residual functions compute in,
//! and what the fused combine accumulates in.

#include <concepts>
#include <string_view>
#include <type_traits>

#include "dr2net/core/fixed_point.hpp"

namespace dr2net {

//! A precision policy. `Stream` is the storage type of the two streams and their gradients;
//! `Compute` is the type residual functions read and write (their `value_type`);
//! `Accumulate` is the type of the combine arithmetic y = alpha*y + f + beta*x.
//! bf16/fp16 compute over fp32/fp64 streams slots in as another instantiation once a
//! backend provides those compute types.
//! `value_type` is the floating type of the stack's input, output and stream gradients: the
//! stream type itself here.
template <class Stream, class Compute, class Accumulate, bool AllowTf32 = false>
struct PrecisionPolicy {
  using stream_type = Stream;          //!< element type of the streams x, y and their gradients
  using compute_type = Compute;        //!< the residual functions' `value_type`; F's input is converted to it
  using accumulate_type = Accumulate;  //!< type in which the fused combine passes do their arithmetic
  using value_type = Stream;           //!< the stack's input, output and stream-gradient type (= Stream)
  //! Whether device GEMMs may use TF32 tensor cores for fp32 compute.
  static constexpr bool allow_tf32 = AllowTf32;
};

//! fp64 everywhere: the reference precision, smallest reconstruction error of the floating policies.
using Fp64 = PrecisionPolicy<double, double, double>;
//! fp32 everywhere, TF32 off (unit roundoff 2^-24).
using Fp32 = PrecisionPolicy<float, float, float>;
//! fp64 streams and combine arithmetic, fp32 residual functions.
using Fp64StreamsFp32Compute = PrecisionPolicy<double, float, double>;

//! Fixed-point streams (int64 with `FracBits` fractional bits, see core/fixed_point.hpp) for
//! exact reversibility; residual functions compute in `Compute` (float or double) from the
//! dequantized stream. Stream gradients, the stack's input and output, and the gradient
//! combine are in `Compute`: only activations need exact reversal.
template <class Compute, int FracBits = 32>
struct FixedPointPolicy {
  static_assert(std::is_floating_point_v<Compute>, "dr2net: fixed-point streams need fp32 or fp64 compute");
  using stream_type = FixedPoint<FracBits>;  //!< int64 stream elements with FracBits fractional bits
  using compute_type = Compute;              //!< what residual functions compute in (float or double)
  using accumulate_type = Compute;           //!< the gradient combine's type (the stream combine is integer)
  using value_type = Compute;                //!< the stack's input, output and stream-gradient type
  static constexpr bool allow_tf32 = false;  //!< always false: fixed-point policies never enable TF32 GEMMs
  static constexpr int frac_bits = FracBits;  //!< fractional bits of the stream elements
};

//! Fixed-point streams (32 fractional bits), fp32 residual functions: exact reversibility.
using FixedFp32 = FixedPointPolicy<float>;
//! Fixed-point streams (32 fractional bits), fp64 residual functions: exact reversibility.
using FixedFp64 = FixedPointPolicy<double>;

namespace detail {
template <class P>
struct value_type_of_policy {
  using type = typename P::stream_type;
};
template <class P>
  requires requires { typename P::value_type; }
struct value_type_of_policy<P> {
  using type = typename P::value_type;
};
}  // namespace detail

//! A policy's value type: P::value_type, or its stream type for policies that name none.
template <class P>
using policy_value_t = typename detail::value_type_of_policy<P>::type;

//! What the stack and the block need of a precision policy: stream_type, compute_type,
//! accumulate_type and a boolean allow_tf32; and either fixed-point streams or a value
//! type (policy_value_t) equal to the stream type.
template <class P>
concept Precision = requires {
  typename P::stream_type;
  typename P::compute_type;
  typename P::accumulate_type;
  { P::allow_tf32 } -> std::convertible_to<bool>;
} && (is_fixed_point_v<typename P::stream_type> || std::is_same_v<policy_value_t<P>, typename P::stream_type>);

//! A short name for logs and JSON: "fp32", "fp64", "fp64/fp32".
template <class P>
constexpr std::string_view precision_name() {
  using S = typename P::stream_type;
  using C = typename P::compute_type;
  if constexpr (std::is_same_v<S, double> && std::is_same_v<C, double>) return "fp64";
  else if constexpr (std::is_same_v<S, float> && std::is_same_v<C, float>) return "fp32";
  else if constexpr (std::is_same_v<S, double> && std::is_same_v<C, float>) return "fp64/fp32";
  else if constexpr (is_fixed_point_v<S> && std::is_same_v<C, float>) return "fixed/fp32";
  else if constexpr (is_fixed_point_v<S> && std::is_same_v<C, double>) return "fixed/fp64";
  else return "custom";
}

//! Unit roundoff of a floating type (2^-24 for float, 2^-53 for double).
template <class T>
constexpr double unit_roundoff() {
  if constexpr (is_fixed_point_v<T>) return 0.0;  // stream arithmetic is exact
  else if constexpr (std::is_same_v<T, float>) return 5.9604644775390625e-08;
  else if constexpr (std::is_same_v<T, double>) return 1.1102230246251565e-16;
  else return 3.90625e-03;  // 8-bit significands (bf16) as the conservative default
}

}  // namespace dr2net
