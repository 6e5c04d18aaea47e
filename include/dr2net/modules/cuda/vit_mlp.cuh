#pragma once
//! \file
//! CudaVitMlp<T>: the device twin of modules/vit_mlp.hpp's VitMlp<T>, with the same
//! configuration, tensor names (norm2.*, mlp.fc1.*, mlp.fc2.*; parameter_prefix ""), drop
//! masks (same Philox streams) and contract:
//!
//!   G(h) = DropPath(Dropout2(fc2(Dropout1(gelu(fc1(norm2(h)))))))
//!
//! gelu and the hidden dropout run as one fused pass (cuda_detail::GeluDropForward).
//! Parameters live in device memory (modules/cuda/parameter.cuh).
//!
//! Saved internals: mean [M], rstd [M] (accumulation type), xn [M, D], z [M, Hd] (fc1
//! output), a [M, Hd] (gelu(z) after the hidden dropout: fc2's input).

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
#include "dr2net/modules/cuda/layer_norm.cuh"
#include "dr2net/modules/cuda/linear.cuh"
#include "dr2net/modules/cuda/saved_layout.cuh"
#include "dr2net/modules/cuda/vit_attention.cuh"
#include "dr2net/modules/drop.hpp"
#include "dr2net/modules/parameter.hpp"
#include "dr2net/modules/vit_mlp.hpp"

namespace dr2net {

//! The device MLP residual function of a pre-norm timm ViT block: a ResidualFunction on
//! CudaContext (with the optional adds-into members) that matches VitMlp<T> within rounding.
//! Views handed to it (input, output, saved, gradients) are contiguous device memory,
//! [B, N, D] for the streams. Shapes are checked on the host before anything is enqueued
//! (dr2net::Error naming the member, the view and the sizes); the work itself is only
//! enqueued on call.context's stream, with no host synchronisation, and temporaries come from
//! the context's stream-ordered pool (metered as Scratch). Not thread-safe.
//! \tparam T compute type: double, float, __nv_bfloat16 or __half.
template <class T>
class CudaVitMlp : public NamedParameterSet<CudaVitMlp<T>>, public OutputAddsInto<CudaVitMlp<T>> {
 public:
  //! Names this function in error messages.
  static constexpr std::string_view type_name = "CudaVitMlp";
  using value_type = T;               //!< Compute type of parameters, activations and saved tensors.
  using context_type = CudaContext;   //!< Runs on the CUDA backend: members take ModuleCall<CudaContext>.
  //! Accumulation type (float for float/bf16/fp16, double for double): GEMM scalars and the
  //! saved LayerNorm statistics.
  using A = cuda_detail::acc_t<T>;
  //! Empty: timm's names are kept verbatim inside a block ("blocks.{i}.mlp.fc1.weight").
  static constexpr std::string_view parameter_prefix = "";

  //! Weights initialised exactly as VitMlp<float>(config, seed) initialises them. Throws
  //! dr2net::Error for a configuration VitMlp refuses.
  CudaVitMlp(CudaContext& ctx, const VitMlpConfig& config, std::uint64_t seed = 0, CudaFunctionOptions options = {})
      : CudaVitMlp(ctx, VitMlp<float>(config, seed), options) {}

  //! A copy of a host function: its configuration and parameters, converted to T. Waits for
  //! the copies. Throws dr2net::Error naming the tensor when device memory runs out.
  template <class U>
  CudaVitMlp(CudaContext& ctx, const VitMlp<U>& host, CudaFunctionOptions options = {})
      : config_(host.config()), norm2_(ctx, "norm2", config_.dim, config_.eps),
        fc1_(ctx, "mlp.fc1", config_.dim, config_.hidden, options.allow_tf32),
        fc2_(ctx, "mlp.fc2", config_.hidden, config_.dim, options.allow_tf32) {
    norm2_.copy_from(host.norm2(), "CudaVitMlp");
    fc1_.copy_from(host.fc1(), "CudaVitMlp");
    fc2_.copy_from(host.fc2(), "CudaVitMlp");
  }

