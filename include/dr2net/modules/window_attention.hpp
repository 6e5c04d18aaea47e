#pragma once
//! \file
//! WindowAttention<T, Ctx>: the attention residual function of a timm Swin block (pre-norm),
//! on a token grid (T, H, W) (T = 1 for images, Video Swin's frames otherwise),
//!
//!   F(h) = DropPath(Dropout(proj(window-attention(norm1(h)))))
//!   window-attention(x): roll x by -shift, partition into windows; per window and head
//!            P = softmax(q k^T * head_dim^-0.5 + B + M), out = P v; merge the windows and
//!            roll back by +shift
//!
//! with qkv = x Wqkv^T + bqkv laid out per token as (3, heads, head_dim), B the relative
//! position bias (table[relative_index(i, j), head]) and M the shifted-window mask (-100
//! between tokens of different regions), both derived from the geometry (modules/window.hpp),
//! never loaded. timm's tensor names (norm1.*, attn.qkv.*, attn.relative_position_bias_table,
//! attn.proj.*) with a parameter_prefix of "", so a stack names them blocks.{i}.norm1.weight
//! and so on. Drop-path and dropout apply only when the call is training, with masks replayed
//! from Philox (modules/drop.hpp), exactly as VitAttention's.
//!
//! Written once over the backend primitives (backend/host/primitives.hpp and its CUDA twin)
//! and instantiated for HostContext (the default) and CudaContext
//! (modules/cuda/window_attention.cuh names that CudaWindowAttention<T>). The shift and the
//! window partition are one gather (WindowTokens), so norm1 and proj run on token rows in grid
//! order and everything between them in window order; q, k and v move to the head-major layout
//! [3, B nW, H, N, hd] (HeadLayout with B nW "samples" of N window tokens), so each attention
//! GEMM is ONE strided-batched call over all B nW H windows and heads.
//!
//! Saved internals (what backward reads), for B samples of a T H W grid with M = B T H W token
//! rows, nW windows of N tokens and width C (SavedLayoutBuilder: packed on the host, 256-byte
//! aligned regions on a device):
//!   mean [M], rstd [M] (accumulate_t<T>, grid order), xw [M, C] (norm1 output, window order),
//!   qkv [3, B nW, H, N, hd] (head-major), probs [B nW, H, N, N], ctx [M, C] (the attention
//!   output in grid order: proj's input).
//! Temporaries (from the context, metered as Scratch, freed before return): forward the qkv rows
//! [M, 3C] (reused for the head-major output and its window rows); backward dctx (grid and
//! window order, then head-major), dq/dk/dv (head-major and rows), dP [B nW, H, N, N], the
//! logits' gradient summed over windows [H, N, N], dxn (window and grid order).
//!
//! The bias table's gradient: the logits' gradient is summed over the B nW windows
//! (column_sums_add: fixed order on the host, no atomics on the device) and each table entry
//! then adds its (query, key) pairs in a fixed order (RelativeBiasGradient), so it is
//! deterministic and independent of the host's thread count. On a bf16/fp16 device function
//! the window sum is stored in T before the pairs are added (accumulated in fp32 each).

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dr2net/backend/host/primitives.hpp"
#include "dr2net/block/combine.hpp"
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
#include "dr2net/modules/parameter.hpp"
#include "dr2net/modules/saved_layout.hpp"
#include "dr2net/modules/window.hpp"

