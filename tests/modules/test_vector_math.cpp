// The host's vectorised kernels (SLEEF's erf/exp/tanh, the fused GELU functors' run_range, the
// softmax and LayerNorm rows) against scalar references in long double, within the bounds
// docs/host-performance.md ("Vector math") derives; over odd sizes and misaligned starts; and
// the determinism the thread pool relies on: an element's value does not depend on the range
// it is run in, nor a row's on its address or the rows run with it.
//
// Where DR2NET_HOST_VECTOR_MATH is 0 (no SLEEF) the same kernel tests run the scalar loops,
// whose errors the same bounds cover; the SLEEF function tests then do not exist. GELU takes
// SLEEF's erf only where DR2NET_HOST_VECTOR_ERF is 1 (8 lanes or more by default): the
// executable test_vector_math_sleef_erf compiles this file again with it forced to 1, so the
// vector GELU is tested in a default (4-lane) build too.
//
// u = 2^-24 is float's unit roundoff (half of FLT_EPSILON). The bounds are worst-case (a sum of
// n terms is charged n u), so they hold for any summation order.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/backend/host/layer_norm.hpp"
#include "dr2net/backend/host/softmax.hpp"
#include "dr2net/backend/host/vector_math.hpp"
#include "dr2net/modules/activation.hpp"
#include "dr2net/modules/drop.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;

namespace {

constexpr long double kU = FLT_EPSILON / 2.0L;  // float's unit roundoff
using ld = long double;

// Sizes around the vector widths (4, 8, 16) and the ViT's rows (197 tokens, 192 and 768 wide).
const std::vector<std::size_t> kSizes = {1, 2, 3, 4, 5, 7, 8, 9, 13, 15, 16, 17, 31, 33, 63, 65, 100, 197, 769};

// A buffer of n floats starting `offset` elements (1..7: never 16-byte aligned for odd offsets,
// never 32- or 64-byte aligned for any) into 64-byte aligned storage, padded with a sentinel on
// both sides so that writes outside [0, n) show.
struct Misaligned {
  static constexpr float kSentinel = -12345.0f;
  std::vector<float> store;
  std::size_t offset;
  Misaligned(std::size_t n, std::size_t off) : store(n + 32, kSentinel), offset(off + 8) {}
  float* data() { return store.data() + offset; }
  // Whether everything outside [0, n) still holds the sentinel.
  bool untouched_outside(std::size_t n) const {
    for (std::size_t i = 0; i < store.size(); ++i)
      if ((i < offset || i >= offset + n) && std::memcmp(&store[i], &kSentinel, sizeof(float)) != 0) return false;
    return true;
  }
};

bool same_bits(const float* a, const float* b, std::size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

ld gelu_ref(ld x) { return 0.5L * x * (1.0L + std::erf(x / std::sqrt(2.0L))); }
ld gelu_derivative_ref(ld x) {
  const ld pi = 3.14159265358979323846264338327950288L;
  return 0.5L * (1.0L + std::erf(x / std::sqrt(2.0L))) + x * std::exp(-0.5L * x * x) / std::sqrt(2.0L * pi);
}

// A training dropout (and, with `path`, drop-path over samples of 5 elements) mask, or none.
DropScale<float> make_mask(HostContext& ctx, std::mt19937_64& rng, bool active, bool path) {
  const ModuleCall<HostContext> call{ctx, static_cast<int>(rng() % 64), static_cast<std::int64_t>(rng() % 1000), rng(),
                                     active};
  return make_drop_scale<float>(call, path ? 0.3 : 0.0, 0.25, RandomPurpose::HiddenDropout, 5);
}

// Random cut points splitting [0, n) into ranges, among them cuts one element off a vector width.
std::vector<std::size_t> random_cuts(std::size_t n, std::mt19937_64& rng) {
  std::vector<std::size_t> cuts = {0, n};
  for (std::size_t c : {std::size_t{1}, std::size_t{3}, std::size_t{5}, std::size_t{7}, std::size_t{9},
                        std::size_t{15}, std::size_t{17}})
    if (c < n) cuts.push_back(c);
  for (int k = 0; k < 6 && n > 1; ++k) cuts.push_back(rng() % n);
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  return cuts;
}

template <class Fn>
void run_split(const Fn& fn, const std::vector<std::size_t>& cuts) {
  for (std::size_t k = 0; k + 1 < cuts.size(); ++k) fn.run_range(cuts[k], cuts[k + 1]);
}

}  // namespace

#if DR2NET_HOST_VECTOR_MATH
namespace {

// The spacing of floats at |r| (2^-149 below FLT_MIN): what "1 ulp" means for a float result.
ld ulp_of(ld r) {
  r = std::fabs(r);
  if (r < FLT_MIN) return std::ldexp(1.0L, -149);
  int e = 0;
  std::frexp(r, &e);  // r = m 2^e, m in [0.5, 1)
  return std::ldexp(1.0L, e - 24);
}

// Largest error in ulps of the vector function f over x (through simd::apply: tails padded).
template <class F, class R>
double worst_ulps(const std::vector<float>& x, F f, R ref, float& worst_x) {
  std::vector<float> y(x.size());
  detail::simd::apply(x.data(), y.data(), x.size(), f);
  double worst = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const ld r = ref(static_cast<ld>(x[i]));
    const double e = static_cast<double>(std::fabs(static_cast<ld>(y[i]) - r) / ulp_of(r));
    if (!(e <= worst)) {
      worst = e;
      worst_x = x[i];
    }
  }
  return worst;
}

}  // namespace

