#pragma once
//! \file
//! DeviceParameter<T>: one named weight tensor and its gradient in DEVICE memory, the device
//! twin of modules/parameter.hpp's Parameter<T>. visit() hands out views of device memory:
//! optimizers and checkpoint code that dereference them on the host must copy first
//! (copy_to_host / to_host, backend/cuda/copy.hpp).
//!
//! Both buffers come from CudaContext::allocate_unmetered: a ReversibleStack records its
//! parameters' and gradients' bytes once, as Parameters and Gradients, from the parameter
//! enumeration, so metering them here too would count every byte twice. Their byte counts are
//! checked, and an out-of-memory error names the tensor, its bytes and the category. A
//! moved-from DeviceParameter refuses every access to its data.

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
#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/moved_from.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/modules/cuda/types.cuh"
#include "dr2net/modules/parameter.hpp"

namespace dr2net {

//! A named weight tensor of T (double, float, or the 16-bit types of types.cuh) and its gradient,
//! both in device memory of one CudaContext, which must outlive it. Move-only. All its work
//! (zero-fill, load) is queued on the context's stream.
template <class T>
class DeviceParameter {
 public:
  //! Tensor `name` of `shape` on `ctx`, value and gradient both zero (zero-filled with
  //! cudaMemsetAsync on the context's stream, so the zeros are in place for any work queued after
  //! it). Throws dr2net::Error naming the tensor, its bytes and the category when the byte count
  //! overflows or the device is out of memory.
  DeviceParameter(CudaContext& ctx, std::string name, Shape shape)
      : ctx_(&ctx), name_(std::move(name)), shape_(shape),
        value_(allocate(ctx, name_, shape_, MemoryCategory::Parameters)),
        grad_(allocate(ctx, name_, shape_, MemoryCategory::Gradients)) {
    if (!value_.empty()) {
      DR2NET_CUDA_CHECK(cudaMemsetAsync(value_.data(), 0, value_.size() * sizeof(T), ctx.stream()));
      DR2NET_CUDA_CHECK(cudaMemsetAsync(grad_.data(), 0, grad_.size() * sizeof(T), ctx.stream()));
    }
  }

  //! The tensor's name, as given at construction and as checkpoints and load() use it.
  const std::string& name() const noexcept { return name_; }
  //! Shape of the value and of the gradient.
  const Shape& shape() const noexcept { return shape_; }
  //! Elements of the value (the gradient holds as many); 0 once moved from.
  std::size_t size() const noexcept { return value_.size(); }
  //! Bytes of the value (the gradient holds as many).
  std::size_t bytes() const noexcept { return value_.size() * sizeof(T); }
  //! Device pointer to the weights, a flat row-major array of size() elements. Throws
  //! dr2net::Error on a moved-from parameter, as do the accessors below.
  const T* data() const { return live("data()").data(); }
  //! Device pointer to the gradient, which backward kernels accumulate into (+=).
  T* grad_data() { return live_grad("grad_data()").data(); }
  //! Contiguous view of the weights in device memory (not dereferenceable on the host).
  DeviceView<T> value() { return DeviceView<T>(live("value()").data(), shape_); }
  //! Contiguous view of the gradient in device memory (not dereferenceable on the host).
  DeviceView<T> grad() { return DeviceView<T>(live_grad("grad()").data(), shape_); }

  //! Copies host `data` (converted to T) into the value after checking its shape; `owner`
  //! names the module in the error message. Waits for the copy.
  template <class U>
  void load(const U* data, const Shape& given, std::string_view owner) {
    live("load()");
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
  static DeviceBuffer<T> allocate(CudaContext& ctx, const std::string& name, const Shape& shape, MemoryCategory c) {
    const std::string what = std::string(category_name(c)) + " of tensor '" + name + "' of shape " + shape.str();
    return ctx.allocate_unmetered<T>(checked::to_size(shape.numel(), what.c_str()), c, what.c_str());
  }
  const DeviceBuffer<T>& live(const char* call) const {
    if (moved_.moved_from()) {  // (its name went with the move)
      const std::string what = std::string("DeviceParameter::") + call;
      moved_.check(what.c_str());
    }
    return value_;
  }
  const DeviceBuffer<T>& live_grad(const char* call) const {
    live(call);
    return grad_;
  }

  CudaContext* ctx_;
  std::string name_;
  Shape shape_;
  DeviceBuffer<T> value_, grad_;
  MovedFromGuard moved_;
};

//! The CUDA backend's parameters: DeviceParameter<T>.
template <class T>
struct parameter_of<T, CudaContext> {
  using type = DeviceParameter<T>;  //!< Device memory, named, with a same-shaped gradient.
  //! Constructs the tensor `name` of `shape` on `*ctx` (zero-filled).
  static type make(CudaContext* ctx, std::string name, const Shape& shape) { return type(*ctx, std::move(name), shape); }
};

}  // namespace dr2net
