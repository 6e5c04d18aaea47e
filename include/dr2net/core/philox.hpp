#pragma once
//! \file
//! Philox4x32-10: the counter-based random number generator of Salmon et al. ("Parallel
//! random numbers: as easy as 1, 2, 3", SC'11), and the layout dr2net uses to key it.
//!
//! A counter-based generator is a pure function bits = philox(counter, key). Nothing is
//! stored between calls, so the recomputation of a residual function in the reversible
//! backward reproduces the forward's dropout and drop-path masks exactly, and a CUDA kernel
//! computing element i reproduces the host's element i bit for bit. Everything here is
//! fixed-width integer arithmetic in DR2NET_HD_INLINE functions, usable in device code.
//!
//! Stream layout (what keys the random value of element `index` of a module's draw):
//!
//!   key     = { seed & 0xffffffff,  (seed >> 32) ^ (step >> 32) }
//!   counter = { (index / 4) & 0xffffffff,  (index / 4) >> 32,  module * 8 + purpose,  step & 0xffffffff }
//!   bits    = philox4x32_10(counter, key).v[index % 4]
//!   uniform = (bits >> 8) * 2^-24                                   (in [0, 1), exact in float)
//!
//! - seed: the stack's seed (StackOptions::seed). step: the training step (>= 0); its high
//!   32 bits are folded into the key so that the counter keeps 32 bits for it.
//! - module: the residual function's index in the stack (layer l: 2l, 2l+1), < 2^29.
//! - purpose: which draw of that module (RandomPurpose), < 8.
//! - index: the element (dropout) or sample (drop-path) index; consecutive groups of four
//!   indices share one Philox call and take its four output words in order.
//! Distinct (step, module, purpose, index) under one seed therefore never share a counter.
//!
//! Cost: one evaluation is 10 rounds of two 32x32->64 multiplications. bits(index) evaluates
//! the whole block for one word; a caller that needs four consecutive indices calls block()
//! once and takes the words with philox_word(), whose constant-index selects keep the block
//! in registers on the device (an array indexed by a run-time value goes to local memory).

#include <cstdint>

#include "dr2net/core/config.hpp"

namespace dr2net {

//! Four 32-bit words: a Philox counter or one output block.
struct PhiloxBlock {
  std::uint32_t v[4];  //!< words 0..3; as a counter: {index/4 low, index/4 high, module*8 + purpose, step low}
};

//! The two 32-bit words of a Philox4x32 key.
struct PhiloxKey {
  std::uint32_t v[2];  //!< {seed low 32 bits, seed high 32 bits ^ step high 32 bits}
};

namespace detail {

inline constexpr std::uint32_t kPhiloxM0 = 0xD2511F53u;  //!< multiplier of words 0 and 1
inline constexpr std::uint32_t kPhiloxM1 = 0xCD9E8D57u;  //!< multiplier of words 2 and 3
inline constexpr std::uint32_t kPhiloxW0 = 0x9E3779B9u;  //!< key bump (golden ratio)
inline constexpr std::uint32_t kPhiloxW1 = 0xBB67AE85u;  //!< key bump (sqrt(3) - 1)

//! hi:lo = a * b as a full 64-bit product.
DR2NET_HD_INLINE std::uint32_t mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t& hi) {
  const std::uint64_t p = static_cast<std::uint64_t>(a) * static_cast<std::uint64_t>(b);
  hi = static_cast<std::uint32_t>(p >> 32);
  return static_cast<std::uint32_t>(p);
}

//! One Philox round: two multiplications, the high halves xored with the other words and the key.
DR2NET_HD_INLINE PhiloxBlock philox_round(const PhiloxBlock& c, const PhiloxKey& k) {
  std::uint32_t hi0 = 0, hi1 = 0;
  const std::uint32_t lo0 = mulhilo32(kPhiloxM0, c.v[0], hi0);
  const std::uint32_t lo1 = mulhilo32(kPhiloxM1, c.v[2], hi1);
  return PhiloxBlock{{hi1 ^ c.v[1] ^ k.v[0], lo1, hi0 ^ c.v[3] ^ k.v[1], lo0}};
}

}  // namespace detail

