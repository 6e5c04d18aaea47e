#pragma once
//! \file
//! Stages<Parts...>: one network made of reversible stacks (its stages) and the ordinary,
//! non-reversible layers between them (transitions: patch merging, a patch embedding, a user's
//! layer), with one forward, one backward, one parameter list and one memory report (DESIGN §3).
//!
//!   h0 -> part 0 -> a_1 -> part 1 -> a_2 -> ... -> part K-1 -> out
//!
//! A part is a ReversibleStack (activation memory independent of its depth, in whatever mode
//! it is set to) or a *transition*: a layer that keeps its activations as usual. The
//! transition contract (concept Transition, checked at compile time with a message naming the
//! missing member), over a backend context Ctx and views of its memory:
//!
//!   using value_type = T;  using context_type = Ctx;            (Ctx defaults to HostContext)
//!   Shape output_shape(const Shape& in) const;                  throws for an input it cannot take
//!   std::size_t saved_bytes(const Shape& in) const;             what forward keeps for that input
//!   void forward(Ctx&, ConstView<T> in, TensorView<T> out);     keeps what backward needs (metered
//!                                                               as SavedActivations), replacing
//!                                                               what an earlier forward kept
//!   void backward(Ctx&, ConstView<T> dout, TensorView<T> din);  parameter gradients accumulate;
//!                                                               din is written, not accumulated;
//!                                                               releases what forward kept
//!   void for_each_parameter(visit);                             visit(name, value, grad)
//!   void zero_grad();
//!
//! and optionally `void predict(Ctx&, ConstView<T>, TensorView<T>)` (inference, keeping
//! nothing; forward is used without it), `void release_workspace()`, `Ctx& context()` (checked
//! against the composition's context), `using parameter_type` (the element type of its
//! parameters when it is not value_type) and `static constexpr std::string_view type_name`.
//! modules/patch_merging.hpp's PatchMerging is one.
//!
//! Shapes. Dimension 0 of every shape is the batch. The composition is built for an input
//! shape; each part runs on the previous part's output shape, or on a shape the user gives
//! for it (StagePart::input_shape) that is *reshape-compatible* with it: the same element
//! count, batch and last dimension (contiguous views of one buffer, so a stack of ViT-style
//! functions on token rows [B, H W, C] can follow a layer that produces a map [B, H, W, C]).
//! A stack's output has its input's shape; a transition's is its output_shape(). The whole
//! chain is checked at construction (every stack's functions are asked whether they accept
//! their streams' shape), and errors name the part. forward() accepts any batch size: the
//! other dimensions are fixed.
//!
//! Memory. The composition owns the activations between parts (MemoryCategory::
//! SavedActivations, one buffer per boundary; with StagesOptions::keep_stage_inputs = false
//! two buffers reused in turn) and two gradient buffers used in turn by backward (Scratch),
//! all cached between steps and released by release_workspace(). memory_report() lists what
//! every part holds by category (bytes the part allocated through the composition's calls,
//! taken from the context's meter around each call), the boundaries' buffers, the parameters
//! and the totals: for a context that holds nothing else, the totals are the meter's.

#include <algorithm>
#include <array>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// core first: block/reversible_dual_residual.hpp names MemoryCategory without including
// core/memory_meter.hpp.
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/moved_from.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/block/residual_function.hpp"
#include "dr2net/block/reversible_dual_residual.hpp"
#include "dr2net/block/stack.hpp"

