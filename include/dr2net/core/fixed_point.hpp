#pragma once
//! \file
//! Fixed-point stream elements and the exact integer arithmetic of exact reversibility
//! (DESIGN §3a), written once for host and device.
//!
//! A stream element is an int64 holding h * 2^FracBits. Every term added to a stream is
//! quantized deterministically, so a module's forward
//!
//!   Y_i = A(Y_{i-1}) + Q(F(deq Y_{i-1})) + B(X_{i-1})
//!
//! is invertible bit for bit: A and Q depend only on Y_{i-1} = X_i, which the backward has,
//! and B loses only the bits that the side-bit buffer keeps.
//!
//! Coefficients live on the grid c = sign * p / 2^kCoefficientBits (p a non-negative
//! integer). A(Y) = sign * floor(p * Y / 2^k) and B likewise; with R = floor(p X / 2^k), X lies
//! in [R 2^k / p, (R + 1) 2^k / p), so X = ceil(R 2^k / p) + s with 0 <= s < ceil(2^k / p):
//! s takes side_bit_width(p) bits (0 when |beta| >= 1, 1 at 0.5, 4 at 0.1, 7 at 0.01).
//!
//! Range: stream values and every term must stay below 2^62 in magnitude (|h| < 2^(62 -
//! FracBits), 2^30 at the default 32 fractional bits). Anything larger, and any non-finite
//! value, is reported through a flag instead of wrapping. All integer arithmetic that could
//! exceed int64 on bad data is done modulo 2^64 (never undefined behaviour) and the flag says
//! the result is meaningless.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "dr2net/core/config.hpp"

namespace dr2net {

//! One fixed-point stream element: the value raw / 2^FracBits.
template <int FracBits = 32>
struct FixedPoint {
  static_assert(FracBits >= 8 && FracBits <= 52, "dr2net: FixedPoint needs 8 to 52 fractional bits");
  static constexpr int frac_bits = FracBits;  //!< fractional bits: the value's resolution is 2^-frac_bits
  //! 2^FracBits and its inverse, exact in double.
  static constexpr double scale = static_cast<double>(std::uint64_t{1} << FracBits);
  static constexpr double inverse_scale = 1.0 / scale;  //!< 2^-FracBits, exact in double

  //! The stored integer, value * 2^FracBits; |raw| < 2^62 for every valid stream element
  //! (see fixed::kLimit). Aggregate-initialised: `FixedPoint<32>{raw}`.
  std::int64_t raw;

