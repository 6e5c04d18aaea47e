#pragma once
//! \file
//! ReversibleDualResidual<F, G, Schedule, Precision>: one transformer layer (module F, then
//! module G) as a Dr²Net block. Each module i computes, in place over two stream buffers,
//!
//!   forward:  x_i = y_{i-1};  y_i = alpha_i y_{i-1} + F_i(y_{i-1}) + beta_i x_{i-1}
//!   inverse:  y_{i-1} = x_i;  x_{i-1} = (y_i - alpha_i x_i - F_i(x_i)) / beta_i
//!
//! The hand-off x_i = y_{i-1} is a change of buffer roles, never a copy: module F writes y_1
//! over x_0 and module G writes y_2 over x_1 = y_0, so after the layer the x buffer again
//! holds x and the y buffer holds y.

#include <cmath>
#include <cstddef>
#include <exception>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "dr2net/block/combine.hpp"
#include "dr2net/block/residual_function.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/precision/precision.hpp"
#include "dr2net/schedule/coefficients.hpp"

namespace dr2net {

//! Smallest |beta| a reversible step accepts by default. Reconstruction divides by beta, so
//! error grows by roughly 1/|beta| per module; below this it is numerically meaningless.
inline constexpr double kDefaultMinAbsBeta = 1e-3;

//! The check flags of one module: words that the passes reading its data set to 1 when they
//! see a value that would make a result wrong (never cleared by the passes).
enum class ModuleFlag : int {
  Forward = 0,   //!< the module's output stream is not finite, or leaves the fixed-point range
  Gradient = 1,  //!< the gradient it produced for its input stream is not finite
  Inverse = 2,   //!< its recomputation in backward produced a non-finite value
};
//! Words per module in a check-flag array (LayerCall::flags): module m's ModuleFlag `f` is
//! word kModuleFlagCount * m + f.
inline constexpr int kModuleFlagCount = 3;

//! Where a layer is and what it may do in this call.
struct LayerCall {
  int layer = 0;                              //!< layer index; its modules are 2*layer and 2*layer+1
  std::int64_t step = 0;                      //!< training step (schedule and randomness replay)
  std::uint64_t seed = 0;                     //!< randomness seed for the residual functions
  bool training = true;                       //!< false: inference (no dropout, no drop-path)
  double min_abs_beta = kDefaultMinAbsBeta;   //!< reversible operations refuse |beta| below this
  //! Check flags, kModuleFlagCount words per module of the stack (indexed by module), in the
  //! backend's memory; null: no checks.
  std::uint32_t* flags = nullptr;
  //! Fixed-point streams in exact reversible mode: where modules F (0) and G (1) of this layer
  //! keep their side bits (empty: keep none).
  SideBits side[2] = {};
  //! Global index of the batch's first sample, handed to the functions (ModuleCall::sample_offset).
  std::uint64_t sample_offset = 0;
};

//! A backend's buffer type: what Ctx::allocate<T> returns.
template <class Ctx, class T>
using buffer_t = decltype(std::declval<Ctx&>().template allocate<T>(std::size_t{}, MemoryCategory::Other));

//! One module's state kept from forward to backward in standard mode: its input stream and
//! its residual function's saved internals.
template <class S, class C, class Space = HostSpace>
struct ModuleStorage {
  TensorView<S, Space> input;  //!< Copy of the stream the function read (x_i), of the stream's shape.
  TensorView<C, Space> saved;  //!< The function's saved internals: saved_elements(shape) elements, 1-D.
};

//! Standard-mode state of a layer's two modules.
template <class S, class C, class Space = HostSpace>
struct LayerStorage {
  //! State of module F (module 2*layer).
  ModuleStorage<S, C, Space> f, g;  //!< State of module G (module 2*layer+1).
};

//! The temporaries one module needs, sized for the largest function it will serve:
//! F's output, F's scratch, and in mixed precision compute-typed copies of the input and
//! of the output gradient plus a separate input-gradient accumulator.
//! `V` is the type of the stream gradients (the stream type, except for fixed-point streams).
template <class Ctx, class S, class C, class V = S>
class ModuleWorkspace {
 public:
  // Views in this class are of the backend's memory space (declared first, so that every
  // TensorView below means this one).
  //! A view of the backend's memory (TensorView of memory_space_t<Ctx>).
  template <class U>
  using TensorView = dr2net::TensorView<U, memory_space_t<Ctx>>;
  //! The function's input must be converted from the stream type.
  static constexpr bool kMixedInput = !std::is_same_v<S, C>;
  //! Its output gradient must be converted, and its input gradient kept apart.
  static constexpr bool kMixedGradient = !std::is_same_v<V, C>;

