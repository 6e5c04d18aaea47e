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
  //! Always `c`; the default (1, 0) is the pretrained network itself (beta = 0: not
  //! invertible). Throws dr2net::Error when c is not finite.
  explicit ConstantSchedule(Coefficients c = {1.0, 0.0}) : c_(c) { detail::check_coefficients_arg(c, "constant schedule"); }
  //! ConstantSchedule(Coefficients{alpha, beta}).
  ConstantSchedule(double alpha, double beta) : ConstantSchedule(Coefficients{alpha, beta}) {}
  //! The constant coefficients, for any module; throws dr2net::Error for a negative step.
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
  //! The schedule's endpoints and pace.
  struct Options {
    Coefficients start{1.0, 0.1};  //!< used for steps [0, eta): near the pretrained (1, 0), yet invertible
    //! Used from step floor(total_steps / eta) * eta on (default (0, 1): additive coupling).
    Coefficients end{0.0, 1.0};
    std::int64_t eta = 1;          //!< steps between changes
    std::int64_t total_steps = 1;  //!< step at which `end` is reached
  };

  //! Validates and keeps `o`. Throws dr2net::Error unless start and end are finite and
  //! 0 < eta <= total_steps.
  explicit PaperSchedule(Options o) : o_(o) {
    detail::check_coefficients_arg(o.start, "paper schedule start");
    detail::check_coefficients_arg(o.end, "paper schedule end");
    DR2NET_CHECK(o.eta > 0, "paper schedule: eta (steps between changes) must be positive, got ", o.eta);
    DR2NET_CHECK(o.total_steps > 0, "paper schedule: total_steps must be positive, got ", o.total_steps);
    DR2NET_CHECK(o.eta <= o.total_steps, "paper schedule: eta = ", o.eta,
                 " exceeds total_steps = ", o.total_steps, ", so the schedule would never change");
  }
  //! The paper's default endpoints, (1, 0.1) to (0, 1), with the given pace.
  PaperSchedule(std::int64_t eta, std::int64_t total_steps) : PaperSchedule(Options{{1.0, 0.1}, {0.0, 1.0}, eta, total_steps}) {}

  //! Number of changes from start to end.
  std::int64_t num_changes() const { return o_.total_steps / o_.eta; }

  //! The coefficients of `step`, the same for every module (formula above); throws
  //! dr2net::Error for a negative step.
  Coefficients operator()(std::int64_t step, int /*module*/) const {
    detail::check_step(step);
    const std::int64_t k = step / o_.eta;
    const std::int64_t n = num_changes();
    if (k >= n) return o_.end;
    return detail::lerp(o_.start, o_.end, static_cast<double>(k) / static_cast<double>(n));
  }
  //! The options the schedule was built with.
  const Options& options() const { return o_; }

 private:
  Options o_;
};

//! A smooth transition: c = start + (1 - cos(pi t)) / 2 (end - start), t = min(step / T, 1).
class CosineSchedule {
 public:
  //! From `start` at step 0 to `end` at `total_steps`, held afterwards. Throws dr2net::Error
  //! unless start and end are finite and total_steps > 0.
  CosineSchedule(Coefficients start, Coefficients end, std::int64_t total_steps)
      : start_(start), end_(end), total_(total_steps) {
    detail::check_coefficients_arg(start, "cosine schedule start");
    detail::check_coefficients_arg(end, "cosine schedule end");
    DR2NET_CHECK(total_steps > 0, "cosine schedule: total_steps must be positive, got ", total_steps);
  }
  //! The coefficients of `step`, the same for every module; throws dr2net::Error for a
  //! negative step.
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
  //! Wraps `fn`, which must be callable as `fn(step, module)` on a const object and
  //! copy-constructible (the Schedule concept copies schedules).
  explicit CallableSchedule(Fn fn) : fn_(std::move(fn)) {}
  //! fn(step, module), passed through unchecked (a negative step reaches fn as is).
  Coefficients operator()(std::int64_t step, int module) const { return fn_(step, module); }

 private:
  Fn fn_;
};
//! Deduces Fn from the callable: `CallableSchedule s([](std::int64_t, int) { ... });`.
template <class Fn>
CallableSchedule(Fn) -> CallableSchedule<Fn>;

//! A type-erased schedule, for choosing the schedule at run time.
using AnySchedule = CallableSchedule<std::function<Coefficients(std::int64_t, int)>>;

//! `Base` everywhere except the modules given fixed coefficients with set().
template <class Base>
class ModuleOverride {
 public:
  //! `base` for every module until set() overrides some.
  explicit ModuleOverride(Base base) : base_(std::move(base)) {}
  //! Module `module` uses `c` at every step from now on.
  ModuleOverride& set(int module, Coefficients c) {
    DR2NET_CHECK(module >= 0, "module override: negative module index ", module);
    detail::check_coefficients_arg(c, "module override");
    fixed_[module] = c;
    return *this;
  }
  //! Module `module` follows the base schedule again (no effect when it had no override).
  void clear(int module) { fixed_.erase(module); }
  //! The override of `module` if set() gave it one (a negative step then throws
  //! dr2net::Error), else base(step, module), which checks the step itself.
  Coefficients operator()(std::int64_t step, int module) const {
    if (auto it = fixed_.find(module); it != fixed_.end()) {
      detail::check_step(step);
      return it->second;
    }
    return base_(step, module);
  }
  //! The wrapped schedule.
  const Base& base() const { return base_; }
  //! The largest module index given an override, or -1 (a stack checks it against its size).
  int max_overridden_module() const { return fixed_.empty() ? -1 : fixed_.rbegin()->first; }

 private:
  Base base_;
  std::map<int, Coefficients> fixed_;
};

}  // namespace dr2net
