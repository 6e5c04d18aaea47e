#pragma once
//! \file
//! Linear<T, Ctx>: a fully connected layer as PyTorch stores it, weight [out, in] and bias [out],
//! y = x W^T + b over rows of x, with its backward; written once over the backend primitives
//! (gemm, gemm_bias_add, column_sums_add) and instantiated for HostContext (the default) and
//! CudaContext (modules/cuda/linear.cuh names that CudaLinear<T>).
//!
//!   forward:  y = x W^T + b (+ s * addend)       (gemm_bias_add: on the device one cuBLASLt call)
//!   backward: dW += dy^T x                        (gemm, beta = 1)
//!             db += sum over rows of dy           (column_sums_add)
//!             dx = dy W  (or += with beta = 1)    (gemm)

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>

#include "dr2net/backend/host/primitives.hpp"
#include "dr2net/core/compute_type.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/modules/parameter.hpp"

namespace dr2net {

//! Options of the residual functions that only some backends use.
struct FunctionOptions {
  //! float GEMMs may use TF32 tensor cores (a device policy's allow_tf32; the host ignores it).
  bool allow_tf32 = false;
};

//! A fully connected layer y = x W^T + b in PyTorch's layout: weight [out, in] row-major,
//! bias [out], activations row-major [rows, features], all in the memory of backend Ctx.
//! Owns both parameters and their gradients (zero-initialised at construction); backward
//! accumulates into the gradients. On a device backend every call only enqueues work on the
//! context's stream. Not thread-safe: concurrent backward calls on one layer race on the gradients.
//! \tparam T element type of parameters and activations (float or double on the host; also
//!         bf16/fp16 on the device)
//! \tparam Ctx backend context: HostContext (default) or CudaContext
template <class T, class Ctx = HostContext>
class Linear {
 public:
  //! Scalar type of `scale` and `dx_beta`: accumulate_t<T> (T on the host).
  using A = accumulate_t<T>;

  //! A host layer: `name` is the layer's path ("attn.qkv"); its tensors are "<name>.weight",
  //! "<name>.bias". Throws dr2net::Error naming the layer when `in_features` or `out_features`
  //! is not positive, or when the parameter storage cannot be allocated.
  Linear(const std::string& name, std::int64_t in_features, std::int64_t out_features)
    requires is_host_context_v<Ctx>
      : Linear(nullptr, name, in_features, out_features, {}) {}
  //! The same in the memory of `ctx` (device parameters start at zero: load them or copy_from()).
  Linear(Ctx& ctx, const std::string& name, std::int64_t in_features, std::int64_t out_features,
         FunctionOptions options = {})
      : Linear(&ctx, name, in_features, out_features, options) {}
  //! The same with TF32 allowed or not (the device layer's former signature).
  Linear(Ctx& ctx, const std::string& name, std::int64_t in_features, std::int64_t out_features, bool allow_tf32)
      : Linear(&ctx, name, in_features, out_features, FunctionOptions{allow_tf32}) {}

  //! The same tensors as `host` (a host layer of the same sizes), converted to T; `owner` names
  //! the module in errors.
  template <class U>
  void copy_from(const Linear<U, HostContext>& host, std::string_view owner) {
    weight_.load(host.weight().data(), host.weight().shape(), owner);
    bias_.load(host.bias().data(), host.bias().shape(), owner);
  }

  //! Input width: the elements per row of x (the columns of the weight).
  std::int64_t in_features() const noexcept { return in_; }
  //! Output width: the elements per row of y (the rows of the weight, the bias length).
  std::int64_t out_features() const noexcept { return out_; }
  //! The weight "<name>.weight", shape [out_features, in_features], with its gradient.
  parameter_t<T, Ctx>& weight() noexcept { return weight_; }
  //! The bias "<name>.bias", shape [out_features], with its gradient.
  parameter_t<T, Ctx>& bias() noexcept { return bias_; }
  //! Read-only access to the weight [out_features, in_features].
  const parameter_t<T, Ctx>& weight() const noexcept { return weight_; }
  //! Read-only access to the bias [out_features].
  const parameter_t<T, Ctx>& bias() const noexcept { return bias_; }