  //! Makes room for streams of `shape` and `scratch_elements` of function scratch.
  void prepare(Ctx& ctx, const Shape& shape, std::size_t scratch_elements) {
    shape_ = shape;
    const auto n = static_cast<std::size_t>(shape.numel());
    ctx.reserve(f_, n, MemoryCategory::Scratch, "module workspace: function output");
    ctx.reserve(scratch_, scratch_elements, MemoryCategory::Scratch, "module workspace: function scratch");
    scratch_elements_ = scratch_elements;
    if constexpr (kMixedInput) ctx.reserve(in_, n, MemoryCategory::Scratch, "module workspace: compute-typed input");
    if constexpr (kMixedGradient) {
      ctx.reserve(gout_, n, MemoryCategory::Scratch, "module workspace: output gradient");
      ctx.reserve(gin_, n, MemoryCategory::Scratch, "module workspace: input gradient");
    }
  }
  //! Frees every buffer, returning its bytes to the context's meter; the views are empty until
  //! the next prepare().
  void release() {
    f_.reset();
    scratch_.reset();
    in_.reset();
    gout_.reset();
    gin_.reset();
  }

  //! The stream shape of the last prepare() (every stream-shaped view has it).
  const Shape& shape() const { return shape_; }
  //! Where the function writes its output F(x) (stream shape, compute type), read by the
  //! combine pass that follows.
  TensorView<C> f() const { return f_.view(shape_); }
  //! The function's scratch, a 1-D view of the `scratch_elements` of the last prepare(): its
  //! saved internals between a recompute and its backward when nothing is stored.
  TensorView<C> scratch() const { return TensorView<C>(scratch_.data(), Shape{static_cast<std::int64_t>(scratch_elements_)}); }
  //! Compute-typed copy of the function's input stream (stream shape; an empty view unless
  //! kMixedInput).
  TensorView<C> in() const { return staging<kMixedInput>(in_); }
  //! Compute-typed copy of the output gradient gy (stream shape; an empty view unless
  //! kMixedGradient).
  TensorView<C> gout() const { return staging<kMixedGradient>(gout_); }
  //! Compute-typed accumulator of the function's input gradient J^T gy, zeroed before each
  //! backward and then combined into the stream gradient (an empty view unless kMixedGradient).
  TensorView<C> gin() const { return staging<kMixedGradient>(gin_); }

 private:
  template <bool Used>
  TensorView<C> staging(const buffer_t<Ctx, C>& b) const {
    if constexpr (Used) return b.view(shape_);
    else return {};
  }

  Shape shape_;
  std::size_t scratch_elements_ = 0;
  buffer_t<Ctx, C> f_, scratch_, in_, gout_, gin_;
};

//! One Dr²Net layer: modules F (2*layer) and G (2*layer+1) over the streams (x, y), in place,
//! with the forward, inverse and backward of the file comment. It owns its two residual
//! functions; the stack owns the streams, the workspace and the schedule and passes them in,
//! so one workspace_type serves every layer. Every member runs its passes through the context
//! it is given (a device context: on its stream, in order); the block itself does not wait
//! for the stream.
//!
//! \tparam F          residual function of module F (attention in a transformer), see
//!                    block/residual_function.hpp
//! \tparam G          residual function of module G (the MLP); same value_type and context_type as F
//! \tparam ScheduleT  coefficient schedule, (step, module) -> (alpha, beta) (the Schedule concept)
//! \tparam PrecisionT precision policy (Fp32, Fp64, Fp64StreamsFp32Compute, FixedFp32, ...);
//!                    F's and G's value_type must be its compute_type
template <class F, class G, class ScheduleT, Precision PrecisionT = Fp32>
class ReversibleDualResidual {
 public:
  // Views in this class are of the residual functions' memory space (declared first, so that
  // every TensorView/ConstView below means these).
  //! Where the streams, the functions' views and the parameters live (HostSpace, DeviceSpace).
  using memory_space = function_space_t<F>;
  //! A view of the backend's memory.
  template <class U>
  using TensorView = dr2net::TensorView<U, memory_space>;
  //! A read-only view of the backend's memory.
  template <class U>
  using ConstView = dr2net::TensorView<const U, memory_space>;