namespace dr2net {

//! Sizes, window layout and rates of a Swin window-attention function. Axes are (t, h, w);
//! a 2-D map has grid t = 1 and window t = 1. swin_block_geometry gives timm's window and
//! shift for block j of a stage; window_attention_config builds a config from it.
struct WindowAttentionConfig {
  std::int64_t dim = 0;                          //!< C, the stream width
  std::int64_t num_heads = 0;                    //!< heads; must divide C
  std::array<std::int64_t, 3> grid{1, 1, 1};     //!< token grid (T, H, W) of every sample
  std::array<std::int64_t, 3> window{1, 1, 1};   //!< window (wt, wh, ww): <= grid and divides it
  std::array<std::int64_t, 3> shift{0, 0, 0};    //!< cyclic shift per axis, in [0, window)
  double eps = 1e-5;                             //!< norm1's epsilon (timm's Swin: 1e-5)
  double drop_path = 0.0;                        //!< stochastic-depth rate of this function, in [0, 1)
  double proj_drop = 0.0;                        //!< dropout rate on the output (timm's proj_drop), in [0, 1)
};

//! The geometry of a configuration (not validated: WindowAttention's constructor does that).
inline WindowGeometry window_geometry(const WindowAttentionConfig& c) {
  WindowGeometry g;
  for (int a = 0; a < 3; ++a) {
    const auto i = static_cast<std::size_t>(a);
    g.grid[a] = c.grid[i];
    g.window[a] = c.window[i];
    g.shift[a] = c.shift[i];
  }
  return g;
}

//! A configuration of width `dim` and `num_heads` heads on geometry `g` (e.g. from
//! swin_block_geometry), with the given eps and rates.
inline WindowAttentionConfig window_attention_config(std::int64_t dim, std::int64_t num_heads, const WindowGeometry& g,
                                                     double eps = 1e-5, double drop_path = 0.0,
                                                     double proj_drop = 0.0) {
  return WindowAttentionConfig{dim,
                               num_heads,
                               {g.grid[0], g.grid[1], g.grid[2]},
                               {g.window[0], g.window[1], g.window[2]},
                               {g.shift[0], g.shift[1], g.shift[2]},
                               eps,
                               drop_path,
                               proj_drop};
}

//! The attention residual function of a pre-norm timm Swin block (see the file comment for
//! the math and the saved layout), a ResidualFunction with the optional adds-into members.
//! Inputs are contiguous token grids in the backend's memory, row-major over (B, T, H, W, C)
//! (NHWC / NTHWC), in either view of the same elements: [B, T H W, C] (token rows: what a
//! ReversibleStack with VitMlp as G hands over, since VitMlp takes rank 3) or, when T = 1,
//! [B, H, W, C]. A rank-5 [B, T, H, W, C] view does not exist (Shape's rank is at most 4):
//! 3-D grids come as token rows. The grid must be config().grid and C config().dim.
//! Parameters load by timm name ("norm1.weight", "attn.relative_position_bias_table", ...),
//! enumerated in timm's state_dict order (norm1, the table, qkv, proj). Every member that takes a view
//! checks its shape (on the host, before anything is enqueued) and throws dr2net::Error naming
//! the member, the view and the sizes. On a device backend the work is only enqueued on
//! call.context's stream. Not thread-safe.
//! \tparam T compute type (float or double; also bf16/fp16 on the device)
//! \tparam Ctx backend context: HostContext (default) or CudaContext
template <class T, class Ctx = HostContext>
class WindowAttention : public NamedParameterSet<WindowAttention<T, Ctx>>,
                        public OutputAddsInto<WindowAttention<T, Ctx>> {
 public:
  //! Names this function in error messages.
  static constexpr std::string_view type_name = is_host_context_v<Ctx> ? "WindowAttention" : "CudaWindowAttention";
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
  //! (trunc_normal std 0.02 for the Linear weights and the bias table, biases 0, LayerNorm
  //! 1/0), deterministically from `seed`.
  explicit WindowAttention(const WindowAttentionConfig& config, std::uint64_t seed = 0)
    requires is_host_context_v<Ctx>
      : WindowAttention(nullptr, validated(config), FunctionOptions{}) {
    init(seed);
  }
  //! The same on `ctx`: on a device the weights are drawn exactly as
  //! WindowAttention<float>(config, seed) draws them (on the host), then copied and converted to T.
  WindowAttention(Ctx& ctx, const WindowAttentionConfig& config, std::uint64_t seed = 0, FunctionOptions options = {})
      : WindowAttention(&ctx, validated(config), options) {
    if constexpr (is_host_context_v<Ctx>) init(seed);
    else copy_from(WindowAttention<float, HostContext>(config, seed));
  }
  //! A copy of a host function on `ctx`: its configuration and parameters, converted to T.
  //! Throws dr2net::Error naming the tensor when memory runs out.
  template <class U>
  WindowAttention(Ctx& ctx, const WindowAttention<U, HostContext>& host, FunctionOptions options = {})
      : WindowAttention(&ctx, host.config(), options) {
    copy_from(host);
  }

  //! The validated configuration this function was built with.
  const WindowAttentionConfig& config() const noexcept { return config_; }
  //! Its window layout (grid, window, shift), as the kernels see it.
  const WindowGeometry& geometry() const noexcept { return geometry_; }
  //! Width of one head, C / heads; the attention logits are scaled by head_dim()^-0.5.
  std::int64_t head_dim() const noexcept { return config_.dim / config_.num_heads; }
  //! The pre-norm LayerNorm "norm1" over width C.
  LayerNorm<T, Ctx>& norm1() noexcept { return norm1_; }
  //! The input projection "attn.qkv", C -> 3C; each output row is laid out (3, heads, head_dim).
  Linear<T, Ctx>& qkv() noexcept { return qkv_; }
  //! The output projection "attn.proj", C -> C, applied to the concatenated heads.
  Linear<T, Ctx>& proj() noexcept { return proj_; }
  //! The relative position bias table "attn.relative_position_bias_table", shape
  //! [(2wt - 1)(2wh - 1)(2ww - 1), heads] (2-D: [(2wh - 1)(2ww - 1), heads]).
  parameter_t<T, Ctx>& relative_position_bias_table() noexcept { return table_; }
  //! Read-only norm1(): the LayerNorm "norm1".
  const LayerNorm<T, Ctx>& norm1() const noexcept { return norm1_; }
  //! Read-only qkv(): the Linear "attn.qkv", C -> 3C.
  const Linear<T, Ctx>& qkv() const noexcept { return qkv_; }
  //! Read-only proj(): the Linear "attn.proj", C -> C.
  const Linear<T, Ctx>& proj() const noexcept { return proj_; }
  //! Read-only relative_position_bias_table().
  const parameter_t<T, Ctx>& relative_position_bias_table() const noexcept { return table_; }

  //! Sets every tensor from a host function of the same configuration (converted to T).
  //! Throws dr2net::Error when the host function's grid, window or shift differ.
  template <class U>
  void copy_from(const WindowAttention<U, HostContext>& host) {
    const WindowAttentionConfig& h = host.config();
    DR2NET_CHECK(h.grid == config_.grid && h.window == config_.window && h.shift == config_.shift, type_name,
                 " copy_from: the host function's geometry (grid ", dims(h.grid), ", window ", dims(h.window),
                 ", shift ", dims(h.shift), ") differs from this one's (grid ", dims(config_.grid), ", window ",
                 dims(config_.window), ", shift ", dims(config_.shift), ")");
    norm1_.copy_from(host.norm1(), type_name);
    qkv_.copy_from(host.qkv(), type_name);
    table_.load(host.relative_position_bias_table().data(), host.relative_position_bias_table().shape(), type_name);
    proj_.copy_from(host.proj(), type_name);
  }

  //! Elements of saved internals for an input of shape `in` (see the file comment).
  //! Throws dr2net::Error when `in` is not an accepted view of B config().grid grids of
  //! width config().dim, a dimension is empty, or the size overflows (the error names the
  //! region: the B nW H N^2 probabilities, say).
  std::size_t saved_elements(const Shape& in) const { return layout(in, "saved_elements").total; }

  //! out = F(in); `scratch` (at least saved_elements(in) elements) holds the internals
  //! afterwards, as recompute leaves them. Dropout and drop-path apply only when
  //! call.training, with masks drawn from (call.seed, call.step, call.module).
  void forward(const ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> scratch) {
    compute(call, in, out, scratch, nullptr, 0.0, "forward");  // the saved internals are the forward's own temporaries
  }

  //! out = F(in), bit-identical to forward() for the same call, and `saved` (at least
  //! saved_elements(in) elements) holds the internals backward() reads.
  void recompute(const ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> saved) {
    compute(call, in, out, saved, nullptr, 0.0, "recompute");
  }

  //! grad_in += J_F(in)^T grad_out and every parameter gradient += its share (nothing is
  //! overwritten). `saved` must be what recompute() left for this `in` and call (the same
  //! masks are replayed). Temporaries come from call.context, metered as Scratch, and are
  //! freed before it returns.
  void backward(const ModuleCall<Ctx>& call, View<const T> in, View<const T> saved, View<const T> grad_out,
                View<T> grad_in) {
    const Layout L = layout(in.shape(), "backward");
    check_views(in, grad_in, saved.size(), L, "backward");
    check_shape(grad_out, in.shape(), std::string(type_name) + " backward: grad_out");
    check_contiguous(grad_out, std::string(type_name) + " backward: grad_out");
    Ctx& cx = call.context;
    const std::int64_t H = config_.num_heads, N = L.tokens, hd = head_dim();
    const std::int64_t BWH = L.window_batch * H;
    const T* s = saved.data();
    const A* mean = reinterpret_cast<const A*>(s + L.mean);
    const A* rstd = reinterpret_cast<const A*>(s + L.rstd);
    const T *xw = s + L.xw, *q = s + L.qkv, *probs = s + L.probs, *ctx = s + L.ctx;
    const T *k = q + L.heads_elements, *v = k + L.heads_elements;
    const std::size_t n = L.heads_elements;

    // dL/d(proj output) = grad_out * mask: the same factor the forward multiplied by.
    const T* g = grad_out.data();
    decltype(cx.template allocate<T>(std::size_t{}, MemoryCategory::Scratch)) masked;
    const DropScale<A> drop = output_drop(call, L);
    if (drop.active()) {
      masked = cx.template allocate<T>(n, MemoryCategory::Scratch, "window attention backward: masked gradient");
      for_each_index(cx, n, DropApply<T>{masked.data(), g, drop});
      g = masked.data();
    }
    auto dctx = cx.template allocate<T>(n, MemoryCategory::Scratch, "window attention backward: dctx");
    proj_.backward(cx, ctx, g, L.rows, dctx.data());  // grid order
    masked.reset();
    auto dctx_windows = cx.template allocate<T>(n, MemoryCategory::Scratch, "window attention backward: dctx (windows)");
    for_each_index(cx, n, tokens(dctx_windows.data(), dctx.data(), L, true));
    dctx.reset();
    auto dctx_heads = cx.template allocate<T>(n, MemoryCategory::Scratch, "window attention backward: dctx (heads)");
    for_each_index(cx, n, head_layout(dctx_heads.data(), dctx_windows.data(), L, 1, true));
    dctx_windows.reset();

    const A scale = attention_scale();
    // Both no larger than regions of the checked layout (qkv, probs).
    auto dqkv_heads = cx.template allocate<T>(3 * n, MemoryCategory::Scratch, "window attention backward: dq, dk, dv (heads)");
    T *dq = dqkv_heads.data(), *dk = dq + n, *dv = dk + n;
    auto dp = cx.template allocate<T>(L.probs_elements, MemoryCategory::Scratch, "window attention backward: dP");
    const T* dc = dctx_heads.data();
    const std::int64_t sh = N * hd, sp = N * N;
    gemm_strided_batched<T>(cx, Transpose::No, Transpose::Yes, N, N, hd, A(1), dc, hd, sh, v, hd, sh, A(0), dp.data(),
                            N, sp, BWH, tf32_);  // dP = dc v^T
    gemm_strided_batched<T>(cx, Transpose::Yes, Transpose::No, N, hd, N, A(1), probs, N, sp, dc, hd, sh, A(0), dv, hd,
                            sh, BWH, tf32_);  // dv = P^T dc
    softmax_rows_backward_inplace<T>(cx, probs, dp.data(), BWH * N, N, N, A(1));  // dS = P (dP - rowsum(dP P))
    {
      // The bias table's gradient: dS summed over the B nW windows, then over each entry's pairs.
      const std::int64_t per_window = H * N * N;
      auto dsum = cx.template allocate<T>(static_cast<std::size_t>(per_window), MemoryCategory::Scratch,
                                          "window attention backward: dS summed over windows");
      for_each_index(cx, static_cast<std::size_t>(per_window), Fill<T>{dsum.data(), T(0)});
      column_sums_add<T>(cx, L.window_batch, per_window, dp.data(), dsum.data());
      for_each_index(cx, table_.size(), RelativeBiasGradient<T>{table_.grad_data(), dsum.data(), geometry_, H});
    }
    gemm_strided_batched<T>(cx, Transpose::No, Transpose::No, N, hd, N, scale, dp.data(), N, sp, k, hd, sh, A(0), dq, hd,
                            sh, BWH, tf32_);  // dq = s dS k
    gemm_strided_batched<T>(cx, Transpose::Yes, Transpose::No, N, hd, N, scale, dp.data(), N, sp, q, hd, sh, A(0), dk,
                            hd, sh, BWH, tf32_);  // dk = s dS^T q
    dp.reset();
    dctx_heads.reset();
    auto dqkv = cx.template allocate<T>(3 * n, MemoryCategory::Scratch, "window attention backward: dqkv");
    for_each_index(cx, 3 * n, head_layout(dqkv.data(), dqkv_heads.data(), L, 3, false));
    dqkv_heads.reset();
    auto dxn_windows = cx.template allocate<T>(n, MemoryCategory::Scratch, "window attention backward: dxn (windows)");
    qkv_.backward(cx, xw, dqkv.data(), L.rows, dxn_windows.data());
    dqkv.reset();
    auto dxn = cx.template allocate<T>(n, MemoryCategory::Scratch, "window attention backward: dxn");
    for_each_index(cx, n, tokens(dxn.data(), dxn_windows.data(), L, false));
    dxn_windows.reset();
    norm1_.backward(cx, in.data(), mean, rstd, dxn.data(), L.rows, grad_in.data());  // accumulates into grad_in
  }

  //! fn(parameter&) in timm's state_dict order: norm1 (weight, bias), the bias table, qkv,
  //! proj (weight, then bias).
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    norm1_.for_each_parameter_object(fn);
    fn(table_);
    qkv_.for_each_parameter_object(fn);
    proj_.for_each_parameter_object(fn);
  }

