// Stages of reversible stacks and transitions: PatchMerging against a plain loop reference
// (2-D and, as [B*T, H, W, C], 3-D maps) and central finite differences of every gradient;
// a two-stage backbone (a stack of ViT layers, a merge, a stack at twice the width) whose
// reversible, error-bounded and exact (fixed-point) gradients equal standard backprop's and
// central finite differences; activation memory that does not grow with a stage's depth, the
// merge's stored bytes, and a memory report whose totals are the meter's; timm Swin parameter
// names, a checkpoint round trip and an AdamW step over all parts; errors naming the part.

#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "dr2net/block/stages.hpp"
#include "dr2net/dr2net.hpp"
#include "dr2net/modules/patch_merging.hpp"
#include "dr2net/modules/vit.hpp"
#include "dr2net/optim/adamw.hpp"
#include "support/test_functors.hpp"
#include "support/tolerances.hpp"
#if DR2NET_TEST_HAVE_IO
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/safetensors.hpp"
#include "support/temp_dir.hpp"
#endif

using namespace dr2net;
using dr2net::testing::fresh_rng;
using dr2net::testing::random_vector;

static_assert(Transition<PatchMerging<double>> && Transition<PatchMerging<float>>);
static_assert(!Transition<VitMlp<double>>);  // a residual function is not a transition
static_assert(is_reversible_stack_v<ReversibleStack<VitLayer<double, ConstantSchedule>>>);

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

//! Parameters drawn away from timm's tiny init: LayerNorm weights in [0.5, 1.5], the rest in
//! [-lo, lo].
template <class Part>
void randomize(Part& part, std::mt19937_64& rng, double lo = 0.5) {
  part.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    const bool ln_weight = name.find("norm") != std::string_view::npos && name.ends_with("weight");
    const auto r = random_vector<double>(v.size(), rng, ln_weight ? 0.5 : -lo, ln_weight ? 1.5 : lo);
    std::copy(r.begin(), r.end(), v.data());
  });
}

template <class Part>
std::map<std::string, std::vector<double>> grads_of(Part& part) {
  std::map<std::string, std::vector<double>> out;
  part.for_each_parameter([&](std::string_view name, TensorView<double> , TensorView<double> g) {
    out[std::string(name)] = std::vector<double>(g.data(), g.data() + g.size());
  });
  return out;
}

template <class Part>
std::map<std::string, std::vector<double>> values_of(Part& part) {
  std::map<std::string, std::vector<double>> out;
  part.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    out[std::string(name)] = std::vector<double>(v.data(), v.data() + v.size());
  });
  return out;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

//! |got - want| <= atol + rtol * max|want| elementwise (scale: the tensor's magnitude).
bool close(const std::vector<double>& got, const std::vector<double>& want, double atol, double rtol,
           double* worst_out = nullptr) {
  if (got.size() != want.size()) return false;
  const double scale = max_abs(want);
  double worst = 0;
  bool ok = true;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double d = std::abs(got[i] - want[i]);
    if (!(d <= atol + rtol * scale)) ok = false;
    worst = std::max(worst, std::isnan(d) ? std::numeric_limits<double>::infinity() : d);
  }
  if (worst_out) *worst_out = worst;
  return ok;
}

// ---------------------------------------------------------------- PatchMerging reference

//! The merge of a map [N, H, W, C] by loops, in long double: rows, LayerNorm, W^T.
std::vector<double> merge_reference(PatchMerging<double>& m, const std::vector<double>& x, std::int64_t N,
                                    std::int64_t H, std::int64_t W, std::int64_t C) {
  const std::int64_t K = 4 * C, Co = m.out_dim(), M = N * (H / 2) * (W / 2);
  const double* gamma = m.norm().weight().data();
  const double* beta = m.norm().bias().data();
  const double* w = m.reduction().data();
  std::vector<double> out(static_cast<std::size_t>(M * Co));
  std::vector<long double> row(static_cast<std::size_t>(K)), xn(static_cast<std::size_t>(K));
  const int dh[4] = {0, 1, 0, 1}, dw[4] = {0, 0, 1, 1};  // timm: x0, x1, x2, x3
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t i = 0; i < H / 2; ++i)
      for (std::int64_t j = 0; j < W / 2; ++j) {
        for (int k = 0; k < 4; ++k)
          for (std::int64_t c = 0; c < C; ++c)
            row[static_cast<std::size_t>(k * C + c)] =
                x[static_cast<std::size_t>(((n * H + 2 * i + dh[k]) * W + 2 * j + dw[k]) * C + c)];
        long double mean = 0, var = 0;
        for (auto v : row) mean += v;
        mean /= K;
        for (auto v : row) var += (v - mean) * (v - mean);
        var /= K;
        const long double rstd = 1 / std::sqrt(var + static_cast<long double>(m.config().eps));
        for (std::int64_t e = 0; e < K; ++e)
          xn[static_cast<std::size_t>(e)] = (row[static_cast<std::size_t>(e)] - mean) * rstd * gamma[e] + beta[e];
        const std::int64_t r = (n * (H / 2) + i) * (W / 2) + j;
        for (std::int64_t o = 0; o < Co; ++o) {
          long double s = 0;
          for (std::int64_t e = 0; e < K; ++e) s += xn[static_cast<std::size_t>(e)] * w[o * K + e];
          out[static_cast<std::size_t>(r * Co + o)] = static_cast<double>(s);
        }
      }
  return out;
}

std::vector<double> merge_predict(HostContext& ctx, PatchMerging<double>& m, const std::vector<double>& x,
                                  const Shape& in) {
  const Shape os = m.output_shape(in);
  std::vector<double> out(static_cast<std::size_t>(os.numel()), kNaN);
  m.predict(ctx, ConstView<double>(x.data(), in), TensorView<double>(out.data(), os));
  return out;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  long double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += static_cast<long double>(a[i]) * b[i];
  return static_cast<double>(s);
}

