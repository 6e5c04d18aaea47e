// The Swin backbone builder (modules/swin.hpp): at (1, 0) its stages equal an independent loop
// implementation of timm's Swin stages (2-D square and non-square maps, a window shrunk to the
// map, 3-D Video Swin windows); timm's parameter names and shapes; reversible gradients equal
// standard ones and central differences for two stages with a merge at several (alpha, beta);
// a stage's reversible activation memory independent of its depth; per-block geometry and
// drop-path rates as timm computes them; configuration errors naming the field.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/modules/swin.hpp"
#include "support/swin_reference.hpp"
#include "support/test_functors.hpp"
#include "support/tolerances.hpp"

using namespace dr2net;
using dr2net::testing::fresh_rng;
using dr2net::testing::random_vector;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

template <int S>
using Backbone = SwinStages<S, double, ConstantSchedule, Fp64>;

//! Every parameter drawn away from timm's tiny init (LayerNorm weights around 1, the rest and
//! the bias tables in [-lo, lo]); returns them by name.
template <class Net>
dr2net::testing::SwinTensors randomize(Net& net, std::mt19937_64& rng, double lo = 0.4) {
  dr2net::testing::SwinTensors t;
  net.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    const bool ln_weight = name.find("norm") != std::string_view::npos && name.ends_with("weight");
    const auto r = random_vector<double>(v.size(), rng, ln_weight ? 0.5 : -lo, ln_weight ? 1.5 : lo);
    std::copy(r.begin(), r.end(), v.data());
    t[std::string(name)] = r;
  });
  return t;
}

template <class Net>
std::map<std::string, std::vector<double>> grads_of(Net& net) {
  std::map<std::string, std::vector<double>> out;
  net.for_each_parameter([&](std::string_view name, TensorView<double>, TensorView<double> g) {
    out[std::string(name)] = std::vector<double>(g.data(), g.data() + g.size());
  });
  return out;
}

dr2net::testing::SwinReferenceSpec spec_of(const SwinConfig& c) {
  return {c.embed_dim, c.depths, c.num_heads, c.window_size, c.grid, c.eps};
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

template <class Net>
std::vector<double> predict(Net& net, const std::vector<double>& x) {
  const Shape in = net.input_shape(), os = net.output_shape(in[0]);
  std::vector<double> out(static_cast<std::size_t>(os.numel()), kNaN);
  net.predict(ConstView<double>(x.data(), in), TensorView<double>(out.data(), os), 0);
  return out;
}

//! The backbone of `c` at (1, 0) equals the loop reference: predict() and a standard-mode
//! training forward.
template <int S>
void check_pretrained(const SwinConfig& c, std::int64_t B, std::mt19937_64& rng) {
  HostContext ctx({.poison_allocations = true});
  auto net = make_swin_stages<S, double>(ctx, c, B, ConstantSchedule(1.0, 0.0), {.mode = BackpropMode::Standard},
                                         rng());
  const auto tensors = randomize(net, rng);
  const Shape in = net.input_shape();
  CHECK(in == swin_input_shape(c, B));
  CHECK(net.output_shape(B) == swin_output_shape(c, B));
  const auto x = random_vector<double>(static_cast<std::size_t>(in.numel()), rng, -2.0, 2.0);
  const auto want = dr2net::testing::SwinReference(tensors, spec_of(c)).run(B, x);
  const auto got = predict(net, x);
  const double err = max_abs_diff(got, want);
  INFO("max |got - want| " << err << ", max |want| " << max_abs(want));
  CHECK(err <= 1e-12 * std::max(1.0, max_abs(want)));
  // The training forward (standard mode stores everything) computes the same.
  std::vector<double> out(got.size(), kNaN);
  net.forward(ConstView<double>(x.data(), in), TensorView<double>(out.data(), net.output_shape(B)), 0);
  CHECK(out == got);
}

}  // namespace

