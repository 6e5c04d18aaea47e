// The Dr²Net block and stack on the host backend: exact pretrained equivalence, inverse,
// gradients (reversible = standard = finite differences), memory plan, misuse.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <catch2/catch.hpp>
#include <random>
#include <string>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;
using dr2net::testing::SineGate;
using dr2net::testing::TanhLinear;

namespace {

template <class T>
using Block = ReversibleDualResidual<TanhLinear<T>, SineGate<T>, ConstantSchedule, PrecisionPolicy<T, T, T>>;

template <class T>
std::vector<Block<T>> make_layers(int L, std::int64_t D, std::mt19937_64& rng) {
  std::vector<Block<T>> layers;
  for (int l = 0; l < L; ++l) layers.emplace_back(TanhLinear<T>(D, rng), SineGate<T>(D, rng));
  return layers;
}

template <class T>
double max_abs_diff(const std::vector<T>& a, const std::vector<T>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  return m;
}

template <class T>
double max_abs(const std::vector<T>& a) {
  double m = 0;
  for (T v : a) m = std::max(m, std::abs(double(v)));
  return m;
}

template <class T>
std::vector<T> copy_of(TensorView<T> v) {
  return std::vector<T>(v.data(), v.data() + v.size());
}

template <class T>
std::vector<std::vector<T>> gradients_of(ReversibleStack<Block<T>>& s) {
  std::vector<std::vector<T>> g;
  for (auto& p : s.parameters()) g.push_back(copy_of(p.grad));
  return g;
}

// Loss L = sum(out * dout) and all gradients, for one stack in one mode.
template <class T>
struct GradResult {
  std::vector<T> out, dh0;
  std::vector<std::vector<T>> params;
};

template <class T>
GradResult<T> run_step(ReversibleStack<Block<T>>& s, const Shape& shape, const std::vector<T>& h0,
                       const std::vector<T>& dout, std::int64_t step = 0) {
  GradResult<T> r{std::vector<T>(h0.size()), std::vector<T>(h0.size()), {}};
  s.zero_grad();
  s.forward(ConstView<T>(h0.data(), shape), TensorView<T>(r.out.data(), shape), step);
  s.backward(ConstView<T>(dout.data(), shape), TensorView<T>(r.dh0.data(), shape));
  r.params = gradients_of(s);
  return r;
}

}  // namespace

TEMPLATE_TEST_CASE("at (alpha, beta) = (1, 0) the stack is exactly the plain residual network", "[block]",
                   float, double) {
  using T = TestType;
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const int L = 4;
  const Shape shape{2, 5, 8};
  auto layers = make_layers<T>(L, 8, rng);
  auto reference = layers;  // the same functors, applied as h <- h + F(h)
  HostContext ctx({.poison_allocations = true});
  ReversibleStack<Block<T>> stack(ctx, std::move(layers), ConstantSchedule(1.0, 0.0),
                                  {.mode = BackpropMode::Standard});
  const auto h0 = dr2net::testing::random_vector<T>(static_cast<std::size_t>(shape.numel()), rng);

  std::vector<T> h = h0, f(h0.size()), scratch(h0.size());
  HostContext plain_ctx;
  for (auto& b : reference) {
    ModuleCall<HostContext> call{plain_ctx};
    b.f().forward(call, ConstView<T>(h.data(), shape), TensorView<T>(f.data(), shape), TensorView<T>(scratch.data(), shape));
    for (std::size_t i = 0; i < h.size(); ++i) h[i] = h[i] + f[i];
    b.g().forward(call, ConstView<T>(h.data(), shape), TensorView<T>(f.data(), shape), TensorView<T>(scratch.data(), shape));
    for (std::size_t i = 0; i < h.size(); ++i) h[i] = h[i] + f[i];
  }

  for (auto mode : {BackpropMode::Standard, BackpropMode::Reversible}) {
    stack.set_mode(mode);
    std::vector<T> out(h0.size());
    if (mode == BackpropMode::Reversible) {
      // beta = 0 is not invertible: a training forward refuses, inference works.
      CHECK_THROWS_WITH(stack.forward(ConstView<T>(h0.data(), shape), TensorView<T>(out.data(), shape), 0),
                        Catch::Contains("not reversible") && Catch::Contains("module 0"));
      stack.predict(ConstView<T>(h0.data(), shape), TensorView<T>(out.data(), shape), 0);
    } else {
      stack.forward(ConstView<T>(h0.data(), shape), TensorView<T>(out.data(), shape), 0);
    }
    for (std::size_t i = 0; i < h.size(); ++i) REQUIRE(out[i] == h[i]);  // bit-for-bit
  }
}