TEST_CASE("SLEEF's vector erf, exp and tanh are within 1 ulp of long double", "[kernels][vector-math]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed << ", " << detail::simd::kWidth << " lanes");
  const auto sample = [&](double lo, double hi, std::size_t n, bool log_small) {
    std::uniform_real_distribution<double> u(lo, hi);
    std::vector<float> x(n);
    for (std::size_t i = 0; i < n; ++i) {
      const double v = u(rng);
      x[i] = static_cast<float>(log_small ? std::exp(v) * (i % 2 != 0 ? 1.0 : -1.0) : v);  // |x| in [e^lo, e^hi]
    }
    return x;
  };
  using detail::simd::vfloat;
  // SLEEF's u10 functions claim 1.0 ulp; 1e-3 ulp more covers long double's own rounding and
  // tanh's measured 1.00000002 ulp at tiny arguments (where it returns x's upper neighbour).
  constexpr double kBound = 1.0 + 1e-3;
  float at = 0;
  const auto erf_v = [](vfloat v) { return detail::simd::erf(v); };
  const auto exp_v = [](vfloat v) { return detail::simd::exp(v); };
  const auto tanh_v = [](vfloat v) { return detail::simd::tanh(v); };
  const auto erf_r = [](ld x) { return std::erf(x); };
  const auto exp_r = [](ld x) { return std::exp(x); };
  const auto tanh_r = [](ld x) { return std::tanh(x); };
  const auto check = [&](const char* name, const std::vector<float>& x, auto f, auto ref) {
    const double worst = worst_ulps(x, f, ref, at);
    INFO(name << ": " << worst << " ulp at x = " << at);
    CHECK(worst <= kBound);
  };
  for (const auto& x : {sample(-6.5, 6.5, 200001, false), sample(-80.0, 0.0, 100003, true)}) {
    check("erf", x, erf_v, erf_r);
    check("tanh", x, tanh_v, tanh_r);
  }
  // exp down into the subnormal results (-103.9 < x < -87.3) and up to the overflow threshold.
  check("exp", sample(-103.0, 88.7, 300007, false), exp_v, exp_r);
  check("exp", sample(-80.0, 0.0, 100003, true), exp_v, exp_r);
  // Special values as the C library gives them.
  const std::vector<float> special = {0.0f, -0.0f, std::numeric_limits<float>::infinity(),
                                      -std::numeric_limits<float>::infinity(), 100.0f, -200.0f};
  std::vector<float> e(special.size()), t(special.size()), x2(special.size());
  detail::simd::apply(special.data(), e.data(), special.size(), erf_v);
  detail::simd::apply(special.data(), t.data(), special.size(), tanh_v);
  detail::simd::apply(special.data(), x2.data(), special.size(), exp_v);
  for (std::size_t i = 0; i < special.size(); ++i) {
    INFO("x = " << special[i]);
    CHECK(e[i] == std::erf(special[i]));
    CHECK(t[i] == std::tanh(special[i]));
    CHECK(x2[i] == std::exp(special[i]));
  }
  std::vector<float> nan(5, std::numeric_limits<float>::quiet_NaN()), out(5);
  detail::simd::apply(nan.data(), out.data(), nan.size(), erf_v);
  CHECK(std::all_of(out.begin(), out.end(), [](float v) { return std::isnan(v); }));
}

