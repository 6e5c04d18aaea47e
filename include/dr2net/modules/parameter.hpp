#pragma once
//! \file
//! Parameter<T>: one named, owned weight tensor with its gradient, deterministic
//! initialisation from a seed, and a shape-checked load for checkpoint loaders.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numbers>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

#include "dr2net/block/residual_function.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/moved_from.hpp"
#include "dr2net/core/philox.hpp"
#include "dr2net/core/tensor.hpp"

namespace dr2net {

//! Mixes a seed with a salt (a layer index, say) into a new, well-spread seed (splitmix64).
constexpr std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t salt) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (salt + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

namespace detail {

//! The machine's physical memory in bytes, or 0 where the platform does not say.
inline std::size_t physical_memory_bytes() noexcept {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) {
    std::size_t r = 0;
    if (!__builtin_mul_overflow(static_cast<std::size_t>(pages), static_cast<std::size_t>(page), &r)) return r;
  }
#endif
  return 0;
}

//! Bytes of parameter and gradient storage (ParameterArray) the process holds now.
inline std::atomic<std::size_t>& live_parameter_bytes() noexcept {
  static std::atomic<std::size_t> bytes{0};
  return bytes;
}

//! A zero-filled host array of n elements of T for a parameter's value or gradient. The byte
//! count is computed in checked arithmetic and the memory comes from calloc, which hands out
//! zero pages without writing them, so a parameter too large for the machine fails at once,
//! before anything is touched, with an error naming the tensor, its bytes and the category
//! (never a bare std::bad_alloc); so does one that would take the parameter storage the
//! process holds beyond the machine's physical memory. Not metered: whoever owns the parameters records their
//! bytes once (a ReversibleStack, VitEmbedding, VitHead).
template <class T>
class ParameterArray {
  static_assert(std::is_trivially_copyable_v<T>, "parameters hold trivially copyable elements");

 public:
  ParameterArray() = default;
  ParameterArray(const std::string& tensor, const Shape& shape, MemoryCategory category) {
    const std::string what =
        std::string(category_name(category)) + " of tensor '" + tensor + "' of shape " + shape.str();
    const std::size_t bytes = checked::bytes(shape.numel(), sizeof(T), what.c_str());
    size_ = static_cast<std::size_t>(shape.numel());
    if (size_ == 0) return;
    // More than the machine's memory cannot be used even where the allocator would promise it
    // (and a sanitizer's allocator aborts on such a request instead of returning null).
    const std::size_t physical = physical_memory_bytes();
    DR2NET_CHECK(physical == 0 || bytes <= physical, "host out of memory: ", what, " needs ", bytes, " bytes (",
                 MemoryMeter::human_bytes(bytes), "), more than the machine's ", physical, " bytes (",
                 MemoryMeter::human_bytes(physical), ") of physical memory");
    hold(bytes, physical, what.c_str());
    data_ = std::unique_ptr<T, Free>(static_cast<T*>(std::calloc(size_, sizeof(T))), Free{bytes});
    if (data_ == nullptr) {
      live_parameter_bytes() -= bytes;
      DR2NET_FAIL("host out of memory allocating ", bytes, " bytes (", MemoryMeter::human_bytes(bytes), ") of ", what);
    }
  }
  //! A copy of the elements (layers are copied when a stack is built from a kept vector).
  ParameterArray(const ParameterArray& o) : size_(o.size_) {
    if (size_ == 0) return;
    const std::size_t bytes = size_ * sizeof(T);  // checked when o was made
    hold(bytes, physical_memory_bytes(), "a copy of a parameter");
    data_ = std::unique_ptr<T, Free>(static_cast<T*>(std::malloc(bytes)), Free{bytes});
    if (data_ == nullptr) {
      live_parameter_bytes() -= bytes;
      DR2NET_FAIL("host out of memory copying a parameter of ", bytes, " bytes");
    }
    std::memcpy(data_.get(), o.data_.get(), size_ * sizeof(T));
  }
  ParameterArray& operator=(const ParameterArray& o) {
    if (this != &o) {
      ParameterArray copy(o);
      *this = std::move(copy);
    }
    return *this;
  }
  ParameterArray(ParameterArray&& o) noexcept : data_(std::move(o.data_)), size_(std::exchange(o.size_, 0)) {}
  ParameterArray& operator=(ParameterArray&& o) noexcept {
    data_ = std::move(o.data_);
    size_ = std::exchange(o.size_, 0);
    return *this;
  }
  ~ParameterArray() = default;

  T* data() const noexcept { return data_.get(); }
  std::size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }
  T& operator[](std::size_t i) const noexcept { return data_.get()[i]; }
  T* begin() const noexcept { return data_.get(); }
  T* end() const noexcept { return data_.get() + size_; }

 private:
  // Adds `bytes` to the parameter storage the process holds, refusing (and naming `what`) when
  // the total would exceed the machine's memory: each tensor may fit while the model does not,
  // and calloc's untouched pages would otherwise let the process be killed when they are filled.
  static void hold(std::size_t bytes, std::size_t physical, const char* what) {
    const std::size_t before = live_parameter_bytes().fetch_add(bytes);
    if (physical != 0 && (before > physical || bytes > physical - before)) {
      live_parameter_bytes() -= bytes;
      DR2NET_FAIL("host out of memory: ", what, " needs ", bytes, " bytes (", MemoryMeter::human_bytes(bytes),
                  ") while parameters and gradients already hold ", before, " bytes (",
                  MemoryMeter::human_bytes(before), ") of the machine's ", physical, " bytes (",
                  MemoryMeter::human_bytes(physical), ") of physical memory");
    }
  }
  struct Free {
    std::size_t bytes = 0;
    void operator()(T* p) const noexcept {
      live_parameter_bytes() -= bytes;
      std::free(p);
    }
  };
  std::unique_ptr<T, Free> data_;
  std::size_t size_ = 0;
};

}  // namespace detail