namespace dr2net {

//! True for ReversibleStack<Block> (the parts Stages runs as stacks), false for anything else.
template <class P>
struct is_reversible_stack : std::false_type {};
//! A ReversibleStack is a stack part.
template <class Block>
struct is_reversible_stack<ReversibleStack<Block>> : std::true_type {};
//! Whether P is a ReversibleStack (is_reversible_stack).
template <class P>
inline constexpr bool is_reversible_stack_v = is_reversible_stack<P>::value;

namespace detail {
template <class L>
struct transition_parameter_of {
  using type = typename value_type_of<L>::type;
};
template <class L>
  requires requires { typename L::parameter_type; }
struct transition_parameter_of<L> {
  using type = typename L::parameter_type;
};
}  // namespace detail

//! The element type of a transition's parameters: L::parameter_type when declared, else its value_type.
template <class L>
using transition_parameter_t = typename detail::transition_parameter_of<L>::type;

// One concept per requirement, so a failed check can say which member is missing.
//! L has `forward(Ctx&, ConstView<T> in, TensorView<T> out)`.
template <class L, class T = typename detail::value_type_of<L>::type, class C = context_type_t<L>,
          class S = function_space_t<L>>
concept HasTransitionForward = requires(L& l, C& ctx, ConstView<T, S> in, TensorView<T, S> out) {
  l.forward(ctx, in, out);
};
//! L has `backward(Ctx&, ConstView<T> dout, TensorView<T> din)`.
template <class L, class T = typename detail::value_type_of<L>::type, class C = context_type_t<L>,
          class S = function_space_t<L>>
concept HasTransitionBackward = requires(L& l, C& ctx, ConstView<T, S> dout, TensorView<T, S> din) {
  l.backward(ctx, dout, din);
};
//! L has the optional `predict(Ctx&, ConstView<T> in, TensorView<T> out)`.
template <class L, class T = typename detail::value_type_of<L>::type, class C = context_type_t<L>,
          class S = function_space_t<L>>
concept HasTransitionPredict = requires(L& l, C& ctx, ConstView<T, S> in, TensorView<T, S> out) {
  l.predict(ctx, in, out);
};
//! L has `Shape output_shape(const Shape&) const`.
template <class L>
concept HasOutputShape = requires(const L& l, const Shape& s) {
  { l.output_shape(s) } -> std::convertible_to<Shape>;
};
//! L has `std::size_t saved_bytes(const Shape&) const`.
template <class L>
concept HasSavedBytes = requires(const L& l, const Shape& s) {
  { l.saved_bytes(s) } -> std::convertible_to<std::size_t>;
};
//! L has `void zero_grad()`.
template <class L>
concept HasZeroGrad = requires(L& l) { l.zero_grad(); };

//! A non-reversible layer usable as a part of Stages (the contract of the file comment).
template <class L>
concept Transition = std::move_constructible<L> && HasFloatingValueType<L> && HasOutputShape<L> &&
                     HasSavedBytes<L> && HasTransitionForward<L> && HasTransitionBackward<L> &&
                     HasParameters<L, transition_parameter_t<L>> && HasZeroGrad<L>;

//! Fails compilation with a message naming the first requirement L misses.
template <class L>
constexpr bool check_transition() {
  static_assert(HasFloatingValueType<L>,
                "dr2net: transition lacks `using value_type = float;` (or double): the type of its input and output");
  static_assert(!HasFloatingValueType<L> || HasOutputShape<L>,
                "dr2net: transition lacks `dr2net::Shape output_shape(const dr2net::Shape& in) const`");
  static_assert(!HasFloatingValueType<L> || HasSavedBytes<L>,
                "dr2net: transition lacks `std::size_t saved_bytes(const dr2net::Shape& in) const`");
  static_assert(!HasFloatingValueType<L> || HasTransitionForward<L>,
                "dr2net: transition lacks `void forward(Ctx&, dr2net::ConstView<T> in, dr2net::TensorView<T> out)`");
  static_assert(!HasFloatingValueType<L> || HasTransitionBackward<L>,
                "dr2net: transition lacks `void backward(Ctx&, dr2net::ConstView<T> dout, dr2net::TensorView<T> din)`");
  static_assert(!HasFloatingValueType<L> || HasParameters<L, transition_parameter_t<L>>,
                "dr2net: transition lacks `template <class V> void for_each_parameter(V&& visit)` calling "
                "visit(name, value_view, grad_view)");
  static_assert(HasZeroGrad<L>, "dr2net: transition lacks `void zero_grad()`");
  static_assert(std::move_constructible<L>, "dr2net: transition must be move-constructible");
  return Transition<L>;
}

namespace detail {

//! What Stages needs to know of a part: a stack's types, or a transition's (checked).
template <class P, bool Stack = is_reversible_stack_v<P>>
struct stage_part_traits;
template <class P>
struct stage_part_traits<P, true> {
  using value_type = typename P::value_type;
  using context_type = typename P::context_type;
  using parameter_type = typename P::compute_type;
};
template <class P>
struct stage_part_traits<P, false> {
  static_assert(check_transition<P>(), "dr2net: a part of Stages is neither a ReversibleStack nor a transition "
                                       "(see above)");
  using value_type = typename value_type_of<P>::type;
  using context_type = context_type_t<P>;
  using parameter_type = transition_parameter_t<P>;
};

template <class First, class... Rest>
struct first_of {
  using type = First;
};

}  // namespace detail

//! One part of a Stages composition as the user hands it over: the part itself, the prefix of
//! its parameter names, and optionally the shape it runs on.
//! \tparam P a ReversibleStack or a Transition
template <class P>
struct StagePart {
  //! Prepended to the part's own parameter names: "layers.0." for a Swin stage (whose stack
  //! adds "blocks.{j}."), "layers.1.downsample." for the merge that starts stage 1.
  std::string prefix;
  P part;  //!< The part, owned by the composition once it is built.
  //! The shape the part runs on, batch first (at the batch the composition is built for):
  //! empty to run on the previous part's output shape, else reshape-compatible with it.
  std::optional<Shape> input_shape{};
};

//! A StagePart of `part` (moved in) with parameter prefix `prefix`, running on `input_shape`
//! when given (see StagePart::input_shape).
template <class P>
StagePart<std::remove_cvref_t<P>> stage_part(std::string prefix, P&& part, std::optional<Shape> input_shape = std::nullopt) {
  return {std::move(prefix), std::forward<P>(part), std::move(input_shape)};
}

//! Settings of a Stages composition.
struct StagesOptions {
  //! Keep the input of every part from forward to backward (one activation buffer per
  //! boundary), so that each stack's backward receives its own input and its reconstruction
  //! monitor compares the whole of it. false: two activation buffers reused in turn, and the
  //! stacks after the first compare the sample they keep (StackOptions::monitor_samples).
  bool keep_stage_inputs = true;
};

//! What one part of a Stages composition holds, from its calls through the composition.
struct StagePartMemory {
  std::string prefix;  //!< The part's parameter prefix.
  std::string kind;    //!< "reversible stack (reversible mode, 2 layers)", "transition PatchMerging", ...
  Shape input_shape;   //!< The shape it runs on at the batch of the last forward (or of construction).
  Shape output_shape;  //!< The shape it produces there.
  //! Bytes held now, by MemoryCategory (index static_cast<int>(category)): for a stack its
  //! streams and stream gradients (Streams), module workspace (Scratch), standard mode's
  //! stored internals and error-bounded snapshots (SavedActivations), side bits, check flags
  //! and monitor samples (Other); for a transition what its forward kept (SavedActivations).
  std::array<std::size_t, kMemoryCategoryCount> bytes{};
  std::size_t activation_bytes = 0;   //!< Of bytes, the activation categories (is_activation()).
  //! Its activation bytes right after the last training forward of the composition: what it
  //! kept for backward (0 before the first one).
  std::size_t kept_for_backward = 0;
  std::size_t parameter_bytes = 0;    //!< Bytes of its parameters (its gradients hold as many).
};

//! One memory report of a Stages composition (memory_report()).
struct StagesMemoryReport {
  std::vector<StagePartMemory> parts;       //!< One entry per part, in order.
  std::size_t boundary_activation_bytes = 0;  //!< The activations between parts held now (SavedActivations).
  std::size_t boundary_gradient_bytes = 0;    //!< The two between-part gradient buffers held now (Scratch).
  //! The between-part activations held right after the last training forward.
  std::size_t boundary_kept_for_backward = 0;
  //! Totals by MemoryCategory: the parts, the boundaries, and the parameters and gradients of
  //! every part (Parameters, Gradients). For a context that holds nothing else they equal the
  //! meter's current bytes per category.
  std::array<std::size_t, kMemoryCategoryCount> bytes{};
  std::size_t activation_bytes = 0;   //!< Total activation bytes held now (parts and boundaries).
  std::size_t kept_for_backward = 0;  //!< Total activation bytes held right after the last training forward.
  std::size_t total_bytes = 0;        //!< Every category's total.
  std::size_t meter_current_activation = 0;  //!< The context meter's activation bytes now (whole context).
  std::size_t meter_peak_activation = 0;     //!< The context meter's peak activation bytes (whole context).

