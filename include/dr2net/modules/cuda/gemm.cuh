#pragma once
//! \file
//! Row-major GEMMs on the device with host_gemm's contract (backend/host/gemm.hpp), so every
//! device function reads like its host twin:
//!
//!   device_gemm:                 C[m, n] = alpha op(A) op(B) + beta C  (+ bias[n] on every row)
//!   device_gemm_into:            the same reading C and writing D apart (C may be D)
//!   device_gemm_strided_batched: the same as device_gemm for `batch` matrices at fixed strides
//!
//! Row-major C is column-major C^T = op(B)^T op(A)^T, so both call the column-major libraries
//! with A and B swapped and the transposes unchanged. device_gemm goes through cuBLASLt
//! (cublasLtMatmul, with the BIAS epilogue when a bias is given); the batched form through
//! cublasGemmStridedBatchedEx. Both accumulate in fp32 (fp64 for double); TF32 only for float
//! and only when asked. beta == 0 never reads C (it may hold NaN poison). cuBLASLt's
//! descriptors and its heuristic's algorithm are made once per shape and kept in the context
//! (cuda_detail::LtPlanCache). When cuBLASLt offers no algorithm (an epilogue a type lacks,
//! say) or the bias is not 16-byte aligned (modules/cuda/bias_alignment.hpp), device_gemm
//! falls back to writing bias + beta C into D and one cublasGemmEx with beta = 1: the same
//! result, one more pass.

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <unordered_map>
#include <utility>

#include "dr2net/backend/cuda/context.hpp"
#include "dr2net/backend/cuda/error.hpp"
#include "dr2net/backend/host/gemm.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/modules/cuda/bias_alignment.hpp"
#include "dr2net/modules/cuda/types.cuh"

namespace dr2net {
namespace cuda_detail {

inline cublasOperation_t cublas_op(Transpose t) { return t == Transpose::No ? CUBLAS_OP_N : CUBLAS_OP_T; }

inline int checked_int(std::int64_t v, const char* what) {
  DR2NET_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "device gemm: ", what, " = ", v,
               " is outside cuBLAS's int range");
  return static_cast<int>(v);
}

//! d[r, j] = bias[j] (when bias is not null) + beta * c[r, j] (when beta != 0), leading
//! dimension ld; c may be d. What the fallback GEMM then accumulates onto.
template <class T, class A>
__global__ void prepare_output(T* d, const T* c, const T* bias, A beta, std::int64_t rows, std::int64_t cols,
                               std::int64_t ld) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * cols; i += stride) {
    const std::int64_t at = (i / cols) * ld + i % cols;
    A v = bias != nullptr ? static_cast<A>(bias[i % cols]) : A(0);
    if (beta != A(0)) v += beta * static_cast<A>(c[at]);
    d[at] = narrow<T>(v);
  }
}

//! What identifies a cuBLASLt plan: types, transposes, sizes, leading dimensions, epilogue
//! and the alignments the heuristic was told.
struct LtPlanKey {
  int dtype = 0, compute = 0, ta = 0, tb = 0;
  std::int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0;
  bool bias = false;
  std::uint32_t al_a = 0, al_b = 0, al_c = 0, al_d = 0, al_bias = 0;
  std::size_t workspace = 0;
  bool operator==(const LtPlanKey&) const = default;
};

struct LtPlanKeyHash {
  std::size_t operator()(const LtPlanKey& k) const noexcept {
    std::uint64_t h = 0xcbf29ce484222325ull;
    const auto mix = [&h](std::uint64_t v) { h = (h ^ v) * 0x100000001b3ull; };
    for (std::int64_t v : {k.m, k.n, k.k, k.lda, k.ldb, k.ldc}) mix(static_cast<std::uint64_t>(v));
    for (std::uint32_t v : {k.al_a, k.al_b, k.al_c, k.al_d, k.al_bias}) mix(v);
    mix(static_cast<std::uint64_t>(k.dtype) << 32 | static_cast<std::uint64_t>(k.compute) << 8 |
        static_cast<std::uint64_t>(k.ta) << 2 | static_cast<std::uint64_t>(k.tb) << 1 | (k.bias ? 1u : 0u));
    mix(k.workspace);
    return static_cast<std::size_t>(h);
  }
};

