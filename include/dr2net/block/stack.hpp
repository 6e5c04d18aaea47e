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
//! coefficients allow (see ErrorBoundOptions). With a fixed-point precision policy
//! (FixedFp32, FixedFp64) reversible mode is exact: every stream is reconstructed bit for bit,
//! with a few side bits per element kept for modules whose |beta| < 1 (DESIGN §3a).
//!
//! Nothing that can make a gradient wrong passes silently: non-finite values in h0, dout, the
//! streams and the gradients are errors naming the tensor, module and step; the monitor's
//! measurement goes through a guard (StackOptions::guard); exact mode checks every
//! reconstruction against a checksum taken in forward.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dr2net/block/reversible_dual_residual.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/moved_from.hpp"
#include "dr2net/core/reconstruction.hpp"
#include "dr2net/core/tensor.hpp"

namespace dr2net {

//! What a training forward keeps for backward, and so the trade of activation memory against
//! recomputation and reconstruction error.
enum class BackpropMode {
  Reversible,    //!< store nothing per module; reconstruct activations in backward
  ErrorBounded,  //!< reversible, plus stream snapshots where predicted error would exceed a tolerance
  Standard,      //!< store every module's input and saved internals; no reconstruction
};

//! The mode's name for messages and reports: "reversible", "error-bounded" or "standard"
//! ("unknown" for a value outside the enumeration).
inline constexpr std::string_view mode_name(BackpropMode m) {
  switch (m) {
    case BackpropMode::Reversible: return "reversible";
    case BackpropMode::ErrorBounded: return "error-bounded";
    case BackpropMode::Standard: return "standard";
  }
  return "unknown";
}

//! What the stack writes to its output from the final streams (x_N, y_N).
enum class StackOutput {
  LastStream,     //!< out = y_N: exactly the pretrained network at (alpha, beta) = (1, 0)
  MeanOfStreams,  //!< out = (x_N + y_N) / 2
};

//! How error-bounded mode places snapshots. What it bounds is the relative reconstruction
//! error of the *streams* (measured at every snapshot boundary and at h0), not the error of
//! the gradients: how much a residual function's backward amplifies an error in its input
//! depends on the function (1-3x for the ViT blocks, 180-580x for a saturating tanh MLP at
//! (1, 0.5), bench/gradient_amplification). For gradients that equal standard backprop's, use a
//! fixed-point policy (exact mode).
//!
//! Reconstructing module m multiplies the error of the streams by about g_m, the largest
//! |root| of beta*l^2 + (|alpha| + lipschitz)*l - 1 = 0, and adds its own rounding. Walking
//! down from the output, a snapshot is stored at boundary m as soon as the predicted relative
//! error there, error_scale * u * a_m with a <- a * g + 1/8 from a = 1 at the last exact point
//! (u: the larger unit roundoff of the stream and compute types), would exceed
//! stream_tolerance * planning_margin. After every backward, error_scale is
//! corrected from the errors actually measured (at the snapshot boundaries and at h0): it
//! rises at once to the worst measured ratio and decays slowly. Non-finite measurements are
//! left to the guard and never enter the controller.
struct ErrorBoundOptions {
  double stream_tolerance = 1e-5;     //!< bound on the measured relative stream reconstruction error
  double planning_margin = 0.3;       //!< plan for this fraction of stream_tolerance (room for misprediction)
  double lipschitz = 0.0;             //!< prior bound on |eigenvalues| of the functions' Jacobians
  double initial_error_scale = 8.0;   //!< error_scale before anything was measured
  double error_scale_decay = 0.9;     //!< per-step decay of error_scale toward what is measured
};

//! Settings of a ReversibleStack. The constructor (and set_error_bound() and set_guard() for
//! their parts, set_mode() and set_output() for theirs) validates them and throws
//! dr2net::Error unless mode and output are values of their enumerations, min_abs_beta > 0, the
//! error_bound values lie in range (stream_tolerance > 0, planning_margin in (0, 1],
//! lipschitz >= 0, initial_error_scale > 0, error_scale_decay in (0, 1]) and
//! guard.max_relative_error > 0.
struct StackOptions {
  BackpropMode mode = BackpropMode::Reversible;  //!< Mode of every training forward(); see set_mode().
  StackOutput output = StackOutput::LastStream;  //!< What forward() and predict() write to `out`.
  std::uint64_t seed = 0;                    //!< handed to residual functions for randomness replay
  double min_abs_beta = kDefaultMinAbsBeta;  //!< reconstruction refuses |beta| below this
  //! Snapshot placement of BackpropMode::ErrorBounded (unused in the other modes).
  ErrorBoundOptions error_bound{};
  //! What happens when a floating-point reversible backward's measured reconstruction error
  //! exceeds guard.max_relative_error or is not finite (default: throw).
  ReconstructionGuard guard{};
  //! NaN/Inf checks of h0, dout, every module's output and input gradient, dh0 (folded into
  //! passes that read the data anyway) and of the parameter gradients (one read of each
  //! after backward). Fixed-point range overflow is always checked.
  bool check_finite = true;
  //! Exact mode: compare a 64-bit checksum of every stream a module overwrote in forward with
  //! its reconstruction in backward (one read of the stream per module and pass), so a
  //! residual function that is not deterministic is caught at the module where it diverged.
  bool exact_self_check = true;
  //! Elements of h0 kept (strided) in forward so that the monitor measures the reconstruction
  //! even when backward() is not given h0. 0: measure only against a given h0.
  std::size_t monitor_samples = 4096;
  //! Global index of the batch's first sample, for drop-path and dropout keys
  //! (ModuleCall::sample_offset): a data-parallel rank holding samples [o, o + B) of the global
  //! batch sets o, so its masks are those of one process running the whole batch. 0 otherwise.
  std::uint64_t sample_offset = 0;
};

//! Called by ReversibleStack::backward() with layer l once the backward of layer l (modules 2l
//! and 2l + 1) has finished accumulating that layer's parameter gradients: layers L-1, ..., 0
//! in that order, once each per backward, in every mode. A data-parallel driver starts a
//! gradient bucket's all-reduce from it. On a device context "finished" is in stream order:
//! the gradients are complete once the context's stream reaches the point of the call.
using LayerBackwardHook = std::function<void(int layer)>;

//! A parameter and its gradient under the stack's name for it ("blocks.3.f.weight").
//! \tparam T element type: the stack's compute_type
//! \tparam Space memory space of the views (HostSpace; DeviceSpace for a device stack)
template <class T, class Space = HostSpace>
struct NamedParameter {
  std::string name;             //!< Dot-separated full name, also its key in a checkpoint.
  TensorView<T, Space> value;   //!< The values, in the backend's memory, owned by the residual function.
  TensorView<T, Space> grad;    //!< Its gradient, of value's shape; backward() accumulates into it.
};

//! Predicted per-module growth of reconstruction error at (alpha, beta): the largest |root| of
//! beta*l^2 + (|alpha| + lipschitz)*l - 1 = 0, an upper bound for either sign of beta.
//! Infinite when beta = 0 (not invertible).
inline double reconstruction_growth(Coefficients c, double lipschitz = 0.0) {
  const double b = std::abs(c.alpha) + lipschitz, beta = std::abs(c.beta);
  if (beta == 0) return std::numeric_limits<double>::infinity();
  return (b + std::sqrt(b * b + 4 * beta)) / (2 * beta);
}

//! L layers of `Block` trained as one Dr²Net network of 2L modules (module m: layer m/2's F
//! for even m, G for odd m) with the memory plan of the file comment. The stack owns the
//! layers, the schedule and its buffers (kept between steps, sized for the largest shape seen)
//! and refers to the context, which must outlive it.
//!
//! Every call runs on the calling thread; one stack serves one forward/backward sequence at a
//! time (no concurrent calls). On a device context the passes go to its stream, and forward(),
//! predict() and backward() return after reading the check flags back, so their errors are
//! raised by the call that caused them.
//!
//! \tparam Block a ReversibleDualResidual (or a type with its members)
template <class Block>
class ReversibleStack {
 public:
  //! Where streams, h0/out/dout and parameters live: HostSpace, or DeviceSpace on a device.
  using memory_space = typename Block::memory_space;
  // Every TensorView/ConstView in this class is of the stack's memory space (declared first).
  //! A view of the backend's memory.
  template <class U>
  using TensorView = dr2net::TensorView<U, memory_space>;
  //! A read-only view of the backend's memory.
  template <class U>
  using ConstView = dr2net::TensorView<const U, memory_space>;
  using block_type = Block;                                 //!< The layer type.
  using schedule_type = typename Block::schedule_type;      //!< The coefficient schedule, one for all layers.
  using stream_type = typename Block::stream_type;          //!< Element type of the streams x, y.
  //! Type of the residual functions and of every parameter and gradient (NamedParameter<compute_type>).
  using compute_type = typename Block::compute_type;
  using accumulate_type = typename Block::accumulate_type;  //!< Type of the fused combine arithmetic.
  //! Type of h0, out, dout and dh0: the stream type, or the compute type for fixed-point streams.
  using value_type = typename Block::value_type;
  //! The backend context (HostContext, CudaContext) every pass runs through.
  using context_type = typename Block::context_type;
  //! Fixed-point streams: reversible mode is exact.
  static constexpr bool exact = Block::exact;