  //! The value as a floating type (rounded once, to nearest, through double).
  template <class T>
    requires std::is_floating_point_v<T>
  DR2NET_HD_INLINE explicit operator T() const {
    return static_cast<T>(static_cast<double>(raw) * inverse_scale);
  }
};

//! Whether T is a FixedPoint stream element, of any FracBits (false_type here).
template <class T>
struct is_fixed_point : std::false_type {};
//! Every FixedPoint specialisation is a fixed-point stream element (true_type).
template <int B>
struct is_fixed_point<FixedPoint<B>> : std::true_type {};
//! is_fixed_point<T>::value; selects the exact (integer) paths of the combines and the stack.
template <class T>
inline constexpr bool is_fixed_point_v = is_fixed_point<T>::value;

//! The integer arithmetic of fixed-point streams (see the file comment): coefficients on a
//! 2^-24 grid, floor-rounded terms, their exact inverse with side bits, and range checks
//! done modulo 2^64 so that bad data never causes undefined behaviour.
namespace fixed {

//! Coefficients are multiples of 2^-kCoefficientBits.
inline constexpr int kCoefficientBits = 24;
//! Largest |coefficient| the integer arithmetic takes (p <= 2^38 keeps every product in range).
inline constexpr double kMaxCoefficient = 16384.0;
//! Stream values and terms stay below this in magnitude (raw units).
inline constexpr double kLimit = 4611686018427387904.0;  // 2^62

//! A coefficient on the grid: value = sign * p / 2^kCoefficientBits, exactly.
struct Coefficient {
  std::int64_t p = 0;    //!< |value| * 2^k
  int sign = 1;          //!< +1 or -1
  double value = 0;      //!< sign * p / 2^k (exact in double)
  double inverse = 0;    //!< 1 / p rounded (0 when p = 0): divisions become corrected multiplications
};

//! The grid point nearest to c (|c| <= kMaxCoefficient; the caller checks).
inline Coefficient quantize_coefficient(double c) {
  Coefficient q;
  q.sign = c < 0 ? -1 : 1;
  q.p = static_cast<std::int64_t>(std::llround(std::abs(c) * static_cast<double>(std::int64_t{1} << kCoefficientBits)));
  q.value = q.sign * static_cast<double>(q.p) / static_cast<double>(std::int64_t{1} << kCoefficientBits);
  q.inverse = q.p > 0 ? 1.0 / static_cast<double>(q.p) : 0.0;
  return q;
}

//! Bits of side information per element that B loses: bit width of ceil(2^k / p) - 1.
DR2NET_HD_INLINE int side_bit_width(std::int64_t p) {
  if (p <= 0) return 64;  // not invertible: no width suffices
  const std::int64_t one = std::int64_t{1} << kCoefficientBits;
  const std::int64_t m = (one + p - 1) / p;  // number of X sharing one R
  int w = 0;
  while ((std::int64_t{1} << w) < m) ++w;
  return w;
}

//! Elements per 64-bit side-bit word at width w (elements never straddle words).
DR2NET_HD_INLINE int elements_per_word(int width) { return width <= 0 ? 1 : 64 / width; }

//! floor(p * x / 2^k) for p >= 0, modulo 2^64 when the exact result exceeds int64.
DR2NET_HD_INLINE std::int64_t mul_floor(std::int64_t x, std::int64_t p) {
  constexpr int k = kCoefficientBits;
  const std::int64_t q = x >> k;  // floor(x / 2^k) (arithmetic shift)
  const auto r = static_cast<std::uint64_t>(x) & ((std::uint64_t{1} << k) - 1);
  const auto up = static_cast<std::uint64_t>(p);
  return static_cast<std::int64_t>(up * static_cast<std::uint64_t>(q) + ((up * r) >> k));
}

//! ceil(r * 2^k / p) for p > 0 (inv = 1/p rounded): the smallest c with floor(p c / 2^k) >= r.
//! Estimated as r 2^k inv in double, then made exact by testing the neighbouring candidates
//! with mul_floor: the estimate is off by at most one unit while |c| < 2^52 and by at most 2^10
//! at the edge of the range (|c| < 2^62). A meaningless r (from a function that was not
//! deterministic, caught by the checksums) gives a meaningless c, never a hang.
DR2NET_HD_INLINE std::int64_t ceil_div_mul(std::int64_t r, std::int64_t p, double inv) {
  constexpr int k = kCoefficientBits;
  if (p == (std::int64_t{1} << k)) return r;  // |beta| = 1
  const double estimate = static_cast<double>(r) * (inv * static_cast<double>(std::int64_t{1} << k));
  if (!(estimate > -kLimit && estimate < kLimit)) return static_cast<std::int64_t>(static_cast<std::uint64_t>(r) << k);
  auto c = static_cast<std::int64_t>(estimate);
  int steps = 0;
  while (mul_floor(c, p) < r && steps++ < 4096) ++c;
  while (mul_floor(c - 1, p) >= r && steps++ < 4096) --c;
  return c;
}

//! The side bits of x for the term floor(p x / 2^k) (p <= 2^k, inv = 1/p rounded):
//! s = x - ceil(floor(p x / 2^k) 2^k / p), computed without a division as floor(t / p) with
//! t = (p x) mod 2^k (p x = R 2^k + t gives ceil(R 2^k / p) = x - floor(t / p)); the estimate
//! t * inv is corrected to the exact floor.
DR2NET_HD_INLINE std::uint64_t side_bits_of(std::int64_t x, std::int64_t p, double inv) {
  constexpr std::uint64_t mask = (std::uint64_t{1} << kCoefficientBits) - 1;
  const auto t = static_cast<std::int64_t>((static_cast<std::uint64_t>(p) * (static_cast<std::uint64_t>(x) & mask)) & mask);
  auto s = static_cast<std::int64_t>(static_cast<double>(t) * inv);
  if (s * p > t) --s;
  else if ((s + 1) * p <= t) ++s;
  return static_cast<std::uint64_t>(s);
}

//! The term c * x on the grid: sign * floor(p * x / 2^k) (x itself at |c| = 1, 0 at c = 0).
DR2NET_HD_INLINE std::int64_t apply(const Coefficient& c, std::int64_t x) {
  const std::int64_t t = c.p == (std::int64_t{1} << kCoefficientBits) ? x : c.p == 0 ? 0 : mul_floor(x, c.p);
  return c.sign < 0 ? static_cast<std::int64_t>(0 - static_cast<std::uint64_t>(t)) : t;
}

//! Whether a double is NaN or infinite (also under contraction; no fast-math assumed).
DR2NET_HD_INLINE bool not_finite(double v) { return !(v - v == 0.0); }

//! round(v * scale) as int64; sets `bad` (leaving it set) and returns 0 when v is
//! non-finite or the result would leave the range.
DR2NET_HD_INLINE std::int64_t quantize(double v, double scale, bool& bad) {
  const double s = v * scale;
  if (!(s > -kLimit && s < kLimit)) {  // also NaN
    bad = true;
    return 0;
  }
  return static_cast<std::int64_t>(::floor(s + 0.5));
}

//! a + b + c modulo 2^64 (exact whenever the caller checked the range).
DR2NET_HD_INLINE std::int64_t wrapping_sum(std::int64_t a, std::int64_t b, std::int64_t c) {
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(a) + static_cast<std::uint64_t>(b) +
                                   static_cast<std::uint64_t>(c));
}

//! Whether a + b + c, computed modulo 2^64 as `sum`, is exact and below 2^62 in magnitude
//! (a, b, c each below 2^62): neither partial sum overflowed and the result is in range.
DR2NET_HD_INLINE bool sum_in_range(std::int64_t a, std::int64_t b, std::int64_t c, std::int64_t sum) {
  const auto ab = static_cast<std::int64_t>(static_cast<std::uint64_t>(a) + static_cast<std::uint64_t>(b));
  const bool wrapped = ((a ^ ab) & (b ^ ab)) < 0 || ((ab ^ sum) & (c ^ sum)) < 0;
  constexpr std::int64_t limit = std::int64_t{1} << 62;
  return !wrapped && sum < limit && sum > -limit;
}

//! a - b - c modulo 2^64.
DR2NET_HD_INLINE std::int64_t wrapping_difference(std::int64_t a, std::int64_t b, std::int64_t c) {
  return static_cast<std::int64_t>(static_cast<std::uint64_t>(a) - static_cast<std::uint64_t>(b) -
                                   static_cast<std::uint64_t>(c));
}

//! A well-mixed 64-bit function of an element's index and raw value (splitmix64 finaliser).
//! The stream checksum is the sum of these modulo 2^64: independent of summation order, so
//! any parallel reduction gives the same bits.
DR2NET_HD_INLINE std::uint64_t checksum_term(std::uint64_t index, std::int64_t raw) {
  std::uint64_t z = static_cast<std::uint64_t>(raw) ^ (index * 0x9E3779B97F4A7C15ull);
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace fixed
}  // namespace dr2net
