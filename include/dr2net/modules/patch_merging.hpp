#pragma once
//! \file
//! PatchMerging<T, Ctx>: the downsampling layer between the stages of a Swin transformer
//! (timm 0.9 `PatchMerging`), a non-reversible transition of block/stages.hpp,
//!
//!   rows[n, i, j] = concat(x[n, 2i, 2j], x[n, 2i+1, 2j], x[n, 2i, 2j+1], x[n, 2i+1, 2j+1])   (4C)
//!   out[n, i, j]  = W_reduction LayerNorm(rows[n, i, j])                                       (2C)
//!
//! for an NHWC map x [B, H, W, C] (H and W even) and out [B, H/2, W/2, C_out] with C_out = 2C
//! by default. The concatenation order is timm's: x.reshape(B, H/2, 2, W/2, 2, C)
//! .permute(0, 1, 3, 4, 2, 5) puts the 2x2 neighbour (dh, dw) in channel block dh + 2 dw. The
//! reduction is a Linear 4C -> C_out without bias. Tensor names are timm's (`norm.weight`,
//! `norm.bias` [4C], `reduction.weight` [C_out, 4C]), so under a stage prefix
//! "layers.{s}.downsample." they are the names of a timm Swin checkpoint (DESIGN §4).
//!
//! Video Swin (3-D) merges over height and width only, every frame alike. Shape holds at most
//! kMaxRank = 4 dimensions, so a map [B, T, H, W, C] is passed as a view of the same contiguous
//! memory: [B*T, H, W, C], or [B, T*H, W, C] where the batch must stay dimension 0 (inside
//! Stages). Both give the 3-D merge: H is even, so the row pairs (2i, 2i+1) of T*H never join
//! two frames. The layer treats every dimension before H, W, C as a batch dimension, so a
//! rank-5 shape would work unchanged where Shape allowed it.
//!
//! What forward keeps for backward (one buffer from the context, MemoryCategory::
//! SavedActivations, released when backward has run or the next forward replaces it), for
//! M = B (H/2) (W/2) rows (SavedLayoutBuilder: packed on the host, 256-byte aligned regions on
//! a device):
//!   rows [M, 4C] (the gathered neighbours, LayerNorm's input), mean [M], rstd [M]
//!   (accumulate_t<T>).
//! The normalised rows, which the reduction's weight gradient needs, are not stored: backward
//! recomputes them from the rows with the same LayerNorm kernel (bit-identical to the
//! forward's), so the layer stores one copy of its input instead of two. Temporaries (Scratch,
//! freed before return): forward the normalised rows [M, 4C]; backward the normalised rows,
//! reused for their gradient, and the rows' gradient [M, 4C].
//!
//! Written once over the backend primitives (gemm, layer_norm_forward/backward through
//! LayerNorm, for_each_index with the PatchMergeLayout functor) and instantiated for
//! HostContext (the default) and CudaContext (include the device primitives first, e.g.
//! "dr2net/modules/cuda/layer_norm.cuh").

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "dr2net/backend/host/primitives.hpp"
#include "dr2net/block/combine.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/compute_type.hpp"
#include "dr2net/core/config.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/moved_from.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/modules/layer_norm.hpp"
#include "dr2net/modules/linear.hpp"
#include "dr2net/modules/parameter.hpp"
#include "dr2net/modules/saved_layout.hpp"