  //! Takes the layers (layer i holds modules 2i and 2i+1) and the schedule, and keeps a
  //! reference to `ctx`. Records every parameter and its gradient once in ctx's memory meter
  //! (MemoryCategory::Parameters, Gradients); stream buffers are allocated by the first
  //! forward. Throws dr2net::Error for an empty `layers`, invalid `options` (see StackOptions),
  //! a schedule that overrides a module beyond 2L - 1, or a parameter that a memory limit of
  //! the context refuses (naming the tensor).
  ReversibleStack(context_type& ctx, std::vector<Block> layers, schedule_type schedule, StackOptions options = {})
      : ctx_(&ctx), layers_(std::move(layers)), schedule_(std::move(schedule)), options_(std::move(options)) {
    DR2NET_CHECK(!layers_.empty(), "a stack needs at least one layer");
    check_options(options_);
    if constexpr (requires { schedule_.max_overridden_module(); }) {
      const int m = schedule_.max_overridden_module();
      DR2NET_CHECK(m < num_modules(), "the schedule overrides module ", m, " but the stack has ", num_modules(),
                   " modules (0 to ", num_modules() - 1, ")");
    }
    error_scale_ = options_.error_bound.initial_error_scale;
    // The layers' parameters and gradients are recorded here, once per tensor (their storage,
    // Parameter or DeviceParameter, is not metered itself), through the context, so that a
    // memory limit refuses a model that does not fit naming the tensor that crossed it.
    for_each_parameter([&](std::string_view name, TensorView<compute_type> v, TensorView<compute_type> g) {
      const std::string tensor(name);
      const std::string pw = "parameter '" + tensor + "' of shape " + v.shape().str();
      const std::string gw = "gradient of parameter '" + tensor + "' of shape " + g.shape().str();
      parameter_bytes_.push_back(record_bytes(MemoryCategory::Parameters, v.numel(), pw));
      parameter_bytes_.push_back(record_bytes(MemoryCategory::Gradients, g.numel(), gw));
    });
  }

  //! A moved-from stack refuses every call with dr2net::Error ("... was moved from").
  ReversibleStack(ReversibleStack&&) = default;
  //! Takes over the source's layers, schedule, buffers and meter records; the source then
  //! refuses every call.
  ReversibleStack& operator=(ReversibleStack&&) = default;
  ReversibleStack(const ReversibleStack&) = delete;
  ReversibleStack& operator=(const ReversibleStack&) = delete;
  ~ReversibleStack() = default;

  //! Number of layers L.
  int num_layers() const {
    live("ReversibleStack::num_layers()");
    return static_cast<int>(layers_.size());
  }
  //! Number of modules, 2L: the module index of schedules, messages and reports.
  int num_modules() const { return 2 * num_layers(); }
  //! Layer i, e.g. to reach its residual functions; throws dr2net::Error naming the index unless 0 <= i < L.
  Block& layer(int i) {
    live("ReversibleStack::layer()");
    DR2NET_CHECK(i >= 0 && i < num_layers(), "ReversibleStack::layer(): layer ", i, " out of range (the stack has ",
                 num_layers(), " layers)");
    return layers_[static_cast<std::size_t>(i)];
  }
  //! The stack's schedule, for a schedule with state to change. Change it between steps only:
  //! backward() reads the coefficients again and refuses a module that became non-reversible.
  schedule_type& schedule() {
    live("ReversibleStack::schedule()");
    return schedule_;
  }
  //! The options in force, with the changes of set_mode(), set_output(), set_error_bound() and
  //! set_guard().
  const StackOptions& options() const {
    live("ReversibleStack::options()");
    return options_;
  }
  //! The context given to the constructor.
  context_type& context() {
    live("ReversibleStack::context()");
    return *ctx_;
  }

  //! Mode of the next training forward(), options().mode.
  BackpropMode mode() const {
    live("ReversibleStack::mode()");
    return options_.mode;
  }
  //! Switching mode discards a pending forward.
  void set_mode(BackpropMode m) {
    live("ReversibleStack::set_mode()");
    check_mode(m);
    options_.mode = m;
    state_ = State::Idle;
  }
  //! Sets what forward() and predict() write to `out`; discards a pending forward.
  void set_output(StackOutput o) {
    live("ReversibleStack::set_output()");
    check_output(o);
    options_.output = o;
    state_ = State::Idle;
  }
  //! Replaces the error-bounded mode's options and restarts its controller at
  //! eb.initial_error_scale; discards a pending forward. Throws dr2net::Error, changing
  //! nothing, when a value of `eb` is out of range (see StackOptions).
  void set_error_bound(const ErrorBoundOptions& eb) {
    live("ReversibleStack::set_error_bound()");
    StackOptions o = options_;
    o.error_bound = eb;
    check_options(o);
    options_.error_bound = eb;
    error_scale_ = eb.initial_error_scale;
    state_ = State::Idle;
  }
  //! Replaces the reconstruction guard; discards a pending forward. Throws dr2net::Error,
  //! changing nothing, unless guard.max_relative_error > 0.
  void set_guard(ReconstructionGuard guard) {
    live("ReversibleStack::set_guard()");
    StackOptions o = options_;
    o.guard = guard;
    check_options(o);
    options_.guard = std::move(guard);
    state_ = State::Idle;
  }

