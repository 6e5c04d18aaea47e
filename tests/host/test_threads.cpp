// The host backend on several threads: the thread count from the options and from the
// environment, parallel_for's chunks and errors, and every parallel kernel (for_each_index with
// and without a range method, the GEMMs, the batched GEMMs, LayerNorm, softmax, column sums)
// bit-identical at 1, 2 and 3 threads on odd sizes and within its error bound of a double
// reference; then whole ViT training steps, reversible and standard, whose outputs, input
// gradients and every parameter gradient are bit-identical between 1, 2 and 3 threads.

#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dr2net/backend/host/primitives.hpp"
#include "dr2net/dr2net.hpp"
#include "dr2net/modules/activation.hpp"
#include "dr2net/modules/vit.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;
using dr2net::testing::random_vector;

namespace {

constexpr int kThreadCounts[] = {1, 2, 3};

// Sets (or unsets, with nullopt) an environment variable for the scope, then restores it.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, std::optional<std::string> value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) ::setenv(name, value->c_str(), 1);
    else ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_) ::setenv(name_, old_->c_str(), 1);
    else ::unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

#if defined(DR2NET_TEST_EXPECT_OPENMP)
static_assert(host_openmp_enabled(), "the build found OpenMP, so the kernels must be compiled with it");
#endif

int expected_threads(int asked) { return host_openmp_enabled() ? asked : 1; }

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Index of the first element whose bits differ, for the failure message (size when none).
template <class T>
std::size_t first_difference(const std::vector<T>& a, const std::vector<T>& b) {
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return i;
  return a.size() == b.size() ? a.size() : std::min(a.size(), b.size());
}

// Runs `kernel(ctx)` -> std::vector<T> on a fresh context at each thread count and requires
// every result to equal the one-thread result bit for bit; returns the one-thread result.
template <class Kernel>
auto same_at_every_thread_count(const Kernel& kernel) {
  HostContext one({.threads = 1});
  const auto want = kernel(one);
  for (int t : kThreadCounts) {
    HostContext ctx({.threads = t});
    REQUIRE(ctx.threads() == expected_threads(t));
    const auto got = kernel(ctx);
    INFO("threads " << t << ", first differing element " << first_difference(want, got) << " of " << want.size());
    CHECK(same_bits(want, got));
  }
  return want;
}

// u = the unit roundoff of T; a sum of k products is within k u sum|terms| of the exact value.
template <class T>
double half_epsilon() {
  return std::numeric_limits<T>::epsilon() / 2;
}

// A functor with the host range method: writes (chunk-independent) values and records which
// ranges it was given, so the test can check the fixed chunk boundaries.
struct RangeRecorder {
  float* out;
  const float* in;
  std::uint32_t* range_of;  // element i <- first index of the range that covered it
  std::atomic<int>* calls;
  void operator()(std::size_t i) const { out[i] = std::exp(in[i]) * 0.5f + in[i]; }
  void run_range(std::size_t begin, std::size_t end) const {
    calls->fetch_add(1);
    for (std::size_t i = begin; i < end; ++i) {
      (*this)(i);
      range_of[i] = static_cast<std::uint32_t>(begin);
    }
  }
};

// A functor without it: for_each_index calls fn(i) per element.
struct PerElement {
  float* out;
  const float* in;
  void operator()(std::size_t i) const { out[i] = std::tanh(in[i]) * in[i] + 1.0f / (1.0f + in[i] * in[i]); }
};
static_assert(HostRangeFunctor<RangeRecorder> && !HostRangeFunctor<PerElement>);

}  // namespace