 private:
  friend class OutputAddsInto<WindowAttention<T, Ctx>>;
  double output_drop_path() const { return config_.drop_path; }
  double output_dropout() const { return config_.proj_drop; }

  WindowAttention(Ctx* ctx, const WindowAttentionConfig& config, FunctionOptions options)
      : config_(validated(config)), geometry_(window_geometry(config_)),
        norm1_(make_layer_norm<T>(ctx, "norm1", config.dim, config.eps)),
        qkv_(make_linear<T>(ctx, "attn.qkv", config.dim,
                            checked::mul(3, config.dim, "WindowAttention: qkv width 3 x dim"), options)),
        proj_(make_linear<T>(ctx, "attn.proj", config.dim, config.dim, options)),
        table_(parameter_of<T, Ctx>::make(ctx, "attn.relative_position_bias_table",
                                          Shape{geometry_.table_rows(), config.num_heads})),
        tf32_(options.allow_tf32) {}

  void init(std::uint64_t seed)
    requires is_host_context_v<Ctx>
  {
    qkv_.init(seed, 0);
    proj_.init(seed, 1);
    table_.fill_truncated_normal(0.02, 2.0, seed, 2);  // timm: trunc_normal_(std=.02)
  }

  //! "(a, b, c)" for messages.
  static std::string dims(const std::array<std::int64_t, 3>& d) {
    return "(" + std::to_string(d[0]) + ", " + std::to_string(d[1]) + ", " + std::to_string(d[2]) + ")";
  }