  //! Sets StackOptions::sample_offset for the following forwards; discards a pending forward.
  void set_sample_offset(std::uint64_t offset) {
    live("ReversibleStack::set_sample_offset()");
    options_.sample_offset = offset;
    state_ = State::Idle;
  }

  //! Installs `hook` (empty: none) to run as each layer's backward completes (LayerBackwardHook).
  //! Under GuardAction::Fallback in a floating-point reversible mode the hook runs for every
  //! layer after the guard has accepted the step (a redone step's gradients replace the first
  //! attempt's, which must not have been sent), so there it does not overlap the backward.
  //! An exception from the hook propagates out of backward().
  void set_layer_backward_hook(LayerBackwardHook hook) {
    live("ReversibleStack::set_layer_backward_hook()");
    layer_hook_ = std::move(hook);
  }

  //! Coefficients of `module` at `step`, as the arithmetic uses them (for fixed-point streams:
  //! the schedule's values rounded to the 2^-24 grid). Throws dr2net::Error naming `module`
  //! unless 0 <= module < num_modules().
  Coefficients coefficients(std::int64_t step, int module) const {
    live("ReversibleStack::coefficients()");
    DR2NET_CHECK(module >= 0 && module < num_modules(), "ReversibleStack::coefficients(): module ", module,
                 " out of range: the stack has ", num_modules(), " modules (0 to ", num_modules() - 1, ")");
    return Block::coefficients(schedule_, step, module);
  }

  //! The reconstruction monitor's report of this stack's latest backward.
  const ReconstructionReport& reconstruction() const {
    live("ReversibleStack::reconstruction()");
    return report_;
  }

  //! Side bits per element that `module` keeps at `step` in exact reversible mode (0 without
  //! fixed-point streams, or when |beta| >= 1).
  int side_bit_width(std::int64_t step, int module) const {
    return Block::side_bit_width(coefficients(step, module));
  }

  //! Module boundaries holding a snapshot in the last error-bounded forward (boundary m is the
  //! input of module m).
  std::vector<int> snapshot_boundaries() const {
    live("ReversibleStack::snapshot_boundaries()");
    std::vector<int> b;
    for (std::size_t m = 0; m < snapshot_slot_.size(); ++m)
      if (snapshot_slot_[m] >= 0) b.push_back(static_cast<int>(m));
    return b;
  }
  //! The error-bounded controller's current error constant.
  double error_scale() const {
    live("ReversibleStack::error_scale()");
    return error_scale_;
  }

  //! Training forward at `step`: out = y_N (or the stream mean). Prepares one backward().
  void forward(ConstView<value_type> h0, TensorView<value_type> out, std::int64_t step) {
    live("ReversibleStack::forward()");
    run_forward(h0, out, step, /*training=*/true);
    state_ = State::Forwarded;
  }

  //! Inference forward: no dropout or drop-path, nothing kept for a backward.
  void predict(ConstView<value_type> h0, TensorView<value_type> out, std::int64_t step) {
    live("ReversibleStack::predict()");
    run_forward(h0, out, step, /*training=*/false);
  }

  //! Backward of the last forward: dh0 = dL/dh0 = gx_0 + gy_0 given dout = dL/dout.
  //! Parameter gradients accumulate (call zero_grad() between steps). Passing the forward's h0
  //! lets the monitor compare the whole reconstructed input with it; without it, it compares
  //! the sample kept in forward (StackOptions::monitor_samples). Throws dr2net::Error on a
  //! non-finite value, an exact-mode mismatch, or (by default) a guard trip.
  void backward(ConstView<value_type> dout, TensorView<value_type> dh0, ConstView<value_type> h0 = {}) {
    live("ReversibleStack::backward()");
    DR2NET_CHECK(state_ != State::BackwardDone,
                 "backward() called twice for one forward(): the forward's state was consumed by the first "
                 "backward (step ", step_, ")");
    DR2NET_CHECK(state_ == State::Forwarded, "backward() called without a preceding training forward()");
    check_stream_arg(dout, "dout");
    check_stream_arg(dh0, "dh0");
    if (h0.data() != nullptr) check_stream_arg(h0, "h0 (for the reconstruction monitor)");
    state_ = State::Idle;  // whatever happens next, this forward's state is spent

    const bool fallback = options_.guard.action == GuardAction::Fallback && !exact &&
                          forward_mode_ != BackpropMode::Standard && !in_fallback_;
    if (fallback) save_gradients();
    defer_layer_hook_ = fallback;
    run_backward(dout, dh0, h0);
    if (fallback && guard_tripped_) redo_with_snapshots(dout, dh0);
    defer_layer_hook_ = false;
    if (fallback && layer_hook_)  // the guard has accepted these gradients: now they may go out
      for (int l = num_layers() - 1; l >= 0; --l) layer_hook_(l);
    state_ = State::BackwardDone;
  }

  //! After a reversible backward: the reconstructed input streams (x_0, y_0), both of which
  //! should equal h0 up to the reconstruction error.
  ConstView<stream_type> reconstructed_x() const {
    live("ReversibleStack::reconstructed_x()");
    return x_.view(shape_);
  }
  //! The reconstructed y_0, as reconstructed_x(). Both view the stack's stream buffers: valid
  //! until the next forward(), predict() or release_workspace().
  ConstView<stream_type> reconstructed_y() const {
    live("ReversibleStack::reconstructed_y()");
    return y_.view(shape_);
  }

  //! Sets every parameter gradient to zero.
  void zero_grad() {
    live("ReversibleStack::zero_grad()");
    for_each_parameter([&](std::string_view, TensorView<compute_type>, TensorView<compute_type> g) {
      for_each_index(*ctx_, g.size(), Fill<compute_type>{g.data(), compute_type(0)});
    });
  }

  //! Calls visit(name, value, grad) for every parameter, as "blocks.{i}.<function>.<name>".
  template <class Visit>
  void for_each_parameter(Visit&& visit) {
    live("ReversibleStack::for_each_parameter()");
    for (std::size_t i = 0; i < layers_.size(); ++i)
      layers_[i].for_each_parameter("blocks." + std::to_string(i), visit);
  }

  //! Every parameter with its gradient, in a fixed order.
  std::vector<NamedParameter<compute_type, memory_space>> parameters() {
    live("ReversibleStack::parameters()");
    std::vector<NamedParameter<compute_type, memory_space>> out;
    for_each_parameter([&](std::string_view name, TensorView<compute_type> v, TensorView<compute_type> g) {
      out.push_back({std::string(name), v, g});
    });
    return out;
  }