//! Every input and parameter gradient of L = sum(w * merge(x)) against central differences.
void check_merge_gradients(HostContext& ctx, PatchMerging<double>& m, const Shape& in, std::mt19937_64& rng) {
  const Shape os = m.output_shape(in);
  const auto n = static_cast<std::size_t>(in.numel()), no = static_cast<std::size_t>(os.numel());
  const auto x = random_vector<double>(n, rng, -2.0, 2.0);
  const auto w = random_vector<double>(no, rng);
  m.zero_grad();
  std::vector<double> out(no, kNaN), din(n, 1e300);  // din must be overwritten, not added to
  m.forward(ctx, ConstView<double>(x.data(), in), TensorView<double>(out.data(), os));
  CHECK(m.pending());
  CHECK(out == merge_predict(ctx, m, x, in));  // predict computes what forward computes
  m.backward(ctx, ConstView<double>(w.data(), os), TensorView<double>(din.data(), in));
  CHECK_FALSE(m.pending());
  const auto pgrads = grads_of(m);
  const double h = 1e-6;
  const auto near = [](double analytic, double fd) { return std::abs(analytic - fd) <= 1e-6 * std::max(1.0, std::abs(fd)); };
  for (std::size_t i = 0; i < n; ++i) {
    auto xp = x, xm = x;
    xp[i] += h;
    xm[i] -= h;
    const double fd = (dot(w, merge_predict(ctx, m, xp, in)) - dot(w, merge_predict(ctx, m, xm, in))) / (2 * h);
    INFO("input [" << i << "] analytic " << din[i] << " fd " << fd);
    CHECK(near(din[i], fd));
  }
  std::size_t checked = 0;
  m.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    for (std::size_t i = 0; i < v.size(); ++i) {
      double& p = v.data()[i];
      const double p0 = p;
      p = p0 + h;
      const double lp = dot(w, merge_predict(ctx, m, x, in));
      p = p0 - h;
      const double lm = dot(w, merge_predict(ctx, m, x, in));
      p = p0;
      const double fd = (lp - lm) / (2 * h), analytic = pgrads.at(std::string(name))[i];
      INFO(name << " [" << i << "] analytic " << analytic << " fd " << fd);
      CHECK(near(analytic, fd));
      ++checked;
    }
  });
  CHECK(checked == static_cast<std::size_t>(2 * 4 * m.config().dim + m.out_dim() * 4 * m.config().dim));
  // Parameter gradients accumulate: a second step adds the same again (the GEMM accumulating
  // onto the first gradient rounds once more, hence not bit for bit); din is written again.
  const auto din1 = din;
  m.forward(ctx, ConstView<double>(x.data(), in), TensorView<double>(out.data(), os));
  m.backward(ctx, ConstView<double>(w.data(), os), TensorView<double>(din.data(), in));
  CHECK(din == din1);
  for (const auto& [name, g2] : grads_of(m)) {
    const auto& g1 = pgrads.at(name);
    std::vector<double> twice(g1.size());
    for (std::size_t i = 0; i < g1.size(); ++i) twice[i] = 2 * g1[i];
    INFO(name);
    CHECK(close(g2, twice, 0.0, 1e-14));
  }
}

}  // namespace

TEST_CASE("PatchMerging: forward equals the loop reference, 2-D and 3-D (frames flattened)", "[stages][merge]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  SECTION("2-D map [B, H, W, C], default and custom out_dim") {
    for (std::int64_t out_dim : {std::int64_t{0}, std::int64_t{5}}) {
      const std::int64_t B = 2, H = 6, W = 4, C = 3;
      PatchMerging<double> m(ctx, {C, out_dim}, rng());
      randomize(m, rng);
      const Shape in{B, H, W, C};
      CHECK(m.output_shape(in) == Shape{B, H / 2, W / 2, out_dim == 0 ? 2 * C : out_dim});
      const auto x = random_vector<double>(static_cast<std::size_t>(in.numel()), rng, -2.0, 2.0);
      const auto got = merge_predict(ctx, m, x, in);
      double worst = 0;
      CHECK(close(got, merge_reference(m, x, B, H, W, C), 1e-13, 1e-13, &worst));
      INFO("worst " << worst);
    }
  }
  SECTION("3-D map [B, T, H, W, C] passed as [B*T, H, W, C]: every frame merged alike") {
    const std::int64_t B = 2, T = 3, H = 4, W = 6, C = 2;
    PatchMerging<double> m(ctx, {C}, rng());
    randomize(m, rng);
    const auto x = random_vector<double>(static_cast<std::size_t>(B * T * H * W * C), rng, -2.0, 2.0);
    const Shape in{B * T, H, W, C};
    const auto got = merge_predict(ctx, m, x, in);
    // Frame (b, t) alone through the reference, placed at [b, t] of a [B, T, H/2, W/2, 2C] output.
    const std::int64_t frame = H * W * C, frame_out = (H / 2) * (W / 2) * 2 * C;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t) {
        const auto off = static_cast<std::ptrdiff_t>((b * T + t) * frame);
        const std::vector<double> xf(x.begin() + off, x.begin() + off + frame);
        const auto want = merge_reference(m, xf, 1, H, W, C);
        const auto ooff = static_cast<std::ptrdiff_t>((b * T + t) * frame_out);
        const std::vector<double> gf(got.begin() + ooff, got.begin() + ooff + frame_out);
        INFO("frame b " << b << " t " << t);
        CHECK(close(gf, want, 1e-13, 1e-13));
      }
    // The same memory as [B, T*H, W, C] (the batch first, as inside Stages): the same merge.
    CHECK(merge_predict(ctx, m, x, Shape{B, T * H, W, C}) == got);
  }
}

