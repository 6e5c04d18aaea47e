// The largest batch whose metered peak fits a memory budget, for the GPU benchmark.
//
// The meter's peak is affine in the batch (every buffer is a fixed size plus a multiple of
// B), so it is measured at B = 1 and B = 2 and solved for the budget; the estimate is then
// run, stepping down while it does not fit, a few times at most. The answer is always a
// batch that ran and fit: when none of the tries fit (or B = 1 did not run, or the peaks do
// not grow with B), it is 0, "none found", never a batch that was not run.

#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace dr2net_bench {

//! What largest_fitting_batch found.
struct BatchSearch {
  std::int64_t largest_batch = 0;  //!< the batch that ran within the budget; 0: none found
  std::int64_t estimate = 0;       //!< the affine model's batch (0: no model)
  double bytes_per_sample = 0;     //!< peak(2) - peak(1)
  double fixed_bytes = 0;          //!< peak(1) - bytes_per_sample
  int tries = 0;                   //!< batches run after the two measurements
  bool found() const { return largest_batch > 0; }
};

//! Searches with `peak_of(batch)`: the metered peak bytes of one step at that batch, 0 when
//! it did not run (out of memory). Tries the estimate and at most `max_tries - 1` batches below.
template <class PeakOf>
BatchSearch largest_fitting_batch(PeakOf&& peak_of, std::size_t budget, int max_tries = 4) {
  BatchSearch r;
  const auto p1 = static_cast<double>(peak_of(std::int64_t{1}));
  const auto p2 = static_cast<double>(peak_of(std::int64_t{2}));
  if (p1 <= 0 || p2 <= p1) return r;
  r.bytes_per_sample = p2 - p1;
  r.fixed_bytes = p1 - r.bytes_per_sample;
  const double b = std::floor((static_cast<double>(budget) - r.fixed_bytes) / r.bytes_per_sample);
  if (!(b >= 1)) return r;
  r.estimate = b >= 9.0e18 ? std::int64_t{9'000'000'000'000'000'000} : static_cast<std::int64_t>(b);
  for (std::int64_t batch = r.estimate; batch > 0 && r.tries < max_tries; --batch) {
    ++r.tries;
    const std::size_t p = peak_of(batch);
    if (p > 0 && p <= budget) {
      r.largest_batch = batch;
      return r;
    }
  }
  return r;
}

}  // namespace dr2net_bench
