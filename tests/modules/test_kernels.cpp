// Host kernels the ViT functions are built from: GEMM (both paths) against naive loops,
// Philox4x32-10 known answers, drop masks, LayerNorm / GELU / softmax against independent
// formulas.

#include <algorithm>
#include <cmath>
#include <catch2/catch.hpp>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "dr2net/backend/host/gelu.hpp"
#include "dr2net/backend/host/gemm.hpp"
#include "dr2net/backend/host/layer_norm.hpp"
#include "dr2net/backend/host/softmax.hpp"
#include "dr2net/core/philox.hpp"
#include "dr2net/modules/drop.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;
using dr2net::testing::random_vector;

namespace {

// C = alpha op(A) op(B) + beta C by the definition, in long double.
template <class T>
std::vector<T> naive_gemm(Transpose ta, Transpose tb, std::int64_t m, std::int64_t n, std::int64_t k, T alpha,
                          const std::vector<T>& a, std::int64_t lda, const std::vector<T>& b, std::int64_t ldb, T beta,
                          const std::vector<T>& c, std::int64_t ldc) {
  std::vector<T> out = c;
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < n; ++j) {
      long double s = 0;
      for (std::int64_t p = 0; p < k; ++p) {
        const long double av = ta == Transpose::No ? a[static_cast<std::size_t>(i * lda + p)]
                                                   : a[static_cast<std::size_t>(p * lda + i)];
        const long double bv = tb == Transpose::No ? b[static_cast<std::size_t>(p * ldb + j)]
                                                   : b[static_cast<std::size_t>(j * ldb + p)];
        s += av * bv;
      }
      const auto idx = static_cast<std::size_t>(i * ldc + j);
      const long double prior = beta == T(0) ? 0.0L : static_cast<long double>(beta) * c[idx];
      out[idx] = static_cast<T>(static_cast<long double>(alpha) * s + prior);
    }
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("host GEMM (CBLAS or loops) and the loop GEMM match naive loops", "[kernels][gemm]", float,
                   double) {
  using T = TestType;
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed << ", host_gemm backend: " << host_gemm_backend());
  struct Size {
    std::int64_t m, n, k;
  };
  // Odd sizes, edges of the register tile (4 x 32 bytes) and of the cache blocks (KC 256, MC 64, NC 1024).
  for (Size s : {Size{1, 1, 1}, Size{5, 3, 7}, Size{67, 33, 260}, Size{130, 1030, 3}, Size{9, 17, 0}}) {
    for (Transpose ta : {Transpose::No, Transpose::Yes}) {
      for (Transpose tb : {Transpose::No, Transpose::Yes}) {
        struct Coef {
          T alpha, beta;
        };
        for (Coef c : {Coef{T(1), T(0)}, Coef{T(-0.75), T(1)}, Coef{T(1.5), T(-0.5)}}) {
          INFO("m " << s.m << " n " << s.n << " k " << s.k << " ta " << int(ta) << " tb " << int(tb) << " alpha "
                    << c.alpha << " beta " << c.beta);
          // Leading dimensions padded beyond the row lengths.
          const std::int64_t lda = (ta == Transpose::No ? s.k : s.m) + 3, ldb = (tb == Transpose::No ? s.n : s.k) + 1,
                             ldc = s.n + 2;
          const auto a = random_vector<T>(static_cast<std::size_t>((ta == Transpose::No ? s.m : s.k) * lda), rng);
          const auto b = random_vector<T>(static_cast<std::size_t>((tb == Transpose::No ? s.k : s.n) * ldb), rng);
          auto c0 = random_vector<T>(static_cast<std::size_t>(s.m * ldc), rng);
          // With beta = 0, C must be written without being read: poison it.
          if (c.beta == T(0)) std::fill(c0.begin(), c0.end(), std::numeric_limits<T>::quiet_NaN());
          const auto expect = naive_gemm(ta, tb, s.m, s.n, s.k, c.alpha, a, lda, b, ldb, c.beta, c0, ldc);
          // |error| <= k * u * (|alpha| sum |a||b| + |beta c|) with |a|, |b|, |c| <= 1; generously:
          const double tol = 4.0 * static_cast<double>(s.k + 2) * unit_roundoff<T>() * 2.0;
          auto c1 = c0, c2 = c0;
          host_gemm<T>(ta, tb, s.m, s.n, s.k, c.alpha, a.data(), lda, b.data(), ldb, c.beta, c1.data(), ldc);
          host_gemm_loops<T>(ta, tb, s.m, s.n, s.k, c.alpha, a.data(), lda, b.data(), ldb, c.beta, c2.data(), ldc);
          double e1 = 0, e2 = 0;
          for (std::int64_t i = 0; i < s.m; ++i)
            for (std::int64_t j = 0; j < s.n; ++j) {
              const auto idx = static_cast<std::size_t>(i * ldc + j);
              e1 = std::max(e1, std::abs(double(c1[idx]) - double(expect[idx])));
              e2 = std::max(e2, std::abs(double(c2[idx]) - double(expect[idx])));
            }
          CHECK(e1 <= tol);
          CHECK(e2 <= tol);
          // The padding between rows of C is never touched.
          for (std::int64_t i = 0; i < s.m; ++i)
            for (std::int64_t j = s.n; j < ldc; ++j) {
              const auto idx = static_cast<std::size_t>(i * ldc + j);
              CHECK((std::isnan(c1[idx]) ? std::isnan(c0[idx]) : c1[idx] == c0[idx]));
              CHECK((std::isnan(c2[idx]) ? std::isnan(c0[idx]) : c2[idx] == c0[idx]));
            }
        }
      }
    }
  }
  std::vector<T> x(12);
  CHECK_THROWS_WITH(host_gemm<T>(Transpose::No, Transpose::No, 3, 4, 5, T(1), x.data(), 4, x.data(), 4, T(0), x.data(), 4),
                    Catch::Contains("lda = 4"));
}

