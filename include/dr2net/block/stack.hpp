#pragma once
//! \file
//! ReversibleStack: L Dr²Net layers trained with reversible or standard backprop.
//!
//! Memory plan (DESIGN §2). Reversible mode keeps two stream buffers in forward and four
//! (plus one module's workspace) in backward, whatever L is: activations are reconstructed
//! layer by layer from the output. Standard mode stores every module's input and its
//! function's saved internals: the baseline for memory, time and gradient checks.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dr2net/block/reversible_dual_residual.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"

namespace dr2net {

enum class BackpropMode {
  Reversible,  //!< store nothing per module; reconstruct activations in backward
  Standard,    //!< store every module's input and saved internals; no reconstruction
};

inline constexpr std::string_view mode_name(BackpropMode m) {
  return m == BackpropMode::Reversible ? "reversible" : "standard";
}

enum class StackOutput {
  LastStream,     //!< out = y_N: exactly the pretrained network at (alpha, beta) = (1, 0)
  MeanOfStreams,  //!< out = (x_N + y_N) / 2
};

struct StackOptions {
  BackpropMode mode = BackpropMode::Reversible;
  StackOutput output = StackOutput::LastStream;
  std::uint64_t seed = 0;                    //!< handed to residual functions for randomness replay
  double min_abs_beta = kDefaultMinAbsBeta;  //!< reversible steps refuse |beta| below this
};

//! A parameter and its gradient under the stack's name for it ("blocks.3.f.weight").
template <class T>
struct NamedParameter {
  std::string name;
  TensorView<T> value;
  TensorView<T> grad;
};

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

  //! Coefficients of `module` at `step`.
  Coefficients coefficients(std::int64_t step, int module) const { return Block::coefficients(schedule_, step, module); }

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
  //! Parameter gradients accumulate (call zero_grad() between steps).
  void backward(ConstView<stream_type> dout, TensorView<stream_type> dh0) {
    DR2NET_CHECK(state_ != State::BackwardDone,
                 "backward() called twice for one forward(): the forward's state was consumed by the first "
                 "backward (step ", step_, ")");
    DR2NET_CHECK(state_ == State::Forwarded, "backward() called without a preceding training forward()");
    check_stream_arg(dout, "dout");
    check_stream_arg(dh0, "dh0");
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
    const bool standard = options_.mode == BackpropMode::Standard;
    for (int l = num_layers() - 1; l >= 0; --l) {
      auto storage = standard ? layer_storage(l) : typename Block::storage_type{};
      layers_[static_cast<std::size_t>(l)].backward(*ctx_, schedule_, layer_call(l, true), x, y, gx, gy, workspace_,
                                                    standard ? &storage : nullptr);
    }
    for_each_index(*ctx_, n, ScaledSum<stream_type, A>{dh0.data(), gx.data(), gy.data(), A(1)});
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

  void run_forward(ConstView<S> h0, TensorView<S> out, std::int64_t step, bool training) {
    state_ = State::Idle;
    check_contiguous(h0, "h0");
    DR2NET_CHECK(h0.shape().rank() >= 1 && h0.numel() > 0, "h0 must be a non-empty tensor, got shape ", h0.shape());
    DR2NET_CHECK(step >= 0, "negative training step ", step);
    shape_ = h0.shape();
    step_ = step;
    check_stream_arg(out, "out");

    const bool standard = options_.mode == BackpropMode::Standard && training;
    // Validate everything before touching any buffer: coefficients and functions' shapes.
    std::size_t scratch = 0;
    saved_sizes_.assign(static_cast<std::size_t>(num_modules()), 0);
    for (int l = 0; l < num_layers(); ++l) {
      for (int m = 2 * l; m < 2 * l + 2; ++m) {
        if (training && !standard)
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

    const auto n = static_cast<std::size_t>(shape_.numel());
    ctx_->reserve(x_, n, MemoryCategory::Streams);
    ctx_->reserve(y_, n, MemoryCategory::Streams);
    workspace_.prepare(*ctx_, shape_, scratch);
    if (standard) {
      std::size_t saved_total = 0;
      for (std::size_t s : saved_sizes_) saved_total += s;
      ctx_->reserve(stored_inputs_, n * saved_sizes_.size(), MemoryCategory::SavedActivations);
      ctx_->reserve(stored_saved_, saved_total, MemoryCategory::SavedActivations);
    }

    auto x = x_.view(shape_), y = y_.view(shape_);
    for_each_index(*ctx_, n, ConvertCopy<S, S>{x.data(), h0.data()});  // x_0 = y_0 = h0
    for_each_index(*ctx_, n, ConvertCopy<S, S>{y.data(), h0.data()});
    for (int l = 0; l < num_layers(); ++l) {
      auto storage = standard ? layer_storage(l) : typename Block::storage_type{};
      layers_[static_cast<std::size_t>(l)].forward(*ctx_, schedule_, layer_call(l, training), x, y, workspace_,
                                                   standard ? &storage : nullptr);
    }
    using A = accumulate_type;
    if (options_.output == StackOutput::LastStream)
      for_each_index(*ctx_, n, ConvertCopy<S, S>{out.data(), y.data()});
    else
      for_each_index(*ctx_, n, ScaledSum<S, A>{out.data(), x.data(), y.data(), A(0.5)});
  }

  //! Views of layer l's standard-mode storage inside the two stored arenas.
  typename Block::storage_type layer_storage(int l) {
    const auto n = static_cast<std::size_t>(shape_.numel());
    std::size_t offset = 0;
    for (int m = 0; m < 2 * l; ++m) offset += saved_sizes_[static_cast<std::size_t>(m)];
    const std::size_t sf = saved_sizes_[static_cast<std::size_t>(2 * l)];
    const std::size_t sg = saved_sizes_[static_cast<std::size_t>(2 * l + 1)];
    S* inputs = stored_inputs_.data() + static_cast<std::size_t>(2 * l) * n;
    C* saved = stored_saved_.data() + offset;
    return {TensorView<S>(inputs, shape_), TensorView<S>(inputs + n, shape_),
            TensorView<C>(saved, Shape{static_cast<std::int64_t>(sf)}),
            TensorView<C>(saved + sf, Shape{static_cast<std::int64_t>(sg)})};
  }

  context_type* ctx_;
  std::vector<Block> layers_;
  schedule_type schedule_;
  StackOptions options_;
  MeterReservation parameter_bytes_, gradient_bytes_;

  State state_ = State::Idle;
  Shape shape_;
  std::int64_t step_ = 0;
  std::vector<std::size_t> saved_sizes_;
  buffer_t<context_type, S> x_, y_, grad_x_, grad_y_, stored_inputs_;
  buffer_t<context_type, C> stored_saved_;
  typename Block::workspace_type workspace_;
};

}  // namespace dr2net
