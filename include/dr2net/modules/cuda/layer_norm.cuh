#pragma once
//! \file
//! LayerNorm over the last dimension on the device (the CUDA backend's layer_norm_forward and
//! layer_norm_backward), and CudaLayerNorm<T> = modules/layer_norm.hpp's LayerNorm<T, CudaContext>. One thread block per row, cub::BlockReduce in fp32 (fp64 for
//! double), two passes as on the host (the variance of deviations, not E[x^2] - mean^2):
//!
//!   y = (x - mean) * rstd * gamma + beta,   rstd = 1 / sqrt(var + eps)
//!   dx += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),   dxhat = dy * gamma
//!   dgamma += sum_rows dy * xhat,   dbeta += sum_rows dy          (column_sums)
//!
//! The per-element formulas are the host's DR2NET_HD functions (backend/host/layer_norm.hpp).
//! mean and rstd are kept in the accumulation type (fp32 for bf16/fp16), not rounded to T.

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/backend/host/layer_norm.hpp"
#include "dr2net/backend/host/math.hpp"
#include "dr2net/modules/cuda/column_sum.cuh"
#include "dr2net/modules/cuda/parameter.cuh"
#include "dr2net/modules/cuda/primitives.cuh"
#include "dr2net/modules/cuda/softmax.cuh"
#include "dr2net/modules/cuda/types.cuh"
#include "dr2net/modules/layer_norm.hpp"

namespace dr2net {
namespace cuda_detail {

inline constexpr int kLayerNormThreads = 256;

template <class T>
__global__ void __launch_bounds__(kLayerNormThreads)
    layer_norm_forward_kernel(const T* x, std::int64_t d, const T* gamma, const T* beta, acc_t<T> eps, T* y,
                              acc_t<T>* mean, acc_t<T>* rstd) {
  using A = acc_t<T>;
  using BlockReduce = cub::BlockReduce<A, kLayerNormThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  __shared__ A s_mu, s_rs;
  const std::int64_t r = blockIdx.x;
  const T* xr = x + r * d;
  const A inv_d = A(1) / static_cast<A>(d);
  A sum = 0;
  for (std::int64_t j = threadIdx.x; j < d; j += kLayerNormThreads) sum += widen(xr[j]);
  sum = BlockReduce(temp).Sum(sum);
  if (threadIdx.x == 0) s_mu = sum * inv_d;
  __syncthreads();
  const A mu = s_mu;
  A sq = 0;
  for (std::int64_t j = threadIdx.x; j < d; j += kLayerNormThreads) {
    const A dev = widen(xr[j]) - mu;
    sq += dev * dev;
  }
  sq = BlockReduce(temp).Sum(sq);
  if (threadIdx.x == 0) {
    s_rs = A(1) / detail::sqrt_of(sq * inv_d + eps);
    mean[r] = mu;
    rstd[r] = s_rs;
  }
  __syncthreads();
  const A rs = s_rs;
  T* yr = y + r * d;
  for (std::int64_t j = threadIdx.x; j < d; j += kLayerNormThreads)
    yr[j] = narrow<T>(layer_norm_element<A>(widen(xr[j]), mu, rs, widen(gamma[j]), widen(beta[j])));
}

template <class T>
__global__ void __launch_bounds__(kLayerNormThreads)
    layer_norm_backward_input_kernel(const T* x, const acc_t<T>* mean, const acc_t<T>* rstd, const T* gamma,
                                     const T* dy, std::int64_t d, T* dx) {
  using A = acc_t<T>;
  using BlockReduce = cub::BlockReduce<A, kLayerNormThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  __shared__ A s_m1, s_m2;
  const std::int64_t r = blockIdx.x;
  const T *xr = x + r * d, *gr = dy + r * d;
  const A mu = mean[r], rs = rstd[r], inv_d = A(1) / static_cast<A>(d);
  A s1 = 0, s2 = 0;  // sum(dxhat), sum(dxhat * xhat)
  for (std::int64_t j = threadIdx.x; j < d; j += kLayerNormThreads) {
    const A dxhat = widen(gr[j]) * widen(gamma[j]);
    s1 += dxhat;
    s2 += dxhat * ((widen(xr[j]) - mu) * rs);
  }
  s1 = BlockReduce(temp).Sum(s1);
  __syncthreads();  // the temp storage is reused
  s2 = BlockReduce(temp).Sum(s2);
  if (threadIdx.x == 0) {
    s_m1 = s1 * inv_d;
    s_m2 = s2 * inv_d;
  }
  __syncthreads();
  const A m1 = s_m1, m2 = s_m2;
  T* dxr = dx + r * d;
  for (std::int64_t j = threadIdx.x; j < d; j += kLayerNormThreads)
    dxr[j] = narrow<T>(widen(dxr[j]) +
                       layer_norm_input_grad<A>(widen(gr[j]) * widen(gamma[j]), (widen(xr[j]) - mu) * rs, rs, m1, m2));
}

//! fn(r, j) = (dy * xhat, dy): LayerNorm's weight and bias gradients.
template <class T>
struct LayerNormParamGrads {
  const T *x, *dy;
  const acc_t<T>*mean, *rstd;
  std::int64_t d;
  __device__ SumPair<acc_t<T>> operator()(std::int64_t r, std::int64_t j) const {
    const acc_t<T> g = widen(dy[r * d + j]);
    return {g * ((widen(x[r * d + j]) - mean[r]) * rstd[r]), g};
  }
};

}  // namespace cuda_detail

//! y = LayerNorm(x) for `rows` rows of width d; writes each row's mean and rstd.
template <class T>
void layer_norm_forward(CudaContext& ctx, const T* x, std::int64_t rows, std::int64_t d, const T* gamma,
                        const T* beta, cuda_detail::acc_t<T> eps, T* y, cuda_detail::acc_t<T>* mean,
                        cuda_detail::acc_t<T>* rstd) {
  if (rows == 0) return;
  cuda_detail::layer_norm_forward_kernel<T><<<cuda_detail::row_grid(rows), cuda_detail::kLayerNormThreads, 0,
                                              ctx.stream()>>>(x, d, gamma, beta, eps, y, mean, rstd);
  DR2NET_CUDA_CHECK_LAUNCH("dr2net layer_norm_forward_kernel");
}

//! Backward of layer_norm_forward; accumulates dx, dgamma and dbeta.
template <class T>
void layer_norm_backward(CudaContext& ctx, const T* x, const cuda_detail::acc_t<T>* mean,
                         const cuda_detail::acc_t<T>* rstd, const T* gamma, const T* dy, std::int64_t rows,
                         std::int64_t d, T* dx, T* dgamma, T* dbeta) {
  if (rows == 0) return;
  cuda_detail::layer_norm_backward_input_kernel<T><<<cuda_detail::row_grid(rows), cuda_detail::kLayerNormThreads, 0,
                                                     ctx.stream()>>>(x, mean, rstd, gamma, dy, d, dx);
  DR2NET_CUDA_CHECK_LAUNCH("dr2net layer_norm_backward_input_kernel");
  column_sums<T>(ctx, rows, d, cuda_detail::LayerNormParamGrads<T>{x, dy, mean, rstd, d}, dgamma, dbeta);
}

//! The device LayerNorm layer: modules/layer_norm.hpp's LayerNorm<T, CudaContext> (weight [D],
//! bias [D] in device memory, statistics in accumulate_t<T>).
template <class T>
using CudaLayerNorm = LayerNorm<T, CudaContext>;

}  // namespace dr2net