TEST_CASE("Philox4x32-10 reproduces the Random123 known answers", "[kernels][philox]") {
  struct Kat {
    PhiloxBlock counter;
    PhiloxKey key;
    PhiloxBlock expect;
  };
  const Kat kats[] = {
      {{{0u, 0u, 0u, 0u}}, {{0u, 0u}}, {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
       {{0xffffffffu, 0xffffffffu}},
       {{0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
       {{0xa4093822u, 0x299f31d0u}},
       {{0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}}},
  };
  for (const Kat& k : kats) {
    const PhiloxBlock r = philox4x32_10(k.counter, k.key);
    for (int i = 0; i < 4; ++i) CHECK(r.v[i] == k.expect.v[i]);
  }
  // The stream layout: word index % 4 of the block of counter index / 4.
  const PhiloxStream s = make_philox_stream(0x0123456789abcdefull, 5, 3, RandomPurpose::OutputDropout);
  CHECK(s.key.v[0] == 0x89abcdefu);
  CHECK(s.key.v[1] == 0x01234567u);
  CHECK(s.module_purpose == 3u * 8u + 1u);
  CHECK(s.step_low == 5u);
  const PhiloxBlock b = philox4x32_10(PhiloxBlock{{2u, 0u, 25u, 5u}}, s.key);
  for (std::uint32_t lane = 0; lane < 4; ++lane) CHECK(s.bits(8 + lane) == b.v[lane]);
  // A step beyond 32 bits changes the key, not the counter.
  const PhiloxStream far = make_philox_stream(0, (std::int64_t{1} << 32) + 5, 3, RandomPurpose::OutputDropout);
  CHECK(far.step_low == 5u);
  CHECK(far.key.v[1] == 1u);
}

TEST_CASE("Philox uniforms lie in [0, 1) and look uniform", "[kernels][philox]") {
  CHECK(uniform_from_bits(0u) == 0.0f);
  CHECK(uniform_from_bits(0xffffffffu) < 1.0f);
  CHECK(uniform_from_bits(0xffffffffu) == 1.0f - 5.9604644775390625e-08f);
  CHECK(uniform53_from_bits(0xffffffffu, 0xffffffffu) < 1.0);
  CHECK(uniform53_from_bits(0u, 0u) == 0.0);
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const PhiloxStream s = make_philox_stream(rng(), 7, 1, RandomPurpose::Init);
  const int n = 1 << 16;
  double sum = 0, sum53 = 0;
  int low = 0;
  for (int i = 0; i < n; ++i) {
    const float u = uniform_from_bits(s.bits(static_cast<std::uint64_t>(i)));
    REQUIRE(u >= 0.0f);
    REQUIRE(u < 1.0f);
    sum += u;
    low += u < 0.25f;
    const PhiloxBlock blk = s.block(static_cast<std::uint64_t>(i));
    const double u53 = uniform53_from_bits(blk.v[0], blk.v[1]);
    REQUIRE(u53 >= 0.0);
    REQUIRE(u53 < 1.0);
    sum53 += u53;
  }
  // Mean 1/2 with standard error sqrt(1/12 / n) ~ 0.0011; quarter counts have sd ~ 110.
  CHECK(std::abs(sum / n - 0.5) < 0.01);
  CHECK(std::abs(sum53 / n - 0.5) < 0.01);
  CHECK(std::abs(low - n / 4) < 1000);
}

TEST_CASE("drop masks keep 1 - p of the elements, scale them, and depend on step, module and purpose",
          "[kernels][drop]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  CHECK(keep_threshold(0.0) == (1u << 24));
  CHECK(keep_threshold(0.25) == 3u * (1u << 22));
  const std::uint64_t stack_seed = rng();
  auto mask = [&](std::int64_t step, int module, bool training, double p_path, double p_drop, RandomPurpose purpose) {
    const ModuleCall<HostContext> call{ctx, module, step, stack_seed, training};
    const DropScale<double> d = make_drop_scale<double>(call, p_path, p_drop, purpose, 100);
    std::vector<double> f(4000);
    for (std::size_t i = 0; i < f.size(); ++i) f[i] = d(i);
    return f;
  };
  const auto m = mask(3, 2, true, 0.0, 0.3, RandomPurpose::OutputDropout);
  const auto kept = std::count_if(m.begin(), m.end(), [](double v) { return v != 0; });
  CHECK(std::abs(static_cast<double>(kept) / 4000.0 - 0.7) < 0.05);  // sd ~ 0.007
  for (double v : m) CHECK((v == 0.0 || v == 1.0 / 0.7));
  CHECK(m == mask(3, 2, true, 0.0, 0.3, RandomPurpose::OutputDropout));  // replayable
  CHECK(m != mask(4, 2, true, 0.0, 0.3, RandomPurpose::OutputDropout));  // another step
  CHECK(m != mask(3, 3, true, 0.0, 0.3, RandomPurpose::OutputDropout));  // another module
  CHECK(m != mask(3, 2, true, 0.0, 0.3, RandomPurpose::HiddenDropout));  // another purpose
  // Drop-path: whole samples of 100 elements share one decision.
  const auto dp = mask(1, 0, true, 0.5, 0.0, RandomPurpose::OutputDropout);
  int dropped_samples = 0;
  for (std::size_t b = 0; b < 40; ++b) {
    for (std::size_t i = 0; i < 100; ++i) REQUIRE(dp[b * 100 + i] == dp[b * 100]);
    dropped_samples += dp[b * 100] == 0.0;
    CHECK((dp[b * 100] == 0.0 || dp[b * 100] == 2.0));
  }
  CHECK(dropped_samples > 3);  // 20 expected, sd 3.2
  CHECK(dropped_samples < 37);
  // Not training, or rates 0: no mask at all.
  for (double v : mask(1, 0, false, 0.5, 0.5, RandomPurpose::OutputDropout)) CHECK(v == 1.0);
  for (double v : mask(1, 0, true, 0.0, 0.0, RandomPurpose::OutputDropout)) CHECK(v == 1.0);
  CHECK_THROWS_WITH(check_drop_rate(1.0, "proj_drop", "VitAttention"),
                    Catch::Contains("proj_drop") && Catch::Contains("[0, 1)"));
}

TEST_CASE("GELU is the exact erf form; its derivative matches central differences", "[kernels][gelu]") {
  // Reference values 0.5 x (1 + erf(x / sqrt 2)) to 30 digits (mpmath: x * ncdf(x)).
  CHECK(gelu_erf(0.0) == 0.0);
  CHECK(gelu_erf(1.0) == Approx(0.8413447460685429).epsilon(1e-15));
  CHECK(gelu_erf(-1.0) == Approx(-0.15865525393145707).epsilon(1e-14));
  CHECK(gelu_erf(3.0) == Approx(2.9959503059051097).epsilon(1e-15));
  CHECK(gelu_erf(1.0f) == Approx(0.8413447460685429).epsilon(1e-6));
  for (double x = -6.0; x <= 6.0; x += 0.37) {
    // Independent form: x * Phi(x) with the normal CDF from erfc.
    CHECK(gelu_erf(x) == Approx(x * 0.5 * std::erfc(-x / std::sqrt(2.0))).margin(1e-15).epsilon(1e-14));
    const double h = 1e-5;
    const double fd = (gelu_erf(x + h) - gelu_erf(x - h)) / (2 * h);
    CHECK(gelu_erf_derivative(x) == Approx(fd).margin(1e-9));
  }
}

TEST_CASE("LayerNorm normalises each row (mean 0, biased variance 1) and its backward matches differences",
          "[kernels][layernorm]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const std::int64_t rows = 5, d = 9;
  auto x = random_vector<double>(static_cast<std::size_t>(rows * d), rng, -3.0, 5.0);
  std::vector<double> ones(static_cast<std::size_t>(d), 1.0), zeros(static_cast<std::size_t>(d), 0.0);
  std::vector<double> y(x.size()), mean(static_cast<std::size_t>(rows)), rstd(mean.size());
  const double eps = 1e-6;
  layer_norm_forward<double>(x.data(), rows, d, ones.data(), zeros.data(), eps, y.data(), mean.data(), rstd.data());
  for (std::int64_t r = 0; r < rows; ++r) {
    long double mu = 0, var = 0, ym = 0, yv = 0;
    for (std::int64_t j = 0; j < d; ++j) mu += x[static_cast<std::size_t>(r * d + j)];
    mu /= d;
    for (std::int64_t j = 0; j < d; ++j) {
      const long double dx = x[static_cast<std::size_t>(r * d + j)] - mu;
      var += dx * dx;
    }
    var /= d;  // biased, as PyTorch
    for (std::int64_t j = 0; j < d; ++j) ym += y[static_cast<std::size_t>(r * d + j)];
    ym /= d;
    for (std::int64_t j = 0; j < d; ++j) yv += (y[static_cast<std::size_t>(r * d + j)] - ym) * (y[static_cast<std::size_t>(r * d + j)] - ym);
    yv /= d;
    CHECK(std::abs(static_cast<double>(ym)) < 1e-14);
    CHECK(static_cast<double>(yv) == Approx(static_cast<double>(var / (var + eps))).epsilon(1e-13));
    CHECK(mean[static_cast<std::size_t>(r)] == Approx(static_cast<double>(mu)).epsilon(1e-14));
    CHECK(rstd[static_cast<std::size_t>(r)] == Approx(static_cast<double>(1.0L / std::sqrt(var + eps))).epsilon(1e-14));
  }
  // Affine form and backward against central differences of L = sum(y * w).
  const auto gamma = random_vector<double>(static_cast<std::size_t>(d), rng, 0.5, 1.5);
  const auto beta = random_vector<double>(static_cast<std::size_t>(d), rng);
  const auto w = random_vector<double>(x.size(), rng);
  auto loss = [&](const std::vector<double>& xx, const std::vector<double>& g, const std::vector<double>& b) {
    std::vector<double> yy(xx.size()), mm(mean.size()), rr(mean.size());
    layer_norm_forward<double>(xx.data(), rows, d, g.data(), b.data(), eps, yy.data(), mm.data(), rr.data());
    double s = 0;
    for (std::size_t i = 0; i < yy.size(); ++i) s += yy[i] * w[i];
    return s;
  };
  layer_norm_forward<double>(x.data(), rows, d, gamma.data(), beta.data(), eps, y.data(), mean.data(), rstd.data());
  auto dx = random_vector<double>(x.size(), rng);  // backward accumulates onto this
  const auto dx0 = dx;
  std::vector<double> dg(gamma.size(), 0.0), db(beta.size(), 0.0);
  layer_norm_backward<double>(x.data(), mean.data(), rstd.data(), gamma.data(), w.data(), rows, d, dx.data(), dg.data(),
                              db.data());
  const double h = 1e-6;
  for (std::size_t i = 0; i < x.size(); ++i) {
    auto xp = x, xm = x;
    xp[i] += h;
    xm[i] -= h;
    CHECK(dx[i] - dx0[i] == Approx((loss(xp, gamma, beta) - loss(xm, gamma, beta)) / (2 * h)).margin(1e-7));
  }
  for (std::size_t j = 0; j < gamma.size(); ++j) {
    auto gp = gamma, gm = gamma, bp = beta, bm = beta;
    gp[j] += h;
    gm[j] -= h;
    bp[j] += h;
    bm[j] -= h;
    CHECK(dg[j] == Approx((loss(x, gp, beta) - loss(x, gm, beta)) / (2 * h)).margin(1e-7));
    CHECK(db[j] == Approx((loss(x, gamma, bp) - loss(x, gamma, bm)) / (2 * h)).margin(1e-7));
  }
}

TEST_CASE("softmax rows sum to 1, survive large scores, and the backward matches differences", "[kernels][softmax]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const std::int64_t rows = 4, cols = 7, ld = 9;
  auto s = random_vector<double>(static_cast<std::size_t>(rows * ld), rng, -4.0, 4.0);
  s[3] = 1000.0;  // exp(1000) overflows without the max subtraction
  const auto s0 = s;
  softmax_rows_inplace(s.data(), rows, cols, ld);
  for (std::int64_t r = 0; r < rows; ++r) {
    long double sum = 0, z = 0;
    const double mx = *std::max_element(s0.begin() + r * ld, s0.begin() + r * ld + cols);
    for (std::int64_t j = 0; j < cols; ++j) z += std::exp(static_cast<long double>(s0[static_cast<std::size_t>(r * ld + j)] - mx));
    for (std::int64_t j = 0; j < cols; ++j) {
      const double p = s[static_cast<std::size_t>(r * ld + j)];
      REQUIRE(std::isfinite(p));
      sum += p;
      CHECK(p == Approx(static_cast<double>(std::exp(static_cast<long double>(s0[static_cast<std::size_t>(r * ld + j)] - mx)) / z)).epsilon(1e-14));
    }
    CHECK(static_cast<double>(sum) == Approx(1.0).epsilon(1e-15));
    for (std::int64_t j = cols; j < ld; ++j) CHECK(s[static_cast<std::size_t>(r * ld + j)] == s0[static_cast<std::size_t>(r * ld + j)]);
  }
  CHECK(s[3] == Approx(1.0));
  // Backward with the scale folded in, against differences of L = sum(softmax(c s) * w).
  const double c = 0.7;
  auto x = random_vector<double>(static_cast<std::size_t>(cols), rng);
  const auto w = random_vector<double>(x.size(), rng);
  auto loss = [&](std::vector<double> v) {
    for (double& e : v) e *= c;
    softmax_rows_inplace(v.data(), 1, cols, cols);
    double l = 0;
    for (std::size_t i = 0; i < v.size(); ++i) l += v[i] * w[i];
    return l;
  };
  std::vector<double> p = x;
  for (double& e : p) e *= c;
  softmax_rows_inplace(p.data(), 1, cols, cols);
  std::vector<double> g = w;
  softmax_rows_backward_inplace(p.data(), g.data(), 1, cols, cols, c);
  for (std::size_t i = 0; i < x.size(); ++i) {
    auto xp = x, xm = x;
    xp[i] += 1e-6;
    xm[i] -= 1e-6;
    CHECK(g[i] == Approx((loss(xp) - loss(xm)) / 2e-6).margin(1e-8));
  }
}
