#pragma once
//! \file
//! What the reconstruction monitor reports after each backward, and the guard that acts on it.

#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <string_view>

namespace dr2net {

//! The error of the activations a backward reconstructed, measured at no extra activation
//! memory: the stack reconstructs (x_0, y_0) anyway and compares them with h0 (the caller's,
//! or a strided sample of it kept in forward), error-bounded mode compares its reconstructions
//! with the stream snapshots it stored, and exact mode compares 64-bit checksums bit for bit.
//! Each stack keeps its own report (ReversibleStack::reconstruction()).
//!
//! `measured` is false when nothing could be compared (standard mode, or the first module was
//! not reversible at this step); the error fields are then NaN, never 0, so no threshold test
//! passes on a report that measured nothing.
struct ReconstructionReport {
  std::int64_t step = -1;         //!< step of the backward that reported; -1 before any
  bool measured = false;          //!< relative_error / max_abs_error hold a measurement
  bool exact = false;             //!< fixed-point streams: compared bit for bit by checksum
  bool input_compared = false;    //!< compared with the full h0 the caller passed to backward()
  bool sampled = false;           //!< compared with the strided sample of h0 kept in forward
  std::size_t compared_elements = 0;  //!< elements of each stream compared against h0
  double max_abs_error = std::numeric_limits<double>::quiet_NaN();   //!< max |reconstructed - h0| over both streams
  double relative_error = std::numeric_limits<double>::quiet_NaN();  //!< max_abs_error / max |h0|
  int snapshots = 0;              //!< stream snapshots stored (error-bounded mode)
  int measured_boundaries = 0;    //!< snapshot boundaries where the reconstruction was compared
  double max_boundary_relative_error = std::numeric_limits<double>::quiet_NaN();  //!< worst there (NaN: none)
  double error_scale = 0;         //!< error-bounded mode: the controller's constant after this step
  bool fell_back = false;         //!< the guard redid this step in error-bounded mode (GuardAction::Fallback)

  //! The worst relative error measured (at h0 and at boundaries); NaN when nothing was measured.
  double worst_relative_error() const {
    double w = std::numeric_limits<double>::quiet_NaN();
    if (measured) w = relative_error;
    if (measured_boundaries > 0 && !(w >= max_boundary_relative_error)) w = max_boundary_relative_error;
    return w;
  }

  //! "not measured", "exact (bit for bit)" or the errors, for logs.
  std::string describe() const {
    if (!measured && measured_boundaries == 0) return "not measured";
    if (exact) return "exact (bit for bit)";
    char buf[200];
    int len = 0;
    if (measured && !(relative_error - relative_error == 0))
      len = std::snprintf(buf, sizeof buf, "relative error not finite (the reconstruction blew up)");
    else if (measured)
      len = std::snprintf(buf, sizeof buf, "relative error %.17g%s", relative_error,
                          input_compared ? " vs h0" : (sampled ? " vs a sample of h0" : ""));
    else
      len = std::snprintf(buf, sizeof buf, "input not measured");
    if (measured_boundaries > 0 && len >= 0 && static_cast<std::size_t>(len) < sizeof buf)
      std::snprintf(buf + len, sizeof buf - static_cast<std::size_t>(len), ", %d snapshot(s), worst boundary %.17g",
                    snapshots, max_boundary_relative_error);
    return buf;
  }
};

//! What the stack does when a reversible backward's measured reconstruction error exceeds the
//! guard's threshold or is not finite.
enum class GuardAction {
  Throw,     //!< raise dr2net::Error (the default): the gradients of this step are not to be trusted
  Warn,      //!< call ReconstructionGuard::warn (default: print to stderr) and go on
  Fallback,  //!< redo the step in error-bounded mode from a copy of h0 and of the parameter
             //!< gradients kept for that purpose (one stream and one gradient set more memory)
};

//! The action's lower-case name for logs and JSON: "throw", "warn" or "fallback"
//! ("unknown" for a value outside the enumeration).
inline constexpr std::string_view guard_action_name(GuardAction a) {
  switch (a) {
    case GuardAction::Throw: return "throw";
    case GuardAction::Warn: return "warn";
    case GuardAction::Fallback: return "fallback";
  }
  return "unknown";
}

//! The reconstruction guard of StackOptions.
struct ReconstructionGuard {
  //! Largest acceptable worst relative reconstruction error of the streams (ReconstructionReport::
  //! worst_relative_error). Exact mode never needs it: a mismatch there is always an error.
  double max_relative_error = 1e-4;
  GuardAction action = GuardAction::Throw;  //!< what happens on an error above the threshold or not finite
  //! Receives the message under GuardAction::Warn; empty: print it to stderr.
  std::function<void(std::string_view)> warn{};
};

}  // namespace dr2net