TEST_CASE("PatchMergeLayout: element by element equals the host ranges; the two directions invert each other",
          "[stages][merge]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  for (const auto [N, H, W, C] : {std::array<std::int64_t, 4>{2, 4, 6, 3}, std::array<std::int64_t, 4>{1, 2, 2, 1},
                                   std::array<std::int64_t, 4>{3, 6, 2, 5}}) {
    const auto n = static_cast<std::size_t>(N * H * W * C);
    const auto x = random_vector<double>(n, rng);
    std::vector<double> rows(n, kNaN), by_element(n, kNaN), back(n, kNaN);
    for (const bool to_rows : {true, false}) {
      const double* src = to_rows ? x.data() : rows.data();
      double* dst = to_rows ? rows.data() : back.data();
      const PatchMergeLayout<double> f{by_element.data(), src, W, C, to_rows};
      for (std::size_t i = 0; i < n; ++i) f(i);
      // Ranges cut at random points (inside C-wide runs too) give the same elements.
      std::uniform_int_distribution<std::size_t> cut(0, n);
      std::vector<std::size_t> cuts = {0, n, cut(rng), cut(rng), cut(rng), cut(rng)};
      std::sort(cuts.begin(), cuts.end());
      const PatchMergeLayout<double> g{dst, src, W, C, to_rows};
      for (std::size_t k = 0; k + 1 < cuts.size(); ++k) g.run_range(cuts[k], cuts[k + 1]);
      INFO("N " << N << " H " << H << " W " << W << " C " << C << (to_rows ? " to rows" : " to map"));
      CHECK(std::memcmp(dst, by_element.data(), n * sizeof(double)) == 0);
      for_each_index(ctx, n, g);  // and through the backend's launcher
      CHECK(std::memcmp(dst, by_element.data(), n * sizeof(double)) == 0);
    }
    CHECK(back == x);
    // Row 0 is (x[0, 0, 0], x[0, 1, 0], x[0, 0, 1], x[0, 1, 1]): timm's x0, x1, x2, x3.
    for (std::int64_t c = 0; c < C; ++c) {
      CHECK(rows[static_cast<std::size_t>(c)] == x[static_cast<std::size_t>(c)]);
      CHECK(rows[static_cast<std::size_t>(C + c)] == x[static_cast<std::size_t>(W * C + c)]);
      CHECK(rows[static_cast<std::size_t>(2 * C + c)] == x[static_cast<std::size_t>(C + c)]);
      CHECK(rows[static_cast<std::size_t>(3 * C + c)] == x[static_cast<std::size_t>(W * C + C + c)]);
    }
  }
}

TEST_CASE("PatchMerging: gradients equal central differences; stored bytes; bad input", "[stages][merge]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  SECTION("2-D") {
    PatchMerging<double> m(ctx, {3}, rng());
    randomize(m, rng);
    check_merge_gradients(ctx, m, Shape{2, 4, 6, 3}, rng);
  }
  SECTION("3-D as [B*T, H, W, C], custom out_dim") {
    PatchMerging<double> m(ctx, {2, 3}, rng());
    randomize(m, rng);
    check_merge_gradients(ctx, m, Shape{2 * 2, 2, 4, 2}, rng);
  }
  SECTION("what forward keeps: rows [M, 4C] and two statistics per row, released by backward") {
    const std::int64_t B = 3, H = 4, W = 2, C = 5, M = B * (H / 2) * (W / 2);
    PatchMerging<double> m(ctx, {C}, rng());
    const Shape in{B, H, W, C};
    const std::size_t formula = static_cast<std::size_t>(M * 4 * C + 2 * M) * sizeof(double);
    CHECK(m.saved_bytes(in) == formula);
    const std::size_t before = ctx.meter().current(MemoryCategory::SavedActivations);
    const auto x = random_vector<double>(static_cast<std::size_t>(in.numel()), rng);
    std::vector<double> out(static_cast<std::size_t>(M * 2 * C)), dx(x.size());
    m.forward(ctx, ConstView<double>(x.data(), in), TensorView<double>(out.data(), m.output_shape(in)));
    CHECK(ctx.meter().current(MemoryCategory::SavedActivations) - before == formula);
    // A second forward replaces what the first kept.
    m.forward(ctx, ConstView<double>(x.data(), in), TensorView<double>(out.data(), m.output_shape(in)));
    CHECK(ctx.meter().current(MemoryCategory::SavedActivations) - before == formula);
    m.backward(ctx, ConstView<double>(out.data(), m.output_shape(in)), TensorView<double>(dx.data(), in));
    CHECK(ctx.meter().current(MemoryCategory::SavedActivations) == before);
    CHECK(ctx.meter().current(MemoryCategory::Scratch) == 0);  // temporaries freed
    // Parameters and gradients are on the meter once.
    const std::size_t pbytes = static_cast<std::size_t>(2 * 4 * C + 2 * C * 4 * C) * sizeof(double);
    CHECK(ctx.meter().current(MemoryCategory::Parameters) == pbytes);
    CHECK(ctx.meter().current(MemoryCategory::Gradients) == pbytes);
  }
  SECTION("odd sizes, wrong channels, wrong rank and calls out of order are refused, naming the sizes") {
    PatchMerging<double> m(ctx, {4}, rng());
    CHECK_THROWS_WITH(m.output_shape(Shape{2, 5, 4, 4}), Catch::Contains("height 5 and width 4") &&
                                                              Catch::Contains("must both be even"));
    CHECK_THROWS_WITH(m.output_shape(Shape{2, 4, 7, 4}), Catch::Contains("height 4 and width 7"));
    CHECK_THROWS_WITH(m.output_shape(Shape{2, 4, 4, 3}), Catch::Contains("has 3 channels but the layer merges 4"));
    CHECK_THROWS_WITH(m.output_shape(Shape{2, 16, 4}), Catch::Contains("must be [batch, height, width, channels]"));
    std::vector<double> x(2 * 5 * 4 * 4), out(2 * 2 * 2 * 8), dx(x.size());
    CHECK_THROWS_WITH(m.forward(ctx, ConstView<double>(x.data(), Shape{2, 5, 4, 4}),
                                TensorView<double>(out.data(), Shape{2, 2, 2, 8})),
                      Catch::Contains("height 5 and width 4"));
    CHECK_THROWS_WITH(m.backward(ctx, ConstView<double>(out.data(), Shape{2, 2, 2, 8}),
                                 TensorView<double>(dx.data(), Shape{2, 4, 4, 4})),
                      Catch::Contains("backward() without a preceding forward()"));
    const Shape in{2, 4, 4, 4};
    m.forward(ctx, ConstView<double>(x.data(), in), TensorView<double>(out.data(), Shape{2, 2, 2, 8}));
    CHECK_THROWS_WITH(m.backward(ctx, ConstView<double>(out.data(), Shape{2, 2, 2, 7}),
                                 TensorView<double>(dx.data(), in)),
                      Catch::Contains("dout has shape [2, 2, 2, 7], expected [2, 2, 2, 8]"));
    CHECK_FALSE(m.pending());  // a failed backward still consumed the forward
    HostContext other;
    CHECK_THROWS_WITH(m.forward(other, ConstView<double>(x.data(), in), TensorView<double>(out.data(), Shape{2, 2, 2, 8})),
                      Catch::Contains("another context"));
    CHECK_THROWS_WITH(PatchMerging<double>(ctx, {0}), Catch::Contains("dim must be positive"));
    CHECK_THROWS_WITH(PatchMerging<double>(ctx, {4, 0, -1.0}), Catch::Contains("eps must be positive"));
  }
}