  //! F(in) into out (+ addend_scale * addend when addend is not null), internals into saved;
  //! `where` names the public member in errors (OutputAddsInto calls it for recompute_add).
  void compute(const ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> saved, const T* addend,
               double addend_scale, const char* where = "recompute_add") {
    const Layout L = layout(in.shape(), where);
    check_views(in, out, saved.size(), L, where);
    Ctx& cx = call.context;
    const std::int64_t BWH = L.window_batch * config_.num_heads, N = L.tokens, hd = head_dim();
    const std::size_t n = L.heads_elements;
    T* s = saved.data();
    A* mean = reinterpret_cast<A*>(s + L.mean);
    A* rstd = reinterpret_cast<A*>(s + L.rstd);
    T *xw = s + L.xw, *q = s + L.qkv, *probs = s + L.probs, *ctx = s + L.ctx;
    const T *k = q + n, *v = k + n;

    // norm1 on grid rows (into the ctx region, free until the end), then shift + partition.
    norm1_.forward(cx, in.data(), L.rows, ctx, mean, rstd);
    for_each_index(cx, n, tokens(xw, ctx, L, true));
    auto rows = cx.template allocate<T>(3 * n, MemoryCategory::Scratch, "window attention: qkv rows");
    qkv_.forward(cx, xw, L.rows, rows.data());
    for_each_index(cx, 3 * n, head_layout(q, rows.data(), L, 3, true));
    const A scale = attention_scale();
    const std::int64_t sh = N * hd, sp = N * N;
    gemm_strided_batched<T>(cx, Transpose::No, Transpose::Yes, N, N, hd, scale, q, hd, sh, k, hd, sh, A(0), probs, N,
                            sp, BWH, tf32_);  // S = q k^T s
    for_each_index(cx, L.probs_elements,
                   WindowLogitBias<T>{probs, table_.data(), geometry_, config_.num_heads});  // S + bias + mask
    softmax_rows_inplace<T>(cx, probs, BWH * N, N, N);  // P = softmax(S)
    T *heads = rows.data(), *window_rows = rows.data() + n;  // the qkv rows are spent
    gemm_strided_batched<T>(cx, Transpose::No, Transpose::No, N, hd, N, A(1), probs, N, sp, v, hd, sh, A(0), heads, hd,
                            sh, BWH, tf32_);  // P v, head-major
    for_each_index(cx, n, head_layout(window_rows, heads, L, 1, false));  // concatenate heads
    for_each_index(cx, n, tokens(ctx, window_rows, L, false));           // merge windows, roll back
    rows.reset();
    proj_.forward_add(cx, ctx, L.rows, addend, static_cast<A>(addend_scale), out.data());
    const DropScale<A> drop = output_drop(call, L);
    if (drop.active()) for_each_index(cx, out.size(), DropApply<T>{out.data(), out.data(), drop});
  }

