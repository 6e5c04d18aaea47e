#pragma once
//! \file
//! ReversibleStack: L Dr²Net layers trained with reversible, error-bounded or standard backprop.
//!
//! Memory plan (DESIGN §2). Reversible mode keeps two stream buffers in forward and four
//! (plus one module's workspace) in backward, whatever L is: activations are reconstructed
//! module by module from the output. Standard mode stores every module's input and its
//! function's saved internals: the baseline for memory, time and gradient checks.
//! Error-bounded mode is reversible mode plus a stream snapshot at chosen module boundaries,
//! so that reconstruction error never accumulates over more modules than the current
//! coefficients allow (see ErrorBoundOptions).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dr2net/block/reversible_dual_residual.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/reconstruction.hpp"
#include "dr2net/core/tensor.hpp"

namespace dr2net {

enum class BackpropMode {
  Reversible,    //!< store nothing per module; reconstruct activations in backward
  ErrorBounded,  //!< reversible, plus stream snapshots where predicted error would exceed a tolerance
  Standard,      //!< store every module's input and saved internals; no reconstruction
};

inline constexpr std::string_view mode_name(BackpropMode m) {
  switch (m) {
    case BackpropMode::Reversible: return "reversible";
    case BackpropMode::ErrorBounded: return "error-bounded";
    case BackpropMode::Standard: return "standard";
  }
  return "unknown";
}

enum class StackOutput {
  LastStream,     //!< out = y_N: exactly the pretrained network at (alpha, beta) = (1, 0)
  MeanOfStreams,  //!< out = (x_N + y_N) / 2
};

//! How error-bounded mode places snapshots. Reconstructing module m multiplies the error of
//! the streams by about g_m, the largest |root| of beta*l^2 + (|alpha| + lipschitz)*l - 1 = 0.
//! Walking down from the output, a snapshot is stored at boundary m as soon as the predicted
//! relative error there, error_scale * u * prod(g) (u: the larger unit roundoff of the stream
//! and compute types),
//! would exceed tolerance * reconstruction_budget. After every backward, error_scale is
//! corrected from the errors actually measured at the snapshot boundaries (and against h0
//! when the caller passes it): it rises at once to the worst measured ratio and decays slowly.
struct ErrorBoundOptions {
  double tolerance = 1e-5;              //!< target relative error of the gradients
  double reconstruction_budget = 0.3;   //!< allowed relative stream error, as a fraction of tolerance
  double lipschitz = 0.0;               //!< prior bound on |eigenvalues| of the functions' Jacobians
  double initial_error_scale = 8.0;     //!< error_scale before anything was measured
  double error_scale_decay = 0.7;       //!< per-step decay of error_scale toward what is measured
};

struct StackOptions {
  BackpropMode mode = BackpropMode::Reversible;
  StackOutput output = StackOutput::LastStream;
  std::uint64_t seed = 0;                    //!< handed to residual functions for randomness replay
  double min_abs_beta = kDefaultMinAbsBeta;  //!< reconstruction refuses |beta| below this
  ErrorBoundOptions error_bound{};
};

//! A parameter and its gradient under the stack's name for it ("blocks.3.f.weight").
template <class T>
struct NamedParameter {
  std::string name;
  TensorView<T> value;
  TensorView<T> grad;
};

//! Predicted per-module growth of reconstruction error at (alpha, beta): the largest |root| of
//! beta*l^2 + (|alpha| + lipschitz)*l - 1 = 0, an upper bound for either sign of beta.
//! Infinite when beta = 0 (not invertible).
inline double reconstruction_growth(Coefficients c, double lipschitz = 0.0) {
  const double b = std::abs(c.alpha) + lipschitz, beta = std::abs(c.beta);
  if (beta == 0) return std::numeric_limits<double>::infinity();
  return (b + std::sqrt(b * b + 4 * beta)) / (2 * beta);
}

template <class Block>
class ReversibleStack {
 public:
  using block_type = Block;
  using schedule_type = typename Block::schedule_type;
  using stream_type = typename Block::stream_type;
  using compute_type = typename Block::compute_type;
  using accumulate_type = typename Block::accumulate_type;
  using context_type = typename Block::context_type;

