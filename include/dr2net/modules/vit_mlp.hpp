#pragma once
//! \file
//! VitMlp<T, Ctx>: the MLP residual function of a timm ViT block (pre-norm),
//!
//!   G(h) = DropPath(Dropout2(fc2(Dropout1(gelu(fc1(norm2(h)))))))
//!
//! with exact (erf) GELU and timm's tensor names (norm2.*, mlp.fc1.*, mlp.fc2.*). Like timm's
//! Mlp(drop=p), the one dropout rate applies after the activation and after fc2; both masks
//! and the drop-path mask are replayed from Philox and apply only when the call is training.
//! Written once over the backend primitives and instantiated for HostContext (the default) and
//! CudaContext (modules/cuda/vit_mlp.cuh names that CudaVitMlp<T>).
//!
//! Saved internals, for an input [B, N, D] with M = B N rows and hidden width Hd
//! (SavedLayoutBuilder: packed on the host, 256-byte aligned regions on a device):
//!   mean [M], rstd [M] (accumulate_t<T>), xn [M, D] (norm2 output), z [M, Hd] (fc1 output),
//!   a [M, Hd] (gelu(z) after the hidden dropout: fc2's input).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dr2net/backend/host/primitives.hpp"
#include "dr2net/block/residual_function.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/compute_type.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/modules/activation.hpp"
#include "dr2net/modules/adds_into.hpp"
#include "dr2net/modules/drop.hpp"
#include "dr2net/modules/layer_norm.hpp"
#include "dr2net/modules/linear.hpp"
#include "dr2net/modules/saved_layout.hpp"

namespace dr2net {

//! Sizes and rates of a ViT MLP function.
struct VitMlpConfig {
  std::int64_t dim = 0;     //!< D, the stream width
  std::int64_t hidden = 0;  //!< hidden width (timm: mlp_ratio * D, 4D for ViT)
  double eps = 1e-6;        //!< norm2's epsilon (timm's ViT: 1e-6)
  double drop_path = 0.0;   //!< stochastic-depth rate of this function, in [0, 1)
  double drop = 0.0;        //!< dropout rate after gelu and after fc2 (timm's Mlp drop), in [0, 1)
};

//! The MLP residual function of a pre-norm timm ViT block (see the file comment for the math
//! and the saved layout), a ResidualFunction with the optional adds-into members.
//! Inputs are contiguous [B, N, D] (batch, tokens, width D = config().dim) in the backend's
//! memory; parameters load by timm name ("norm2.weight", "mlp.fc1.weight", ...). Every member
//! that takes a view checks its shape and throws dr2net::Error naming the member, the view and
//! the sizes. On a device backend the work is only enqueued on call.context's stream.
//! \tparam T compute type (float or double; also bf16/fp16 on the device)
//! \tparam Ctx backend context: HostContext (default) or CudaContext
template <class T, class Ctx = HostContext>
class VitMlp : public NamedParameterSet<VitMlp<T, Ctx>>, public OutputAddsInto<VitMlp<T, Ctx>> {
 public:
  //! Names this function in error messages.
  static constexpr std::string_view type_name = is_host_context_v<Ctx> ? "VitMlp" : "CudaVitMlp";
  using value_type = T;      //!< Compute type of parameters, activations and saved internals.
  using context_type = Ctx;  //!< The backend: members take ModuleCall<Ctx> and views of its memory.
  //! Accumulation type: GEMM scalars and the saved LayerNorm statistics (T on the host).
  using A = accumulate_t<T>;
  //! Keep timm's names verbatim inside a block.
  static constexpr std::string_view parameter_prefix = "";
  //! A view of the backend's memory.
  template <class U>
  using View = TensorView<U, memory_space_t<Ctx>>;