//! The cuBLASLt descriptors of one GEMM shape and the algorithm the heuristic chose for it.
struct LtPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool found = false;  //!< false: cuBLASLt offers nothing here; device_gemm falls back
  LtPlan() = default;
  LtPlan(const LtPlan&) = delete;
  LtPlan& operator=(const LtPlan&) = delete;
  ~LtPlan() {
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

//! Plans by key, kept per context (CudaContext::extension) so that the descriptors and the
//! heuristic run once per shape rather than on every call. Bounded: cleared past kMaxPlans.
struct LtPlanCache {
  static constexpr std::size_t kMaxPlans = 1024;
  std::unordered_map<LtPlanKey, std::unique_ptr<LtPlan>, LtPlanKeyHash> plans;
};

//! Owns a matmul preference while a plan is made.
struct LtPreference {
  cublasLtMatmulPreference_t pref = nullptr;
  LtPreference() = default;
  LtPreference(const LtPreference&) = delete;
  LtPreference& operator=(const LtPreference&) = delete;
  ~LtPreference() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
  }
};

//! The plan for `key`: looked up, or made (descriptors, then the heuristic) and kept.
template <class T>
const LtPlan& lt_plan(CudaContext& ctx, const LtPlanKey& key, bool allow_tf32) {
  LtPlanCache& cache = ctx.extension<LtPlanCache>();
  if (const auto it = cache.plans.find(key); it != cache.plans.end()) return *it->second;
  if (cache.plans.size() >= LtPlanCache::kMaxPlans) cache.plans.clear();
  constexpr cudaDataType_t dt = cuda_data_type<T>();
  constexpr cudaDataType_t scale = std::is_same_v<T, double> ? CUDA_R_64F : CUDA_R_32F;
  auto plan = std::make_unique<LtPlan>();
  DR2NET_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan->op, cublas_compute_type<T>(allow_tf32), scale));
  // Column-major roles: A' = row-major B, B' = row-major A, D' = C^T (n x m).
  const cublasOperation_t opa = key.tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = key.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  DR2NET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa));
  DR2NET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb));
  if (key.bias) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bias_type = dt;
    DR2NET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    DR2NET_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
  }
  const auto u = [](std::int64_t v) { return static_cast<std::uint64_t>(v); };
  DR2NET_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->a, dt, u(key.tb ? key.k : key.n), u(key.tb ? key.n : key.k), key.ldb));
  DR2NET_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->b, dt, u(key.ta ? key.m : key.k), u(key.ta ? key.k : key.m), key.lda));
  DR2NET_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan->c, dt, u(key.n), u(key.m), key.ldc));

  LtPreference p;
  DR2NET_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&p.pref));
  DR2NET_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(p.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                           &key.workspace, sizeof key.workspace));
  // The heuristic assumes 256-byte aligned operands unless told otherwise; views into saved
  // internals need not be, so tell it what each pointer really is (A' is row-major B).
  const std::pair<cublasLtMatmulPreferenceAttributes_t, std::uint32_t> alignments[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.al_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.al_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.al_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.al_d}};
  for (const auto& [attr, al] : alignments)
    DR2NET_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(p.pref, attr, &al, sizeof al));
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(ctx.blas_lt(), plan->op, plan->a, plan->b, plan->c,
                                                           plan->c, p.pref, 1, &heuristic, &found);
  // A bias the epilogue cannot read (its 16-byte rule: modules/cuda/bias_alignment.hpp) goes the fallback way.
  plan->found = hs == CUBLAS_STATUS_SUCCESS && found > 0 && (!key.bias || lt_bias_alignment_ok(key.al_bias));
  if (plan->found) plan->algo = heuristic.algo;
  return *cache.plans.emplace(key, std::move(plan)).first->second;
}

//! The column-major cublasGemmEx that device_gemm falls back to.
template <class T>
void gemm_ex(CudaContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
             acc_t<T> alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb, acc_t<T> beta, T* c,
             std::int64_t ldc, bool allow_tf32) {
  constexpr cudaDataType_t dt = cuda_data_type<T>();
  DR2NET_CUBLAS_CHECK(cublasGemmEx(ctx.blas(), cublas_op(tb), cublas_op(ta), checked_int(n, "n"), checked_int(m, "m"),
                                   checked_int(k, "k"), &alpha, b, dt, checked_int(ldb, "ldb"), a, dt,
                                   checked_int(lda, "lda"), &beta, c, dt, checked_int(ldc, "ldc"),
                                   cublas_compute_type<T>(allow_tf32), CUBLAS_GEMM_DEFAULT));
}

}  // namespace cuda_detail

