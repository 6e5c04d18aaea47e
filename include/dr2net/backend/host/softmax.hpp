#pragma once
//! \file
//! Row softmax on the host and its backward (the attention probabilities' kernels).
//!
//! Float rows take a vector path where DR2NET_HOST_VECTOR_MATH is 1 (backend/host/vector_math.hpp):
//! exp through SLEEF, the row's maximum, sum and dot product accumulated in kWidth lanes over
//! the row's whole vectors, combined by a fixed tree, and the last cols % kWidth elements added
//! in index order, so a row's result depends on its values and length only (not on its
//! address, nor on which rows are processed with it). Otherwise, and for double, the scalar
//! loops below run.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "dr2net/backend/host/math.hpp"
#include "dr2net/backend/host/vector_math.hpp"
#include "dr2net/core/error.hpp"

namespace dr2net {

namespace detail {

// One row of softmax_rows_inplace, scalar: the C library's exp, sums in index order.
template <class T>
void softmax_row_scalar(T* row, std::int64_t cols) {
  const T mx = *std::max_element(row, row + cols);
  T sum = 0;
  for (std::int64_t j = 0; j < cols; ++j) {
    row[j] = detail::exp_of(row[j] - mx);
    sum += row[j];
  }
  const T inv = T(1) / sum;
  for (std::int64_t j = 0; j < cols; ++j) row[j] *= inv;
}

// sum_j g[j] p[j] of one row, scalar, in index order.
template <class T>
T softmax_row_dot_scalar(const T* p, const T* g, std::int64_t cols) {
  T dot = 0;
  for (std::int64_t j = 0; j < cols; ++j) dot += g[j] * p[j];
  return dot;
}

#if DR2NET_HOST_VECTOR_MATH
namespace simd {
inline namespace DR2NET_DETAIL_SIMD_ISA {

// One float row, vectorised. The maximum and the sum: lanes over the row's whole vectors,
// combined by simd's fixed tree, then the last n % kWidth elements in index order (all fixed
// by the row's length). exp runs on vectors throughout, the tail in one padded vector.
inline void softmax_row_vector(float* row, std::int64_t cols) {
  const auto n = static_cast<std::size_t>(cols);
  const std::size_t full = n - n % kLanes;
  vfloat vmax = broadcast(-std::numeric_limits<float>::infinity());
  for (std::size_t j = 0; j < full; j += kLanes) vmax = max(vmax, load(row + j));
  float mx = max_lanes(vmax);
  for (std::size_t j = full; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
  const vfloat vmx = broadcast(mx);
  vfloat vsum = broadcast(0.0f);
  for (std::size_t j = 0; j < full; j += kLanes) {
    const vfloat e = exp(sub(load(row + j), vmx));
    store(row + j, e);
    vsum = add(vsum, e);
  }
  if (full < n) store_partial(row + full, exp(sub(load_partial(row + full, n - full, 0.0f), vmx)), n - full);
  float sum = sum_lanes(vsum);
  for (std::size_t j = full; j < n; ++j) sum += row[j];
  const float inv = 1.0f / sum;
  for (std::size_t j = 0; j < n; ++j) row[j] *= inv;
}

// sum_j g[j] p[j] of one float row: lanes over the whole vectors, the fixed tree, then the tail
// in index order.
inline float softmax_row_dot_vector(const float* p, const float* g, std::int64_t cols) {
  const auto n = static_cast<std::size_t>(cols);
  const std::size_t full = n - n % kLanes;
  vfloat acc = broadcast(0.0f);
  for (std::size_t j = 0; j < full; j += kLanes) acc = add(acc, mul(load(g + j), load(p + j)));
  float dot = sum_lanes(acc);
  for (std::size_t j = full; j < n; ++j) dot += g[j] * p[j];
  return dot;
}

}  // inline namespace of the width
}  // namespace simd
#endif  // DR2NET_HOST_VECTOR_MATH

// One row of softmax_rows_inplace: the vector path for float where it is compiled in.
template <class T>
void softmax_row(T* row, std::int64_t cols) {
#if DR2NET_HOST_VECTOR_MATH
  if constexpr (std::is_same_v<T, float>) simd::softmax_row_vector(row, cols);
  else softmax_row_scalar(row, cols);
#else
  softmax_row_scalar(row, cols);
#endif
}

// sum_j g[j] p[j] of one row: the vector path for float where it is compiled in.
template <class T>
T softmax_row_dot(const T* p, const T* g, std::int64_t cols) {
#if DR2NET_HOST_VECTOR_MATH
  if constexpr (std::is_same_v<T, float>) return simd::softmax_row_dot_vector(p, g, cols);
  else return softmax_row_dot_scalar(p, g, cols);
#else
  return softmax_row_dot_scalar(p, g, cols);
#endif
}

}  // namespace detail

//! Each of `rows` rows of `cols` elements (leading dimension ld), in place:
//!   p_j = exp(s_j - max_k s_k) / sum_k exp(s_k - max_k s_k)
//! Subtracting the row maximum keeps exp() from overflowing; the result is unchanged.
//! Row r starts at s + r * ld (ld >= cols); elements between cols and ld are left alone.
//! Throws dr2net::Error when cols < 1 with rows > 0 (a row without elements has no softmax). A row holding NaN or +inf yields NaN probabilities.
//! The CUDA twin (modules/cuda/softmax.cuh) takes a CudaContext first. Float rows run the
//! vector path where DR2NET_HOST_VECTOR_MATH is 1 (see the file comment).
template <class T>
void softmax_rows_inplace(T* s, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  DR2NET_CHECK(rows <= 0 || (cols >= 1 && ld >= cols), "softmax over rows of ", cols, " elements (leading dimension ",
               ld, "): rows need at least one element and ld >= cols");
  for (std::int64_t r = 0; r < rows; ++r) detail::softmax_row(s + r * ld, cols);
}

//! Backward of a row softmax, in place over the gradient, with a scale folded in:
//!   ds_j = scale * p_j (dp_j - sum_k dp_k p_k)
//! p holds the forward's probabilities and g the gradient dL/dp on entry, dL/d(scores) times
//! `scale` on return (attention folds its 1/sqrt(head_dim) in here); both have `rows` rows of
//! `cols` elements at leading dimension ld.
template <class T>
void softmax_rows_backward_inplace(const T* p, T* g, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                   T scale) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* pr = p + r * ld;
    T* gr = g + r * ld;
    const T dot = detail::softmax_row_dot(pr, gr, cols);
    for (std::int64_t j = 0; j < cols; ++j) gr[j] = scale * pr[j] * (gr[j] - dot);
  }
}

}  // namespace dr2net