  //! Offsets of the saved internals in the scratch, and their total.
  struct Layout {
    std::int64_t batch = 0, rows = 0;         //!< B, M = B T H W
    std::int64_t window_batch = 0, tokens = 0;  //!< B nW windows of N tokens
    std::size_t heads_elements = 0;           //!< M C: one of q, k, v, or the attention output
    std::size_t probs_elements = 0;           //!< B nW H N^2
    std::size_t mean = 0, rstd = 0, xw = 0, qkv = 0, probs = 0, ctx = 0, total = 0;
  };

  HeadLayout<T> head_layout(T* dst, const T* src, const Layout& L, std::int64_t groups, bool to_heads) const {
    return HeadLayout<T>{dst, src, L.window_batch, L.tokens, groups, config_.num_heads, head_dim(), to_heads};
  }
  WindowTokens<T> tokens(T* dst, const T* src, const Layout& L, bool to_windows) const {
    return WindowTokens<T>{dst, src, geometry_, L.batch, config_.dim, to_windows};
  }

  static WindowAttentionConfig validated(const WindowAttentionConfig& c) {
    DR2NET_CHECK(c.dim > 0, "WindowAttention: dim must be positive, got ", c.dim);
    DR2NET_CHECK(c.num_heads > 0, "WindowAttention: num_heads must be positive, got ", c.num_heads);
    DR2NET_CHECK(c.dim % c.num_heads == 0, "WindowAttention: num_heads = ", c.num_heads, " does not divide dim = ",
                 c.dim);
    DR2NET_CHECK(std::isfinite(c.eps) && c.eps > 0, "WindowAttention: eps must be positive and finite, got ", c.eps);
    check_window_geometry(window_geometry(c), "WindowAttention");
    check_drop_rate(c.drop_path, "drop_path", "WindowAttention");
    check_drop_rate(c.proj_drop, "proj_drop", "WindowAttention");
    return c;
  }