  //! Frees the cached stream, gradient, workspace and storage buffers (a pending forward is
  //! discarded). They are otherwise kept from step to step, sized for the largest shape seen.
  void release_workspace() {
    live("ReversibleStack::release_workspace()");
    x_.reset();
    y_.reset();
    grad_x_.reset();
    grad_y_.reset();
    workspace_.release();
    stored_inputs_.reset();
    stored_saved_.reset();
    snapshots_.reset();
    side_bits_.reset();
    samples_.reset();
    flags_.reset();
    fallback_input_.reset();
    fallback_out_.reset();
    saved_grads_.reset();
    state_ = State::Idle;
  }

 private:
  using S = stream_type;
  using C = compute_type;
  using V = value_type;
  enum class State { Idle, Forwarded, BackwardDone };
  //! Stack-level check flags after the modules' (kModuleFlagCount per module).
  enum StackFlag : int { kFlagInput = 0, kFlagOutput, kFlagDout, kFlagDh0, kFlagParameterGradients, kStackFlagCount };

  static void check_options(const StackOptions& o) {
    check_mode(o.mode);
    check_output(o.output);
    DR2NET_CHECK(o.min_abs_beta > 0, "min_abs_beta must be positive, got ", o.min_abs_beta);
    const auto& eb = o.error_bound;
    DR2NET_CHECK(eb.stream_tolerance > 0 && eb.planning_margin > 0 && eb.planning_margin <= 1 && eb.lipschitz >= 0 &&
                     eb.initial_error_scale > 0 && eb.error_scale_decay > 0 && eb.error_scale_decay <= 1,
                 "invalid error-bound options: stream_tolerance ", eb.stream_tolerance, ", planning_margin ",
                 eb.planning_margin, ", lipschitz ", eb.lipschitz, ", initial scale ", eb.initial_error_scale,
                 ", decay ", eb.error_scale_decay);
    DR2NET_CHECK(o.guard.max_relative_error > 0, "guard.max_relative_error must be positive, got ",
                 o.guard.max_relative_error);
  }

  // A value cast from outside the enumeration would run some branch's arithmetic unannounced.
  static void check_mode(BackpropMode m) {
    DR2NET_CHECK(mode_name(m) != "unknown", "BackpropMode value ", static_cast<int>(m),
                 " is not Reversible, ErrorBounded or Standard");
  }
  static void check_output(StackOutput out) {
    DR2NET_CHECK(out == StackOutput::LastStream || out == StackOutput::MeanOfStreams, "StackOutput value ",
                 static_cast<int>(out), " is not LastStream or MeanOfStreams");
  }

  //! Refuses any call on a stack that was moved from (its layers and buffers went with the move).
  void live(const char* call) const { moved_.check(call); }

  //! Bytes of `elements` compute-typed values of `category`, recorded through the context.
  MeterReservation record_bytes(MemoryCategory category, std::int64_t elements, const std::string& what) {
    const std::size_t bytes = checked::bytes(elements, sizeof(C), what.c_str());
    if constexpr (requires { ctx_->reserve_bytes(category, bytes, what.c_str()); })
      return ctx_->reserve_bytes(category, bytes, what.c_str());
    else
      return MeterReservation(ctx_->meter(), category, bytes);
  }

  LayerCall layer_call(int l, bool training) {
    LayerCall c{l, step_, options_.seed, training, options_.min_abs_beta};
    c.flags = flags_.data();
    c.sample_offset = options_.sample_offset;
    if (!module_side_.empty()) {
      c.side[0] = module_side_[static_cast<std::size_t>(2 * l)];
      c.side[1] = module_side_[static_cast<std::size_t>(2 * l + 1)];
    }
    return c;
  }

  template <class T>
  void check_stream_arg(const TensorView<T>& v, const char* what) const {
    check_contiguous(v, what);
    check_shape(v, shape_, what);
  }

  //! "module 3 (layer 1, G)"
  static std::string module_name(int m) {
    return "module " + std::to_string(m) + " (layer " + std::to_string(m / 2) + ", " + (m % 2 == 0 ? "F" : "G") + ")";
  }

  //! Names the parameters of module m (all modules when m < 0) that hold non-finite values:
  //! the diagnosis added to a non-finite error. Runs only once an error was found.
  std::string bad_parameters(int m, bool gradients) {
    std::string names;
    auto check = [&](std::string_view name, TensorView<C> v, TensorView<C> g) {
      const TensorView<C> t = gradients ? g : v;
      const std::size_t bad = count_not_finite(*ctx_, t.data(), t.size());
      if (bad > 0)
        names += (names.empty() ? "" : ", ") + std::string(name) + (gradients ? " gradient" : "") + " (" +
                 std::to_string(bad) + " of " + std::to_string(t.size()) + " elements)";
    };
    for (int k = 0; k < num_modules(); ++k)
      if (m < 0 || k == m)
        layers_[static_cast<std::size_t>(k / 2)].for_each_module_parameter(k % 2, "blocks." + std::to_string(k / 2), check);
    return names;
  }

  //! The flags as the passes left them, read back from the backend.
  std::vector<std::uint32_t> read_flags() {
    std::vector<std::uint32_t> f(flags_.size());
    copy_to_host(*ctx_, f.data(), flags_.data(), f.size());
    return f;
  }
  void clear_flags() {
    const std::size_t count = static_cast<std::size_t>(kModuleFlagCount * num_modules() + kStackFlagCount);
    ctx_->reserve(flags_, count, MemoryCategory::Other);
    for_each_index(*ctx_, flags_.size(), Fill<std::uint32_t>{flags_.data(), 0u});
  }
  std::uint32_t module_flag(const std::vector<std::uint32_t>& f, int m, ModuleFlag which) const {
    return f[static_cast<std::size_t>(kModuleFlagCount * m + static_cast<int>(which))];
  }
  std::uint32_t stack_flag(const std::vector<std::uint32_t>& f, StackFlag which) const {
    return f[static_cast<std::size_t>(kModuleFlagCount * num_modules() + which)];
  }

  static std::string range_note() {
    if constexpr (exact)
      return " or values outside the fixed-point range (|h| < 2^" + std::to_string(62 - S::frac_bits) + ")";
    else
      return "";
  }

  //! Throws for the first bad value the forward's passes flagged.
  void check_forward_flags() {
    const auto f = read_flags();
    const std::string at = " at step " + std::to_string(step_);
    DR2NET_CHECK(!stack_flag(f, kFlagInput), "h0 (the stack input) holds NaN or Inf", range_note(), at);
    for (int m = 0; m < num_modules(); ++m) {
      if (!module_flag(f, m, ModuleFlag::Forward)) continue;
      const std::string params = bad_parameters(m, false);
      if (!params.empty())
        DR2NET_FAIL(module_name(m), " produced a non-finite output", at, "; non-finite parameters: ", params);
      if constexpr (exact)
        DR2NET_FAIL("fixed-point overflow: ", module_name(m), " produced a value outside the fixed-point range "
                    "(|h| < 2^", 62 - S::frac_bits, ") or a non-finite one", at);
      else
        DR2NET_FAIL(module_name(m), " produced a non-finite output", at, " (its parameters are finite)");
    }
    if (stack_flag(f, kFlagOutput)) {
      const std::string params = bad_parameters(-1, false);
      DR2NET_FAIL("the stack output is not finite", at,
                  params.empty() ? std::string() : "; non-finite parameters: " + params);
    }
  }