//! Philox4x32 with 10 rounds; the key is bumped by the Weyl constants between rounds.
DR2NET_HD_INLINE PhiloxBlock philox4x32_10(PhiloxBlock counter, PhiloxKey key) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key.v[0] += detail::kPhiloxW0;
      key.v[1] += detail::kPhiloxW1;
    }
    counter = detail::philox_round(counter, key);
  }
  return counter;
}

//! Word `lane` (0..3; only its two low bits are read) of `b`: b.v[lane & 3], chosen with
//! constant indices (selects, not an indexed load) so that `b` stays in registers on the device.
DR2NET_HD_INLINE std::uint32_t philox_word(const PhiloxBlock& b, std::uint32_t lane) {
  const std::uint32_t even = (lane & 1u) != 0 ? b.v[1] : b.v[0];
  const std::uint32_t odd = (lane & 1u) != 0 ? b.v[3] : b.v[2];
  return (lane & 2u) != 0 ? odd : even;
}

//! What a module draws random numbers for; part of the counter (module * 8 + purpose).
enum class RandomPurpose : std::uint32_t {
  DropPath = 0,          //!< stochastic depth: one draw per sample
  OutputDropout = 1,     //!< dropout on the function's output (timm proj_drop, Mlp drop2)
  HiddenDropout = 2,     //!< dropout inside the function (timm Mlp drop1, after the activation)
  AttentionDropout = 3,  //!< reserved: dropout on attention probabilities
  Init = 7,              //!< parameter initialisation (module = tensor tag)
};

//! Largest module index the layout can key (module * 8 + purpose must fit 32 bits).
inline constexpr std::uint32_t kMaxRandomModule = (1u << 29) - 1;

//! Everything but the index: one module's draw for one purpose at one step.
struct PhiloxStream {
  PhiloxKey key;                 //!< from the seed and the step's high bits (see the file comment)
  std::uint32_t module_purpose;  //!< counter word 2
  std::uint32_t step_low;        //!< counter word 3

  //! The 32 random bits of element `index`: word index % 4 of block(index / 4). One whole
  //! evaluation per call; block() serves four consecutive indices with one.
  DR2NET_HD_INLINE std::uint32_t bits(std::uint64_t index) const {
    return philox_word(block(index >> 2), static_cast<std::uint32_t>(index & 3u));
  }
  //! The four words of indices 4*group .. 4*group+3 at once (what a vectorised kernel uses).
  DR2NET_HD_INLINE PhiloxBlock block(std::uint64_t group) const {
    const PhiloxBlock counter{{static_cast<std::uint32_t>(group), static_cast<std::uint32_t>(group >> 32),
                               module_purpose, step_low}};
    return philox4x32_10(counter, key);
  }
};

//! The stream of (seed, step, module, purpose); see the file comment for the layout.
//! `module` must be at most kMaxRandomModule (callers on the host check it).
DR2NET_HD_INLINE PhiloxStream make_philox_stream(std::uint64_t seed, std::int64_t step, std::uint32_t module,
                                                 RandomPurpose purpose) {
  const auto ustep = static_cast<std::uint64_t>(step);
  return PhiloxStream{{{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>((seed >> 32) ^ (ustep >> 32))}},
                      (module * 8u) + static_cast<std::uint32_t>(purpose), static_cast<std::uint32_t>(ustep)};
}

//! The top 24 bits as a float in [0, 1): u = (bits >> 8) * 2^-24, exact, never 1.
DR2NET_HD_INLINE float uniform_from_bits(std::uint32_t bits) {
  return static_cast<float>(bits >> 8) * 5.9604644775390625e-08f;
}

//! The top 53 bits of two words as a double in [0, 1): u = (hi * 2^21 + (lo >> 11)) * 2^-53.
DR2NET_HD_INLINE double uniform53_from_bits(std::uint32_t hi, std::uint32_t lo) {
  const std::uint64_t m = (static_cast<std::uint64_t>(hi) << 21) | static_cast<std::uint64_t>(lo >> 11);
  return static_cast<double>(m) * 1.1102230246251565404236316680908203125e-16;
}

}  // namespace dr2net