// ---------------------------------------------------------------- the two-stage backbone

namespace {

template <class P = Fp64>
using Layer = VitLayer<double, ConstantSchedule, P>;
template <class P = Fp64>
using Stack = ReversibleStack<Layer<P>>;
template <class P = Fp64>
using Backbone = Stages<Stack<P>, PatchMerging<double>, Stack<P>>;

struct BackboneSpec {
  std::int64_t batch = 2, height = 4, width = 4, dim = 8, heads = 2, hidden = 16;
  int depth0 = 2, depth1 = 2;
  Coefficients coefficients{0.5, 0.5};
  BackpropMode mode = BackpropMode::Reversible;
  bool keep_inputs = true;
  std::uint64_t seed = 1;
};

Shape input_of(const BackboneSpec& s) { return Shape{s.batch, s.height, s.width, s.dim}; }

//! layers.0: a stack of ViT layers on the map's tokens [B, H W, C]; layers.1.downsample: the
//! merge on the map [B, H, W, C]; layers.1: a stack at width 2C on [B, H W / 4, 2C]. Weights
//! drawn from spec.seed (the same for every mode), away from timm's tiny init.
template <class P = Fp64>
Backbone<P> make_backbone(HostContext& ctx, const BackboneSpec& s) {
  const std::int64_t B = s.batch, H = s.height, W = s.width, C = s.dim;
  const ConstantSchedule sched(s.coefficients);
  const StackOptions o{.mode = s.mode, .seed = 7};
  Stack<P> s0(ctx, make_vit_layers<double, ConstantSchedule, P>(s.depth0, C, s.heads, s.hidden, 1e-6, 0.0, s.seed),
              sched, o);
  PatchMerging<double> merge(ctx, {C}, s.seed + 1);
  Stack<P> s1(ctx, make_vit_layers<double, ConstantSchedule, P>(s.depth1, 2 * C, s.heads, 2 * s.hidden, 1e-6, 0.0,
                                                                s.seed + 2),
              sched, o);
  Backbone<P> b(ctx, input_of(s), StagesOptions{.keep_stage_inputs = s.keep_inputs},
                stage_part("layers.0.", std::move(s0), Shape{B, H * W, C}),
                stage_part("layers.1.downsample.", std::move(merge), Shape{B, H, W, C}),
                stage_part("layers.1.", std::move(s1), Shape{B, H * W / 4, 2 * C}));
  std::mt19937_64 rng(s.seed);
  randomize(b, rng, 0.3);
  return b;
}

struct StepResult {
  std::vector<double> out, dh0;
  std::map<std::string, std::vector<double>> grads;
};

template <class Net>
StepResult train_step(Net& net, const std::vector<double>& h0, const std::vector<double>& dout, std::int64_t step = 0) {
  const Shape in = net.input_shape();
  const Shape os = net.output_shape(in[0]);
  StepResult r{std::vector<double>(static_cast<std::size_t>(os.numel()), kNaN), std::vector<double>(h0.size(), kNaN), {}};
  net.zero_grad();
  net.forward(ConstView<double>(h0.data(), in), TensorView<double>(r.out.data(), os), step);
  net.backward(ConstView<double>(dout.data(), os), TensorView<double>(r.dh0.data(), in),
               ConstView<double>(h0.data(), in));
  r.grads = grads_of(net);
  return r;
}

template <class Net>
double loss_of(Net& net, const std::vector<double>& h0, const std::vector<double>& w) {
  const Shape in = net.input_shape();
  const Shape os = net.output_shape(in[0]);
  std::vector<double> out(static_cast<std::size_t>(os.numel()), kNaN);
  net.predict(ConstView<double>(h0.data(), in), TensorView<double>(out.data(), os), 0);
  return dot(w, out);
}

void check_steps_close(const StepResult& got, const StepResult& want, double atol, double rtol) {
  double worst = 0;
  CHECK(close(got.out, want.out, atol, rtol, &worst));
  INFO("dh0 worst " << worst);
  CHECK(close(got.dh0, want.dh0, atol, rtol, &worst));
  REQUIRE(got.grads.size() == want.grads.size());
  for (const auto& [name, g] : want.grads) {
    INFO(name);
    CHECK(close(got.grads.at(name), g, atol, rtol, &worst));
  }
}

bool identical(const std::vector<double>& a, const std::vector<double>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(double)) == 0;
}

}  // namespace