TEMPLATE_TEST_CASE("the block's inverse reconstructs its input over a grid of coefficients", "[block]", float,
                   double) {
  using T = TestType;
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const Shape shape{3, 7, 6};
  const auto n = static_cast<std::size_t>(shape.numel());
  HostContext ctx({.poison_allocations = true});
  for (double alpha : {0.0, 0.5, 1.0, -0.3}) {
    for (double beta : {1.0, 0.5, 0.1, -0.7}) {
      INFO("alpha " << alpha << " beta " << beta);
      auto layers = make_layers<T>(1, 6, rng);
      auto& block = layers[0];
      typename Block<T>::workspace_type ws;
      ws.prepare(ctx, shape, std::max(block.saved_elements_f(shape, 0), block.saved_elements_g(shape, 0)));
      const ConstantSchedule sched(alpha, beta);
      auto x0 = dr2net::testing::random_vector<T>(n, rng), y0 = dr2net::testing::random_vector<T>(n, rng);
      auto x = x0, y = y0;
      const LayerCall call{};
      block.forward(ctx, sched, call, TensorView<T>(x.data(), shape), TensorView<T>(y.data(), shape), ws);
      REQUIRE(max_abs_diff(x, x0) > 0);  // the forward did something
      block.inverse(ctx, sched, call, TensorView<T>(x.data(), shape), TensorView<T>(y.data(), shape), ws);
      // Two divisions by beta; each module's rounding error is amplified by about 1/|beta|
      // (plus F's Lipschitz constant, < 1.5 here) at most twice.
      const double amp = std::pow(2.5 / std::abs(beta), 2.0);
      const double tol = 32.0 * unit_roundoff<T>() * amp * std::max({max_abs(x0), max_abs(y0), max_abs(x), 1.0});
      CHECK(max_abs_diff(x, x0) <= tol);
      CHECK(max_abs_diff(y, y0) <= tol);
    }
  }
  // beta = 0 (or below the threshold) cannot be inverted: a clear error, nothing written.
  auto layers = make_layers<T>(1, 6, rng);
  typename Block<T>::workspace_type ws;
  ws.prepare(ctx, shape, n);
  auto x = dr2net::testing::random_vector<T>(n, rng), y = x;
  const auto before = x;
  LayerCall call{};
  call.layer = 0;
  call.step = 12;
  CHECK_THROWS_WITH(layers[0].inverse(ctx, ConstantSchedule(1.0, 0.0), call, TensorView<T>(x.data(), shape),
                                      TensorView<T>(y.data(), shape), ws),
                    Catch::Contains("module 1") && Catch::Contains("step 12") && Catch::Contains("beta"));
  CHECK(x == before);
}

