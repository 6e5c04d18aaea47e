#pragma once
//! \file
//! DeviceParameter<T>: one named weight tensor and its gradient in DEVICE memory, the device
//! twin of modules/parameter.hpp's Parameter<T>. visit() hands out views of device memory:
//! optimizers and checkpoint code that dereference them on the host must copy first
//! (copy_to_host / to_host, backend/cuda/copy.hpp).
//!
//! Both buffers are metered as MemoryCategory::Other, not Parameters/Gradients: a
//! ReversibleStack records its parameters' and gradients' bytes itself from the parameter
//! enumeration, so metering them here too would count every byte twice.

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/copy.hpp"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/modules/cuda/types.cuh"

namespace dr2net {

template <class T>
class DeviceParameter {
 public:
  //! Value and gradient of `shape`, both zero.
  DeviceParameter(CudaContext& ctx, std::string name, Shape shape)
      : ctx_(&ctx), name_(std::move(name)), shape_(shape),
        value_(ctx.allocate<T>(static_cast<std::size_t>(shape.numel()), MemoryCategory::Other)),
        grad_(ctx.allocate<T>(value_.size(), MemoryCategory::Other)) {
    if (!value_.empty()) {
      DR2NET_CUDA_CHECK(cudaMemsetAsync(value_.data(), 0, value_.size() * sizeof(T), ctx.stream()));
      DR2NET_CUDA_CHECK(cudaMemsetAsync(grad_.data(), 0, grad_.size() * sizeof(T), ctx.stream()));
    }
  }

  const std::string& name() const noexcept { return name_; }
  const Shape& shape() const noexcept { return shape_; }
  std::size_t size() const noexcept { return value_.size(); }
  //! Device pointers.
  const T* data() const noexcept { return value_.data(); }
  T* grad_data() noexcept { return grad_.data(); }
  TensorView<T> value() noexcept { return TensorView<T>(value_.data(), shape_); }
  TensorView<T> grad() noexcept { return TensorView<T>(grad_.data(), shape_); }

  //! Copies host `data` (converted to T) into the value after checking its shape; `owner`
  //! names the module in the error message. Waits for the copy.
  template <class U>
  void load(const U* data, const Shape& given, std::string_view owner) {
    DR2NET_CHECK(given == shape_, owner, ": tensor '", name_, "' expects shape ", shape_, " but was given ", given);
    DR2NET_CHECK(data != nullptr || value_.empty(), owner, ": tensor '", name_, "' was given null data");
    std::vector<T> converted(value_.size());
    for (std::size_t i = 0; i < converted.size(); ++i) {
      if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) converted[i] = static_cast<T>(data[i]);
      else converted[i] = T(static_cast<float>(data[i]));
    }
    copy_to_device(*ctx_, value_.data(), converted.data(), converted.size());
  }

  //! visit(name, value, grad) with views of device memory.
  template <class V>
  void visit(V& v) {
    v(std::string_view(name_), value(), grad());
  }

 private:
  CudaContext* ctx_;
  std::string name_;
  Shape shape_;
  DeviceBuffer<T> value_, grad_;
};

}  // namespace dr2net
