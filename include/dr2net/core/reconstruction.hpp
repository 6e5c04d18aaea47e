#pragma once
//! \file
//! What the reconstruction monitor reports after each reversible backward.

#include <cstdint>

namespace dr2net {

//! The error of the activations a reversible backward reconstructed, measured for free: the
//! stack reconstructs (x_0, y_0) anyway, and error-bounded mode compares its reconstructions
//! with the stream snapshots it stored. Reported through the context after every backward.
struct ReconstructionReport {
  std::int64_t step = -1;          //!< step of the backward that reported; -1 before any
  bool input_compared = false;     //!< the caller passed h0: the fields below are vs the true input
  double max_abs_error = 0;        //!< max over both streams of |reconstructed - h0|
  double relative_error = 0;       //!< max_abs_error / max |h0|
  int snapshots = 0;               //!< stream snapshots stored (error-bounded mode)
  int measured_boundaries = 0;     //!< snapshot boundaries where the reconstruction was compared
  double max_boundary_relative_error = 0;  //!< worst relative error at those boundaries
  double error_scale = 0;          //!< error-bounded mode: the controller's constant after this step
};

}  // namespace dr2net
