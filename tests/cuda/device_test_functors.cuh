#pragma once
// Device twins of tests/support/test_functors.hpp (TanhLinear, SineGate): the same math with
// plain one-thread-per-output kernels, computing in float whatever T stores, so a whole
// ReversibleStack can run on the device and be compared with the host stack. Deterministic:
// every sum is taken by one thread in a fixed order (no atomics).
// Parameters are DeviceParameters, as the library's device functions hold theirs: value and
// gradient come from unmetered memory, because the ReversibleStack that owns the function
// records every parameter's bytes once (Parameters, Gradients) from for_each_parameter.

#include <cuda_runtime.h>

#include <cstdint>
#include <string_view>
#include <vector>

#include "dr2net/backend/cuda/cuda.cuh"
#include "dr2net/block/residual_function.hpp"
#include "dr2net/modules/cuda/parameter.cuh"

namespace dr2net::testing {

namespace device_functor_kernels {

inline unsigned blocks_for(std::size_t n) { return static_cast<unsigned>((n + 127) / 128); }

template <class T>
__global__ void tanh_linear_forward(const T* x, const T* w, const T* b, T* out, T* saved, std::int64_t rows,
                                    std::int64_t d) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * d) return;
  const std::int64_t r = i / d, j = i % d;
  float acc = static_cast<float>(b[j]);
  for (std::int64_t k = 0; k < d; ++k) acc += static_cast<float>(x[r * d + k]) * static_cast<float>(w[j * d + k]);
  const float t = tanhf(acc);
  out[i] = static_cast<T>(t);
  saved[i] = static_cast<T>(t);
}

//! gp = gout * (1 - t^2)   (t = tanh output saved by the forward)
template <class T>
__global__ void tanh_grad(const T* saved, const T* gout, float* gp, std::int64_t n) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float t = static_cast<float>(saved[i]);
  gp[i] = static_cast<float>(gout[i]) * (1.0f - t * t);
}

//! gin[r,k] += sum_j gp[r,j] w[j,k]
template <class T>
__global__ void linear_grad_input(const float* gp, const T* w, T* gin, std::int64_t rows, std::int64_t d) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * d) return;
  const std::int64_t r = i / d, k = i % d;
  float acc = static_cast<float>(gin[i]);
  for (std::int64_t j = 0; j < d; ++j) acc += gp[r * d + j] * static_cast<float>(w[j * d + k]);
  gin[i] = static_cast<T>(acc);
}

//! gw[j,k] += sum_r gp[r,j] x[r,k];  gb[j] += sum_r gp[r,j] (threads k == d do the bias)
template <class T>
__global__ void linear_grad_params(const float* gp, const T* x, T* gw, T* gb, std::int64_t rows, std::int64_t d) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= d * (d + 1)) return;
  const std::int64_t j = i / (d + 1), k = i % (d + 1);
  float acc = 0;
  for (std::int64_t r = 0; r < rows; ++r) acc += gp[r * d + j] * (k == d ? 1.0f : static_cast<float>(x[r * d + k]));
  if (k == d) gb[j] = static_cast<T>(static_cast<float>(gb[j]) + acc);
  else gw[j * d + k] = static_cast<T>(static_cast<float>(gw[j * d + k]) + acc);
}

template <class T>
__global__ void sine_forward(const T* x, const T* a, const T* c, T* out, std::int64_t n, std::int64_t d) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const std::int64_t j = i % d;
  out[i] = static_cast<T>(static_cast<float>(a[j]) * sinf(static_cast<float>(x[i]) + static_cast<float>(c[j])));
}

template <class T>
__global__ void sine_grad_input(const T* x, const T* a, const T* c, const T* g, T* gin, std::int64_t n,
                                std::int64_t d) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const std::int64_t j = i % d;
  const float cs = cosf(static_cast<float>(x[i]) + static_cast<float>(c[j]));
  gin[i] = static_cast<T>(static_cast<float>(gin[i]) + static_cast<float>(g[i]) * static_cast<float>(a[j]) * cs);
}

template <class T>
__global__ void sine_grad_params(const T* x, const T* a, const T* c, const T* g, T* ga, T* gc, std::int64_t rows,
                                 std::int64_t d) {
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) return;
  float sa = 0, sc = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    const float u = static_cast<float>(x[r * d + j]) + static_cast<float>(c[j]);
    const float gv = static_cast<float>(g[r * d + j]);
    sa += gv * sinf(u);
    sc += gv * static_cast<float>(a[j]) * cosf(u);
  }
  ga[j] = static_cast<T>(static_cast<float>(ga[j]) + sa);
  gc[j] = static_cast<T>(static_cast<float>(gc[j]) + sc);
}

}  // namespace device_functor_kernels

//! F(x) = tanh(x W^T + b) on the device.
template <class T>
class DeviceTanhLinear {
 public:
  using value_type = T;
  using context_type = CudaContext;

  //! Zero weights and bias (and gradients) of a width x width layer; load them with
  //! for_each_parameter.
  DeviceTanhLinear(CudaContext& ctx, std::int64_t width)
      : d_(width), w_(ctx, "weight", Shape{width, width}), b_(ctx, "bias", Shape{width}) {}

