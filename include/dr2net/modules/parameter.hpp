#pragma once
//! \file
//! Parameter<T>: one named, owned weight tensor with its gradient, deterministic
//! initialisation from a seed, and a shape-checked load for checkpoint loaders.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numbers>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dr2net/core/error.hpp"
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

//! A named tensor of weights and the same-shaped gradient, both owned (std::vector).
template <class T>
class Parameter {
 public:
  Parameter(std::string name, Shape shape)
      : name_(std::move(name)), shape_(shape), value_(static_cast<std::size_t>(shape.numel()), T(0)),
        grad_(value_.size(), T(0)) {}

  const std::string& name() const noexcept { return name_; }
  const Shape& shape() const noexcept { return shape_; }
  std::size_t size() const noexcept { return value_.size(); }

  TensorView<T> value() noexcept { return TensorView<T>(value_.data(), shape_); }
  TensorView<T> grad() noexcept { return TensorView<T>(grad_.data(), shape_); }
  ConstView<T> value() const noexcept { return ConstView<T>(value_.data(), shape_); }
  ConstView<T> grad() const noexcept { return ConstView<T>(grad_.data(), shape_); }
  const T* data() const noexcept { return value_.data(); }
  T* grad_data() noexcept { return grad_.data(); }

  void fill(T v) { std::fill(value_.begin(), value_.end(), v); }

  //! Normal(0, std) values, redrawn while |value| > bound: timm's trunc_normal_(std, a=-bound,
  //! b=bound) (timm uses std 0.02 with bound 2, i.e. an essentially untruncated normal).
  //! Deterministic in (seed, tag) on every platform: Philox uniforms, Box-Muller by hand.
  void fill_truncated_normal(double std, double bound, std::uint64_t seed, std::uint32_t tag) {
    DR2NET_CHECK(std > 0 && bound > 0, "parameter ", name_, ": truncated normal needs std > 0 and bound > 0, got ",
                 std, " and ", bound);
    DR2NET_CHECK(tag <= kMaxRandomModule, "parameter ", name_, ": initialisation tag ", tag, " is too large");
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
  std::string name_;
  Shape shape_;
  std::vector<T> value_, grad_;
};

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
