#pragma once
//! \file
//! CudaVitAttention<T>: the device twin of modules/vit_attention.hpp's VitAttention<T>, with
//! the same configuration, tensor names (norm1.*, attn.qkv.*, attn.proj.*; parameter_prefix
//! ""), drop masks (same Philox streams, bit-identical keep decisions) and contract:
//!
//!   F(h) = DropPath(Dropout(proj(attn(norm1(h)))))
//!   attn: per (batch, head) P = softmax(q k^T hd^-0.5), out = P v
//!
//! q, k, v of head h are hd-wide column blocks of the qkv rows [B, N, 3D] (q at h hd, k at
//! D + h hd, v at 2D + h hd, leading dimension 3D); for each batch element one
//! cublasGemmStridedBatchedEx covers the H heads (stride hd between heads).
//!
//! Parameters live in device memory; for_each_parameter hands out device views (see
//! modules/cuda/parameter.cuh, also for why they are metered as Other).
//!
//! Saved internals (cuda_detail::SavedLayoutBuilder): mean [M], rstd [M] (accumulation type),
//! xn [M, D], qkv [M, 3D], probs [B, H, N, N], ctx [M, D].

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/elementwise.cuh"
#include "dr2net/block/residual_function.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/modules/adds_into.hpp"
#include "dr2net/modules/cuda/activation.cuh"
#include "dr2net/modules/cuda/gemm.cuh"
#include "dr2net/modules/cuda/layer_norm.cuh"
#include "dr2net/modules/cuda/linear.cuh"
#include "dr2net/modules/cuda/saved_layout.cuh"
#include "dr2net/modules/cuda/softmax.cuh"
#include "dr2net/modules/drop.hpp"
#include "dr2net/modules/parameter.hpp"
#include "dr2net/modules/vit_attention.hpp"

namespace dr2net {

//! Options of the device ViT functions that the host twins do not have.
struct CudaFunctionOptions {
  bool allow_tf32 = false;  //!< float GEMMs may use TF32 tensor cores (a policy's allow_tf32)
};

//! The device attention residual function of a pre-norm timm ViT block: a ResidualFunction
//! on CudaContext (with the optional adds-into members) that matches VitAttention<T> within
//! rounding. Views handed to it (input, output, saved, gradients) are contiguous device
//! memory, [B, N, D] for the streams. Shapes are checked on the host before anything is
//! enqueued (dr2net::Error naming the member, the view and the sizes); the work itself is only
//! enqueued on call.context's stream, with no host synchronisation, and temporaries come from
//! the context's stream-ordered pool (metered as Scratch). Not thread-safe.
//! \tparam T compute type: double, float, __nv_bfloat16 or __half.
template <class T>
class CudaVitAttention : public NamedParameterSet<CudaVitAttention<T>>, public OutputAddsInto<CudaVitAttention<T>> {
 public:
  //! Names this function in error messages.
  static constexpr std::string_view type_name = "CudaVitAttention";
  using value_type = T;               //!< Compute type of parameters, activations and saved tensors.
  using context_type = CudaContext;   //!< Runs on the CUDA backend: members take ModuleCall<CudaContext>.
  //! Accumulation type (float for float/bf16/fp16, double for double): GEMM scalars and the
  //! saved LayerNorm statistics.
  using A = cuda_detail::acc_t<T>;
  //! Empty: timm's names are kept verbatim inside a block ("blocks.{i}.norm1.weight").
  static constexpr std::string_view parameter_prefix = "";

  //! Weights initialised exactly as VitAttention<float>(config, seed) initialises them
  //! (built on the host, then copied and converted to T). Throws dr2net::Error for a
  //! configuration VitAttention refuses.
  CudaVitAttention(CudaContext& ctx, const VitAttentionConfig& config, std::uint64_t seed = 0,
                   CudaFunctionOptions options = {})
      : CudaVitAttention(ctx, VitAttention<float>(config, seed), options) {}

