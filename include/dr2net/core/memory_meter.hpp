#pragma once
//! \file
//! Byte accounting by category: what the library measures instead of guessing.

#include <array>
#include <cstddef>
#include <cstdio>
#include <iterator>
#include <string>
#include <string_view>

#include "dr2net/core/error.hpp"

namespace dr2net {

//! What an allocation holds. Streams, Scratch, SavedActivations and SideBits are activation memory.
enum class MemoryCategory : int {
  Streams = 0,       //!< the two stream buffers and their two gradient buffers
  Scratch,           //!< one residual function's output and internals, reused module after module
  SavedActivations,  //!< per-module state kept from forward to backward (standard mode, snapshots)
  Parameters,        //!< weights
  Gradients,         //!< parameter gradients
  Other,             //!< anything else a context allocates (workspaces, staging)
  SideBits,          //!< exact mode: the bits each fixed-point module's beta-term loses (activation memory)
};
//! Number of MemoryCategory values; categories are numbered 0..kMemoryCategoryCount-1.
inline constexpr std::size_t kMemoryCategoryCount = 7;

//! Lower-case name of a category as it appears in report() and in benchmark JSON ("streams",
//! "saved_activations", ...); "unknown" for a value outside the enum.
inline constexpr std::string_view category_name(MemoryCategory c) {
  switch (c) {
    case MemoryCategory::Streams: return "streams";
    case MemoryCategory::Scratch: return "scratch";
    case MemoryCategory::SavedActivations: return "saved_activations";
    case MemoryCategory::Parameters: return "parameters";
    case MemoryCategory::Gradients: return "gradients";
    case MemoryCategory::Other: return "other";
    case MemoryCategory::SideBits: return "side_bits";
  }
  return "unknown";
}

//! True for the categories counted as activation memory: Streams, Scratch, SavedActivations and
//! SideBits (not Parameters, Gradients or Other).
inline constexpr bool is_activation(MemoryCategory c) {
  return c == MemoryCategory::Streams || c == MemoryCategory::Scratch ||
         c == MemoryCategory::SavedActivations || c == MemoryCategory::SideBits;
}

//! Current and peak bytes per category, plus peaks of the activation sum and the total.
//! Peaks of sums are tracked as sums, not added from per-category peaks.
//! Not synchronised: one meter belongs to one context and is updated from the host thread that
//! allocates through it.
class MemoryMeter {
 public:
  //! Records `bytes` newly held in category `c` and raises the peaks it exceeds.
  void add(MemoryCategory c, std::size_t bytes) {
    auto& cur = current_[index(c)];
    cur += bytes;
    if (cur > peak_[index(c)]) peak_[index(c)] = cur;
    total_ += bytes;
    if (total_ > peak_total_) peak_total_ = total_;
    if (is_activation(c)) {
      activation_ += bytes;
      if (activation_ > peak_activation_) peak_activation_ = activation_;
    }
  }

  //! Records `bytes` of category `c` released. Throws dr2net::Error (and changes nothing) when more
  //! bytes are released than the category currently holds, which would mean a double free.
  void remove(MemoryCategory c, std::size_t bytes) {
    auto& cur = current_[index(c)];
    DR2NET_CHECK(bytes <= cur, "memory meter: releasing ", bytes, " bytes of ", category_name(c),
                 " but only ", cur, " are recorded");
    cur -= bytes;
    total_ -= bytes;
    if (is_activation(c)) activation_ -= bytes;
  }

  //! Bytes of category `c` held now.
  std::size_t current(MemoryCategory c) const { return current_[index(c)]; }
  //! Most bytes category `c` held at once since construction or the last reset_peaks().
  std::size_t peak(MemoryCategory c) const { return peak_[index(c)]; }
  //! Bytes held now over all categories.
  std::size_t current_total() const { return total_; }
  //! Most bytes held at once over all categories (the peak of the sum, not the sum of peaks).
  std::size_t peak_total() const { return peak_total_; }
  //! Activation bytes held now (the categories for which is_activation() is true).
  std::size_t current_activation() const { return activation_; }
  //! Most activation bytes held at once: the figure the reversible modes keep flat across depth.
  std::size_t peak_activation() const { return peak_activation_; }

