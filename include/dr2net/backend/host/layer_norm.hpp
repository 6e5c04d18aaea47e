#pragma once
//! \file
//! LayerNorm over the last dimension on the host, forward and backward, as PyTorch defines
//! it (biased variance, eps inside the square root):
//!   y = (x - mean) * rstd * gamma + beta,   rstd = 1 / sqrt(var + eps),  var = mean((x - mean)^2)

//!
//! Float rows take a vector path where DR2NET_HOST_VECTOR_MATH is 1 (backend/host/vector_math.hpp):
//! the row sums (mean, variance, and the backward's two means) accumulate in kWidth lanes over
//! the row's whole vectors, combined by a fixed tree, and the last d % kWidth elements are
//! added in index order, so a row's statistics depend on its values and width only; the
//! per-element expressions are the ones below, on vectors. Otherwise, and for double, the
//! scalar loops run.

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "dr2net/backend/host/math.hpp"
#include "dr2net/backend/host/vector_math.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/config.hpp"

namespace dr2net {

//! y = xhat * gamma + beta with xhat = (x - mean) * rstd: one element of the normalised row.
//! Shared with the CUDA LayerNorm kernel, which calls it in its accumulate type.
template <class T>
DR2NET_HD_INLINE T layer_norm_element(T x, T mean, T rstd, T gamma, T beta) {
  return (x - mean) * rstd * gamma + beta;
}

//! dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)): one element of the input gradient.
//! dxhat = dy * gamma; the two means are over the row and passed in. Shared with the CUDA kernel.
template <class T>
DR2NET_HD_INLINE T layer_norm_input_grad(T dxhat, T xhat, T rstd, T mean_dxhat, T mean_dxhat_xhat) {
  return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
}

#if DR2NET_HOST_VECTOR_MATH
namespace detail::simd {
inline namespace DR2NET_DETAIL_SIMD_ISA {

// One float row of layer_norm_forward. The sum and the squared deviations: lanes over the
// row's whole vectors, simd's fixed tree, then the last d % kWidth elements in index order;
// then layer_norm_element's expression on vectors, the tail element by element.
inline void layer_norm_row_forward_vector(const float* xr, std::int64_t d, const float* gamma, const float* beta,
                                          float eps, float inv_d, float* yr, float* mean, float* rstd) {
  const auto n = static_cast<std::size_t>(d);
  const std::size_t full = n - n % kLanes;
  vfloat acc = broadcast(0.0f);
  for (std::size_t j = 0; j < full; j += kLanes) acc = add(acc, load(xr + j));
  float sum = sum_lanes(acc);
  for (std::size_t j = full; j < n; ++j) sum += xr[j];
  const float mu = sum * inv_d;
  const vfloat vmu = broadcast(mu);
  acc = broadcast(0.0f);
  for (std::size_t j = 0; j < full; j += kLanes) {
    const vfloat dev = sub(load(xr + j), vmu);
    acc = add(acc, mul(dev, dev));
  }
  float sq = sum_lanes(acc);
  for (std::size_t j = full; j < n; ++j) sq += (xr[j] - mu) * (xr[j] - mu);
  const float rs = 1.0f / sqrt_of(sq * inv_d + eps);
  const vfloat vrs = broadcast(rs);
  for (std::size_t j = 0; j < full; j += kLanes)  // (x - mean) * rstd * gamma + beta
    store(yr + j, add(mul(mul(sub(load(xr + j), vmu), vrs), load(gamma + j)), load(beta + j)));
  for (std::size_t j = full; j < n; ++j) yr[j] = layer_norm_element(xr[j], mu, rs, gamma[j], beta[j]);
  *mean = mu;
  *rstd = rs;
}

// One float row of layer_norm_backward: the two row sums as the forward's, dgamma and dbeta
// accumulated in the same pass, then layer_norm_input_grad's expression on vectors; the last
// d % kWidth elements of each pass in index order.
inline void layer_norm_row_backward_vector(const float* xr, float mu, float rs, const float* gamma, const float* gr,
                                           std::int64_t d, float inv_d, float* dxr, float* dgamma, float* dbeta) {
  const auto n = static_cast<std::size_t>(d);
  const std::size_t full = n - n % kLanes;
  const vfloat vmu = broadcast(mu), vrs = broadcast(rs);
  vfloat v1 = broadcast(0.0f), v2 = broadcast(0.0f);  // sum(dxhat), sum(dxhat * xhat)
  for (std::size_t j = 0; j < full; j += kLanes) {
    const vfloat xhat = mul(sub(load(xr + j), vmu), vrs);
    const vfloat g = load(gr + j);
    const vfloat dxhat = mul(g, load(gamma + j));
    v1 = add(v1, dxhat);
    v2 = add(v2, mul(dxhat, xhat));
    store(dgamma + j, add(load(dgamma + j), mul(g, xhat)));
    store(dbeta + j, add(load(dbeta + j), g));
  }
  float s1 = sum_lanes(v1), s2 = sum_lanes(v2);
  for (std::size_t j = full; j < n; ++j) {
    const float xhat = (xr[j] - mu) * rs;
    const float dxhat = gr[j] * gamma[j];
    s1 += dxhat;
    s2 += dxhat * xhat;
    dgamma[j] += gr[j] * xhat;
    dbeta[j] += gr[j];
  }
  const float m1 = s1 * inv_d, m2 = s2 * inv_d;
  const vfloat vm1 = broadcast(m1), vm2 = broadcast(m2);
  for (std::size_t j = 0; j < full; j += kLanes) {  // rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)
    const vfloat xhat = mul(sub(load(xr + j), vmu), vrs);
    const vfloat dxhat = mul(load(gr + j), load(gamma + j));
    store(dxr + j, add(load(dxr + j), mul(vrs, sub(sub(dxhat, vm1), mul(xhat, vm2)))));
  }
  for (std::size_t j = full; j < n; ++j)
    dxr[j] += layer_norm_input_grad(gr[j] * gamma[j], (xr[j] - mu) * rs, rs, m1, m2);
}

}  // inline namespace of the width
}  // namespace detail::simd
#endif  // DR2NET_HOST_VECTOR_MATH

namespace detail {

// layer_norm_forward's rows, scalar: sums in index order (the path for double, and for float
// without vector math).
template <class T>
void layer_norm_forward_scalar(const T* x, std::int64_t rows, std::int64_t d, const T* gamma, const T* beta, T eps,
                               T* y, T* mean, T* rstd) {
  const T inv_d = T(1) / static_cast<T>(d);
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    T sum = 0;
    for (std::int64_t j = 0; j < d; ++j) sum += xr[j];
    const T mu = sum * inv_d;
    T sq = 0;  // two passes: the variance of deviations, not E[x^2] - mean^2
    for (std::int64_t j = 0; j < d; ++j) sq += (xr[j] - mu) * (xr[j] - mu);
    const T rs = T(1) / detail::sqrt_of(sq * inv_d + eps);
    T* yr = y + r * d;
    for (std::int64_t j = 0; j < d; ++j) yr[j] = layer_norm_element(xr[j], mu, rs, gamma[j], beta[j]);
    mean[r] = mu;
    rstd[r] = rs;
  }
}

// layer_norm_backward's rows, scalar.
template <class T>
void layer_norm_backward_scalar(const T* x, const T* mean, const T* rstd, const T* gamma, const T* dy,
                                std::int64_t rows, std::int64_t d, T* dx, T* dgamma, T* dbeta) {
  const T inv_d = T(1) / static_cast<T>(d);
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    const T* gr = dy + r * d;
    const T mu = mean[r], rs = rstd[r];
    T s1 = 0, s2 = 0;  // sum(dxhat), sum(dxhat * xhat)
    for (std::int64_t j = 0; j < d; ++j) {
      const T xhat = (xr[j] - mu) * rs;
      const T dxhat = gr[j] * gamma[j];
      s1 += dxhat;
      s2 += dxhat * xhat;
      dgamma[j] += gr[j] * xhat;
      dbeta[j] += gr[j];
    }
    const T m1 = s1 * inv_d, m2 = s2 * inv_d;
    T* dxr = dx + r * d;
    for (std::int64_t j = 0; j < d; ++j)
      dxr[j] += layer_norm_input_grad(gr[j] * gamma[j], (xr[j] - mu) * rs, rs, m1, m2);
  }
}

}  // namespace detail

