#pragma once
//! \file
//! Row-major host GEMM, C = alpha * op(A) * op(B) + beta * C, for float and double.
//!
//! With the macro DR2NET_HAVE_CBLAS (CMake target dr2net_cblas) it calls cblas_sgemm /
//! cblas_dgemm; otherwise a cache-blocked, register-tiled loop implementation runs. Both
//! follow BLAS semantics: beta == 0 overwrites C without reading it (so NaN-poisoned output
//! buffers are fine), and k == 0 only scales C.
//!
//! Threads: host_gemm runs on the calling thread (an OpenBLAS is kept at one thread, since its
//! threaded GEMM rounds differently at different thread counts; the OpenMP build of OpenBLAS
//! without any lasting setting, the pthread build by openblas_set_num_threads(1)).
//! host_gemm_parallel splits C into a fixed number of row or column blocks chosen from the
//! shape alone (host_gemm_blocks) and runs the blocks as single-threaded GEMMs on the OpenMP
//! pool, so its result is bit-identical at every thread count.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "dr2net/backend/host/parallel.hpp"
#include "dr2net/core/error.hpp"

#if defined(DR2NET_HAVE_CBLAS)
#include <cblas.h>
#endif

namespace dr2net {

//! Whether a GEMM operand is used as stored or transposed: with No, op(X) = X and the row-major
//! storage has op(X)'s shape; with Yes, op(X) = X^T and the storage holds op(X)'s transpose
//! (so A of op(A)[m, k] is stored as [k, m]). Shared by the host and device GEMMs.
enum class Transpose : bool { No = false, Yes = true };

//! Which implementation host_gemm uses in this build: "cblas" when compiled with
//! DR2NET_HAVE_CBLAS, else "blocked loops". Tools and benchmarks print it beside host timings.
inline constexpr std::string_view host_gemm_backend() {
#if defined(DR2NET_HAVE_CBLAS)
  return "cblas";
#else
  return "blocked loops";
#endif
}

namespace detail {

//! Tile sizes of the loop GEMM. The MR x NR accumulator tile stays in registers (NR spans
//! 32 bytes per row); KC x NR panels of B stay in L1, MC x KC panels of A in L2.
template <class T>
struct GemmTiles {
  static constexpr std::int64_t MR = 4;
  static constexpr std::int64_t NR = static_cast<std::int64_t>(32 / sizeof(T));
  static constexpr std::int64_t KC = 256;
  static constexpr std::int64_t MC = 64;
  static constexpr std::int64_t NC = 1024;
};

//! Throws unless the sizes and leading dimensions describe valid row-major operands.
inline void check_gemm_args(Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                            std::int64_t lda, std::int64_t ldb, std::int64_t ldc) {
  DR2NET_CHECK(m >= 0 && n >= 0 && k >= 0, "gemm: negative size m = ", m, ", n = ", n, ", k = ", k);
  // A stored as [m, k] (No) or [k, m] (Yes): its rows hold k or m elements; likewise B.
  const std::int64_t a_cols = ta == Transpose::No ? k : m, b_cols = tb == Transpose::No ? n : k;
  DR2NET_CHECK(lda >= std::max<std::int64_t>(1, a_cols), "gemm: lda = ", lda, " is below A's row length ", a_cols);
  DR2NET_CHECK(ldb >= std::max<std::int64_t>(1, b_cols), "gemm: ldb = ", ldb, " is below B's row length ", b_cols);
  DR2NET_CHECK(ldc >= std::max<std::int64_t>(1, n), "gemm: ldc = ", ldc, " is below C's row length ", n);
}

//! op(X)[r, c] of a row-major X with leading dimension ld.
template <class T>
inline T op_at(const T* x, std::int64_t ld, Transpose t, std::int64_t r, std::int64_t c) {
  return t == Transpose::No ? x[r * ld + c] : x[c * ld + r];
}

//! acc[MR][NR] += Ap (kc x MR, k-major) * Bp (kc x NR, k-major); then C's mr x nr corner += acc.
template <class T>
inline void gemm_micro_kernel(std::int64_t kc, const T* __restrict ap, const T* __restrict bp, T* c,
                              std::int64_t ldc, std::int64_t mr, std::int64_t nr) {
  constexpr std::int64_t MR = GemmTiles<T>::MR, NR = GemmTiles<T>::NR;
  T acc[MR][NR] = {};
  for (std::int64_t p = 0; p < kc; ++p) {
    const T* a = ap + p * MR;
    const T* b = bp + p * NR;
    for (std::int64_t i = 0; i < MR; ++i)
      for (std::int64_t j = 0; j < NR; ++j) acc[i][j] += a[i] * b[j];
  }
  for (std::int64_t i = 0; i < mr; ++i)
    for (std::int64_t j = 0; j < nr; ++j) c[i * ldc + j] += acc[i][j];
}

//! The loop implementation: C already scaled by beta; adds alpha * op(A) * op(B).
template <class T>
void gemm_blocked(Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* a,
                  std::int64_t lda, const T* b, std::int64_t ldb, T* c, std::int64_t ldc) {
  using Tiles = GemmTiles<T>;
  constexpr std::int64_t MR = Tiles::MR, NR = Tiles::NR, KC = Tiles::KC, MC = Tiles::MC, NC = Tiles::NC;
  // Packed panels, zero-padded to whole tiles so the micro-kernel never branches on edges.
  // Kept per thread and only grown: attention issues many small GEMMs per layer.
  thread_local std::vector<T> bpack, apack;
  const std::int64_t kmax = std::min(KC, k);
  const auto round_up = [](std::int64_t x, std::int64_t r) { return (x + r - 1) / r * r; };
  const auto bsize = static_cast<std::size_t>(kmax * round_up(std::min(NC, n), NR));
  const auto asize = static_cast<std::size_t>(kmax * round_up(std::min(MC, m), MR));
  if (bpack.size() < bsize) bpack.resize(bsize);
  if (apack.size() < asize) apack.resize(asize);
  for (std::int64_t jc = 0; jc < n; jc += NC) {
    const std::int64_t nc = std::min(NC, n - jc);
    for (std::int64_t pc = 0; pc < k; pc += KC) {
      const std::int64_t kc = std::min(KC, k - pc);
      // B panel: strips of NR columns, each stored kc x NR row by row.
      for (std::int64_t j0 = 0; j0 < nc; j0 += NR) {
        T* dst = bpack.data() + j0 * kc;
        const std::int64_t nr = std::min(NR, nc - j0);
        for (std::int64_t p = 0; p < kc; ++p)
          for (std::int64_t j = 0; j < NR; ++j)
            dst[p * NR + j] = j < nr ? op_at(b, ldb, tb, pc + p, jc + j0 + j) : T(0);
      }
      for (std::int64_t ic = 0; ic < m; ic += MC) {
        const std::int64_t mc = std::min(MC, m - ic);
        // A panel: strips of MR rows, each stored kc x MR column by column, alpha folded in.
        for (std::int64_t i0 = 0; i0 < mc; i0 += MR) {
          T* dst = apack.data() + i0 * kc;
          const std::int64_t mr = std::min(MR, mc - i0);
          for (std::int64_t p = 0; p < kc; ++p)
            for (std::int64_t i = 0; i < MR; ++i)
              dst[p * MR + i] = i < mr ? alpha * op_at(a, lda, ta, ic + i0 + i, pc + p) : T(0);
        }
        for (std::int64_t i0 = 0; i0 < mc; i0 += MR)
          for (std::int64_t j0 = 0; j0 < nc; j0 += NR)
            gemm_micro_kernel<T>(kc, apack.data() + i0 * kc, bpack.data() + j0 * kc, c + (ic + i0) * ldc + jc + j0,
                                 ldc, std::min(MR, mc - i0), std::min(NR, nc - j0));
      }
    }
  }
}

//! While it lives, the calling thread's OpenBLAS calls run on one thread (nothing for another
//! CBLAS): dr2net's GEMMs take their threads from the fixed blocks of host_gemm_parallel, and
//! OpenBLAS's threaded GEMM rounds differently at different thread counts.
//!  - OpenMP OpenBLAS (openblas_get_parallel() == 2): it threads a call by the caller's
//!    omp_get_max_threads() and never inside an active parallel region, so outside one the
//!    guard sets omp_set_num_threads(1) and restores the caller's value when it ends: no lasting
//!    side effect. (In a translation unit without OpenMP it falls back to the next rule.)
//!  - pthread OpenBLAS: openblas_set_num_threads(1), process-wide (the program's other OpenBLAS
//!    calls then run on one thread too), once: later guards find it set.
class BlasOneThread {
 public:
  BlasOneThread() {
#if defined(DR2NET_HAVE_CBLAS) && defined(OPENBLAS_VERSION)
    static const bool openmp_blas = openblas_get_parallel() == 2;
#if defined(_OPENMP)
    if (openmp_blas) {
      if (!in_host_parallel_region() && omp_get_max_threads() != 1) {
        restore_ = omp_get_max_threads();
        omp_set_num_threads(1);
      }
      return;
    }
#else
    (void)openmp_blas;
#endif
    if (openblas_get_num_threads() != 1) openblas_set_num_threads(1);
#endif
  }
  ~BlasOneThread() {
#if defined(DR2NET_HAVE_CBLAS) && defined(OPENBLAS_VERSION) && defined(_OPENMP)
    if (restore_ > 0) omp_set_num_threads(restore_);
#endif
  }
  BlasOneThread(const BlasOneThread&) = delete;
  BlasOneThread& operator=(const BlasOneThread&) = delete;