TEST_CASE("reversible gradients equal standard gradients and central finite differences (fp64)", "[block][grad]") {
  using T = double;
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const Shape shape{2, 3, 5};
  const auto n = static_cast<std::size_t>(shape.numel());
  struct Point {
    double alpha, beta;
    // Reconstruction error grows per module like the largest root of beta l^2 + alpha l - 1 = 0
    // (2.7 at (1, 0.5), 10.9 at (1, 0.1)); deep stacks at those points are the fidelity work.
    int max_layers;
  };
  for (int L : {1, 3, 8}) {
    for (Point p : {Point{0.0, 1.0, 8}, Point{0.5, 0.5, 8}, Point{1.0, 0.5, 3}, Point{-0.4, 0.8, 8}, Point{1.0, 0.1, 3}}) {
      if (L > p.max_layers) continue;
      INFO("L " << L << " alpha " << p.alpha << " beta " << p.beta);
      HostContext ctx({.poison_allocations = true});
      ReversibleStack<Block<T>> stack(ctx, make_layers<T>(L, 5, rng), ConstantSchedule(p.alpha, p.beta));
      const auto h0 = dr2net::testing::random_vector<T>(n, rng);
      const auto dout = dr2net::testing::random_vector<T>(n, rng);

      stack.set_mode(BackpropMode::Standard);
      const auto standard = run_step(stack, shape, h0, dout);
      stack.set_mode(BackpropMode::Reversible);
      const auto reversible = run_step(stack, shape, h0, dout);

      CHECK(reversible.out == standard.out);  // the forward is the same arithmetic in both modes
      CHECK(max_abs_diff(reversible.dh0, standard.dh0) <= 1e-9 * std::max(1.0, max_abs(standard.dh0)));
      for (std::size_t k = 0; k < standard.params.size(); ++k)
        CHECK(max_abs_diff(reversible.params[k], standard.params[k]) <= 1e-9 * std::max(1.0, max_abs(standard.params[k])));

      // Central differences of L = sum(out * dout) on a sample of inputs and parameters.
      auto loss = [&](const std::vector<T>& input) {
        std::vector<T> out(n);
        stack.predict(ConstView<T>(input.data(), shape), TensorView<T>(out.data(), shape), 0);
        double s = 0;
        for (std::size_t i = 0; i < n; ++i) s += out[i] * dout[i];
        return s;
      };
      const double eps = 1e-5;
      auto check_fd = [&](double analytic, double fd) {
        CHECK(std::abs(analytic - fd) <= 1e-6 * std::max(1.0, std::abs(fd)));
      };
      std::uniform_int_distribution<std::size_t> pick(0, n - 1);
      for (int s = 0; s < 6; ++s) {
        const std::size_t i = pick(rng);
        auto hp = h0, hm = h0;
        hp[i] += eps;
        hm[i] -= eps;
        check_fd(reversible.dh0[i], (loss(hp) - loss(hm)) / (2 * eps));
      }
      auto params = stack.parameters();
      for (std::size_t k = 0; k < params.size(); ++k) {
        std::uniform_int_distribution<std::size_t> pk(0, params[k].value.size() - 1);
        for (int s = 0; s < 3; ++s) {
          const std::size_t i = pk(rng);
          T& w = params[k].value.data()[i];
          const T saved = w;
          w = saved + eps;
          const double lp = loss(h0);
          w = saved - eps;
          const double lm = loss(h0);
          w = saved;
          INFO("parameter " << params[k].name << " [" << i << "]");
          check_fd(reversible.params[k][i], (lp - lm) / (2 * eps));
        }
      }
    }
  }
}

namespace {

//! TanhLinear that also offers the adds-into members, counting how often the block uses them.
template <class T>
class AddingTanh : public TanhLinear<T> {
 public:
  AddingTanh(std::int64_t width, std::mt19937_64& rng, std::shared_ptr<int> adds)
      : TanhLinear<T>(width, rng), adds_(std::move(adds)) {}
  template <class Call>
  bool adds_into(const Call&) const {
    return true;
  }
  template <class Call>
  void recompute_add(const Call& call, ConstView<T> in, ConstView<T> addend, double scale, TensorView<T> dst,
                     TensorView<T> saved) {
    std::vector<T> f(in.size());
    this->recompute(call, in, TensorView<T>(f.data(), in.shape()), saved);
    for (std::size_t i = 0; i < f.size(); ++i)
      dst.data()[i] = scale == 0.0 ? f[i] : static_cast<T>(f[i] + static_cast<T>(scale) * addend.data()[i]);
    ++*adds_;
  }

 private:
  std::shared_ptr<int> adds_;
};

}  // namespace