 private:
  static_assert(Schedule<ScheduleT>,
                "dr2net: ScheduleT is not a schedule: it needs a copy constructor and "
                "`Coefficients operator()(std::int64_t step, int module) const` (see schedule/coefficients.hpp)");
  static_assert(check_residual_function<F>(), "dr2net: F is not a residual function (see above)");
  static_assert(check_residual_function<G>(), "dr2net: G is not a residual function (see above)");

 public:
  using function_f = F;                                          //!< Residual function of module F.
  using function_g = G;                                          //!< Residual function of module G.
  using schedule_type = ScheduleT;                               //!< The coefficient schedule.
  using precision = PrecisionT;                                  //!< The precision policy.
  using stream_type = typename PrecisionT::stream_type;          //!< Element type of the streams x, y.
  using compute_type = typename PrecisionT::compute_type;        //!< F's and G's value_type and parameter type.
  using accumulate_type = typename PrecisionT::accumulate_type;  //!< Type of the fused combine arithmetic.
  //! Type of the stack's input and output and of the stream gradients.
  using value_type = policy_value_t<PrecisionT>;
  //! The backend context F and G run on (context_type_t<F>; G's must be the same).
  using context_type = context_type_t<F>;
  //! The temporaries of one module, sized by the stack for the largest function it serves.
  using workspace_type = ModuleWorkspace<context_type, stream_type, compute_type, value_type>;
  //! Fixed-point streams: every reconstruction is exact (DESIGN §3a).
  static constexpr bool exact = is_fixed_point_v<stream_type>;
  //! Standard-mode state of this layer's two modules.
  using storage_type = LayerStorage<stream_type, compute_type, memory_space>;
  //! Standard-mode state of one module.
  using module_storage_type = ModuleStorage<stream_type, compute_type, memory_space>;

 private:
  using S = stream_type;
  using C = compute_type;
  using A = accumulate_type;
  using V = value_type;

 public:

  static_assert(std::is_same_v<typename F::value_type, compute_type>,
                "dr2net: F::value_type must be the precision policy's compute_type");
  static_assert(std::is_same_v<typename G::value_type, compute_type>,
                "dr2net: G::value_type must be the precision policy's compute_type");
  static_assert(std::is_same_v<context_type_t<G>, context_type>,
                "dr2net: F and G must run on the same backend (context_type)");

  //! Takes the two residual functions (moved in, with their parameters); allocates nothing.
  ReversibleDualResidual(F f, G g) : f_(std::move(f)), g_(std::move(g)) {}

  //! Module F's residual function, e.g. to set its parameters between steps.
  F& f() noexcept { return f_; }
  //! Module G's residual function, e.g. to set its parameters between steps.
  G& g() noexcept { return g_; }
  //! Module F's residual function (read-only).
  const F& f() const noexcept { return f_; }
  //! Module G's residual function (read-only).
  const G& g() const noexcept { return g_; }

  //! Scratch elements of F (module 0 of this layer) and G (module 1) for a stream of `shape`.
  //! Errors that a function raises for the shape come back naming the module.
  std::size_t saved_elements_f(const Shape& shape, int layer) const {
    return with_module(2 * layer, "F", [&] { return scratch_size(f_.saved_elements(shape)); });
  }
  //! As saved_elements_f(), for G (module 2*layer+1).
  std::size_t saved_elements_g(const Shape& shape, int layer) const {
    return with_module(2 * layer + 1, "G", [&] { return scratch_size(g_.saved_elements(shape)); });
  }

  //! The layer's coefficients at this call; non-finite values from the schedule are errors.
  //! With fixed-point streams they are the grid points nearest to the schedule's values
  //! (multiples of 2^-24), the same in every mode and pass.
  static Coefficients coefficients(const ScheduleT& schedule, std::int64_t step, int module) {
    Coefficients c = schedule(step, module);
    DR2NET_CHECK(is_finite(c), "schedule gave non-finite (alpha, beta) = (", c.alpha, ", ", c.beta,
                 ") for module ", module, " at step ", step);
    if constexpr (exact) {
      DR2NET_CHECK(std::abs(c.alpha) <= fixed::kMaxCoefficient && std::abs(c.beta) <= fixed::kMaxCoefficient,
                   "schedule gave (alpha, beta) = (", c.alpha, ", ", c.beta, ") for module ", module, " at step ",
                   step, ": fixed-point streams take coefficients up to ", fixed::kMaxCoefficient, " in magnitude");
      c = {fixed::quantize_coefficient(c.alpha).value, fixed::quantize_coefficient(c.beta).value};
    }
    return c;
  }