  ReversibleStack(context_type& ctx, std::vector<Block> layers, schedule_type schedule, StackOptions options = {})
      : ctx_(&ctx), layers_(std::move(layers)), schedule_(std::move(schedule)), options_(options) {
    DR2NET_CHECK(!layers_.empty(), "a stack needs at least one layer");
    DR2NET_CHECK(options.min_abs_beta > 0, "min_abs_beta must be positive, got ", options.min_abs_beta);
    const auto& eb = options.error_bound;
    DR2NET_CHECK(eb.tolerance > 0 && eb.reconstruction_budget > 0 && eb.lipschitz >= 0 &&
                     eb.initial_error_scale > 0 && eb.error_scale_decay > 0 && eb.error_scale_decay <= 1,
                 "invalid error-bound options: tolerance ", eb.tolerance, ", budget ", eb.reconstruction_budget,
                 ", lipschitz ", eb.lipschitz, ", initial scale ", eb.initial_error_scale, ", decay ",
                 eb.error_scale_decay);
    error_scale_ = eb.initial_error_scale;
    std::size_t bytes = 0;
    for_each_parameter([&](std::string_view, TensorView<compute_type> v, TensorView<compute_type>) {
      bytes += v.size() * sizeof(compute_type);
    });
    parameter_bytes_ = MeterReservation(ctx.meter(), MemoryCategory::Parameters, bytes);
    gradient_bytes_ = MeterReservation(ctx.meter(), MemoryCategory::Gradients, bytes);
  }

  int num_layers() const noexcept { return static_cast<int>(layers_.size()); }
  int num_modules() const noexcept { return 2 * num_layers(); }
  Block& layer(int i) { return layers_.at(static_cast<std::size_t>(i)); }
  schedule_type& schedule() noexcept { return schedule_; }
  const StackOptions& options() const noexcept { return options_; }
  context_type& context() noexcept { return *ctx_; }

  BackpropMode mode() const noexcept { return options_.mode; }
  //! Switching mode discards a pending forward.
  void set_mode(BackpropMode m) {
    options_.mode = m;
    state_ = State::Idle;
  }
  void set_output(StackOutput o) {
    options_.output = o;
    state_ = State::Idle;
  }
  void set_error_bound(const ErrorBoundOptions& eb) {
    options_.error_bound = eb;
    error_scale_ = eb.initial_error_scale;
    state_ = State::Idle;
  }

  //! Coefficients of `module` at `step`.
  Coefficients coefficients(std::int64_t step, int module) const { return Block::coefficients(schedule_, step, module); }

  //! Module boundaries holding a snapshot in the last error-bounded forward (boundary m is the
  //! input of module m).
  std::vector<int> snapshot_boundaries() const {
    std::vector<int> b;
    for (std::size_t m = 0; m < snapshot_slot_.size(); ++m)
      if (snapshot_slot_[m] >= 0) b.push_back(static_cast<int>(m));
    return b;
  }
  //! The error-bounded controller's current error constant.
  double error_scale() const noexcept { return error_scale_; }

  //! Training forward at `step`: out = y_N (or the stream mean). Prepares one backward().
  void forward(ConstView<stream_type> h0, TensorView<stream_type> out, std::int64_t step) {
    run_forward(h0, out, step, /*training=*/true);
    state_ = State::Forwarded;
  }

  //! Inference forward: no dropout or drop-path, nothing kept for a backward.
  void predict(ConstView<stream_type> h0, TensorView<stream_type> out, std::int64_t step) {
    run_forward(h0, out, step, /*training=*/false);
  }