//! Normalises `rows` rows of width d; writes y and each row's mean and rstd.
//! x and y are [rows, d] row-major and contiguous, gamma and beta [d],
//! mean and rstd [rows] (kept for layer_norm_backward). The variance is computed in two
//! passes (of deviations from the mean), so large offsets do not cancel. Requires eps > 0 (a
//! constant row then gets rstd = 1/sqrt(eps)); throws dr2net::Error when d < 1 with rows > 0.
//! Pointers and buffer sizes are not checked here, so callers validate their tensors first.
//! Float rows run the vector path where DR2NET_HOST_VECTOR_MATH is 1 (see the file comment).
template <class T>
void layer_norm_forward(const T* x, std::int64_t rows, std::int64_t d, const T* gamma, const T* beta, T eps, T* y,
                        T* mean, T* rstd) {
  DR2NET_CHECK(rows <= 0 || d >= 1, "layer norm over rows of width ", d, ": the width must be at least 1");
#if DR2NET_HOST_VECTOR_MATH
  if constexpr (std::is_same_v<T, float>) {
    const float inv_d = 1.0f / static_cast<float>(d);
    for (std::int64_t r = 0; r < rows; ++r)
      detail::simd::layer_norm_row_forward_vector(x + r * d, d, gamma, beta, eps, inv_d, y + r * d, mean + r, rstd + r);
    return;
  }
#endif
  detail::layer_norm_forward_scalar(x, rows, d, gamma, beta, eps, y, mean, rstd);
}

//! Backward of layer_norm_forward. Accumulates: dx += J^T dy, dgamma += sum dy * xhat,
//! dbeta += sum dy.
//! x, dy and dx are [rows, d] row-major; mean and rstd [rows] as layer_norm_forward wrote
//! them; gamma, dgamma and dbeta [d]. dx, dgamma and dbeta are added to, never overwritten,
//! so zero them first for a plain gradient; dgamma and dbeta sum over all rows. Same
//! preconditions as layer_norm_forward.
template <class T>
void layer_norm_backward(const T* x, const T* mean, const T* rstd, const T* gamma, const T* dy, std::int64_t rows,
                         std::int64_t d, T* dx, T* dgamma, T* dbeta) {
  DR2NET_CHECK(rows <= 0 || d >= 1, "layer norm over rows of width ", d, ": the width must be at least 1");
#if DR2NET_HOST_VECTOR_MATH
  if constexpr (std::is_same_v<T, float>) {
    const float inv_d = 1.0f / static_cast<float>(d);
    for (std::int64_t r = 0; r < rows; ++r)
      detail::simd::layer_norm_row_backward_vector(x + r * d, mean[r], rstd[r], gamma, dy + r * d, d, inv_d, dx + r * d,
                                                   dgamma, dbeta);
    return;
  }
#endif
  detail::layer_norm_backward_scalar(x, mean, rstd, gamma, dy, rows, d, dx, dgamma, dbeta);
}

}  // namespace dr2net