TEST_CASE("a function that adds into the stream replaces the combine pass with the same results", "[block][adds-into]") {
  using T = double;
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  using Adding = ReversibleDualResidual<AddingTanh<T>, SineGate<T>, ConstantSchedule, Fp64>;
  static_assert(AddsInto<AddingTanh<T>> && !AddsInto<TanhLinear<T>>);
  const Shape shape{2, 3, 5};
  const auto n = static_cast<std::size_t>(shape.numel());
  const int L = 3;
  for (Coefficients c : {Coefficients{1.0, 0.0}, Coefficients{0.0, 1.0}, Coefficients{0.5, 0.5}, Coefficients{-0.4, 0.8}}) {
    INFO("alpha " << c.alpha << " beta " << c.beta);
    const std::uint64_t weights = rng();
    std::mt19937_64 wa(weights), wb(weights);
    auto adds = std::make_shared<int>(0);
    std::vector<Adding> adding_layers;
    std::vector<Block<T>> plain_layers;
    for (int l = 0; l < L; ++l) {
      adding_layers.emplace_back(AddingTanh<T>(5, wa, adds), SineGate<T>(5, wa));
      plain_layers.emplace_back(TanhLinear<T>(5, wb), SineGate<T>(5, wb));
    }
    HostContext ctx({.poison_allocations = true});
    ReversibleStack<Adding> adding(ctx, std::move(adding_layers), ConstantSchedule(c.alpha, c.beta));
    ReversibleStack<Block<T>> plain(ctx, std::move(plain_layers), ConstantSchedule(c.alpha, c.beta));
    const auto h0 = dr2net::testing::random_vector<T>(n, rng);
    const auto dout = dr2net::testing::random_vector<T>(n, rng);
    plain.set_mode(BackpropMode::Standard);
    const auto reference = run_step(plain, shape, h0, dout);
    for (BackpropMode mode : {BackpropMode::Standard, BackpropMode::Reversible}) {
      if (mode == BackpropMode::Reversible && c.beta == 0.0) continue;
      adding.set_mode(mode);
      *adds = 0;
      adding.zero_grad();
      std::vector<T> out(n), dh0(n);
      adding.forward(ConstView<T>(h0.data(), shape), TensorView<T>(out.data(), shape), 0);
      CHECK(*adds == L);  // every F added into the stream; no combine pass for it
      adding.backward(ConstView<T>(dout.data(), shape), TensorView<T>(dh0.data(), shape));
      // At beta = 0 or alpha = 0 the sum has two terms: the same rounding as the combine pass.
      if (c.alpha == 0.0 || c.beta == 0.0) CHECK(out == reference.out);
      CHECK(max_abs_diff(out, reference.out) <= 1e-13 * std::max(1.0, max_abs(reference.out)));
      CHECK(max_abs_diff(dh0, reference.dh0) <= 1e-10 * std::max(1.0, max_abs(reference.dh0)));
      auto params = adding.parameters();
      for (std::size_t k = 0; k < params.size(); ++k) {
        const auto g = copy_of(params[k].grad);
        CHECK(max_abs_diff(g, reference.params[k]) <= 1e-10 * std::max(1.0, max_abs(reference.params[k])));
      }
    }
  }
  // Over fp32 compute with fp64 streams there is no stream of F's type to add into: the block
  // keeps the combine pass.
  using Mixed = ReversibleDualResidual<AddingTanh<float>, SineGate<float>, ConstantSchedule, Fp64StreamsFp32Compute>;
  auto adds = std::make_shared<int>(0);
  std::vector<Mixed> layers;
  layers.emplace_back(AddingTanh<float>(5, rng, adds), SineGate<float>(5, rng));
  HostContext ctx;
  ReversibleStack<Mixed> mixed(ctx, std::move(layers), ConstantSchedule(0.0, 1.0));
  std::vector<double> h(n, 0.25), out(n);
  mixed.forward(ConstView<double>(h.data(), shape), TensorView<double>(out.data(), shape), 0);
  CHECK(*adds == 0);
}

