// The host's elementwise and row kernels, scalar against vectorised, in ns per element, side
// by side in one run (docs/host-performance.md, "Vector math"):
//
//   gelu forward      GeluDropForward: operator()(i) element by element (what for_each_index
//                     ran before run_range) vs run_range(0, n) (SLEEF's vector erf)
//   gelu backward     GeluDropBackward, likewise (SLEEF's erf and exp)
//   softmax           rows of the attention probabilities: the scalar row kernel vs
//                     softmax_rows_inplace (vector exp, lane max and sum)
//   softmax backward  the scalar row dot product vs softmax_rows_backward_inplace
//   layernorm fwd/bwd the scalar rows vs layer_norm_forward / layer_norm_backward
//
// All on one thread. Without SLEEF (DR2NET_HOST_VECTOR_MATH 0) both columns run the same scalar
// code, and GELU's vector column differs from its scalar one only where DR2NET_HOST_VECTOR_ERF
// is 1 (8 lanes or more by default); the output says which. --spread sets the GELU inputs'
// standard deviation: the C library's erff is much cheaper below |x| = 0.84. Each figure is
// the median over repeats that alternate the two versions; inputs are restored outside the
// timed region. The largest difference between the two versions' outputs is printed too
// (relative to the largest output), and the exit status is 1 when it exceeds 1e-5: a smoke
// check, not the accuracy test (tests/modules/test_vector_math.cpp).
//
//   dr2net_bench_host_kernels [--elements 1210368] [--rows 4728] [--cols 197] [--dim 192]
//                             [--spread 1] [--dropout 0] [--repeats 15] [--quick] [--json FILE]
//
// Defaults: ViT-Tiny/16 at 224 px, batch 8: the MLP's hidden activation (8 x 197 x 768), the
// attention's probability rows (8 x 3 heads x 197 rows of 197), LayerNorm rows (8 x 197 of 192).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iostream>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/backend/host/layer_norm.hpp"
#include "dr2net/backend/host/softmax.hpp"
#include "dr2net/backend/host/vector_math.hpp"
#include "dr2net/modules/activation.hpp"
#include "dr2net/modules/drop.hpp"

#include "cli.hpp"

