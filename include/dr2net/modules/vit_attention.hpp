#pragma once
//! \file
//! VitAttention<T>: the attention residual function of a timm ViT block (pre-norm),
//!
//!   F(h) = DropPath(Dropout(proj(attn(norm1(h)))))
//!   attn(x): qkv = x Wqkv^T + bqkv, per token laid out as (3, heads, head_dim);
//!            per (batch, head): P = softmax(q k^T * head_dim^-0.5), out = P v;
//!            heads concatenated back to [B, N, D]
//!
//! with timm's tensor names (norm1.*, attn.qkv.*, attn.proj.*) and a parameter_prefix of ""
//! so that a stack names them blocks.{i}.norm1.weight and so on. Drop-path and dropout apply
//! only when the call is training, with masks replayed from Philox (modules/drop.hpp).
//!
//! Saved internals (what backward reads), for an input [B, N, D] with M = B N rows:
//!   xn [M, D] (norm1 output), mean [M], rstd [M], qkv [M, 3D], probs [B, H, N, N],
//!   ctx [M, D] (attention output before proj).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/backend/host/gemm.hpp"
#include "dr2net/backend/host/softmax.hpp"
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

//! Sizes and rates of a ViT attention function.
struct VitAttentionConfig {
  std::int64_t dim = 0;        //!< D, the stream width
  std::int64_t num_heads = 0;  //!< H; must divide D
  double eps = 1e-6;           //!< norm1's epsilon (timm's ViT: 1e-6)
  double drop_path = 0.0;      //!< stochastic-depth rate of this function, in [0, 1)
  double proj_drop = 0.0;      //!< dropout rate on the output (timm's proj_drop), in [0, 1)
};

//! The host attention residual function of a pre-norm timm ViT block (see the file comment
//! for the math and the saved layout), a ResidualFunction with the optional adds-into members.
//! Inputs are contiguous [B, N, D] (batch, tokens, width D = config().dim); parameters load by
//! timm name ("norm1.weight", "attn.qkv.weight", ...). Every member that takes a view checks
//! its shape and throws dr2net::Error naming the member, the view and the sizes.
//! \tparam T compute type (float or double).
template <class T>
class VitAttention : public NamedParameterSet<VitAttention<T>>, public OutputAddsInto<VitAttention<T>> {
 public:
  //! Names this function in error messages.
  static constexpr std::string_view type_name = "VitAttention";
  using value_type = T;  //!< Compute type of parameters, activations and saved internals.
  //! Keep timm's names verbatim inside a block.
  static constexpr std::string_view parameter_prefix = "";

  //! Validates the configuration; weights are initialised as timm does (trunc_normal std
  //! 0.02, biases 0, LayerNorm 1/0), deterministically from `seed`.
  explicit VitAttention(const VitAttentionConfig& config, std::uint64_t seed = 0)
      : config_(validated(config)), norm1_("norm1", config.dim, config.eps),
        qkv_("attn.qkv", config.dim, checked::mul(3, config.dim, "VitAttention: qkv width 3 x dim")), proj_("attn.proj", config.dim, config.dim) {
    qkv_.init(seed, 0);
    proj_.init(seed, 1);
  }

  //! The validated configuration this function was built with.
  const VitAttentionConfig& config() const noexcept { return config_; }
  //! Width of one head, D / H; the attention logits are scaled by head_dim()^-0.5.
  std::int64_t head_dim() const noexcept { return config_.dim / config_.num_heads; }
  //! The pre-norm LayerNorm "norm1" over width D.
  LayerNorm<T>& norm1() noexcept { return norm1_; }
  //! The input projection "attn.qkv", D -> 3D; each output row is laid out (3, heads, head_dim).
  Linear<T>& qkv() noexcept { return qkv_; }
  //! The output projection "attn.proj", D -> D, applied to the concatenated heads.
  Linear<T>& proj() noexcept { return proj_; }
  //! Read-only norm1(): the LayerNorm "norm1".
  const LayerNorm<T>& norm1() const noexcept { return norm1_; }
  //! Read-only qkv(): the Linear "attn.qkv", D -> 3D.
  const Linear<T>& qkv() const noexcept { return qkv_; }
  //! Read-only proj(): the Linear "attn.proj", D -> D.
  const Linear<T>& proj() const noexcept { return proj_; }

