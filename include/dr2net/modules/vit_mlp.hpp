#pragma once
//! \file
//! VitMlp<T>: the MLP residual function of a timm ViT block (pre-norm),
//!
//!   G(h) = DropPath(Dropout2(fc2(Dropout1(gelu(fc1(norm2(h)))))))
//!
//! with exact (erf) GELU and timm's tensor names (norm2.*, mlp.fc1.*, mlp.fc2.*). Like timm's
//! Mlp(drop=p), the one dropout rate applies after the activation and after fc2; both masks
//! and the drop-path mask are replayed from Philox and apply only when the call is training.
//!
//! Saved internals, for an input [B, N, D] with M = B N rows and hidden width Hd:
//!   xn [M, D] (norm2 output), mean [M], rstd [M], z [M, Hd] (fc1 output),
//!   a [M, Hd] (gelu(z) after the hidden dropout: fc2's input).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/backend/host/gelu.hpp"
#include "dr2net/block/residual_function.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/modules/adds_into.hpp"
#include "dr2net/modules/drop.hpp"
#include "dr2net/modules/layer_norm.hpp"
#include "dr2net/modules/linear.hpp"

namespace dr2net {

//! Sizes and rates of a ViT MLP function.
struct VitMlpConfig {
  std::int64_t dim = 0;     //!< D, the stream width
  std::int64_t hidden = 0;  //!< hidden width (timm: mlp_ratio * D, 4D for ViT)
  double eps = 1e-6;        //!< norm2's epsilon (timm's ViT: 1e-6)
  double drop_path = 0.0;   //!< stochastic-depth rate of this function, in [0, 1)
  double drop = 0.0;        //!< dropout rate after gelu and after fc2 (timm's Mlp drop), in [0, 1)
};

//! The host MLP residual function of a pre-norm timm ViT block (see the file comment for the
//! math and the saved layout), a ResidualFunction with the optional adds-into members.
//! Inputs are contiguous [B, N, D] (batch, tokens, width D = config().dim); parameters load by
//! timm name ("norm2.weight", "mlp.fc1.weight", ...). Every member that takes a view checks
//! its shape and throws dr2net::Error naming the member, the view and the sizes.
//! \tparam T compute type (float or double).
template <class T>
class VitMlp : public NamedParameterSet<VitMlp<T>>, public OutputAddsInto<VitMlp<T>> {
 public:
  //! Names this function in error messages.
  static constexpr std::string_view type_name = "VitMlp";
  using value_type = T;  //!< Compute type of parameters, activations and saved internals.
  //! Keep timm's names verbatim inside a block.
  static constexpr std::string_view parameter_prefix = "";

  //! Validates the configuration; weights are initialised as timm does (trunc_normal std
  //! 0.02, biases 0, LayerNorm 1/0), deterministically from `seed`.
  explicit VitMlp(const VitMlpConfig& config, std::uint64_t seed = 0)
      : config_(validated(config)), norm2_("norm2", config.dim, config.eps),
        fc1_("mlp.fc1", config.dim, config.hidden), fc2_("mlp.fc2", config.hidden, config.dim) {
    fc1_.init(seed, 2);  // tags 0 and 1 are the attention's, so one seed can serve a whole block
    fc2_.init(seed, 3);
  }

  //! The validated configuration this function was built with.
  const VitMlpConfig& config() const noexcept { return config_; }
  //! The pre-norm LayerNorm "norm2" over width D.
  LayerNorm<T>& norm2() noexcept { return norm2_; }
  //! The expanding layer "mlp.fc1", D -> hidden, followed by GELU.
  Linear<T>& fc1() noexcept { return fc1_; }
  //! The contracting layer "mlp.fc2", hidden -> D.
  Linear<T>& fc2() noexcept { return fc2_; }
  //! Read-only norm2(): the LayerNorm "norm2".
  const LayerNorm<T>& norm2() const noexcept { return norm2_; }
  //! Read-only fc1(): the Linear "mlp.fc1", D -> hidden.
  const Linear<T>& fc1() const noexcept { return fc1_; }
  //! Read-only fc2(): the Linear "mlp.fc2", hidden -> D.
  const Linear<T>& fc2() const noexcept { return fc2_; }

