#pragma once
//! \file
//! How a device ViT function lays out its saved internals inside the T-typed scratch the block
//! hands it: the LayerNorm statistics first (mean and rstd in the accumulation type, so bf16
//! and fp16 functions keep them in fp32), then each tensor, every region starting on a
//! 256-byte boundary relative to the start; the total is a whole number of 256-byte units too,
//! so consecutive modules' saved slices in a standard-mode arena stay aligned for cuBLASLt.
//! Every size is a checked product (checked::RegionLayout): an overflow is an error naming the
//! function, the region and its factors, never a wrapped, under-allocated size.

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string_view>

#include "dr2net/core/checked.hpp"
#include "dr2net/modules/cuda/types.cuh"

namespace dr2net::cuda_detail {

template <class T>
struct SavedLayoutBuilder {
  static constexpr std::size_t kUnit = 256 / sizeof(T);  //!< elements of T per 256 bytes
  //! `owner` (a literal) names the function in errors.
  explicit SavedLayoutBuilder(std::string_view owner) : regions(owner, static_cast<std::int64_t>(kUnit)) {}
  //! Reserves product(factors) elements of T; returns the region's offset. `region` names it.
  std::size_t take(std::initializer_list<std::int64_t> factors, std::string_view region) {
    return static_cast<std::size_t>(regions.take(factors, region));
  }
  //! Reserves `count` values of the accumulation type.
  std::size_t take_acc(std::int64_t count, std::string_view region) {
    static_assert(sizeof(acc_t<T>) % sizeof(T) == 0, "the accumulation type is a whole number of T");
    return take({count, static_cast<std::int64_t>(sizeof(acc_t<T>) / sizeof(T))}, region);
  }
  std::size_t total() const { return static_cast<std::size_t>(regions.total()); }
  checked::RegionLayout regions;
};

}  // namespace dr2net::cuda_detail