TEST_CASE("mean-of-streams output and fp64 streams over fp32 compute give consistent gradients", "[block][grad]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const Shape shape{2, 4, 6};
  const auto n = static_cast<std::size_t>(shape.numel());
  using MixedBlock = ReversibleDualResidual<TanhLinear<float>, SineGate<float>, ConstantSchedule, Fp64StreamsFp32Compute>;
  std::vector<MixedBlock> layers;
  for (int l = 0; l < 3; ++l) layers.emplace_back(TanhLinear<float>(6, rng), SineGate<float>(6, rng));
  HostContext ctx({.poison_allocations = true});
  ReversibleStack<MixedBlock> stack(ctx, std::move(layers), ConstantSchedule(0.5, 0.5),
                                    {.output = StackOutput::MeanOfStreams});
  const auto h0 = dr2net::testing::random_vector<double>(n, rng);
  const auto dout = dr2net::testing::random_vector<double>(n, rng);
  std::vector<double> out_r(n), out_s(n), dh_r(n), dh_s(n);
  std::vector<std::vector<float>> g_r, g_s;
  for (auto mode : {BackpropMode::Standard, BackpropMode::Reversible}) {
    stack.set_mode(mode);
    stack.zero_grad();
    auto& out = mode == BackpropMode::Standard ? out_s : out_r;
    auto& dh = mode == BackpropMode::Standard ? dh_s : dh_r;
    stack.forward(ConstView<double>(h0.data(), shape), TensorView<double>(out.data(), shape), 3);
    stack.backward(ConstView<double>(dout.data(), shape), TensorView<double>(dh.data(), shape));
    auto& g = mode == BackpropMode::Standard ? g_s : g_r;
    for (auto& p : stack.parameters()) g.push_back(copy_of(p.grad));
  }
  CHECK(out_r == out_s);
  // Reconstruction in fp64 streams: only the fp32 function evaluations are inexact, and they
  // are recomputed bit-identically, so the two modes agree to fp64-level streams.
  CHECK(max_abs_diff(dh_r, dh_s) <= 1e-9);
  for (std::size_t k = 0; k < g_s.size(); ++k) CHECK(max_abs_diff(g_r[k], g_s[k]) <= 1e-5 * std::max(1.0, max_abs(g_s[k])));
  // The reconstructed streams are the input.
  const auto rx = stack.reconstructed_x(), ry = stack.reconstructed_y();
  for (std::size_t i = 0; i < n; ++i) {
    CHECK(std::abs(rx.data()[i] - h0[i]) <= 1e-12);
    CHECK(std::abs(ry.data()[i] - h0[i]) <= 1e-12);
  }
}

TEST_CASE("reversible activation memory does not grow with depth; standard grows linearly", "[block][memory]") {
  using T = float;
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  const Shape shape{2, 16, 8};
  const auto n = static_cast<std::size_t>(shape.numel());
  auto peak = [&](int L, BackpropMode mode) {
    HostContext ctx;
    ReversibleStack<Block<T>> stack(ctx, make_layers<T>(L, 8, rng), ConstantSchedule(0.0, 1.0), {.mode = mode});
    const auto h0 = dr2net::testing::random_vector<T>(n, rng);
    std::vector<T> out(n), dh(n);
    stack.forward(ConstView<T>(h0.data(), shape), TensorView<T>(out.data(), shape), 0);
    stack.backward(ConstView<T>(out.data(), shape), TensorView<T>(dh.data(), shape));
    CHECK(ctx.meter().current(MemoryCategory::Parameters) > 0);
    return ctx.meter().peak_activation();
  };
  const auto r2 = peak(2, BackpropMode::Reversible), r8 = peak(8, BackpropMode::Reversible),
             r32 = peak(32, BackpropMode::Reversible);
  CHECK(r2 == r8);
  CHECK(r8 == r32);
  // 4 stream tensors + F's output + the largest function's saved internals.
  CHECK(r2 == 4 * n * sizeof(T) + n * sizeof(T) + n * sizeof(T));
  const auto s2 = peak(2, BackpropMode::Standard), s8 = peak(8, BackpropMode::Standard),
             s32 = peak(32, BackpropMode::Standard);
  CHECK(s8 > s2);
  CHECK(s32 - s8 == 4 * (s8 - s2));  // 24 more layers cost 4x what 6 more layers cost
  CHECK(s32 > 10 * r32);

  // Switching a stack from standard to reversible mode frees the standard-mode storage.
  HostContext ctx;
  ReversibleStack<Block<T>> stack(ctx, make_layers<T>(8, 8, rng), ConstantSchedule(0.0, 1.0), {.mode = BackpropMode::Standard});
  const auto h0 = dr2net::testing::random_vector<T>(n, rng);
  std::vector<T> out(n), dh(n);
  stack.forward(ConstView<T>(h0.data(), shape), TensorView<T>(out.data(), shape), 0);
  CHECK(ctx.meter().current(MemoryCategory::SavedActivations) > 0);
  stack.set_mode(BackpropMode::Reversible);
  stack.forward(ConstView<T>(h0.data(), shape), TensorView<T>(out.data(), shape), 0);
  CHECK(ctx.meter().current(MemoryCategory::SavedActivations) == 0);
  ctx.meter().reset_peaks();
  stack.backward(ConstView<T>(out.data(), shape), TensorView<T>(dh.data(), shape));
  CHECK(ctx.meter().peak_activation() == r8);
}

