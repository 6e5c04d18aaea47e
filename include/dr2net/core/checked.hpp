#pragma once
//! \file
//! Checked size arithmetic: the one helper every shape, scratch, offset and byte count in
//! dr2net is computed with. Each function either returns the exact result or throws
//! dr2net::Error naming what was being computed and the operands, so a size can never wrap
//! (signed overflow) or silently under-allocate.

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>

#include "dr2net/core/error.hpp"

namespace dr2net::checked {

//! `a * b` for non-negative int64 operands, or nothing when either is negative or the
//! product exceeds INT64_MAX.
[[nodiscard]] constexpr std::optional<std::int64_t> try_mul(std::int64_t a, std::int64_t b) noexcept {
  if (a < 0 || b < 0) return std::nullopt;
  std::int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

//! `a + b` for non-negative int64 operands, or nothing when either is negative or the sum
//! exceeds INT64_MAX.
[[nodiscard]] constexpr std::optional<std::int64_t> try_add(std::int64_t a, std::int64_t b) noexcept {
  if (a < 0 || b < 0) return std::nullopt;
  std::int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}

//! `a * b` for non-negative sizes; throws naming `what` (for example "attention scores of
//! layer 3") when an operand is negative or the product overflows int64.
[[nodiscard]] inline std::int64_t mul(std::int64_t a, std::int64_t b, const char* what) {
  const auto r = try_mul(a, b);
  DR2NET_CHECK(r.has_value(), what, ": size ", a, " x ", b,
               (a < 0 || b < 0) ? " has a negative factor" : " overflows a 64-bit size");
  return *r;
}

//! `a + b` for non-negative sizes; throws naming `what` when an operand is negative or the sum
//! overflows int64.
[[nodiscard]] inline std::int64_t add(std::int64_t a, std::int64_t b, const char* what) {
  const auto r = try_add(a, b);
  DR2NET_CHECK(r.has_value(), what, ": size ", a, " + ", b,
               (a < 0 || b < 0) ? " has a negative term" : " overflows a 64-bit size");
  return *r;
}

//! Product of every factor (1 for none); throws naming `what` and the factors on a negative
//! factor or an overflow.
[[nodiscard]] inline std::int64_t product(std::span<const std::int64_t> factors, const char* what) {
  std::int64_t n = 1;
  bool negative = false;
  bool overflow = false;
  for (std::int64_t f : factors) {
    if (f < 0) negative = true;
    const auto r = try_mul(n, f < 0 ? 0 : f);
    if (!r) overflow = true; else n = *r;
  }
  if (negative || overflow) {
    std::string list;
    for (std::int64_t f : factors) list += (list.empty() ? "" : " x ") + std::to_string(f);
    DR2NET_FAIL(what, ": size ", list, negative ? " has a negative factor" : " overflows a 64-bit size");
  }
  return n;
}

//! product() over a braced list: `checked::product({B, H, N, N}, "attention scores")`.
[[nodiscard]] inline std::int64_t product(std::initializer_list<std::int64_t> factors, const char* what) {
  return product(std::span<const std::int64_t>(factors.begin(), factors.size()), what);
}

//! Bytes of `count` elements of `element_size` bytes each, as size_t; throws naming `what`
//! when `count` is negative or the byte count overflows.
[[nodiscard]] inline std::size_t bytes(std::int64_t count, std::size_t element_size, const char* what) {
  DR2NET_CHECK(count >= 0, what, ": negative element count ", count);
  std::size_t r = 0;
  DR2NET_CHECK(!__builtin_mul_overflow(static_cast<std::size_t>(count), element_size, &r), what, ": ",
               count, " elements of ", element_size, " bytes: the byte count overflows a size_t");
  return r;
}

//! A non-negative int64 as size_t (an index or a count); throws naming `what` when negative.
[[nodiscard]] inline std::size_t to_size(std::int64_t v, const char* what) {
  DR2NET_CHECK(v >= 0, what, ": negative size ", v);
  return static_cast<std::size_t>(v);
}

//! A size_t as int64; throws naming `what` when it exceeds INT64_MAX.
[[nodiscard]] inline std::int64_t to_int64(std::size_t v, const char* what) {
  DR2NET_CHECK(v <= static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max()), what, ": size ", v,
               " exceeds a 64-bit signed size");
  return static_cast<std::int64_t>(v);
}

//! Offsets of consecutive regions in one arena (a function's saved internals, say), each
//! region's size a product of factors, every region starting on a multiple of `unit`
//! elements, all in checked arithmetic. The error of an overflow names the owner, the region
//! and its factors: "VitAttention saved internals for input [2, 65536, 64]: attention
//! probabilities (batch x heads x tokens x tokens): size 2 x 4 x 65536 x 65536 ...". Nothing
//! is formatted unless a size overflows.
class RegionLayout {
 public:
  //! `owner` must outlive the layout (a literal, or a string the caller keeps).
  explicit RegionLayout(std::string_view owner, std::int64_t unit = 1) : owner_(owner), unit_(unit) {
    DR2NET_CHECK(unit > 0, owner, ": region alignment ", unit, " must be positive");
  }

  //! Appends a region of product(factors) elements; returns its offset. `region` names it.
  std::int64_t take(std::initializer_list<std::int64_t> factors, std::string_view region) {
    std::optional<std::int64_t> size = 1;
    for (std::int64_t f : factors) size = size ? try_mul(*size, f) : std::nullopt;
    if (!size) fail(std::span<const std::int64_t>(factors.begin(), factors.size()), region);
    const std::int64_t at = next_;
    const auto end = try_add(next_, *size);
    const auto padded = end ? try_add(*end, unit_ - 1) : std::nullopt;
    if (!padded) fail_total(region, *size);
    next_ = *padded / unit_ * unit_;
    return at;
  }

  //! Elements of all regions (a multiple of unit).
  std::int64_t total() const noexcept { return next_; }

 private:
  [[noreturn]] void fail(std::span<const std::int64_t> factors, std::string_view region) const {
    const std::string what = std::string(owner_) + ": " + std::string(region);
    (void)product(factors, what.c_str());  // throws, naming the factors
    DR2NET_FAIL(what, ": size overflows");  // not reached
  }
  [[noreturn]] void fail_total(std::string_view region, std::int64_t size) const {
    DR2NET_FAIL(owner_, ": the arena's ", next_, " elements + ", size, " of ", region,
                " overflow a 64-bit size");
  }

  std::string_view owner_;
  std::int64_t unit_ = 1;
  std::int64_t next_ = 0;
};

}  // namespace dr2net::checked