  //! A host function: validates the configuration; weights are initialised as timm does
  //! (trunc_normal std 0.02, biases 0, LayerNorm 1/0), deterministically from `seed`.
  explicit VitMlp(const VitMlpConfig& config, std::uint64_t seed = 0)
    requires is_host_context_v<Ctx>
      : VitMlp(nullptr, validated(config), FunctionOptions{}) {
    init(seed);
  }
  //! The same on `ctx`: on a device the weights are drawn exactly as VitMlp<float>(config,
  //! seed) draws them (on the host), then copied and converted to T.
  VitMlp(Ctx& ctx, const VitMlpConfig& config, std::uint64_t seed = 0, FunctionOptions options = {})
      : VitMlp(&ctx, validated(config), options) {
    if constexpr (is_host_context_v<Ctx>) init(seed);
    else copy_from(VitMlp<float, HostContext>(config, seed));
  }
  //! A copy of a host function on `ctx`: its configuration and parameters, converted to T.
  template <class U>
  VitMlp(Ctx& ctx, const VitMlp<U, HostContext>& host, FunctionOptions options = {})
      : VitMlp(&ctx, host.config(), options) {
    copy_from(host);
  }

  //! The validated configuration this function was built with.
  const VitMlpConfig& config() const noexcept { return config_; }
  //! The pre-norm LayerNorm "norm2" over width D.
  LayerNorm<T, Ctx>& norm2() noexcept { return norm2_; }
  //! The expanding layer "mlp.fc1", D -> hidden, followed by GELU.
  Linear<T, Ctx>& fc1() noexcept { return fc1_; }
  //! The contracting layer "mlp.fc2", hidden -> D.
  Linear<T, Ctx>& fc2() noexcept { return fc2_; }
  //! Read-only norm2(): the LayerNorm "norm2".
  const LayerNorm<T, Ctx>& norm2() const noexcept { return norm2_; }
  //! Read-only fc1(): the Linear "mlp.fc1", D -> hidden.
  const Linear<T, Ctx>& fc1() const noexcept { return fc1_; }
  //! Read-only fc2(): the Linear "mlp.fc2", hidden -> D.
  const Linear<T, Ctx>& fc2() const noexcept { return fc2_; }

  //! Sets every tensor from a host function of the same configuration (converted to T).
  template <class U>
  void copy_from(const VitMlp<U, HostContext>& host) {
    norm2_.copy_from(host.norm2(), type_name);
    fc1_.copy_from(host.fc1(), type_name);
    fc2_.copy_from(host.fc2(), type_name);
  }

  //! Elements of saved internals for an input [B, N, D] (see the file comment).
  //! Throws dr2net::Error when `in` is not rank 3, its width is not D, a dimension is empty,
  //! or the size overflows (the error names the region).
  std::size_t saved_elements(const Shape& in) const { return layout(in).total; }

  //! out[B, N, D] = G(in); `scratch` (at least saved_elements(in) elements) holds the
  //! internals afterwards, as recompute leaves them. Dropout and drop-path apply only when
  //! call.training, with masks drawn from (call.seed, call.step, call.module).
  void forward(const ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> scratch) {
    recompute(call, in, out, scratch);  // the saved internals are the forward's own temporaries
  }

  //! out = G(in), bit-identical to forward() for the same call, and `saved` (at least
  //! saved_elements(in) elements) holds the internals backward() reads.
  void recompute(const ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> saved) {
    compute(call, in, out, saved, nullptr, 0.0);
  }

