#pragma once
//! \file
//! LayerNorm<T, Ctx>: the affine LayerNorm over the last dimension (weight [D], bias [D], eps),
//! with forward and accumulating backward on the backend's layer_norm_forward/backward; written
//! once for HostContext (the default) and CudaContext (modules/cuda/layer_norm.cuh names that
//! CudaLayerNorm<T>). The per-row statistics mean and rstd are of accumulate_t<T> (T on the
//! host; fp32 for bf16/fp16 on the device).

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "dr2net/backend/host/primitives.hpp"
#include "dr2net/core/compute_type.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/modules/parameter.hpp"

namespace dr2net {

//! The LayerNorm layer of a ViT block: owns weight [D] and bias [D] (parameter_t<T, Ctx>) and runs
//! the backend's LayerNorm kernels on raw row-major arrays in its memory. Used inside residual
//! functions and the head (VitAttention's norm1, VitMlp's norm2, VitHead's final norm), which
//! check their tensors before calling forward() or backward().
//! \tparam T compute type; \tparam Ctx backend context (HostContext by default, or CudaContext)
template <class T, class Ctx = HostContext>
class LayerNorm {
 public:
  //! Type of the per-row statistics mean and rstd: accumulate_t<T>.
  using A = accumulate_t<T>;
  //! A host layer: `name` is the layer's path ("norm1"); its tensors are "<name>.weight",
  //! "<name>.bias". Initialised as PyTorch does: weight 1, bias 0. Throws dr2net::Error naming
  //! the layer when dim < 1 or eps is not positive and finite.
  LayerNorm(const std::string& name, std::int64_t dim, double eps)
    requires is_host_context_v<Ctx>
      : LayerNorm(nullptr, name, dim, eps) {}
  //! The same in the memory of `ctx`. Device tensors start at zero (weight too): load them or
  //! copy_from() a host LayerNorm before use.
  LayerNorm(Ctx& ctx, const std::string& name, std::int64_t dim, double eps) : LayerNorm(&ctx, name, dim, eps) {}

  //! The same tensors as a host LayerNorm (converted to T); `owner` names the module in errors.
  template <class U>
  void copy_from(const LayerNorm<U, HostContext>& host, std::string_view owner) {
    weight_.load(host.weight().data(), host.weight().shape(), owner);
    bias_.load(host.bias().data(), host.bias().shape(), owner);
  }

  //! Width D of the normalised rows (the last dimension of the input).
  std::int64_t dim() const noexcept { return dim_; }
  //! The epsilon added to the variance inside the square root (timm's ViT: 1e-6).
  double eps() const noexcept { return eps_; }
  //! The scale gamma, tensor "<name>.weight" of shape [D].
  parameter_t<T, Ctx>& weight() noexcept { return weight_; }
  //! The shift beta, tensor "<name>.bias" of shape [D].
  parameter_t<T, Ctx>& bias() noexcept { return bias_; }
  //! Read-only access to the scale gamma.
  const parameter_t<T, Ctx>& weight() const noexcept { return weight_; }
  //! Read-only access to the shift beta.
  const parameter_t<T, Ctx>& bias() const noexcept { return bias_; }

  //! y = (x - mean) * rstd * weight + bias per row; also writes mean[rows] and rstd[rows].
  //! x and y are [rows, dim()] row-major arrays in the backend's memory; pointers and sizes are
  //! not checked here.
  void forward(Ctx& ctx, const T* x, std::int64_t rows, T* y, A* mean, A* rstd) const {
    layer_norm_forward<T>(ctx, x, rows, dim_, weight_.data(), bias_.data(), static_cast<A>(eps_), y, mean, rstd);
  }

  //! dx += J^T dy; weight and bias gradients += their share. x, dy and dx are [rows, dim()]
  //! row-major; mean and rstd are what forward() wrote for the same x. Nothing is overwritten.
  void backward(Ctx& ctx, const T* x, const A* mean, const A* rstd, const T* dy, std::int64_t rows, T* dx) {
    layer_norm_backward<T>(ctx, x, mean, rstd, weight_.data(), dy, rows, dim_, dx, weight_.grad_data(),
                           bias_.grad_data());
  }

  //! fn(parameter&) for weight, then bias: the order of the owner's parameter enumeration and
  //! of NamedParameterSet's load by name.
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    fn(weight_);
    fn(bias_);
  }

 private:
  LayerNorm(Ctx* ctx, const std::string& name, std::int64_t dim, double eps)
      : dim_(checked_dim(name, dim, eps)), eps_(eps),
        weight_(parameter_of<T, Ctx>::make(ctx, name + ".weight", Shape{dim})),
        bias_(parameter_of<T, Ctx>::make(ctx, name + ".bias", Shape{dim})) {
    if constexpr (is_host_context_v<Ctx>) weight_.fill(T(1));
  }

  static std::int64_t checked_dim(const std::string& name, std::int64_t dim, double eps) {
    DR2NET_CHECK(dim > 0, "layer norm ", name, ": width must be positive, got ", dim);
    DR2NET_CHECK(std::isfinite(eps) && eps > 0, "layer norm ", name, ": eps must be positive and finite, got ", eps);
    return dim;
  }

  std::int64_t dim_;
  double eps_;
  parameter_t<T, Ctx> weight_, bias_;
};

//! A LayerNorm<T, Ctx> on `*ctx` (ignored, and may be null, on the host; weight 1 there).
template <class T, class Ctx>
LayerNorm<T, Ctx> make_layer_norm(Ctx* ctx, const std::string& name, std::int64_t dim, double eps) {
  if constexpr (is_host_context_v<Ctx>) return LayerNorm<T, Ctx>(name, dim, eps);
  else return LayerNorm<T, Ctx>(*ctx, name, dim, eps);
}

}  // namespace dr2net