TEST_CASE("the host thread count comes from the options, else DR2NET_NUM_THREADS, else OMP_NUM_THREADS",
          "[threads]") {
  ScopedEnv dr("DR2NET_NUM_THREADS", std::nullopt), omp("OMP_NUM_THREADS", std::nullopt);
  for (int t : {1, 2, 3, 7}) {
    HostContext ctx({.threads = t});
    CHECK(ctx.threads() == expected_threads(t));
    CHECK(ctx.options().threads == t);
  }
  {
    HostContext ctx;  // nothing set: the processors available
    CHECK(ctx.threads() >= 1);
    if (!host_openmp_enabled()) CHECK(ctx.threads() == 1);
  }
  {
    ScopedEnv set_omp("OMP_NUM_THREADS", "3,1");  // a nesting list: the first level counts
    CHECK(HostContext().threads() == expected_threads(3));
    ScopedEnv set_dr("DR2NET_NUM_THREADS", " 2 ");  // dr2net's own variable wins
    CHECK(HostContext().threads() == expected_threads(2));
    CHECK(HostContext({.threads = 5}).threads() == expected_threads(5));  // the options win over both
  }
  {
    ScopedEnv empty("DR2NET_NUM_THREADS", "");  // empty counts as unset
    ScopedEnv set_omp("OMP_NUM_THREADS", "2");
    CHECK(HostContext().threads() == expected_threads(2));
  }
  for (const char* bad : {"0", "-2", "two", "3x", "99999999999999999999", "5000"}) {
    INFO("DR2NET_NUM_THREADS=" << bad);
    ScopedEnv set_dr("DR2NET_NUM_THREADS", bad);
    CHECK_THROWS_WITH(HostContext(), Catch::Contains("DR2NET_NUM_THREADS") && Catch::Contains(bad));
    CHECK(HostContext({.threads = 2}).threads() == expected_threads(2));  // not read when the options say
  }
  {
    ScopedEnv set_omp("OMP_NUM_THREADS", "many");
    CHECK_THROWS_WITH(HostContext(), Catch::Contains("OMP_NUM_THREADS") && Catch::Contains("many"));
  }
  CHECK_THROWS_WITH(HostContext({.threads = -1}), Catch::Contains("thread count -1"));
  CHECK_THROWS_WITH(HostContext({.threads = kMaxHostThreads + 1}), Catch::Contains("out of range"));
}

TEST_CASE("parallel_for covers every item once in fixed chunks and reports the lowest chunk's error",
          "[threads]") {
  for (int t : kThreadCounts) {
    for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{64}, std::size_t{1001}}) {
      for (std::size_t chunk : {std::size_t{1}, std::size_t{3}, std::size_t{64}, std::size_t{5000}}) {
        INFO("threads " << t << ", n " << n << ", chunk " << chunk);
        // Bodies run on several threads: they record, the checks come after (Catch2's are not
        // thread-safe).
        std::vector<int> hits(n, 0);
        std::vector<std::size_t> begin_of(n, 0);
        std::atomic<std::size_t> chunks{0}, bad_bounds{0};
        parallel_for(t, n, chunk, [&](std::size_t b, std::size_t e) {
          chunks.fetch_add(1);
          if (b % chunk != 0 || e != std::min(n, b + chunk)) bad_bounds.fetch_add(1);
          for (std::size_t i = b; i < e; ++i) {
            ++hits[i];
            begin_of[i] = b;
          }
        });
        CHECK(chunks.load() == chunk_count(n, chunk));
        CHECK(bad_bounds.load() == 0);
        CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
        for (std::size_t i = 0; i < n; ++i) CHECK(begin_of[i] == i / chunk * chunk);
      }
    }
    // Errors: the lowest throwing chunk's exception, whatever the thread count.
    CHECK_THROWS_WITH(parallel_for(t, 100, 10,
                                   [](std::size_t b, std::size_t) {
                                     if (b == 30 || b == 70 || b == 90)
                                       throw std::runtime_error("chunk " + std::to_string(b));
                                   }),
                      "chunk 30");
    // A nested call inside a parallel region runs on the calling thread and still covers all.
    std::vector<int> hits(40 * 50, 0);
    parallel_for(t, 40, 1, [&](std::size_t b, std::size_t e) {
      for (std::size_t i = b; i < e; ++i)
        parallel_for(t, 50, 7, [&](std::size_t b2, std::size_t e2) {
          for (std::size_t j = b2; j < e2; ++j) ++hits[i * 50 + j];
        });
    });
    CHECK(std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; }));
  }
  CHECK_THROWS_WITH(parallel_for(2, 10, 0, [](std::size_t, std::size_t) {}), Catch::Contains("chunk size"));
}