TEST_CASE("two-stage backbone: reversible gradients equal standard ones and central differences", "[stages]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  const auto& tol = dr2net::testing::tolerances_for<double>().gradient;
  for (const Coefficients ab : {Coefficients{0.0, 1.0}, Coefficients{0.5, 0.5}, Coefficients{1.0, 0.1}}) {
    INFO("(alpha, beta) = (" << ab.alpha << ", " << ab.beta << ")");
    HostContext ctx({.poison_allocations = true});
    BackboneSpec spec{.coefficients = ab, .seed = rng()};
    auto rev = make_backbone(ctx, spec);
    spec.mode = BackpropMode::Standard;
    auto std_ = make_backbone(ctx, spec);
    const auto n = static_cast<std::size_t>(input_of(spec).numel());
    const auto no = static_cast<std::size_t>(rev.output_shape(spec.batch).numel());
    CHECK(no == n / 2);  // [B, H/2 W/2, 2C]
    const auto h0 = random_vector<double>(n, rng), dout = random_vector<double>(no, rng);
    const auto r = train_step(rev, h0, dout), s = train_step(std_, h0, dout);
    CHECK(identical(r.out, s.out));  // the same forward arithmetic in both modes
    check_steps_close(r, s, tol.atol, tol.rtol);
    // Each stack reconstructed its own input: the monitor compared all of it.
    CHECK(rev.part<0>().reconstruction().measured);
    CHECK(rev.part<0>().reconstruction().input_compared);
    CHECK(rev.part<2>().reconstruction().input_compared);
    CHECK(rev.part<2>().reconstruction().relative_error < 1e-10);

    // Central differences of L = sum(dout * out) through predict(): a sample of the input and
    // of parameters from every part.
    const double h = 1e-6;
    const auto near = [](double analytic, double fd) { return std::abs(analytic - fd) <= 1e-6 * std::max(1.0, std::abs(fd)); };
    std::uniform_int_distribution<std::size_t> pick(0, n - 1);
    for (int trial = 0; trial < 6; ++trial) {
      const std::size_t i = pick(rng);
      auto hp = h0, hm = h0;
      hp[i] += h;
      hm[i] -= h;
      const double fd = (loss_of(rev, hp, dout) - loss_of(rev, hm, dout)) / (2 * h);
      INFO("dh0 [" << i << "] analytic " << r.dh0[i] << " fd " << fd);
      CHECK(near(r.dh0[i], fd));
    }
    const std::vector<std::string> sampled = {"layers.0.blocks.0.attn.qkv.weight", "layers.0.blocks.1.norm2.bias",
                                              "layers.1.downsample.norm.weight", "layers.1.downsample.norm.bias",
                                              "layers.1.downsample.reduction.weight", "layers.1.blocks.1.mlp.fc2.weight"};
    std::size_t seen = 0;
    rev.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
      if (std::find(sampled.begin(), sampled.end(), name) == sampled.end()) return;
      ++seen;
      std::uniform_int_distribution<std::size_t> at(0, v.size() - 1);
      for (int trial = 0; trial < 3; ++trial) {
        const std::size_t i = at(rng);
        double& p = v.data()[i];
        const double p0 = p;
        p = p0 + h;
        const double lp = loss_of(rev, h0, dout);
        p = p0 - h;
        const double lm = loss_of(rev, h0, dout);
        p = p0;
        const double fd = (lp - lm) / (2 * h), analytic = r.grads.at(std::string(name))[i];
        INFO(name << " [" << i << "] analytic " << analytic << " fd " << fd);
        CHECK(near(analytic, fd));
      }
    });
    CHECK(seen == sampled.size());
  }
}

TEST_CASE("two-stage backbone: error-bounded and exact modes per stage", "[stages]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  const auto& tol = dr2net::testing::tolerances_for<double>().gradient;
  SECTION("error-bounded mode equals standard within the fp64 gradient tolerance") {
    for (const Coefficients ab : {Coefficients{0.5, 0.5}, Coefficients{1.0, 0.1}}) {
      INFO("(alpha, beta) = (" << ab.alpha << ", " << ab.beta << ")");
      HostContext ctx;
      BackboneSpec spec{.depth0 = 3, .coefficients = ab, .mode = BackpropMode::ErrorBounded, .seed = rng()};
      auto eb = make_backbone(ctx, spec);
      // A tight stream tolerance, so the plan stores snapshots in both stacks at (1, 0.1).
      ErrorBoundOptions o;
      o.stream_tolerance = 1e-14;
      eb.part<0>().set_error_bound(o);
      eb.part<2>().set_error_bound(o);
      spec.mode = BackpropMode::Standard;
      auto s = make_backbone(ctx, spec);
      const auto h0 = random_vector<double>(static_cast<std::size_t>(input_of(spec).numel()), rng);
      const auto dout = random_vector<double>(static_cast<std::size_t>(eb.output_shape(spec.batch).numel()), rng);
      const auto e = train_step(eb, h0, dout), want = train_step(s, h0, dout);
      check_steps_close(e, want, tol.atol, tol.rtol);
      CHECK(eb.part<0>().mode() == BackpropMode::ErrorBounded);
      CHECK(eb.part<2>().mode() == BackpropMode::ErrorBounded);
      if (ab.beta < 0.5) {
        CHECK_FALSE(eb.part<0>().snapshot_boundaries().empty());
        CHECK_FALSE(eb.part<2>().snapshot_boundaries().empty());
      }
    }
  }
  SECTION("exact mode (FixedFp64 streams): reversible gradients equal standard ones bit for bit") {
    for (const Coefficients ab : {Coefficients{0.5, 0.5}, Coefficients{1.0, 0.125}, Coefficients{0.0, 1.0}}) {
      INFO("(alpha, beta) = (" << ab.alpha << ", " << ab.beta << ")");
      HostContext ctx;
      BackboneSpec spec{.coefficients = ab, .seed = rng()};
      auto rev = make_backbone<FixedFp64>(ctx, spec);
      static_assert(decltype(rev)::template part_type<0>::exact);
      auto s = make_backbone<FixedFp64>(ctx, spec);
      s.set_mode(BackpropMode::Standard);
      CHECK(s.part<2>().mode() == BackpropMode::Standard);
      const auto h0 = random_vector<double>(static_cast<std::size_t>(input_of(spec).numel()), rng);
      const auto dout = random_vector<double>(static_cast<std::size_t>(rev.output_shape(spec.batch).numel()), rng);
      const auto r = train_step(rev, h0, dout), want = train_step(s, h0, dout);
      CHECK(identical(r.out, want.out));
      CHECK(identical(r.dh0, want.dh0));
      for (const auto& [name, g] : want.grads) {
        INFO(name);
        CHECK(identical(r.grads.at(name), g));
      }
      CHECK(rev.part<0>().reconstruction().exact);
      CHECK(rev.part<2>().reconstruction().max_abs_error == 0);
    }
  }
  SECTION("without kept stage inputs the gradients are the same and the stacks compare samples") {
    HostContext ctx;
    BackboneSpec spec{.seed = rng()};
    auto kept = make_backbone(ctx, spec);
    spec.keep_inputs = false;
    auto lean = make_backbone(ctx, spec);
    const auto h0 = random_vector<double>(static_cast<std::size_t>(input_of(spec).numel()), rng);
    const auto dout = random_vector<double>(static_cast<std::size_t>(kept.output_shape(spec.batch).numel()), rng);
    const auto a = train_step(kept, h0, dout), b = train_step(lean, h0, dout);
    CHECK(identical(a.dh0, b.dh0));
    for (const auto& [name, g] : a.grads) CHECK(identical(b.grads.at(name), g));
    CHECK(lean.part<2>().reconstruction().sampled);
    CHECK(kept.part<2>().reconstruction().input_compared);
  }
}

