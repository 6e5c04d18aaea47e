// The host reductions (backend/host/reduce.hpp) against scalar references: odd sizes around
// the lane and chunk boundaries, NaN and infinities placed at chunk boundaries and in tails,
// bit-identical results at one and two threads and on any partition; and error-bounded mode,
// whose snapshot restore is fused with its comparison, bit-identical at one and two threads.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;

namespace {

constexpr std::size_t K = kHostReduceChunk;
constexpr std::size_t L = kHostReduceLanes;

// Sizes on both sides of the lane, chunk and chunk-group boundaries (a group is 64 chunks),
// most of them odd.
std::vector<std::size_t> sizes() {
  return {1, L - 1, L, L + 1, 3 * L + 5, K - 1, K, K + 1, 2 * K + 7, 5 * K + L + 3, 64 * K - 1, 64 * K + 17};
}

// Positions for NaN/Inf in an array of n elements: first and last element, both sides of
// every chunk boundary (the first three), and the last lane group's tail.
std::vector<std::size_t> special_positions(std::size_t n) {
  std::vector<std::size_t> p{0, n - 1, n - n % L, n - 1 - (n - 1) % L};
  for (std::size_t c = 1; c <= 3 && c * K <= n; ++c) {
    p.push_back(c * K - 1);
    if (c * K < n) p.push_back(c * K);
  }
  std::vector<std::size_t> r;
  for (std::size_t i : p)
    if (i < n && std::find(r.begin(), r.end(), i) == r.end()) r.push_back(i);
  return r;
}

// The scalar references: a plain loop in double (or in U for the stream-type comparison),
// NaN tracked apart and reported as NaN.
template <class U, class T>
std::pair<double, double> reference_diff_and_max(const T* a, const T* b, std::size_t n) {
  U diff = 0, mag = 0;
  bool nan = false;
  for (std::size_t i = 0; i < n; ++i) {
    const U bi = static_cast<U>(b[i]);
    const U d = std::fabs(static_cast<U>(a[i]) - bi);
    if (std::isnan(d)) nan = true;
    else diff = std::max(diff, d);
    if (!std::isnan(bi)) mag = std::max(mag, std::fabs(bi));
  }
  return {nan ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(diff), static_cast<double>(mag)};
}

template <class T>
std::size_t reference_not_finite(const T* p, std::size_t n) {
  std::size_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) bad += std::isfinite(static_cast<double>(p[i])) ? 0 : 1;
  return bad;
}

// Equal as results: the same double, or both NaN.
bool same(double x, double y) { return (std::isnan(x) && std::isnan(y)) || x == y; }
bool same(std::pair<double, double> x, std::pair<double, double> y) { return same(x.first, y.first) && same(x.second, y.second); }

// Random a and b = a + noise, with a spread of magnitudes, so that the maxima sit anywhere.
template <class T>
void fill_pair(std::vector<T>& a, std::vector<T>& b, std::size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(-1.0, 1.0), e(-6.0, 3.0);
  a.resize(n);
  b.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    b[i] = static_cast<T>(u(rng) * std::pow(10.0, e(rng)));
    a[i] = static_cast<T>(static_cast<double>(b[i]) + u(rng) * 1e-4 * std::pow(10.0, e(rng)));
  }
}

HostContext& context(int threads) {
  static HostContext one({.threads = 1}), two({.threads = 2});
  return threads == 1 ? one : two;
}

