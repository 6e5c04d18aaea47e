#pragma once
//! \file
//! The residual-function concept: what a user's attention, MLP or any other F must provide
//! to be wrapped in a Dr²Net block.
//!
//! A residual function F with `using value_type = T;` (its compute type) provides:
//!
//!   std::size_t saved_elements(const Shape& in) const;
//!       Elements of T the library must hand it as scratch for an input of shape `in`
//!       ([..., D]): its saved internals plus any temporaries. Throws dr2net::Error when it
//!       cannot take that shape (wrong width, say); the library calls it before any work.
//!   void forward(const ModuleCall<Ctx>&, ConstView<T> in, TensorView<T> out, TensorView<T> scratch);
//!       out = F(in). `scratch` may be used freely; its contents afterwards do not matter.
//!   void recompute(const ModuleCall<Ctx>&, ConstView<T> in, TensorView<T> out, TensorView<T> saved);
//!       out = F(in) and `saved` holds what backward needs. Must produce bit-identical `out`
//!       to forward for the same call (replay randomness from call.seed/step/module).
//!   void backward(const ModuleCall<Ctx>&, ConstView<T> in, ConstView<T> saved,
//!                 ConstView<T> grad_out, TensorView<T> grad_in);
//!       grad_in += J_F(in)^T grad_out, and every parameter gradient += its share. It
//!       accumulates: it never overwrites grad_in or the parameter gradients.
//!   `template <class V> void for_each_parameter(V&& visit);`
//!       Calls visit(std::string_view name, TensorView<T> value, TensorView<T> grad) for every
//!       parameter, so optimizers, clipping and all-reduce need not know the function's type.
//!
//! Optional, for a function whose last step can accumulate into its output (a GEMM with
//! beta != 0), so the block need not write F's output and read it back in a combine pass:
//!   bool adds_into(const ModuleCall<Ctx>&) const;
//!       Whether this call can (false, say, while an output dropout or drop-path mask must
//!       scale F's output alone).
//!   void recompute_add(const ModuleCall<Ctx>&, ConstView<T> in, ConstView<T> addend, double scale,
//!                      TensorView<T> dst, TensorView<T> saved);
//!       dst = F(in) + scale * addend, with `saved` as recompute leaves it. `addend` may be
//!       `dst` itself or `in`; `dst` never overlaps `in`. scale == 0 never reads `addend`.
//!   The block uses it when the stream type is the compute type (see DESIGN's memory plan).
//! Optional: `using context_type = ...;` (default HostContext) names the backend it runs on;
//! `static constexpr std::string_view parameter_prefix = "...";` replaces the block's default
//! "f"/"g" prefix of its parameter names (an empty prefix keeps the names as they are).
//! All views handed to it are contiguous and have the stream's shape (scratch: rank 1).
//! Views are typed by memory space: the `ConstView<T>` and `TensorView<T>` above are of the space
//! of the function's backend, `TensorView<T, function_space_t<F>>` (HostSpace for HostContext,
//! DeviceSpace for CudaContext, i.e. `DeviceView<T>`), so a host function cannot be handed device
//! memory: that does not compile.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "dr2net/core/compute_type.hpp"
#include "dr2net/core/tensor.hpp"