TEST_CASE("Swin backbone at (1, 0) is exactly timm's Swin stages (loop reference)", "[swin]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  SECTION("2-D, 8x8 map, window 4, two stages: stage 0 shifts on block 1, stage 1's 4x4 map never shifts") {
    SwinConfig c;
    c.embed_dim = 8;
    c.depths = {2, 2};
    c.num_heads = {2, 4};
    c.window_size = {1, 4, 4};
    c.grid = {1, 8, 8};
    check_pretrained<2>(c, 2, rng);
  }
  SECTION("2-D, non-square 8x16 map, window 4, three stages (the last one's 2x4 map shrinks the window)") {
    SwinConfig c;
    c.embed_dim = 4;
    c.depths = {2, 1, 3};
    c.num_heads = {1, 2, 2};
    c.window_size = {1, 4, 4};
    c.grid = {1, 8, 16};
    c.mlp_ratio = 2.5;
    check_pretrained<3>(c, 1, rng);
  }
  SECTION("3-D (Video Swin), 4x4x8 map, window (2, 2, 4): every axis shifts on odd blocks, merging per frame") {
    SwinConfig c;
    c.embed_dim = 4;
    c.depths = {2, 2};
    c.num_heads = {2, 2};
    c.window_size = {2, 2, 4};
    c.grid = {4, 4, 8};
    check_pretrained<2>(c, 2, rng);
  }
  SECTION("3-D, window t equal to the frames (t never shifts), one stage") {
    SwinConfig c;
    c.embed_dim = 6;
    c.depths = {3};
    c.num_heads = {3};
    c.window_size = {2, 2, 2};
    c.grid = {2, 4, 4};
    check_pretrained<1>(c, 1, rng);
  }
}

TEST_CASE("Swin backbone: timm parameter names, shapes, block geometry, drop-path rates", "[swin]") {
  HostContext ctx;
  SwinConfig c;
  c.embed_dim = 8;
  c.depths = {2, 3};
  c.num_heads = {2, 4};
  c.window_size = {1, 4, 4};
  c.grid = {1, 8, 8};
  c.drop_path_rate = 0.4;
  auto net = make_swin_stages<2, double>(ctx, c, 1, ConstantSchedule(0.0, 1.0));
  std::vector<std::string> names;
  std::map<std::string, Shape> shapes;
  net.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    names.emplace_back(name);
    shapes[std::string(name)] = v.shape();
  });
  REQUIRE(names.size() == static_cast<std::size_t>(13 * 5 + 3));
  CHECK(names[0] == "layers.0.blocks.0.norm1.weight");
  CHECK(names[2] == "layers.0.blocks.0.attn.relative_position_bias_table");
  CHECK(names[26] == "layers.1.downsample.norm.weight");
  CHECK(names[28] == "layers.1.downsample.reduction.weight");
  CHECK(names[29] == "layers.1.blocks.0.norm1.weight");
  CHECK(names.back() == "layers.1.blocks.2.mlp.fc2.bias");
  CHECK(shapes.at("layers.0.blocks.1.attn.relative_position_bias_table") == Shape{49, 2});
  CHECK(shapes.at("layers.1.blocks.2.attn.relative_position_bias_table") == Shape{49, 4});
  CHECK(shapes.at("layers.1.downsample.reduction.weight") == Shape{16, 32});
  CHECK(shapes.at("layers.1.blocks.0.mlp.fc1.weight") == Shape{64, 16});
  // Geometry: stage 0 (8x8) shifts by 2 on odd blocks; stage 1 (4x4 = the window) never.
  auto& s0 = net.part<0>();
  auto& s1 = net.part<2>();
  CHECK(s0.layer(0).f().geometry().shift[1] == 0);
  CHECK(s0.layer(1).f().geometry().shift[1] == 2);
  CHECK(s0.layer(1).f().geometry().shift[2] == 2);
  CHECK(s1.layer(1).f().geometry().shift[1] == 0);
  CHECK(s1.layer(1).f().geometry().window[2] == 4);
  // Drop path: timm's linspace(0, 0.4, 5) over the five blocks, F and G alike.
  const double want[5] = {0.0, 0.1, 0.2, 0.3, 0.4};
  for (int j = 0; j < 2; ++j) {
    CHECK(s0.layer(j).f().config().drop_path == Approx(want[j]).margin(1e-15));
    CHECK(s0.layer(j).g().config().drop_path == Approx(want[j]).margin(1e-15));
  }
  for (int j = 0; j < 3; ++j) CHECK(s1.layer(j).f().config().drop_path == Approx(want[2 + j]).margin(1e-15));
  CHECK(s0.layer(0).f().config().eps == 1e-5);
  CHECK(s1.layer(0).g().config().hidden == 64);
  // The stages draw masks from different seeds.
  CHECK(s0.options().seed != s1.options().seed);
}