  //! Side bits per element that module `module` keeps in exact reversible mode at these
  //! coefficients (0 without fixed-point streams, or when |beta| >= 1).
  static int side_bit_width(Coefficients c) {
    if constexpr (exact) return fixed::side_bit_width(fixed::quantize_coefficient(c.beta).p);
    else return 0;
  }
  //! Throws unless module `module` can be inverted at this step.
  static Coefficients reversible_coefficients(const ScheduleT& schedule, std::int64_t step, int module,
                                              double min_abs_beta) {
    const Coefficients c = coefficients(schedule, step, module);
    DR2NET_CHECK(std::abs(c.beta) >= min_abs_beta, "module ", module, " is not reversible at step ", step,
                 ": |beta| = ", std::abs(c.beta), " is below ", min_abs_beta, " (alpha = ", c.alpha,
                 ", beta = ", c.beta, "); use standard mode or a schedule with beta away from 0");
    return c;
  }

  //! One module forward, in place. which = 0 (F): x <- alpha*y + F(y) + beta*x;
  //! which = 1 (G): y <- alpha*x + G(x) + beta*y. With `store` (standard mode) the module's
  //! input and its function's saved internals are kept there; without, it runs with scratch.
  void forward_module(context_type& ctx, const ScheduleT& schedule, const LayerCall& call, int which,
                      TensorView<S> x, TensorView<S> y, workspace_type& ws, const module_storage_type* store = nullptr) {
    const int m = module_index(call, which);
    const Coefficients c = coefficients(schedule, call.step, m);
    const auto mc = module_call(ctx, call, m);
    const SideBits side = store ? SideBits{} : call.side[which];
    if (which == 0)
      module_forward(ctx, f_, "F", mc, c, x, y, ws, store, side, flag(call, m, ModuleFlag::Forward));
    else
      module_forward(ctx, g_, "G", mc, c, y, x, ws, store, side, flag(call, m, ModuleFlag::Forward));
  }

  //! One module backward. On entry (x, y) are the streams after the module and (gx, gy) their
  //! gradients; on exit the gradients are those of the streams before it and the function's
  //! parameter gradients have been accumulated. With `reconstruct`, the stream the module
  //! overwrote is reconstructed in the same pass (needs |beta| >= call.min_abs_beta); without,
  //! it is left as it was. With `store`, the stored input and internals are used (no recompute).
  void backward_module(context_type& ctx, const ScheduleT& schedule, const LayerCall& call, int which,
                       bool reconstruct, TensorView<S> x, TensorView<S> y, TensorView<V> gx, TensorView<V> gy,
                       workspace_type& ws, const module_storage_type* store = nullptr) {
    const int m = module_index(call, which);
    DR2NET_CHECK(!(reconstruct && store), "module ", m, ": reconstruction from stored inputs is meaningless");
    const Coefficients c = reconstruct ? reversible_coefficients(schedule, call.step, m, call.min_abs_beta)
                                       : coefficients(schedule, call.step, m);
    const auto mc = module_call(ctx, call, m);
    // F reads y and wrote x; G reads x and wrote y. Each gradient buffer pairs with its stream.
    if (which == 0)
      module_backward(ctx, f_, "F", mc, c, reconstruct, y, x, gy, gx, store, ws, call, m);
    else
      module_backward(ctx, g_, "G", mc, c, reconstruct, x, y, gx, gy, store, ws, call, m);
  }

  //! (x, y) <- layer(x, y), in place; `store` (standard mode) keeps both modules' state.
  void forward(context_type& ctx, const ScheduleT& schedule, const LayerCall& call, TensorView<S> x,
               TensorView<S> y, workspace_type& ws, const storage_type* store = nullptr) {
    forward_module(ctx, schedule, call, 0, x, y, ws, store ? &store->f : nullptr);
    forward_module(ctx, schedule, call, 1, x, y, ws, store ? &store->g : nullptr);
  }