TEST_CASE("the vector width is the widest the build's target flags allow", "[kernels][vector-math]") {
#if defined(__AVX512F__)
  CHECK(detail::simd::kWidth == 16);
#elif defined(__AVX__)
  CHECK(detail::simd::kWidth == 8);
#else
  CHECK(detail::simd::kWidth == 4);
#endif
  CHECK(detail::simd::kLanes * sizeof(float) == sizeof(detail::simd::vfloat));
}
#endif  // DR2NET_HOST_VECTOR_MATH

TEST_CASE("GELU forward and backward run_range: long double within the documented bounds, misaligned and odd",
          "[kernels][vector-math][gelu]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed << ", vector erf " << DR2NET_HOST_VECTOR_ERF);
  HostContext ctx;
  std::normal_distribution<double> normal(0.0, 2.5);
  for (const bool active : {false, true}) {
    const DropScale<float> mask = make_mask(ctx, rng, active, true);
    for (std::size_t n : kSizes) {
      for (std::size_t off = 1; off <= 7; ++off) {
        INFO("n " << n << ", offset " << off << ", mask " << active);
        Misaligned z(n, off), a(n, (off * 3) % 8), g(n, (off + 2) % 8);
        std::vector<float> g0(n);
        for (std::size_t i = 0; i < n; ++i) {
          z.data()[i] = static_cast<float>(normal(rng));
          g0[i] = g.data()[i] = static_cast<float>(normal(rng));
        }
        GeluDropForward<float>{a.data(), z.data(), mask}.run_range(0, n);
        GeluDropBackward<float>{g.data(), z.data(), mask}.run_range(0, n);
        CHECK(a.untouched_outside(n));
        CHECK(g.untouched_outside(n));
        int bad_fwd = 0, bad_bwd = 0;
        for (std::size_t i = 0; i < n; ++i) {
          const ld x = z.data()[i], f = mask(i);
          // Forward: t = x/sqrt2 (u), erf (1 ulp), 1 + erf (u): |1 + erf| within 2.5u, then
          // (x/2) * that (u): |a - ref| <= (1.25 |x| + |ref|) u; 2 eps |x| |f| + 2u|ref| covers it.
          const ld ref = gelu_ref(x) * f;
          if (std::fabs(static_cast<ld>(a.data()[i]) - ref) > 4 * kU * std::fabs(x * f) + 2 * kU * std::fabs(ref))
            ++bad_fwd;
          // Backward: gelu'(x) within 6u absolute (the cdf term 1.25u + 1u, the pdf term < 1u for
          // any x, their sum u); times g f (2u relative): 8u |g f| + 2u |ref|.
          const ld gref = static_cast<ld>(g0[i]) * f * gelu_derivative_ref(x);
          if (std::fabs(static_cast<ld>(g.data()[i]) - gref) > 8 * kU * std::fabs(g0[i] * f) + 2 * kU * std::fabs(gref))
            ++bad_bwd;
        }
        CHECK(bad_fwd == 0);
        CHECK(bad_bwd == 0);
      }
    }
  }
}