  //! A copy of a host function: its configuration and parameters, converted to T. Waits for
  //! the copies. Throws dr2net::Error naming the tensor when device memory runs out.
  template <class U>
  CudaVitAttention(CudaContext& ctx, const VitAttention<U>& host, CudaFunctionOptions options = {})
      : config_(host.config()), norm1_(ctx, "norm1", config_.dim, config_.eps),
        qkv_(ctx, "attn.qkv", config_.dim, checked::mul(3, config_.dim, "CudaVitAttention: qkv width 3 x dim"),
             options.allow_tf32),
        proj_(ctx, "attn.proj", config_.dim, config_.dim, options.allow_tf32), tf32_(options.allow_tf32) {
    norm1_.copy_from(host.norm1(), "CudaVitAttention");
    qkv_.copy_from(host.qkv(), "CudaVitAttention");
    proj_.copy_from(host.proj(), "CudaVitAttention");
  }

  //! The configuration, taken from the host function (validated there).
  const VitAttentionConfig& config() const noexcept { return config_; }
  //! Width of one head, D / H; the attention logits are scaled by head_dim()^-0.5.
  std::int64_t head_dim() const noexcept { return config_.dim / config_.num_heads; }
  //! The pre-norm LayerNorm "norm1" over width D, in device memory.
  CudaLayerNorm<T>& norm1() noexcept { return norm1_; }
  //! The input projection "attn.qkv", D -> 3D; each output row is laid out (3, heads, head_dim).
  CudaLinear<T>& qkv() noexcept { return qkv_; }
  //! The output projection "attn.proj", D -> D, applied to the concatenated heads.
  CudaLinear<T>& proj() noexcept { return proj_; }

  //! Elements of T of saved internals for an input [B, N, D], with the statistics in the
  //! accumulation type and every region 256-byte aligned (see the file comment). Throws
  //! dr2net::Error when `in` is not rank 3, its width is not D, a dimension is empty, or the
  //! size overflows (the error names the region).
  std::size_t saved_elements(const Shape& in) const { return layout(in).total; }

  //! out[B, N, D] = F(in); `scratch` (at least saved_elements(in) elements) holds the
  //! internals afterwards, as recompute leaves them. Dropout and drop-path apply only when
  //! call.training, with the host twin's masks.
  void forward(const ModuleCall<CudaContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> scratch) {
    recompute(call, in, out, scratch);  // the saved internals are the forward's own temporaries
  }

  //! out = F(in), bit-identical to forward() for the same call, and `saved` (at least
  //! saved_elements(in) elements) holds the internals backward() reads.
  void recompute(const ModuleCall<CudaContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> saved) {
    compute(call, in, out, saved, nullptr, 0.0);
  }