  std::size_t saved_elements(const Shape& s) const {
    DR2NET_CHECK(s.last() == d_, "DeviceTanhLinear: input width ", s.last(), " does not match ", d_);
    return static_cast<std::size_t>(s.numel());
  }
  void forward(const ModuleCall<CudaContext>& call, ConstDeviceView<T> in, DeviceView<T> out, DeviceView<T> scratch) {
    recompute(call, in, out, scratch);
  }
  void recompute(const ModuleCall<CudaContext>& call, ConstDeviceView<T> in, DeviceView<T> out, DeviceView<T> saved) {
    const std::int64_t rows = in.shape().rows();
    device_functor_kernels::tanh_linear_forward<<<device_functor_kernels::blocks_for(in.size()), 128, 0,
                                                  call.context.stream()>>>(in.data(), w_.data(), b_.data(), out.data(),
                                                                           saved.data(), rows, d_);
    DR2NET_CUDA_CHECK_LAUNCH("tanh_linear_forward");
  }
  void backward(const ModuleCall<CudaContext>& call, ConstDeviceView<T> in, ConstDeviceView<T> saved, ConstDeviceView<T> gout,
                DeviceView<T> gin) {
    using namespace device_functor_kernels;
    CudaContext& ctx = call.context;
    const std::int64_t rows = in.shape().rows();
    const auto n = static_cast<std::int64_t>(in.size());
    auto gp = ctx.allocate<float>(in.size(), MemoryCategory::Scratch);
    tanh_grad<<<blocks_for(in.size()), 128, 0, ctx.stream()>>>(saved.data(), gout.data(), gp.data(), n);
    linear_grad_input<<<blocks_for(in.size()), 128, 0, ctx.stream()>>>(gp.data(), w_.data(), gin.data(), rows, d_);
    linear_grad_params<<<blocks_for(static_cast<std::size_t>(d_ * (d_ + 1))), 128, 0, ctx.stream()>>>(
        gp.data(), in.data(), w_.grad_data(), b_.grad_data(), rows, d_);
    DR2NET_CUDA_CHECK_LAUNCH("tanh_linear backward");
  }
  template <class V>
  void for_each_parameter(V&& visit) {
    visit("weight", w_.value(), w_.grad());
    visit("bias", b_.value(), b_.grad());
  }

 private:
  std::int64_t d_;
  DeviceParameter<T> w_, b_;  // each with its gradient
};

//! G(x)_j = a_j sin(x_j + c_j) on the device.
template <class T>
class DeviceSineGate {
 public:
  using value_type = T;
  using context_type = CudaContext;
  static constexpr std::string_view parameter_prefix = "gate";

  //! Zero amplitudes and phases (and gradients) of width `width`.
  DeviceSineGate(CudaContext& ctx, std::int64_t width)
      : d_(width), a_(ctx, "amplitude", Shape{width}), c_(ctx, "phase", Shape{width}) {}

  std::size_t saved_elements(const Shape& s) const {
    DR2NET_CHECK(s.last() == d_, "DeviceSineGate: input width ", s.last(), " does not match ", d_);
    return 0;
  }
  void forward(const ModuleCall<CudaContext>& call, ConstDeviceView<T> in, DeviceView<T> out, DeviceView<T>) {
    device_functor_kernels::sine_forward<<<device_functor_kernels::blocks_for(in.size()), 128, 0,
                                           call.context.stream()>>>(in.data(), a_.data(), c_.data(), out.data(),
                                                                    static_cast<std::int64_t>(in.size()), d_);
    DR2NET_CUDA_CHECK_LAUNCH("sine_forward");
  }
  void recompute(const ModuleCall<CudaContext>& call, ConstDeviceView<T> in, DeviceView<T> out, DeviceView<T> saved) {
    forward(call, in, out, saved);
  }
  void backward(const ModuleCall<CudaContext>& call, ConstDeviceView<T> in, ConstDeviceView<T>, ConstDeviceView<T> gout,
                DeviceView<T> gin) {
    using namespace device_functor_kernels;
    cudaStream_t s = call.context.stream();
    const auto n = static_cast<std::int64_t>(in.size());
    sine_grad_input<<<blocks_for(in.size()), 128, 0, s>>>(in.data(), a_.data(), c_.data(), gout.data(), gin.data(), n, d_);
    sine_grad_params<<<blocks_for(static_cast<std::size_t>(d_)), 128, 0, s>>>(in.data(), a_.data(), c_.data(),
                                                                            gout.data(), a_.grad_data(),
                                                                            c_.grad_data(), in.shape().rows(), d_);
    DR2NET_CUDA_CHECK_LAUNCH("sine backward");
  }
  template <class V>
  void for_each_parameter(V&& visit) {
    visit("amplitude", a_.value(), a_.grad());
    visit("phase", c_.value(), c_.grad());
  }

 private:
  std::int64_t d_;
  DeviceParameter<T> a_, c_;  // each with its gradient
};

}  // namespace dr2net::testing