  //! The layout for input shape `in`, after checking it is a view of B grids of width C;
  //! `where` names the member in errors.
  Layout layout(const Shape& in, const char* where) const {
    const auto& grid = config_.grid;
    const std::int64_t Ng = grid[0] * grid[1] * grid[2], C = config_.dim;  // validated: no overflow below B
    const std::string me = std::string(type_name) + " " + where + ": input of shape " + in.str();
    const std::string want = "[B, " + std::to_string(Ng) + ", " + std::to_string(C) + "]" +
                             (grid[0] == 1 ? " or [B, " + std::to_string(grid[1]) + ", " + std::to_string(grid[2]) +
                                                 ", " + std::to_string(C) + "]"
                                           : std::string());
    DR2NET_CHECK(in.rank() == 3 || in.rank() == 4, me, " is not a token grid: expected ", want, " for grid ",
                 dims(grid), " and dim ", C);
    DR2NET_CHECK(in.last() == C, me, " has width ", in.last(), " but dim is ", C);
    DR2NET_CHECK(in[0] > 0, me, " has an empty batch");
    const bool grid_ok = in.rank() == 3 ? in[1] == Ng : grid[0] == 1 && in[1] == grid[1] && in[2] == grid[2];
    DR2NET_CHECK(grid_ok, me, " does not hold the configured grid ", dims(grid), ": expected ", want);
    Layout L;
    L.batch = in[0];
    L.rows = in.rows();  // B Ng <= numel, which Shape checked
    L.tokens = geometry_.window_tokens();
    // Every size in checked arithmetic: B nW heads N^2 overflows int64 long before the
    // streams do, and a wrapped size would under-allocate the scratch.
    L.window_batch = checked::mul(L.batch, geometry_.num_windows(), "WindowAttention: windows (batch x windows)");
    const std::int64_t M = L.rows, H = config_.num_heads, N = L.tokens, BW = L.window_batch;
    SavedLayoutBuilder<T, Ctx> b(is_host_context_v<Ctx> ? "WindowAttention saved internals"
                                                        : "CudaWindowAttention saved internals");
    L.mean = b.take_acc(M, "mean (rows)");
    L.rstd = b.take_acc(M, "rstd (rows)");
    L.xw = b.take({M, C}, "xw (rows x dim, window order)");
    L.qkv = b.take({M, 3, C}, "qkv (rows x 3 x dim)");
    L.probs = b.take({BW, H, N, N}, "attention probabilities (windows x heads x tokens x tokens)");
    L.ctx = b.take({M, C}, "ctx (rows x dim)");
    L.total = b.total();
    L.heads_elements = static_cast<std::size_t>(M * C);
    L.probs_elements = static_cast<std::size_t>(BW * H * N * N);  // a region above: checked
    (void)checked::bytes(b.regions.total(), sizeof(T), "WindowAttention saved internals (bytes)");
    return L;
  }