  //! Throws for the first bad value the backward's passes flagged, then checks the
  //! parameter gradients.
  void check_backward_flags() {
    const auto f = read_flags();
    const std::string at = " at step " + std::to_string(step_);
    const bool check = options_.check_finite;
    DR2NET_CHECK(!(check && stack_flag(f, kFlagDout)), "dout (the gradient of the stack output) holds NaN or Inf", at);
    for (int m = num_modules() - 1; m >= 0; --m) {
      DR2NET_CHECK(!module_flag(f, m, ModuleFlag::Inverse), module_name(m),
                   " produced a non-finite output when recomputed in backward", at,
                   " (it was finite in forward: the function is not deterministic)");
      if (check && module_flag(f, m, ModuleFlag::Gradient)) {
        const std::string params = bad_parameters(m, false);
        const bool floating_reversal = !exact && forward_mode_ != BackpropMode::Standard;
        DR2NET_FAIL("the input gradient of ", module_name(m), " is not finite", at,
                    params.empty() ? std::string() : "; non-finite parameters: " + params,
                    floating_reversal && !report_.measured
                        ? " (in a floating-point reversible backward this can also be a reconstruction that blew "
                          "up at small |beta|, unmeasured here: use exact mode or error-bounded mode)"
                        : "");
      }
    }
    DR2NET_CHECK(!(check && stack_flag(f, kFlagDh0)), "dh0 (the gradient of the stack input) is not finite", at);
    if (check && stack_flag(f, kFlagParameterGradients)) {  // only now: name them
      const std::string grads = bad_parameters(-1, true);
      DR2NET_FAIL("non-finite parameter gradients", at, ": ", grads);
    }
  }

  //! max |a - ra|, |b - rb| over n elements (NaN when any difference is NaN), and that relative
  //! to max |ra|, |rb|: the monitor's one comparison of two reconstructed streams with references.
  template <class T>
  std::pair<double, double> compare_streams(const S* a, const T* ra, const S* b, const T* rb, std::size_t n) {
    const auto [ea, ma] = max_abs_diff_and_max(*ctx_, a, ra, n);
    const auto [eb, mb] = max_abs_diff_and_max(*ctx_, b, rb, n);
    const double e = (std::isnan(ea) || std::isnan(eb)) ? std::numeric_limits<double>::quiet_NaN() : std::max(ea, eb);
    const double mag = std::max(ma, mb);
    return {e, mag > 0 ? e / mag : e};
  }

  //! Error-bounded mode at a snapshot boundary: the relative error of the reconstructed
  //! streams a, b against their snapshots sa, sb (max |a - sa|, |b - sb| over max |sa|, |sb|;
  //! NaN when any difference is NaN), measured by the pass that also restores the snapshots
  //! over a and b (the backend's compare_and_restore: one read of each buffer and one write,
  //! in the stream type, branchless).
  double compare_and_restore_streams(S* a, const S* sa, S* b, const S* sb, std::size_t n) {
    const auto [ea, ma] = compare_and_restore(*ctx_, a, sa, n);
    const auto [eb, mb] = compare_and_restore(*ctx_, b, sb, n);
    const double e = (std::isnan(ea) || std::isnan(eb)) ? std::numeric_limits<double>::quiet_NaN() : std::max(ea, eb);
    const double mag = std::max(ma, mb);
    return mag > 0 ? e / mag : e;
  }

  //! The rounding unit of the planning model. With wider streams than compute (fp64 streams,
  //! fp32 functions) the stream arithmetic is nearly exact, but a reconstructed input that
  //! differs from the original in the last fp64 bits can round to another fp32 value, and F
  //! then differs at fp32 level: the compute type's unit is the honest one.
  static double roundoff() { return std::max(unit_roundoff<S>(), unit_roundoff<C>()); }

  //! error_scale follows the worst measured ratio of actual to predicted error at once when it
  //! rises, and decays toward it slowly when it falls; without finite measurements it stays
  //! (a non-finite one is the guard's business, never the controller's).
  void update_error_scale(const std::vector<std::pair<double, double>>& measured) {
    double worst = 0;
    bool any = false;
    for (const auto& [rel, amp] : measured) {
      if (!(amp > 0) || !std::isfinite(amp) || !std::isfinite(rel)) continue;
      worst = std::max(worst, rel / (roundoff() * amp));
      any = true;
    }
    if (!any) return;
    const auto& eb = options_.error_bound;
    error_scale_ = std::max({worst, error_scale_ * eb.error_scale_decay, 1e-3});
  }

  //! The predicted amplification after reconstructing one more module of growth g: the error
  //! carried in, amplified by g, plus kRoundingPerModule for the module's own rounding, so that
  //! where g = 1 (alpha = 0, beta = 1) the prediction grows with the segment's length instead of
  //! staying constant (which made snapshot placement all-or-nothing there). Starts at 1 at an
  //! exact point (the stack output, a snapshot).
  static constexpr double kRoundingPerModule = 0.125;
  static double accumulate_amplification(double amp, double g) { return amp * g + kRoundingPerModule; }

  //! Chooses snapshot boundaries for error-bounded mode at this step (see ErrorBoundOptions).
  //! With fixed-point streams reconstruction is exact: snapshots go only where a module is
  //! not reversible at all.
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
    const double budget = eb.stream_tolerance * eb.planning_margin;
    const double base = exact ? 0.0 : error_scale_ * roundoff();
    double amp = 1;
    for (std::size_t m = M - 1; m >= 1; --m) {  // boundary 0 is h0: never stored
      amp = accumulate_amplification(amp, growth_[m]);
      if (!(base * amp <= budget)) {  // 0 * inf is NaN: a non-reversible module always gets one
        snapshot_slot_[m] = num_snapshots_++;
        amp = 1;
      }
    }
  }

  //! Exact reversible mode: one side-bit area per module whose |beta| < 1, sized exactly.
  void plan_side_bits(bool keep) {
    module_side_.assign(static_cast<std::size_t>(num_modules()), SideBits{});
    if constexpr (exact) {
      if (keep) {
        const auto n = static_cast<std::size_t>(shape_.numel());
        std::vector<std::size_t> offsets(module_side_.size(), 0);
        std::size_t words = 0;
        for (int m = 0; m < num_modules(); ++m) {
          const Coefficients c = coefficients(step_, m);
          if (!(std::abs(c.beta) >= options_.min_abs_beta)) continue;  // not reconstructed (snapshot)
          const int w = Block::side_bit_width(c);
          if (w == 0) continue;
          auto& sb = module_side_[static_cast<std::size_t>(m)];
          sb.width = w;
          sb.per_word = fixed::elements_per_word(w);
          offsets[static_cast<std::size_t>(m)] = words;
          const std::string what = "ReversibleStack: side bits of " + module_name(m) + " for streams of shape " +
                                   shape_.str();
          words = checked::to_size(
              checked::add(checked::to_int64(words, what.c_str()),
                           checked::to_int64(ceil_div(n, static_cast<std::size_t>(sb.per_word)), what.c_str()), what.c_str()),
              what.c_str());
        }
        if (side_bits_.size() != words) {
          side_bits_.reset();
          if (words > 0) side_bits_ = ctx_->template allocate<std::uint64_t>(words, MemoryCategory::SideBits, "side bits");
        }
        for (std::size_t m = 0; m < module_side_.size(); ++m)
          if (module_side_[m].width > 0) module_side_[m].words = side_bits_.data() + offsets[m];
        return;
      }
    }
    (void)keep;
    side_bits_.reset();
  }

