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
  //! A live guard: check() passes until the owner is moved from.
  MovedFromGuard() = default;
  //! Copies the state of `o`: a copy of a moved-from owner is moved from too.
  MovedFromGuard(const MovedFromGuard&) = default;
  //! Takes the state of the source, as the copy constructor does.
  MovedFromGuard& operator=(const MovedFromGuard&) = default;
  //! Takes the state of `o` and marks `o` moved from; never throws.
  MovedFromGuard(MovedFromGuard&& o) noexcept : moved_from_(o.moved_from_) { o.moved_from_ = true; }
  //! Takes the state of `o` (so assigning a live owner revives this one) and marks `o` moved
  //! from; self-assignment changes nothing. Never throws.
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

  //! Throws dr2net::Error "<call> called on an object that was moved from" when moved from; `call`
  //! names the object's type and member ("ReversibleStack::backward()").
  void check(const char* call) const {
    DR2NET_CHECK(!moved_from_, call, " called on an object that was moved from; assign a new one to it first");
  }

 private:
  bool moved_from_ = false;
};

}  // namespace dr2net