//! A named tensor of weights and the same-shaped gradient, both owned and zero (see
//! detail::ParameterArray: checked, failing with a named error, not metered). Movable; a
//! moved-from parameter refuses every access to its data.
template <class T>
class Parameter {
 public:
  //! Tensor `name` (its checkpoint name, e.g. "attn.qkv.weight") of shape `shape`, value and
  //! gradient both zero-filled host arrays. Throws dr2net::Error naming the tensor, its shape and
  //! bytes when the byte count overflows or the memory cannot be had (more than the machine's
  //! physical memory, or the allocation fails).
  Parameter(std::string name, Shape shape)
      : name_(std::move(name)), shape_(shape), value_(name_, shape_, MemoryCategory::Parameters),
        grad_(name_, shape_, MemoryCategory::Gradients) {}

  //! The tensor's name, as given at construction and as checkpoints and load() use it.
  const std::string& name() const noexcept { return name_; }
  //! Shape of the value and of the gradient.
  const Shape& shape() const noexcept { return shape_; }
  //! Elements of the value (the gradient holds as many); 0 once moved from.
  std::size_t size() const noexcept { return value_.size(); }
  //! Bytes of the value (the gradient holds as many).
  std::size_t bytes() const noexcept { return value_.size() * sizeof(T); }

  //! Contiguous, writable view of the weights (host memory). Throws dr2net::Error on a moved-from
  //! parameter, as do all the accessors below.
  TensorView<T> value() { return TensorView<T>(live("value()").data(), shape_); }
  //! Contiguous, writable view of the gradient, which backward passes accumulate into (+=); the
  //! owner zeroes it between steps (the stack's or AdamW's zero_grad()).
  TensorView<T> grad() { return TensorView<T>(live_grad("grad()").data(), shape_); }
  //! Read-only view of the weights.
  ConstView<T> value() const { return ConstView<T>(live("value()").data(), shape_); }
  //! Read-only view of the gradient.
  ConstView<T> grad() const { return ConstView<T>(live_grad("grad()").data(), shape_); }
  //! The weights as a flat row-major array of size() elements (what the kernels read).
  const T* data() const { return live("data()").data(); }
  //! The gradient as a flat row-major array of size() elements (what the kernels accumulate into).
  T* grad_data() { return live_grad("grad_data()").data(); }

  //! Sets every weight to `v` (LayerNorm's weight 1 and bias 0, say); the gradient is untouched.
  void fill(T v) {
    live("fill()");
    std::fill(value_.begin(), value_.end(), v);
  }

  //! Normal(0, std) values, redrawn while |value| > bound: timm's trunc_normal_(std, a=-bound,
  //! b=bound) (timm uses std 0.02 with bound 2, i.e. an essentially untruncated normal).
  //! Deterministic in (seed, tag) on every platform: Philox uniforms, Box-Muller by hand.
  void fill_truncated_normal(double std, double bound, std::uint64_t seed, std::uint32_t tag) {
    DR2NET_CHECK(std > 0 && bound > 0, "parameter ", name_, ": truncated normal needs std > 0 and bound > 0, got ",
                 std, " and ", bound);
    DR2NET_CHECK(tag <= kMaxRandomModule, "parameter ", name_, ": initialisation tag ", tag, " is too large");
    live("fill_truncated_normal()");
    const PhiloxStream s = make_philox_stream(seed, 0, tag, RandomPurpose::Init);
    for (std::size_t i = 0; i < value_.size(); ++i) {
      double v = 0;
      // Attempt a uses counter groups a * 2^40 + i, disjoint from every other element's.
      for (std::uint64_t attempt = 0;; ++attempt) {
        const PhiloxBlock b = s.block((attempt << 40) | static_cast<std::uint64_t>(i));
        const double u1 = uniform53_from_bits(b.v[0], b.v[1]), u2 = uniform53_from_bits(b.v[2], b.v[3]);
        v = std * std::sqrt(-2.0 * std::log1p(-u1)) * std::cos(2.0 * std::numbers::pi * u2);
        if (std::abs(v) <= bound) break;
      }
      value_[i] = static_cast<T>(v);
    }
  }