  //! Bytes of `category` in the totals.
  std::size_t of(MemoryCategory category) const { return bytes[static_cast<std::size_t>(category)]; }

  //! One line per part, one for the boundaries, one for the totals and the meter, e.g.
  //! "part 1 'layers.1.downsample.' transition PatchMerging [2, 8, 8, 4] -> [2, 4, 4, 8]:
  //! activation 3.00 KiB (saved_activations 3.00 KiB), kept for backward 3.00 KiB, parameters 608 B".
  std::string str() const {
    std::string s;
    const auto categories = [](const std::array<std::size_t, kMemoryCategoryCount>& b, bool activation) {
      std::string c;
      for (std::size_t i = 0; i < kMemoryCategoryCount; ++i) {
        const auto cat = static_cast<MemoryCategory>(i);
        if (b[i] == 0 || is_activation(cat) != activation) continue;
        c += (c.empty() ? "" : ", ") + std::string(category_name(cat)) + " " + MemoryMeter::human_bytes(b[i]);
      }
      return c;
    };
    for (std::size_t k = 0; k < parts.size(); ++k) {
      const StagePartMemory& p = parts[k];
      const std::string act = categories(p.bytes, true), other = categories(p.bytes, false);
      s += "part " + std::to_string(k) + " '" + p.prefix + "' " + p.kind + " " + p.input_shape.str() + " -> " +
           p.output_shape.str() + ": activation " + MemoryMeter::human_bytes(p.activation_bytes) +
           (act.empty() ? "" : " (" + act + ")") + ", kept for backward " +
           MemoryMeter::human_bytes(p.kept_for_backward) + (other.empty() ? "" : ", " + other) + ", parameters " +
           MemoryMeter::human_bytes(p.parameter_bytes) + "\n";
    }
    s += "between parts: activations " + MemoryMeter::human_bytes(boundary_activation_bytes) + " (kept for backward " +
         MemoryMeter::human_bytes(boundary_kept_for_backward) + "), gradients " +
         MemoryMeter::human_bytes(boundary_gradient_bytes) + "\n";
    s += "total: activation " + MemoryMeter::human_bytes(activation_bytes) + " (kept for backward " +
         MemoryMeter::human_bytes(kept_for_backward) + "; " + categories(bytes, true) + "), " +
         categories(bytes, false) + ", all " + MemoryMeter::human_bytes(total_bytes) +
         "; context meter: activation " + MemoryMeter::human_bytes(meter_current_activation) + ", peak " +
         MemoryMeter::human_bytes(meter_peak_activation) + "\n";
    return s;
  }
};

//! A chain of reversible stacks and transitions trained as one network (see the file
//! comment): one forward(), predict() and backward(), parameters named per part, one mode
//! switch for every stack, one memory report. Owns its parts and refers to the context,
//! which must outlive it and is the context of every part. One composition serves one
//! forward/backward sequence at a time, on the calling thread. A moved-from composition
//! refuses every call.
//!
//! \tparam Parts each a ReversibleStack<Block> or a type satisfying Transition; all of one
//!         context_type and one value_type (the type of h0, out and every activation between)
template <class... Parts>
class Stages {
  static_assert(sizeof...(Parts) >= 1, "dr2net: Stages needs at least one part");
  using First = typename detail::first_of<Parts...>::type;