  //! Backward of the last forward: dh0 = dL/dh0 = gx_0 + gy_0 given dout = dL/dout.
  //! Parameter gradients accumulate (call zero_grad() between steps). Pass the forward's h0
  //! to have the monitor compare the reconstructed input with it (free: no extra memory).
  void backward(ConstView<stream_type> dout, TensorView<stream_type> dh0, ConstView<stream_type> h0 = {}) {
    DR2NET_CHECK(state_ != State::BackwardDone,
                 "backward() called twice for one forward(): the forward's state was consumed by the first "
                 "backward (step ", step_, ")");
    DR2NET_CHECK(state_ == State::Forwarded, "backward() called without a preceding training forward()");
    check_stream_arg(dout, "dout");
    check_stream_arg(dh0, "dh0");
    if (h0.data() != nullptr) check_stream_arg(h0, "h0 (for the reconstruction monitor)");
    state_ = State::Idle;  // whatever happens next, this forward's state is spent

    const auto n = static_cast<std::size_t>(shape_.numel());
    ctx_->reserve(grad_x_, n, MemoryCategory::Streams);
    ctx_->reserve(grad_y_, n, MemoryCategory::Streams);
    auto gx = grad_x_.view(shape_), gy = grad_y_.view(shape_);
    using A = accumulate_type;
    if (options_.output == StackOutput::LastStream) {
      for_each_index(*ctx_, n, Fill<stream_type>{gx.data(), stream_type(0)});
      for_each_index(*ctx_, n, ConvertCopy<stream_type, stream_type>{gy.data(), dout.data()});
    } else {
      for_each_index(*ctx_, n, Scale<stream_type, A>{gx.data(), dout.data(), A(0.5)});
      for_each_index(*ctx_, n, Scale<stream_type, A>{gy.data(), dout.data(), A(0.5)});
    }
    auto x = x_.view(shape_), y = y_.view(shape_);
    ReconstructionReport report;
    report.step = step_;
    report.snapshots = num_snapshots_;
    std::vector<std::pair<double, double>> measured;  // (measured relative error, predicted amplification)
    double amplification = 1;                          // predicted growth since the last exact point

    for (int m = num_modules() - 1; m >= 0; --m) {
      const int l = m / 2, which = m % 2;
      Block& block = layers_[static_cast<std::size_t>(l)];
      const LayerCall call = layer_call(l, true);
      if (forward_mode_ == BackpropMode::Standard) {
        const auto st = module_storage(m);
        block.backward_module(*ctx_, schedule_, call, which, false, x, y, gx, gy, workspace_, &st);
        continue;
      }
      const bool reconstruct = std::abs(coefficients(step_, m).beta) >= options_.min_abs_beta;
      DR2NET_CHECK(reconstruct || forward_mode_ == BackpropMode::ErrorBounded,
                   "module ", m, " became non-reversible between forward and backward (step ", step_, ")");
      block.backward_module(*ctx_, schedule_, call, which, reconstruct, x, y, gx, gy, workspace_);
      amplification *= growth_[static_cast<std::size_t>(m)];
      const int slot = snapshot_slot_.empty() ? -1 : snapshot_slot_[static_cast<std::size_t>(m)];
      if (slot >= 0) {  // boundary m has an exact copy: measure what reconstruction made of it, then restore
        const auto sx = snapshot_view(slot, 0), sy = snapshot_view(slot, 1);
        if (reconstruct) {
          const double rel = relative_error(x, sx, y, sy);
          measured.emplace_back(rel, amplification);
          ++report.measured_boundaries;
          report.max_boundary_relative_error = std::max(report.max_boundary_relative_error, rel);
        }
        for_each_index(*ctx_, n, ConvertCopy<stream_type, stream_type>{x.data(), sx.data()});
        for_each_index(*ctx_, n, ConvertCopy<stream_type, stream_type>{y.data(), sy.data()});
        amplification = 1;
      }
    }
    for_each_index(*ctx_, n, ScaledSum<stream_type, A>{dh0.data(), gx.data(), gy.data(), A(1)});

    if (forward_mode_ != BackpropMode::Standard && h0.data() != nullptr &&
        std::abs(coefficients(step_, 0).beta) >= options_.min_abs_beta) {
      const auto [ex, mag_x] = max_abs_diff_and_max(*ctx_, x.data(), h0.data(), n);
      const auto [ey, mag_y] = max_abs_diff_and_max(*ctx_, y.data(), h0.data(), n);
      report.input_compared = true;
      report.max_abs_error = std::max(ex, ey);
      if (std::isnan(ex) || std::isnan(ey)) report.max_abs_error = std::numeric_limits<double>::quiet_NaN();
      const double mag = std::max(mag_x, mag_y);
      report.relative_error = mag > 0 ? report.max_abs_error / mag : report.max_abs_error;
      measured.emplace_back(report.relative_error, amplification);
    }
    if (forward_mode_ == BackpropMode::ErrorBounded) update_error_scale(measured);
    report.error_scale = error_scale_;
    if (forward_mode_ != BackpropMode::Standard) ctx_->reconstruction() = report;
    state_ = State::BackwardDone;
  }

