#pragma once
//! \file
//! The two coefficients of a Dr²Net module and the schedule concept.

#include <cmath>
#include <concepts>
#include <cstdint>

namespace dr2net {

//! y_i = alpha * y_{i-1} + F_i(y_{i-1}) + beta * x_{i-1}
struct Coefficients {
  double alpha = 1.0;  //!< weight of the pretrained residual connection
  double beta = 0.0;   //!< weight of the reversible residual connection
  //! Exact comparison of both coefficients (as doubles: 0.0 == -0.0, NaN never equal).
  friend bool operator==(const Coefficients&, const Coefficients&) = default;
};

//! Whether alpha and beta are both finite (neither NaN nor infinite); the schedules and the
//! stack refuse coefficients that are not.
inline bool is_finite(const Coefficients& c) { return std::isfinite(c.alpha) && std::isfinite(c.beta); }

//! A schedule maps (training step, module index) to coefficients. Module indices count
//! residual functions through the stack: layer l holds modules 2l (F) and 2l+1 (G).
template <class S>
concept Schedule = std::copy_constructible<S> && requires(const S& s, std::int64_t step, int module) {
  { s(step, module) } -> std::convertible_to<Coefficients>;
};

}  // namespace dr2net