 public:
  //! The backend context every part runs on.
  using context_type = typename detail::stage_part_traits<First>::context_type;
  //! Where h0, out, the activations between parts and the parameters live.
  using memory_space = memory_space_t<context_type>;
  //! Type of h0, out, dout, dh0 and of every activation between parts.
  using value_type = typename detail::stage_part_traits<First>::value_type;
  //! Element type of the first part's parameters (parameters() needs every part's to be this).
  using parameter_type = typename detail::stage_part_traits<First>::parameter_type;
  //! A view of the backend's memory.
  template <class U>
  using TensorView = dr2net::TensorView<U, memory_space>;
  //! A read-only view of the backend's memory.
  template <class U>
  using ConstView = dr2net::TensorView<const U, memory_space>;
  //! Number of parts K.
  static constexpr std::size_t num_parts = sizeof...(Parts);
  //! The type of part I.
  template <std::size_t I>
  using part_type = std::tuple_element_t<I, std::tuple<Parts...>>;
  //! Whether every part's parameters are of parameter_type (parameters() is then available).
  static constexpr bool uniform_parameters =
      (std::is_same_v<parameter_type, typename detail::stage_part_traits<Parts>::parameter_type> && ...);

 private:
  static_assert((std::is_same_v<context_type, typename detail::stage_part_traits<Parts>::context_type> && ...),
                "dr2net: every part of Stages must run on the same context_type");
  static_assert((std::is_same_v<value_type, typename detail::stage_part_traits<Parts>::value_type> && ...),
                "dr2net: every part of Stages must have the same value_type (the type of the activations that pass "
                "between them)");

 public:
  //! Builds the chain for inputs of shape `input` (batch first) with default options; see the
  //! next constructor.
  Stages(context_type& ctx, Shape input, StagePart<Parts>... parts)
      : Stages(ctx, std::move(input), StagesOptions{}, std::move(parts)...) {}

  //! Takes the parts (in order) and checks the shape chain for inputs of shape `input`: every
  //! given input_shape reshape-compatible with the previous output, every stack's functions
  //! accepting their streams' shape, every transition accepting its input, every output
  //! keeping the batch. Releases each part's cached buffers (release_workspace()), so the
  //! memory report accounts for everything the parts allocate from here on. Throws
  //! dr2net::Error naming the part (index, prefix, kind) and the shapes, or when a part runs
  //! on another context than `ctx`.
  Stages(context_type& ctx, Shape input, StagesOptions options, StagePart<Parts>... parts)
      : ctx_(&ctx), options_(options), input_(std::move(input)), parts_(std::move(parts.part)...),
        info_{{PartInfo{std::move(parts.prefix), std::move(parts.input_shape)}...}} {
    DR2NET_CHECK(input_.rank() >= 1 && input_.numel() > 0, "Stages: the input shape must be non-empty with the "
                 "batch first, got ", input_);
    for_each_part([&](auto k) {
      auto& p = std::get<decltype(k)::value>(parts_);
      using P = std::remove_cvref_t<decltype(p)>;
      if constexpr (is_reversible_stack_v<P>) {
        DR2NET_CHECK(&p.context() == ctx_, "Stages: ", describe(k()), " runs on another context than the composition");
      } else if constexpr (requires { p.context(); }) {
        DR2NET_CHECK(&p.context() == ctx_, "Stages: ", describe(k()), " runs on another context than the composition");
      }
      release_part(p);
      p.for_each_parameter([&](std::string_view, auto value, auto) {
        info_[k()].parameter_bytes += value.size() * sizeof(*value.data());
      });
    });
    chain_ = chain_for(input_, true);
    chain_input_ = input_;
  }

  //! A moved-from composition refuses every call with dr2net::Error.
  Stages(Stages&&) = default;
  //! Takes over the source's parts, buffers and records; the source then refuses every call.
  Stages& operator=(Stages&&) = default;
  Stages(const Stages&) = delete;
  Stages& operator=(const Stages&) = delete;
  ~Stages() = default;

  //! Part I (a ReversibleStack or a transition), e.g. to set one stage's mode or schedule.
  //! Changing a part discards nothing here: change parts between steps only.
  template <std::size_t I>
  auto& part() {
    live("Stages::part()");
    static_assert(I < num_parts, "dr2net: Stages::part<I>(): I is out of range");
    return std::get<I>(parts_);
  }
  //! The parameter prefix of part k; throws dr2net::Error unless k < num_parts.
  const std::string& prefix(std::size_t k) const {
    live("Stages::prefix()");
    check_index(k, "prefix()");
    return info_[k].prefix;
  }
  //! The shape part k runs on at the batch of the last forward (or of construction).
  const Shape& part_input_shape(std::size_t k) const {
    live("Stages::part_input_shape()");
    check_index(k, "part_input_shape()");
    return chain_[k].in;
  }
  //! The shape part k produces at the batch of the last forward (or of construction).
  const Shape& part_output_shape(std::size_t k) const {
    live("Stages::part_output_shape()");
    check_index(k, "part_output_shape()");
    return chain_[k].out;
  }
  //! The input shape given at construction (the batch it was built for).
  const Shape& input_shape() const {
    live("Stages::input_shape()");
    return input_;
  }
  //! The shape of `out` for an input of batch `batch` (the input shape with dimension 0 = batch).
  Shape output_shape(std::int64_t batch) const {
    live("Stages::output_shape()");
    DR2NET_CHECK(batch > 0, "Stages::output_shape(): batch must be positive, got ", batch);
    return chain_for(with_batch(input_, batch), false).back().out;
  }
  //! The options given at construction.
  const StagesOptions& options() const {
    live("Stages::options()");
    return options_;
  }
  //! The context given at construction.
  context_type& context() const {
    live("Stages::context()");
    return *ctx_;
  }