TEST_CASE("Swin backbone: reversible gradients equal standard ones and central differences", "[swin]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  const auto& tol = dr2net::testing::tolerances_for<double>().gradient;
  SwinConfig c;
  c.embed_dim = 4;
  c.depths = {2, 2};
  c.num_heads = {1, 2};
  c.window_size = {1, 4, 4};
  c.grid = {1, 8, 8};
  for (const Coefficients ab : {Coefficients{0.0, 1.0}, Coefficients{0.5, 0.5}, Coefficients{1.0, 0.1}}) {
    INFO("(alpha, beta) = (" << ab.alpha << ", " << ab.beta << ")");
    HostContext ctx({.poison_allocations = true});
    const std::uint64_t wseed = rng();
    auto rev = make_swin_stages<2, double>(ctx, c, 1, ConstantSchedule(ab), {.mode = BackpropMode::Reversible}, wseed);
    auto std_ = make_swin_stages<2, double>(ctx, c, 1, ConstantSchedule(ab), {.mode = BackpropMode::Standard}, wseed);
    std::mt19937_64 prng(wseed);
    randomize(rev, prng, 0.3);
    prng.seed(wseed);
    randomize(std_, prng, 0.3);
    const Shape in = rev.input_shape(), os = rev.output_shape(1);
    const auto h0 = random_vector<double>(static_cast<std::size_t>(in.numel()), rng);
    const auto dout = random_vector<double>(static_cast<std::size_t>(os.numel()), rng);
    struct Step {
      std::vector<double> out, dh0;
      std::map<std::string, std::vector<double>> grads;
    };
    const auto step = [&](auto& net) {
      Step s{std::vector<double>(dout.size(), kNaN), std::vector<double>(h0.size(), kNaN), {}};
      net.zero_grad();
      net.forward(ConstView<double>(h0.data(), in), TensorView<double>(s.out.data(), os), 0);
      net.backward(ConstView<double>(dout.data(), os), TensorView<double>(s.dh0.data(), in),
                   ConstView<double>(h0.data(), in));
      s.grads = grads_of(net);
      return s;
    };
    const Step r = step(rev), s = step(std_);
    CHECK(r.out == s.out);
    const auto close = [&](const std::vector<double>& a, const std::vector<double>& b) {
      const double scale = max_abs(b);
      for (std::size_t i = 0; i < a.size(); ++i)
        if (!(std::abs(a[i] - b[i]) <= tol.atol + tol.rtol * scale)) return false;
      return true;
    };
    CHECK(close(r.dh0, s.dh0));
    for (const auto& [name, g] : s.grads) {
      INFO(name);
      CHECK(close(r.grads.at(name), g));
    }
    CHECK(rev.part<0>().reconstruction().input_compared);
    CHECK(rev.part<2>().reconstruction().relative_error < 1e-9);

    const auto loss = [&](const std::vector<double>& x) {
      const auto out = predict(rev, x);
      long double l = 0;
      for (std::size_t i = 0; i < out.size(); ++i) l += static_cast<long double>(out[i]) * dout[i];
      return static_cast<double>(l);
    };
    const double h = 1e-6;
    const auto near = [](double a, double fd) { return std::abs(a - fd) <= 1e-6 * std::max(1.0, std::abs(fd)); };
    std::uniform_int_distribution<std::size_t> pick(0, h0.size() - 1);
    for (int trial = 0; trial < 5; ++trial) {
      const std::size_t i = pick(rng);
      auto xp = h0, xm = h0;
      xp[i] += h;
      xm[i] -= h;
      const double fd = (loss(xp) - loss(xm)) / (2 * h);
      INFO("dh0 [" << i << "] analytic " << r.dh0[i] << " fd " << fd);
      CHECK(near(r.dh0[i], fd));
    }
    const std::vector<std::string> sampled = {"layers.0.blocks.1.attn.relative_position_bias_table",
                                              "layers.0.blocks.1.attn.qkv.weight", "layers.1.downsample.norm.bias",
                                              "layers.1.downsample.reduction.weight", "layers.1.blocks.1.mlp.fc1.weight"};
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
        const double lp = loss(h0);
        p = p0 - h;
        const double lm = loss(h0);
        p = p0;
        const double fd = (lp - lm) / (2 * h), analytic = r.grads.at(std::string(name))[i];
        INFO(name << " [" << i << "] analytic " << analytic << " fd " << fd);
        CHECK(near(analytic, fd));
      }
    });
    CHECK(seen == sampled.size());
  }
}

