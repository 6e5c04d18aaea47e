#pragma once
//! \file
//! Bit-exact conversions between float/double and the 16-bit formats
//! IEEE binary16 ("half", fp16) and bfloat16 (bf16).
//!
//! Everything works on integer bit patterns, so the results do not depend on
//! the hardware rounding mode, on flush-to-zero settings, or on whether a
//! native 16-bit type exists; the same code runs on the host and in CUDA
//! device code. Every conversion to a 16-bit format rounds to nearest with
//! ties to even (subnormals included), overflows to a signed infinity, keeps
//! the sign of zero, and turns any NaN into a quiet NaN of the same sign.

#include <cstdint>
#include <cstring>

#include "dr2net/core/config.hpp"

namespace dr2net {
namespace detail {

//! Reinterprets the bytes of `from` as a `To` (a host/device std::bit_cast;
//! memcpy is what nvcc and the host compilers lower to a plain register move).
template <class To, class From>
DR2NET_HD_INLINE To bit_copy(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_copy needs equally sized types");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

//! Rounds a double to a binary format with `ExpBits` exponent bits and
//! `MantBits` stored mantissa bits (IEEE layout, bias 2^(ExpBits-1)-1) and
//! returns its bit pattern, sign included. Rounding happens exactly once, on the
//! double's own bits, which is what makes double->half correctly rounded where
//! going through float would round twice.
template <int ExpBits, int MantBits>
DR2NET_HD_INLINE std::uint32_t round_double_to_bits(double value) {
  static_assert(ExpBits >= 2 && ExpBits <= 8 && MantBits >= 1 && MantBits <= 23,
                "target format must fit in 32 bits and be narrower than double");
  constexpr int bias = (1 << (ExpBits - 1)) - 1;
  constexpr std::uint32_t exp_all_ones = (1u << ExpBits) - 1u;
  constexpr std::uint32_t inf_bits = exp_all_ones << MantBits;
  constexpr int min_normal_exp = 1 - bias;
  // Subnormals of the target are multiples of 2^(min_normal_exp - MantBits).
  constexpr int min_quantum_exp = min_normal_exp - MantBits;

  const auto x = bit_copy<std::uint64_t>(value);
  const std::uint32_t sign = static_cast<std::uint32_t>(x >> 63) << (ExpBits + MantBits);
  const std::uint64_t abs_bits = x & 0x7FFF'FFFF'FFFF'FFFFull;
  const int dexp = static_cast<int>(abs_bits >> 52);
  const std::uint64_t dmant = abs_bits & 0x000F'FFFF'FFFF'FFFFull;

  if (dexp == 0x7FF) {
    if (dmant == 0) return sign | inf_bits;
    // Quiet NaN; keep the top payload bits so NaN boxing survives where it can.
    const auto payload = static_cast<std::uint32_t>(dmant >> (52 - MantBits));
    return sign | inf_bits | (1u << (MantBits - 1)) | payload;
  }
  // |value| < 2^(e+1) with e the unbiased exponent. Below half the smallest
  // subnormal (this covers every double subnormal and zero) the result is a
  // signed zero; at exactly half it ties to the even zero as well.
  const int e = dexp - 1023;
  if (dexp == 0 || e < min_quantum_exp - 1) return sign;

  // |value| = m * 2^(e - 52) exactly, with m a 53-bit integer.
  const std::uint64_t m = dmant | (1ull << 52);
  const int eff_exp = e < min_normal_exp ? min_normal_exp : e;
  const int quantum_exp = eff_exp - MantBits;
  // Scale so one unit in the last place of the target is 1: n = m >> shift.
  // shift lies in [52 - MantBits, 53] because e >= min_quantum_exp - 1.
  const int shift = quantum_exp - (e - 52);
  std::uint64_t n = shift >= 64 ? 0 : (m >> shift);
  const std::uint64_t rem = m - (shift >= 64 ? 0 : (n << shift));
  const std::uint64_t half_ulp = 1ull << (shift - 1);
  if (rem > half_ulp || (rem == half_ulp && (n & 1u) != 0)) ++n;

  // For normals n includes the implicit bit, so adding (biased_exp - 1) << MantBits
  // yields the encoding; for subnormals that offset is zero. A carry out of the
  // mantissa moves into the exponent field, which is exactly right.
  const std::uint64_t encoded =
      (static_cast<std::uint64_t>(eff_exp + bias - 1) << MantBits) + n;
  if (encoded >= inf_bits) return sign | inf_bits;
  return sign | static_cast<std::uint32_t>(encoded);
}

}  // namespace detail

//! Rounds a float to the nearest bfloat16 (ties to even) and returns its bits.
DR2NET_HD_INLINE std::uint16_t float_to_bf16_bits(float value) {
  const auto x = detail::bit_copy<std::uint32_t>(value);
  if ((x & 0x7FFF'FFFFu) > 0x7F80'0000u) {
    // NaN: keep sign and top payload, force the quiet bit so truncation can
    // never turn it into an infinity.
    return static_cast<std::uint16_t>((x >> 16) | 0x0040u);
  }
  // bf16 is the top half of a float, so rounding is adding just under half an
  // ulp of the kept part, plus one when the kept part is odd (ties to even).
  // Carries propagate into the exponent and, past the largest value, to inf.
  const std::uint32_t lsb = (x >> 16) & 1u;
  return static_cast<std::uint16_t>((x + 0x7FFFu + lsb) >> 16);
}

//! Widens bfloat16 bits to the float with the same value (exact).
DR2NET_HD_INLINE float bf16_bits_to_float(std::uint16_t bits) {
  return detail::bit_copy<float>(static_cast<std::uint32_t>(bits) << 16);
}

//! Rounds a float to the nearest IEEE half (ties to even, subnormals included)
//! and returns its bits. Magnitudes of 65520 and more become infinity.
DR2NET_HD_INLINE std::uint16_t float_to_half_bits(float value) {
  const auto x = detail::bit_copy<std::uint32_t>(value);
  const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
  const std::uint32_t ax = x & 0x7FFF'FFFFu;

  if (ax >= 0x7F80'0000u) {
    if (ax == 0x7F80'0000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
    return static_cast<std::uint16_t>(sign | 0x7E00u | ((ax >> 13) & 0x03FFu));
  }
  // 65520 (0x477FF000) is the midpoint between 65504, whose mantissa is odd,
  // and 65536: ties and everything above round to infinity.
  if (ax >= 0x477F'F000u) return static_cast<std::uint16_t>(sign | 0x7C00u);

  if (ax >= 0x3880'0000u) {
    // Normal half: rebias the exponent (127 -> 15) and round away 13 bits.
    const std::uint32_t lsb = (ax >> 13) & 1u;
    const std::uint32_t rounded = ax + 0x0FFFu + lsb - 0x3800'0000u;
    return static_cast<std::uint16_t>(sign | (rounded >> 13));
  }
  // Up to half the smallest subnormal (2^-25, a tie towards the even zero).
  if (ax <= 0x3300'0000u) return sign;

  // Subnormal half: result = round(|value| / 2^-24). |value| = m * 2^(e - 150)
  // with e in [102, 112], so the quotient is m >> (126 - e).
  const std::uint32_t m = (ax & 0x007F'FFFFu) | 0x0080'0000u;
  const int shift = 126 - static_cast<int>(ax >> 23);
  std::uint32_t n = m >> shift;
  const std::uint32_t rem = m & ((1u << shift) - 1u);
  const std::uint32_t half_ulp = 1u << (shift - 1);
  // Rounding up may carry into 0x0400, the smallest normal: still the right encoding.
  if (rem > half_ulp || (rem == half_ulp && (n & 1u) != 0)) ++n;
  return static_cast<std::uint16_t>(sign | n);
}

//! Widens IEEE half bits to the float with the same value (exact).
DR2NET_HD_INLINE float half_bits_to_float(std::uint16_t bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t exp = (bits >> 10) & 0x1Fu;
  std::uint32_t mant = bits & 0x03FFu;
  std::uint32_t out;
  if (exp == 0x1Fu) {
    out = sign | 0x7F80'0000u | (mant << 13);  // inf, or NaN with its payload
  } else if (exp != 0) {
    out = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    out = sign;
  } else {
    // Subnormal half = mant * 2^-24, a normal float: normalise the mantissa.
    std::uint32_t e = 113;  // biased float exponent of 2^-14
    while ((mant & 0x0400u) == 0) {
      mant <<= 1;
      --e;
    }
    out = sign | (e << 23) | ((mant & 0x03FFu) << 13);
  }
  return detail::bit_copy<float>(out);
}

//! Rounds a double straight to the nearest bfloat16 (one rounding, ties to even).
DR2NET_HD_INLINE std::uint16_t double_to_bf16_bits(double value) {
  return static_cast<std::uint16_t>(detail::round_double_to_bits<8, 7>(value));
}

//! Rounds a double straight to the nearest IEEE half (one rounding, ties to even).
DR2NET_HD_INLINE std::uint16_t double_to_half_bits(double value) {
  return static_cast<std::uint16_t>(detail::round_double_to_bits<5, 10>(value));
}

//! Rounds a double to the nearest float (ties to even) without relying on the
//! floating-point environment; out-of-range magnitudes become infinity.
DR2NET_HD_INLINE float double_to_float(double value) {
  return detail::bit_copy<float>(detail::round_double_to_bits<8, 23>(value));
}

}  // namespace dr2net