TEST_CASE("for_each_index calls run_range on fixed chunks, else fn(i), bit-identical at 1, 2 and 3 threads",
          "[threads][elementwise]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  for (std::size_t n : {std::size_t{1}, kHostElementChunk - 1, 3 * kHostElementChunk + 17, std::size_t{50001}}) {
    INFO("n " << n);
    const auto in = random_vector<float>(n, rng, -3.0, 3.0);
    same_at_every_thread_count([&](HostContext& ctx) {
      std::vector<float> out(n, std::numeric_limits<float>::quiet_NaN());
      std::vector<std::uint32_t> range_of(n, 0xffffffffu);
      std::atomic<int> calls{0};
      for_each_index(ctx, n, RangeRecorder{out.data(), in.data(), range_of.data(), &calls});
      CHECK(static_cast<std::size_t>(calls.load()) == chunk_count(n, kHostElementChunk));
      for (std::size_t i = 0; i < n; i += 997) CHECK(range_of[i] == i / kHostElementChunk * kHostElementChunk);
      CHECK(range_of[n - 1] == (n - 1) / kHostElementChunk * kHostElementChunk);
      // The range method's values are the per-element ones.
      for (std::size_t i = 0; i < n; i += 101) CHECK(out[i] == std::exp(in[i]) * 0.5f + in[i]);
      return out;
    });
    const auto per_element = same_at_every_thread_count([&](HostContext& ctx) {
      std::vector<float> out(n, std::numeric_limits<float>::quiet_NaN());
      for_each_index(ctx, n, PerElement{out.data(), in.data()});
      return out;
    });
    std::vector<float> serial(n);
    for (std::size_t i = 0; i < n; ++i) PerElement{serial.data(), in.data()}(i);
    CHECK(same_bits(per_element, serial));
  }
  // The library's own functors (fused GELU with dropout, drop masks) through the context.
  const std::size_t n = 5 * kHostElementChunk + 333;
  const auto z = random_vector<float>(n, rng, -4.0, 4.0);
  HostContext mask_ctx({.threads = 1});
  const auto mask = make_drop_scale<float>(ModuleCall<HostContext>{mask_ctx, 3, 5, rng(), true}, 0.2, 0.25,
                                           RandomPurpose::HiddenDropout, 96);
  REQUIRE(mask.active());
  same_at_every_thread_count([&](HostContext& ctx) {
    std::vector<float> a(n), g = z;
    for_each_index(ctx, n, GeluDropForward<float>{a.data(), z.data(), mask});
    for_each_index(ctx, n, GeluDropBackward<float>{g.data(), z.data(), mask});
    for_each_index(ctx, n, DropApply<float>{g.data(), g.data(), mask});
    a.insert(a.end(), g.begin(), g.end());
    return a;
  });
}