TEST_CASE("two-stage backbone: memory constant in a stage's depth, the merge's bytes, the report is the meter's",
          "[stages][memory]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  const BackboneSpec base{.seed = rng()};
  const auto n = static_cast<std::size_t>(input_of(base).numel());
  const auto h0 = random_vector<double>(n, rng), dout = random_vector<double>(n / 2, rng);
  const auto peak_at = [&](int depth0, BackpropMode mode) {
    HostContext ctx;
    BackboneSpec s = base;
    s.depth0 = depth0;
    s.mode = mode;
    auto b = make_backbone(ctx, s);
    ctx.meter().reset_peaks();
    (void)train_step(b, h0, dout);
    const auto report = b.memory_report();
    return std::pair{ctx.meter().peak_activation(), report.parts[0].bytes[static_cast<std::size_t>(MemoryCategory::Streams)]};
  };
  SECTION("reversible: the same peak activation at depth 2 and 6; standard grows") {
    const auto [rev2, streams2] = peak_at(2, BackpropMode::Reversible);
    const auto [rev6, streams6] = peak_at(6, BackpropMode::Reversible);
    const auto [std2, s2] = peak_at(2, BackpropMode::Standard);
    const auto [std6, s6] = peak_at(6, BackpropMode::Standard);
    INFO("reversible " << rev2 << " / " << rev6 << ", standard " << std2 << " / " << std6);
    CHECK(rev2 == rev6);
    CHECK(std6 > std2);
    CHECK(rev6 < std6);
    // Stage 0's streams: x, y and their two gradients, each [B, H W, C] in fp64.
    CHECK(streams2 == 4 * n * sizeof(double));
    CHECK(streams6 == streams2);
  }
  SECTION("the merge keeps its formula's bytes until backward; the report's totals are the meter's") {
    for (const bool keep : {true, false}) {
      INFO("keep_stage_inputs " << keep);
      HostContext ctx;
      BackboneSpec s = base;
      s.keep_inputs = keep;
      auto b = make_backbone(ctx, s);
      const auto matches_meter = [&](const StagesMemoryReport& r) {
        for (std::size_t c = 0; c < kMemoryCategoryCount; ++c) {
          INFO(category_name(static_cast<MemoryCategory>(c)));
          CHECK(r.bytes[c] == ctx.meter().current(static_cast<MemoryCategory>(c)));
        }
        CHECK(r.total_bytes == ctx.meter().current_total());
        CHECK(r.activation_bytes == ctx.meter().current_activation());
        CHECK(r.meter_current_activation == ctx.meter().current_activation());
      };
      matches_meter(b.memory_report());  // parameters only
      const Shape in = input_of(s), os = b.output_shape(s.batch);
      std::vector<double> out(static_cast<std::size_t>(os.numel())), dh0(n);
      b.forward(ConstView<double>(h0.data(), in), TensorView<double>(out.data(), os), 0);
      const std::int64_t M = s.batch * (s.height / 2) * (s.width / 2), C = s.dim;
      const std::size_t merge_bytes = static_cast<std::size_t>(M * 4 * C + 2 * M) * sizeof(double);
      CHECK(b.part<1>().saved_bytes(b.part_input_shape(1)) == merge_bytes);
      auto r = b.memory_report();
      matches_meter(r);
      CHECK(r.parts[1].bytes[static_cast<std::size_t>(MemoryCategory::SavedActivations)] == merge_bytes);
      CHECK(r.parts[1].kept_for_backward == merge_bytes);
      CHECK(r.parts[1].parameter_bytes == static_cast<std::size_t>(2 * 4 * C + 2 * C * 4 * C) * sizeof(double));
      // Between parts: stage 0's output [B, H W, C] and the merge's [B, H W / 4, 2C].
      CHECK(r.boundary_activation_bytes == (n + n / 2) * sizeof(double));
      CHECK(r.parts[0].bytes[static_cast<std::size_t>(MemoryCategory::Streams)] == 2 * n * sizeof(double));
      CHECK(r.kept_for_backward == r.activation_bytes);
      b.backward(ConstView<double>(out.data(), os), TensorView<double>(dh0.data(), in));
      r = b.memory_report();
      matches_meter(r);
      CHECK(r.parts[1].bytes[static_cast<std::size_t>(MemoryCategory::SavedActivations)] == 0);
      CHECK(r.parts[1].kept_for_backward == merge_bytes);
      CHECK(r.boundary_gradient_bytes == (n + n / 2) * sizeof(double));
      CHECK(r.str().find("part 1 'layers.1.downsample.' transition PatchMerging [2, 4, 4, 8] -> [2, 2, 2, 16]") !=
            std::string::npos);
      INFO(r.str());
      b.release_workspace();
      r = b.memory_report();
      matches_meter(r);
      CHECK(r.activation_bytes == 0);
      CHECK(ctx.meter().current_activation() == 0);
    }
  }
}