  //! Every element and byte count a forward at shape_ allocates, in checked arithmetic, before
  //! anything is allocated: a shape whose streams, workspace, stored inputs or snapshots would
  //! overflow a 64-bit size is refused naming the quantity and its factors. Returns the total
  //! of the modules' saved internals (standard mode's second arena).
  std::size_t check_sizes(std::size_t scratch, bool standard) const {
    const std::int64_t n = shape_.numel();
    const std::string at = " for streams of shape " + shape_.str();
    const auto bytes = [&](std::int64_t count, std::size_t size, const char* quantity) {
      const std::string what = std::string("ReversibleStack: ") + quantity + at;
      (void)checked::bytes(count, size, what.c_str());
    };
    bytes(n, sizeof(S), "the stream buffers x and y");
    bytes(n, sizeof(V), "the stream gradients");
    bytes(n, sizeof(C), "the module workspace");
    bytes(checked::to_int64(scratch, "ReversibleStack: a residual function's scratch"), sizeof(C),
          "the largest residual function's scratch");
    std::int64_t saved_total = 0;
    if (standard) {
      const std::string inputs = "ReversibleStack: standard mode's stored inputs (" + std::to_string(num_modules()) +
                                 " modules x the stream)" + at;
      (void)checked::bytes(checked::mul(static_cast<std::int64_t>(aligned_slot<S>(static_cast<std::size_t>(n))),
                                        num_modules(), inputs.c_str()),
                           sizeof(S), inputs.c_str());
      const std::string saved = "ReversibleStack: standard mode's saved internals of all modules" + at;
      for (std::size_t sz : saved_sizes_)
        saved_total = checked::add(saved_total, checked::to_int64(aligned_slot<C>(sz), saved.c_str()), saved.c_str());
      bytes(saved_total, sizeof(C), "standard mode's saved internals of all modules");
    }
    if (num_snapshots_ > 0) {
      const std::string snaps = "ReversibleStack: " + std::to_string(num_snapshots_) + " stream snapshots" + at;
      bytes(checked::product({2, n, num_snapshots_}, snaps.c_str()), sizeof(S), "the stream snapshots");
    }
    return static_cast<std::size_t>(saved_total);
  }

  //! `elements` of T rounded up to a whole number of the context's allocation alignment
  //! (context_type::allocation_alignment bytes: 64 on the host, 256 on a device): the size of a
  //! slot in standard mode's arenas. Sizes were checked before (check_sizes adds at most one
  //! alignment unit per module).
  template <class T>
  static std::size_t aligned_slot(std::size_t elements) {
    constexpr std::size_t unit = context_type::allocation_alignment / sizeof(T) > 0
                                     ? context_type::allocation_alignment / sizeof(T) : 1;
    return ceil_div(elements, unit) * unit;
  }

  //! ceil(a / b) without forming a + b - 1.
  static std::size_t ceil_div(std::size_t a, std::size_t b) { return a / b + (a % b != 0 ? 1 : 0); }

  //! Module m in forward overwrites the x stream (F, m even) or the y stream (G, m odd).
  S* overwritten(int m) { return (m % 2 == 0 ? x_ : y_).data(); }

  void run_forward(ConstView<V> h0, TensorView<V> out, std::int64_t step, bool training) {
    state_ = State::Idle;
    check_contiguous(h0, "h0");
    DR2NET_CHECK(h0.shape().rank() >= 1 && h0.numel() > 0, "h0 must be a non-empty tensor, got shape ", h0.shape());
    DR2NET_CHECK(step >= 0, "negative training step ", step);
    shape_ = h0.shape();
    step_ = step;
    check_stream_arg(out, "out");
    forward_mode_ = training ? options_.mode : BackpropMode::Standard;
    const bool standard = training && options_.mode == BackpropMode::Standard;
    const bool reversible = training && !standard;

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
    const std::size_t saved_total = check_sizes(scratch, standard);

    const auto n = static_cast<std::size_t>(shape_.numel());
    ctx_->reserve(x_, n, MemoryCategory::Streams, "stream x");
    ctx_->reserve(y_, n, MemoryCategory::Streams, "stream y");
    workspace_.prepare(*ctx_, shape_, scratch);
    if (training && !standard) {  // a mode switch must not leave the other mode's storage behind
      stored_inputs_.reset();
      stored_saved_.reset();
    }
    if (training && forward_mode_ != BackpropMode::ErrorBounded) snapshots_.reset();
    if (standard) {
      ctx_->reserve(stored_inputs_, aligned_slot<S>(n) * saved_sizes_.size(), MemoryCategory::SavedActivations,
                    "standard mode's stored module inputs");
      ctx_->reserve(stored_saved_, saved_total, MemoryCategory::SavedActivations,
                    "standard mode's saved internals");
    }
    if (training && forward_mode_ == BackpropMode::ErrorBounded) {
      // Exactly as many snapshots as planned, so the meter shows this step's cost.
      const std::size_t need = 2 * n * static_cast<std::size_t>(num_snapshots_);
      if (snapshots_.size() != need) {
        snapshots_.reset();
        if (need > 0) snapshots_ = ctx_->template allocate<S>(need, MemoryCategory::SavedActivations, "stream snapshots");
      }
    }
    if (training) plan_side_bits(reversible);
    clear_flags();
    const bool check = options_.check_finite || exact;
    std::uint32_t* const stack_flags = flags_.data() + kModuleFlagCount * num_modules();

    auto x = x_.view(shape_), y = y_.view(shape_);
    for_each_index(*ctx_, n, InitStreams<S, V>{x.data(), y.data(), h0.data(), check ? stack_flags + kFlagInput : nullptr});
    if (reversible) keep_input_sample(h0);
    checksums_.assign(static_cast<std::size_t>(num_modules()), 0);
    const bool checksum = exact && reversible && options_.exact_self_check;
    for (int m = 0; m < num_modules(); ++m) {
      const int l = m / 2;
      if (training && forward_mode_ == BackpropMode::ErrorBounded) {
        if (const int slot = snapshot_slot_[static_cast<std::size_t>(m)]; slot >= 0) {
          for_each_index(*ctx_, n, ConvertCopy<S, S>{snapshot_view(slot, 0).data(), x.data()});
          for_each_index(*ctx_, n, ConvertCopy<S, S>{snapshot_view(slot, 1).data(), y.data()});
        }
      }
      if constexpr (exact) {
        if (checksum) checksums_[static_cast<std::size_t>(m)] = stream_checksum(*ctx_, overwritten(m), n);
      }
      const auto st = standard ? module_storage(m) : typename Block::module_storage_type{};
      LayerCall call = layer_call(l, training);
      if (!options_.check_finite && !exact) call.flags = nullptr;
      layers_[static_cast<std::size_t>(l)].forward_module(*ctx_, schedule_, call, m % 2, x, y, workspace_,
                                                          standard ? &st : nullptr);
    }
    using A = accumulate_type;
    for_each_index(*ctx_, n,
                   StackOutputPass<S, V, A>{out.data(), x.data(), y.data(), options_.output == StackOutput::MeanOfStreams,
                                            check ? stack_flags + kFlagOutput : nullptr});
    check_forward_flags();
  }