 private:
  [[maybe_unused]] int restore_ = 0;  // the caller's omp_get_max_threads() to restore (0: nothing changed)
};

}  // namespace detail

//! The loop implementation alone (what host_gemm runs without CBLAS), same contract and the
//! same argument checks; tests check it and host_gemm against one naive reference.
//! T may be any floating type (host_gemm's float/double restriction comes from CBLAS).
//! Packing buffers are thread_local and only grow, so concurrent calls from different
//! threads are safe and each thread keeps its largest panels allocated.
template <class T>
void host_gemm_loops(Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k, T alpha,
                     const T* a, std::int64_t lda, const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  detail::check_gemm_args(ta, tb, m, n, k, lda, ldb, ldc);
  if (m == 0 || n == 0) return;
  // C <- beta * C first; beta == 0 must not read C (it may hold NaN poison).
  if (beta != T(1)) {
    for (std::int64_t i = 0; i < m; ++i) {
      T* row = c + i * ldc;
      if (beta == T(0)) std::fill(row, row + n, T(0));
      else
        for (std::int64_t j = 0; j < n; ++j) row[j] *= beta;
    }
  }
  if (k == 0 || alpha == T(0)) return;
  detail::gemm_blocked(ta, tb, m, n, k, alpha, a, lda, b, ldb, c, ldc);
}

//! C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C, all row-major with leading
//! dimensions lda, ldb, ldc (elements between consecutive rows as stored). op(X) = X or X^T.
//! beta == 0 writes C without reading it; k == 0 (or alpha == 0) only scales C by beta;
//! m == 0 or n == 0 does nothing; C's elements between column n and ldc are never touched.
//! T is float or double (a static_assert says so).
//! Throws dr2net::Error, naming the values, for a negative m, n or k, or a leading dimension
//! below its operand's row length (lda < k or m, ldb < n or k as transposed, ldc < n, each at
//! least 1); with CBLAS also for sizes beyond int. A and B must not overlap C. Synchronous;
//! runs on the calling thread (an OpenBLAS is kept at one thread: detail::BlasOneThread);
//! safe to call from several threads on distinct C.
template <class T>
void host_gemm(Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* a,
               std::int64_t lda, const T* b, std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "host_gemm supports float and double");
  detail::check_gemm_args(ta, tb, m, n, k, lda, ldb, ldc);
  if (m == 0 || n == 0) return;
#if defined(DR2NET_HAVE_CBLAS)
  const detail::BlasOneThread one_thread;
  constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();
  DR2NET_CHECK(m <= kIntMax && n <= kIntMax && k <= kIntMax && lda <= kIntMax && ldb <= kIntMax && ldc <= kIntMax,
               "gemm: sizes (m = ", m, ", n = ", n, ", k = ", k, ") exceed CBLAS's int range");
  const auto cta = ta == Transpose::No ? CblasNoTrans : CblasTrans;
  const auto ctb = tb == Transpose::No ? CblasNoTrans : CblasTrans;
  if constexpr (std::is_same_v<T, float>)
    cblas_sgemm(CblasRowMajor, cta, ctb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
                static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
  else
    cblas_dgemm(CblasRowMajor, cta, ctb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
                static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
#else
  host_gemm_loops<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
}

//! How host_gemm_parallel splits C[m, n] for a product with inner size k: into `count` blocks
//! along its rows (`rows` true) or columns, cut at multiples of 16 (host_gemm_block_begin).
struct HostGemmBlocks {
  std::int64_t count = 1;  //!< number of blocks, a power of two from 1 to 16
  bool rows = true;        //!< true: blocks of rows of C (split m); false: of columns (split n)
};

//! The blocks of host_gemm_parallel, from the shape alone (never the thread count): C is split
//! along its longer side, into 2 blocks once the product has 8 Mi multiply-adds and that
//! side 128 elements, then into twice as many while every block keeps at least 256 rows (or
//! columns) and 8 Mi multiply-adds, up to 16. Few, large blocks: each block packs the
//! operand it shares with the others again, which costs a few percent per halving of the
//! block. Powers of two keep 2 and 4 threads evenly loaded.
inline HostGemmBlocks host_gemm_blocks(std::int64_t m, std::int64_t n, std::int64_t k) {
  constexpr double kMinWork = 8.0 * 1024 * 1024;
  HostGemmBlocks b;
  b.rows = m >= n;
  const std::int64_t side = b.rows ? m : n;
  const double work = static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  if (work < 2 * kMinWork || side < 128) return b;
  b.count = 2;
  while (b.count < 16 && side / (2 * b.count) >= 256 && work / static_cast<double>(2 * b.count) >= kMinWork)
    b.count *= 2;
  return b;
}

//! First row (or column) of block `i` of `count` blocks over a side of `side` elements: i * side
//! / count rounded down to a multiple of 16 (0 for i = 0, side for i = count).
inline std::int64_t host_gemm_block_begin(std::int64_t side, std::int64_t count, std::int64_t i) {
  if (i >= count) return side;
  return (side / count * i + side % count * i / count) / 16 * 16;
}

//! Block `i` of `blocks` of C[m, n] as a single-threaded host_gemm: rows (or columns) [r0, r1)
//! of C with the matching rows of op(A) (or columns of op(B)). Returns {r0, r1}, so a caller
//! that prepares C block by block (gemm_bias_add's fill) knows which part it owns.
template <class T>
std::pair<std::int64_t, std::int64_t> host_gemm_block(const HostGemmBlocks& blocks, std::int64_t i, Transpose ta,
                                                      Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                                                      T alpha, const T* a, std::int64_t lda, const T* b,
                                                      std::int64_t ldb, T beta, T* c, std::int64_t ldc) {
  const std::int64_t side = blocks.rows ? m : n;
  const std::int64_t b0 = host_gemm_block_begin(side, blocks.count, i), b1 = host_gemm_block_begin(side, blocks.count, i + 1);
  if (blocks.rows)  // rows b0..b1 of C: those rows of op(A), all of op(B)
    host_gemm<T>(ta, tb, b1 - b0, n, k, alpha, ta == Transpose::No ? a + b0 * lda : a + b0, lda, b, ldb, beta,
                 c + b0 * ldc, ldc);
  else  // columns b0..b1 of C: all of op(A), those columns of op(B)
    host_gemm<T>(ta, tb, m, b1 - b0, k, alpha, a, lda, tb == Transpose::No ? b + b0 : b + b0 * ldb, ldb, beta, c + b0,
                 ldc);
  return {b0, b1};
}

//! host_gemm's contract, run as the fixed blocks of host_gemm_blocks(m, n, k), each a
//! single-threaded host_gemm (host_gemm_block), on up to `threads` threads (parallel_for).
//! The blocks do not depend on `threads`, so neither does any bit of C. Same checks and
//! errors as host_gemm.
template <class T>
void host_gemm_parallel(int threads, Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k,
                        T alpha, const T* a, std::int64_t lda, const T* b, std::int64_t ldb, T beta, T* c,
                        std::int64_t ldc) {
  detail::check_gemm_args(ta, tb, m, n, k, lda, ldb, ldc);
  const HostGemmBlocks blocks = host_gemm_blocks(m, n, k);
  if (blocks.count == 1) {
    host_gemm<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const detail::BlasOneThread one_thread;  // set before the workers call OpenBLAS
  parallel_for(threads, static_cast<std::size_t>(blocks.count), 1, [&](std::size_t first, std::size_t last) {
    for (std::size_t i = first; i < last; ++i)
      host_gemm_block<T>(blocks, static_cast<std::int64_t>(i), ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  });
}

}  // namespace dr2net