namespace {

struct Options {
  std::int64_t elements = 8 * 197 * 768;
  std::int64_t rows = 8 * 3 * 197, cols = 197;
  std::int64_t dim = 192;
  double dropout = 0.0;
  double spread = 1.0;
  int repeats = 15;
  bool quick = false;
  std::string json;
};

std::optional<int> parse(int argc, char** argv, Options& o) {
  CLI::App app("The host's GELU, softmax and LayerNorm kernels, scalar vs vectorised (SLEEF), in ns per element.",
               "dr2net_bench_host_kernels");
  using dr2net_cli::add_integer;
  constexpr std::int64_t kMax = 1 << 28;
  add_integer(app, "--elements", o.elements, std::int64_t{1}, kMax, "GELU elements");
  add_integer(app, "--rows", o.rows, std::int64_t{1}, kMax, "softmax rows (and LayerNorm rows = rows / 3)");
  add_integer(app, "--cols", o.cols, std::int64_t{1}, std::int64_t{1} << 20, "softmax row length");
  add_integer(app, "--dim", o.dim, std::int64_t{1}, std::int64_t{1} << 20, "LayerNorm width");
  app.add_option("--dropout", o.dropout, "hidden dropout rate of the GELU functors (0: mask inactive)")
      ->check(dr2net_cli::finite(0.0, 0.99))
      ->capture_default_str();
  app.add_option("--spread", o.spread, "standard deviation of the GELU inputs (the C erff is fast below 0.84)")
      ->check(dr2net_cli::positive())
      ->capture_default_str();
  add_integer(app, "--repeats", o.repeats, 1, 1 << 20, "timed repeats (median)");
  app.add_flag("--quick", o.quick, "small sizes and 3 repeats (elements 10007, rows 61 of 37, dim 45); explicit flags "
                                   "still win");
  app.add_option("--json", o.json, "the results as JSON");
  if (auto status = dr2net_cli::parse(app, argc, argv)) return status;
  if (o.quick) {
    const auto quick = [&](const char* flag, auto& value, auto v) {
      if (app.count(flag) == 0) value = v;
    };
    quick("--elements", o.elements, std::int64_t{10007});
    quick("--rows", o.rows, std::int64_t{61});
    quick("--cols", o.cols, std::int64_t{37});
    quick("--dim", o.dim, std::int64_t{45});
    quick("--repeats", o.repeats, 3);
  }
  return std::nullopt;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 != 0 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

struct Result {
  std::string kernel;
  double elements = 0;
  double scalar_ns = 0, vector_ns = 0;  // per element
  double max_rel_diff = 0;              // max |vector - scalar| / max |scalar|
};

// Median seconds of scalar() and vector(), alternating, after one untimed call of each;
// restore(false) runs before every call of scalar(), restore(true) before vector()'s, untimed.
void time_pair(const Options& o, Result& r, const std::function<void(bool)>& restore,
               const std::function<void()>& scalar, const std::function<void()>& vector) {
  using clock = std::chrono::steady_clock;
  std::vector<double> ts, tv;
  const auto once = [&](const std::function<void()>& f) {
    restore(&f == &vector);
    const auto t0 = clock::now();
    f();
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  once(scalar);
  once(vector);
  for (int k = 0; k < o.repeats; ++k) {
    ts.push_back(once(scalar));
    tv.push_back(once(vector));
  }
  r.scalar_ns = median(ts) * 1e9 / r.elements;
  r.vector_ns = median(tv) * 1e9 / r.elements;
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, mag = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    diff = std::isnan(d) ? d : std::max(diff, d);
    mag = std::max(mag, std::fabs(static_cast<double>(b[i])));
  }
  return mag > 0 ? diff / mag : diff;
}

std::vector<float> normal_vector(std::size_t n, std::mt19937_64& rng, double mean, double sd) {
  std::normal_distribution<double> d(mean, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(d(rng));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (const auto status = parse(argc, argv, o)) return *status;
  try {
    using namespace dr2net;
    std::mt19937_64 rng(20261128);  // inputs only; the timings do not depend on the values' draw
    HostContext ctx;
    const ModuleCall<HostContext> call{ctx, 1, 7, 42, o.dropout > 0};
    const DropScale<float> mask = make_drop_scale<float>(call, 0.0, o.dropout, RandomPurpose::HiddenDropout, 1);
    std::vector<Result> results;

    // GELU forward and backward over the MLP's hidden activation.
    const auto n = static_cast<std::size_t>(o.elements);
    const std::vector<float> z = normal_vector(n, rng, 0.0, o.spread), g0 = normal_vector(n, rng, 0.0, 1.0);
    {
      std::vector<float> as(n), av(n);
      Result r{"gelu forward", static_cast<double>(n)};
      time_pair(
          o, r, [](bool) {},
          [&] {
            const GeluDropForward<float> fn{as.data(), z.data(), mask};
            for (std::size_t i = 0; i < n; ++i) fn(i);
          },
          [&] { GeluDropForward<float>{av.data(), z.data(), mask}.run_range(0, n); });
      r.max_rel_diff = max_rel_diff(av, as);
      results.push_back(r);
    }
    {
      std::vector<float> gs(n), gv(n);
      Result r{"gelu backward", static_cast<double>(n)};
      time_pair(
          o, r,
          [&](bool v) { std::copy(g0.begin(), g0.end(), v ? gv.begin() : gs.begin()); },
          [&] {
            const GeluDropBackward<float> fn{gs.data(), z.data(), mask};
            for (std::size_t i = 0; i < n; ++i) fn(i);
          },
          [&] { GeluDropBackward<float>{gv.data(), z.data(), mask}.run_range(0, n); });
      r.max_rel_diff = max_rel_diff(gv, gs);
      results.push_back(r);
    }

    // Softmax rows (scores of spread ~3, as attention logits) and the backward.
    const auto rc = static_cast<std::size_t>(o.rows * o.cols);
    const std::vector<float> scores = normal_vector(rc, rng, 0.0, 3.0), dp = normal_vector(rc, rng, 0.0, 1.0);
    std::vector<float> ps(rc), pv(rc);
    {
      Result r{"softmax", static_cast<double>(rc)};
      time_pair(
          o, r,
          [&](bool v) { std::copy(scores.begin(), scores.end(), v ? pv.begin() : ps.begin()); },
          [&] {
            for (std::int64_t row = 0; row < o.rows; ++row)
              detail::softmax_row_scalar(ps.data() + row * o.cols, o.cols);
          },
          [&] { softmax_rows_inplace(pv.data(), o.rows, o.cols, o.cols); });
      r.max_rel_diff = max_rel_diff(pv, ps);
      results.push_back(r);
    }
    {
      std::vector<float> gs(rc), gv(rc);
      const float scale = 0.125f;
      Result r{"softmax backward", static_cast<double>(rc)};
      time_pair(
          o, r,
          [&](bool v) { std::copy(dp.begin(), dp.end(), v ? gv.begin() : gs.begin()); },
          [&] {
            for (std::int64_t row = 0; row < o.rows; ++row) {
              const float* pr = ps.data() + row * o.cols;
              float* gr = gs.data() + row * o.cols;
              const float dot = detail::softmax_row_dot_scalar(pr, gr, o.cols);
              for (std::int64_t j = 0; j < o.cols; ++j) gr[j] = scale * pr[j] * (gr[j] - dot);
            }
          },
          [&] { softmax_rows_backward_inplace(ps.data(), gv.data(), o.rows, o.cols, o.cols, scale); });
      r.max_rel_diff = max_rel_diff(gv, gs);
      results.push_back(r);
    }

    // LayerNorm rows (a third as many rows as softmax: B N rows of the model width).
    const std::int64_t lrows = std::max<std::int64_t>(1, o.rows / 3);
    const auto ln = static_cast<std::size_t>(lrows * o.dim);
    const std::vector<float> x = normal_vector(ln, rng, 0.5, 2.0), dy = normal_vector(ln, rng, 0.0, 1.0);
    const std::vector<float> gamma = normal_vector(static_cast<std::size_t>(o.dim), rng, 1.0, 0.2),
                             beta = normal_vector(static_cast<std::size_t>(o.dim), rng, 0.0, 0.2);
    std::vector<float> ys(ln), yv(ln), ms(static_cast<std::size_t>(lrows)), rs(ms.size()), mv(ms.size()), rv(ms.size());
    const float eps = 1e-6f;
    {
      Result r{"layernorm forward", static_cast<double>(ln)};
      time_pair(
          o, r, [](bool) {},
          [&] {
            detail::layer_norm_forward_scalar(x.data(), lrows, o.dim, gamma.data(), beta.data(), eps, ys.data(),
                                              ms.data(), rs.data());
          },
          [&] {
            layer_norm_forward(x.data(), lrows, o.dim, gamma.data(), beta.data(), eps, yv.data(), mv.data(), rv.data());
          });
      r.max_rel_diff = max_rel_diff(yv, ys);
      results.push_back(r);
    }
    {
      std::vector<float> dxs(ln), dxv(ln), dgs(static_cast<std::size_t>(o.dim)), dgv(dgs.size()), dbs(dgs.size()),
          dbv(dgs.size());
      Result r{"layernorm backward", static_cast<double>(ln)};
      const auto zero = [](std::vector<float>& v) { std::fill(v.begin(), v.end(), 0.0f); };
      time_pair(
          o, r,
          [&](bool v) {
            for (auto* b : v ? std::initializer_list<std::vector<float>*>{&dxv, &dgv, &dbv}
                             : std::initializer_list<std::vector<float>*>{&dxs, &dgs, &dbs})
              zero(*b);
          },
          [&] {
            detail::layer_norm_backward_scalar(x.data(), ms.data(), rs.data(), gamma.data(), dy.data(), lrows, o.dim,
                                               dxs.data(), dgs.data(), dbs.data());
          },
          [&] {
            layer_norm_backward(x.data(), mv.data(), rv.data(), gamma.data(), dy.data(), lrows, o.dim, dxv.data(),
                                dgv.data(), dbv.data());
          });
      r.max_rel_diff = std::max(max_rel_diff(dxv, dxs), max_rel_diff(dgv, dgs));
      results.push_back(r);
    }

#if DR2NET_HOST_VECTOR_MATH
    const std::string vector_math =
        "SLEEF, " + std::to_string(detail::simd::kWidth) + " float lanes; GELU's erf " +
        (DR2NET_HOST_VECTOR_ERF ? "SLEEF's" : "the C library's (grouped mask factors only)");
#else
    const std::string vector_math = "none (no SLEEF: both columns run the scalar code)";
#endif
    std::printf("host kernels, one thread; vector math: %s; GELU inputs N(0, %.3g), dropout %.3g; median of %d "
                "repeats\n\n",
                vector_math.c_str(), o.spread, o.dropout, o.repeats);
    std::printf("| kernel | elements | scalar ns/element | vector ns/element | speed-up | max rel. difference |\n");
    std::printf("| --- | ---: | ---: | ---: | ---: | ---: |\n");
    bool ok = true;
    for (const Result& r : results) {
      std::printf("| %s | %.0f | %.3f | %.3f | %.2fx | %.2e |\n", r.kernel.c_str(), r.elements, r.scalar_ns,
                  r.vector_ns, r.scalar_ns / r.vector_ns, r.max_rel_diff);
      ok = ok && r.max_rel_diff <= 1e-5;
    }
    if (!o.json.empty()) {
      std::ofstream out(o.json);
      out << "{\n  \"vector_math\": \"" << vector_math << "\",\n  \"spread\": " << o.spread
          << ",\n  \"dropout\": " << o.dropout
          << ",\n  \"repeats\": " << o.repeats << ",\n  \"kernels\": [\n";
      for (std::size_t k = 0; k < results.size(); ++k) {
        const Result& r = results[k];
        out << "    {\"kernel\": \"" << r.kernel << "\", \"elements\": " << r.elements
            << ", \"scalar_ns_per_element\": " << r.scalar_ns << ", \"vector_ns_per_element\": " << r.vector_ns
            << ", \"max_rel_diff\": " << r.max_rel_diff << "}" << (k + 1 < results.size() ? "," : "") << "\n";
      }
      out << "  ]\n}\n";
      if (!out) throw std::runtime_error("cannot write " + o.json);
    }
    if (!ok) {
      std::fprintf(stderr, "dr2net_bench_host_kernels: the vector and scalar kernels differ by more than 1e-5\n");
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dr2net_bench_host_kernels: %s\n", e.what());
    return 1;
  }
}
