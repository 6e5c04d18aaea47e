#pragma once
//! \file
//! VitAttention<T, Ctx>: the attention residual function of a timm ViT block (pre-norm),
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
//! Written once over the backend primitives (backend/host/primitives.hpp and its CUDA twin)
//! and instantiated for HostContext (the default) and CudaContext (modules/cuda/vit_attention.cuh
//! names that CudaVitAttention<T>). q, k and v are moved to the head-major layout
//! [3, B, H, N, hd] (HeadLayout), so each attention GEMM is ONE strided-batched call over all
//! B x H heads (stride N hd), and the softmax one call over all B H N rows.
//!
//! Saved internals (what backward reads), for an input [B, N, D] with M = B N rows
//! (SavedLayoutBuilder: packed on the host, 256-byte aligned regions on a device):
//!   mean [M], rstd [M] (accumulate_t<T>), xn [M, D] (norm1 output), qkv [3, B, H, N, hd]
//!   (head-major), probs [B, H, N, N], ctx [M, D] (attention output before proj, token rows).
//! Temporaries (from the context, metered as Scratch, freed before return): forward the qkv rows
//! [M, 3D] and the head-major output [M, D]; backward dctx, dq/dk/dv (twice: head-major and
//! rows), dP [B, H, N, N] and dxn.

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

//! Sizes and rates of a ViT attention function.
struct VitAttentionConfig {
  std::int64_t dim = 0;        //!< D, the stream width
  std::int64_t num_heads = 0;  //!< H; must divide D
  double eps = 1e-6;           //!< norm1's epsilon (timm's ViT: 1e-6)
  double drop_path = 0.0;      //!< stochastic-depth rate of this function, in [0, 1)
  double proj_drop = 0.0;      //!< dropout rate on the output (timm's proj_drop), in [0, 1)
};

//! The attention residual function of a pre-norm timm ViT block (see the file comment for the
//! math and the saved layout), a ResidualFunction with the optional adds-into members.
//! Inputs are contiguous [B, N, D] (batch, tokens, width D = config().dim) in the backend's
//! memory; parameters load by timm name ("norm1.weight", "attn.qkv.weight", ...). Every member
//! that takes a view checks its shape (on the host, before anything is enqueued) and throws
//! dr2net::Error naming the member, the view and the sizes. On a device backend the work is
//! only enqueued on call.context's stream. Not thread-safe.
//! \tparam T compute type (float or double; also bf16/fp16 on the device)
//! \tparam Ctx backend context: HostContext (default) or CudaContext
template <class T, class Ctx = HostContext>
class VitAttention : public NamedParameterSet<VitAttention<T, Ctx>>, public OutputAddsInto<VitAttention<T, Ctx>> {
 public:
  //! Names this function in error messages.
  static constexpr std::string_view type_name = is_host_context_v<Ctx> ? "VitAttention" : "CudaVitAttention";
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
  explicit VitAttention(const VitAttentionConfig& config, std::uint64_t seed = 0)
    requires is_host_context_v<Ctx>
      : VitAttention(nullptr, validated(config), FunctionOptions{}) {
    init(seed);
  }
  //! The same on `ctx`: on a device the weights are drawn exactly as VitAttention<float>(config,
  //! seed) draws them (on the host), then copied and converted to T.
  VitAttention(Ctx& ctx, const VitAttentionConfig& config, std::uint64_t seed = 0, FunctionOptions options = {})
      : VitAttention(&ctx, validated(config), options) {
    if constexpr (is_host_context_v<Ctx>) init(seed);
    else copy_from(VitAttention<float, HostContext>(config, seed));
  }
  //! A copy of a host function on `ctx`: its configuration and parameters, converted to T.
  //! Throws dr2net::Error naming the tensor when memory runs out.
  template <class U>
  VitAttention(Ctx& ctx, const VitAttention<U, HostContext>& host, FunctionOptions options = {})
      : VitAttention(&ctx, host.config(), options) {
    copy_from(host);
  }