//! D[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C (+ bias[n] added to every row when bias
//! is not null), row-major with leading dimensions lda, ldb and ldc (C and D share it); C may
//! be D. beta == 0 never reads C. One cublasLtMatmul with a plan kept per shape.
template <class T>
void device_gemm_into(CudaContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                      cuda_detail::acc_t<T> alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb,
                      cuda_detail::acc_t<T> beta, const T* c, T* d, std::int64_t ldc, const T* bias = nullptr,
                      bool allow_tf32 = false) {
  using namespace cuda_detail;
  using A = acc_t<T>;
  if (m == 0 || n == 0) return;
  detail::check_gemm_args(ta, tb, m, n, k, lda, ldb, ldc);
  if (beta == A(0)) c = d;  // never read; keeps C's alignment out of the plan key
  LtPlanKey key;
  key.dtype = static_cast<int>(cuda_data_type<T>());
  key.compute = static_cast<int>(cublas_compute_type<T>(allow_tf32));
  key.ta = ta == Transpose::Yes;
  key.tb = tb == Transpose::Yes;
  key.m = m, key.n = n, key.k = k, key.lda = lda, key.ldb = ldb, key.ldc = ldc;
  key.bias = bias != nullptr;
  key.al_a = pointer_alignment(a), key.al_b = pointer_alignment(b);
  key.al_c = pointer_alignment(c), key.al_d = pointer_alignment(d);
  key.al_bias = bias ? pointer_alignment(bias) : 0u;
  void* workspace = ctx.gemm_workspace();
  key.workspace = ctx.gemm_workspace_bytes();
  const LtPlan& plan = lt_plan<T>(ctx, key, allow_tf32);
  if (plan.found) {
    if (bias != nullptr)
      DR2NET_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    DR2NET_CUBLAS_CHECK(cublasLtMatmul(ctx.blas_lt(), plan.op, &alpha, b, plan.a, a, plan.b, &beta, c, plan.c, d,
                                       plan.c, &plan.algo, workspace, key.workspace, ctx.stream()));
    return;
  }
  // Fallback: D = bias + beta C in one pass where needed, then D = alpha op(A) op(B) + 1 * D.
  A beta_fb = beta;
  if (bias != nullptr || c != d) {
    const std::int64_t total = m * n;
    const int blocks = static_cast<int>(std::min<std::int64_t>((total + 255) / 256, 4096));
    prepare_output<T, A><<<blocks, 256, 0, ctx.stream()>>>(d, c, bias, beta, m, n, ldc);
    DR2NET_CUDA_CHECK_LAUNCH("dr2net prepare_output (gemm fallback)");
    beta_fb = A(1);
  }
  gemm_ex<T>(ctx, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta_fb, d, ldc, allow_tf32);
}

//! C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C (+ bias[n] added to every row when bias is
//! not null), row-major with leading dimensions lda, ldb, ldc; host_gemm's contract on the device.
template <class T>
void device_gemm(CudaContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                 cuda_detail::acc_t<T> alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb,
                 cuda_detail::acc_t<T> beta, T* c, std::int64_t ldc, const T* bias = nullptr,
                 bool allow_tf32 = false) {
  device_gemm_into<T>(ctx, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, c, ldc, bias, allow_tf32);
}

//! For i < batch: C_i = alpha op(A_i) op(B_i) + beta C_i with X_i = X + i * stride_x, all
//! row-major as device_gemm (the attention's per-head GEMMs: strides step over heads).
template <class T>
void device_gemm_strided_batched(CudaContext& ctx, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n,
                                 std::int64_t k, cuda_detail::acc_t<T> alpha, const T* a, std::int64_t lda,
                                 std::int64_t stride_a, const T* b, std::int64_t ldb, std::int64_t stride_b,
                                 cuda_detail::acc_t<T> beta, T* c, std::int64_t ldc, std::int64_t stride_c,
                                 std::int64_t batch, bool allow_tf32 = false) {
  using namespace cuda_detail;
  if (m == 0 || n == 0 || batch == 0) return;
  constexpr cudaDataType_t dt = cuda_data_type<T>();
  DR2NET_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      ctx.blas(), cublas_op(tb), cublas_op(ta), checked_int(n, "n"), checked_int(m, "m"), checked_int(k, "k"), &alpha,
      b, dt, checked_int(ldb, "ldb"), stride_b, a, dt, checked_int(lda, "lda"), stride_a, &beta, c, dt,
      checked_int(ldc, "ldc"), stride_c, checked_int(batch, "batch"), cublas_compute_type<T>(allow_tf32),
      CUBLAS_GEMM_DEFAULT));
}

}  // namespace dr2net