  //! grad_in += J_G(in)^T grad_out and every parameter gradient += its share (nothing is
  //! overwritten). `saved` must be what recompute() left for this `in` and call (the same
  //! masks are replayed). Temporaries ([M, hidden] dz, [M, D] dxn) come from call.context,
  //! metered as Scratch, and are freed before it returns.
  void backward(const ModuleCall<Ctx>& call, View<const T> in, View<const T> saved, View<const T> grad_out,
                View<T> grad_in) {
    const Layout L = layout(in.shape());
    check_views(in, grad_in, saved.size(), L, "backward");
    check_shape(grad_out, in.shape(), std::string(type_name) + " backward: grad_out");
    Ctx& cx = call.context;
    const T* s = saved.data();
    const A* mean = reinterpret_cast<const A*>(s + L.mean);
    const A* rstd = reinterpret_cast<const A*>(s + L.rstd);
    const T *xn = s + L.xn, *z = s + L.z, *a = s + L.a;
    const auto n = in.size();
    const auto nh = static_cast<std::size_t>(L.rows * config_.hidden);

    // dL/d(fc2 output) = grad_out * output mask.
    const T* g = grad_out.data();
    decltype(cx.template allocate<T>(std::size_t{}, MemoryCategory::Scratch)) masked;
    const DropScale<A> drop = output_drop(call, L);
    if (drop.active()) {
      masked = cx.template allocate<T>(n, MemoryCategory::Scratch, "MLP backward: masked gradient");
      for_each_index(cx, n, DropApply<T>{masked.data(), g, drop});
      g = masked.data();
    }
    auto dz = cx.template allocate<T>(nh, MemoryCategory::Scratch, "MLP backward: dz");
    fc2_.backward(cx, a, g, L.rows, dz.data());  // d(a) = g W2
    masked.reset();
    for_each_index(cx, nh, GeluDropBackward<T>{dz.data(), z, hidden_drop(call, L)});  // dz = da m1 gelu'(z)
    auto dxn = cx.template allocate<T>(n, MemoryCategory::Scratch, "MLP backward: dxn");
    fc1_.backward(cx, xn, dz.data(), L.rows, dxn.data());
    dz.reset();
    norm2_.backward(cx, in.data(), mean, rstd, dxn.data(), L.rows, grad_in.data());  // accumulates into grad_in
  }

  //! fn(parameter&) in the order of for_each_parameter: norm2, fc1, fc2 (weight, then bias).
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    norm2_.for_each_parameter_object(fn);
    fc1_.for_each_parameter_object(fn);
    fc2_.for_each_parameter_object(fn);
  }

 private:
  friend class OutputAddsInto<VitMlp<T, Ctx>>;
  double output_drop_path() const { return config_.drop_path; }
  double output_dropout() const { return config_.drop; }

  VitMlp(Ctx* ctx, const VitMlpConfig& config, FunctionOptions options)
      : config_(validated(config)), norm2_(make_layer_norm<T>(ctx, "norm2", config.dim, config.eps)),
        fc1_(make_linear<T>(ctx, "mlp.fc1", config.dim, config.hidden, options)),
        fc2_(make_linear<T>(ctx, "mlp.fc2", config.hidden, config.dim, options)) {}

  void init(std::uint64_t seed)
    requires is_host_context_v<Ctx>
  {
    fc1_.init(seed, 2);  // tags 0 and 1 are the attention's, so one seed can serve a whole block
    fc2_.init(seed, 3);
  }

  //! G(in) into out (+ addend_scale * addend when addend is not null), internals into saved.
  void compute(const ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> saved, const T* addend,
               double addend_scale) {
    const Layout L = layout(in.shape());
    check_views(in, out, saved.size(), L, "forward");
    Ctx& cx = call.context;
    T* s = saved.data();
    A* mean = reinterpret_cast<A*>(s + L.mean);
    A* rstd = reinterpret_cast<A*>(s + L.rstd);
    T *xn = s + L.xn, *z = s + L.z, *a = s + L.a;
    const auto nh = static_cast<std::size_t>(L.rows * config_.hidden);

    norm2_.forward(cx, in.data(), L.rows, xn, mean, rstd);
    fc1_.forward(cx, xn, L.rows, z);
    for_each_index(cx, nh, GeluDropForward<T>{a, z, hidden_drop(call, L)});  // a = gelu(z) * mask1
    fc2_.forward_add(cx, a, L.rows, addend, static_cast<A>(addend_scale), out.data());
    const DropScale<A> drop = output_drop(call, L);
    if (drop.active()) for_each_index(cx, out.size(), DropApply<T>{out.data(), out.data(), drop});
  }