  //! grad_in += J_F(in)^T grad_out and every parameter gradient += its share (nothing is
  //! overwritten). `saved` must be what recompute() left for this `in` and call. Temporaries
  //! (dqkv [M, 3D], dP [H, N, N]) are freed stream-ordered before it returns.
  void backward(const ModuleCall<CudaContext>& call, ConstView<T> in, ConstView<T> saved, ConstView<T> grad_out,
                TensorView<T> grad_in) {
    const Layout L = layout(in.shape());
    check_views(in, grad_in, saved.size(), L, "backward");
    check_shape(grad_out, in.shape(), "CudaVitAttention backward: grad_out");
    CudaContext& cx = call.context;
    const std::int64_t B = L.batch, N = L.tokens, D = config_.dim, H = config_.num_heads, hd = head_dim();
    const T* s = saved.data();
    const A* mean = reinterpret_cast<const A*>(s + L.mean);
    const A* rstd = reinterpret_cast<const A*>(s + L.rstd);
    const T *xn = s + L.xn, *qkv = s + L.qkv, *probs = s + L.probs, *ctx = s + L.ctx;
    const auto n = in.size();

    // dL/d(proj output) = grad_out * mask: the same factor the forward multiplied by.
    const T* g = grad_out.data();
    DeviceBuffer<T> masked;
    const DropScale<A> drop = output_drop(call, L);
    if (drop.active()) {
      masked = cx.allocate<T>(n, MemoryCategory::Scratch);
      for_each_index(cx, n, cuda_detail::DropApply<T>{masked.data(), g, drop});
      g = masked.data();
    }
    DeviceBuffer<T> dctx = cx.allocate<T>(n, MemoryCategory::Scratch);
    proj_.backward(cx, ctx, g, L.rows, dctx.data());
    masked.reset();

    const A scale = attention_scale();
    DeviceBuffer<T> dqkv = cx.allocate<T>(static_cast<std::size_t>(L.rows * 3 * D), MemoryCategory::Scratch);
    DeviceBuffer<T> dp = cx.allocate<T>(static_cast<std::size_t>(H * N * N), MemoryCategory::Scratch);
    for (std::int64_t b = 0; b < B; ++b) {
      const T* q = qkv + b * N * 3 * D;
      const T *k = q + D, *v = q + 2 * D;
      const T* p = probs + b * H * N * N;
      const T* dc = dctx.data() + b * N * D;
      T* dq = dqkv.data() + b * N * 3 * D;
      T *dk = dq + D, *dv = dq + 2 * D;
      device_gemm_strided_batched<T>(cx, Transpose::No, Transpose::Yes, N, N, hd, A(1), dc, D, hd, v, 3 * D, hd, A(0),
                                     dp.data(), N, N * N, H, tf32_);  // dP = dc v^T
      device_gemm_strided_batched<T>(cx, Transpose::Yes, Transpose::No, N, hd, N, A(1), p, N, N * N, dc, D, hd, A(0), dv,
                                     3 * D, hd, H, tf32_);  // dv = P^T dc
      softmax_rows_backward_inplace<T>(cx, p, dp.data(), H * N, N, N, scale);  // dS s = s P (dP - rowsum(dP P))
      device_gemm_strided_batched<T>(cx, Transpose::No, Transpose::No, N, hd, N, A(1), dp.data(), N, N * N, k, 3 * D,
                                     hd, A(0), dq, 3 * D, hd, H, tf32_);  // dq = dS k
      device_gemm_strided_batched<T>(cx, Transpose::Yes, Transpose::No, N, hd, N, A(1), dp.data(), N, N * N, q, 3 * D,
                                     hd, A(0), dk, 3 * D, hd, H, tf32_);  // dk = dS^T q
    }
    dp.reset();
    dctx.reset();
    DeviceBuffer<T> dxn = cx.allocate<T>(n, MemoryCategory::Scratch);
    qkv_.backward(cx, xn, dqkv.data(), L.rows, dxn.data());
    dqkv.reset();
    norm1_.backward(cx, in.data(), mean, rstd, dxn.data(), L.rows, grad_in.data());  // accumulates into grad_in
  }

  //! fn(DeviceParameter<T>&) in the host twin's order; for_each_parameter (NamedParameterSet)
  //! therefore hands out views of DEVICE memory.
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    norm1_.for_each_parameter_object(fn);
    qkv_.for_each_parameter_object(fn);
    proj_.for_each_parameter_object(fn);
  }

 private:
  friend class OutputAddsInto<CudaVitAttention<T>>;
  double output_drop_path() const { return config_.drop_path; }
  double output_dropout() const { return config_.proj_drop; }

  //! F(in) into out (+ addend_scale * addend when addend is not null), internals into saved.
  void compute(const ModuleCall<CudaContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> saved,
               const T* addend, double addend_scale) {
    const Layout L = layout(in.shape());
    check_views(in, out, saved.size(), L, "forward");
    CudaContext& cx = call.context;
    const std::int64_t B = L.batch, N = L.tokens, D = config_.dim, H = config_.num_heads, hd = head_dim();
    T* s = saved.data();
    A* mean = reinterpret_cast<A*>(s + L.mean);
    A* rstd = reinterpret_cast<A*>(s + L.rstd);
    T *xn = s + L.xn, *qkv = s + L.qkv, *probs = s + L.probs, *ctx = s + L.ctx;

    norm1_.forward(cx, in.data(), L.rows, xn, mean, rstd);
    qkv_.forward(cx, xn, L.rows, qkv);
    const A scale = attention_scale();
    for (std::int64_t b = 0; b < B; ++b) {
      const T* q = qkv + b * N * 3 * D;  // head h: + h hd
      device_gemm_strided_batched<T>(cx, Transpose::No, Transpose::Yes, N, N, hd, scale, q, 3 * D, hd, q + D, 3 * D,
                                     hd, A(0), probs + b * H * N * N, N, N * N, H, tf32_);  // S = q k^T s
    }
    softmax_rows_inplace<T>(cx, probs, B * H * N, N, N);  // P = softmax(S)
    for (std::int64_t b = 0; b < B; ++b) {
      const T* v = qkv + b * N * 3 * D + 2 * D;
      device_gemm_strided_batched<T>(cx, Transpose::No, Transpose::No, N, hd, N, A(1), probs + b * H * N * N, N, N * N,
                                     v, 3 * D, hd, A(0), ctx + b * N * D, D, hd, H, tf32_);  // ctx[b, :, h] = P v
    }
    proj_.forward_add(cx, ctx, L.rows, addend, static_cast<A>(addend_scale), out.data());
    const DropScale<A> drop = output_drop(call, L);
    if (drop.active()) for_each_index(cx, out.size(), cuda_detail::DropApply<T>{out.data(), out.data(), drop});
  }