TEST_CASE("misuse gives clear errors, not garbage", "[block][errors]") {
  using T = double;
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  const Shape shape{2, 3, 4};
  const auto n = static_cast<std::size_t>(shape.numel());
  HostContext ctx;
  ReversibleStack<Block<T>> stack(ctx, make_layers<T>(2, 4, rng), ConstantSchedule(0.5, 0.5));
  auto h0 = dr2net::testing::random_vector<T>(n, rng);
  std::vector<T> out(n), dh(n);
  const ConstView<T> hv(h0.data(), shape);
  const TensorView<T> ov(out.data(), shape), dv(dh.data(), shape);

  CHECK_THROWS_WITH(stack.backward(ov, dv), Catch::Contains("without a preceding"));
  stack.forward(hv, ov, 0);
  CHECK_THROWS_WITH(stack.backward(ConstView<T>(out.data(), Shape{2, 4, 3}), dv),
                    Catch::Contains("dout") && Catch::Contains("[2, 4, 3]"));
  stack.forward(hv, ov, 0);
  stack.backward(ov, dv);
  CHECK_THROWS_WITH(stack.backward(ov, dv), Catch::Contains("twice"));
  stack.predict(hv, ov, 0);
  CHECK_THROWS_WITH(stack.backward(ov, dv), Catch::Contains("without a preceding"));

  // Streams whose width does not match the functions'.
  std::vector<T> wide(2 * 3 * 5);
  CHECK_THROWS_WITH(stack.forward(ConstView<T>(wide.data(), Shape{2, 3, 5}), TensorView<T>(wide.data(), Shape{2, 3, 5}), 0),
                    Catch::Contains("module 0") && Catch::Contains("width 5"));
  // Output of another shape than the input.
  CHECK_THROWS_WITH(stack.forward(hv, TensorView<T>(wide.data(), Shape{2, 3, 5}), 0), Catch::Contains("out has shape"));
  // Non-contiguous input.
  CHECK_THROWS_WITH(stack.forward(ConstView<T>(h0.data(), shape, {12, 4, 2, 0}), ov, 0), Catch::Contains("contiguous"));
  CHECK_THROWS_WITH(stack.forward(hv, ov, -1), Catch::Contains("negative training step"));

  // A schedule that returns NaN, and one whose beta reaches 0 at some module.
  HostContext ctx2;
  using AnyBlock = ReversibleDualResidual<TanhLinear<T>, SineGate<T>, AnySchedule, Fp64>;
  std::vector<AnyBlock> layers;
  for (int l = 0; l < 2; ++l) layers.emplace_back(TanhLinear<T>(4, rng), SineGate<T>(4, rng));
  ReversibleStack<AnyBlock> bad(ctx2, std::move(layers), AnySchedule([](std::int64_t step, int module) {
                                  if (step == 5) return Coefficients{std::nan(""), 1.0};
                                  return Coefficients{1.0, module == 3 ? 0.0 : 0.5};
                                }));
  CHECK_THROWS_WITH(bad.forward(hv, ov, 5), Catch::Contains("non-finite") && Catch::Contains("step 5"));
  CHECK_THROWS_WITH(bad.forward(hv, ov, 2), Catch::Contains("module 3") && Catch::Contains("step 2"));
  bad.set_mode(BackpropMode::Standard);  // beta = 0 is fine without reconstruction
  bad.forward(hv, ov, 2);
  bad.backward(ov, dv);
  for (T v : dh) CHECK(std::isfinite(v));
}