  //! Copies `data` (converted to T) into the value after checking its shape; `owner` names
  //! the module in the error message.
  template <class U>
  void load(const U* data, const Shape& given, std::string_view owner) {
    live("load()");
    DR2NET_CHECK(given == shape_, owner, ": tensor '", name_, "' expects shape ", shape_, " but was given ", given);
    DR2NET_CHECK(data != nullptr || value_.empty(), owner, ": tensor '", name_, "' was given null data");
    for (std::size_t i = 0; i < value_.size(); ++i) value_[i] = static_cast<T>(data[i]);
  }

  //! visit(name, value, grad) as the residual-function concept wants it.
  template <class V>
  void visit(V& v) {
    v(std::string_view(name_), value(), grad());
  }

 private:
  //! The value array, after refusing a moved-from parameter; `call` names the member.
  const detail::ParameterArray<T>& live(const char* call) const {
    if (moved_.moved_from()) {  // (its name went with the move)
      const std::string what = std::string("Parameter::") + call;
      moved_.check(what.c_str());
    }
    return value_;
  }
  const detail::ParameterArray<T>& live_grad(const char* call) const {
    live(call);
    return grad_;
  }

  std::string name_;
  Shape shape_;
  detail::ParameterArray<T> value_, grad_;
  MovedFromGuard moved_;
};

class HostContext;  // backend/host/context.hpp

//! The parameter type of backend Ctx for elements of T: Parameter<T> on HostContext,
//! DeviceParameter<T> on CudaContext (modules/cuda/parameter.cuh). Residual functions written
//! once over the backend (Linear, LayerNorm, VitAttention, VitMlp) hold their tensors as
//! parameter_t<T, Ctx>.
template <class T, class Ctx>
struct parameter_of;
//! The host's parameters: Parameter<T>.
template <class T>
struct parameter_of<T, HostContext> {
  using type = Parameter<T>;  //!< Host memory, named, with a same-shaped gradient.
  //! Constructs the tensor `name` of `shape` (the host needs no context).
  static type make(HostContext*, std::string name, const Shape& shape) { return type(std::move(name), shape); }
};
//! parameter_of<T, Ctx>::type.
template <class T, class Ctx>
using parameter_t = typename parameter_of<T, Ctx>::type;

//! Whether backend context Ctx works on host memory (its views are HostSpace views).
template <class Ctx>
inline constexpr bool is_host_context_v = std::is_same_v<typename detail::space_of_context<Ctx>::type, HostSpace>;

namespace detail {

//! Finds parameter `name` among those `function.for_each_parameter_object` lists and loads it;
//! unknown names raise an error listing the names the function has.
template <class Module, class U>
void load_named_parameter(Module& function, std::string_view owner, std::string_view name, const U* data,
                          const Shape& shape) {
  bool found = false;
  std::string known;
  function.for_each_parameter_object([&](auto& p) {
    if (p.name() == name) {
      p.load(data, shape, owner);
      found = true;
    }
    known += (known.empty() ? "" : ", ") + p.name();
  });
  DR2NET_CHECK(found, owner, " has no tensor '", name, "' (its tensors: ", known, ")");
}

}  // namespace detail

//! Base of residual functions whose parameters are Parameter-like objects (host Parameter<T>
//! or a device twin) listed in order by Derived::for_each_parameter_object(fn). Provides the
//! concept's for_each_parameter and a load by name that checks names and shapes; Derived
//! names itself for error messages with `static constexpr std::string_view type_name`.
template <class Derived>
class NamedParameterSet {
 public:
  //! visit(name, value, grad) for every parameter, in for_each_parameter_object's order.
  template <class V>
  void for_each_parameter(V&& visit) {
    self().for_each_parameter_object([&](auto& p) { p.visit(visit); });
  }

  //! Sets tensor `name` (a timm name, e.g. "attn.qkv.weight") from host `data` of shape
  //! `shape`, converting U to the parameter type. Throws on an unknown name or a wrong shape,
  //! naming the tensor.
  template <class U>
  void load(std::string_view name, const U* data, const Shape& shape) {
    detail::load_named_parameter(self(), Derived::type_name, name, data, shape);
  }

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
};

}  // namespace dr2net