  //! Keeps what the monitor compares the reconstruction with when backward() gets no h0: a
  //! strided sample of h0 (floating streams) and, under GuardAction::Fallback, all of h0.
  void keep_input_sample(ConstView<V> h0) {
    const auto n = static_cast<std::size_t>(shape_.numel());
    sample_count_ = 0;
    if constexpr (!exact) {
      if (options_.monitor_samples > 0) {
        sample_count_ = std::min(options_.monitor_samples, n);
        sample_stride_ = n / sample_count_;
        ctx_->reserve(samples_, 3 * sample_count_, MemoryCategory::Other);
        for_each_index(*ctx_, sample_count_, StridedGather<S>{samples_.data(), x_.data(), sample_stride_});
      }
      if (options_.guard.action == GuardAction::Fallback && !in_fallback_) {
        ctx_->reserve(fallback_input_, n, MemoryCategory::SavedActivations);
        for_each_index(*ctx_, n, ConvertCopy<V, V>{fallback_input_.data(), h0.data()});
      }
    } else {
      (void)h0;
      (void)n;
    }
  }

  void run_backward(ConstView<V> dout, TensorView<V> dh0, ConstView<V> h0) {
    const auto n = static_cast<std::size_t>(shape_.numel());
    using A = accumulate_type;
    ctx_->reserve(grad_x_, n, MemoryCategory::Streams);
    ctx_->reserve(grad_y_, n, MemoryCategory::Streams);
    clear_flags();
    std::uint32_t* const stack_flags = flags_.data() + kModuleFlagCount * num_modules();
    const bool check = options_.check_finite;
    auto gx = grad_x_.view(shape_), gy = grad_y_.view(shape_);
    for_each_index(*ctx_, n, InitGradients<V, A>{gx.data(), gy.data(), dout.data(),
                                                 options_.output == StackOutput::MeanOfStreams,
                                                 check ? stack_flags + kFlagDout : nullptr});
    auto x = x_.view(shape_), y = y_.view(shape_);
    ReconstructionReport report;
    report.step = step_;
    report.snapshots = num_snapshots_;
    report.exact = exact && forward_mode_ != BackpropMode::Standard;
    std::vector<std::pair<double, double>> measured;  // (measured relative error, predicted amplification)
    double amplification = 1;                          // predicted amplification since the last exact point
    const bool checksum = exact && forward_mode_ != BackpropMode::Standard && options_.exact_self_check;

    for (int m = num_modules() - 1; m >= 0; --m) {
      const int l = m / 2, which = m % 2;
      Block& block = layers_[static_cast<std::size_t>(l)];
      LayerCall call = layer_call(l, true);
      if (!check && !exact) call.flags = nullptr;
      if (forward_mode_ == BackpropMode::Standard) {
        const auto st = module_storage(m);
        block.backward_module(*ctx_, schedule_, call, which, false, x, y, gx, gy, workspace_, &st);
        if (which == 0) layer_done(l);
        continue;
      }
      const bool reconstruct = std::abs(coefficients(step_, m).beta) >= options_.min_abs_beta;
      DR2NET_CHECK(reconstruct || forward_mode_ == BackpropMode::ErrorBounded,
                   "module ", m, " became non-reversible between forward and backward (step ", step_, ")");
      block.backward_module(*ctx_, schedule_, call, which, reconstruct, x, y, gx, gy, workspace_);
      if constexpr (exact) {
        if (checksum && reconstruct) {
          const std::uint64_t got = stream_checksum(*ctx_, overwritten(m), n);
          DR2NET_CHECK(got == checksums_[static_cast<std::size_t>(m)],
                       "exact reconstruction diverged at ", module_name(m), " at step ", step_,
                       ": its recomputation in backward differed from its forward, so the residual function is "
                       "not deterministic (atomics in a reduction, unseeded randomness, a GEMM algorithm chosen "
                       "differently between calls?); this step's gradients are invalid");
        }
      }
      amplification = accumulate_amplification(amplification, growth_[static_cast<std::size_t>(m)]);
      const int slot = snapshot_slot_.empty() ? -1 : snapshot_slot_[static_cast<std::size_t>(m)];
      if (slot >= 0) {  // boundary m has an exact copy: measure what reconstruction made of it, then restore
        const auto sx = snapshot_view(slot, 0), sy = snapshot_view(slot, 1);
        if (reconstruct) {  // one pass per stream compares and restores
          double rel = compare_and_restore_streams(x.data(), sx.data(), y.data(), sy.data(), n);
          if (std::isnan(rel)) rel = std::numeric_limits<double>::infinity();  // survives the max below
          measured.emplace_back(rel, amplification);
          ++report.measured_boundaries;
          report.max_boundary_relative_error =
              report.measured_boundaries == 1 ? rel : std::max(report.max_boundary_relative_error, rel);
        } else {
          for_each_index(*ctx_, n, ConvertCopy<S, S>{x.data(), sx.data()});
          for_each_index(*ctx_, n, ConvertCopy<S, S>{y.data(), sy.data()});
        }
        amplification = 1;
      }
      if (which == 0) layer_done(l);  // F ran last: layer l's parameter gradients are complete
    }
    for_each_index(*ctx_, n, InputGradient<V, A>{dh0.data(), gx.data(), gy.data(),
                                                 check ? stack_flags + kFlagDh0 : nullptr});
    if (check)  // one read of each parameter gradient, no wait: the flags are read once below
      for_each_parameter([&](std::string_view, TensorView<C>, TensorView<C> g) {
        for_each_index(*ctx_, g.size(), FlagNotFinite<C>{g.data(), stack_flags + kFlagParameterGradients});
      });
    if (forward_mode_ != BackpropMode::Standard && std::abs(coefficients(step_, 0).beta) >= options_.min_abs_beta) {
      if constexpr (exact) {
        if (checksum) {  // every boundary matched its checksum, h0 included (modules 0 and 1)
          report.measured = true;
          report.max_abs_error = 0;
          report.relative_error = 0;
          report.compared_elements = n;
        }
        (void)h0;
      } else {
        measure_input(report, h0);
        if (report.measured) measured.emplace_back(report.relative_error, amplification);
      }
    }
    report.error_scale = error_scale_;
    report_ = report;
    guard_tripped_ = false;
    // A reconstruction that blew up makes the gradients non-finite too: the guard speaks first,
    // and under Fallback the step is redone whatever this backward's flags say.
    if (!exact && forward_mode_ != BackpropMode::Standard) apply_guard();
    if (guard_tripped_) return;
    check_backward_flags();
    if (forward_mode_ == BackpropMode::ErrorBounded) update_error_scale(measured);  // only from a clean step
    report_.error_scale = error_scale_;
  }