TEST_CASE("GELU run_range agrees with the scalar functor on special values", "[kernels][vector-math][gelu]") {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> z = {0.0f,     -0.0f, inf,        -inf,     1e30f,  -1e30f, FLT_MIN,
                                -FLT_MIN, 1e-40f, 9.0f,      -9.0f,    20.0f, -20.0f, std::nanf("")};
  const std::size_t n = z.size();
  std::vector<float> a(n), a1(n), g(n, 1.5f), g1(n, 1.5f);
  const DropScale<float> none{};
  GeluDropForward<float>{a.data(), z.data(), none}.run_range(0, n);
  GeluDropBackward<float>{g.data(), z.data(), none}.run_range(0, n);
  for (std::size_t i = 0; i < n; ++i) {
    GeluDropForward<float>{a1.data(), z.data(), none}(i);
    GeluDropBackward<float>{g1.data(), z.data(), none}(i);
  }
  for (std::size_t i = 0; i < n; ++i) {
    INFO("z = " << z[i] << ": forward " << a[i] << " vs " << a1[i] << ", backward " << g[i] << " vs " << g1[i]);
    CHECK(std::isnan(a[i]) == std::isnan(a1[i]));
    CHECK(std::isnan(g[i]) == std::isnan(g1[i]));
    if (!std::isnan(a1[i]))
      CHECK((a[i] == a1[i] || std::fabs(a[i] - a1[i]) <= 4 * FLT_EPSILON * std::max(1.0f, std::fabs(z[i]))));
    if (!std::isnan(g1[i])) CHECK((g[i] == g1[i] || std::fabs(g[i] - g1[i]) <= 8 * FLT_EPSILON));
  }
}

TEST_CASE("run_range: element i's value is the same whatever range it is run in", "[kernels][vector-math][gelu]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  std::normal_distribution<double> normal(0.0, 3.0);
  for (const bool active : {false, true}) {
    const DropScale<float> mask = make_mask(ctx, rng, active, true);
    const DropScale<double> mask_d = make_drop_scale<double>(
        ModuleCall<HostContext>{ctx, 3, 11, rng(), active}, 0.2, 0.4, RandomPurpose::OutputDropout, 7);
    for (std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{31}, std::size_t{100}, std::size_t{1027}}) {
      const std::vector<float> z = dr2net::testing::random_vector<float>(n, rng, -6.0, 6.0);
      const std::vector<float> g = dr2net::testing::random_vector<float>(n, rng, -2.0, 2.0);
      std::vector<float> a_whole(n), g_whole = g, d_whole(n);
      GeluDropForward<float>{a_whole.data(), z.data(), mask}.run_range(0, n);
      GeluDropBackward<float>{g_whole.data(), z.data(), mask}.run_range(0, n);
      DropApply<float>{d_whole.data(), g.data(), mask}.run_range(0, n);
      for (int trial = 0; trial < 8; ++trial) {
        const auto cuts = random_cuts(n, rng);
        INFO("n " << n << ", mask " << active << ", " << cuts.size() - 1 << " ranges");
        std::vector<float> a(n), gg = g, d(n);
        run_split(GeluDropForward<float>{a.data(), z.data(), mask}, cuts);
        run_split(GeluDropBackward<float>{gg.data(), z.data(), mask}, cuts);
        run_split(DropApply<float>{d.data(), g.data(), mask}, cuts);
        CHECK(same_bits(a.data(), a_whole.data(), n));
        CHECK(same_bits(gg.data(), g_whole.data(), n));
        CHECK(same_bits(d.data(), d_whole.data(), n));
      }
      // DropApply takes its factors a group at a time, and equals operator() bit for bit; so do
      // the GELU functors on double (never vectorised).
      std::vector<float> d1(n);
      for (std::size_t i = 0; i < n; ++i) DropApply<float>{d1.data(), g.data(), mask}(i);
      CHECK(same_bits(d1.data(), d_whole.data(), n));
      std::vector<double> zd(z.begin(), z.end()), ad(n), ad1(n), gd(g.begin(), g.end()), gd1 = gd;
      const auto cuts = random_cuts(n, rng);
      run_split(GeluDropForward<double>{ad.data(), zd.data(), mask_d}, cuts);
      run_split(GeluDropBackward<double>{gd.data(), zd.data(), mask_d}, cuts);
      for (std::size_t i = 0; i < n; ++i) {
        GeluDropForward<double>{ad1.data(), zd.data(), mask_d}(i);
        GeluDropBackward<double>{gd1.data(), zd.data(), mask_d}(i);
      }
      CHECK(std::memcmp(ad.data(), ad1.data(), n * sizeof(double)) == 0);
      CHECK(std::memcmp(gd.data(), gd1.data(), n * sizeof(double)) == 0);
#if !DR2NET_HOST_VECTOR_ERF
      // Without SLEEF's erf the float functors' run_range is operator() element by element.
      std::vector<float> a1(n), g1 = g;
      for (std::size_t i = 0; i < n; ++i) {
        GeluDropForward<float>{a1.data(), z.data(), mask}(i);
        GeluDropBackward<float>{g1.data(), z.data(), mask}(i);
      }
      CHECK(same_bits(a1.data(), a_whole.data(), n));
      CHECK(same_bits(g1.data(), g_whole.data(), n));
#endif
    }
  }
}