TEST_CASE("two-stage backbone: timm Swin parameter names, checkpoint round trip, one AdamW step", "[stages][io]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  const BackboneSpec spec{.seed = rng()};
  auto b = make_backbone(ctx, spec);
  std::vector<std::string> names;
  std::map<std::string, Shape> shapes;
  b.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    names.emplace_back(name);
    shapes[std::string(name)] = v.shape();
  });
  REQUIRE(names.size() == static_cast<std::size_t>(12 * (spec.depth0 + spec.depth1) + 3));
  CHECK(names.front() == "layers.0.blocks.0.norm1.weight");
  CHECK(names[12] == "layers.0.blocks.1.norm1.weight");
  CHECK(names[24] == "layers.1.downsample.norm.weight");
  CHECK(names[25] == "layers.1.downsample.norm.bias");
  CHECK(names[26] == "layers.1.downsample.reduction.weight");
  CHECK(names[27] == "layers.1.blocks.0.norm1.weight");
  CHECK(names.back() == "layers.1.blocks.1.mlp.fc2.bias");
  const std::int64_t C = spec.dim;
  CHECK(shapes.at("layers.1.downsample.norm.weight") == Shape{4 * C});
  CHECK(shapes.at("layers.1.downsample.reduction.weight") == Shape{2 * C, 4 * C});
  CHECK(shapes.at("layers.1.blocks.0.attn.qkv.weight") == Shape{3 * 2 * C, 2 * C});
  const auto params = b.parameters();
  REQUIRE(params.size() == names.size());
  for (std::size_t i = 0; i < params.size(); ++i) CHECK(params[i].name == names[i]);

#if DR2NET_TEST_HAVE_IO
  SECTION("save and load through io/checkpoint restore every parameter") {
    dr2net::testing::TempDir dir;
    {
      io::SafetensorsWriter w;
      io::save_parameters(b, w, io::DType::F64);
      w.write_file(dir.file("swin.safetensors"));
    }
    const auto file = io::SafetensorsReader::from_file(dir.file("swin.safetensors"));
    std::vector<std::string> stored = file.names();
    std::vector<std::string> sorted_names = names;
    std::sort(stored.begin(), stored.end());
    std::sort(sorted_names.begin(), sorted_names.end());
    CHECK(stored == sorted_names);
    BackboneSpec other = spec;
    other.seed = spec.seed + 100;
    auto c = make_backbone(ctx, other);
    const auto want = values_of(b);
    CHECK(values_of(c) != want);
    io::load_parameters(c, file);
    const auto got = values_of(c);
    for (const auto& [name, v] : want) {
      INFO(name);
      CHECK(identical(got.at(name), v));
    }
  }
#endif
  SECTION("AdamW over every part's parameters") {
    const Shape in = input_of(spec), os = b.output_shape(spec.batch);
    const auto h0 = random_vector<double>(static_cast<std::size_t>(in.numel()), rng);
    const auto dout = random_vector<double>(static_cast<std::size_t>(os.numel()), rng);
    const auto step = train_step(b, h0, dout);
    const auto before = values_of(b);
    optim::AdamW<double> opt(ctx, b.parameters(), {.lr = 1e-2, .weight_decay = 0.05});
    opt.step();
    // The first AdamW step: p - lr wd p - lr g / (|g| + eps) (bias corrections cancel).
    const auto after = values_of(b);
    for (const std::string name : {"layers.1.downsample.reduction.weight", "layers.0.blocks.1.attn.proj.weight",
                                   "layers.1.downsample.norm.bias"}) {
      INFO(name);
      const double wd = optim::default_weight_decay(name) ? 0.05 : 0.0;
      const auto& p0 = before.at(name);
      const auto& g = step.grads.at(name);
      const auto& p1 = after.at(name);
      for (std::size_t i = 0; i < p0.size(); ++i) {
        const double want = p0[i] - 1e-2 * wd * p0[i] - 1e-2 * g[i] / (std::abs(g[i]) + 1e-8);
        CHECK(std::abs(p1[i] - want) <= 1e-12);
      }
    }
  }
}