  //! (x, y) <- layer^{-1}(x, y), in place: the streams before this layer.
  void inverse(context_type& ctx, const ScheduleT& schedule, const LayerCall& call, TensorView<S> x,
               TensorView<S> y, workspace_type& ws) {
    const int mf = 2 * call.layer, mg = mf + 1;
    const Coefficients cg = reversible_coefficients(schedule, call.step, mg, call.min_abs_beta);
    const Coefficients cf = reversible_coefficients(schedule, call.step, mf, call.min_abs_beta);
    module_inverse(ctx, g_, "G", module_call(ctx, call, mg), cg, y, x, ws, call.side[1], flag(call, mg, ModuleFlag::Inverse));  // y_2 -> x_1
    module_inverse(ctx, f_, "F", module_call(ctx, call, mf), cf, x, y, ws, call.side[0], flag(call, mf, ModuleFlag::Inverse));  // y_1 -> x_0
  }

  //! Backward through the layer. On entry x, y hold the layer's output streams and gx, gy
  //! their gradients; on exit x, y hold the reconstructed input streams and gx, gy the
  //! gradients with respect to them; parameter gradients have been accumulated.
  //! With `store` (standard mode) the stored inputs are used and x, y are not touched.
  void backward(context_type& ctx, const ScheduleT& schedule, const LayerCall& call, TensorView<S> x,
                TensorView<S> y, TensorView<V> gx, TensorView<V> gy, workspace_type& ws,
                const storage_type* store = nullptr) {
    if (store) {  // check both modules' coefficients before touching anything
      coefficients(schedule, call.step, 2 * call.layer + 1);
      coefficients(schedule, call.step, 2 * call.layer);
    } else {
      reversible_coefficients(schedule, call.step, 2 * call.layer + 1, call.min_abs_beta);
      reversible_coefficients(schedule, call.step, 2 * call.layer, call.min_abs_beta);
    }
    backward_module(ctx, schedule, call, 1, !store, x, y, gx, gy, ws, store ? &store->g : nullptr);
    backward_module(ctx, schedule, call, 0, !store, x, y, gx, gy, ws, store ? &store->f : nullptr);
  }

  //! Calls visit(name, value, grad) for every parameter, names prefixed by `prefix`.
  template <class Visit>
  void for_each_parameter(std::string_view prefix, Visit&& visit) {
    visit_function(f_, join(prefix, parameter_prefix_or<F>("f")), visit);
    visit_function(g_, join(prefix, parameter_prefix_or<G>("g")), visit);
  }
  //! The same for one module: F (which = 0) or G (which = 1).
  template <class Visit>
  void for_each_module_parameter(int which, std::string_view prefix, Visit&& visit) {
    if (which == 0) visit_function(f_, join(prefix, parameter_prefix_or<F>("f")), visit);
    else visit_function(g_, join(prefix, parameter_prefix_or<G>("g")), visit);
  }

 private:
  static std::string join(std::string_view a, std::string_view b) {
    if (a.empty()) return std::string(b);
    if (b.empty()) return std::string(a);
    return std::string(a) + "." + std::string(b);
  }

  template <class Fn, class Visit>
  static void visit_function(Fn& fn, const std::string& prefix, Visit& visit) {
    fn.for_each_parameter([&](std::string_view name, TensorView<C> value, TensorView<C> grad) {
      check_shape(grad, value.shape(), join(prefix, name) + " gradient");
      visit(join(prefix, name), value, grad);
    });
  }

  static int module_index(const LayerCall& call, int which) {
    DR2NET_CHECK(which == 0 || which == 1, "module selector must be 0 (F) or 1 (G), got ", which);
    return 2 * call.layer + which;
  }

  static std::uint32_t* flag(const LayerCall& call, int module, ModuleFlag which) {
    return call.flags ? call.flags + kModuleFlagCount * module + static_cast<int>(which) : nullptr;
  }

  static ModuleCall<context_type> module_call(context_type& ctx, const LayerCall& call, int module) {
    return ModuleCall<context_type>{ctx, module, call.step, call.seed, call.training, call.sample_offset};
  }