  //! The monitor's comparison of the reconstructed (x_0, y_0) with h0, or with the sample of
  //! it kept in forward.
  void measure_input(ReconstructionReport& report, ConstView<V> h0) {
    if constexpr (!exact) {
      const auto n = static_cast<std::size_t>(shape_.numel());
      std::pair<double, double> e;
      if (h0.data() != nullptr) {
        e = compare_streams(x_.data(), h0.data(), y_.data(), h0.data(), n);
        report.input_compared = true;
        report.compared_elements = n;
      } else if (sample_count_ > 0) {
        S* const kept = samples_.data();
        S* const sx = kept + sample_count_;
        S* const sy = sx + sample_count_;
        for_each_index(*ctx_, sample_count_, StridedGather<S>{sx, x_.data(), sample_stride_});
        for_each_index(*ctx_, sample_count_, StridedGather<S>{sy, y_.data(), sample_stride_});
        e = compare_streams(sx, kept, sy, kept, sample_count_);
        report.sampled = true;
        report.compared_elements = sample_count_;
      } else {
        return;  // nothing to compare with: "not measured"
      }
      report.measured = true;
      report.max_abs_error = e.first;
      report.relative_error = e.second;
    } else {
      (void)report;
      (void)h0;
    }
  }

  //! Acts on the report of a floating-point reversible backward (StackOptions::guard).
  void apply_guard() {
    const auto& g = options_.guard;
    const double worst = report_.worst_relative_error();
    if (!report_.measured && report_.measured_boundaries == 0) return;
    if (worst <= g.max_relative_error) return;
    std::ostringstream msg;
    msg.precision(17);
    msg << "reconstruction guard: the " << mode_name(forward_mode_) << " backward at step " << step_
        << " reconstructed its activations with relative error " << worst << " (limit " << g.max_relative_error
        << "), so this step's gradients are wrong; use exact mode (a fixed-point precision policy such as "
           "FixedFp32), error-bounded mode, or coefficients with larger |beta|";
    if (g.action == GuardAction::Throw || in_fallback_) DR2NET_FAIL(msg.str());
    if (g.action == GuardAction::Warn) {
      if (g.warn) g.warn(msg.str());
      else std::fprintf(stderr, "dr2net: warning: %s\n", msg.str().c_str());
      return;
    }
    guard_tripped_ = true;  // Fallback: backward() redoes the step
  }

  //! GuardAction::Fallback: keeps the parameter gradients as they were before this backward.
  void save_gradients() {
    std::size_t total = 0;
    for_each_parameter([&](std::string_view, TensorView<C> v, TensorView<C>) { total += v.size(); });
    ctx_->reserve(saved_grads_, total, MemoryCategory::Gradients);
    std::size_t off = 0;
    for_each_parameter([&](std::string_view, TensorView<C>, TensorView<C> g) {
      for_each_index(*ctx_, g.size(), ConvertCopy<C, C>{saved_grads_.data() + off, g.data()});
      off += g.size();
    });
  }

  //! GuardAction::Fallback: restores the parameter gradients, runs the step again in
  //! error-bounded mode with the controller raised to what was measured (a snapshot at every
  //! boundary when the measurement was not finite) and backward again; a second trip throws.
  void redo_with_snapshots(ConstView<V> dout, TensorView<V> dh0) {
    std::size_t off = 0;
    for_each_parameter([&](std::string_view, TensorView<C>, TensorView<C> g) {
      for_each_index(*ctx_, g.size(), ConvertCopy<C, C>{g.data(), saved_grads_.data() + off});
      off += g.size();
    });
    double amp = 1;
    for (double gm : growth_) amp = accumulate_amplification(amp, gm);
    const double worst = report_.worst_relative_error();
    const double ratio = worst / (roundoff() * amp);
    const BackpropMode mode = options_.mode;
    const double scale = error_scale_;
    error_scale_ = std::isfinite(ratio) ? std::max(error_scale_, 2 * ratio) : std::numeric_limits<double>::infinity();
    options_.mode = BackpropMode::ErrorBounded;
    in_fallback_ = true;
    struct Restore {
      ReversibleStack* s;
      BackpropMode mode;
      double scale;
      ~Restore() {
        s->options_.mode = mode;
        s->in_fallback_ = false;
        if (!std::isfinite(s->error_scale_)) s->error_scale_ = scale;
      }
    } restore{this, mode, scale};
    const auto n = static_cast<std::size_t>(shape_.numel());
    ctx_->reserve(fallback_out_, n, MemoryCategory::Other);
    const ConstView<V> h0(fallback_input_.data(), shape_);
    run_forward(h0, fallback_out_.view(shape_), step_, true);
    run_backward(dout, dh0, h0);
    report_.fell_back = true;
  }

  //! Layer l's backward is done: runs the hook now, unless the guard must decide first.
  void layer_done(int l) {
    if (layer_hook_ && !defer_layer_hook_) layer_hook_(l);
  }

  //! Module m's standard-mode storage inside the two stored arenas.
  typename Block::module_storage_type module_storage(int m) {
    const auto n = static_cast<std::size_t>(shape_.numel());
    // Every slot starts on the context's allocation alignment (slots are whole numbers of it),
    // so each function's saved regions are as aligned as a fresh allocation would be.
    std::size_t offset = 0;
    for (int k = 0; k < m; ++k) offset += aligned_slot<C>(saved_sizes_[static_cast<std::size_t>(k)]);
    const std::size_t size = saved_sizes_[static_cast<std::size_t>(m)];
    return {TensorView<S>(stored_inputs_.data() + static_cast<std::size_t>(m) * aligned_slot<S>(n), shape_),
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
  std::vector<MeterReservation> parameter_bytes_;  // per tensor: its Parameters, then its Gradients
  MovedFromGuard moved_;

  State state_ = State::Idle;
  BackpropMode forward_mode_ = BackpropMode::Reversible;  // the mode the pending forward ran in
  Shape shape_;
  std::int64_t step_ = 0;
  std::vector<std::size_t> saved_sizes_;
  std::vector<double> growth_;      // predicted error growth per module at this step
  std::vector<int> snapshot_slot_;  // per boundary: snapshot slot or -1
  int num_snapshots_ = 0;
  double error_scale_ = 1;
  ReconstructionReport report_;
  bool guard_tripped_ = false, in_fallback_ = false;
  LayerBackwardHook layer_hook_;
  bool defer_layer_hook_ = false;  // Fallback: the hook runs after the guard's decision
  std::vector<SideBits> module_side_;     // exact mode: each module's side-bit area
  std::vector<std::uint64_t> checksums_;  // exact mode: checksum of what module m overwrote in forward
  std::size_t sample_count_ = 0, sample_stride_ = 1;
  buffer_t<context_type, S> x_, y_, stored_inputs_, snapshots_, samples_;
  buffer_t<context_type, V> grad_x_, grad_y_, fallback_input_, fallback_out_;
  buffer_t<context_type, C> stored_saved_, saved_grads_;
  buffer_t<context_type, std::uint64_t> side_bits_;
  buffer_t<context_type, std::uint32_t> flags_;
  typename Block::workspace_type workspace_;
};

}  // namespace dr2net