  struct Layout {
    std::int64_t batch = 0, tokens = 0, rows = 0;
    std::size_t mean = 0, rstd = 0, xn = 0, z = 0, a = 0, total = 0;
  };

  static VitMlpConfig validated(const VitMlpConfig& c) {
    DR2NET_CHECK(c.dim > 0, "VitMlp: dim must be positive, got ", c.dim);
    DR2NET_CHECK(c.hidden > 0, "VitMlp: hidden width must be positive, got ", c.hidden);
    DR2NET_CHECK(std::isfinite(c.eps) && c.eps > 0, "VitMlp: eps must be positive and finite, got ", c.eps);
    check_drop_rate(c.drop_path, "drop_path", "VitMlp");
    check_drop_rate(c.drop, "drop", "VitMlp");
    return c;
  }

  Layout layout(const Shape& in) const {
    DR2NET_CHECK(in.rank() == 3, type_name, ": input must be [batch, tokens, width], got shape ", in);
    DR2NET_CHECK(in.last() == config_.dim, type_name, ": input width ", in.last(), " does not match dim ",
                 config_.dim, " (input shape ", in, ")");
    DR2NET_CHECK(in[0] > 0 && in[1] > 0, type_name, ": input shape ", in, " has an empty batch or token dimension");
    Layout L;
    L.batch = in[0];
    L.tokens = in[1];
    L.rows = in.rows();  // B N <= numel, which Shape checked
    // Every size in checked arithmetic (rows x hidden can overflow where the stream does not).
    const std::int64_t M = L.rows, D = config_.dim, Hd = config_.hidden;
    SavedLayoutBuilder<T, Ctx> b(is_host_context_v<Ctx> ? "VitMlp saved internals" : "CudaVitMlp saved internals");
    L.mean = b.take_acc(M, "mean (rows)");
    L.rstd = b.take_acc(M, "rstd (rows)");
    L.xn = b.take({M, D}, "xn (rows x dim)");
    L.z = b.take({M, Hd}, "z (rows x hidden)");
    L.a = b.take({M, Hd}, "a (rows x hidden)");
    L.total = b.total();
    (void)checked::bytes(b.regions.total(), sizeof(T), "VitMlp saved internals (bytes)");
    return L;
  }

  //! Contiguous input and output (or input gradient) of one shape, and enough saved space.
  static void check_views(View<const T> in, View<T> out, std::size_t saved, const Layout& L, const char* where) {
    const bool fwd = std::string_view(where) == "forward";
    const std::string me = std::string(type_name) + " " + where + ": ";
    const std::string what = me + (fwd ? "output" : "grad_in");
    check_contiguous(in, me + "input");
    check_contiguous(out, what);
    check_shape(out, in.shape(), what);
    DR2NET_CHECK(saved >= L.total, type_name, " ", where, ": saved/scratch holds ", saved, " elements, needs ",
                 L.total);
  }

  DropScale<A> output_drop(const ModuleCall<Ctx>& call, const Layout& L) const {
    return make_drop_scale<A>(call, config_.drop_path, config_.drop, RandomPurpose::OutputDropout,
                              static_cast<std::uint64_t>(L.tokens * config_.dim));
  }
  // Elements per sample of the hidden activation [B, N, Hd]: keys its dropout by the global sample.
  DropScale<A> hidden_drop(const ModuleCall<Ctx>& call, const Layout& L) const {
    return make_drop_scale<A>(call, 0.0, config_.drop, RandomPurpose::HiddenDropout,
                              static_cast<std::uint64_t>(L.tokens * config_.hidden));
  }

  VitMlpConfig config_;
  LayerNorm<T, Ctx> norm2_;
  Linear<T, Ctx> fc1_, fc2_;
};

}  // namespace dr2net