  //! The validated configuration this function was built with.
  const VitAttentionConfig& config() const noexcept { return config_; }
  //! Width of one head, D / H; the attention logits are scaled by head_dim()^-0.5.
  std::int64_t head_dim() const noexcept { return config_.dim / config_.num_heads; }
  //! The pre-norm LayerNorm "norm1" over width D.
  LayerNorm<T, Ctx>& norm1() noexcept { return norm1_; }
  //! The input projection "attn.qkv", D -> 3D; each output row is laid out (3, heads, head_dim).
  Linear<T, Ctx>& qkv() noexcept { return qkv_; }
  //! The output projection "attn.proj", D -> D, applied to the concatenated heads.
  Linear<T, Ctx>& proj() noexcept { return proj_; }
  //! Read-only norm1(): the LayerNorm "norm1".
  const LayerNorm<T, Ctx>& norm1() const noexcept { return norm1_; }
  //! Read-only qkv(): the Linear "attn.qkv", D -> 3D.
  const Linear<T, Ctx>& qkv() const noexcept { return qkv_; }
  //! Read-only proj(): the Linear "attn.proj", D -> D.
  const Linear<T, Ctx>& proj() const noexcept { return proj_; }

  //! Sets every tensor from a host function of the same configuration (converted to T).
  template <class U>
  void copy_from(const VitAttention<U, HostContext>& host) {
    norm1_.copy_from(host.norm1(), type_name);
    qkv_.copy_from(host.qkv(), type_name);
    proj_.copy_from(host.proj(), type_name);
  }

  //! Elements of saved internals for an input [B, N, D] (see the file comment).
  //! Throws dr2net::Error when `in` is not rank 3, its width is not D, a dimension is empty,
  //! or the size overflows (the error names the region: the B H N^2 probabilities, say).
  std::size_t saved_elements(const Shape& in) const { return layout(in).total; }

  //! out[B, N, D] = F(in); `scratch` (at least saved_elements(in) elements) holds the
  //! internals afterwards, as recompute leaves them. Dropout and drop-path apply only when
  //! call.training, with masks drawn from (call.seed, call.step, call.module).
  void forward(const ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> scratch) {
    recompute(call, in, out, scratch);  // the saved internals are the forward's own temporaries
  }

  //! out = F(in), bit-identical to forward() for the same call, and `saved` (at least
  //! saved_elements(in) elements) holds the internals backward() reads.
  void recompute(const ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> saved) {
    compute(call, in, out, saved, nullptr, 0.0);
  }

  //! grad_in += J_F(in)^T grad_out and every parameter gradient += its share (nothing is
  //! overwritten). `saved` must be what recompute() left for this `in` and call (the same
  //! masks are replayed). Temporaries come from call.context, metered as Scratch, and are
  //! freed before it returns.
  void backward(const ModuleCall<Ctx>& call, View<const T> in, View<const T> saved, View<const T> grad_out,
                View<T> grad_in) {
    const Layout L = layout(in.shape());
    check_views(in, grad_in, saved.size(), L, "backward");
    check_shape(grad_out, in.shape(), std::string(type_name) + " backward: grad_out");
    Ctx& cx = call.context;
    const std::int64_t BH = L.batch * config_.num_heads, N = L.tokens, hd = head_dim();
    const T* s = saved.data();
    const A* mean = reinterpret_cast<const A*>(s + L.mean);
    const A* rstd = reinterpret_cast<const A*>(s + L.rstd);
    const T *xn = s + L.xn, *q = s + L.qkv, *probs = s + L.probs, *ctx = s + L.ctx;
    const T *k = q + L.heads_elements, *v = k + L.heads_elements;
    const auto n = in.size();

    // dL/d(proj output) = grad_out * mask: the same factor the forward multiplied by.
    const T* g = grad_out.data();
    decltype(cx.template allocate<T>(std::size_t{}, MemoryCategory::Scratch)) masked;
    const DropScale<A> drop = output_drop(call, L);
    if (drop.active()) {
      masked = cx.template allocate<T>(n, MemoryCategory::Scratch, "attention backward: masked gradient");
      for_each_index(cx, n, DropApply<T>{masked.data(), g, drop});
      g = masked.data();
    }
    auto dctx = cx.template allocate<T>(n, MemoryCategory::Scratch, "attention backward: dctx");
    proj_.backward(cx, ctx, g, L.rows, dctx.data());
    masked.reset();
    auto dctx_heads = cx.template allocate<T>(n, MemoryCategory::Scratch, "attention backward: dctx (heads)");
    for_each_index(cx, n, head_layout(dctx_heads.data(), dctx.data(), L, 1, true));
    dctx.reset();

    const A scale = attention_scale();
    // Both no larger than regions of the checked layout (qkv, probs).
    auto dqkv_heads = cx.template allocate<T>(3 * L.heads_elements, MemoryCategory::Scratch,
                                              "attention backward: dq, dk, dv (heads)");
    T *dq = dqkv_heads.data(), *dk = dq + L.heads_elements, *dv = dk + L.heads_elements;
    auto dp = cx.template allocate<T>(L.probs_elements, MemoryCategory::Scratch, "attention backward: dP");
    const T* dc = dctx_heads.data();
    const std::int64_t sh = N * hd, sp = N * N;
    gemm_strided_batched<T>(cx, Transpose::No, Transpose::Yes, N, N, hd, A(1), dc, hd, sh, v, hd, sh, A(0), dp.data(),
                            N, sp, BH, tf32_);  // dP = dc v^T
    gemm_strided_batched<T>(cx, Transpose::Yes, Transpose::No, N, hd, N, A(1), probs, N, sp, dc, hd, sh, A(0), dv, hd,
                            sh, BH, tf32_);  // dv = P^T dc
    softmax_rows_backward_inplace<T>(cx, probs, dp.data(), BH * N, N, N, scale);  // dS s = s P (dP - rowsum(dP P))
    gemm_strided_batched<T>(cx, Transpose::No, Transpose::No, N, hd, N, A(1), dp.data(), N, sp, k, hd, sh, A(0), dq,
                            hd, sh, BH, tf32_);  // dq = dS k
    gemm_strided_batched<T>(cx, Transpose::Yes, Transpose::No, N, hd, N, A(1), dp.data(), N, sp, q, hd, sh, A(0), dk,
                            hd, sh, BH, tf32_);  // dk = dS^T q
    dp.reset();
    dctx_heads.reset();
    auto dqkv = cx.template allocate<T>(3 * L.heads_elements, MemoryCategory::Scratch, "attention backward: dqkv");
    for_each_index(cx, 3 * L.heads_elements, head_layout(dqkv.data(), dqkv_heads.data(), L, 3, false));
    dqkv_heads.reset();
    auto dxn = cx.template allocate<T>(n, MemoryCategory::Scratch, "attention backward: dxn");
    qkv_.backward(cx, xn, dqkv.data(), L.rows, dxn.data());
    dqkv.reset();
    norm1_.backward(cx, in.data(), mean, rstd, dxn.data(), L.rows, grad_in.data());  // accumulates into grad_in
  }

