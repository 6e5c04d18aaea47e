#pragma once
//! \file
//! Softmax cross-entropy over a batch of logits, and classification accuracy.
//!
//!   loss = (1/B) sum_b [ logsumexp(z_b) - z_b[y_b] ],   dL/dz_b = (softmax(z_b) - onehot(y_b)) / B
//!
//! logsumexp is evaluated as m + log sum exp(z - m) with m = max z, so no exponential
//! overflows whatever the logits; sums run in double.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "dr2net/core/error.hpp"
#include "dr2net/core/tensor.hpp"

namespace dr2net {

namespace detail {

template <class T>
void check_logits_labels(const ConstView<T>& logits, std::span<const std::int32_t> labels, const char* where) {
  const Shape& s = logits.shape();
  DR2NET_CHECK(s.rank() == 2 && s[0] > 0 && s[1] > 0, where, ": logits have shape ", s,
               ", expected [batch > 0, classes > 0]");
  check_contiguous(logits, std::string(where) + ": logits");
  DR2NET_CHECK(static_cast<std::int64_t>(labels.size()) == s[0], where, ": ", labels.size(),
               " labels for a batch of ", s[0]);
  for (std::size_t b = 0; b < labels.size(); ++b)
    DR2NET_CHECK(labels[b] >= 0 && labels[b] < s[1], where, ": label ", labels[b], " of sample ", b,
                 " is outside [0, ", s[1], ")");
}

}  // namespace detail

//! The mean softmax cross-entropy of logits [B, K] against labels [B]. When grad_logits
//! ([B, K]) is given, it is *written* with dL/dlogits: a loss starts the backward, so there
//! is nothing to accumulate into.
template <class T>
double softmax_cross_entropy(ConstView<T> logits, std::span<const std::int32_t> labels,
                             TensorView<T> grad_logits = {}) {
  detail::check_logits_labels(logits, labels, "softmax_cross_entropy");
  const std::int64_t B = logits.shape()[0], K = logits.shape()[1];
  const bool want_grad = grad_logits.data() != nullptr;
  if (want_grad) {
    check_contiguous(grad_logits, "softmax_cross_entropy: grad_logits");
    check_shape(grad_logits, logits.shape(), "softmax_cross_entropy: grad_logits");
  }
  const double inv_b = 1.0 / static_cast<double>(B);
  double loss = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    const T* z = logits.data() + b * K;
    double m = static_cast<double>(z[0]);
    for (std::int64_t k = 1; k < K; ++k) m = std::max(m, static_cast<double>(z[k]));
    double sum = 0;
    for (std::int64_t k = 0; k < K; ++k) sum += std::exp(static_cast<double>(z[k]) - m);
    const double lse = m + std::log(sum);
    const std::int32_t y = labels[static_cast<std::size_t>(b)];
    loss += lse - static_cast<double>(z[y]);
    if (want_grad) {
      T* g = grad_logits.data() + b * K;
      for (std::int64_t k = 0; k < K; ++k) {
        const double p = std::exp(static_cast<double>(z[k]) - lse);
        g[k] = static_cast<T>((p - (k == y ? 1.0 : 0.0)) * inv_b);
      }
    }
  }
  return loss * inv_b;
}

//! How many rows of logits [B, K] have their largest entry (the first, on ties) at the label.
template <class T>
std::int64_t count_correct(ConstView<T> logits, std::span<const std::int32_t> labels) {
  detail::check_logits_labels(logits, labels, "count_correct");
  const std::int64_t B = logits.shape()[0], K = logits.shape()[1];
  std::int64_t correct = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    const T* z = logits.data() + b * K;
    std::int64_t best = 0;
    for (std::int64_t k = 1; k < K; ++k)
      if (z[k] > z[best]) best = k;
    correct += best == labels[static_cast<std::size_t>(b)] ? 1 : 0;
  }
  return correct;
}

}  // namespace dr2net
