#pragma once
//! \file
//! When device_gemm may hand a bias vector to cuBLASLt's BIAS epilogue: the epilogue reads the
//! bias with 16-byte accesses, so its address must be a multiple of 16 bytes; element alignment
//! (4 bytes for fp32, 2 for bf16) is not enough. A bias that fails the rule goes device_gemm's
//! fallback way (bias + beta C written first, then a plain GEMM): the same result, one more
//! pass. Plain C++, so the rule is checked on the host.

#include <cstdint>

namespace dr2net::cuda_detail {

//! Bytes of alignment the cuBLASLt BIAS epilogue needs of the bias pointer.
inline constexpr std::uint32_t kLtBiasAlignment = 16;

//! Largest power of two (at most 256) that divides `address`: what a pointer's alignment is.
inline std::uint32_t address_alignment(std::uintptr_t address) noexcept {
  std::uint32_t al = 256;
  while (al > 1 && address % al != 0) al >>= 1;
  return al;
}

//! Whether a bias whose address has `alignment_bytes` of alignment may use the epilogue.
inline bool lt_bias_alignment_ok(std::uint32_t alignment_bytes) noexcept { return alignment_bytes >= kLtBiasAlignment; }

//! Whether device_gemm may give `bias` to the epilogue: true for a null bias (no epilogue is
//! asked for, nothing to read), otherwise when its address is a multiple of 16 bytes.
inline bool lt_bias_pointer_ok(const void* bias) noexcept {
  return bias == nullptr || lt_bias_alignment_ok(address_alignment(reinterpret_cast<std::uintptr_t>(bias)));
}

}  // namespace dr2net::cuda_detail