namespace dr2net {

class HostContext;  // backend/host/context.hpp: the default backend of a residual function

//! What the library tells a residual function about the current call.
template <class Ctx>
struct ModuleCall {
  Ctx& context;              //!< backend resources (host or device)
  int module = 0;            //!< index of this residual function in the stack (layer l: 2l, 2l+1)
  std::int64_t step = 0;     //!< training step, for replaying randomness
  std::uint64_t seed = 0;    //!< the stack's seed, for replaying randomness
  bool training = true;      //!< false in inference: no dropout, no drop-path
  //! Index of this call's first sample in the global batch (StackOptions::sample_offset): a
  //! data-parallel rank holding samples [o, o + B) of a global batch keys its drop-path and
  //! dropout draws by o + b, so R ranks draw the masks one process draws for the whole batch.
  std::uint64_t sample_offset = 0;
};

namespace detail {

template <class F>
struct context_of {
  using type = HostContext;
};
template <class F>
  requires requires { typename F::context_type; }
struct context_of<F> {
  using type = typename F::context_type;
};

template <class F>
struct value_type_of {
  using type = void;
};
template <class F>
  requires requires { typename F::value_type; }
struct value_type_of<F> {
  using type = typename F::value_type;
};

//! Stand-in visitor used to check for_each_parameter (views of memory space S).
template <class T, class S>
struct ParameterVisitorArchetype {
  void operator()(std::string_view, TensorView<T, S>, TensorView<T, S>) const {}
};

template <class C>
struct space_of_context {
  using type = typename C::memory_space;
};
template <>
struct space_of_context<HostContext> {  // known without the complete type
  using type = HostSpace;
};

}  // namespace detail

//! The backend context type F runs on: F::context_type when F declares one, else HostContext.
//! ModuleCall<context_type_t<F>> is what F's members receive.
template <class F>
using context_type_t = typename detail::context_of<F>::type;

//! The memory space of F's backend (HostSpace for HostContext, DeviceSpace for CudaContext):
//! every view F's members receive is a TensorView<..., function_space_t<F>>.
template <class F>
using function_space_t = typename detail::space_of_context<context_type_t<F>>::type;

// One concept per requirement, so a failed check can say which member is missing.

//! F declares `using value_type = T;` with T a compute type (is_compute_type_v).
template <class F>
concept HasFloatingValueType = is_compute_type_v<typename detail::value_type_of<F>::type>;

//! F has `saved_elements(const Shape&) const` returning a size (its scratch, in elements of T).
template <class F, class T = typename detail::value_type_of<F>::type>
concept HasSavedElements = requires(const F& f, const Shape& s) {
  { f.saved_elements(s) } -> std::convertible_to<std::size_t>;
};

//! F has `forward(const ModuleCall<C>&, ConstView<T> in, TensorView<T> out, TensorView<T> scratch)`.
template <class F, class T = typename detail::value_type_of<F>::type, class C = context_type_t<F>,
          class S = function_space_t<F>>
concept HasForward = requires(F& f, const ModuleCall<C>& call, ConstView<T, S> in, TensorView<T, S> out) {
  f.forward(call, in, out, out);
};

//! F has `recompute(const ModuleCall<C>&, ConstView<T> in, TensorView<T> out, TensorView<T> saved)`.
template <class F, class T = typename detail::value_type_of<F>::type, class C = context_type_t<F>,
          class S = function_space_t<F>>
concept HasRecompute = requires(F& f, const ModuleCall<C>& call, ConstView<T, S> in, TensorView<T, S> out) {
  f.recompute(call, in, out, out);
};

//! F has `backward(const ModuleCall<C>&, ConstView<T> in, ConstView<T> saved, ConstView<T> grad_out,
//! TensorView<T> grad_in)`.
template <class F, class T = typename detail::value_type_of<F>::type, class C = context_type_t<F>,
          class S = function_space_t<F>>
concept HasBackward = requires(F& f, const ModuleCall<C>& call, ConstView<T, S> in, TensorView<T, S> gin) {
  f.backward(call, in, in, in, gin);
};

//! F has `for_each_parameter(visit)` calling visit(std::string_view, TensorView<T>, TensorView<T>).
template <class F, class T = typename detail::value_type_of<F>::type, class S = function_space_t<F>>
concept HasParameters = requires(F& f, detail::ParameterVisitorArchetype<T, S> v) { f.for_each_parameter(v); };

//! The optional adds-into members (see the file comment), checked for compute type T.
template <class F, class T = typename detail::value_type_of<F>::type, class C = context_type_t<F>,
          class S = function_space_t<F>>
concept AddsInto = requires(F& f, const F& cf, const ModuleCall<C>& call, ConstView<T, S> in, TensorView<T, S> out) {
  { cf.adds_into(call) } -> std::convertible_to<bool>;
  f.recompute_add(call, in, in, 1.0, out, out);
};

//! A type usable as F or G in ReversibleDualResidual.
template <class F>
concept ResidualFunction = std::move_constructible<F> && HasFloatingValueType<F> && HasSavedElements<F> &&
                           HasForward<F> && HasRecompute<F> && HasBackward<F> && HasParameters<F>;

//! Fails compilation with a message naming the first requirement F misses.
template <class F>
constexpr bool check_residual_function() {
  static_assert(HasFloatingValueType<F>,
                "dr2net: residual function lacks `using value_type = float;` (or double): the "
                "floating-point type it computes in");
  static_assert(!HasFloatingValueType<F> || HasSavedElements<F>,
                "dr2net: residual function lacks `std::size_t saved_elements(const dr2net::Shape&) const`");
  static_assert(!HasFloatingValueType<F> || HasForward<F>,
                "dr2net: residual function lacks `void forward(const dr2net::ModuleCall<Ctx>&, "
                "dr2net::ConstView<T> in, dr2net::TensorView<T> out, dr2net::TensorView<T> scratch)`");
  static_assert(!HasFloatingValueType<F> || HasRecompute<F>,
                "dr2net: residual function lacks `void recompute(const dr2net::ModuleCall<Ctx>&, "
                "dr2net::ConstView<T> in, dr2net::TensorView<T> out, dr2net::TensorView<T> saved)`");
  static_assert(!HasFloatingValueType<F> || HasBackward<F>,
                "dr2net: residual function lacks `void backward(const dr2net::ModuleCall<Ctx>&, "
                "dr2net::ConstView<T> in, dr2net::ConstView<T> saved, dr2net::ConstView<T> grad_out, "
                "dr2net::TensorView<T> grad_in)`");
  static_assert(!HasFloatingValueType<F> || HasParameters<F>,
                "dr2net: residual function lacks `template <class V> void for_each_parameter(V&& visit)` "
                "calling visit(name, value_view, grad_view)");
  static_assert(std::move_constructible<F>, "dr2net: residual function must be move-constructible");
  return ResidualFunction<F>;
}

//! The prefix of F's parameter names inside a block: F::parameter_prefix when declared.
template <class F>
constexpr std::string_view parameter_prefix_or(std::string_view fallback) {
  if constexpr (requires { F::parameter_prefix; }) return std::string_view(F::parameter_prefix);
  else return fallback;
}

}  // namespace dr2net
