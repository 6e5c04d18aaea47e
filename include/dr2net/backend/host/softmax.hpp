#pragma once
//! \file
//! Row softmax on the host and its backward (the attention probabilities' kernels).

#include <algorithm>
#include <cstdint>

#include "dr2net/backend/host/math.hpp"
#include "dr2net/core/error.hpp"

namespace dr2net {

//! Each of `rows` rows of `cols` elements (leading dimension ld), in place:
//!   p_j = exp(s_j - max_k s_k) / sum_k exp(s_k - max_k s_k)
//! Subtracting the row maximum keeps exp() from overflowing; the result is unchanged.
//! Row r starts at s + r * ld (ld >= cols); elements between cols and ld are left alone.
//! Throws dr2net::Error when cols < 1 with rows > 0 (a row without elements has no softmax). A row holding NaN or +inf yields NaN probabilities.
//! The CUDA twin (modules/cuda/softmax.cuh) takes a CudaContext first.
template <class T>
void softmax_rows_inplace(T* s, std::int64_t rows, std::int64_t cols, std::int64_t ld) {
  DR2NET_CHECK(rows <= 0 || (cols >= 1 && ld >= cols), "softmax over rows of ", cols, " elements (leading dimension ",
               ld, "): rows need at least one element and ld >= cols");
  for (std::int64_t r = 0; r < rows; ++r) {
    T* row = s + r * ld;
    const T mx = *std::max_element(row, row + cols);
    T sum = 0;
    for (std::int64_t j = 0; j < cols; ++j) {
      row[j] = detail::exp_of(row[j] - mx);
      sum += row[j];
    }
    const T inv = T(1) / sum;
    for (std::int64_t j = 0; j < cols; ++j) row[j] *= inv;
  }
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
    T dot = 0;
    for (std::int64_t j = 0; j < cols; ++j) dot += gr[j] * pr[j];
    for (std::int64_t j = 0; j < cols; ++j) gr[j] = scale * pr[j] * (gr[j] - dot);
  }
}

}  // namespace dr2net
