#pragma once
//! \file
//! MovedFromGuard: a member that lets a movable object refuse every call once it was moved
//! from, with a dr2net::Error instead of undefined behaviour (empty members read out of
//! bounds, empty callables, silently returned inputs).

#include "dr2net/core/error.hpp"

namespace dr2net {

//! Moving an object moves its guard: the source's guard then says "moved from", the
//! destination's says whatever the source's said. Copies (where the owner allows them)
//! keep the state. Owners call check("ReversibleStack::forward()") at the top of each
//! public member.
class MovedFromGuard {
 public:
  MovedFromGuard() = default;
  MovedFromGuard(const MovedFromGuard&) = default;
  MovedFromGuard& operator=(const MovedFromGuard&) = default;
  MovedFromGuard(MovedFromGuard&& o) noexcept : moved_from_(o.moved_from_) { o.moved_from_ = true; }
  MovedFromGuard& operator=(MovedFromGuard&& o) noexcept {
    if (this != &o) {
      moved_from_ = o.moved_from_;
      o.moved_from_ = true;
    }
    return *this;
  }
  ~MovedFromGuard() = default;

  //! True once the owner was moved from (and not assigned to since).
  bool moved_from() const noexcept { return moved_from_; }

  //! Throws dr2net::Error "<call> on an object that was moved from" when moved from; `call`
  //! names the object's type and member ("ReversibleStack::backward()").
  void check(const char* call) const {
    DR2NET_CHECK(!moved_from_, call, " called on an object that was moved from; assign a new one to it first");
  }

 private:
  bool moved_from_ = false;
};

}  // namespace dr2net