  //! A function's scratch size as size_t; a negative one (from a signed return type) is an
  //! error instead of a huge unsigned size, and so is one whose bytes overflow.
  template <class N>
  static std::size_t scratch_size(N elements) {
    std::size_t r = 0;
    if constexpr (std::is_signed_v<N>) r = checked::to_size(static_cast<std::int64_t>(elements), "saved_elements()");
    else r = static_cast<std::size_t>(elements);
    (void)checked::bytes(checked::to_int64(r, "saved_elements()"), sizeof(C), "saved_elements() of scratch");
    return r;
  }

  //! Runs `body`, re-raising any error with the module it happened in.
  template <class Body>
  static auto with_module(int module, const char* role, Body&& body) -> decltype(body()) {
    try {
      return body();
    } catch (const Error& e) {
      DR2NET_FAIL("module ", module, " (layer ", module / 2, ", ", role, "): ", e.detail());
    } catch (const std::exception& e) {
      DR2NET_FAIL("module ", module, " (layer ", module / 2, ", ", role, "): ", e.what());
    }
  }

  //! A stream (or stream gradient) as the function's compute type: itself, or a converted copy.
  template <class View>
  static ConstView<C> as_compute(context_type& ctx, const View& s, TensorView<C> staging) {
    using From = typename View::value_type;
    if constexpr (std::is_same_v<From, C>) {
      return ConstView<C>(s);
    } else {
      for_each_index(ctx, s.size(), ConvertCopy<From, C>{staging.data(), s.data()});
      return staging;
    }
  }

  //! Whether the forward of Fn can let it add its output straight into the stream: it has
  //! the adds-into members and the stream is its compute type.
  template <class Fn>
  static constexpr bool can_add_into = std::is_same_v<S, C> && AddsInto<Fn, C, context_type>;

  //! Work items of a fixed-point combine: one per side-bit word.
  static std::size_t fixed_work_items(std::size_t n, const SideBits& side) {
    const auto per = static_cast<std::size_t>(side.per_word);
    return (n + per - 1) / per;
  }

  template <class Fn>
  static void module_forward(context_type& ctx, Fn& fn, const char* role, const ModuleCall<context_type>& mc,
                             Coefficients c, TensorView<S> x, TensorView<S> y, workspace_type& ws,
                             const module_storage_type* store, SideBits side, std::uint32_t* flag) {
    const ConstView<C> in = as_compute(ctx, y, ws.in());
    if (store)  // standard mode: keep the input (and below, the internals)
      for_each_index(ctx, y.size(), ConvertCopy<S, S>{store->input.data(), y.data()});
    const TensorView<C> internals = store ? store->saved : ws.scratch();
    if constexpr (can_add_into<Fn>) {  // never with fixed-point streams (their type is not C)
      if (with_module(mc.module, role, [&] { return static_cast<bool>(std::as_const(fn).adds_into(mc)); })) {
        // x <- F(y) + (alpha y + beta x) with F's last GEMM accumulating: at beta = 0 or
        // alpha = 0 that GEMM is the only pass over x; otherwise one pre-combine pass first.
        with_module(mc.module, role, [&] {
          if (c.beta == 0.0) {
            fn.recompute_add(mc, in, ConstView<C>(y), c.alpha, x, internals);
          } else if (c.alpha == 0.0) {
            fn.recompute_add(mc, in, ConstView<C>(x), c.beta, x, internals);
          } else {
            for_each_index(ctx, x.size(), ForwardPreCombine<S, A>{x.data(), y.data(), static_cast<A>(c.alpha),
                                                                  static_cast<A>(c.beta)});
            fn.recompute_add(mc, in, ConstView<C>(x), 1.0, x, internals);
          }
        });
        return;
      }
    }
    with_module(mc.module, role, [&] {
      if (store) fn.recompute(mc, in, ws.f(), internals);
      else fn.forward(mc, in, ws.f(), internals);
    });
    if constexpr (exact) {
      if (side.words == nullptr) side = SideBits{};
      for_each_index(ctx, fixed_work_items(x.size(), side),
                     FixedForwardCombine<S, C>{x.data(), y.data(), ws.f().data(), fixed::quantize_coefficient(c.alpha),
                                               fixed::quantize_coefficient(c.beta), side, x.size(), flag});
    } else {
      (void)side;
      for_each_index(ctx, x.size(),
                     ForwardCombine<S, C, A>{x.data(), y.data(), ws.f().data(), static_cast<A>(c.alpha),
                                             static_cast<A>(c.beta), flag});
    }
  }