TEMPLATE_TEST_CASE("gemm, gemm_bias_add and gemm_strided_batched are bit-identical at 1, 2 and 3 threads and "
                   "within k u sum|a b| of a double reference",
                   "[threads][gemm]", float, double) {
  using T = TestType;
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed << ", host GEMM " << host_gemm_backend());
  struct Case {
    std::int64_t m, n, k;
  };
  // Odd sizes: several blocks along the rows, along the columns, one block, empty k.
  for (const Case cs : {Case{1031, 301, 67}, Case{139, 1207, 71}, Case{517, 333, 129}, Case{45, 37, 29},
                        Case{300, 200, 0}}) {
    for (const Transpose ta : {Transpose::No, Transpose::Yes}) {
      for (const Transpose tb : {Transpose::No, Transpose::Yes}) {
        const auto [m, n, k] = cs;
        const HostGemmBlocks blocks = host_gemm_blocks(m, n, k);
        INFO("m " << m << " n " << n << " k " << k << " ta " << (ta == Transpose::Yes) << " tb "
                  << (tb == Transpose::Yes) << ", " << blocks.count << " blocks along "
                  << (blocks.rows ? "rows" : "columns"));
        const std::int64_t lda = (ta == Transpose::No ? k : m) + 3, ldb = (tb == Transpose::No ? n : k) + 1,
                           ldc = n + 5;
        const auto a = random_vector<T>(static_cast<std::size_t>((ta == Transpose::No ? m : k) * lda), rng);
        const auto b = random_vector<T>(static_cast<std::size_t>((tb == Transpose::No ? k : n) * ldb), rng);
        const auto c0 = random_vector<T>(static_cast<std::size_t>(m * ldc), rng);
        const auto bias = random_vector<T>(static_cast<std::size_t>(n), rng);
        const T alpha = T(0.75), beta = T(-0.5);
        const auto got = same_at_every_thread_count([&](HostContext& ctx) {
          std::vector<T> c = c0;
          gemm<T>(ctx, ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
          return c;
        });
        const auto fused = same_at_every_thread_count([&](HostContext& ctx) {
          std::vector<T> d = c0;  // D = alpha op(A) op(B) + bias + 0.5 D (addend == D)
          gemm_bias_add<T>(ctx, ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, bias.data(), T(0.5), d.data(),
                           d.data(), ldc);
          return d;
        });
        // Against double: |error| <= (k + 2) u sum_p |alpha a b| + the beta term's rounding.
        const double u = half_epsilon<T>();
        double worst = 0;
        for (std::int64_t i = 0; i < m; i += 7) {
          for (std::int64_t j = 0; j < n; j += 5) {
            double exact = 0, mag = 0;
            for (std::int64_t p = 0; p < k; ++p) {
              const double av = ta == Transpose::No ? a[i * lda + p] : a[p * lda + i];
              const double bv = tb == Transpose::No ? b[p * ldb + j] : b[j * ldb + p];
              exact += double(alpha) * av * bv;
              mag += std::abs(double(alpha) * av * bv);
            }
            const double cv = c0[i * ldc + j];
            const double tol = double(k + 4) * u * (mag + std::abs(cv)) + 4 * u * std::abs(cv);
            worst = std::max(worst, std::abs(got[i * ldc + j] - (exact + double(beta) * cv)) / (tol + 1e-300));
            const double fused_want = exact + double(bias[j]) + 0.5 * cv;
            worst = std::max(worst, std::abs(fused[i * ldc + j] - fused_want) /
                                        (tol + 4 * u * std::abs(double(bias[j])) + 1e-300));
          }
        }
        CHECK(worst <= 1.0);
        // Columns between n and ldc are never touched.
        for (std::int64_t i = 0; i < m; i += 11)
          for (std::int64_t j = n; j < ldc; ++j) CHECK(got[i * ldc + j] == c0[i * ldc + j]);
      }
    }
  }
  // Batched: the items of every batch, also when each GEMM is split into blocks.
  for (const Case cs : {Case{37, 41, 23}, Case{613, 129, 97}}) {
    const auto [m, n, k] = cs;
    const std::int64_t batch = 7;
    INFO("batched m " << m << " n " << n << " k " << k << ", " << host_gemm_blocks(m, n, k).count << " blocks each");
    const std::int64_t sa = m * k + 3, sb = k * n + 1, sc = m * n + 2;
    const auto a = random_vector<T>(static_cast<std::size_t>(sa * batch), rng);
    const auto b = random_vector<T>(static_cast<std::size_t>(sb * batch), rng);
    const auto c0 = random_vector<T>(static_cast<std::size_t>(sc * batch), rng);
    const auto got = same_at_every_thread_count([&](HostContext& ctx) {
      std::vector<T> c = c0;
      gemm_strided_batched<T>(ctx, Transpose::No, Transpose::Yes, m, n, k, T(1), a.data(), k, sa, b.data(), k, sb,
                              T(1), c.data(), n, sc, batch);
      return c;
    });
    // Each item equals the same GEMM done alone, through gemm on one thread.
    HostContext one({.threads = 1});
    for (std::int64_t i = 0; i < batch; ++i) {
      std::vector<T> ci(c0.begin() + i * sc, c0.begin() + i * sc + m * n);
      gemm<T>(one, Transpose::No, Transpose::Yes, m, n, k, T(1), a.data() + i * sa, k, b.data() + i * sb, k, T(1),
              ci.data(), n);
      CHECK(std::equal(ci.begin(), ci.end(), got.begin() + i * sc));
      CHECK(got[i * sc + m * n] == c0[i * sc + m * n]);  // the gap between items is untouched
    }
  }
}