namespace {

// Softmax of one row in long double.
std::vector<ld> softmax_ref(const float* s, std::size_t n) {
  ld mx = -std::numeric_limits<ld>::infinity();
  for (std::size_t j = 0; j < n; ++j) mx = std::max<ld>(mx, s[j]);
  std::vector<ld> p(n);
  ld sum = 0;
  for (std::size_t j = 0; j < n; ++j) sum += p[j] = std::exp(static_cast<ld>(s[j]) - mx);
  for (auto& v : p) v /= sum;
  return p;
}

}  // namespace

TEST_CASE("softmax rows: long double within the documented bound, misaligned, ld > cols, row by row identical",
          "[kernels][vector-math][softmax]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed << ", vector math " << DR2NET_HOST_VECTOR_MATH);
  std::normal_distribution<double> normal(0.0, 4.0);
  for (std::size_t cols : kSizes) {
    for (std::size_t off = 1; off <= 7; off += 2) {
      const std::size_t rows = 3, ld_ = cols + off;  // a leading dimension that misaligns every row
      INFO("cols " << cols << ", offset " << off);
      Misaligned s(rows * ld_, off);
      for (std::size_t i = 0; i < rows * ld_; ++i) s.data()[i] = static_cast<float>(normal(rng));
      for (std::size_t r = 0; r < rows; ++r) s.data()[r * ld_ + rng() % cols] += 25.0f;  // a peaked row
      const std::vector<float> in(s.data(), s.data() + rows * ld_);
      softmax_rows_inplace(s.data(), static_cast<std::int64_t>(rows), static_cast<std::int64_t>(cols),
                           static_cast<std::int64_t>(ld_));
      CHECK(s.untouched_outside(rows * ld_));
      int bad = 0;
      for (std::size_t r = 0; r < rows; ++r) {
        const float* x = in.data() + r * ld_;
        const std::vector<ld> p = softmax_ref(x, cols);
        const ld mx = *std::max_element(x, x + cols);
        ld spread = 0;  // max_k |s_k - max|
        for (std::size_t j = 0; j < cols; ++j) spread = std::max(spread, mx - x[j]);
        for (std::size_t j = 0; j < cols; ++j) {
          // exp(s_j - max): (|s_j - max| + 2) u relative; the sum: (spread + 2 + cols) u; 1/sum
          // and the product: 2u. Worst case over any summation order.
          const ld tol = kU * p[j] * ((mx - x[j]) + spread + static_cast<ld>(cols) + 8) + 1e-44L;
          if (std::fabs(static_cast<ld>(s.data()[r * ld_ + j]) - p[j]) > tol) ++bad;
        }
        for (std::size_t j = cols; j < ld_; ++j) bad += std::memcmp(&s.data()[r * ld_ + j], &in[r * ld_ + j], 4) != 0;
      }
      CHECK(bad == 0);
      // A row's result depends on its values only: each row alone, elsewhere in memory.
      for (std::size_t r = 0; r < rows; ++r) {
        Misaligned one(cols, (off + r + 1) % 8);
        std::copy(in.begin() + static_cast<std::ptrdiff_t>(r * ld_),
                  in.begin() + static_cast<std::ptrdiff_t>(r * ld_ + cols), one.data());
        softmax_rows_inplace(one.data(), 1, static_cast<std::int64_t>(cols), static_cast<std::int64_t>(cols));
        CHECK(same_bits(one.data(), s.data() + r * ld_, cols));
      }
    }
  }
}