template <class T>
void check_diff_and_max(std::mt19937_64& rng) {
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  std::vector<T> a, b;
  for (std::size_t n : sizes()) {
    fill_pair(a, b, n, rng);
    INFO("n " << n);
    const auto want = reference_diff_and_max<double>(a.data(), b.data(), n);
    const auto got1 = max_abs_diff_and_max(context(1), a.data(), b.data(), n);
    const auto got2 = max_abs_diff_and_max(context(2), a.data(), b.data(), n);
    CHECK(same(got1, want));
    CHECK(same(got2, got1));
    for (std::size_t at : special_positions(n)) {
      INFO("special value at " << at);
      struct Case {
        T va, vb;
      };
      for (const Case c : {Case{nan, b[at]}, Case{a[at], nan}, Case{inf, b[at]}, Case{a[at], -inf}, Case{inf, inf}}) {
        std::vector<T> sa = a, sb = b;
        sa[at] = c.va;
        sb[at] = c.vb;
        const auto w = reference_diff_and_max<double>(sa.data(), sb.data(), n);
        const auto g1 = max_abs_diff_and_max(context(1), sa.data(), sb.data(), n);
        const auto g2 = max_abs_diff_and_max(context(2), sa.data(), sb.data(), n);
        CHECK(same(g1, w));
        CHECK(same(g2, g1));
        if (std::isnan(c.va) || std::isnan(c.vb) || c.va == c.vb) CHECK(std::isnan(g1.first));  // never hidden
      }
      if (n > 64 * L) break;  // the largest sizes: boundaries of the first chunks only
    }
  }
}

template <class T>
void check_compare_and_restore(std::mt19937_64& rng) {
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  std::vector<T> a, b;
  for (std::size_t n : sizes()) {
    fill_pair(a, b, n, rng);
    INFO("n " << n);
    std::vector<std::size_t> where{n / 2};
    for (std::size_t at : special_positions(n)) where.push_back(at);
    for (std::size_t k = 0; k < where.size(); ++k) {
      std::vector<T> sa = a, sb = b;
      if (k > 0) {  // k == 0: all finite
        const std::size_t at = where[k];
        const T specials[][2] = {{nan, sb[at]}, {sa[at], nan}, {inf, sb[at]}, {-inf, -inf}};
        sa[at] = specials[k % 4][0];
        sb[at] = specials[k % 4][1];
      }
      INFO("case " << k << " at " << where[k]);
      // The reference compares in T, as the stream type is compared.
      const auto want = reference_diff_and_max<T>(sa.data(), sb.data(), n);
      const auto in_double = reference_diff_and_max<double>(sa.data(), sb.data(), n);
      for (int threads : {1, 2}) {
        std::vector<T> stream = sa;
        const auto got = compare_and_restore(context(threads), stream.data(), sb.data(), n);
        INFO("threads " << threads);
        CHECK(same(got, want));
        CHECK(std::memcmp(stream.data(), sb.data(), n * sizeof(T)) == 0);  // restored, NaNs included
        // Against the comparison in double: the same magnitude, and a difference rounded once
        // to T (relative 2^-24 for float; the double comparison's own rounding of the
        // difference, 2^-53, is inside the factor 2; for double streams both are one rounding).
        CHECK(got.second == in_double.second);
        if (std::isnan(in_double.first)) {
          CHECK(std::isnan(got.first));
        } else if (std::isfinite(in_double.first)) {
          CHECK(std::abs(got.first - in_double.first) <= 2 * unit_roundoff<T>() * in_double.first);
        }
        if constexpr (std::is_same_v<T, double>) CHECK(same(got, in_double));
      }
    }
  }
}

}  // namespace

TEST_CASE("max_abs_diff_and_max equals the scalar double reference, NaN never hidden", "[reductions]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  if (host_openmp_enabled()) CHECK(context(2).threads() == 2);
  check_diff_and_max<float>(rng);
  check_diff_and_max<double>(rng);
  CHECK(max_abs_diff_and_max(context(1), static_cast<const float*>(nullptr), static_cast<const float*>(nullptr), 0) ==
        std::pair<double, double>{0.0, 0.0});
}