  //! After a reversible backward: the reconstructed input streams (x_0, y_0), both of which
  //! should equal h0 up to the reconstruction error.
  ConstView<stream_type> reconstructed_x() const { return x_.view(shape_); }
  ConstView<stream_type> reconstructed_y() const { return y_.view(shape_); }

  //! Sets every parameter gradient to zero.
  void zero_grad() {
    for_each_parameter([&](std::string_view, TensorView<compute_type>, TensorView<compute_type> g) {
      for_each_index(*ctx_, g.size(), Fill<compute_type>{g.data(), compute_type(0)});
    });
  }

  //! Calls visit(name, value, grad) for every parameter, as "blocks.{i}.<function>.<name>".
  template <class V>
  void for_each_parameter(V&& visit) {
    for (std::size_t i = 0; i < layers_.size(); ++i)
      layers_[i].for_each_parameter("blocks." + std::to_string(i), visit);
  }

  //! Every parameter with its gradient, in a fixed order.
  std::vector<NamedParameter<compute_type>> parameters() {
    std::vector<NamedParameter<compute_type>> out;
    for_each_parameter([&](std::string_view name, TensorView<compute_type> v, TensorView<compute_type> g) {
      out.push_back({std::string(name), v, g});
    });
    return out;
  }

  //! Frees the cached stream, gradient, workspace and storage buffers (a pending forward is
  //! discarded). They are otherwise kept from step to step, sized for the largest shape seen.
  void release_workspace() {
    x_.reset();
    y_.reset();
    grad_x_.reset();
    grad_y_.reset();
    workspace_.release();
    stored_inputs_.reset();
    stored_saved_.reset();
    snapshots_.reset();
    state_ = State::Idle;
  }

 private:
  using S = stream_type;
  using C = compute_type;
  enum class State { Idle, Forwarded, BackwardDone };

  LayerCall layer_call(int l, bool training) const {
    return LayerCall{l, step_, options_.seed, training, options_.min_abs_beta};
  }

  void check_stream_arg(const TensorView<const S>& v, const char* what) const {
    check_contiguous(v, what);
    check_shape(v, shape_, what);
  }
  void check_stream_arg(const TensorView<S>& v, const char* what) const {
    check_stream_arg(TensorView<const S>(v), what);
  }

  //! max |a - sa|, |b - sb| relative to max |sa|, |sb|.
  double relative_error(ConstView<S> a, ConstView<S> sa, ConstView<S> b, ConstView<S> sb) {
    const auto n = a.size();
    const auto [ea, ma] = max_abs_diff_and_max(*ctx_, a.data(), sa.data(), n);
    const auto [eb, mb] = max_abs_diff_and_max(*ctx_, b.data(), sb.data(), n);
    if (std::isnan(ea) || std::isnan(eb)) return std::numeric_limits<double>::infinity();
    const double mag = std::max(ma, mb);
    return mag > 0 ? std::max(ea, eb) / mag : std::max(ea, eb);
  }

  //! The rounding unit of the planning model. With wider streams than compute (fp64 streams,
  //! fp32 functions) the stream arithmetic is nearly exact, but a reconstructed input that
  //! differs from the original in the last fp64 bits can round to another fp32 value, and F
  //! then differs at fp32 level: the compute type's unit is the honest one.
  static double roundoff() { return std::max(unit_roundoff<S>(), unit_roundoff<C>()); }