  //! fn(parameter&) in the order of for_each_parameter: norm1, qkv, proj (weight, then bias).
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    norm1_.for_each_parameter_object(fn);
    qkv_.for_each_parameter_object(fn);
    proj_.for_each_parameter_object(fn);
  }

 private:
  friend class OutputAddsInto<VitAttention<T, Ctx>>;
  double output_drop_path() const { return config_.drop_path; }
  double output_dropout() const { return config_.proj_drop; }

  VitAttention(Ctx* ctx, const VitAttentionConfig& config, FunctionOptions options)
      : config_(validated(config)), norm1_(make_layer_norm<T>(ctx, "norm1", config.dim, config.eps)),
        qkv_(make_linear<T>(ctx, "attn.qkv", config.dim,
                            checked::mul(3, config.dim, "VitAttention: qkv width 3 x dim"), options)),
        proj_(make_linear<T>(ctx, "attn.proj", config.dim, config.dim, options)), tf32_(options.allow_tf32) {}

  void init(std::uint64_t seed)
    requires is_host_context_v<Ctx>
  {
    qkv_.init(seed, 0);
    proj_.init(seed, 1);
  }

  //! F(in) into out (+ addend_scale * addend when addend is not null), internals into saved.
  void compute(const ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> saved, const T* addend,
               double addend_scale) {
    const Layout L = layout(in.shape());
    check_views(in, out, saved.size(), L, "forward");
    Ctx& cx = call.context;
    const std::int64_t BH = L.batch * config_.num_heads, N = L.tokens, hd = head_dim();
    T* s = saved.data();
    A* mean = reinterpret_cast<A*>(s + L.mean);
    A* rstd = reinterpret_cast<A*>(s + L.rstd);
    T *xn = s + L.xn, *q = s + L.qkv, *probs = s + L.probs, *ctx = s + L.ctx;
    const T *k = q + L.heads_elements, *v = k + L.heads_elements;

    norm1_.forward(cx, in.data(), L.rows, xn, mean, rstd);
    {
      auto rows = cx.template allocate<T>(3 * L.heads_elements, MemoryCategory::Scratch, "attention: qkv rows");
      qkv_.forward(cx, xn, L.rows, rows.data());
      for_each_index(cx, 3 * L.heads_elements, head_layout(q, rows.data(), L, 3, true));
    }
    const A scale = attention_scale();
    const std::int64_t sh = N * hd, sp = N * N;
    gemm_strided_batched<T>(cx, Transpose::No, Transpose::Yes, N, N, hd, scale, q, hd, sh, k, hd, sh, A(0), probs, N,
                            sp, BH, tf32_);           // S = q k^T s
    softmax_rows_inplace<T>(cx, probs, BH * N, N, N);  // P = softmax(S)
    {
      auto heads = cx.template allocate<T>(L.heads_elements, MemoryCategory::Scratch, "attention: output (heads)");
      gemm_strided_batched<T>(cx, Transpose::No, Transpose::No, N, hd, N, A(1), probs, N, sp, v, hd, sh, A(0),
                              heads.data(), hd, sh, BH, tf32_);  // P v, head-major
      for_each_index(cx, L.heads_elements, head_layout(ctx, heads.data(), L, 1, false));  // concatenate heads
    }
    proj_.forward_add(cx, ctx, L.rows, addend, static_cast<A>(addend_scale), out.data());
    const DropScale<A> drop = output_drop(call, L);
    if (drop.active()) for_each_index(cx, out.size(), DropApply<T>{out.data(), out.data(), drop});
  }

  //! Offsets of the saved internals in the scratch, and their total.
  struct Layout {
    std::int64_t batch = 0, tokens = 0, rows = 0;
    std::size_t heads_elements = 0;  //!< M D: one of q, k, v, or the attention output
    std::size_t probs_elements = 0;  //!< B H N^2
    std::size_t mean = 0, rstd = 0, xn = 0, qkv = 0, probs = 0, ctx = 0, total = 0;
  };

  HeadLayout<T> head_layout(T* dst, const T* src, const Layout& L, std::int64_t groups, bool to_heads) const {
    return HeadLayout<T>{dst, src, L.batch, L.tokens, groups, config_.num_heads, head_dim(), to_heads};
  }

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
    DR2NET_CHECK(in.rank() == 3, type_name, ": input must be [batch, tokens, width], got shape ", in);
    DR2NET_CHECK(in.last() == config_.dim, type_name, ": input width ", in.last(), " does not match dim ",
                 config_.dim, " (input shape ", in, ")");
    DR2NET_CHECK(in[0] > 0 && in[1] > 0, type_name, ": input shape ", in, " has an empty batch or token dimension");
    Layout L;
    L.batch = in[0];
    L.tokens = in[1];
    L.rows = in.rows();  // B N <= numel, which Shape checked
    // Every size in checked arithmetic: batch x heads x tokens^2 overflows int64 long before
    // the streams do, and a wrapped size would under-allocate the scratch.
    const std::int64_t Bt = L.batch, M = L.rows, D = config_.dim, H = config_.num_heads, N = L.tokens;
    SavedLayoutBuilder<T, Ctx> b(is_host_context_v<Ctx> ? "VitAttention saved internals"
                                                        : "CudaVitAttention saved internals");
    L.mean = b.take_acc(M, "mean (rows)");
    L.rstd = b.take_acc(M, "rstd (rows)");
    L.xn = b.take({M, D}, "xn (rows x dim)");
    L.qkv = b.take({M, 3, D}, "qkv (rows x 3 x dim)");
    L.probs = b.take({Bt, H, N, N}, "attention probabilities (batch x heads x tokens x tokens)");
    L.ctx = b.take({M, D}, "ctx (rows x dim)");
    L.total = b.total();
    L.heads_elements = static_cast<std::size_t>(M * D);
    L.probs_elements = static_cast<std::size_t>(Bt * H * N * N);  // a region above: checked
    (void)checked::bytes(b.regions.total(), sizeof(T), "VitAttention saved internals (bytes)");
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

  //! hd^-0.5, rounded from double to the accumulation type.
  A attention_scale() const { return static_cast<A>(1.0 / std::sqrt(static_cast<double>(head_dim()))); }

  DropScale<A> output_drop(const ModuleCall<Ctx>& call, const Layout& L) const {
    return make_drop_scale<A>(call, config_.drop_path, config_.proj_drop, RandomPurpose::OutputDropout,
                              static_cast<std::uint64_t>(L.tokens * config_.dim));
  }

  VitAttentionConfig config_;
  LayerNorm<T, Ctx> norm1_;
  Linear<T, Ctx> qkv_, proj_;
  bool tf32_ = false;
};

}  // namespace dr2net
