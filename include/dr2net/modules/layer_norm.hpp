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

template <class T>
class LayerNorm {
 public:
  //! `name` is the layer's path ("norm1"); its tensors are "<name>.weight", "<name>.bias".
  //! Initialised as PyTorch does: weight 1, bias 0.
  LayerNorm(const std::string& name, std::int64_t dim, double eps)
      : dim_(dim), eps_(eps), weight_(name + ".weight", Shape{dim}), bias_(name + ".bias", Shape{dim}) {
    DR2NET_CHECK(dim > 0, "layer norm ", name, ": width must be positive, got ", dim);
    DR2NET_CHECK(std::isfinite(eps) && eps > 0, "layer norm ", name, ": eps must be positive and finite, got ", eps);
    weight_.fill(T(1));
  }

  std::int64_t dim() const noexcept { return dim_; }
  double eps() const noexcept { return eps_; }
  Parameter<T>& weight() noexcept { return weight_; }
  Parameter<T>& bias() noexcept { return bias_; }
  const Parameter<T>& weight() const noexcept { return weight_; }
  const Parameter<T>& bias() const noexcept { return bias_; }

  //! y = (x - mean) * rstd * weight + bias per row; also writes mean[rows] and rstd[rows].
  void forward(const T* x, std::int64_t rows, T* y, T* mean, T* rstd) const {
    layer_norm_forward<T>(x, rows, dim_, weight_.data(), bias_.data(), static_cast<T>(eps_), y, mean, rstd);
  }

  //! dx += J^T dy; weight and bias gradients += their share.
  void backward(const T* x, const T* mean, const T* rstd, const T* dy, std::int64_t rows, T* dx) {
    layer_norm_backward<T>(x, mean, rstd, weight_.data(), dy, rows, dim_, dx, weight_.grad_data(), bias_.grad_data());
  }

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