  //! Sets the mode of every stack's next training forward (ReversibleStack::set_mode; one
  //! stage alone: part<I>().set_mode()); discards a pending forward.
  void set_mode(BackpropMode mode) {
    live("Stages::set_mode()");
    for_each_part([&](auto k) {
      auto& p = std::get<decltype(k)::value>(parts_);
      if constexpr (is_reversible_stack_v<std::remove_cvref_t<decltype(p)>>) p.set_mode(mode);
    });
    state_ = State::Idle;
  }

  //! Training forward at `step`: h0 (the input shape at any batch, contiguous) through every
  //! part into out (output_shape(batch)). Each stack runs in its own mode; each transition
  //! keeps what its backward needs. Prepares one backward(). Errors raised by a part come back
  //! prefixed with the part ("Stages: part 1 ('layers.1.downsample.', transition PatchMerging)
  //! forward: ...").
  void forward(ConstView<value_type> h0, TensorView<value_type> out, std::int64_t step) {
    live("Stages::forward()");
    run_forward(h0, out, step, true);
    for (std::size_t k = 0; k < num_parts; ++k) info_[k].kept = activation_of(info_[k].held);
    boundary_kept_ = clamp(own_held_[static_cast<std::size_t>(MemoryCategory::SavedActivations)]);
    state_ = State::Forwarded;
  }

  //! Inference forward: every stack's predict() and every transition's predict() (its
  //! forward() when it has none); no dropout, nothing prepared for backward (a pending
  //! forward is discarded).
  void predict(ConstView<value_type> h0, TensorView<value_type> out, std::int64_t step) {
    live("Stages::predict()");
    run_forward(h0, out, step, false);
  }

  //! Backward of the last forward given dout = dL/dout: dh0 = dL/dh0 is written, parameter
  //! gradients of every part accumulate (zero_grad() between steps). Parts run last to first,
  //! each stack's backward given its own input (kept in forward, see
  //! StagesOptions::keep_stage_inputs; for the first stack, `h0` when given) for its
  //! reconstruction monitor. Throws dr2net::Error without a pending training forward, when
  //! called twice for one forward, for a dout or dh0 of the wrong shape, and for what a part
  //! raises (prefixed with the part).
  void backward(ConstView<value_type> dout, TensorView<value_type> dh0, ConstView<value_type> h0 = {}) {
    live("Stages::backward()");
    DR2NET_CHECK(state_ != State::BackwardDone,
                 "Stages::backward() called twice for one forward(): the forward's state was consumed by the first "
                 "backward");
    DR2NET_CHECK(state_ == State::Forwarded, "Stages::backward() called without a preceding training forward()");
    state_ = State::Idle;  // whatever happens next, this forward's state is spent
    check_contiguous(dout, "Stages backward: dout");
    check_shape(dout, chain_.back().out, "Stages backward: dout");
    check_contiguous(dh0, "Stages backward: dh0");
    check_shape(dh0, chain_input_, "Stages backward: dh0");
    if (h0.data() != nullptr) {
      check_contiguous(h0, "Stages backward: h0");
      check_shape(h0, chain_input_, "Stages backward: h0");
    }
    if constexpr (num_parts > 1) {
      std::array<std::size_t, 2> largest{};  // boundary j's gradient lives in buffer j % 2
      for (std::size_t j = 1; j < num_parts; ++j) largest[j % 2] = std::max(largest[j % 2], chain_[j].in_elements());
      HeldScope own(ctx_->meter(), own_held_);
      for (std::size_t b = 0; b < 2; ++b)
        if (largest[b] > 0) ctx_->reserve(grads_[b], largest[b], MemoryCategory::Scratch, "Stages: gradient between parts");
    }
    for_each_part_reversed([&](auto k) {
      constexpr std::size_t K = decltype(k)::value;
      auto& p = std::get<K>(parts_);
      using P = std::remove_cvref_t<decltype(p)>;
      const ConstView<value_type> gout = K + 1 == num_parts ? dout : gradient(K + 1, chain_[K].out);
      const TensorView<value_type> gin = K == 0 ? dh0.reshaped(chain_[0].in) : gradient(K, chain_[K].in);
      run_part(K, "backward", [&] {
        if constexpr (is_reversible_stack_v<P>) {
          ConstView<value_type> input{};
          if (K == 0 && h0.data() != nullptr) input = h0.reshaped(chain_[0].in);
          if (K > 0 && options_.keep_stage_inputs) input = activation(K, chain_[K].in);
          p.backward(gout, gin, input);
        } else {
          p.backward(*ctx_, gout, gin);
        }
      });
    });
    state_ = State::BackwardDone;
  }

  //! Sets every parameter gradient of every part to zero.
  void zero_grad() {
    live("Stages::zero_grad()");
    for_each_part([&](auto k) { std::get<decltype(k)::value>(parts_).zero_grad(); });
  }