  //! Elements of saved internals for an input [B, N, D] (see the file comment).
  //! Throws dr2net::Error when `in` is not rank 3, its width is not D, a dimension is empty,
  //! or the size overflows (the error names the region).
  std::size_t saved_elements(const Shape& in) const { return layout(in).total; }

  //! out[B, N, D] = G(in); `scratch` (at least saved_elements(in) elements) holds the
  //! internals afterwards, as recompute leaves them. Dropout and drop-path apply only when
  //! call.training, with masks drawn from (call.seed, call.step, call.module).
  void forward(const ModuleCall<HostContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> scratch) {
    recompute(call, in, out, scratch);  // the saved internals are the forward's own temporaries
  }

  //! out = G(in), bit-identical to forward() for the same call, and `saved` (at least
  //! saved_elements(in) elements) holds the internals backward() reads.
  void recompute(const ModuleCall<HostContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> saved) {
    compute(call, in, out, saved, nullptr, 0.0);
  }

  //! grad_in += J_G(in)^T grad_out and every parameter gradient += its share (nothing is
  //! overwritten). `saved` must be what recompute() left for this `in` and call (the same
  //! masks are replayed). Temporaries ([M, hidden] dz, [M, D] dxn) come from call.context,
  //! metered as Scratch, and are freed before it returns.
  void backward(const ModuleCall<HostContext>& call, ConstView<T> in, ConstView<T> saved, ConstView<T> grad_out,
                TensorView<T> grad_in) {
    const Layout L = layout(in.shape());
    check_views(in, grad_in, saved.size(), L, "backward");
    check_shape(grad_out, in.shape(), "VitMlp backward: grad_out");
    const T* s = saved.data();
    const T *xn = s + L.xn, *mean = s + L.mean, *rstd = s + L.rstd, *z = s + L.z, *a = s + L.a;
    HostContext& cx = call.context;
    const auto n = in.size();
    const auto nh = static_cast<std::size_t>(L.rows * config_.hidden);

    // dL/d(fc2 output) = grad_out * output mask.
    const T* g = grad_out.data();
    HostBuffer<T> masked;
    const DropScale<T> drop = output_drop(call, L);
    if (drop.active()) {
      masked = cx.allocate<T>(n, MemoryCategory::Scratch);
      for_each_index(cx, n, ApplyDropScale<T>{masked.data(), g, drop});
      g = masked.data();
    }

    HostBuffer<T> dz = cx.allocate<T>(nh, MemoryCategory::Scratch);
    fc2_.backward(a, g, L.rows, dz.data());  // d(a) = g W2
    masked.reset();
    const DropScale<T> hidden_drop = hidden_drop_scale(call, L);
    if (hidden_drop.active()) for_each_index(cx, nh, ApplyDropScale<T>{dz.data(), dz.data(), hidden_drop});
    for_each_index(cx, nh, GeluBackward<T>{dz.data(), z});  // dz = d(gelu(z)) * gelu'(z)

    HostBuffer<T> dxn = cx.allocate<T>(n, MemoryCategory::Scratch);
    fc1_.backward(xn, dz.data(), L.rows, dxn.data());
    dz.reset();
    norm2_.backward(in.data(), mean, rstd, dxn.data(), L.rows, grad_in.data());  // accumulates into grad_in
  }

  //! fn(Parameter<T>&) in the order of for_each_parameter.
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    norm2_.for_each_parameter_object(fn);
    fc1_.for_each_parameter_object(fn);
    fc2_.for_each_parameter_object(fn);
  }

 private:
  friend class OutputAddsInto<VitMlp<T>>;
  double output_drop_path() const { return config_.drop_path; }
  double output_dropout() const { return config_.drop; }