TEST_CASE("compare_and_restore compares in the stream type and restores in the same pass", "[reductions]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  check_compare_and_restore<float>(rng);
  check_compare_and_restore<double>(rng);
  // Fixed-point streams compare in double, as the monitor does.
  using Fx = FixedPoint<32>;
  for (std::size_t n : {std::size_t{1}, L + 3, K + 1, 3 * K + 11}) {
    std::vector<Fx> s(n), snap(n);
    std::uniform_int_distribution<std::int64_t> raw(-(std::int64_t{1} << 40), std::int64_t{1} << 40);
    for (std::size_t i = 0; i < n; ++i) {
      snap[i].raw = raw(rng);
      s[i].raw = snap[i].raw + raw(rng) / 1024;
    }
    const auto want = reference_diff_and_max<double>(s.data(), snap.data(), n);
    const auto got = compare_and_restore(context(2), s.data(), snap.data(), n);
    CHECK(same(got, want));
    CHECK(std::memcmp(s.data(), snap.data(), n * sizeof(Fx)) == 0);
  }
  float untouched = 1.0f;
  CHECK(compare_and_restore(context(1), &untouched, static_cast<const float*>(nullptr), 0) == std::pair<double, double>{0.0, 0.0});
  CHECK(untouched == 1.0f);
}

TEST_CASE("count_not_finite counts every NaN and infinity, at boundaries and in tails", "[reductions]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  auto check = [&](auto zero) {
    using T = decltype(zero);
    const T specials[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                          -std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::quiet_NaN()};
    for (std::size_t n : sizes()) {
      auto v = dr2net::testing::random_vector<T>(n, rng, -1e30, 1e30);
      v[0] = std::numeric_limits<T>::max();  // the largest finite values count as finite
      v[n - 1] = -std::numeric_limits<T>::max();
      INFO("n " << n);
      CHECK(count_not_finite(context(1), v.data(), n) == 0);
      std::size_t k = 0;
      for (std::size_t at : special_positions(n)) v[at] = specials[k++ % 4];
      std::uniform_int_distribution<std::size_t> pos(0, n - 1);
      for (int r = 0; r < 5; ++r) v[pos(rng)] = specials[static_cast<std::size_t>(r) % 4];
      const std::size_t want = reference_not_finite(v.data(), n);
      CHECK(want > 0);
      CHECK(count_not_finite(context(1), v.data(), n) == want);
      CHECK(count_not_finite(context(2), v.data(), n) == want);
    }
  };
  check(0.0f);
  check(0.0);
  std::vector<FixedPoint<32>> fx(K + 5);
  for (auto& x : fx) x.raw = static_cast<std::int64_t>(rng() >> 2);
  CHECK(count_not_finite(context(2), fx.data(), fx.size()) == 0);
}

TEST_CASE("stream_checksum equals the scalar sum of checksum terms at any thread count", "[reductions]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  for (std::size_t n : sizes()) {
    std::vector<FixedPoint<32>> v(n);
    for (auto& x : v) x.raw = static_cast<std::int64_t>(rng());
    std::uint64_t want = 0;
    for (std::size_t i = 0; i < n; ++i) want += fixed::checksum_term(i, v[i].raw);
    INFO("n " << n);
    CHECK(stream_checksum(context(1), v.data(), n) == want);
    CHECK(stream_checksum(context(2), v.data(), n) == want);
    v[n / 2].raw ^= 1;  // one bit changes the sum
    CHECK(stream_checksum(context(2), v.data(), n) != want);
  }
}

TEST_CASE("a reduction's chunk partials combine to the same result on any partition", "[reductions]") {
  // What makes the results independent of the thread count: a partial over any range, combined
  // with the partial of the rest, equals the whole (maxima of the same values), including a NaN.
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const std::size_t n = 3 * K + 29;
  std::vector<float> a, b;
  fill_pair(a, b, n, rng);
  std::uniform_int_distribution<std::size_t> cut(1, n - 1);
  for (int nan_case = 0; nan_case < 2; ++nan_case) {
    if (nan_case) a[cut(rng)] = std::numeric_limits<float>::quiet_NaN();
    const auto whole = detail::diff_and_max_range<float, false, float>(a.data(), b.data(), 0, n);
    for (int r = 0; r < 20; ++r) {
      const std::size_t s = cut(rng);
      const auto lo = detail::diff_and_max_range<float, false, float>(a.data(), b.data(), 0, s);
      const auto hi = detail::diff_and_max_range<float, false, float>(a.data(), b.data(), s, n);
      const float diff = detail::nan_keeping_max(lo.diff, hi.diff), mag = detail::plain_max(lo.mag, hi.mag);
      INFO("cut at " << s);
      CHECK(same(diff, whole.diff));
      CHECK(mag == whole.mag);
      CHECK(detail::count_not_finite_range(a.data(), 0, s) + detail::count_not_finite_range(a.data(), s, n) ==
            detail::count_not_finite_range(a.data(), 0, n));
    }
  }
}

