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

class WarmupCosine {
 public:
  struct Options {
    double base_lr = 1e-3;          //!< the peak learning rate, reached at the end of warmup
    std::int64_t warmup_steps = 0;  //!< W
    std::int64_t total_steps = 1;   //!< T: the step at which the decay reaches min_lr
    double min_lr = 0.0;            //!< the floor of the decay
  };

  explicit WarmupCosine(Options o) : o_(o) {
    DR2NET_CHECK(std::isfinite(o.base_lr) && o.base_lr > 0, "warmup-cosine schedule: base_lr must be positive, got ",
                 o.base_lr);
    DR2NET_CHECK(std::isfinite(o.min_lr) && o.min_lr >= 0 && o.min_lr <= o.base_lr,
                 "warmup-cosine schedule: min_lr must lie in [0, base_lr = ", o.base_lr, "], got ", o.min_lr);
    DR2NET_CHECK(o.total_steps > 0, "warmup-cosine schedule: total_steps must be positive, got ", o.total_steps);
    DR2NET_CHECK(o.warmup_steps >= 0 && o.warmup_steps < o.total_steps, "warmup-cosine schedule: warmup_steps = ",
                 o.warmup_steps, " must lie in [0, total_steps = ", o.total_steps, ")");
  }

  //! The learning rate of `step` (0-based).
  double operator()(std::int64_t step) const {
    DR2NET_CHECK(step >= 0, "warmup-cosine schedule: negative step ", step);
    if (step < o_.warmup_steps)
      return o_.base_lr * static_cast<double>(step + 1) / static_cast<double>(o_.warmup_steps);
    if (step >= o_.total_steps) return o_.min_lr;
    const double t = static_cast<double>(step - o_.warmup_steps) / static_cast<double>(o_.total_steps - o_.warmup_steps);
    return o_.min_lr + (o_.base_lr - o_.min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * t));
  }

  const Options& options() const noexcept { return o_; }

 private:
  Options o_;
};

}  // namespace dr2net::optim
