#pragma once
//! \file
//! LayerNorm over the last dimension on the host, forward and backward, as PyTorch defines
//! it (biased variance, eps inside the square root):
//!   y = (x - mean) * rstd * gamma + beta,   rstd = 1 / sqrt(var + eps),  var = mean((x - mean)^2)

#include <cstdint>

#include "dr2net/backend/host/math.hpp"
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

//! Normalises `rows` rows of width d; writes y and each row's mean and rstd.
//! x and y are [rows, d] row-major and contiguous, gamma and beta [d],
//! mean and rstd [rows] (kept for layer_norm_backward). The variance is computed in two
//! passes (of deviations from the mean), so large offsets do not cancel. Requires eps > 0 (a
//! constant row then gets rstd = 1/sqrt(eps)); throws dr2net::Error when d < 1 with rows > 0.
//! Pointers and buffer sizes are not checked here, so callers validate their tensors first.
template <class T>
void layer_norm_forward(const T* x, std::int64_t rows, std::int64_t d, const T* gamma, const T* beta, T eps, T* y,
                        T* mean, T* rstd) {
  DR2NET_CHECK(rows <= 0 || d >= 1, "layer norm over rows of width ", d, ": the width must be at least 1");
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

}  // namespace dr2net