TEMPLATE_TEST_CASE("LayerNorm, softmax and column sums are bit-identical at 1, 2 and 3 threads and match the "
                   "single-thread kernels",
                   "[threads][rows]", float, double) {
  using T = TestType;
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const double u = half_epsilon<T>();
  // Odd sizes: many row chunks (rows x width well above kHostRowChunkElements), one chunk.
  for (const auto& [rows, d] : {std::pair<std::int64_t, std::int64_t>{1001, 77}, {4099, 5}, {13, 31}}) {
    INFO("rows " << rows << " width " << d << ", " << host_row_chunk(rows, d) << " rows per chunk");
    const auto n = static_cast<std::size_t>(rows * d);
    const auto x = random_vector<T>(n, rng, -2.0, 3.0);
    const auto dy = random_vector<T>(n, rng);
    const auto gamma = random_vector<T>(static_cast<std::size_t>(d), rng, 0.5, 1.5);
    const auto beta = random_vector<T>(static_cast<std::size_t>(d), rng);
    const auto dx0 = random_vector<T>(n, rng);
    const auto dgb0 = random_vector<T>(static_cast<std::size_t>(2 * d), rng);

    // LayerNorm forward (y, mean, rstd) equals the single-thread kernel bit for bit.
    const auto fwd = same_at_every_thread_count([&](HostContext& ctx) {
      std::vector<T> out(n + 2 * static_cast<std::size_t>(rows));
      layer_norm_forward<T>(ctx, x.data(), rows, d, gamma.data(), beta.data(), T(1e-5), out.data(), out.data() + n,
                            out.data() + n + rows);
      return out;
    });
    std::vector<T> serial(n + 2 * static_cast<std::size_t>(rows));
    layer_norm_forward<T>(x.data(), rows, d, gamma.data(), beta.data(), T(1e-5), serial.data(), serial.data() + n,
                          serial.data() + n + rows);
    CHECK(same_bits(fwd, serial));

    // Backward: dx equals the kernel's bit for bit (rows are independent); dgamma and dbeta
    // are summed per chunk and within (rows + 2) u sum|terms| of the single-thread sums.
    const T* mean = fwd.data() + n;
    const T* rstd = fwd.data() + n + rows;
    const auto bwd = same_at_every_thread_count([&](HostContext& ctx) {
      std::vector<T> out = dx0;
      out.insert(out.end(), dgb0.begin(), dgb0.end());
      layer_norm_backward<T>(ctx, x.data(), mean, rstd, gamma.data(), dy.data(), rows, d, out.data(), out.data() + n,
                             out.data() + n + d);
      return out;
    });
    std::vector<T> sb = dx0;
    sb.insert(sb.end(), dgb0.begin(), dgb0.end());
    layer_norm_backward<T>(x.data(), mean, rstd, gamma.data(), dy.data(), rows, d, sb.data(), sb.data() + n,
                           sb.data() + n + d);
    CHECK(std::equal(sb.begin(), sb.begin() + static_cast<std::ptrdiff_t>(n), bwd.begin()));
    for (std::int64_t j = 0; j < d; ++j) {
      double mag_g = std::abs(double(dgb0[j])), mag_b = std::abs(double(dgb0[d + j]));
      for (std::int64_t r = 0; r < rows; ++r) {
        const double xhat = (double(x[r * d + j]) - double(mean[r])) * double(rstd[r]);
        mag_g += std::abs(double(dy[r * d + j]) * xhat);
        mag_b += std::abs(double(dy[r * d + j]));
      }
      const double tol = 2.0 * double(rows + 2) * u;
      CHECK(std::abs(double(bwd[n + j]) - double(sb[n + j])) <= tol * mag_g);
      CHECK(std::abs(double(bwd[n + d + j]) - double(sb[n + d + j])) <= tol * mag_b);
    }

    // Softmax forward and backward, at leading dimension d + 2 (the gap stays untouched).
    const std::int64_t ld = d + 2;
    const auto s0 = random_vector<T>(static_cast<std::size_t>(rows * ld), rng, -5.0, 5.0);
    const auto g0 = random_vector<T>(static_cast<std::size_t>(rows * ld), rng);
    const auto sm = same_at_every_thread_count([&](HostContext& ctx) {
      std::vector<T> p = s0, g = g0;
      softmax_rows_inplace<T>(ctx, p.data(), rows, d, ld);
      softmax_rows_backward_inplace<T>(ctx, p.data(), g.data(), rows, d, ld, T(0.125));
      p.insert(p.end(), g.begin(), g.end());
      return p;
    });
    std::vector<T> p = s0, g = g0;
    softmax_rows_inplace<T>(p.data(), rows, d, ld);
    softmax_rows_backward_inplace<T>(p.data(), g.data(), rows, d, ld, T(0.125));
    p.insert(p.end(), g.begin(), g.end());
    CHECK(same_bits(sm, p));
    for (std::int64_t r = 0; r < rows; r += 97) CHECK(sm[r * ld + d] == s0[r * ld + d]);

    // Column sums: bit-identical across threads, within (rows + 1) u sum|x| of double.
    const auto out0 = random_vector<T>(static_cast<std::size_t>(d), rng);
    const auto sums = same_at_every_thread_count([&](HostContext& ctx) {
      std::vector<T> out = out0;
      column_sums_add<T>(ctx, rows, d, dy.data(), out.data());
      return out;
    });
    for (std::int64_t j = 0; j < d; ++j) {
      double exact = out0[j], mag = std::abs(double(out0[j]));
      for (std::int64_t r = 0; r < rows; ++r) {
        exact += dy[r * d + j];
        mag += std::abs(double(dy[r * d + j]));
      }
      CHECK(std::abs(double(sums[j]) - exact) <= double(rows + 1) * u * mag);
    }
  }
}

