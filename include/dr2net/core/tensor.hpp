#pragma once
//! \file
//! Shapes and non-owning tensor views, checked at the API boundary.

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <span>
#include <string>
#include <type_traits>

#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"

namespace dr2net {

//! Largest rank a view carries; streams are [batch, tokens, width].
inline constexpr int kMaxRank = 4;

//! Dimensions of a tensor of rank 0..kMaxRank; every dimension is >= 0.
class Shape {
 public:
  //! The rank-0 shape: no dimensions, one element.
  Shape() = default;
  //! A shape from its dimensions, outermost first, e.g. `{B, N, D}`. Throws dr2net::Error for
  //! more than kMaxRank dimensions, a negative dimension, or an element count that overflows int64.
  Shape(std::initializer_list<std::int64_t> dims) { assign(dims.begin(), dims.size()); }
  //! The same from a run-time list of dimensions (e.g. read from a file header); same checks.
  explicit Shape(std::span<const std::int64_t> dims) { assign(dims.data(), dims.size()); }

  //! Number of dimensions, 0..kMaxRank.
  int rank() const noexcept { return rank_; }
  //! Dimension `i` (0 is the outermost). Throws dr2net::Error unless 0 <= i < rank().
  std::int64_t operator[](int i) const {
    DR2NET_CHECK(i >= 0 && i < rank_, "dimension ", i, " out of range for shape ", str());
    return dims_[static_cast<std::size_t>(i)];
  }
  //! Number of elements (1 for rank 0). Construction refused every shape whose element count
  //! overflows int64, so this is exact.
  std::int64_t numel() const noexcept { return numel_; }
  //! Size of the last dimension: the feature width D of a stream [B, N, D].
  std::int64_t last() const { return rank_ == 0 ? 1 : dims_[static_cast<std::size_t>(rank_ - 1)]; }
  //! Product of every dimension but the last: the number of token rows.
  std::int64_t rows() const { return last() == 0 ? 0 : numel() / last(); }

  //! True when both shapes have the same rank and the same dimensions in the same order.
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
  //! Writes str(), e.g. "[2, 197, 768]", so shapes can go straight into DR2NET_CHECK messages.
  friend std::ostream& operator<<(std::ostream& os, const Shape& s) { return os << s.str(); }

 private:
  void assign(const std::int64_t* dims, std::size_t n) {
    DR2NET_CHECK(n <= static_cast<std::size_t>(kMaxRank), "rank ", n, " exceeds the maximum rank ", kMaxRank);
    for (std::size_t i = 0; i < n; ++i)
      DR2NET_CHECK(dims[i] >= 0, "negative dimension ", dims[i], " at index ", i, " of shape ", list(dims, n));
    // The element count in checked arithmetic: a shape whose count overflows int64 is refused
    // here, naming its dimensions, so numel() and every size derived from it cannot wrap. (The
    // message is built only on failure: shapes are made on every call.)
    std::int64_t total = 1;
    for (std::size_t i = 0; i < n; ++i) {
      const auto r = checked::try_mul(total, dims[i]);
      if (!r) {
        const std::string what = "element count of shape " + list(dims, n);
        (void)checked::product(std::span<const std::int64_t>(dims, n), what.c_str());  // throws, naming the dims
      }
      total = r.value_or(0);
    }
    numel_ = total;
    rank_ = static_cast<int>(n);
    for (std::size_t i = 0; i < n; ++i) dims_[i] = dims[i];
  }
  static std::string list(const std::int64_t* dims, std::size_t n) {
    std::string s = "[";
    for (std::size_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    return s + "]";
  }

  std::array<std::int64_t, kMaxRank> dims_{};
  int rank_ = 0;
  std::int64_t numel_ = 1;
};

//! The memory space of host (CPU) memory: a view of it may be dereferenced by host code.
struct HostSpace {
  //! Names the space in diagnostics.
  static constexpr const char* name = "host";
};
//! The memory space of a CUDA device's global memory: a view of it must not be dereferenced on
//! the host; copy it explicitly (backend/cuda/copy.hpp) to read it there.
struct DeviceSpace {
  //! Names the space in diagnostics.
  static constexpr const char* name = "device";
};

template <class T, class Space = HostSpace>
class TensorView;

namespace detail {
template <class T>
struct is_tensor_view : std::false_type {};
template <class T, class S>
struct is_tensor_view<TensorView<T, S>> : std::true_type {};
template <class A, class B>
inline constexpr bool same_space_v = std::is_same_v<A, B>;
}  // namespace detail

//! Non-owning view of a strided tensor in memory space `Space` (HostSpace or DeviceSpace).
//! `TensorView<const T, Space>` is the read-only form. Views of different spaces do not convert
//! into each other: a function written for host memory does not compile with a device view (and
//! the reverse); data moves between spaces only through explicit copies.
template <class T, class Space>
class TensorView {
 public:
  using value_type = std::remove_const_t<T>;  //!< Element type without const (float for a `TensorView<const float>`).
  using memory_space = Space;                 //!< Where the elements live: HostSpace or DeviceSpace.
  //! Per-dimension strides in elements (not bytes); entries at and beyond rank() are unused.
  using Strides = std::array<std::int64_t, kMaxRank>;

