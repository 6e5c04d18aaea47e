#pragma once
//! \file
//! Drop-path (stochastic depth) and dropout masks from Philox, replayable without state.
//!
//! Drop-path keeps each sample b of the function's output with probability 1 - p_path and
//! scales the kept ones by 1/(1 - p_path) (timm's DropPath); dropout does the same per
//! element with p_drop. Both draw from the Philox stream of (seed, step, module, purpose)
//! (see core/philox.hpp): the decision for element i is a pure function of those and i, so
//! the reversible backward's recomputation, the backward's gradient masking and a device
//! kernel all see the same mask.
//!
//!   keep_i = (bits_i >> 8) < round((1 - p) * 2^24)       (integer test: no float ties)
//!   out_i  = f_i * [keep_path(b(i))] / (1 - p_path) * [keep_drop(i)] / (1 - p_drop)
//!
//! with bits of the drop-path stream at index o + b(i), b(i) = i / sample_elements (the sample),
//! and of the dropout stream at index o * sample_elements + i (the element), as core/philox.hpp
//! lays them out. o is the global index of the call's first sample (ModuleCall::sample_offset,
//! 0 in one process): a data-parallel rank holding samples [o, o + B) of a global batch draws
//! exactly the masks one process draws for those samples of the whole batch.
//!
//! What it costs. A Philox evaluation (10 rounds) is far more work than the multiply it gates,
//! so DropScale avoids evaluations that give nothing new; the values stay the formula's:
//!  - drop-path is one decision per sample, but an elementwise kernel's thread cannot carry a
//!    sample's decision from one element to the next (consecutive elements of a grid-stride
//!    loop belong to different threads). make_drop_scale therefore evaluates the decisions of
//!    the first kDropPathCachedSamples samples once, on the host, and carries them as a 256-bit
//!    mask in the DropScale value the kernel receives: a sample's decision is then a bit test
//!    on host and device alike. Samples beyond that draw from the stream per element, as before.
//!  - dropout needs one word per element and an evaluation yields four (consecutive indices):
//!    operator()(i) evaluates one block per element; factors<N>(first, out) evaluates one per
//!    group of four of N consecutive elements and decides drop-path once when they share a
//!    sample: what a vectorised kernel (N elements per thread) calls.

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "dr2net/block/residual_function.hpp"
#include "dr2net/core/config.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/philox.hpp"

namespace dr2net {

//! Throws unless p is a drop rate in [0, 1); `what` and `owner` name it in the message.
inline void check_drop_rate(double p, const char* what, const char* owner) {
  DR2NET_CHECK(std::isfinite(p) && p >= 0.0 && p < 1.0, owner, ": ", what, " must lie in [0, 1), got ", p);
}

//! The 24-bit keep threshold of drop rate p: an element is kept iff (bits >> 8) < threshold.
inline std::uint32_t keep_threshold(double p) {
  return static_cast<std::uint32_t>(std::llround((1.0 - p) * 16777216.0));
}

//! The keep decision shared by host and device.
DR2NET_HD_INLINE bool keep_element(std::uint32_t bits, std::uint32_t threshold) { return (bits >> 8) < threshold; }

//! Samples whose drop-path decisions a DropScale from make_drop_scale carries as a bit mask.
inline constexpr std::uint64_t kDropPathCachedSamples = 256;

//! The factor each output element is multiplied by: 0 for dropped elements, the inverse
//! keep probabilities otherwise. Evaluated per element (operator()) or per run of consecutive
//! elements (factors()) on host and device alike, with the same result.
template <class T>
struct DropScale {
  PhiloxStream path_stream{};     //!< one draw per sample
  PhiloxStream element_stream{};  //!< one draw per element
  std::uint64_t sample_elements = 1;  //!< elements per sample: sample of element i is i / sample_elements
  //! path_threshold: keep_threshold(p_path), the 24-bit test a sample's draw must pass.
  std::uint32_t path_threshold = 0, element_threshold = 0;  //!< element_threshold: keep_threshold(p_drop), per element
  //! path_scale: 1/(1 - p_path), the factor of the elements of a kept sample.
  T path_scale = T(1), element_scale = T(1);  //!< element_scale: 1/(1 - p_drop), the factor of a kept element
  //! path: whether drop-path applies (training with p_path > 0).
  bool path = false, element = false;  //!< element: whether dropout applies (training with p_drop > 0)
  //! The drop-path decisions of samples 0 .. path_cached - 1, bit b % 64 of word b / 64 set when
  //! sample b is kept: keep_element(path_stream.bits(b), path_threshold), evaluated once by
  //! make_drop_scale. Samples from path_cached on are decided from the stream.
  std::uint64_t path_keep[4] = {0, 0, 0, 0};
  std::uint64_t path_cached = 0;  //!< samples path_keep covers: 0 (none) or kDropPathCachedSamples
  //! Global index of local sample 0: sample b draws at index sample_offset + b of path_stream.
  std::uint64_t sample_offset = 0;
  //! Global index of local element 0: element i draws at index element_offset + i of element_stream.
  std::uint64_t element_offset = 0;

  //! Whether any mask applies (false at inference and at rate 0: then the factor is 1).
  DR2NET_HD_INLINE bool active() const { return path || element; }

  //! Whether local sample `b` survives drop-path: keep_element(path_stream.bits(sample_offset +
  //! b), path_threshold), a bit of path_keep for the first path_cached samples.
  DR2NET_HD_INLINE bool keep_sample(std::uint64_t b) const {
    static_assert(kDropPathCachedSamples == 256, "path_keep holds four 64-bit words");
    if (b < path_cached) {
      // Constant indices only (selects): the mask stays in registers or parameter space.
      const std::uint64_t even = (b & 64u) != 0 ? path_keep[1] : path_keep[0];
      const std::uint64_t odd = (b & 64u) != 0 ? path_keep[3] : path_keep[2];
      return (((b & 128u) != 0 ? odd : even) >> (b & 63u) & 1u) != 0;
    }
    return keep_element(path_stream.bits(sample_offset + b), path_threshold);
  }

