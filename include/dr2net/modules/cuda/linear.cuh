#pragma once
//! \file
//! CudaLinear<T>: the device twin of modules/linear.hpp's Linear<T>, weight [out, in] and bias
//! [out] in device memory, y = x W^T + b over rows of x, through cuBLASLt with the bias epilogue.
//!
//!   forward:  y = x W^T + b (+ s * addend)       (one cublasLtMatmul, BIAS epilogue)
//!   backward: dW += dy^T x                        (GEMM, beta = 1)
//!             db += sum over rows of dy           (column_sums, fp32)
//!             dx = dy W  (or += with beta = 1)    (GEMM)

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cstdint>
#include <string>
#include <string_view>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/modules/cuda/column_sum.cuh"
#include "dr2net/modules/cuda/gemm.cuh"
#include "dr2net/modules/cuda/parameter.cuh"
#include "dr2net/modules/linear.hpp"

namespace dr2net {

//! The device fully connected layer, y = x W^T + b in PyTorch's layout: weight [out, in] and
//! bias [out] in device memory (DeviceParameter, with same-shaped gradients), activations
//! row-major [rows, features] at device pointers. Every call only enqueues work on the
//! context's stream (no host synchronisation): results and gradients are ready when that
//! stream is, and a caller on another stream must order itself after it. Not thread-safe.
//! \tparam T compute type: double, float, __nv_bfloat16 or __half.
template <class T>
class CudaLinear {
 public:
  //! Accumulation and scalar type: float for float/bf16/fp16, double for double (`scale`,
  //! `dx_beta` and the GEMMs' alpha/beta are of this type).
  using A = cuda_detail::acc_t<T>;
  //! `name` is the layer's path ("attn.qkv"); its tensors are "<name>.weight", "<name>.bias",
  //! both zero until loaded. allow_tf32: float GEMMs may use TF32 tensor cores.
  //! Throws dr2net::Error naming the layer when a size is not positive, or naming the tensor
  //! when its device memory cannot be allocated.
  CudaLinear(CudaContext& ctx, const std::string& name, std::int64_t in_features, std::int64_t out_features,
             bool allow_tf32 = false)
      : in_(in_features), out_(out_features), tf32_(allow_tf32),
        weight_(ctx, name + ".weight", Shape{out_features, in_features}), bias_(ctx, name + ".bias", Shape{out_features}) {
    DR2NET_CHECK(in_features > 0 && out_features > 0, "linear layer ", name, ": sizes must be positive, got in = ",
                 in_features, ", out = ", out_features);
  }

  //! The same tensors as a host Linear (converted to T).
  template <class U>
  void copy_from(const Linear<U>& host, std::string_view owner) {
    weight_.load(host.weight().data(), host.weight().shape(), owner);
    bias_.load(host.bias().data(), host.bias().shape(), owner);
  }

  //! Input width: the elements per row of x (the columns of the weight).
  std::int64_t in_features() const noexcept { return in_; }
  //! Output width: the elements per row of y (the rows of the weight, the bias length).
  std::int64_t out_features() const noexcept { return out_; }
  //! The weight "<name>.weight" [out_features, in_features] and its gradient, in device memory.
  DeviceParameter<T>& weight() noexcept { return weight_; }
  //! The bias "<name>.bias" [out_features] and its gradient, in device memory.
  DeviceParameter<T>& bias() noexcept { return bias_; }

  //! y[rows, out] = x[rows, in] W^T + b (device pointers).
  void forward(CudaContext& ctx, const T* x, std::int64_t rows, T* y) const {
    forward_add(ctx, x, rows, nullptr, A(0), y);
  }

  //! y = x W^T + b + scale * addend in one GEMM (beta = scale, C = addend, D = y); addend
  //! [rows, out] may be y itself; scale == 0 never reads it.
  void forward_add(CudaContext& ctx, const T* x, std::int64_t rows, const T* addend, A scale, T* y) const {
    device_gemm_into<T>(ctx, Transpose::No, Transpose::Yes, rows, out_, in_, A(1), x, in_, weight_.data(), in_, scale,
                        scale == A(0) ? y : addend, y, out_, bias_.data(), tf32_);
  }

  //! Given x and dy = dL/dy: dW += dy^T x, db += sum over rows of dy, and (when dx is not
  //! null) dx = dy W + dx_beta * dx (dx_beta = 0: overwritten, as the host Linear).
  void backward(CudaContext& ctx, const T* x, const T* dy, std::int64_t rows, T* dx, A dx_beta = A(0)) {
    device_gemm<T>(ctx, Transpose::Yes, Transpose::No, out_, in_, rows, A(1), dy, out_, x, in_, A(1),
                   weight_.grad_data(), in_, nullptr, tf32_);
    column_sums<T>(ctx, rows, out_, cuda_detail::ColumnOf<T>{dy, out_}, bias_.grad_data());
    if (dx != nullptr)
      device_gemm<T>(ctx, Transpose::No, Transpose::No, rows, in_, out_, A(1), dy, out_, weight_.data(), in_, dx_beta,
                     dx, in_, nullptr, tf32_);
  }

  //! fn(DeviceParameter<T>&) for weight, then bias (the order checkpoints and optimizers see).
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    fn(weight_);
    fn(bias_);
  }

 private:
  std::int64_t in_, out_;
  bool tf32_;
  DeviceParameter<T> weight_, bias_;
};

}  // namespace dr2net
