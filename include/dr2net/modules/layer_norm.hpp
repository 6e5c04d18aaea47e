#pragma once
//! \file
//! LayerNorm<T>: the affine LayerNorm over the last dimension (weight [D], bias [D], eps),
//! with forward and accumulating backward on the host kernels.

#include <cmath>
#include <cstdint>
#include <string>

#include "dr2net/backend/host/layer_norm.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/modules/parameter.hpp"

namespace dr2net {

//! The LayerNorm layer of a ViT block on the host: owns weight [D] and bias [D] as Parameter<T>
//! and runs backend/host/layer_norm.hpp's kernels on raw row-major arrays. Used inside residual
//! functions and the head (VitAttention's norm1, VitMlp's norm2, VitHead's final norm), which
//! check their tensors before calling forward() or backward().
template <class T>
class LayerNorm {
 public:
  //! `name` is the layer's path ("norm1"); its tensors are "<name>.weight", "<name>.bias".
  //! Initialised as PyTorch does: weight 1, bias 0. Throws dr2net::Error naming the layer when
  //! dim < 1 or eps is not positive and finite.
  LayerNorm(const std::string& name, std::int64_t dim, double eps)
      : dim_(dim), eps_(eps), weight_(name + ".weight", Shape{dim}), bias_(name + ".bias", Shape{dim}) {
    DR2NET_CHECK(dim > 0, "layer norm ", name, ": width must be positive, got ", dim);
    DR2NET_CHECK(std::isfinite(eps) && eps > 0, "layer norm ", name, ": eps must be positive and finite, got ", eps);
    weight_.fill(T(1));
  }

  //! Width D of the normalised rows (the last dimension of the input).
  std::int64_t dim() const noexcept { return dim_; }
  //! The epsilon added to the variance inside the square root (timm's ViT: 1e-6).
  double eps() const noexcept { return eps_; }
  //! The scale gamma, tensor "<name>.weight" of shape [D].
  Parameter<T>& weight() noexcept { return weight_; }
  //! The shift beta, tensor "<name>.bias" of shape [D].
  Parameter<T>& bias() noexcept { return bias_; }
  //! Read-only access to the scale gamma.
  const Parameter<T>& weight() const noexcept { return weight_; }
  //! Read-only access to the shift beta.
  const Parameter<T>& bias() const noexcept { return bias_; }

  //! y = (x - mean) * rstd * weight + bias per row; also writes mean[rows] and rstd[rows].
  //! x and y are [rows, dim()] row-major host arrays; pointers and sizes are not checked here.
  void forward(const T* x, std::int64_t rows, T* y, T* mean, T* rstd) const {
    layer_norm_forward<T>(x, rows, dim_, weight_.data(), bias_.data(), static_cast<T>(eps_), y, mean, rstd);
  }

  //! dx += J^T dy; weight and bias gradients += their share. x, dy and dx are [rows, dim()]
  //! row-major; mean and rstd are what forward() wrote for the same x. Nothing is overwritten.
  void backward(const T* x, const T* mean, const T* rstd, const T* dy, std::int64_t rows, T* dx) {
    layer_norm_backward<T>(x, mean, rstd, weight_.data(), dy, rows, dim_, dx, weight_.grad_data(), bias_.grad_data());
  }

  //! fn(Parameter<T>&) for weight, then bias: the order of the owner's parameter enumeration and
  //! of NamedParameterSet's load by name.
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    fn(weight_);
    fn(bias_);
  }

 private:
  std::int64_t dim_;
  double eps_;
  Parameter<T> weight_, bias_;
};

}  // namespace dr2net