namespace {

using Block32 = ReversibleDualResidual<dr2net::testing::TanhLinear<float>, dr2net::testing::SineGate<float>,
                                       ConstantSchedule, Fp32>;

struct EbResult {
  std::vector<float> dh0, grads;
  ReconstructionReport report;
  std::vector<int> snapshots;
};

EbResult error_bounded_step(int threads, std::uint64_t seed, const std::vector<float>& h0, const std::vector<float>& dout,
                            const Shape& shape) {
  HostContext ctx({.threads = threads});
  std::mt19937_64 rng(seed);
  std::vector<Block32> layers;
  for (int l = 0; l < 8; ++l)
    layers.emplace_back(dr2net::testing::TanhLinear<float>(shape[2], rng, 0.9), dr2net::testing::SineGate<float>(shape[2], rng));
  ReversibleStack<Block32> stack(ctx, std::move(layers), ConstantSchedule(1.0, 0.1), {.mode = BackpropMode::ErrorBounded});
  EbResult r{std::vector<float>(h0.size()), {}, {}, {}};
  std::vector<float> out(h0.size());
  for (int step = 0; step < 2; ++step) {  // the second step plans from the first's measurements
    stack.zero_grad();
    stack.forward(ConstView<float>(h0.data(), shape), TensorView<float>(out.data(), shape), step);
    stack.backward(ConstView<float>(dout.data(), shape), TensorView<float>(r.dh0.data(), shape),
                   ConstView<float>(h0.data(), shape));
  }
  for (auto& p : stack.parameters()) r.grads.insert(r.grads.end(), p.grad.data(), p.grad.data() + p.grad.size());
  r.report = stack.reconstruction();
  r.snapshots = stack.snapshot_boundaries();
  return r;
}

}  // namespace

TEST_CASE("error-bounded mode with the fused restore: gradients and report bit-identical at 1 and 2 threads",
          "[reductions][error-bounded]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  // Streams longer than a reduction chunk, so the comparison runs on several chunks.
  const Shape shape{64, 5, 97};
  const auto n = static_cast<std::size_t>(shape.numel());
  const auto h0 = dr2net::testing::random_vector<float>(n, rng);
  const auto dout = dr2net::testing::random_vector<float>(n, rng);
  const std::uint64_t layer_seed = rng();
  const EbResult one = error_bounded_step(1, layer_seed, h0, dout, shape);
  const EbResult two = error_bounded_step(2, layer_seed, h0, dout, shape);
  CHECK(one.report.snapshots > 0);
  CHECK(one.report.measured_boundaries > 0);
  CHECK(one.report.max_boundary_relative_error > 0);  // fp32 reconstruction at beta 0.1 is not exact
  CHECK(one.report.max_boundary_relative_error <= 1e-3);
  CHECK(one.snapshots == two.snapshots);
  CHECK(one.report.measured_boundaries == two.report.measured_boundaries);
  CHECK(one.report.max_boundary_relative_error == two.report.max_boundary_relative_error);
  CHECK(one.report.relative_error == two.report.relative_error);
  CHECK(one.report.error_scale == two.report.error_scale);
  CHECK(std::memcmp(one.dh0.data(), two.dh0.data(), n * sizeof(float)) == 0);
  REQUIRE(one.grads.size() == two.grads.size());
  CHECK(std::memcmp(one.grads.data(), two.grads.data(), one.grads.size() * sizeof(float)) == 0);
}
