#pragma once
//! \file
//! The one table of per-precision tolerances that every comparison between two code paths
//! (device vs host, vectorised vs element by element, reversible vs standard) uses.
//! A result r passes against a reference e when |r - e| <= atol + rtol * scale, where scale
//! is the magnitude of what was summed to get e (so cancellation does not fake a failure).

#include <cmath>
#include <cstddef>
#include <string_view>

namespace dr2net::testing {

enum class PrecisionKind { Fp64, Fp32, Bf16, Fp16 };

struct Tolerance {
  double atol;
  double rtol;
  //! Whether r matches e within this tolerance at magnitude `scale`.
  bool accepts(double r, double e, double scale) const {
    if (std::isnan(e)) return std::isnan(r);
    return std::abs(r - e) <= atol + rtol * scale;
  }
};

//! What is being compared, from one rounding step to many.
struct PrecisionTolerances {
  PrecisionKind kind;
  std::string_view name;
  Tolerance elementwise;  //!< a fused combine: a few roundings (FMA contraction on the device)
  Tolerance function;     //!< a residual function's output: GEMMs and reductions, differently ordered
  Tolerance gradient;     //!< parameter and input gradients, and whole-stack outputs
};

inline constexpr PrecisionTolerances kTolerances[] = {
    {PrecisionKind::Fp64, "fp64", {1e-15, 4e-16}, {1e-13, 1e-12}, {1e-11, 1e-10}},
    {PrecisionKind::Fp32, "fp32", {1e-7, 4e-7}, {1e-5, 2e-5}, {1e-4, 5e-4}},
    {PrecisionKind::Bf16, "bf16", {1e-7, 4e-7}, {2e-2, 2e-2}, {6e-2, 6e-2}},
    {PrecisionKind::Fp16, "fp16", {1e-7, 4e-7}, {4e-3, 4e-3}, {2e-2, 2e-2}},
};

inline constexpr const PrecisionTolerances& tolerances(PrecisionKind k) {
  for (const auto& t : kTolerances)
    if (t.kind == k) return t;
  return kTolerances[0];
}

//! The kind of a floating type; device test support specialises it for bf16 and fp16.
template <class T>
struct precision_kind_of;
template <>
struct precision_kind_of<double> {
  static constexpr PrecisionKind value = PrecisionKind::Fp64;
};
template <>
struct precision_kind_of<float> {
  static constexpr PrecisionKind value = PrecisionKind::Fp32;
};

template <class T>
constexpr const PrecisionTolerances& tolerances_for() {
  return tolerances(precision_kind_of<T>::value);
}

}  // namespace dr2net::testing