  //! Elements of saved internals for an input [B, N, D] (see the file comment).
  //! Throws dr2net::Error when `in` is not rank 3, its width is not D, a dimension is empty,
  //! or the size overflows (the error names the region: the B H N^2 probabilities, say).
  std::size_t saved_elements(const Shape& in) const { return layout(in).total; }

  //! out[B, N, D] = F(in); `scratch` (at least saved_elements(in) elements) holds the
  //! internals afterwards, as recompute leaves them. Dropout and drop-path apply only when
  //! call.training, with masks drawn from (call.seed, call.step, call.module).
  void forward(const ModuleCall<HostContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> scratch) {
    recompute(call, in, out, scratch);  // the saved internals are the forward's own temporaries
  }

  //! out = F(in), bit-identical to forward() for the same call, and `saved` (at least
  //! saved_elements(in) elements) holds the internals backward() reads.
  void recompute(const ModuleCall<HostContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> saved) {
    compute(call, in, out, saved, nullptr, 0.0);
  }

  //! grad_in += J_F(in)^T grad_out and every parameter gradient += its share (nothing is
  //! overwritten). `saved` must be what recompute() left for this `in` and call (the same
  //! masks are replayed). Temporaries (dqkv, one N x N dP) come from call.context, metered
  //! as Scratch, and are freed before it returns.
  void backward(const ModuleCall<HostContext>& call, ConstView<T> in, ConstView<T> saved, ConstView<T> grad_out,
                TensorView<T> grad_in) {
    const Layout L = layout(in.shape());
    check_views(in, grad_in, saved.size(), L, "backward");
    check_shape(grad_out, in.shape(), "VitAttention backward: grad_out");
    const std::int64_t B = L.batch, N = L.tokens, D = config_.dim, H = config_.num_heads, hd = head_dim();
    const T* s = saved.data();
    const T *xn = s + L.xn, *mean = s + L.mean, *rstd = s + L.rstd, *qkv = s + L.qkv, *probs = s + L.probs,
            *ctx = s + L.ctx;
    HostContext& cx = call.context;
    const auto n = in.size();

    // dL/d(proj output) = grad_out * mask: the same factor the forward multiplied by.
    const T* g = grad_out.data();
    HostBuffer<T> masked;
    const DropScale<T> drop = output_drop(call, L);
    if (drop.active()) {
      masked = cx.allocate<T>(n, MemoryCategory::Scratch);
      for_each_index(cx, n, ApplyDropScale<T>{masked.data(), g, drop});
      g = masked.data();
    }

    HostBuffer<T> dctx = cx.allocate<T>(n, MemoryCategory::Scratch);
    proj_.backward(ctx, g, L.rows, dctx.data());
    masked.reset();

    const T scale = attention_scale();
    // Both no larger than regions of the checked layout (qkv, probs).
    HostBuffer<T> dqkv = cx.allocate<T>(static_cast<std::size_t>(L.rows * 3 * D), MemoryCategory::Scratch,
                                        "VitAttention backward: dqkv");
    HostBuffer<T> dp = cx.allocate<T>(static_cast<std::size_t>(N * N), MemoryCategory::Scratch,
                                      "VitAttention backward: dP");
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t h = 0; h < H; ++h) {
        const T* q = qkv + b * N * 3 * D + h * hd;
        const T *k = q + D, *v = q + 2 * D;
        const T* p = probs + (b * H + h) * N * N;
        const T* dc = dctx.data() + b * N * D + h * hd;
        T* dq = dqkv.data() + b * N * 3 * D + h * hd;
        T *dk = dq + D, *dv = dq + 2 * D;
        host_gemm<T>(Transpose::No, Transpose::Yes, N, N, hd, T(1), dc, D, v, 3 * D, T(0), dp.data(), N);  // dP = dc v^T
        host_gemm<T>(Transpose::Yes, Transpose::No, N, hd, N, T(1), p, N, dc, D, T(0), dv, 3 * D);          // dv = P^T dc
        softmax_rows_backward_inplace(p, dp.data(), N, N, N, scale);  // dS s = s P (dP - rowsum(dP P))
        host_gemm<T>(Transpose::No, Transpose::No, N, hd, N, T(1), dp.data(), N, k, 3 * D, T(0), dq, 3 * D);  // dq = dS k
        host_gemm<T>(Transpose::Yes, Transpose::No, N, hd, N, T(1), dp.data(), N, q, 3 * D, T(0), dk, 3 * D);  // dk = dS^T q
      }
    }
    dp.reset();
    dctx.reset();
    HostBuffer<T> dxn = cx.allocate<T>(n, MemoryCategory::Scratch);
    qkv_.backward(xn, dqkv.data(), L.rows, dxn.data());
    dqkv.reset();
    norm1_.backward(in.data(), mean, rstd, dxn.data(), L.rows, grad_in.data());  // accumulates into grad_in
  }

  //! fn(Parameter<T>&) in the order of for_each_parameter.
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    norm1_.for_each_parameter_object(fn);
    qkv_.for_each_parameter_object(fn);
    proj_.for_each_parameter_object(fn);
  }

 private:
  friend class OutputAddsInto<VitAttention<T>>;
  double output_drop_path() const { return config_.drop_path; }
  double output_dropout() const { return config_.proj_drop; }

  //! F(in) into out (+ addend_scale * addend when addend is not null), internals into saved.
  void compute(const ModuleCall<HostContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> saved,
               const T* addend, double addend_scale) {
    const Layout L = layout(in.shape());
    check_views(in, out, saved.size(), L, "forward");
    const std::int64_t B = L.batch, N = L.tokens, D = config_.dim, H = config_.num_heads, hd = head_dim();
    T* s = saved.data();
    T *xn = s + L.xn, *mean = s + L.mean, *rstd = s + L.rstd, *qkv = s + L.qkv, *probs = s + L.probs, *ctx = s + L.ctx;

    norm1_.forward(in.data(), L.rows, xn, mean, rstd);
    qkv_.forward(xn, L.rows, qkv);
    const T scale = attention_scale();
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t h = 0; h < H; ++h) {
        // q, k, v of (b, h): N x hd blocks of the qkv rows, leading dimension 3D.
        const T* q = qkv + b * N * 3 * D + h * hd;
        const T *k = q + D, *v = q + 2 * D;
        T* p = probs + (b * H + h) * N * N;
        host_gemm<T>(Transpose::No, Transpose::Yes, N, N, hd, scale, q, 3 * D, k, 3 * D, T(0), p, N);  // S = q k^T s
        softmax_rows_inplace(p, N, N, N);                                                              // P = softmax(S)
        host_gemm<T>(Transpose::No, Transpose::No, N, hd, N, T(1), p, N, v, 3 * D, T(0), ctx + b * N * D + h * hd,
                     D);  // ctx[b, :, head h] = P v
      }
    }
    proj_.forward_add(ctx, L.rows, addend, static_cast<T>(addend_scale), out.data());
    const DropScale<T> drop = output_drop(call, L);
    if (drop.active()) for_each_index(call.context, out.size(), ApplyDropScale<T>{out.data(), out.data(), drop});
  }

  //! Offsets of the saved internals in the scratch, and their total.
  struct Layout {
    std::int64_t batch = 0, tokens = 0, rows = 0;
    std::size_t xn = 0, mean = 0, rstd = 0, qkv = 0, probs = 0, ctx = 0, total = 0;
  };

  static VitAttentionConfig validated(const VitAttentionConfig& c) {
    DR2NET_CHECK(c.dim > 0, "VitAttention: dim must be positive, got ", c.dim);
    DR2NET_CHECK(c.num_heads > 0, "VitAttention: num_heads must be positive, got ", c.num_heads);
    DR2NET_CHECK(c.dim % c.num_heads == 0, "VitAttention: num_heads = ", c.num_heads, " does not divide dim = ", c.dim);
    DR2NET_CHECK(std::isfinite(c.eps) && c.eps > 0, "VitAttention: eps must be positive and finite, got ", c.eps);
    check_drop_rate(c.drop_path, "drop_path", "VitAttention");
    check_drop_rate(c.proj_drop, "proj_drop", "VitAttention");
    return c;
  }

  Layout layout(const Shape& in) const {
    DR2NET_CHECK(in.rank() == 3, "VitAttention: input must be [batch, tokens, width], got shape ", in);
    DR2NET_CHECK(in.last() == config_.dim, "VitAttention: input width ", in.last(), " does not match dim ",
                 config_.dim, " (input shape ", in, ")");
    DR2NET_CHECK(in[0] > 0 && in[1] > 0, "VitAttention: input shape ", in, " has an empty batch or token dimension");
    Layout L;
    L.batch = in[0];
    L.tokens = in[1];
    L.rows = in.rows();  // B N <= numel, which Shape checked
    // Every size in checked arithmetic: batch x heads x tokens^2 overflows int64 long before
    // the streams do, and a wrapped size would under-allocate the scratch.
    const std::int64_t Bt = L.batch, M = L.rows, D = config_.dim, H = config_.num_heads, N = L.tokens;
    checked::RegionLayout r("VitAttention saved internals");
    L.xn = static_cast<std::size_t>(r.take({M, D}, "xn (rows x dim)"));
    L.mean = static_cast<std::size_t>(r.take({M}, "mean (rows)"));
    L.rstd = static_cast<std::size_t>(r.take({M}, "rstd (rows)"));
    L.qkv = static_cast<std::size_t>(r.take({M, 3, D}, "qkv (rows x 3 x dim)"));
    L.probs = static_cast<std::size_t>(
        r.take({Bt, H, N, N}, "attention probabilities (batch x heads x tokens x tokens)"));
    L.ctx = static_cast<std::size_t>(r.take({M, D}, "ctx (rows x dim)"));
    L.total = static_cast<std::size_t>(r.total());
    (void)checked::bytes(r.total(), sizeof(T), "VitAttention saved internals (bytes)");
    return L;
  }

  //! Contiguous input and output (or input gradient) of one shape, and enough saved space.
  static void check_views(ConstView<T> in, TensorView<T> out, std::size_t saved, const Layout& L, const char* where) {
    const bool fwd = std::string_view(where) == "forward";
    const std::string what = std::string("VitAttention ") + where + ": " + (fwd ? "output" : "grad_in");
    check_contiguous(in, std::string("VitAttention ") + where + ": input");
    check_contiguous(out, what);
    check_shape(out, in.shape(), what);
    DR2NET_CHECK(saved >= L.total, "VitAttention ", where, ": saved/scratch holds ", saved, " elements, needs ", L.total);
  }

  T attention_scale() const { return static_cast<T>(1.0 / std::sqrt(static_cast<double>(head_dim()))); }

  DropScale<T> output_drop(const ModuleCall<HostContext>& call, const Layout& L) const {
    return make_drop_scale<T>(call, config_.drop_path, config_.proj_drop, RandomPurpose::OutputDropout,
                              static_cast<std::uint64_t>(L.tokens * config_.dim));
  }

  VitAttentionConfig config_;
  LayerNorm<T> norm1_;
  Linear<T> qkv_, proj_;
};

}  // namespace dr2net
