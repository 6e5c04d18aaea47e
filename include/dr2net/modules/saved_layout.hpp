#pragma once
//! \file
//! How a residual function lays out its saved internals inside the T-typed scratch the block
//! hands it: regions taken in order (the LayerNorm statistics in accumulate_t<T>, so bf16 and
//! fp16 functions keep them in fp32), every size a checked product (an overflow is an error
//! naming the function, the region and its factors, never a wrapped, under-allocated size).
//! On a device backend every region starts on a 256-byte boundary relative to the start and
//! the total is a whole number of 256-byte units, so the regions stay aligned for cuBLASLt
//! (the stack aligns each function's slice, see block/stack.hpp); on the host regions are
//! packed (the host needs no more than element alignment).

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string_view>

#include "dr2net/core/checked.hpp"
#include "dr2net/core/compute_type.hpp"
#include "dr2net/modules/parameter.hpp"

namespace dr2net {

//! Offsets of the saved regions of a function computing in T on backend Ctx.
template <class T, class Ctx>
struct SavedLayoutBuilder {
  //! Elements of T per alignment unit: 1 on the host, 256 bytes' worth on a device.
  static constexpr std::size_t kUnit = is_host_context_v<Ctx> ? 1 : (256 / sizeof(T) > 0 ? 256 / sizeof(T) : 1);
  //! `owner` (a literal) names the function in errors.
  explicit SavedLayoutBuilder(std::string_view owner) : regions(owner, static_cast<std::int64_t>(kUnit)) {}
  //! Reserves product(factors) elements of T; returns the region's offset. `region` names it.
  std::size_t take(std::initializer_list<std::int64_t> factors, std::string_view region) {
    return static_cast<std::size_t>(regions.take(factors, region));
  }
  //! Reserves `count` values of accumulate_t<T> (count elements on the host).
  std::size_t take_acc(std::int64_t count, std::string_view region) {
    static_assert(sizeof(accumulate_t<T>) % sizeof(T) == 0, "the accumulation type is a whole number of T");
    return take({count, static_cast<std::int64_t>(sizeof(accumulate_t<T>) / sizeof(T))}, region);
  }
  //! Elements of T of every region taken so far (rounded up to the unit).
  std::size_t total() const { return static_cast<std::size_t>(regions.total()); }
  checked::RegionLayout regions;  //!< the checked offsets
};

}  // namespace dr2net