  struct Layout {
    std::int64_t batch = 0, tokens = 0, rows = 0;
    std::size_t mean = 0, rstd = 0, xn = 0, qkv = 0, probs = 0, ctx = 0, total = 0;
  };

  Layout layout(const Shape& in) const {
    DR2NET_CHECK(in.rank() == 3, "CudaVitAttention: input must be [batch, tokens, width], got shape ", in);
    DR2NET_CHECK(in.last() == config_.dim, "CudaVitAttention: input width ", in.last(), " does not match dim ",
                 config_.dim, " (input shape ", in, ")");
    DR2NET_CHECK(in[0] > 0 && in[1] > 0, "CudaVitAttention: input shape ", in, " has an empty batch or token dimension");
    Layout L;
    L.batch = in[0];
    L.tokens = in[1];
    L.rows = in.rows();  // B N <= numel, which Shape checked
    // Every size in checked arithmetic: batch x heads x tokens^2 overflows int64 long before
    // the streams do, and a wrapped size would under-allocate the scratch.
    const std::int64_t Bt = L.batch, M = L.rows, D = config_.dim, H = config_.num_heads, N = L.tokens;
    cuda_detail::SavedLayoutBuilder<T> b("CudaVitAttention saved internals");
    L.mean = b.take_acc(M, "mean (rows)");
    L.rstd = b.take_acc(M, "rstd (rows)");
    L.xn = b.take({M, D}, "xn (rows x dim)");
    L.qkv = b.take({M, 3, D}, "qkv (rows x 3 x dim)");
    L.probs = b.take({Bt, H, N, N}, "attention probabilities (batch x heads x tokens x tokens)");
    L.ctx = b.take({M, D}, "ctx (rows x dim)");
    L.total = b.total();
    (void)checked::bytes(b.regions.total(), sizeof(T), "CudaVitAttention saved internals (bytes)");
    return L;
  }

  static void check_views(ConstView<T> in, TensorView<T> out, std::size_t saved, const Layout& L, const char* where) {
    const bool fwd = std::string_view(where) == "forward";
    const std::string what = std::string("CudaVitAttention ") + where + ": " + (fwd ? "output" : "grad_in");
    check_contiguous(in, std::string("CudaVitAttention ") + where + ": input");
    check_contiguous(out, what);
    check_shape(out, in.shape(), what);
    DR2NET_CHECK(saved >= L.total, "CudaVitAttention ", where, ": saved/scratch holds ", saved, " elements, needs ",
                 L.total);
  }

  //! hd^-0.5 rounded as the host rounds it for float (then widened).
  A attention_scale() const { return static_cast<A>(1.0 / std::sqrt(static_cast<double>(head_dim()))); }

  DropScale<A> output_drop(const ModuleCall<CudaContext>& call, const Layout& L) const {
    return make_drop_scale<A>(call, config_.drop_path, config_.proj_drop, RandomPurpose::OutputDropout,
                              static_cast<std::uint64_t>(L.tokens * config_.dim));
  }

  VitAttentionConfig config_;
  CudaLayerNorm<T> norm1_;
  CudaLinear<T> qkv_, proj_;
  bool tf32_ = false;
};

}  // namespace dr2net
