#pragma once
//! \file
//! Linear<T>: a fully connected layer as PyTorch stores it, weight [out, in] and bias [out],
//! y = x W^T + b over rows of x, with its backward. GEMMs go through host_gemm.

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

#include "dr2net/backend/host/gemm.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/modules/parameter.hpp"

namespace dr2net {

//! A host fully connected layer y = x W^T + b in PyTorch's layout: weight [out, in] row-major,
//! bias [out], activations row-major [rows, features]. Owns both parameters and their
//! gradients (zero-initialised at construction); backward accumulates into the gradients.
//! Not thread-safe: concurrent backward calls on one layer race on the gradients.
//! \tparam T element type of parameters and activations (float or double).
template <class T>
class Linear {
 public:
  //! `name` is the layer's path ("attn.qkv"); its tensors are "<name>.weight", "<name>.bias".
  //! Throws dr2net::Error naming the layer when `in_features` or `out_features` is not
  //! positive, or when the parameter storage cannot be allocated.
  Linear(const std::string& name, std::int64_t in_features, std::int64_t out_features)
      : in_(in_features), out_(out_features), weight_(name + ".weight", weight_shape(name, in_features, out_features)),
        bias_(name + ".bias", Shape{out_features}) {}

  //! Input width: the elements per row of x (the columns of the weight).
  std::int64_t in_features() const noexcept { return in_; }
  //! Output width: the elements per row of y (the rows of the weight, the bias length).
  std::int64_t out_features() const noexcept { return out_; }
  //! The weight "<name>.weight", shape [out_features, in_features], with its gradient.
  Parameter<T>& weight() noexcept { return weight_; }
  //! The bias "<name>.bias", shape [out_features], with its gradient.
  Parameter<T>& bias() noexcept { return bias_; }
  //! Read-only access to the weight [out_features, in_features].
  const Parameter<T>& weight() const noexcept { return weight_; }
  //! Read-only access to the bias [out_features].
  const Parameter<T>& bias() const noexcept { return bias_; }

  //! timm's ViT initialisation: weight ~ trunc_normal(std 0.02), bias 0.
  void init(std::uint64_t seed, std::uint32_t tag, double std = 0.02) {
    weight_.fill_truncated_normal(std, 2.0, seed, tag);
    bias_.fill(T(0));
  }

  //! y[rows, out] = x[rows, in] W^T + b
  void forward(const T* x, std::int64_t rows, T* y) const { forward_add(x, rows, nullptr, T(0), y); }

  //! y = x W^T + b + scale * addend, the GEMM accumulating onto (b + scale * addend).
  //! `addend` [rows, out] may be y itself; scale == 0 never reads it.
  void forward_add(const T* x, std::int64_t rows, const T* addend, T scale, T* y) const {
    const T* b = bias_.data();
    for (std::int64_t r = 0; r < rows; ++r) {
      T* yr = y + r * out_;
      if (scale == T(0)) {
        std::copy(b, b + out_, yr);
      } else {
        const T* ar = addend + r * out_;
        for (std::int64_t j = 0; j < out_; ++j) yr[j] = scale * ar[j] + b[j];
      }
    }
    host_gemm<T>(Transpose::No, Transpose::Yes, rows, out_, in_, T(1), x, in_, weight_.data(), in_, T(1), y, out_);
  }

  //! Given x and dy = dL/dy: dW += dy^T x, db += sum over rows of dy, and (when dx is not
  //! null) dx = dy W, overwritten.
  void backward(const T* x, const T* dy, std::int64_t rows, T* dx) {
    host_gemm<T>(Transpose::Yes, Transpose::No, out_, in_, rows, T(1), dy, out_, x, in_, T(1), weight_.grad_data(),
                 in_);
    T* gb = bias_.grad_data();
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t j = 0; j < out_; ++j) gb[j] += dy[r * out_ + j];
    if (dx != nullptr)
      host_gemm<T>(Transpose::No, Transpose::No, rows, in_, out_, T(1), dy, out_, weight_.data(), in_, T(0), dx, in_);
  }

  //! fn(Parameter<T>&) for weight, then bias.
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    fn(weight_);
    fn(bias_);
  }

 private:
  //! [out, in], after checking both sizes (before any storage is allocated).
  static Shape weight_shape(const std::string& name, std::int64_t in_features, std::int64_t out_features) {
    DR2NET_CHECK(in_features > 0 && out_features > 0, "linear layer ", name, ": sizes must be positive, got in = ",
                 in_features, ", out = ", out_features);
    return Shape{out_features, in_features};
  }

  std::int64_t in_, out_;
  Parameter<T> weight_, bias_;
};

}  // namespace dr2net