TEST_CASE("softmax rows: NaN, +inf and -inf as the scalar kernel treats them", "[kernels][vector-math][softmax]") {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  for (std::size_t cols : {std::size_t{1}, std::size_t{3}, std::size_t{9}, std::size_t{20}}) {
    for (std::size_t at = 0; at < cols; at += 2) {
      INFO("cols " << cols << ", special at " << at);
      for (const float special : {nan, inf}) {  // a row holding NaN or +inf: all NaN
        std::vector<float> row(cols, 0.5f);
        row[at] = special;
        softmax_rows_inplace(row.data(), 1, static_cast<std::int64_t>(cols), static_cast<std::int64_t>(cols));
        CHECK(std::all_of(row.begin(), row.end(), [](float v) { return std::isnan(v); }));
      }
      if (cols == 1) continue;
      std::vector<float> row(cols, 0.5f);  // -inf: probability 0, the others share 1
      row[at] = -inf;
      softmax_rows_inplace(row.data(), 1, static_cast<std::int64_t>(cols), static_cast<std::int64_t>(cols));
      CHECK(row[at] == 0.0f);
      for (std::size_t j = 0; j < cols; ++j)
        if (j != at) CHECK(std::fabs(row[j] - 1.0f / static_cast<float>(cols - 1)) <= 4 * FLT_EPSILON);
    }
  }
  std::vector<float> big = {1e30f, 1e30f, -1e30f, 1e30f, 1e30f};  // no overflow: the maximum is subtracted
  softmax_rows_inplace(big.data(), 1, 5, 5);
  CHECK(big[2] == 0.0f);
  CHECK(std::fabs(big[0] - 0.25f) <= FLT_EPSILON);
}

TEST_CASE("softmax backward rows: long double within the documented bound, misaligned, ld > cols",
          "[kernels][vector-math][softmax]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  for (std::size_t cols : kSizes) {
    const std::size_t off = 1 + rng() % 7, rows = 3, ld_ = cols + 1 + rng() % 7;
    INFO("cols " << cols << ", offset " << off << ", ld " << ld_);
    Misaligned p(rows * ld_, off), g(rows * ld_, (off + 3) % 8);
    for (std::size_t i = 0; i < rows * ld_; ++i) {
      p.data()[i] = static_cast<float>(std::normal_distribution<double>(0.0, 2.0)(rng));
      g.data()[i] = static_cast<float>(std::normal_distribution<double>(0.0, 1.0)(rng));
    }
    softmax_rows_inplace(p.data(), static_cast<std::int64_t>(rows), static_cast<std::int64_t>(cols),
                         static_cast<std::int64_t>(ld_));
    const std::vector<float> g0(g.data(), g.data() + rows * ld_);
    const float scale = 0.125f;
    softmax_rows_backward_inplace(p.data(), g.data(), static_cast<std::int64_t>(rows), static_cast<std::int64_t>(cols),
                                  static_cast<std::int64_t>(ld_), scale);
    CHECK(g.untouched_outside(rows * ld_));
    int bad = 0;
    for (std::size_t r = 0; r < rows; ++r) {
      const float* pr = p.data() + r * ld_;
      const float* gr = g0.data() + r * ld_;
      ld dot = 0, mag = 0;
      for (std::size_t j = 0; j < cols; ++j) {
        dot += static_cast<ld>(gr[j]) * pr[j];
        mag += std::fabs(static_cast<ld>(gr[j]) * pr[j]);
      }
      for (std::size_t j = 0; j < cols; ++j) {
        const ld ref = scale * static_cast<ld>(pr[j]) * (gr[j] - dot);
        // The dot product: (cols + 1) u sum|g p|; g - dot: u; the two products: 2u.
        const ld tol = std::fabs(scale * static_cast<ld>(pr[j])) * (kU * (static_cast<ld>(cols) + 1) * mag +
                                                                     4 * kU * std::fabs(gr[j] - dot)) +
                       1e-44L;
        if (std::fabs(static_cast<ld>(g.data()[r * ld_ + j]) - ref) > tol) ++bad;
      }
      for (std::size_t j = cols; j < ld_; ++j) bad += std::memcmp(&g.data()[r * ld_ + j], &gr[j], 4) != 0;
    }
    CHECK(bad == 0);
  }
}

