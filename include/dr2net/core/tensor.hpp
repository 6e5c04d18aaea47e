#pragma once
//! \file
//! Shapes and non-owning tensor views, checked at the API boundary.

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <span>
#include <string>
#include <type_traits>

#include "dr2net/core/error.hpp"

namespace dr2net {

//! Largest rank a view carries; streams are [batch, tokens, width].
inline constexpr int kMaxRank = 4;

//! Dimensions of a tensor of rank 0..kMaxRank; every dimension is >= 0.
class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims) { assign(dims.begin(), dims.size()); }
  explicit Shape(std::span<const std::int64_t> dims) { assign(dims.data(), dims.size()); }

  int rank() const noexcept { return rank_; }
  std::int64_t operator[](int i) const {
    DR2NET_CHECK(i >= 0 && i < rank_, "dimension ", i, " out of range for shape ", str());
    return dims_[static_cast<std::size_t>(i)];
  }
  //! Number of elements (1 for rank 0).
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[static_cast<std::size_t>(i)];
    return n;
  }
  //! Size of the last dimension: the feature width D of a stream [B, N, D].
  std::int64_t last() const { return rank_ == 0 ? 1 : dims_[static_cast<std::size_t>(rank_ - 1)]; }
  //! Product of every dimension but the last: the number of token rows.
  std::int64_t rows() const { return last() == 0 ? 0 : numel() / last(); }

  friend bool operator==(const Shape& a, const Shape& b) noexcept {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a.dims_[static_cast<std::size_t>(i)] != b.dims_[static_cast<std::size_t>(i)]) return false;
    return true;
  }

  //! "[2, 197, 768]"
  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank_; ++i) {
      if (i) s += ", ";
      s += std::to_string(dims_[static_cast<std::size_t>(i)]);
    }
    return s + "]";
  }
  friend std::ostream& operator<<(std::ostream& os, const Shape& s) { return os << s.str(); }

 private:
  void assign(const std::int64_t* dims, std::size_t n) {
    DR2NET_CHECK(n <= static_cast<std::size_t>(kMaxRank), "rank ", n, " exceeds the maximum rank ", kMaxRank);
    rank_ = static_cast<int>(n);
    std::int64_t total = 1;
    for (std::size_t i = 0; i < n; ++i) {
      DR2NET_CHECK(dims[i] >= 0, "negative dimension ", dims[i], " at index ", i);
      DR2NET_CHECK(dims[i] == 0 || total <= INT64_MAX / dims[i], "shape element count overflows");
      total *= dims[i];
      dims_[i] = dims[i];
    }
  }

  std::array<std::int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

//! Non-owning view of a strided tensor. `TensorView<const T>` is the read-only form.
template <class T>
class TensorView {
 public:
  using value_type = std::remove_const_t<T>;
  using Strides = std::array<std::int64_t, kMaxRank>;

  TensorView() = default;
  //! A contiguous (row-major) view.
  TensorView(T* data, Shape shape) : data_(data), shape_(shape) {
    DR2NET_CHECK(data != nullptr || shape.numel() == 0, "null data for a tensor of shape ", shape);
    std::int64_t s = 1;
    for (int i = shape.rank() - 1; i >= 0; --i) {
      strides_[static_cast<std::size_t>(i)] = s;
      s *= shape[i];
    }
  }
  //! A strided view; strides are in elements and must be non-negative.
  TensorView(T* data, Shape shape, Strides strides) : data_(data), shape_(shape), strides_(strides) {
    DR2NET_CHECK(data != nullptr || shape.numel() == 0, "null data for a tensor of shape ", shape);
    for (int i = 0; i < shape.rank(); ++i)
      DR2NET_CHECK(strides[static_cast<std::size_t>(i)] >= 0, "negative stride at dimension ", i);
  }

  //! A mutable view converts to a read-only one.
  operator TensorView<const T>() const  // NOLINT(google-explicit-constructor)
    requires(!std::is_const_v<T>)
  {
    return TensorView<const T>(data_, shape_, strides_);
  }

  T* data() const noexcept { return data_; }
  const Shape& shape() const noexcept { return shape_; }
  std::int64_t numel() const noexcept { return shape_.numel(); }
  std::size_t size() const noexcept { return static_cast<std::size_t>(shape_.numel()); }
  std::int64_t stride(int i) const { return strides_[static_cast<std::size_t>(i)]; }
  const Strides& strides() const noexcept { return strides_; }

  bool is_contiguous() const noexcept {
    std::int64_t s = 1;
    for (int i = shape_.rank() - 1; i >= 0; --i) {
      if (shape_[i] != 1 && strides_[static_cast<std::size_t>(i)] != s) return false;
      s *= shape_[i];
    }
    return true;
  }

  //! The elements as a span; only for contiguous views.
  std::span<T> span() const {
    DR2NET_CHECK(is_contiguous(), "span() of a non-contiguous view of shape ", shape_);
    return {data_, size()};
  }

  //! Same memory, another contiguous shape with the same element count.
  TensorView reshaped(Shape s) const {
    DR2NET_CHECK(is_contiguous(), "reshape of a non-contiguous view of shape ", shape_);
    DR2NET_CHECK(s.numel() == numel(), "cannot reshape ", shape_, " to ", s);
    return TensorView(data_, s);
  }

 private:
  T* data_ = nullptr;
  Shape shape_{};
  Strides strides_{};
};

template <class T>
using ConstView = TensorView<const T>;

//! Throws unless `v` has exactly `expected` shape; `what` names the tensor.
template <class T>
void check_shape(const TensorView<T>& v, const Shape& expected, std::string_view what) {
  DR2NET_CHECK(v.shape() == expected, what, " has shape ", v.shape(), ", expected ", expected);
}

//! Throws unless `v` is contiguous; `what` names the tensor.
template <class T>
void check_contiguous(const TensorView<T>& v, std::string_view what) {
  DR2NET_CHECK(v.is_contiguous(), what, " of shape ", v.shape(), " must be contiguous");
}

}  // namespace dr2net