namespace dr2net {

//! Moves elements between an NHWC map [N, H, W, C] (H even, W even) and the merged rows
//! [N, H/2, W/2, 4, C] of patch merging: row (n, i, j), channel block k = dh + 2 dw holds
//! x[n, 2i + dh, 2j + dw]. The mapping is a bijection, so each direction writes every
//! destination element exactly once. Only W and C enter: with q = n (H/2) + i, the map row
//! n H + 2i + dh is 2q + dh whatever H is (H even).
template <class T>
struct PatchMergeLayout {
  T* dst;                //!< destination, N H W C elements in the other layout
  const T* src;          //!< source (never dst)
  std::int64_t width;    //!< W, even
  std::int64_t channels; //!< C
  bool to_rows;          //!< true: map -> rows (dst [N, H/2, W/2, 4C]); false: rows -> map (dst [N, H, W, C])
  //! Copies the element that lands at dst[i].
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    const auto k = static_cast<std::int64_t>(i);
    const std::int64_t C = channels, c = k % C, half = width / 2;
    if (to_rows) {  // k = ((q W/2 + j) 4 + block) C + c
      const std::int64_t block = (k / C) % 4, r = k / (4 * C), j = r % half, q = r / half;
      dst[i] = src[((2 * q + block % 2) * width + 2 * j + block / 2) * C + c];
    } else {  // k = (row W + w) C + c, row = n H + h
      const std::int64_t p = k / C, w = p % width, row = p / width;
      dst[i] = src[(((row / 2) * half + w / 2) * 4 + row % 2 + 2 * (w % 2)) * C + c];
    }
  }
  //! Host only: dst[i] for i in [begin, end), exactly operator()(i)'s values, moving whole
  //! C-wide runs with the index decomposed once per range.
  void run_range(std::size_t begin, std::size_t end) const {
#if !defined(__CUDA_ARCH__)  // a host function: a device pass parses it, never compiles it
    if (begin >= end) return;
    const std::int64_t C = channels, half = width / 2;
    const auto k0 = static_cast<std::int64_t>(begin), last = static_cast<std::int64_t>(end);
    std::int64_t c = k0 % C, i = k0;
    if (to_rows) {  // dst order: c, then block, j, q
      std::int64_t block = (k0 / C) % 4, r = k0 / (4 * C), j = r % half, q = r / half;
      while (i < last) {
        const std::int64_t run = C - c < last - i ? C - c : last - i;
        const T* from = src + ((2 * q + block % 2) * width + 2 * j + block / 2) * C + c;
        for (std::int64_t e = 0; e < run; ++e) dst[i + e] = from[e];
        i += run;
        c = 0;
        if (++block == 4) { block = 0; if (++j == half) { j = 0; ++q; } }
      }
    } else {  // dst order: c, then w, row
      std::int64_t p = k0 / C, w = p % width, row = p / width;
      while (i < last) {
        const std::int64_t run = C - c < last - i ? C - c : last - i;
        const T* from = src + (((row / 2) * half + w / 2) * 4 + row % 2 + 2 * (w % 2)) * C + c;
        for (std::int64_t e = 0; e < run; ++e) dst[i + e] = from[e];
        i += run;
        c = 0;
        if (++w == width) { w = 0; ++row; }
      }
    }
#else
    (void)begin;
    (void)end;
#endif
  }
};

//! Sizes of a patch-merging layer.
struct PatchMergingConfig {
  std::int64_t dim = 0;      //!< C, the channels of the input map
  std::int64_t out_dim = 0;  //!< C_out, the channels of the output (0: 2C, timm's default)
  double eps = 1e-5;         //!< the LayerNorm's epsilon (timm's Swin: 1e-5)
};

//! The patch-merging transition of a Swin transformer (see the file comment for the math, the
//! names and what it stores): maps [B, H, W, C] -> [B, H/2, W/2, C_out] in the memory of
//! backend Ctx. A transition in the sense of block/stages.hpp: forward() keeps what one
//! backward() needs, backward() accumulates the parameter gradients and writes (does not
//! accumulate) the input gradient. Holds a pointer to the context it was built on, which must
//! outlive it, and every call must pass that context. Its parameters and gradients are recorded
//! once in the context's meter (Parameters, Gradients) for as long as it lives. On a device
//! backend every call only enqueues work on the context's stream. Not thread-safe. A moved-from
//! layer refuses every call.
//! \tparam T compute type (float or double on the host; also bf16/fp16 on the device)
//! \tparam Ctx backend context: HostContext (default) or CudaContext
template <class T, class Ctx = HostContext>
class PatchMerging : public NamedParameterSet<PatchMerging<T, Ctx>> {
 public:
  //! Names this layer in error messages.
  static constexpr std::string_view type_name = is_host_context_v<Ctx> ? "PatchMerging" : "CudaPatchMerging";
  using value_type = T;      //!< Type of the input, the output, the parameters and their gradients.
  using context_type = Ctx;  //!< The backend every call runs on.
  //! Where inputs, outputs and parameters live (HostSpace, or DeviceSpace on a device).
  using memory_space = memory_space_t<Ctx>;
  //! Type of GEMM scalars and of the saved LayerNorm statistics (T on the host).
  using A = accumulate_t<T>;
  //! A view of the backend's memory.
  template <class U>
  using View = TensorView<U, memory_space>;