TEST_CASE("LayerNorm rows: forward and backward against long double, misaligned and odd widths, row by row identical",
          "[kernels][vector-math][layer-norm]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed << ", vector math " << DR2NET_HOST_VECTOR_MATH);
  std::normal_distribution<double> normal(0.0, 1.0);
  const float eps = 1e-6f;
  for (std::size_t d : kSizes) {
    const std::size_t rows = 5, off = 1 + rng() % 7;
    INFO("d " << d << ", offset " << off);
    Misaligned x(rows * d, off), y(rows * d, (off + 1) % 8), gamma(d, (off + 2) % 8), beta(d, (off + 5) % 8);
    Misaligned dy(rows * d, (off + 3) % 8), dx(rows * d, (off + 4) % 8), dgamma(d, (off + 6) % 8),
        dbeta(d, (off + 7) % 8);
    std::vector<float> mean(rows), rstd(rows);
    for (std::size_t r = 0; r < rows; ++r) {
      const double shift = 3.0 * normal(rng), spread = std::exp(normal(rng));  // rows of different offset and scale
      for (std::size_t j = 0; j < d; ++j) x.data()[r * d + j] = static_cast<float>(shift + spread * normal(rng));
    }
    for (std::size_t j = 0; j < d; ++j) {
      gamma.data()[j] = static_cast<float>(1.0 + 0.3 * normal(rng));
      beta.data()[j] = static_cast<float>(0.2 * normal(rng));
      dgamma.data()[j] = static_cast<float>(normal(rng));  // the backward accumulates onto these
      dbeta.data()[j] = static_cast<float>(normal(rng));
    }
    for (std::size_t i = 0; i < rows * d; ++i) {
      dy.data()[i] = static_cast<float>(normal(rng));
      dx.data()[i] = static_cast<float>(normal(rng));
    }
    const std::vector<float> dx0(dx.data(), dx.data() + rows * d), dgamma0(dgamma.data(), dgamma.data() + d),
        dbeta0(dbeta.data(), dbeta.data() + d);
    const auto R = static_cast<std::int64_t>(rows), D = static_cast<std::int64_t>(d);
    layer_norm_forward(x.data(), R, D, gamma.data(), beta.data(), eps, y.data(), mean.data(), rstd.data());
    layer_norm_backward(x.data(), mean.data(), rstd.data(), gamma.data(), dy.data(), R, D, dx.data(), dgamma.data(),
                        dbeta.data());
    CHECK(y.untouched_outside(rows * d));
    CHECK(dx.untouched_outside(rows * d));
    CHECK(dgamma.untouched_outside(d));
    CHECK(dbeta.untouched_outside(d));
    const ld n = static_cast<ld>(d);
    int bad_stats = 0, bad_y = 0, bad_dx = 0;
    std::vector<ld> dgamma_ref(dgamma0.begin(), dgamma0.end()), dbeta_ref(dbeta0.begin(), dbeta0.end()),
        dgamma_mag(d, 0), dbeta_mag(d, 0);
    for (std::size_t r = 0; r < rows; ++r) {
      const float* xr = x.data() + r * d;
      ld mu = 0, absmean = 0;
      for (std::size_t j = 0; j < d; ++j) {
        mu += xr[j];
        absmean += std::fabs(static_cast<ld>(xr[j]));
      }
      mu /= n;
      absmean /= n;
      ld var = 0;
      for (std::size_t j = 0; j < d; ++j) var += (xr[j] - mu) * (xr[j] - mu);
      const ld rs = 1.0L / std::sqrt(var / n + eps);
      // The mean: (d + 1) u mean|x|; rstd: (d + 6) u relative (the squared deviations' sum, the
      // mean's error entering squared, 1/sqrt).
      const ld mu_err = kU * (n + 1) * absmean;
      if (std::fabs(mean[r] - mu) > mu_err) ++bad_stats;
      if (std::fabs(rstd[r] - rs) > kU * (n + 6) * rs + 2 * mu_err * rs * rs * mu_err * rs) ++bad_stats;
      for (std::size_t j = 0; j < d; ++j) {
        const ld xhat = (xr[j] - mu) * rs, ref = xhat * gamma.data()[j] + beta.data()[j];
        // xhat: the mean's error times rstd, plus (d + 9) u |xhat|; then * gamma + beta (2u).
        const ld tol = std::fabs(static_cast<ld>(gamma.data()[j])) * (mu_err * rs + kU * (n + 9) * std::fabs(xhat)) +
                       2 * kU * (std::fabs(ref) + std::fabs(static_cast<ld>(beta.data()[j])));
        if (std::fabs(y.data()[r * d + j] - ref) > tol) ++bad_y;
      }
      // Backward, with the forward's float mean and rstd (as the kernel gets them).
      const ld m = mean[r], s = rstd[r];
      ld s1 = 0, s2 = 0, a1 = 0, a2 = 0;
      for (std::size_t j = 0; j < d; ++j) {
        const ld xh = (xr[j] - m) * s, dxh = static_cast<ld>(dy.data()[r * d + j]) * gamma.data()[j];
        s1 += dxh;
        s2 += dxh * xh;
        a1 += std::fabs(dxh);
        a2 += std::fabs(dxh * xh);
        dgamma_ref[j] += dy.data()[r * d + j] * xh;
        dbeta_ref[j] += dy.data()[r * d + j];
        dgamma_mag[j] += std::fabs(dy.data()[r * d + j] * xh);
        dbeta_mag[j] += std::fabs(static_cast<ld>(dy.data()[r * d + j]));
      }
      for (std::size_t j = 0; j < d; ++j) {
        const ld xh = (xr[j] - m) * s, dxh = static_cast<ld>(dy.data()[r * d + j]) * gamma.data()[j];
        const ld grad = s * (dxh - s1 / n - xh * (s2 / n)), ref = dx0[r * d + j] + grad;
        // The two means: (d + 3) u of mean|dxhat| and mean|dxhat xhat| (xhat's own 2u included);
        // the rest of the expression and the accumulation: 4u.
        const ld tol = s * kU * (n + 3) * (a1 / n + (1 + std::fabs(xh)) * a2 / n + std::fabs(dxh) * 3) +
                       4 * kU * (std::fabs(grad) + std::fabs(ref));
        if (std::fabs(dx.data()[r * d + j] - ref) > tol) ++bad_dx;
      }
    }
    int bad_params = 0;
    for (std::size_t j = 0; j < d; ++j) {
      // One product and one addition per row, in row order: (rows + 2) u of the magnitudes.
      const ld tg = kU * (static_cast<ld>(rows) + 2) * (dgamma_mag[j] + std::fabs(dgamma0[j])) * 2;
      const ld tb = kU * (static_cast<ld>(rows) + 2) * (dbeta_mag[j] + std::fabs(dbeta0[j]));
      if (std::fabs(dgamma.data()[j] - dgamma_ref[j]) > tg) ++bad_params;
      if (std::fabs(dbeta.data()[j] - dbeta_ref[j]) > tb) ++bad_params;
    }
    CHECK(bad_stats == 0);
    CHECK(bad_y == 0);
    CHECK(bad_dx == 0);
    CHECK(bad_params == 0);
    // A row's results depend on its values only: each row alone, elsewhere in memory.
    for (std::size_t r = 0; r < rows; ++r) {
      Misaligned x1(d, (off + r) % 8), y1(d, (off + r + 3) % 8), dy1(d, 0), dx1(d, 5), dg1(d, 2), db1(d, 6);
      std::copy(x.data() + r * d, x.data() + (r + 1) * d, x1.data());
      std::copy(dy.data() + r * d, dy.data() + (r + 1) * d, dy1.data());
      const auto row_begin = dx0.begin() + static_cast<std::ptrdiff_t>(r * d);
      std::copy(row_begin, row_begin + static_cast<std::ptrdiff_t>(d), dx1.data());
      std::fill(dg1.data(), dg1.data() + d, 0.0f);
      std::fill(db1.data(), db1.data() + d, 0.0f);
      float m1 = 0, s1 = 0;
      layer_norm_forward(x1.data(), 1, D, gamma.data(), beta.data(), eps, y1.data(), &m1, &s1);
      CHECK(same_bits(y1.data(), y.data() + r * d, d));
      CHECK(std::memcmp(&m1, &mean[r], sizeof m1) == 0);
      CHECK(std::memcmp(&s1, &rstd[r], sizeof s1) == 0);
      layer_norm_backward(x1.data(), &m1, &s1, gamma.data(), dy1.data(), 1, D, dx1.data(), dg1.data(), db1.data());
      CHECK(same_bits(dx1.data(), dx.data() + r * d, d));
    }
  }
}