  //! The configuration, taken from the host function (validated there).
  const VitMlpConfig& config() const noexcept { return config_; }
  //! The pre-norm LayerNorm "norm2" over width D, in device memory.
  CudaLayerNorm<T>& norm2() noexcept { return norm2_; }
  //! The expanding layer "mlp.fc1", D -> hidden, followed by GELU.
  CudaLinear<T>& fc1() noexcept { return fc1_; }
  //! The contracting layer "mlp.fc2", hidden -> D.
  CudaLinear<T>& fc2() noexcept { return fc2_; }

  //! Elements of T of saved internals for an input [B, N, D], with the statistics in the
  //! accumulation type and every region 256-byte aligned (see the file comment). Throws
  //! dr2net::Error when `in` is not rank 3, its width is not D, a dimension is empty, or the
  //! size overflows (the error names the region).
  std::size_t saved_elements(const Shape& in) const { return layout(in).total; }

  //! out[B, N, D] = G(in); `scratch` (at least saved_elements(in) elements) holds the
  //! internals afterwards, as recompute leaves them. Dropout and drop-path apply only when
  //! call.training, with the host twin's masks.
  void forward(const ModuleCall<CudaContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> scratch) {
    recompute(call, in, out, scratch);
  }

  //! out = G(in), bit-identical to forward() for the same call, and `saved` (at least
  //! saved_elements(in) elements) holds the internals backward() reads.
  void recompute(const ModuleCall<CudaContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> saved) {
    compute(call, in, out, saved, nullptr, 0.0);
  }

  //! grad_in += J_G(in)^T grad_out and every parameter gradient += its share (nothing is
  //! overwritten). `saved` must be what recompute() left for this `in` and call. Temporaries
  //! (dz [M, hidden], dxn [M, D]) are freed stream-ordered before it returns.
  void backward(const ModuleCall<CudaContext>& call, ConstView<T> in, ConstView<T> saved, ConstView<T> grad_out,
                TensorView<T> grad_in) {
    const Layout L = layout(in.shape());
    check_views(in, grad_in, saved.size(), L, "backward");
    check_shape(grad_out, in.shape(), "CudaVitMlp backward: grad_out");
    CudaContext& cx = call.context;
    const T* s = saved.data();
    const A* mean = reinterpret_cast<const A*>(s + L.mean);
    const A* rstd = reinterpret_cast<const A*>(s + L.rstd);
    const T *xn = s + L.xn, *z = s + L.z, *a = s + L.a;
    const auto n = in.size();
    const auto nh = static_cast<std::size_t>(L.rows * config_.hidden);

    const T* g = grad_out.data();
    DeviceBuffer<T> masked;
    const DropScale<A> drop = output_drop(call, L);
    if (drop.active()) {
      masked = cx.allocate<T>(n, MemoryCategory::Scratch);
      for_each_index(cx, n, cuda_detail::DropApply<T>{masked.data(), g, drop});
      g = masked.data();
    }
    DeviceBuffer<T> dz = cx.allocate<T>(nh, MemoryCategory::Scratch);
    fc2_.backward(cx, a, g, L.rows, dz.data());  // d(a) = g W2
    masked.reset();
    for_each_index(cx, nh, cuda_detail::GeluDropBackward<T>{dz.data(), z, hidden_drop(call)});  // dz = da m1 gelu'(z)
    DeviceBuffer<T> dxn = cx.allocate<T>(n, MemoryCategory::Scratch);
    fc1_.backward(cx, xn, dz.data(), L.rows, dxn.data());
    dz.reset();
    norm2_.backward(cx, in.data(), mean, rstd, dxn.data(), L.rows, grad_in.data());  // accumulates into grad_in
  }

  //! fn(DeviceParameter<T>&) in the host twin's order; for_each_parameter (NamedParameterSet)
  //! therefore hands out views of DEVICE memory.
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    norm2_.for_each_parameter_object(fn);
    fc1_.for_each_parameter_object(fn);
    fc2_.for_each_parameter_object(fn);
  }

 private:
  friend class OutputAddsInto<CudaVitMlp<T>>;
  double output_drop_path() const { return config_.drop_path; }
  double output_dropout() const { return config_.drop; }