  //! Contiguous input and output (or input gradient) of one shape, and enough saved space.
  static void check_views(View<const T> in, View<T> out, std::size_t saved, const Layout& L, const char* where) {
    const bool bwd = std::string_view(where) == "backward";
    const std::string me = std::string(type_name) + " " + where + ": ";
    const std::string what = me + (bwd ? "grad_in" : "output");
    check_contiguous(in, me + "input");
    check_contiguous(out, what);
    check_shape(out, in.shape(), what);
    DR2NET_CHECK(saved >= L.total, type_name, " ", where, ": saved/scratch holds ", saved, " elements, needs ",
                 L.total, " for input shape ", in.shape());
  }

  //! hd^-0.5, rounded from double to the accumulation type.
  A attention_scale() const { return static_cast<A>(1.0 / std::sqrt(static_cast<double>(head_dim()))); }

  DropScale<A> output_drop(const ModuleCall<Ctx>& call, const Layout& L) const {
    return make_drop_scale<A>(call, config_.drop_path, config_.proj_drop, RandomPurpose::OutputDropout,
                              static_cast<std::uint64_t>((L.rows / L.batch) * config_.dim));
  }

  WindowAttentionConfig config_;
  WindowGeometry geometry_;
  LayerNorm<T, Ctx> norm1_;
  Linear<T, Ctx> qkv_, proj_;
  parameter_t<T, Ctx> table_;
  bool tf32_ = false;
};

}  // namespace dr2net