  //! Starts a new measurement window: peaks become the current values.
  void reset_peaks() {
    peak_ = current_;
    peak_total_ = total_;
    peak_activation_ = activation_;
  }

  //! One line per category: "streams: current 1.00 MiB, peak 2.00 MiB".
  std::string report() const {
    std::string s;
    for (std::size_t i = 0; i < kMemoryCategoryCount; ++i) {
      s += std::string(category_name(static_cast<MemoryCategory>(i))) + ": current " +
           human_bytes(current_[i]) + ", peak " + human_bytes(peak_[i]) + "\n";
    }
    s += "activation: current " + human_bytes(activation_) + ", peak " + human_bytes(peak_activation_) + "\n";
    s += "total: current " + human_bytes(total_) + ", peak " + human_bytes(peak_total_) + "\n";
    return s;
  }
  //! Bytes in the largest unit that keeps the number at least 1, three significant digits:
  //! "512 B", "1.50 KiB", "10.0 MiB", "123 GiB".
  static std::string human_bytes(std::size_t bytes) {
    static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = static_cast<double>(bytes);
    std::size_t u = 0;
    while (v >= 1024.0 && u + 1 < std::size(kUnits)) {
      v /= 1024.0;
      ++u;
    }
    if (u == 0) return std::to_string(bytes) + " B";
    char buf[32];
    const int decimals = v < 10 ? 2 : v < 100 ? 1 : 0;
    std::snprintf(buf, sizeof buf, "%.*f %s", decimals, v, kUnits[u]);
    return buf;
  }
  //! Bytes in MiB with two decimals.
  static std::string mib(std::size_t bytes) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.2f MiB", static_cast<double>(bytes) / (1024.0 * 1024.0));
    return buf;
  }

 private:
  static std::size_t index(MemoryCategory c) { return static_cast<std::size_t>(c); }

  std::array<std::size_t, kMemoryCategoryCount> current_{};
  std::array<std::size_t, kMemoryCategoryCount> peak_{};
  std::size_t total_ = 0, peak_total_ = 0;
  std::size_t activation_ = 0, peak_activation_ = 0;
};

//! Records bytes that something else owns (a functor's weights) for as long as it lives.
class MeterReservation {
 public:
  //! Holds nothing and records nothing; bytes() is 0.
  MeterReservation() = default;
  //! Adds `bytes` to category `c` of `meter` now and removes them on destruction. `meter` must
  //! outlive the reservation (and every reservation it is moved into).
  MeterReservation(MemoryMeter& meter, MemoryCategory c, std::size_t bytes)
      : meter_(&meter), category_(c), bytes_(bytes) {
    meter_->add(c, bytes);
  }
  //! Takes over `o`'s bytes; `o` then holds nothing. The meter is not touched.
  MeterReservation(MeterReservation&& o) noexcept
      : meter_(o.meter_), category_(o.category_), bytes_(o.bytes_) {
    o.meter_ = nullptr;
  }
  //! Releases this reservation's bytes, then takes over `o`'s; `o` then holds nothing.
  MeterReservation& operator=(MeterReservation&& o) noexcept {
    if (this != &o) {
      release();
      meter_ = o.meter_;
      category_ = o.category_;
      bytes_ = o.bytes_;
      o.meter_ = nullptr;
    }
    return *this;
  }
  MeterReservation(const MeterReservation&) = delete;
  MeterReservation& operator=(const MeterReservation&) = delete;
  ~MeterReservation() { release(); }

  //! Bytes recorded by this reservation; 0 when default-constructed or moved from.
  std::size_t bytes() const noexcept { return meter_ ? bytes_ : 0; }

 private:
  void release() noexcept {
    if (meter_) meter_->remove(category_, bytes_);
    meter_ = nullptr;
  }
  MemoryMeter* meter_ = nullptr;
  MemoryCategory category_ = MemoryCategory::Other;
  std::size_t bytes_ = 0;
};

}  // namespace dr2net