  //! F(in) into out (+ addend_scale * addend when addend is not null), internals into saved.
  void compute(const ModuleCall<HostContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> saved,
               const T* addend, double addend_scale) {
    const Layout L = layout(in.shape());
    check_views(in, out, saved.size(), L, "forward");
    T* s = saved.data();
    T *xn = s + L.xn, *mean = s + L.mean, *rstd = s + L.rstd, *z = s + L.z, *a = s + L.a;
    const auto nh = static_cast<std::size_t>(L.rows * config_.hidden);

    norm2_.forward(in.data(), L.rows, xn, mean, rstd);
    fc1_.forward(xn, L.rows, z);
    for_each_index(call.context, nh, GeluForward<T>{a, z});  // a = gelu(z)
    const DropScale<T> hidden_drop = hidden_drop_scale(call, L);
    if (hidden_drop.active()) for_each_index(call.context, nh, ApplyDropScale<T>{a, a, hidden_drop});
    fc2_.forward_add(a, L.rows, addend, static_cast<T>(addend_scale), out.data());
    const DropScale<T> drop = output_drop(call, L);
    if (drop.active()) for_each_index(call.context, out.size(), ApplyDropScale<T>{out.data(), out.data(), drop});
  }

  struct Layout {
    std::int64_t batch = 0, tokens = 0, rows = 0;
    std::size_t xn = 0, mean = 0, rstd = 0, z = 0, a = 0, total = 0;
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
    DR2NET_CHECK(in.rank() == 3, "VitMlp: input must be [batch, tokens, width], got shape ", in);
    DR2NET_CHECK(in.last() == config_.dim, "VitMlp: input width ", in.last(), " does not match dim ", config_.dim,
                 " (input shape ", in, ")");
    DR2NET_CHECK(in[0] > 0 && in[1] > 0, "VitMlp: input shape ", in, " has an empty batch or token dimension");
    Layout L;
    L.batch = in[0];
    L.tokens = in[1];
    L.rows = in.rows();  // B N <= numel, which Shape checked
    // Every size in checked arithmetic (rows x hidden can overflow where the stream does not).
    const std::int64_t M = L.rows, D = config_.dim, Hd = config_.hidden;
    checked::RegionLayout r("VitMlp saved internals");
    L.xn = static_cast<std::size_t>(r.take({M, D}, "xn (rows x dim)"));
    L.mean = static_cast<std::size_t>(r.take({M}, "mean (rows)"));
    L.rstd = static_cast<std::size_t>(r.take({M}, "rstd (rows)"));
    L.z = static_cast<std::size_t>(r.take({M, Hd}, "z (rows x hidden)"));
    L.a = static_cast<std::size_t>(r.take({M, Hd}, "a (rows x hidden)"));
    L.total = static_cast<std::size_t>(r.total());
    (void)checked::bytes(r.total(), sizeof(T), "VitMlp saved internals (bytes)");
    return L;
  }

  //! Contiguous input and output (or input gradient) of one shape, and enough saved space.
  static void check_views(ConstView<T> in, TensorView<T> out, std::size_t saved, const Layout& L, const char* where) {
    const bool fwd = std::string_view(where) == "forward";
    const std::string what = std::string("VitMlp ") + where + ": " + (fwd ? "output" : "grad_in");
    check_contiguous(in, std::string("VitMlp ") + where + ": input");
    check_contiguous(out, what);
    check_shape(out, in.shape(), what);
    DR2NET_CHECK(saved >= L.total, "VitMlp ", where, ": saved/scratch holds ", saved, " elements, needs ", L.total);
  }

  DropScale<T> output_drop(const ModuleCall<HostContext>& call, const Layout& L) const {
    return make_drop_scale<T>(call, config_.drop_path, config_.drop, RandomPurpose::OutputDropout,
                              static_cast<std::uint64_t>(L.tokens * config_.dim));
  }
  DropScale<T> hidden_drop_scale(const ModuleCall<HostContext>& call, const Layout&) const {
    return make_drop_scale<T>(call, 0.0, config_.drop, RandomPurpose::HiddenDropout, 1);
  }

  VitMlpConfig config_;
  LayerNorm<T> norm2_;
  Linear<T> fc1_, fc2_;
};

}  // namespace dr2net