  //! A layer on `ctx` with weights initialised as timm does (LayerNorm weight 1, bias 0;
  //! reduction.weight trunc_normal(std 0.02)) from `seed`; on a device the weights are drawn
  //! by the host layer PatchMerging<float>(ctx of the host, config, seed) and converted to T.
  //! Throws dr2net::Error naming the layer when dim < 1, out_dim < 0, eps is not positive and
  //! finite, or a size overflows, and when a memory limit of the context refuses the parameters.
  PatchMerging(Ctx& ctx, const PatchMergingConfig& config, std::uint64_t seed = 0, FunctionOptions options = {})
      : PatchMerging(&ctx, validated(config), options) {
    if constexpr (is_host_context_v<Ctx>) {
      reduction_.fill_truncated_normal(0.02, 2.0, seed, 0);
    } else {
      HostContext host_ctx;
      copy_from(PatchMerging<float, HostContext>(host_ctx, config, seed));
    }
  }
  //! A copy of a host layer on `ctx`: its configuration and parameters, converted to T.
  template <class U>
  PatchMerging(Ctx& ctx, const PatchMerging<U, HostContext>& host, FunctionOptions options = {})
      : PatchMerging(&ctx, host.config(), options) {
    copy_from(host);
  }

  //! A moved-from layer refuses every call with dr2net::Error.
  PatchMerging(PatchMerging&&) = default;
  //! Takes over the source's parameters, saved state and meter records.
  PatchMerging& operator=(PatchMerging&&) = default;
  PatchMerging(const PatchMerging&) = delete;
  PatchMerging& operator=(const PatchMerging&) = delete;
  ~PatchMerging() = default;

  //! Sets every tensor from a host layer of the same configuration (converted to T).
  template <class U>
  void copy_from(const PatchMerging<U, HostContext>& host) {
    live("copy_from()");
    DR2NET_CHECK(host.config().dim == config_.dim && host.out_dim() == out_dim_, type_name,
                 "::copy_from(): the host layer maps ", host.config().dim, " -> ", host.out_dim(),
                 " channels, this one ", config_.dim, " -> ", out_dim_);
    norm_.copy_from(host.norm(), type_name);
    reduction_.load(host.reduction().data(), host.reduction().shape(), type_name);
  }

  //! The validated configuration (out_dim as given: 0 means 2C; see out_dim()).
  const PatchMergingConfig& config() const noexcept { return config_; }
  //! C_out, the channels of the output.
  std::int64_t out_dim() const noexcept { return out_dim_; }
  //! The LayerNorm "norm" over the 4C merged channels.
  LayerNorm<T, Ctx>& norm() noexcept { return norm_; }
  //! Read-only norm().
  const LayerNorm<T, Ctx>& norm() const noexcept { return norm_; }
  //! The reduction weight "reduction.weight" [C_out, 4C] (out = rows W^T, no bias).
  parameter_t<T, Ctx>& reduction() noexcept { return reduction_; }
  //! Read-only reduction().
  const parameter_t<T, Ctx>& reduction() const noexcept { return reduction_; }
  //! The context the layer was built on (every call must pass it).
  Ctx& context() const noexcept { return *ctx_; }
  //! True between a training forward() and the backward() that consumes it.
  bool pending() const noexcept { return pending_; }