TEST_CASE("a ViT training step, reversible and standard, is bit-identical at 1, 2 and 3 threads",
          "[threads][vit]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  using T = float;
  using Sched = ConstantSchedule;
  using Layer = VitLayer<T, Sched>;
  // Large enough that every kernel splits: rows 8 x 65 = 520 (GEMMs of 2 blocks, 7 chunks of
  // elements and of LayerNorm rows), 8 x 3 heads of 65 x 65 attention; drop-path and dropout on.
  const Shape shape{8, 65, 96};
  const VitLayerConfig cfg{96, 3, 384, 1e-6, 0.2, 0.1, DropPathRule::Uniform};
  const auto n = static_cast<std::size_t>(shape.numel());
  const auto h0 = random_vector<T>(n, rng);
  const auto dout = random_vector<T>(n, rng);
  const std::uint64_t weight_seed = rng(), stack_seed = rng();
  for (const BackpropMode mode : {BackpropMode::Reversible, BackpropMode::Standard}) {
    for (const Coefficients c : {Coefficients{0.0, 1.0}, Coefficients{0.5, 0.75}}) {
      INFO((mode == BackpropMode::Reversible ? "reversible" : "standard") << ", alpha " << c.alpha << " beta "
                                                                          << c.beta);
      // Two steps (the second with other masks and accumulated gradients): the output of each,
      // dL/dh0 of each and every parameter gradient after both, concatenated.
      same_at_every_thread_count([&](HostContext& ctx) {
        ReversibleStack<Layer> stack(ctx, make_vit_layers<T, Sched>(3, cfg, weight_seed), Sched(c),
                                     {.mode = mode, .seed = stack_seed});
        std::vector<T> all;
        std::vector<T> out(n), dh0(n);
        stack.zero_grad();
        for (std::int64_t step : {1, 2}) {
          stack.forward(ConstView<T>(h0.data(), shape), TensorView<T>(out.data(), shape), step);
          stack.backward(ConstView<T>(dout.data(), shape), TensorView<T>(dh0.data(), shape));
          all.insert(all.end(), out.begin(), out.end());
          all.insert(all.end(), dh0.begin(), dh0.end());
        }
        std::size_t params = 0;
        for (auto& p : stack.parameters()) {
          all.insert(all.end(), p.grad.data(), p.grad.data() + p.grad.numel());
          ++params;
        }
        CHECK(params == 3 * 12);  // every layer's 12 parameters (4 Linear x 2, 2 LayerNorm x 2)
        CHECK(std::all_of(all.begin(), all.end(), [](T v) { return std::isfinite(v); }));
        return all;
      });
    }
  }
}
