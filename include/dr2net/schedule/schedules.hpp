#pragma once
//! \file
//! Ready coefficient schedules: constant, the paper's stepwise transition, cosine, any
//! callable, and a per-module override on top of any of them.

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <numbers>
#include <utility>

#include "dr2net/core/error.hpp"
#include "dr2net/schedule/coefficients.hpp"

namespace dr2net {

namespace detail {
inline void check_coefficients_arg(const Coefficients& c, const char* what) {
  DR2NET_CHECK(is_finite(c), what, " coefficients must be finite, got (alpha, beta) = (", c.alpha,
               ", ", c.beta, ")");
}
inline void check_step(std::int64_t step) { DR2NET_CHECK(step >= 0, "negative training step ", step); }
inline Coefficients lerp(const Coefficients& a, const Coefficients& b, double t) {
  return {a.alpha + t * (b.alpha - a.alpha), a.beta + t * (b.beta - a.beta)};
}
}  // namespace detail

//! The same (alpha, beta) at every step and module.
class ConstantSchedule {
 public:
  explicit ConstantSchedule(Coefficients c = {1.0, 0.0}) : c_(c) { detail::check_coefficients_arg(c, "constant schedule"); }
  ConstantSchedule(double alpha, double beta) : ConstantSchedule(Coefficients{alpha, beta}) {}
  Coefficients operator()(std::int64_t step, int /*module*/) const {
    detail::check_step(step);
    return c_;
  }

 private:
  Coefficients c_;
};

//! The paper's dynamic schedule: starting at `start` (default (1, 0.1)), the coefficients
//! change every `eta` steps by equal increments, reaching `end` (default (0, 1)) at step
//! `total_steps`, and are held there afterwards.
//!   k = floor(step / eta), K = floor(total_steps / eta), c = start + min(k / K, 1) (end - start)
class PaperSchedule {
 public:
  struct Options {
    Coefficients start{1.0, 0.1};
    Coefficients end{0.0, 1.0};
    std::int64_t eta = 1;          //!< steps between changes
    std::int64_t total_steps = 1;  //!< step at which `end` is reached
  };

  explicit PaperSchedule(Options o) : o_(o) {
    detail::check_coefficients_arg(o.start, "paper schedule start");
    detail::check_coefficients_arg(o.end, "paper schedule end");
    DR2NET_CHECK(o.eta > 0, "paper schedule: eta (steps between changes) must be positive, got ", o.eta);
    DR2NET_CHECK(o.total_steps > 0, "paper schedule: total_steps must be positive, got ", o.total_steps);
    DR2NET_CHECK(o.eta <= o.total_steps, "paper schedule: eta = ", o.eta,
                 " exceeds total_steps = ", o.total_steps, ", so the schedule would never change");
  }
  PaperSchedule(std::int64_t eta, std::int64_t total_steps) : PaperSchedule(Options{{1.0, 0.1}, {0.0, 1.0}, eta, total_steps}) {}

  //! Number of changes from start to end.
  std::int64_t num_changes() const { return o_.total_steps / o_.eta; }

  Coefficients operator()(std::int64_t step, int /*module*/) const {
    detail::check_step(step);
    const std::int64_t k = step / o_.eta;
    const std::int64_t n = num_changes();
    if (k >= n) return o_.end;
    return detail::lerp(o_.start, o_.end, static_cast<double>(k) / static_cast<double>(n));
  }
  const Options& options() const { return o_; }

 private:
  Options o_;
};

//! A smooth transition: c = start + (1 - cos(pi t)) / 2 (end - start), t = min(step / T, 1).
class CosineSchedule {
 public:
  CosineSchedule(Coefficients start, Coefficients end, std::int64_t total_steps)
      : start_(start), end_(end), total_(total_steps) {
    detail::check_coefficients_arg(start, "cosine schedule start");
    detail::check_coefficients_arg(end, "cosine schedule end");
    DR2NET_CHECK(total_steps > 0, "cosine schedule: total_steps must be positive, got ", total_steps);
  }
  Coefficients operator()(std::int64_t step, int /*module*/) const {
    detail::check_step(step);
    if (step >= total_) return end_;
    const double t = static_cast<double>(step) / static_cast<double>(total_);
    return detail::lerp(start_, end_, 0.5 * (1.0 - std::cos(std::numbers::pi * t)));
  }

 private:
  Coefficients start_, end_;
  std::int64_t total_;
};

//! Any callable (step, module) -> Coefficients. The stack validates what it returns.
template <class Fn>
class CallableSchedule {
 public:
  explicit CallableSchedule(Fn fn) : fn_(std::move(fn)) {}
  Coefficients operator()(std::int64_t step, int module) const { return fn_(step, module); }

 private:
  Fn fn_;
};
template <class Fn>
CallableSchedule(Fn) -> CallableSchedule<Fn>;

//! A type-erased schedule, for choosing the schedule at run time.
using AnySchedule = CallableSchedule<std::function<Coefficients(std::int64_t, int)>>;

//! `Base` everywhere except the modules given fixed coefficients with set().
template <class Base>
class ModuleOverride {
 public:
  explicit ModuleOverride(Base base) : base_(std::move(base)) {}
  //! Module `module` uses `c` at every step from now on.
  ModuleOverride& set(int module, Coefficients c) {
    DR2NET_CHECK(module >= 0, "module override: negative module index ", module);
    detail::check_coefficients_arg(c, "module override");
    fixed_[module] = c;
    return *this;
  }
  void clear(int module) { fixed_.erase(module); }
  Coefficients operator()(std::int64_t step, int module) const {
    if (auto it = fixed_.find(module); it != fixed_.end()) {
      detail::check_step(step);
      return it->second;
    }
    return base_(step, module);
  }
  const Base& base() const { return base_; }
  //! The largest module index given an override, or -1 (a stack checks it against its size).
  int max_overridden_module() const { return fixed_.empty() ? -1 : fixed_.rbegin()->first; }

 private:
  Base base_;
  std::map<int, Coefficients> fixed_;
};

}  // namespace dr2net