  //! Calls visit(name, value, grad) for every parameter of every part, in part order, as
  //! prefix(k) + the part's own name ("layers.0." + "blocks.1.norm1.weight").
  template <class Visit>
  void for_each_parameter(Visit&& visit) {
    live("Stages::for_each_parameter()");
    for_each_part([&](auto k) {
      const std::string& prefix = info_[k()].prefix;
      std::string name;
      std::get<decltype(k)::value>(parts_).for_each_parameter([&](std::string_view own, auto value, auto grad) {
        name.assign(prefix).append(own);
        visit(std::string_view(name), value, grad);
      });
    });
  }

  //! Every parameter with its gradient, in for_each_parameter()'s order (what an optimizer
  //! such as optim::AdamW takes).
  std::vector<NamedParameter<parameter_type, memory_space>> parameters()
    requires uniform_parameters
  {
    live("Stages::parameters()");
    std::vector<NamedParameter<parameter_type, memory_space>> out;
    for_each_parameter([&](std::string_view name, TensorView<parameter_type> v, TensorView<parameter_type> g) {
      out.push_back({std::string(name), v, g});
    });
    return out;
  }

  //! Frees every cached buffer: the parts' (ReversibleStack::release_workspace(), a
  //! transition's release_workspace() where it has one) and the composition's own; a pending
  //! forward is discarded.
  void release_workspace() {
    live("Stages::release_workspace()");
    for_each_part([&](auto k) {
      HeldScope scope(ctx_->meter(), info_[k()].held);
      release_part(std::get<decltype(k)::value>(parts_));
    });
    HeldScope own(ctx_->meter(), own_held_);
    for (auto& a : activations_) a.reset();
    for (auto& g : grads_) g.reset();
    state_ = State::Idle;
  }

  //! What every part and the composition hold now (see StagesMemoryReport).
  StagesMemoryReport memory_report() const {
    live("Stages::memory_report()");
    StagesMemoryReport r;
    for_each_part([&](auto k) {
      const PartInfo& info = info_[k()];
      StagePartMemory m;
      m.prefix = info.prefix;
      m.kind = kind(k());
      m.input_shape = chain_[k()].in;
      m.output_shape = chain_[k()].out;
      for (std::size_t c = 0; c < kMemoryCategoryCount; ++c) m.bytes[c] = clamp(info.held[c]);
      m.activation_bytes = activation_of(info.held);
      m.kept_for_backward = info.kept;
      m.parameter_bytes = info.parameter_bytes;
      for (std::size_t c = 0; c < kMemoryCategoryCount; ++c) r.bytes[c] += m.bytes[c];
      r.bytes[static_cast<std::size_t>(MemoryCategory::Parameters)] += m.parameter_bytes;
      r.bytes[static_cast<std::size_t>(MemoryCategory::Gradients)] += m.parameter_bytes;
      r.activation_bytes += m.activation_bytes;
      r.kept_for_backward += m.kept_for_backward;
      r.parts.push_back(std::move(m));
    });
    r.boundary_activation_bytes = clamp(own_held_[static_cast<std::size_t>(MemoryCategory::SavedActivations)]);
    r.boundary_gradient_bytes = clamp(own_held_[static_cast<std::size_t>(MemoryCategory::Scratch)]);
    r.boundary_kept_for_backward = boundary_kept_;
    for (std::size_t c = 0; c < kMemoryCategoryCount; ++c) r.bytes[c] += clamp(own_held_[c]);
    r.activation_bytes += activation_of(own_held_);
    r.kept_for_backward += boundary_kept_;
    for (std::size_t c = 0; c < kMemoryCategoryCount; ++c) r.total_bytes += r.bytes[c];
    r.meter_current_activation = ctx_->meter().current_activation();
    r.meter_peak_activation = ctx_->meter().peak_activation();
    return r;
  }

 private:
  enum class State { Idle, Forwarded, BackwardDone };
  using Held = std::array<std::int64_t, kMemoryCategoryCount>;

  //! One part's shapes at the current batch.
  struct Link {
    Shape in, out;
    std::size_t in_elements() const { return static_cast<std::size_t>(in.numel()); }
  };

  //! What the composition keeps per part besides the part.
  struct PartInfo {
    std::string prefix;
    std::optional<Shape> given;  //!< the input shape the user gave (at the construction batch)
    Held held{};                 //!< bytes by category the part allocated through our calls, net
    std::size_t kept = 0;        //!< its activation bytes after the last training forward
    std::size_t parameter_bytes = 0;
  };

  //! Adds the change of the meter's current bytes per category over its lifetime to `held`
  //! (also when the call it spans throws).
  class HeldScope {
   public:
    HeldScope(const MemoryMeter& meter, Held& held) : meter_(meter), held_(held) {
      for (std::size_t c = 0; c < kMemoryCategoryCount; ++c) before_[c] = meter.current(static_cast<MemoryCategory>(c));
    }
    HeldScope(const HeldScope&) = delete;
    HeldScope& operator=(const HeldScope&) = delete;
    ~HeldScope() {
      for (std::size_t c = 0; c < kMemoryCategoryCount; ++c)
        held_[c] += static_cast<std::int64_t>(meter_.current(static_cast<MemoryCategory>(c))) -
                    static_cast<std::int64_t>(before_[c]);
    }