  //! A placeholder view: null data and the rank-0 shape (whose numel() is 1), so it holds no element
  //! that may be read; assign a real view before use.
  TensorView() = default;
  //! A contiguous (row-major) view.
  TensorView(T* data, Shape shape) : data_(data), shape_(shape) {
    DR2NET_CHECK(data != nullptr || shape.numel() == 0, "null data for a tensor of shape ", shape);
    std::int64_t s = 1;
    for (int i = shape.rank() - 1; i >= 0; --i) {
      strides_[static_cast<std::size_t>(i)] = s;
      s = next_stride(s, shape[i]);
    }
  }
  //! A strided view; strides are in elements and must be non-negative.
  TensorView(T* data, Shape shape, Strides strides) : data_(data), shape_(shape), strides_(strides) {
    DR2NET_CHECK(data != nullptr || shape.numel() == 0, "null data for a tensor of shape ", shape);
    // The last element's offset, sum (dim_i - 1) stride_i, in checked arithmetic: a view whose
    // offsets overflow int64 is refused before any index is formed from its strides.
    std::int64_t extent = 0;
    for (int i = 0; i < shape.rank(); ++i) {
      const std::int64_t st = strides[static_cast<std::size_t>(i)];
      DR2NET_CHECK(st >= 0, "negative stride ", st, " at dimension ", i, " of a view of shape ", shape);
      if (shape.numel() == 0) continue;
      const auto term = checked::try_mul(shape[i] - 1, st);
      const auto sum = term ? checked::try_add(extent, *term) : std::nullopt;
      DR2NET_CHECK(sum.has_value(), "strided view of shape ", shape, ": the offset of its last element overflows "
                   "a 64-bit index at dimension ", i, " (stride ", st, ")");
      extent = *sum;
    }
  }

  //! A mutable view converts to a read-only one of the same space.
  operator TensorView<const T, Space>() const  // NOLINT(google-explicit-constructor)
    requires(!std::is_const_v<T>)
  {
    return TensorView<const T, Space>(data_, shape_, strides_);
  }

  //! Refuses, at compile time, a view of another memory space: host code cannot dereference
  //! device memory (nor device kernels host memory). Copy between spaces explicitly.
  template <class U, class OtherSpace>
    requires(!detail::same_space_v<OtherSpace, Space>)
  TensorView(const TensorView<U, OtherSpace>&) {  // NOLINT(google-explicit-constructor)
    static_assert(detail::same_space_v<OtherSpace, Space>,
                  "dr2net: a view of one memory space was passed where another is expected (for example a "
                  "DEVICE view to a HOST function): copy the data explicitly (copy_to_host / copy_to_device) "
                  "or call the function of the view's backend");
  }

  //! Address of element [0, ..., 0]; host or device memory, as the view's creator chose (the view
  //! never dereferences it itself). Null for a default-constructed view or one without elements.
  T* data() const noexcept { return data_; }
  //! Dimensions of the viewed tensor.
  const Shape& shape() const noexcept { return shape_; }
  //! Element count, as int64 (the type index arithmetic uses).
  std::int64_t numel() const noexcept { return shape_.numel(); }
  //! Element count, as std::size_t (for spans, allocations and loops over `size()`).
  std::size_t size() const noexcept { return static_cast<std::size_t>(shape_.numel()); }
  //! Stride of dimension `i` in elements. Not range-checked: `i` must lie in [0, kMaxRank).
  std::int64_t stride(int i) const { return strides_[static_cast<std::size_t>(i)]; }
  //! All strides, in elements.
  const Strides& strides() const noexcept { return strides_; }

  //! True when the elements are laid out row-major without gaps, so element k sits at data()[k].
  //! Strides of dimensions of size 1 are ignored, as they never move the address.
  bool is_contiguous() const noexcept {
    std::int64_t s = 1;
    for (int i = shape_.rank() - 1; i >= 0; --i) {
      if (shape_[i] != 1 && strides_[static_cast<std::size_t>(i)] != s) return false;
      s = next_stride(s, shape_[i]);
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
  //! stride * dim for the next dimension to the left. It can only exceed int64 in a shape that
  //! holds no element (a zero dimension to the left of large ones), whose strides are never used
  //! to form an address: 0 then, instead of a signed overflow.
  static std::int64_t next_stride(std::int64_t stride, std::int64_t dim) noexcept {
    const auto r = checked::try_mul(stride, dim);
    return r ? *r : 0;
  }

  T* data_ = nullptr;
  Shape shape_{};
  Strides strides_{};
};

//! Read-only view of elements of type `T` in `Space`; what functions take for their inputs.
template <class T, class Space = HostSpace>
using ConstView = TensorView<const T, Space>;
//! A view of device memory.
template <class T>
using DeviceView = TensorView<T, DeviceSpace>;
//! A read-only view of device memory.
template <class T>
using ConstDeviceView = TensorView<const T, DeviceSpace>;

//! The memory space a backend context's memory lives in: Ctx::memory_space.
template <class Ctx>
using memory_space_t = typename Ctx::memory_space;
//! The view type of elements of T in the memory of backend context Ctx.
template <class Ctx, class T>
using ContextView = TensorView<T, memory_space_t<Ctx>>;

//! Throws unless `v` has exactly `expected` shape; `what` names the tensor.
template <class T, class S>
void check_shape(const TensorView<T, S>& v, const Shape& expected, std::string_view what) {
  DR2NET_CHECK(v.shape() == expected, what, " has shape ", v.shape(), ", expected ", expected);
}

//! Throws unless `v` is contiguous; `what` names the tensor.
template <class T, class S>
void check_contiguous(const TensorView<T, S>& v, std::string_view what) {
  DR2NET_CHECK(v.is_contiguous(), what, " of shape ", v.shape(), " must be contiguous");
}

}  // namespace dr2net