  //! error_scale follows the worst measured ratio of actual to predicted error at once when it
  //! rises, and decays toward it slowly when it falls; without measurements it stays.
  void update_error_scale(const std::vector<std::pair<double, double>>& measured) {
    double worst = 0;
    bool any = false;
    for (const auto& [rel, amp] : measured) {
      if (!(amp > 0) || !std::isfinite(amp)) continue;
      const double ratio = std::isfinite(rel) ? rel / (roundoff() * amp) : std::numeric_limits<double>::max();
      worst = std::max(worst, ratio);
      any = true;
    }
    if (!any) return;
    const auto& eb = options_.error_bound;
    error_scale_ = std::max({worst, error_scale_ * eb.error_scale_decay, 1e-3});
  }

  //! Chooses snapshot boundaries for error-bounded mode at this step (see ErrorBoundOptions).
  void plan_snapshots() {
    const auto M = static_cast<std::size_t>(num_modules());
    growth_.assign(M, 1.0);
    snapshot_slot_.assign(M, -1);
    num_snapshots_ = 0;
    if (forward_mode_ == BackpropMode::Standard) return;
    const auto& eb = options_.error_bound;
    for (std::size_t m = 0; m < M; ++m) {
      const Coefficients c = coefficients(step_, static_cast<int>(m));
      growth_[m] = std::abs(c.beta) >= options_.min_abs_beta ? reconstruction_growth(c, eb.lipschitz)
                                                             : std::numeric_limits<double>::infinity();
    }
    if (forward_mode_ != BackpropMode::ErrorBounded) return;
    const double budget = eb.tolerance * eb.reconstruction_budget;
    const double base = error_scale_ * roundoff();
    double amp = 1;
    for (std::size_t m = M - 1; m >= 1; --m) {  // boundary 0 is h0: never stored
      amp *= growth_[m];
      if (!(base * amp <= budget)) {
        snapshot_slot_[m] = num_snapshots_++;
        amp = 1;
      }
    }
  }

  void run_forward(ConstView<S> h0, TensorView<S> out, std::int64_t step, bool training) {
    state_ = State::Idle;
    check_contiguous(h0, "h0");
    DR2NET_CHECK(h0.shape().rank() >= 1 && h0.numel() > 0, "h0 must be a non-empty tensor, got shape ", h0.shape());
    DR2NET_CHECK(step >= 0, "negative training step ", step);
    shape_ = h0.shape();
    step_ = step;
    check_stream_arg(out, "out");
    forward_mode_ = training ? options_.mode : BackpropMode::Standard;
    const bool standard = training && options_.mode == BackpropMode::Standard;

    // Validate everything before touching any buffer: coefficients and functions' shapes.
    std::size_t scratch = 0;
    saved_sizes_.assign(static_cast<std::size_t>(num_modules()), 0);
    for (int l = 0; l < num_layers(); ++l) {
      for (int m = 2 * l; m < 2 * l + 2; ++m) {
        if (training && options_.mode == BackpropMode::Reversible)
          Block::reversible_coefficients(schedule_, step, m, options_.min_abs_beta);
        else
          Block::coefficients(schedule_, step, m);
      }
      const Block& b = layers_[static_cast<std::size_t>(l)];
      saved_sizes_[static_cast<std::size_t>(2 * l)] = b.saved_elements_f(shape_, l);
      saved_sizes_[static_cast<std::size_t>(2 * l + 1)] = b.saved_elements_g(shape_, l);
      scratch = std::max({scratch, saved_sizes_[static_cast<std::size_t>(2 * l)],
                          saved_sizes_[static_cast<std::size_t>(2 * l + 1)]});
    }
    if (training) plan_snapshots();

    const auto n = static_cast<std::size_t>(shape_.numel());
    ctx_->reserve(x_, n, MemoryCategory::Streams);
    ctx_->reserve(y_, n, MemoryCategory::Streams);
    workspace_.prepare(*ctx_, shape_, scratch);
    if (training && !standard) {  // a mode switch must not leave the other mode's storage behind
      stored_inputs_.reset();
      stored_saved_.reset();
    }
    if (training && forward_mode_ != BackpropMode::ErrorBounded) snapshots_.reset();
    if (standard) {
      std::size_t saved_total = 0;
      for (std::size_t s : saved_sizes_) saved_total += s;
      ctx_->reserve(stored_inputs_, n * saved_sizes_.size(), MemoryCategory::SavedActivations);
      ctx_->reserve(stored_saved_, saved_total, MemoryCategory::SavedActivations);
    }
    if (training && forward_mode_ == BackpropMode::ErrorBounded) {
      // Exactly as many snapshots as planned, so the meter shows this step's cost.
      const std::size_t need = 2 * n * static_cast<std::size_t>(num_snapshots_);
      if (snapshots_.size() != need) {
        snapshots_.reset();
        if (need > 0) snapshots_ = ctx_->template allocate<S>(need, MemoryCategory::SavedActivations);
      }
    }

    auto x = x_.view(shape_), y = y_.view(shape_);
    for_each_index(*ctx_, n, ConvertCopy<S, S>{x.data(), h0.data()});  // x_0 = y_0 = h0
    for_each_index(*ctx_, n, ConvertCopy<S, S>{y.data(), h0.data()});
    for (int m = 0; m < num_modules(); ++m) {
      const int l = m / 2;
      if (training && forward_mode_ == BackpropMode::ErrorBounded) {
        if (const int slot = snapshot_slot_[static_cast<std::size_t>(m)]; slot >= 0) {
          for_each_index(*ctx_, n, ConvertCopy<S, S>{snapshot_view(slot, 0).data(), x.data()});
          for_each_index(*ctx_, n, ConvertCopy<S, S>{snapshot_view(slot, 1).data(), y.data()});
        }
      }
      const auto st = standard ? module_storage(m) : typename Block::module_storage_type{};
      layers_[static_cast<std::size_t>(l)].forward_module(*ctx_, schedule_, layer_call(l, training), m % 2, x, y,
                                                          workspace_, standard ? &st : nullptr);
    }
    using A = accumulate_type;
    if (options_.output == StackOutput::LastStream)
      for_each_index(*ctx_, n, ConvertCopy<S, S>{out.data(), y.data()});
    else
      for_each_index(*ctx_, n, ScaledSum<S, A>{out.data(), x.data(), y.data(), A(0.5)});
  }