  //! F(in) into out (+ addend_scale * addend when addend is not null), internals into saved.
  void compute(const ModuleCall<CudaContext>& call, ConstView<T> in, TensorView<T> out, TensorView<T> saved,
               const T* addend, double addend_scale) {
    const Layout L = layout(in.shape());
    check_views(in, out, saved.size(), L, "forward");
    CudaContext& cx = call.context;
    T* s = saved.data();
    A* mean = reinterpret_cast<A*>(s + L.mean);
    A* rstd = reinterpret_cast<A*>(s + L.rstd);
    T *xn = s + L.xn, *z = s + L.z, *a = s + L.a;
    const auto nh = static_cast<std::size_t>(L.rows * config_.hidden);

    norm2_.forward(cx, in.data(), L.rows, xn, mean, rstd);
    fc1_.forward(cx, xn, L.rows, z);
    for_each_index(cx, nh, cuda_detail::GeluDropForward<T>{a, z, hidden_drop(call)});  // a = gelu(z) * mask1
    fc2_.forward_add(cx, a, L.rows, addend, static_cast<A>(addend_scale), out.data());
    const DropScale<A> drop = output_drop(call, L);
    if (drop.active()) for_each_index(cx, out.size(), cuda_detail::DropApply<T>{out.data(), out.data(), drop});
  }

  struct Layout {
    std::int64_t batch = 0, tokens = 0, rows = 0;
    std::size_t mean = 0, rstd = 0, xn = 0, z = 0, a = 0, total = 0;
  };

  Layout layout(const Shape& in) const {
    DR2NET_CHECK(in.rank() == 3, "CudaVitMlp: input must be [batch, tokens, width], got shape ", in);
    DR2NET_CHECK(in.last() == config_.dim, "CudaVitMlp: input width ", in.last(), " does not match dim ", config_.dim,
                 " (input shape ", in, ")");
    DR2NET_CHECK(in[0] > 0 && in[1] > 0, "CudaVitMlp: input shape ", in, " has an empty batch or token dimension");
    Layout L;
    L.batch = in[0];
    L.tokens = in[1];
    L.rows = in.rows();  // B N <= numel, which Shape checked
    // Every size in checked arithmetic (rows x hidden can overflow where the stream does not).
    const std::int64_t M = L.rows, D = config_.dim, Hd = config_.hidden;
    cuda_detail::SavedLayoutBuilder<T> b("CudaVitMlp saved internals");
    L.mean = b.take_acc(M, "mean (rows)");
    L.rstd = b.take_acc(M, "rstd (rows)");
    L.xn = b.take({M, D}, "xn (rows x dim)");
    L.z = b.take({M, Hd}, "z (rows x hidden)");
    L.a = b.take({M, Hd}, "a (rows x hidden)");
    L.total = b.total();
    (void)checked::bytes(b.regions.total(), sizeof(T), "CudaVitMlp saved internals (bytes)");
    return L;
  }

  static void check_views(ConstView<T> in, TensorView<T> out, std::size_t saved, const Layout& L, const char* where) {
    const bool fwd = std::string_view(where) == "forward";
    const std::string what = std::string("CudaVitMlp ") + where + ": " + (fwd ? "output" : "grad_in");
    check_contiguous(in, std::string("CudaVitMlp ") + where + ": input");
    check_contiguous(out, what);
    check_shape(out, in.shape(), what);
    DR2NET_CHECK(saved >= L.total, "CudaVitMlp ", where, ": saved/scratch holds ", saved, " elements, needs ", L.total);
  }

  DropScale<A> output_drop(const ModuleCall<CudaContext>& call, const Layout& L) const {
    return make_drop_scale<A>(call, config_.drop_path, config_.drop, RandomPurpose::OutputDropout,
                              static_cast<std::uint64_t>(L.tokens * config_.dim));
  }
  DropScale<A> hidden_drop(const ModuleCall<CudaContext>& call) const {
    return make_drop_scale<A>(call, 0.0, config_.drop, RandomPurpose::HiddenDropout, 1);
  }

  VitMlpConfig config_;
  CudaLayerNorm<T> norm2_;
  CudaLinear<T> fc1_, fc2_;
};

}  // namespace dr2net