TEST_CASE("Swin backbone: a stage's reversible activation memory does not grow with its depth", "[swin][memory]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  SwinConfig base;
  base.embed_dim = 8;
  base.depths = {2, 2};
  base.num_heads = {2, 4};
  base.window_size = {1, 4, 4};
  base.grid = {1, 8, 8};
  const std::int64_t B = 2;
  const Shape in = swin_input_shape(base, B);
  const auto h0 = random_vector<double>(static_cast<std::size_t>(in.numel()), rng);
  const auto peak = [&](std::vector<int> depths, BackpropMode mode) {
    SwinConfig c = base;
    c.depths = std::move(depths);
    HostContext ctx;
    auto net = make_swin_stages<2, double>(ctx, c, B, ConstantSchedule(0.0, 1.0), {.mode = mode}, 5);
    const Shape os = net.output_shape(B);
    std::vector<double> out(static_cast<std::size_t>(os.numel())), dh0(h0.size());
    const auto dout = random_vector<double>(out.size(), rng);
    ctx.meter().reset_peaks();
    net.forward(ConstView<double>(h0.data(), in), TensorView<double>(out.data(), os), 0);
    const auto report = net.memory_report();
    net.backward(ConstView<double>(dout.data(), os), TensorView<double>(dh0.data(), in));
    // The merge kept its formula's bytes: rows [M, 4C] and two statistics per row.
    const std::int64_t M = B * 4 * 4, C = base.embed_dim;
    CHECK(report.parts[1].kept_for_backward == static_cast<std::size_t>(M * 4 * C + 2 * M) * sizeof(double));
    return ctx.meter().peak_activation();
  };
  const auto r22 = peak({2, 2}, BackpropMode::Reversible), r62 = peak({6, 2}, BackpropMode::Reversible);
  const auto r26 = peak({2, 6}, BackpropMode::Reversible);
  const auto s22 = peak({2, 2}, BackpropMode::Standard), s62 = peak({6, 2}, BackpropMode::Standard);
  INFO("reversible " << r22 << " " << r62 << " " << r26 << ", standard " << s22 << " " << s62);
  CHECK(r22 == r62);
  CHECK(r22 == r26);
  CHECK(s62 > s22);
  CHECK(r62 < s62);
}

TEST_CASE("Swin configurations: every bad field is refused naming it", "[swin][errors]") {
  SwinConfig good;
  good.embed_dim = 8;
  good.depths = {2, 2};
  good.num_heads = {2, 4};
  good.window_size = {1, 4, 4};
  good.grid = {1, 8, 8};
  CHECK_NOTHROW(validate_swin_config(good));
  const auto layouts = swin_stage_layouts(good);
  REQUIRE(layouts.size() == 2);
  CHECK(layouts[1].dim == 16);
  CHECK(layouts[1].grid == std::array<std::int64_t, 3>{1, 4, 4});
  CHECK(layouts[1].hidden == 64);
  CHECK(layouts[1].first_block == 2);
  CHECK(swin_input_shape(good, 3) == Shape{3, 8, 8, 8});
  CHECK(swin_output_shape(good, 3) == Shape{3, 16, 16});
  const auto bad = [&](auto edit, const char* needle) {
    SwinConfig c = good;
    edit(c);
    INFO(needle);
    CHECK_THROWS_WITH(validate_swin_config(c), Catch::Contains(needle));
  };
  bad([](SwinConfig& c) { c.embed_dim = 0; }, "embed_dim must be positive");
  bad([](SwinConfig& c) { c.depths.clear(); c.num_heads.clear(); }, "depths is empty");
  bad([](SwinConfig& c) { c.num_heads = {2}; }, "num_heads has 1 entries but depths has 2");
  bad([](SwinConfig& c) { c.num_heads = {2, 3}; }, "num_heads[1] = 3 does not divide stage 1's width 16");
  bad([](SwinConfig& c) { c.depths = {2, 0}; }, "depths[1] = 0");
  bad([](SwinConfig& c) { c.grid = {1, 10, 8}; }, "grid h = 10 is not a multiple of window h = 4");
  bad([](SwinConfig& c) { c.grid = {1, 12, 12}; }, "stage 1 block 0");  // stage 1: 6x6 with window 4
  bad([](SwinConfig& c) { c.grid = {1, 3, 3}; }, "stage 1 starts by merging 2x2 patches of stage 0's 3x3 map");
  bad([](SwinConfig& c) { c.window_size = {1, 0, 4}; }, "window_size h = 0");
  bad([](SwinConfig& c) { c.eps = 0; }, "eps must be positive");
  bad([](SwinConfig& c) { c.mlp_ratio = std::nan(""); }, "mlp_ratio");
  bad([](SwinConfig& c) { c.drop_path_rate = 1.0; }, "drop_path_rate");
  HostContext ctx;
  CHECK_THROWS_WITH((make_swin_stages<3, double>(ctx, good, 1, ConstantSchedule(0, 1))),
                    Catch::Contains("the configuration has 2 stage(s)"));
  CHECK_THROWS_WITH((make_swin_stages<2, double>(ctx, good, 0, ConstantSchedule(0, 1))),
                    Catch::Contains("batch must be positive"));
  CHECK_THROWS_WITH(video_swin_t_config(7), Catch::Contains("even"));
  CHECK(video_swin_t_config(16).grid == std::array<std::int64_t, 3>{8, 56, 56});
  CHECK_NOTHROW(validate_swin_config(swin_t_config()));
  CHECK_NOTHROW(validate_swin_config(video_swin_t_config(32)));
}
