#pragma once
//! \file
//! How a device ViT function lays out its saved internals inside the T-typed scratch the block
//! hands it: the LayerNorm statistics first (mean and rstd in the accumulation type, so bf16
//! and fp16 functions keep them in fp32), then each tensor, every region starting on a
//! 256-byte boundary relative to the start; the total is a whole number of 256-byte units too,
//! so consecutive modules' saved slices in a standard-mode arena stay aligned for cuBLASLt.

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cstddef>

#include "dr2net/modules/cuda/types.cuh"

namespace dr2net::cuda_detail {

template <class T>
struct SavedLayoutBuilder {
  static constexpr std::size_t kUnit = 256 / sizeof(T);  //!< elements of T per 256 bytes
  std::size_t next = 0;
  //! Reserves `elements` of T; returns the region's offset.
  std::size_t take(std::size_t elements) {
    const std::size_t at = next;
    next = round_up(next + elements, kUnit);
    return at;
  }
  //! Reserves `count` values of the accumulation type.
  std::size_t take_acc(std::size_t count) { return take((count * sizeof(acc_t<T>) + sizeof(T) - 1) / sizeof(T)); }
  std::size_t total() const { return next; }
};

}  // namespace dr2net::cuda_detail