  //! The factor of flat element `i` of the output (row-major over [B, ...], so its sample is
  //! i / sample_elements): 0 when its sample or the element itself is dropped, otherwise the
  //! product of the active scales. Pure in (streams, i): forward, recomputation and backward agree.
  DR2NET_HD_INLINE T operator()(std::uint64_t i) const {
    T f = T(1);
    if (path) {
      if (!keep_sample(i / sample_elements)) return T(0);
      f = path_scale;
    }
    if (element) {
      if (!keep_element(element_stream.bits(element_offset + i), element_threshold)) return T(0);
      f *= element_scale;
    }
    return f;
  }

  //! out[j] = (*this)(first + j) for j < N, bit for bit, with one Philox evaluation per group
  //! of four consecutive indices (not one per element) and one drop-path decision when the N
  //! elements share a sample: the form for a thread that handles N consecutive elements.
  template <int N>
  DR2NET_HD_INLINE void factors(std::uint64_t first, T (&out)[N]) const {
    static_assert(N > 0, "factors of at least one element");
    for (int j = 0; j < N; ++j) out[j] = T(1);
    if (path) {
      const std::uint64_t b0 = first / sample_elements;
      if (b0 == (first + static_cast<std::uint64_t>(N - 1)) / sample_elements) {
        const T p = keep_sample(b0) ? path_scale : T(0);
        for (int j = 0; j < N; ++j) out[j] = p;
      } else {
        for (int j = 0; j < N; ++j)
          out[j] = keep_sample((first + static_cast<std::uint64_t>(j)) / sample_elements) ? path_scale : T(0);
      }
    }
    if (element) {
      const std::uint64_t start = element_offset + first;
      std::uint64_t group = start >> 2;
      PhiloxBlock block = element_stream.block(group);
      for (int j = 0; j < N; ++j) {
        const std::uint64_t i = start + static_cast<std::uint64_t>(j);
        if ((i >> 2) != group) {
          group = i >> 2;
          block = element_stream.block(group);
        }
        const bool keep = keep_element(philox_word(block, static_cast<std::uint32_t>(i & 3u)), element_threshold);
        out[j] = keep ? out[j] * element_scale : T(0);  // a dropped sample's 0 stays 0
      }
    }
  }
};

//! The masks of one call of a residual function: drop-path with rate `drop_path` over samples
//! of `sample_elements` elements, and dropout with rate `dropout` drawn for `purpose`, keyed
//! by the global sample index (call.sample_offset + local sample): `sample_elements` must be
//! the masked tensor's elements per sample whenever drop-path applies or the call has a
//! sample offset. Inactive (factor 1) when the call is not training or both rates are 0.
template <class T, class Ctx>
DropScale<T> make_drop_scale(const ModuleCall<Ctx>& call, double drop_path, double dropout, RandomPurpose purpose,
                             std::uint64_t sample_elements) {
  DropScale<T> s;
  if (!call.training) return s;
  DR2NET_CHECK(call.module >= 0 && static_cast<std::uint64_t>(call.module) <= kMaxRandomModule,
               "module index ", call.module, " is outside the random stream layout's range [0, ", kMaxRandomModule, "]");
  DR2NET_CHECK(sample_elements > 0, "drop-path needs a positive number of elements per sample");
  const auto module = static_cast<std::uint32_t>(call.module);
  if (drop_path > 0) {
    s.path = true;
    s.path_stream = make_philox_stream(call.seed, call.step, module, RandomPurpose::DropPath);
    s.path_threshold = keep_threshold(drop_path);
    s.path_scale = static_cast<T>(1.0 / (1.0 - drop_path));
    s.sample_elements = sample_elements;
    s.sample_offset = call.sample_offset;
    // The first samples' decisions, once (four per Philox evaluation), instead of once per element.
    std::uint64_t group = (call.sample_offset >> 2) + 1;  // none evaluated yet
    PhiloxBlock block{};
    for (std::uint64_t b = 0; b < kDropPathCachedSamples; ++b) {
      const std::uint64_t global = call.sample_offset + b;
      if ((global >> 2) != group) {
        group = global >> 2;
        block = s.path_stream.block(group);
      }
      if (keep_element(philox_word(block, static_cast<std::uint32_t>(global & 3u)), s.path_threshold))
        s.path_keep[b / 64] |= std::uint64_t{1} << (b % 64);
    }
    s.path_cached = kDropPathCachedSamples;
  }
  if (dropout > 0) {
    s.element = true;
    s.element_stream = make_philox_stream(call.seed, call.step, module, purpose);
    s.element_threshold = keep_threshold(dropout);
    s.element_scale = static_cast<T>(1.0 / (1.0 - dropout));
    DR2NET_CHECK(call.sample_offset == 0 || sample_elements <= ~std::uint64_t{0} / call.sample_offset,
                 "module ", call.module, ": sample offset ", call.sample_offset, " times ", sample_elements,
                 " elements per sample overflows the dropout stream's 64-bit element index");
    s.element_offset = call.sample_offset * sample_elements;
  }
  return s;
}

//! Whether no output mask applies in this call (inference, or both rates zero): then a
//! function may add its output into a destination (ResidualFunction's adds-into members).
template <class Ctx>
bool output_unmasked(const ModuleCall<Ctx>& call, double drop_path, double dropout) {
  return !call.training || (drop_path <= 0 && dropout <= 0);
}

}  // namespace dr2net