  template <class Fn>
  static void module_inverse(context_type& ctx, Fn& fn, const char* role, const ModuleCall<context_type>& mc,
                             Coefficients c, TensorView<S> y, TensorView<S> x, workspace_type& ws, SideBits side,
                             std::uint32_t* flag) {
    const ConstView<C> in = as_compute(ctx, x, ws.in());
    with_module(mc.module, role, [&] { fn.forward(mc, in, ws.f(), ws.scratch()); });
    if constexpr (exact) {
      fixed_inverse(ctx, c, y, x, ws, side, flag);
    } else {
      (void)side;
      (void)flag;
      for_each_index(ctx, y.size(), InverseCombine<S, C, A>{y.data(), x.data(), ws.f().data(), static_cast<A>(c.alpha),
                                                            static_cast<A>(c.beta)});
    }
  }

  //! y <- X_{i-1} from y = Y_i, x = X_i and F(x) in the workspace (fixed-point streams).
  static void fixed_inverse(context_type& ctx, Coefficients c, TensorView<S> y, ConstView<S> x, workspace_type& ws,
                            SideBits side, std::uint32_t* flag) {
    const auto kb = fixed::quantize_coefficient(c.beta);
    const int width = fixed::side_bit_width(kb.p);
    DR2NET_CHECK(width == 0 || (side.words != nullptr && side.width == width),
                 "exact inverse needs the side bits the forward kept (", width, " bits per element)");
    if (width == 0) side = SideBits{};
    for_each_index(ctx, fixed_work_items(y.size(), side),
                   FixedInverseCombine<S, C>{y.data(), x.data(), ws.f().data(), fixed::quantize_coefficient(c.alpha), kb,
                                             side, y.size(), flag});
  }

  //! One module's backward. `in_s` is the module's input x_i (live stream) and `out` holds
  //! y_i; with `reconstruct` out becomes x_{i-1}. Without `store` F is recomputed into the
  //! workspace; with it, the stored input and internals are used.
  template <class Fn>
  static void module_backward(context_type& ctx, Fn& fn, const char* role, const ModuleCall<context_type>& mc,
                              Coefficients c, bool reconstruct, ConstView<S> in_s, TensorView<S> out,
                              TensorView<V> gx, TensorView<V> gy, const module_storage_type* store,
                              workspace_type& ws, const LayerCall& call, int m) {
    const ConstView<S> input = store ? ConstView<S>(store->input) : in_s;
    const ConstView<C> in = as_compute(ctx, input, ws.in());
    const ConstView<C> gout = as_compute(ctx, gy, ws.gout());
    const C* jt = nullptr;
    with_module(mc.module, role, [&] {
      ConstView<C> internals = store ? ConstView<C>(store->saved) : ConstView<C>(ws.scratch());
      if (!store) fn.recompute(mc, in, ws.f(), ws.scratch());
      if constexpr (std::is_same_v<V, C>) {
        fn.backward(mc, in, internals, gout, gx);  // accumulates J^T gy straight into gx
      } else {
        const TensorView<C> gin = ws.gin();
        for_each_index(ctx, gin.size(), Fill<C>{gin.data(), C(0)});
        fn.backward(mc, in, internals, gout, gin);
        jt = gin.data();
      }
    });
    const auto alpha = static_cast<A>(c.alpha), beta = static_cast<A>(c.beta);
    std::uint32_t* const gflag = flag(call, m, ModuleFlag::Gradient);
    if constexpr (exact) {  // gradients in floating point, the streams' inverse in integers
      for_each_index(ctx, gx.size(),
                     BackwardCombine<V, C, A, false>{gx.data(), gy.data(), jt, nullptr, nullptr, nullptr, alpha, beta, gflag});
      if (reconstruct) fixed_inverse(ctx, c, out, in_s, ws, call.side[m % 2], flag(call, m, ModuleFlag::Inverse));
    } else if (reconstruct) {
      for_each_index(ctx, gx.size(),
                     BackwardCombine<S, C, A, true>{gx.data(), gy.data(), jt, out.data(), in_s.data(), ws.f().data(),
                                                    alpha, beta, gflag});
    } else {
      for_each_index(ctx, gx.size(),
                     BackwardCombine<V, C, A, false>{gx.data(), gy.data(), jt, nullptr, nullptr, nullptr, alpha, beta, gflag});
    }
  }

  F f_;
  G g_;
};

}  // namespace dr2net