  //! [.., H/2, W/2, C_out] for an input [.., H, W, C]. Throws dr2net::Error (one line, naming
  //! the sizes) unless the input has rank >= 4 with non-empty dimensions, C channels and even
  //! H and W.
  Shape output_shape(const Shape& in) const {
    live("output_shape()");
    (void)layout(in);
    return output_of(in);
  }
  //! Elements of T of what forward() keeps for an input `in` (see the file comment).
  std::size_t saved_elements(const Shape& in) const {
    live("saved_elements()");
    return layout(in).total;
  }
  //! Bytes forward() keeps for an input `in`: saved_elements(in) * sizeof(T), on the host
  //! M 4C sizeof(T) + 2 M sizeof(accumulate_t<T>) with M = numel(in) / (4C).
  std::size_t saved_bytes(const Shape& in) const {
    live("saved_bytes()");
    return checked::bytes(checked::to_int64(layout(in).total, "PatchMerging saved elements"), sizeof(T),
                          "PatchMerging saved bytes");
  }

  //! out = PatchMerging(in) for a contiguous input [.., H, W, C] and output of output_shape();
  //! keeps the merged rows and their statistics for one backward() (replacing what an earlier
  //! forward kept).
  void forward(Ctx& ctx, View<const T> in, View<T> out) {
    live("forward()");
    const Layout L = check_call(ctx, in, out, "forward");
    release_workspace();  // a new forward replaces what the last one kept
    saved_ = ctx.template allocate<T>(L.total, MemoryCategory::SavedActivations,
                                      "PatchMerging saved rows and row statistics");
    compute(ctx, in, out, L, saved_.data());
    saved_shape_ = in.shape();
    pending_ = true;
  }

  //! Inference: out = PatchMerging(in) as forward() computes it, keeping nothing (the merged
  //! rows live in scratch for the call). A pending forward stays pending.
  void predict(Ctx& ctx, View<const T> in, View<T> out) {
    live("predict()");
    const Layout L = check_call(ctx, in, out, "predict");
    auto scratch = ctx.template allocate<T>(L.total, MemoryCategory::Scratch, "PatchMerging rows (predict)");
    compute(ctx, in, out, L, scratch.data());
  }

  //! Backward of the last forward() given dout = dL/dout: the norm and reduction gradients
  //! accumulate, din = dL/din is written (every element; nothing accumulated). Releases what
  //! the forward kept, also when it throws. Throws dr2net::Error without a pending forward (or
  //! when called twice), or when dout or din does not have the forward's output or input shape.
  void backward(Ctx& ctx, View<const T> dout, View<T> din) {
    live("backward()");
    DR2NET_CHECK(pending_, type_name, " backward() without a preceding forward() (or called twice)");
    struct Release {
      PatchMerging* self;
      ~Release() { self->release_workspace(); }
    } release{this};
    check_context(ctx, "backward");
    const std::string me = std::string(type_name) + " backward: ";
    check_contiguous(dout, me + "dout");
    check_contiguous(din, me + "din");
    check_shape(dout, output_of(saved_shape_), me + "dout");
    check_shape(din, saved_shape_, me + "din");
    const Layout L = layout(saved_shape_);
    const std::int64_t K = 4 * config_.dim, M = L.rows;
    T* rows = saved_.data() + L.rows_offset;
    A* mean = reinterpret_cast<A*>(saved_.data() + L.mean);
    A* rstd = reinterpret_cast<A*>(saved_.data() + L.rstd);
    const auto nk = static_cast<std::size_t>(M * K);

    // The normalised rows again (same kernel, same inputs: the forward's values and statistics).
    auto xn = ctx.template allocate<T>(nk, MemoryCategory::Scratch, "PatchMerging backward: normalised rows");
    norm_.forward(ctx, rows, M, xn.data(), mean, rstd);
    // dW [C_out, 4C] += dout^T xn
    gemm<T>(ctx, Transpose::Yes, Transpose::No, out_dim_, K, M, A(1), dout.data(), out_dim_, xn.data(), K, A(1),
            reduction_.grad_data(), K, tf32_);
    // dxn = dout W, over the normalised rows (no longer needed)
    gemm<T>(ctx, Transpose::No, Transpose::No, M, K, out_dim_, A(1), dout.data(), out_dim_, reduction_.data(), K, A(0),
            xn.data(), K, tf32_);
    auto drows = ctx.template allocate<T>(nk, MemoryCategory::Scratch, "PatchMerging backward: row gradients");
    for_each_index(ctx, nk, Fill<T>{drows.data(), T(0)});
    norm_.backward(ctx, rows, mean, rstd, xn.data(), M, drows.data());  // accumulates into drows
    xn.reset();
    for_each_index(ctx, nk, PatchMergeLayout<T>{din.data(), drows.data(), L.width, config_.dim, false});
  }