  //! timm's ViT initialisation: weight ~ trunc_normal(std 0.02), bias 0 (host layers).
  void init(std::uint64_t seed, std::uint32_t tag, double std = 0.02)
    requires is_host_context_v<Ctx>
  {
    weight_.fill_truncated_normal(std, 2.0, seed, tag);
    bias_.fill(T(0));
  }

  //! y[rows, out] = x[rows, in] W^T + b
  void forward(Ctx& ctx, const T* x, std::int64_t rows, T* y) const { forward_add(ctx, x, rows, nullptr, A(0), y); }

  //! y = x W^T + b + scale * addend, the GEMM accumulating onto (b + scale * addend).
  //! `addend` [rows, out] may be y itself; scale == 0 never reads it.
  void forward_add(Ctx& ctx, const T* x, std::int64_t rows, const T* addend, A scale, T* y) const {
    gemm_bias_add<T>(ctx, Transpose::No, Transpose::Yes, rows, out_, in_, A(1), x, in_, weight_.data(), in_,
                     bias_.data(), scale, addend, y, out_, tf32_);
  }

  //! Given x and dy = dL/dy: dW += dy^T x, db += sum over rows of dy, and (when dx is not
  //! null) dx = dy W + dx_beta * dx (dx_beta = 0: overwritten).
  void backward(Ctx& ctx, const T* x, const T* dy, std::int64_t rows, T* dx, A dx_beta = A(0)) {
    gemm<T>(ctx, Transpose::Yes, Transpose::No, out_, in_, rows, A(1), dy, out_, x, in_, A(1), weight_.grad_data(), in_,
            tf32_);
    column_sums_add<T>(ctx, rows, out_, dy, bias_.grad_data());
    if (dx != nullptr)
      gemm<T>(ctx, Transpose::No, Transpose::No, rows, in_, out_, A(1), dy, out_, weight_.data(), in_, dx_beta, dx, in_,
              tf32_);
  }

  //! fn(parameter&) for weight, then bias (the order checkpoints and optimizers see).
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    fn(weight_);
    fn(bias_);
  }

 private:
  Linear(Ctx* ctx, const std::string& name, std::int64_t in_features, std::int64_t out_features,
         FunctionOptions options)
      : in_(in_features), out_(out_features), tf32_(options.allow_tf32),
        weight_(parameter_of<T, Ctx>::make(ctx, name + ".weight", weight_shape(name, in_features, out_features))),
        bias_(parameter_of<T, Ctx>::make(ctx, name + ".bias", Shape{out_features})) {}

  //! [out, in], after checking both sizes (before any storage is allocated).
  static Shape weight_shape(const std::string& name, std::int64_t in_features, std::int64_t out_features) {
    DR2NET_CHECK(in_features > 0 && out_features > 0, "linear layer ", name, ": sizes must be positive, got in = ",
                 in_features, ", out = ", out_features);
    return Shape{out_features, in_features};
  }

  std::int64_t in_, out_;
  bool tf32_ = false;
  parameter_t<T, Ctx> weight_, bias_;
};

//! A Linear<T, Ctx> on `*ctx` (ignored, and may be null, on the host): how functions written
//! once over the backend build their layers.
template <class T, class Ctx>
Linear<T, Ctx> make_linear(Ctx* ctx, const std::string& name, std::int64_t in_features, std::int64_t out_features,
                           FunctionOptions options = {}) {
  if constexpr (is_host_context_v<Ctx>) return Linear<T, Ctx>(name, in_features, out_features);
  else return Linear<T, Ctx>(*ctx, name, in_features, out_features, options);
}

}  // namespace dr2net