   private:
    const MemoryMeter& meter_;
    Held& held_;
    std::array<std::size_t, kMemoryCategoryCount> before_{};
  };

  static std::size_t clamp(std::int64_t bytes) { return bytes > 0 ? static_cast<std::size_t>(bytes) : 0; }
  static std::size_t activation_of(const Held& held) {
    std::size_t s = 0;
    for (std::size_t c = 0; c < kMemoryCategoryCount; ++c)
      if (is_activation(static_cast<MemoryCategory>(c))) s += clamp(held[c]);
    return s;
  }

  template <class Fn>
  void for_each_part(Fn&& fn) {
    [&]<std::size_t... I>(std::index_sequence<I...>) { (fn(std::integral_constant<std::size_t, I>{}), ...); }(
        std::make_index_sequence<num_parts>{});
  }
  template <class Fn>
  void for_each_part(Fn&& fn) const {
    [&]<std::size_t... I>(std::index_sequence<I...>) { (fn(std::integral_constant<std::size_t, I>{}), ...); }(
        std::make_index_sequence<num_parts>{});
  }
  template <class Fn>
  void for_each_part_reversed(Fn&& fn) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (fn(std::integral_constant<std::size_t, num_parts - 1 - I>{}), ...);
    }(std::make_index_sequence<num_parts>{});
  }

  //! Refuses any call on a composition that was moved from.
  void live(const char* call) const { moved_.check(call); }

  void check_index(std::size_t k, const char* call) const {
    DR2NET_CHECK(k < num_parts, "Stages::", call, ": part ", k, " out of range (the composition has ", num_parts,
                 " parts)");
  }

  //! "reversible stack (reversible mode, 2 layers)" or "transition PatchMerging".
  std::string kind(std::size_t k) const {
    std::string s;
    for_each_part([&](auto i) {
      if (i() != k) return;
      const auto& p = std::get<decltype(i)::value>(parts_);
      using P = std::remove_cvref_t<decltype(p)>;
      if constexpr (is_reversible_stack_v<P>) {
        s = "reversible stack (" + std::string(mode_name(p.mode())) + " mode, " + std::to_string(p.num_layers()) +
            (p.num_layers() == 1 ? " layer)" : " layers)");
      } else if constexpr (requires { P::type_name; }) {
        s = "transition " + std::string(P::type_name);
      } else {
        s = "transition";
      }
    });
    return s;
  }

  //! "part 1 ('layers.1.downsample.', transition PatchMerging)"
  std::string describe(std::size_t k) const {
    return "part " + std::to_string(k) + " ('" + info_[k].prefix + "', " + kind(k) + ")";
  }

  //! Runs part k's call `what`, recording what it allocates and prefixing its errors.
  template <class Fn>
  void run_part(std::size_t k, const char* what, Fn&& fn) {
    HeldScope scope(ctx_->meter(), info_[k].held);
    try {
      fn();
    } catch (const Error& e) {
      DR2NET_FAIL("Stages: ", describe(k), " ", what, ": ", e.detail());
    }
  }

  template <class P>
  static void release_part(P& p) {
    if constexpr (requires { p.release_workspace(); }) p.release_workspace();
  }

  static Shape with_batch(const Shape& s, std::int64_t batch) {
    std::int64_t dims[kMaxRank] = {};
    for (int d = 0; d < s.rank(); ++d) dims[d] = s[d];
    dims[0] = batch;
    return Shape(std::span<const std::int64_t>(dims, static_cast<std::size_t>(s.rank())));
  }

  //! Equal, or the same element count, batch and last dimension.
  static bool compatible(const Shape& a, const Shape& b) {
    if (a == b) return true;
    return a.rank() >= 1 && b.rank() >= 1 && a.numel() == b.numel() && a[0] == b[0] && a.last() == b.last();
  }

  //! The shapes of every part for an input of shape `input` (its batch replacing the given
  //! shapes' dimension 0). With `validate`, asks every stack's functions whether they accept
  //! their streams' shape (the construction's check; forward's stacks check themselves).
  std::vector<Link> chain_for(const Shape& input, bool validate) const {
    std::vector<Link> chain(num_parts);
    const std::int64_t batch = input[0];
    for_each_part([&](auto k) {
      constexpr std::size_t K = decltype(k)::value;
      const auto& p = std::get<K>(parts_);
      using P = std::remove_cvref_t<decltype(p)>;
      const Shape prev = K == 0 ? input : chain[K - 1].out;
      const std::string from = K == 0 ? std::string("the input of the composition") : describe(K - 1);
      Shape in = prev;
      if (info_[K].given) {
        const Shape& given = *info_[K].given;
        DR2NET_CHECK(given.rank() >= 1 && given[0] == input_[0], "Stages: ", describe(K), " is given the input shape ",
                     given, " whose batch (dimension 0) is not the composition's ", input_[0], " (input shape ", input_,
                     ")");
        in = with_batch(given, batch);
        DR2NET_CHECK(compatible(prev, in), "Stages: ", describe(K), " is to run on shape ", in, " but ", from,
                     " has shape ", prev, ": the shapes must be equal or reshape-compatible (the same element count, "
                     "batch and last dimension)");
      }
      Shape out = in;
      if constexpr (is_reversible_stack_v<P>) {
        if (validate) {
          try {
            auto& stack = const_cast<P&>(p);  // layer() is not const; nothing is changed
            for (int l = 0; l < stack.num_layers(); ++l) {
              (void)stack.layer(l).saved_elements_f(in, l);
              (void)stack.layer(l).saved_elements_g(in, l);
            }
          } catch (const Error& e) {
            DR2NET_FAIL("Stages: ", describe(K), " cannot run on streams of shape ", in, ": ", e.detail());
          }
        }
      } else {
        try {
          out = p.output_shape(in);
        } catch (const Error& e) {
          DR2NET_FAIL("Stages: ", describe(K), " does not take its input of shape ", in, " (from ", from, "): ",
                      e.detail());
        }
        DR2NET_CHECK(out.rank() >= 1 && out[0] == batch && out.numel() > 0, "Stages: ", describe(K),
                     " maps its input ", in, " to ", out, ", which does not keep the batch (dimension 0) or is empty");
      }
      chain[K] = Link{in, out};
    });
    return chain;
  }

  //! Checks h0 and out, sizes the chain and the activation buffers for h0's batch.
  void prepare(const ConstView<value_type>& h0, const TensorView<value_type>& out) {
    check_contiguous(h0, "Stages forward: h0");
    const Shape& s = h0.shape();
    bool ok = s.rank() == input_.rank() && s.rank() >= 1 && s[0] > 0;
    for (int d = 1; ok && d < s.rank(); ++d) ok = s[d] == input_[d];
    DR2NET_CHECK(ok, "Stages forward: h0 has shape ", s, ", expected ", input_,
                 " with any batch > 0 in dimension 0 (the other dimensions are fixed at construction)");
    if (chain_input_ != s) {
      chain_ = chain_for(s, false);
      chain_input_ = s;
    }
    check_contiguous(out, "Stages forward: out");
    check_shape(out, chain_.back().out, "Stages forward: out");
    if constexpr (num_parts > 1) {
      HeldScope own(ctx_->meter(), own_held_);
      if (options_.keep_stage_inputs) {
        activations_.resize(num_parts - 1);
        for (std::size_t j = 1; j < num_parts; ++j)
          ctx_->reserve(activations_[j - 1], chain_[j].in_elements(), MemoryCategory::SavedActivations,
                        "Stages: activation between parts");
      } else {
        std::array<std::size_t, 2> largest{};  // boundary j lives in buffer (j - 1) % 2
        for (std::size_t j = 1; j < num_parts; ++j)
          largest[(j - 1) % 2] = std::max(largest[(j - 1) % 2], chain_[j].in_elements());
        activations_.resize(std::min<std::size_t>(2, num_parts - 1));
        for (std::size_t b = 0; b < activations_.size(); ++b)
          ctx_->reserve(activations_[b], largest[b], MemoryCategory::SavedActivations, "Stages: activation between parts");
      }
    }
  }

  //! Boundary j (the input of part j, 1 <= j < K) as `shape`.
  TensorView<value_type> activation(std::size_t j, const Shape& shape) const {
    const std::size_t slot = options_.keep_stage_inputs ? j - 1 : (j - 1) % 2;
    return activations_[slot].view(shape);
  }
  //! The gradient at boundary j as `shape`.
  TensorView<value_type> gradient(std::size_t j, const Shape& shape) const { return grads_[j % 2].view(shape); }

  void run_forward(ConstView<value_type> h0, TensorView<value_type> out, std::int64_t step, bool training) {
    state_ = State::Idle;
    prepare(h0, out);
    for_each_part([&](auto k) {
      constexpr std::size_t K = decltype(k)::value;
      auto& p = std::get<K>(parts_);
      using P = std::remove_cvref_t<decltype(p)>;
      const ConstView<value_type> in = K == 0 ? h0.reshaped(chain_[0].in) : ConstView<value_type>(activation(K, chain_[K].in));
      const TensorView<value_type> to = K + 1 == num_parts ? out : activation(K + 1, chain_[K].out);
      run_part(K, training ? "forward" : "predict", [&] {
        if constexpr (is_reversible_stack_v<P>) {
          if (training) p.forward(in, to, step);
          else p.predict(in, to, step);
        } else if constexpr (HasTransitionPredict<P>) {
          if (training) p.forward(*ctx_, in, to);
          else p.predict(*ctx_, in, to);
        } else {
          p.forward(*ctx_, in, to);
        }
      });
    });
  }

  context_type* ctx_;
  StagesOptions options_;
  Shape input_;
  std::tuple<Parts...> parts_;
  std::array<PartInfo, num_parts> info_;
  std::vector<Link> chain_;
  Shape chain_input_;  // the input shape chain_ is for (the last forward's, or the construction's)
  Held own_held_{};  // the composition's own buffers: activations (SavedActivations), gradients (Scratch)
  std::size_t boundary_kept_ = 0;
  std::vector<buffer_t<context_type, value_type>> activations_;
  std::array<buffer_t<context_type, value_type>, 2> grads_;
  State state_ = State::Idle;
  MovedFromGuard moved_;
};

//! Deduces Stages<P...> from its parts.
template <class Ctx, class... P>
Stages(Ctx&, Shape, StagePart<P>...) -> Stages<P...>;
//! Deduces Stages<P...> from its parts, with options.
template <class Ctx, class... P>
Stages(Ctx&, Shape, StagesOptions, StagePart<P>...) -> Stages<P...>;

}  // namespace dr2net