  //! Module m's standard-mode storage inside the two stored arenas.
  typename Block::module_storage_type module_storage(int m) {
    const auto n = static_cast<std::size_t>(shape_.numel());
    std::size_t offset = 0;
    for (int k = 0; k < m; ++k) offset += saved_sizes_[static_cast<std::size_t>(k)];
    const std::size_t size = saved_sizes_[static_cast<std::size_t>(m)];
    return {TensorView<S>(stored_inputs_.data() + static_cast<std::size_t>(m) * n, shape_),
            TensorView<C>(stored_saved_.data() + offset, Shape{static_cast<std::int64_t>(size)})};
  }

  //! Stream `which` (0: x, 1: y) of snapshot `slot`.
  TensorView<S> snapshot_view(int slot, int which) const {
    const auto n = static_cast<std::size_t>(shape_.numel());
    return TensorView<S>(snapshots_.data() + (2 * static_cast<std::size_t>(slot) + static_cast<std::size_t>(which)) * n,
                         shape_);
  }

  context_type* ctx_;
  std::vector<Block> layers_;
  schedule_type schedule_;
  StackOptions options_;
  MeterReservation parameter_bytes_, gradient_bytes_;

  State state_ = State::Idle;
  BackpropMode forward_mode_ = BackpropMode::Reversible;  // the mode the pending forward ran in
  Shape shape_;
  std::int64_t step_ = 0;
  std::vector<std::size_t> saved_sizes_;
  std::vector<double> growth_;      // predicted error growth per module at this step
  std::vector<int> snapshot_slot_;  // per boundary: snapshot slot or -1
  int num_snapshots_ = 0;
  double error_scale_ = 1;
  buffer_t<context_type, S> x_, y_, grad_x_, grad_y_, stored_inputs_, snapshots_;
  buffer_t<context_type, C> stored_saved_;
  typename Block::workspace_type workspace_;
};

}  // namespace dr2net
