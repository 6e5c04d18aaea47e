#pragma once
//! \file
//! Learning-rate schedule: linear warmup, then cosine decay.
//!
//!   step < W:       lr = base * (step + 1) / W
//!   W <= step < T:  lr = min + (base - min) * (1 + cos(pi * (step - W) / (T - W))) / 2
//!   step >= T:      lr = min
//!
//! Warmup counts from step + 1 so that the first step already learns (lr(0) = base / W) and
//! the last warmup step reaches base (lr(W - 1) = base = lr(W)). W = 0 means no warmup.

#include <cmath>
#include <cstdint>
#include <numbers>

#include "dr2net/core/error.hpp"

namespace dr2net::optim {

//! The warmup-cosine learning rate of the file comment, as a function of the 0-based step.
//! Pure and cheap: call it every step and pass the result to the optimizer (optim::AdamW::set_lr).
class WarmupCosine {
 public:
  //! The schedule's parameters (W, T, base and min of the file comment).
  struct Options {
    double base_lr = 1e-3;          //!< the peak learning rate, reached at the end of warmup
    std::int64_t warmup_steps = 0;  //!< W: steps of linear warmup (0: none); must be below total_steps
    std::int64_t total_steps = 1;   //!< T: the step at which the decay reaches min_lr
    double min_lr = 0.0;            //!< the floor of the decay
  };

  //! Validates and keeps `o`. Throws dr2net::Error, naming the option and its value, unless
  //! base_lr is finite and positive, 0 <= min_lr <= base_lr, total_steps > 0 and
  //! 0 <= warmup_steps < total_steps.
  explicit WarmupCosine(Options o) : o_(o) {
    DR2NET_CHECK(std::isfinite(o.base_lr) && o.base_lr > 0, "warmup-cosine schedule: base_lr must be positive, got ",
                 o.base_lr);
    DR2NET_CHECK(std::isfinite(o.min_lr) && o.min_lr >= 0 && o.min_lr <= o.base_lr,
                 "warmup-cosine schedule: min_lr must lie in [0, base_lr = ", o.base_lr, "], got ", o.min_lr);
    DR2NET_CHECK(o.total_steps > 0, "warmup-cosine schedule: total_steps must be positive, got ", o.total_steps);
    DR2NET_CHECK(o.warmup_steps >= 0 && o.warmup_steps < o.total_steps, "warmup-cosine schedule: warmup_steps = ",
                 o.warmup_steps, " must lie in [0, total_steps = ", o.total_steps, ")");
  }

  //! The learning rate of `step` (0-based); throws dr2net::Error for a negative step.
  double operator()(std::int64_t step) const {
    DR2NET_CHECK(step >= 0, "warmup-cosine schedule: negative step ", step);
    if (step < o_.warmup_steps)
      return o_.base_lr * static_cast<double>(step + 1) / static_cast<double>(o_.warmup_steps);
    if (step >= o_.total_steps) return o_.min_lr;
    const double t = static_cast<double>(step - o_.warmup_steps) / static_cast<double>(o_.total_steps - o_.warmup_steps);
    return o_.min_lr + (o_.base_lr - o_.min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * t));
  }

  //! The options the schedule was built with.
  const Options& options() const noexcept { return o_; }

 private:
  Options o_;
};

}  // namespace dr2net::optim