TEST_CASE("parameters are enumerated with stable names and their gradients", "[block]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  HostContext ctx;
  ReversibleStack<Block<float>> stack(ctx, make_layers<float>(2, 4, rng), ConstantSchedule(0.0, 1.0));
  std::vector<std::string> names;
  for (auto& p : stack.parameters()) {
    names.push_back(p.name);
    CHECK(p.value.shape() == p.grad.shape());
  }
  CHECK(names == std::vector<std::string>{"blocks.0.f.weight", "blocks.0.f.bias", "blocks.0.gate.amplitude",
                                          "blocks.0.gate.phase", "blocks.1.f.weight", "blocks.1.f.bias",
                                          "blocks.1.gate.amplitude", "blocks.1.gate.phase"});
  CHECK(ctx.meter().current(MemoryCategory::Parameters) == 2 * (16 + 4 + 4 + 4) * sizeof(float));
  CHECK(ctx.meter().current(MemoryCategory::Gradients) == ctx.meter().current(MemoryCategory::Parameters));
}

namespace {

//! TanhLinear with an odd number of extra saved elements, recording where its saved slices lie.
template <class T>
class OddSaved : public dr2net::testing::TanhLinear<T> {
 public:
  OddSaved(std::int64_t width, std::mt19937_64& rng, std::vector<std::uintptr_t>* seen)
      : dr2net::testing::TanhLinear<T>(width, rng), seen_(seen) {}
  std::size_t saved_elements(const Shape& s) const { return dr2net::testing::TanhLinear<T>::saved_elements(s) + 3; }
  template <class Call>
  void backward(const Call& call, ConstView<T> in, ConstView<T> saved, ConstView<T> gout, TensorView<T> gin) {
    seen_->push_back(reinterpret_cast<std::uintptr_t>(saved.data()));
    seen_->push_back(reinterpret_cast<std::uintptr_t>(in.data()));
    dr2net::testing::TanhLinear<T>::backward(call, in, saved, gout, gin);
  }

 private:
  std::vector<std::uintptr_t>* seen_;
};

}  // namespace

TEST_CASE("standard mode hands every function a slice aligned as a fresh allocation", "[block][alignment]") {
  // Functions whose saved sizes are odd numbers of elements used to receive slices at
  // arbitrary element offsets of the arena (on a device: misaligned fp32 statistics of a bf16
  // function, a sticky misaligned-address error). Each slot is now a whole number of the
  // context's allocation alignment.
  std::mt19937_64 rng(std::random_device{}());
  std::vector<std::uintptr_t> seen;
  using Block = ReversibleDualResidual<OddSaved<float>, OddSaved<float>, ConstantSchedule, Fp32>;
  std::vector<Block> layers;
  const std::int64_t D = 5;  // a 3 x 5 stream: 15 floats, not a multiple of 16
  for (int l = 0; l < 3; ++l) layers.emplace_back(OddSaved<float>(D, rng, &seen), OddSaved<float>(D, rng, &seen));
  HostContext ctx;
  StackOptions opts;
  opts.mode = BackpropMode::Standard;
  ReversibleStack<Block> stack(ctx, std::move(layers), ConstantSchedule(1.0, 0.5), opts);
  const Shape shape{1, 3, D};
  std::vector<float> h0(15), out(15), dout(15, 0.5f), dh0(15);
  for (auto& v : h0) v = std::uniform_real_distribution<float>(-1, 1)(rng);
  stack.forward(ConstView<float>(h0.data(), shape), TensorView<float>(out.data(), shape), 0);
  stack.backward(ConstView<float>(dout.data(), shape), TensorView<float>(dh0.data(), shape));
  REQUIRE(seen.size() == 12);  // six modules, each its saved slice and its stored input
  for (std::uintptr_t p : seen) CHECK(p % HostContext::allocation_alignment == 0);
}