TEST_CASE("Stages: bad shape chains, inputs and call orders are refused naming the part", "[stages][errors]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  const std::int64_t B = 2, H = 4, W = 4, C = 8;
  const ConstantSchedule sched(0.5, 0.5);
  auto stack = [&](std::int64_t width, int depth = 1) {
    return Stack<>(ctx, make_vit_layers<double, ConstantSchedule>(depth, width, 2, 2 * width), sched);
  };
  using M = PatchMerging<double>;
  SECTION("a stack given no shape after the merge sees the map [B, H/2, W/2, 2C], which attention does not take") {
    CHECK_THROWS_WITH((Stages(ctx, Shape{B, H, W, C}, stage_part("layers.0.", stack(C), Shape{B, H * W, C}),
                              stage_part("layers.1.downsample.", M(ctx, {C}), Shape{B, H, W, C}),
                              stage_part("layers.1.", stack(2 * C)))),
                      Catch::Contains("part 2 ('layers.1.', reversible stack (reversible mode, 1 layer)) cannot run on "
                                      "streams of shape [2, 2, 2, 16]") &&
                          Catch::Contains("input must be [batch, tokens, width]"));
  }
  SECTION("a shape that is not reshape-compatible with the previous output") {
    CHECK_THROWS_WITH((Stages(ctx, Shape{B, H, W, C}, stage_part("layers.0.", stack(C), Shape{B, H * W, C}),
                              stage_part("layers.1.downsample.", M(ctx, {C}), Shape{B, H, W, C}),
                              stage_part("layers.1.", stack(C), Shape{B, H * W / 2, C}))),
                      Catch::Contains("part 2 ('layers.1.', reversible stack (reversible mode, 1 layer)) is to run on "
                                      "shape [2, 8, 8] but part 1 ('layers.1.downsample.', transition PatchMerging) "
                                      "has shape [2, 2, 2, 16]") &&
                          Catch::Contains("reshape-compatible"));
  }
  SECTION("a stack of the wrong width, a merge of the wrong channels, a batch changed by a given shape") {
    CHECK_THROWS_WITH((Stages(ctx, Shape{B, H, W, C}, stage_part("layers.0.", stack(2 * C), Shape{B, H * W, C}))),
                      Catch::Contains("part 0 ('layers.0.'") && Catch::Contains("input width 8 does not match dim 16"));
    CHECK_THROWS_WITH((Stages(ctx, Shape{B, H, W, C}, stage_part("layers.1.downsample.", M(ctx, {2 * C})))),
                      Catch::Contains("part 0 ('layers.1.downsample.', transition PatchMerging) does not take its input "
                                      "of shape [2, 4, 4, 8] (from the input of the composition)") &&
                          Catch::Contains("has 8 channels but the layer merges 16"));
    CHECK_THROWS_WITH((Stages(ctx, Shape{B, H, W, C}, stage_part("layers.0.", stack(C), Shape{B + 1, H * W, C}))),
                      Catch::Contains("batch (dimension 0) is not the composition's 2"));
    HostContext other;
    CHECK_THROWS_WITH((Stages(ctx, Shape{B, H, W, C}, stage_part("x.", M(other, {C})))),
                      Catch::Contains("runs on another context"));
  }
  SECTION("wrong input shapes at forward, backward out of order, errors of a part prefixed with the part") {
    Stages net(ctx, Shape{B, H, W, C}, stage_part("layers.0.", stack(C), Shape{B, H * W, C}),
               stage_part("layers.1.downsample.", M(ctx, {C}), Shape{B, H, W, C}),
               stage_part("layers.1.", stack(2 * C, 2), Shape{B, H * W / 4, 2 * C}));
    const auto x = random_vector<double>(static_cast<std::size_t>(3 * H * W * (C + 1)), rng);
    std::vector<double> out(static_cast<std::size_t>(3 * H * W * C / 2)), dx(x.size());
    CHECK_THROWS_WITH(net.forward(ConstView<double>(x.data(), Shape{B, H, W, C + 1}),
                                  TensorView<double>(out.data(), Shape{B, H * W / 4, 2 * C}), 0),
                      Catch::Contains("Stages forward: h0 has shape [2, 4, 4, 9], expected [2, 4, 4, 8] with any batch"));
    CHECK_THROWS_WITH(net.forward(ConstView<double>(x.data(), Shape{B, H * W, C}),
                                  TensorView<double>(out.data(), Shape{B, H * W / 4, 2 * C}), 0),
                      Catch::Contains("h0 has shape [2, 16, 8]"));
    CHECK_THROWS_WITH(net.forward(ConstView<double>(x.data(), Shape{B, H, W, C}),
                                  TensorView<double>(out.data(), Shape{B, H * W / 4, C}), 0),
                      Catch::Contains("Stages forward: out has shape [2, 4, 8], expected [2, 4, 16]"));
    const Shape os{B, H * W / 4, 2 * C};
    CHECK_THROWS_WITH(net.backward(ConstView<double>(out.data(), os), TensorView<double>(dx.data(), Shape{B, H, W, C})),
                      Catch::Contains("Stages::backward() called without a preceding training forward()"));
    // Another batch than the construction's: every shape follows.
    CHECK(net.output_shape(3) == Shape{3, H * W / 4, 2 * C});
    net.forward(ConstView<double>(x.data(), Shape{3, H, W, C}), TensorView<double>(out.data(), net.output_shape(3)), 0);
    CHECK(net.part_input_shape(2) == Shape{3, H * W / 4, 2 * C});
    CHECK_THROWS_WITH(net.backward(ConstView<double>(out.data(), os), TensorView<double>(dx.data(), Shape{B, H, W, C})),
                      Catch::Contains("Stages backward: dout has shape [2, 4, 16], expected [3, 4, 16]"));
    CHECK_THROWS_WITH(net.backward(ConstView<double>(out.data(), net.output_shape(3)),
                                   TensorView<double>(dx.data(), Shape{3, H, W, C})),
                      Catch::Contains("called without a preceding training forward()"));  // the failed call spent it
    net.forward(ConstView<double>(x.data(), Shape{3, H, W, C}), TensorView<double>(out.data(), net.output_shape(3)), 0);
    net.backward(ConstView<double>(out.data(), net.output_shape(3)), TensorView<double>(dx.data(), Shape{3, H, W, C}));
    CHECK_THROWS_WITH(net.backward(ConstView<double>(out.data(), net.output_shape(3)),
                                   TensorView<double>(dx.data(), Shape{3, H, W, C})),
                      Catch::Contains("called twice for one forward()"));
    for (double v : dx) CHECK(std::isfinite(v));
    // set_mode discards a pending forward.
    net.forward(ConstView<double>(x.data(), Shape{3, H, W, C}), TensorView<double>(out.data(), net.output_shape(3)), 0);
    net.set_mode(BackpropMode::Standard);
    CHECK(net.part<0>().mode() == BackpropMode::Standard);
    CHECK_THROWS_WITH(net.backward(ConstView<double>(out.data(), net.output_shape(3)),
                                   TensorView<double>(dx.data(), Shape{3, H, W, C})),
                      Catch::Contains("without a preceding training forward()"));
    // A stack's own error comes back naming the part: beta = 0 cannot be reversed.
    net.set_mode(BackpropMode::Reversible);
    net.part<2>().schedule() = ConstantSchedule(1.0, 0.0);
    CHECK_THROWS_WITH(net.forward(ConstView<double>(x.data(), Shape{3, H, W, C}),
                                  TensorView<double>(out.data(), net.output_shape(3)), 0),
                      Catch::StartsWith("dr2net: Stages: part 2 ('layers.1.', reversible stack (reversible mode, 2 "
                                        "layers)) forward: "));
    // A moved-from composition refuses every call.
    auto moved = std::move(net);
    CHECK_THROWS_WITH(net.zero_grad(), Catch::Contains("moved from"));
    CHECK(moved.prefix(1) == "layers.1.downsample.");
    CHECK_THROWS_WITH(moved.prefix(3), Catch::Contains("part 3 out of range"));
  }
}