  //! Sets every parameter gradient to zero.
  void zero_grad() {
    live("zero_grad()");
    for_each_parameter_object([&](auto& p) { for_each_index(*ctx_, p.size(), Fill<T>{p.grad_data(), T(0)}); });
  }

  //! Frees what a forward kept (a pending forward is discarded).
  void release_workspace() {
    live("release_workspace()");
    saved_.reset();
    pending_ = false;
  }

  //! fn(parameter&) in timm's order: norm.weight, norm.bias, reduction.weight.
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    live("for_each_parameter()");
    norm_.for_each_parameter_object(fn);
    fn(reduction_);
  }

 private:
  PatchMerging(Ctx* ctx, const PatchMergingConfig& config, FunctionOptions options)
      : ctx_(ctx), config_(config), out_dim_(config.out_dim > 0 ? config.out_dim : 2 * config.dim),
        tf32_(options.allow_tf32), norm_(make_layer_norm<T>(ctx, "norm", 4 * config.dim, config.eps)),
        reduction_(parameter_of<T, Ctx>::make(ctx, "reduction.weight", Shape{out_dim_, 4 * config.dim})) {
    std::size_t bytes = 0;
    for_each_parameter_object([&](auto& p) { bytes += p.bytes(); });
    parameter_bytes_ = ctx->reserve_bytes(MemoryCategory::Parameters, bytes, "PatchMerging parameters");
    gradient_bytes_ = ctx->reserve_bytes(MemoryCategory::Gradients, bytes, "PatchMerging parameter gradients");
  }

  static PatchMergingConfig validated(const PatchMergingConfig& c) {
    DR2NET_CHECK(c.dim > 0, "PatchMerging: dim must be positive, got ", c.dim);
    DR2NET_CHECK(c.out_dim >= 0, "PatchMerging: out_dim must be positive (or 0 for 2 x dim), got ", c.out_dim);
    DR2NET_CHECK(std::isfinite(c.eps) && c.eps > 0, "PatchMerging: eps must be positive and finite, got ", c.eps);
    (void)checked::mul(4, c.dim, "PatchMerging: merged width 4 x dim");
    const std::int64_t out = c.out_dim > 0 ? c.out_dim : checked::mul(2, c.dim, "PatchMerging: out_dim 2 x dim");
    (void)checked::product({out, 4, c.dim}, "PatchMerging: reduction weight (out_dim x 4 dim)");
    return c;
  }

  //! Offsets of the saved regions for one input shape, and the sizes of the call.
  struct Layout {
    std::int64_t rows = 0, width = 0;
    std::size_t rows_offset = 0, mean = 0, rstd = 0, total = 0;
  };

  Layout layout(const Shape& in) const {
    const int r = in.rank();
    DR2NET_CHECK(r >= 4, type_name, ": input must be [batch, height, width, channels], got shape ", in);
    const std::int64_t H = in[r - 3], W = in[r - 2], C = in[r - 1];
    DR2NET_CHECK(in.numel() > 0, type_name, ": input shape ", in, " has an empty dimension");
    DR2NET_CHECK(C == config_.dim, type_name, ": input has ", C, " channels but the layer merges ", config_.dim,
                 " (input shape ", in, ")");
    DR2NET_CHECK(H % 2 == 0 && W % 2 == 0, type_name, ": height ", H, " and width ", W, " of input ", in,
                 " must both be even (2x2 patches are merged)");
    Layout L;
    L.rows = in.numel() / (4 * C);
    L.width = W;
    SavedLayoutBuilder<T, Ctx> b(is_host_context_v<Ctx> ? "PatchMerging saved rows" : "CudaPatchMerging saved rows");
    L.rows_offset = b.take({L.rows, 4, C}, "rows (rows x 4 dim)");
    L.mean = b.take_acc(L.rows, "mean (rows)");
    L.rstd = b.take_acc(L.rows, "rstd (rows)");
    L.total = b.total();
    (void)checked::bytes(b.regions.total(), sizeof(T), "PatchMerging saved rows (bytes)");
    return L;
  }

  //! [.., H/2, W/2, C_out] of an input shape that layout() accepted.
  Shape output_of(const Shape& in) const {
    const int r = in.rank();
    std::int64_t dims[kMaxRank] = {};
    for (int d = 0; d < r; ++d) dims[d] = in[d];
    dims[r - 3] /= 2;
    dims[r - 2] /= 2;
    dims[r - 1] = out_dim_;
    return Shape(std::span<const std::int64_t>(dims, static_cast<std::size_t>(r)));
  }

  void check_context(const Ctx& ctx, const char* where) const {
    DR2NET_CHECK(&ctx == ctx_, type_name, " ", where,
                 ": called with another context than the one the layer was built on (its parameters and "
                 "saved state belong to that one)");
  }

  //! Checks the context, the input and the output of forward()/predict(); returns the layout.
  Layout check_call(const Ctx& ctx, View<const T> in, View<T> out, const char* where) const {
    check_context(ctx, where);
    const std::string me = std::string(type_name) + " " + where + ": ";
    check_contiguous(in, me + "input");
    check_contiguous(out, me + "output");
    const Layout L = layout(in.shape());
    check_shape(out, output_of(in.shape()), me + "output");
    return L;
  }

  //! out = rows(in) -> LayerNorm -> W^T, with the rows and statistics written into `saved`
  //! (laid out as layout(in)); the normalised rows live in scratch for the call.
  void compute(Ctx& ctx, View<const T> in, View<T> out, const Layout& L, T* saved) {
    const std::int64_t K = 4 * config_.dim, M = L.rows;
    T* rows = saved + L.rows_offset;
    A* mean = reinterpret_cast<A*>(saved + L.mean);
    A* rstd = reinterpret_cast<A*>(saved + L.rstd);
    const auto nk = static_cast<std::size_t>(M * K);
    for_each_index(ctx, nk, PatchMergeLayout<T>{rows, in.data(), L.width, config_.dim, true});
    auto xn = ctx.template allocate<T>(nk, MemoryCategory::Scratch, "PatchMerging: normalised rows");
    norm_.forward(ctx, rows, M, xn.data(), mean, rstd);
    gemm<T>(ctx, Transpose::No, Transpose::Yes, M, out_dim_, K, A(1), xn.data(), K, reduction_.data(), K, A(0),
            out.data(), out_dim_, tf32_);  // out = xn W^T
  }

  //! Refuses any call on a layer that was moved from.
  void live(const char* call) const {
    if (moved_.moved_from()) {
      const std::string what = std::string(type_name) + "::" + call;
      moved_.check(what.c_str());
    }
  }

  Ctx* ctx_;
  PatchMergingConfig config_;
  std::int64_t out_dim_;
  bool tf32_ = false;
  LayerNorm<T, Ctx> norm_;
  parameter_t<T, Ctx> reduction_;
  MeterReservation parameter_bytes_, gradient_bytes_;
  decltype(std::declval<Ctx&>().template allocate<T>(std::size_t{}, MemoryCategory::Other)) saved_;
  Shape saved_shape_;
  bool pending_ = false;
  MovedFromGuard moved_;
};

}  // namespace dr2net
