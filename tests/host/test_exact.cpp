// Exact reversibility (fixed-point streams), and the checks that keep every mode from giving a
// wrong gradient silently: the monitor's "not measured", the guard, non-finite inputs,
// weights and gradients, fixed-point overflow and the determinism self-check.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/modules/vit.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;
using dr2net::testing::SineGate;
using dr2net::testing::TanhLinear;

namespace {

template <class P>
using UserBlock = ReversibleDualResidual<TanhLinear<typename P::compute_type>, SineGate<typename P::compute_type>,
                                         ConstantSchedule, P>;
template <class P>
using VitBlockP = VitLayer<typename P::compute_type, ConstantSchedule, P>;

template <class P>
std::vector<UserBlock<P>> user_layers(int L, std::int64_t D, std::uint64_t seed, double scale = 0.9) {
  std::mt19937_64 rng(seed);
  using T = typename P::compute_type;
  std::vector<UserBlock<P>> layers;
  for (int l = 0; l < L; ++l) layers.emplace_back(TanhLinear<T>(D, rng, scale), SineGate<T>(D, rng));
  return layers;
}

//! ViT layers with drop-path on every layer, parameters drawn away from timm's tiny init.
template <class P>
std::vector<VitBlockP<P>> vit_layers(int L, std::int64_t D, std::uint64_t seed) {
  using T = typename P::compute_type;
  auto layers = make_vit_layers<T, ConstantSchedule, P>(
      L, VitLayerConfig{D, 2, 2 * D, 1e-6, 0.25, 0.0, DropPathRule::Uniform}, seed);
  std::mt19937_64 rng(seed ^ 0x5bd1e995u);
  std::normal_distribution<double> nd(0.0, 0.3);
  for (auto& b : layers) {
    b.for_each_parameter("", [&](std::string_view name, TensorView<T> v, TensorView<T>) {
      const bool norm_weight = name.find("norm") != std::string_view::npos && name.find("weight") != std::string_view::npos;
      for (std::size_t i = 0; i < v.size(); ++i) v.data()[i] = static_cast<T>((norm_weight ? 1.0 : 0.0) + nd(rng));
    });
  }
  return layers;
}

template <class Stack>
struct StepResult {
  std::vector<typename Stack::value_type> out, dh0;
  std::vector<std::vector<typename Stack::compute_type>> grads;
};

template <class Stack>
StepResult<Stack> run_step(Stack& s, const Shape& shape, const std::vector<typename Stack::value_type>& h0,
                           const std::vector<typename Stack::value_type>& dout, std::int64_t step = 3,
                           bool pass_h0 = false) {
  using V = typename Stack::value_type;
  StepResult<Stack> r{std::vector<V>(h0.size()), std::vector<V>(h0.size()), {}};
  s.zero_grad();
  s.forward(ConstView<V>(h0.data(), shape), TensorView<V>(r.out.data(), shape), step);
  s.backward(ConstView<V>(dout.data(), shape), TensorView<V>(r.dh0.data(), shape),
             pass_h0 ? ConstView<V>(h0.data(), shape) : ConstView<V>{});
  for (auto& p : s.parameters()) r.grads.emplace_back(p.grad.data(), p.grad.data() + p.grad.size());
  return r;
}

//! Whether two vectors are equal element for element (bitwise for non-NaN floats).
template <class T>
bool identical(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(a[i] == b[i])) return false;
  return true;
}

//! The fixed-point value h0 quantizes to (what x_0 and y_0 must hold after an exact backward).
template <int B, class T>
std::int64_t quantized(T v) {
  bool bad = false;
  return fixed::quantize(static_cast<double>(v), FixedPoint<B>::scale, bad);
}

//! Relative L2 error of b against reference a, worst over the parameter tensors.
template <class T, class U>
double worst_rel_l2(const std::vector<std::vector<T>>& got, const std::vector<std::vector<U>>& want) {
  double worst = 0;
  for (std::size_t k = 0; k < got.size(); ++k) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < got[k].size(); ++i) {
      const double d = double(got[k][i]) - double(want[k][i]);
      num += d * d;
      den += double(want[k][i]) * double(want[k][i]);
    }
    worst = std::max(worst, den > 0 ? std::sqrt(num / den) : std::sqrt(num));
  }
  return worst;
}

const ReconstructionGuard kQuiet{.max_relative_error = 1e-4, .action = GuardAction::Warn, .warn = [](std::string_view) {}};

//! The exact-equality check for one kind of block and policy.
template <class Stack, class Make>
void check_exact(Make make, std::uint64_t data_seed) {
  using V = typename Stack::value_type;
  using S = typename Stack::stream_type;
  constexpr int B = S::frac_bits;
  std::mt19937_64 rng(data_seed);
  const Shape shape{2, 5, 8};
  const auto n = static_cast<std::size_t>(shape.numel());
  const auto h0 = dr2net::testing::random_vector<V>(n, rng);
  const auto dout = dr2net::testing::random_vector<V>(n, rng);
  const std::vector<Coefficients> points{{1.0, 0.1}, {1.0, 0.01}, {0.9, 0.3}, {0.5, 0.5}, {0.0, 1.0}};
  for (const int L : {1, 12, 48}) {
    for (const auto c : points) {
      INFO("L " << L << " alpha " << c.alpha << " beta " << c.beta);
      HostContext ctx;
      Stack stack(ctx, make(L), ConstantSchedule(c.alpha, c.beta), {.mode = BackpropMode::Standard, .seed = 7});
      const auto standard = run_step(stack, shape, h0, dout);
      stack.set_mode(BackpropMode::Reversible);
      const auto exact = run_step(stack, shape, h0, dout);
      CHECK(identical(exact.out, standard.out));
      CHECK(identical(exact.dh0, standard.dh0));
      REQUIRE(exact.grads.size() == standard.grads.size());
      bool all = true;
      for (std::size_t k = 0; k < exact.grads.size(); ++k) all = all && identical(exact.grads[k], standard.grads[k]);
      CHECK(all);
      bool inputs = true;
      for (std::size_t i = 0; i < n; ++i) {
        const std::int64_t want = quantized<B>(h0[i]);
        inputs = inputs && stack.reconstructed_x().data()[i].raw == want && stack.reconstructed_y().data()[i].raw == want;
      }
      CHECK(inputs);
      CHECK(stack.reconstruction().exact);
      CHECK(stack.reconstruction().measured);
      CHECK(stack.reconstruction().relative_error == 0.0);
      // The coefficients the stack reports are the grid's.
      const Coefficients q = stack.coefficients(3, 0);
      CHECK(q.beta * 16777216.0 == std::round(q.beta * 16777216.0));
      CHECK(std::abs(q.beta - c.beta) <= 0.5 / 16777216.0);
    }
  }
}

}  // namespace

TEST_CASE("exact mode: reversible gradients equal standard gradients bit for bit (user functions)", "[exact]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const auto layer_seed = rng();
  check_exact<ReversibleStack<UserBlock<FixedFp32>>>([&](int L) { return user_layers<FixedFp32>(L, 8, layer_seed); },
                                                     rng());
  check_exact<ReversibleStack<UserBlock<FixedFp64>>>([&](int L) { return user_layers<FixedFp64>(L, 8, layer_seed); },
                                                     rng());
}

TEST_CASE("exact mode: reversible gradients equal standard gradients bit for bit (ViT, drop-path on)", "[exact][vit]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const auto layer_seed = rng();
  check_exact<ReversibleStack<VitBlockP<FixedFp32>>>([&](int L) { return vit_layers<FixedFp32>(L, 8, layer_seed); },
                                                     rng());
}

TEST_CASE("exact mode: fixed-fp32 gradients err at the level of standard fp32 at (1, 0.1)", "[exact][fidelity]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const auto layer_seed = rng();
  const Shape shape{2, 8, 16};
  const auto n = static_cast<std::size_t>(shape.numel());
  const auto h0d = dr2net::testing::random_vector<double>(n, rng);
  const auto doutd = dr2net::testing::random_vector<double>(n, rng);
  const std::vector<float> h0f(h0d.begin(), h0d.end()), doutf(doutd.begin(), doutd.end());
  const int L = 12;  // 24 modules

  HostContext ctx;
  ReversibleStack<UserBlock<Fp64>> ref(ctx, user_layers<Fp64>(L, 16, layer_seed), ConstantSchedule(1.0, 0.1),
                                       {.mode = BackpropMode::Standard});
  const auto reference = run_step(ref, shape, h0d, doutd);
  ReversibleStack<UserBlock<Fp32>> fp32(ctx, user_layers<Fp32>(L, 16, layer_seed), ConstantSchedule(1.0, 0.1),
                                        {.mode = BackpropMode::Standard, .guard = kQuiet});
  const auto standard32 = run_step(fp32, shape, h0f, doutf);
  fp32.set_mode(BackpropMode::Reversible);
  const auto plain32 = run_step(fp32, shape, h0f, doutf);
  ReversibleStack<UserBlock<FixedFp32>> fixed32(ctx, user_layers<FixedFp32>(L, 16, layer_seed),
                                                ConstantSchedule(1.0, 0.1));
  const auto exact32 = run_step(fixed32, shape, h0f, doutf);

  const double e_standard = worst_rel_l2(standard32.grads, reference.grads);
  const double e_exact = worst_rel_l2(exact32.grads, reference.grads);
  const double e_plain = worst_rel_l2(plain32.grads, reference.grads);
  INFO("standard fp32 " << e_standard << ", exact fixed-fp32 " << e_exact << ", plain reversible fp32 " << e_plain);
  CHECK(e_standard < 1e-4);
  CHECK(e_exact <= 4 * e_standard + 1e-6);
  CHECK(e_plain > 100 * e_exact);  // what exactness buys at the paper's starting point
}

TEST_CASE("exact mode: side-bit memory is width x elements x modules, 0 at beta = 1", "[exact][memory]") {
  const Shape shape{3, 7, 8};  // 168 elements: not a multiple of every packing
  const auto n = static_cast<std::size_t>(shape.numel());
  std::vector<float> h0(n, 0.25f), out(n), dh(n);
  struct Case {
    double beta;
    int width;
  };
  for (const Case c : {Case{0.5, 1}, Case{0.1, 4}, Case{0.01, 7}, Case{1.0, 0}}) {
    INFO("beta " << c.beta);
    HostContext ctx;
    const int L = 3;
    ReversibleStack<UserBlock<FixedFp32>> stack(ctx, user_layers<FixedFp32>(L, 8, 11), ConstantSchedule(1.0, c.beta));
    CHECK(stack.side_bit_width(0, 0) == c.width);
    stack.forward(ConstView<float>(h0.data(), shape), TensorView<float>(out.data(), shape), 0);
    // Elements never straddle 64-bit words: floor(64 / width) per word (at width 7, 1 bit of 64 unused).
    const std::size_t per_word = c.width == 0 ? 1 : static_cast<std::size_t>(64 / c.width);
    const std::size_t words = c.width == 0 ? 0 : (n + per_word - 1) / per_word;
    CHECK(ctx.meter().current(MemoryCategory::SideBits) == 2 * L * words * sizeof(std::uint64_t));
    CHECK(ctx.meter().current_activation() >= ctx.meter().current(MemoryCategory::SideBits));
    stack.backward(ConstView<float>(out.data(), shape), TensorView<float>(dh.data(), shape));
    CHECK(stack.reconstruction().exact);
  }
}

namespace {

//! A user function that is not deterministic: every call after the first two adds a little
//! more (as atomics in a reduction would), so its recomputation differs from its forward.
template <class T>
class Drifting : public SineGate<T> {
 public:
  using SineGate<T>::SineGate;
  template <class Call>
  void forward(const Call& call, ConstView<T> in, TensorView<T> out, TensorView<T> s) {
    SineGate<T>::forward(call, in, out, s);
    const T drift = static_cast<T>(1e-6 * static_cast<double>(calls_++));
    for (std::size_t i = 0; i < out.size(); ++i) out.data()[i] += drift;
  }
  template <class Call>
  void recompute(const Call& call, ConstView<T> in, TensorView<T> out, TensorView<T> s) {
    forward(call, in, out, s);
  }

 private:
  int calls_ = 0;
};

//! A user function whose output is far beyond the fixed-point range.
template <class T>
class Huge : public SineGate<T> {
 public:
  using SineGate<T>::SineGate;
  template <class Call>
  void forward(const Call& call, ConstView<T> in, TensorView<T> out, TensorView<T> s) {
    SineGate<T>::forward(call, in, out, s);
    for (std::size_t i = 0; i < out.size(); ++i) out.data()[i] = static_cast<T>(1e12);
  }
  template <class Call>
  void recompute(const Call& call, ConstView<T> in, TensorView<T> out, TensorView<T> s) {
    forward(call, in, out, s);
  }
};

}  // namespace

TEST_CASE("exact mode: a function that is not deterministic is caught, naming the module", "[exact][self-check]") {
  using Block = ReversibleDualResidual<TanhLinear<float>, Drifting<float>, ConstantSchedule, FixedFp32>;
  std::mt19937_64 rng(5);
  std::vector<Block> layers;
  for (int l = 0; l < 3; ++l) layers.emplace_back(TanhLinear<float>(8, rng), Drifting<float>(8, rng));
  HostContext ctx;
  ReversibleStack<Block> stack(ctx, std::move(layers), ConstantSchedule(0.5, 0.5));
  const Shape shape{2, 3, 8};
  const auto n = static_cast<std::size_t>(shape.numel());
  const auto h0 = dr2net::testing::random_vector<float>(n, rng);
  std::vector<float> out(n), dh(n);
  stack.forward(ConstView<float>(h0.data(), shape), TensorView<float>(out.data(), shape), 0);
  // Backward meets module 5 (layer 2, G) first.
  CHECK_THROWS_WITH(stack.backward(ConstView<float>(out.data(), shape), TensorView<float>(dh.data(), shape)),
                    Catch::Contains("module 5 (layer 2, G)") && Catch::Contains("not deterministic"));
}

TEST_CASE("exact mode: fixed-point overflow is reported, never wrapped", "[exact][overflow]") {
  using Block = ReversibleDualResidual<TanhLinear<float>, Huge<float>, ConstantSchedule, FixedFp32>;
  std::mt19937_64 rng(6);
  std::vector<Block> layers;
  for (int l = 0; l < 2; ++l) layers.emplace_back(TanhLinear<float>(8, rng), Huge<float>(8, rng));
  HostContext ctx;
  ReversibleStack<Block> stack(ctx, std::move(layers), ConstantSchedule(1.0, 0.5));
  const Shape shape{2, 3, 8};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::vector<float> h0(n, 0.5f), out(n);
  CHECK_THROWS_WITH(stack.forward(ConstView<float>(h0.data(), shape), TensorView<float>(out.data(), shape), 4),
                    Catch::Contains("fixed-point overflow") && Catch::Contains("module 1 (layer 0, G)") &&
                        Catch::Contains("step 4"));
  // An input beyond the range is the input's fault.
  std::vector<float> big(n, 3e9f);
  CHECK_THROWS_WITH(stack.forward(ConstView<float>(big.data(), shape), TensorView<float>(out.data(), shape), 0),
                    Catch::Contains("h0") && Catch::Contains("fixed-point range"));
}

TEST_CASE("the monitor says 'not measured' instead of 0, and each stack keeps its own report", "[monitor]") {
  const Shape shape{2, 4, 8};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::mt19937_64 rng(3);
  const auto h0 = dr2net::testing::random_vector<float>(n, rng);
  HostContext ctx;  // shared by both stacks
  ReversibleStack<UserBlock<Fp32>> a(ctx, user_layers<Fp32>(2, 8, 1), ConstantSchedule(0.0, 1.0),
                                     {.mode = BackpropMode::Standard});
  ReversibleStack<UserBlock<Fp32>> b(ctx, user_layers<Fp32>(2, 8, 2), ConstantSchedule(0.0, 1.0),
                                     {.monitor_samples = 0});
  CHECK(a.reconstruction().step == -1);
  CHECK_FALSE(a.reconstruction().measured);
  run_step(a, shape, h0, h0);
  CHECK_FALSE(a.reconstruction().measured);  // standard mode reconstructs nothing
  CHECK(std::isnan(a.reconstruction().relative_error));
  CHECK(a.reconstruction().describe() == "not measured");
  run_step(b, shape, h0, h0);  // no h0 and no samples: nothing to compare with
  CHECK_FALSE(b.reconstruction().measured);
  CHECK(std::isnan(b.reconstruction().relative_error));
  CHECK_FALSE(b.reconstruction().relative_error < 1e-5);  // no threshold test passes on "not measured"
  run_step(b, shape, h0, h0, 3, /*pass_h0=*/true);
  CHECK(b.reconstruction().measured);
  CHECK(b.reconstruction().input_compared);
  CHECK(b.reconstruction().relative_error < 1e-5);
  CHECK_FALSE(a.reconstruction().measured);  // a's report is a's

  // By default the stack keeps a strided sample of h0 and measures without being given it.
  ReversibleStack<UserBlock<Fp32>> c(ctx, user_layers<Fp32>(2, 8, 2), ConstantSchedule(0.0, 1.0),
                                     {.monitor_samples = 16});
  run_step(c, shape, h0, h0);
  CHECK(c.reconstruction().measured);
  CHECK(c.reconstruction().sampled);
  CHECK(c.reconstruction().compared_elements == 16);
  CHECK(c.reconstruction().relative_error < 1e-5);
}

TEST_CASE("the reconstruction guard throws, warns, or redoes the step with snapshots", "[guard]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const auto layer_seed = rng();
  const Shape shape{2, 8, 16};
  const auto n = static_cast<std::size_t>(shape.numel());
  const auto h0 = dr2net::testing::random_vector<float>(n, rng);
  const auto dout = dr2net::testing::random_vector<float>(n, rng);
  HostContext ctx;
  // The README's old quick start: plain fp32 reversible at the paper's starting point, 12 layers.
  ReversibleStack<UserBlock<Fp32>> stack(ctx, user_layers<Fp32>(12, 16, layer_seed), ConstantSchedule(1.0, 0.1),
                                         {.mode = BackpropMode::Standard});
  const auto standard = run_step(stack, shape, h0, dout);

  stack.set_mode(BackpropMode::Reversible);
  CHECK_THROWS_WITH(run_step(stack, shape, h0, dout), Catch::Contains("reconstruction guard") &&
                                                          Catch::Contains("step 3") && Catch::Contains("exact mode"));

  std::vector<std::string> warnings;
  stack.set_guard({.max_relative_error = 1e-4, .action = GuardAction::Warn,
                   .warn = [&](std::string_view m) { warnings.emplace_back(m); }});
  run_step(stack, shape, h0, dout);
  REQUIRE(warnings.size() == 1);
  CHECK(warnings[0].find("reconstruction guard") != std::string::npos);

  stack.set_guard({.max_relative_error = 1e-4, .action = GuardAction::Fallback});
  const auto redone = run_step(stack, shape, h0, dout);
  CHECK(stack.reconstruction().fell_back);
  CHECK(stack.reconstruction().worst_relative_error() <= 1e-4);
  CHECK(worst_rel_l2(redone.grads, standard.grads) < 1e-3);
  CHECK(stack.mode() == BackpropMode::Reversible);  // the next step tries plain reversal again

  // Where reconstruction is fine, the fallback costs nothing and is not used.
  ReversibleStack<UserBlock<Fp32>> fine(ctx, user_layers<Fp32>(12, 16, layer_seed), ConstantSchedule(0.0, 1.0),
                                        {.guard = {.action = GuardAction::Fallback}});
  run_step(fine, shape, h0, dout);
  CHECK_FALSE(fine.reconstruction().fell_back);
}

TEST_CASE("NaN and Inf in the input, dout or weights are errors naming the tensor", "[finite]") {
  const Shape shape{2, 3, 8};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::mt19937_64 rng(9);
  const auto good = dr2net::testing::random_vector<float>(n, rng);
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    INFO("bad value " << bad);
    auto poisoned = good;
    poisoned[n / 2] = bad;
    for (const auto mode : {BackpropMode::Reversible, BackpropMode::ErrorBounded, BackpropMode::Standard}) {
      INFO("mode " << mode_name(mode));
      HostContext ctx;
      ReversibleStack<UserBlock<Fp32>> s32(ctx, user_layers<Fp32>(2, 8, 4), ConstantSchedule(0.5, 0.5), {.mode = mode});
      CHECK_THROWS_WITH(run_step(s32, shape, poisoned, good), Catch::Contains("h0") && Catch::Contains("NaN or Inf"));
      CHECK_THROWS_WITH(run_step(s32, shape, good, poisoned), Catch::Contains("dout") && Catch::Contains("NaN or Inf"));
      ReversibleStack<UserBlock<FixedFp32>> sfx(ctx, user_layers<FixedFp32>(2, 8, 4), ConstantSchedule(0.5, 0.5),
                                                {.mode = mode});
      CHECK_THROWS_WITH(run_step(sfx, shape, poisoned, good), Catch::Contains("h0"));
      CHECK_THROWS_WITH(run_step(sfx, shape, good, poisoned), Catch::Contains("dout") && Catch::Contains("NaN or Inf"));
      // A weight: module 2 is layer 1's F (TanhLinear).
      for (auto& p : s32.parameters())
        if (p.name == "blocks.1.f.weight") p.value.data()[3] = bad;
      CHECK_THROWS_WITH(run_step(s32, shape, good, good),
                        Catch::Contains("module 2 (layer 1, F)") && Catch::Contains("blocks.1.f.weight"));
      for (auto& p : sfx.parameters())
        if (p.name == "blocks.1.f.weight") p.value.data()[3] = bad;
      CHECK_THROWS_WITH(run_step(sfx, shape, good, good),
                        Catch::Contains("module 2 (layer 1, F)") && Catch::Contains("blocks.1.f.weight"));
    }
  }
  // The checks can be turned off (the caller then owns the consequences).
  HostContext ctx;
  ReversibleStack<UserBlock<Fp32>> off(ctx, user_layers<Fp32>(2, 8, 4), ConstantSchedule(0.5, 0.5),
                                       {.mode = BackpropMode::Standard, .check_finite = false});
  auto poisoned = good;
  poisoned[0] = std::numeric_limits<float>::quiet_NaN();
  CHECK_NOTHROW(run_step(off, shape, good, poisoned));
}

TEST_CASE("a NaN step does not poison error-bounded mode's controller", "[finite][error-bounded]") {
  const Shape shape{2, 4, 8};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::mt19937_64 rng(12);
  const auto h0 = dr2net::testing::random_vector<float>(n, rng);
  auto bad = h0;
  bad[1] = std::numeric_limits<float>::quiet_NaN();
  HostContext ctx;
  ReversibleStack<UserBlock<Fp32>> stack(ctx, user_layers<Fp32>(12, 8, 21), ConstantSchedule(1.0, 0.5),
                                         {.mode = BackpropMode::ErrorBounded});
  std::vector<std::size_t> counts;
  for (int step = 0; step < 4; ++step) {
    run_step(stack, shape, h0, h0, step, true);
    counts.push_back(stack.snapshot_boundaries().size());
  }
  const double scale = stack.error_scale();
  CHECK_THROWS_WITH(run_step(stack, shape, bad, h0, 4, true), Catch::Contains("h0"));
  CHECK_THROWS_WITH(run_step(stack, shape, h0, bad, 5, true), Catch::Contains("dout"));
  CHECK(std::isfinite(stack.error_scale()));
  CHECK(stack.error_scale() <= scale);
  run_step(stack, shape, h0, h0, 6, true);
  CHECK(stack.snapshot_boundaries().size() <= counts.back());
}

TEST_CASE("error-bounded mode bounds what it says on a 12-layer tanh MLP at (1, 0.5)", "[error-bounded][grad]") {
  // The user's case: F = G = a saturating tanh layer. Error-bounded mode bounds the relative
  // reconstruction error of the streams (ErrorBoundOptions::stream_tolerance) on every step;
  // the gradient error can be a large multiple of it for such a function, which is why exact
  // mode exists (checked here too: it equals standard bit for bit).
  using Block = ReversibleDualResidual<TanhLinear<float>, TanhLinear<float>, ConstantSchedule, Fp32>;
  using FixedBlock = ReversibleDualResidual<TanhLinear<float>, TanhLinear<float>, ConstantSchedule, FixedFp32>;
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const auto layer_seed = rng();
  auto layers = [&](auto tag) {
    using B = decltype(tag);
    std::mt19937_64 r(layer_seed);
    std::vector<B> v;
    for (int l = 0; l < 12; ++l) v.emplace_back(TanhLinear<float>(16, r, 1.5), TanhLinear<float>(16, r, 1.5));
    return v;
  };
  const Shape shape{2, 8, 16};
  const auto n = static_cast<std::size_t>(shape.numel());
  const auto h0 = dr2net::testing::random_vector<float>(n, rng, -2.0, 2.0);
  const auto dout = dr2net::testing::random_vector<float>(n, rng);
  HostContext ctx;
  const double tol = 1e-5;
  ReversibleStack<Block> stack(ctx, layers(Block(TanhLinear<float>(16, rng), TanhLinear<float>(16, rng))),
                               ConstantSchedule(1.0, 0.5), {.mode = BackpropMode::ErrorBounded,
                                                            .error_bound = {.stream_tolerance = tol}});
  for (int step = 0; step < 6; ++step) {
    run_step(stack, shape, h0, dout, step);
    INFO("step " << step << ": " << stack.reconstruction().describe());
    CHECK(stack.reconstruction().worst_relative_error() <= tol);
  }
  ReversibleStack<FixedBlock> ref(ctx, layers(FixedBlock(TanhLinear<float>(16, rng), TanhLinear<float>(16, rng))),
                                  ConstantSchedule(1.0, 0.5), {.mode = BackpropMode::Standard});
  const auto standard = run_step(ref, shape, h0, dout);
  ref.set_mode(BackpropMode::Reversible);
  const auto exact = run_step(ref, shape, h0, dout);
  for (std::size_t k = 0; k < exact.grads.size(); ++k) CHECK(identical(exact.grads[k], standard.grads[k]));
}

TEST_CASE("fixed-point integer arithmetic matches 128-bit references", "[exact][arithmetic]") {
  __extension__ using i128 = __int128;
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const auto floor_div = [](i128 a, i128 b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0)) ? 1 : 0); };
  std::uniform_int_distribution<std::int64_t> any(-(std::int64_t{1} << 61), std::int64_t{1} << 61);
  std::uniform_int_distribution<std::int64_t> small(-(std::int64_t{1} << 20), std::int64_t{1} << 20);
  std::vector<std::int64_t> ps{1, 2, 3, 7, 167772, 1677722, 8388608, 16777215, 16777216, 16777217, 50000000,
                               std::int64_t{1} << 38};
  for (int k = 0; k < 200; ++k) ps.push_back(std::uniform_int_distribution<std::int64_t>(1, 1 << 24)(rng));
  const i128 two_k = i128{1} << fixed::kCoefficientBits;
  for (const std::int64_t p : ps) {
    for (int t = 0; t < 200; ++t) {
      const std::int64_t x = (t % 2 == 0 ? any : small)(rng);
      INFO("p " << p << " x " << x);
      const i128 r = floor_div(i128(p) * x, two_k);
      if (r >= (i128{1} << 62) || r <= -(i128{1} << 62)) continue;  // outside the range the stack admits
      REQUIRE(fixed::mul_floor(x, p) == static_cast<std::int64_t>(r));
      const i128 c = -floor_div(-r * two_k, p);  // ceil(r 2^k / p)
      REQUIRE(fixed::ceil_div_mul(static_cast<std::int64_t>(r), p, 1.0 / static_cast<double>(p)) == static_cast<std::int64_t>(c));
      if (p <= (std::int64_t{1} << fixed::kCoefficientBits)) {
        const std::uint64_t s = fixed::side_bits_of(x, p, 1.0 / static_cast<double>(p));
        REQUIRE(static_cast<i128>(s) == i128(x) - c);
        REQUIRE(static_cast<int>(s == 0 ? 0 : 64 - __builtin_clzll(s)) <= fixed::side_bit_width(p));
      }
    }
  }
}

TEST_CASE("a floating-point reconstruction that blows up is reported by the guard, not as a NaN gradient", "[guard]") {
  const Shape shape{2, 4, 8};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::mt19937_64 rng(17);
  const auto h0 = dr2net::testing::random_vector<float>(n, rng);
  HostContext ctx;
  ReversibleStack<UserBlock<Fp32>> stack(ctx, user_layers<Fp32>(24, 8, 5, 1.5), ConstantSchedule(1.0, 0.01));
  CHECK_THROWS_WITH(run_step(stack, shape, h0, h0), Catch::Contains("reconstruction guard"));
  CHECK(stack.reconstruction().measured);
  CHECK_FALSE(stack.reconstruction().worst_relative_error() <= 1e-4);
  CHECK(stack.reconstruction().describe().find("nan") == std::string::npos);
  ReversibleStack<UserBlock<Fp32>> fine(ctx, user_layers<Fp32>(2, 8, 5), ConstantSchedule(0.0, 1.0));
  run_step(fine, shape, h0, h0);
  CHECK(fine.reconstruction().describe().find("nan") == std::string::npos);
  CHECK(fine.reconstruction().describe().find("snapshot") == std::string::npos);
}

TEST_CASE("the README's quick start: the paper's schedule in exact mode gives standard gradients", "[exact][readme]") {
  // The README's loop with user functions in place of MyAttention / MyMlp.
  using Layer = dr2net::ReversibleDualResidual<TanhLinear<float>, SineGate<float>, dr2net::PaperSchedule, dr2net::FixedFp32>;
  const auto make = [] {
    std::mt19937_64 rng(42);
    std::vector<Layer> layers;
    for (int l = 0; l < 6; ++l) layers.emplace_back(TanhLinear<float>(8, rng), SineGate<float>(8, rng));
    return layers;
  };
  const dr2net::PaperSchedule schedule({.start = {1.0, 0.1}, .end = {0.0, 1.0}, .eta = 2, .total_steps = 10});
  dr2net::HostContext ctx;
  dr2net::ReversibleStack<Layer> stack(ctx, make(), schedule);
  dr2net::ReversibleStack<Layer> reference(ctx, make(), schedule, {.mode = dr2net::BackpropMode::Standard});
  const dr2net::Shape shape{2, 5, 8};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::mt19937_64 rng(7);
  for (std::int64_t step = 0; step < 12; ++step) {
    INFO("step " << step);
    const auto h0 = dr2net::testing::random_vector<float>(n, rng);
    const auto dout = dr2net::testing::random_vector<float>(n, rng);
    const auto a = run_step(stack, shape, h0, dout, step);
    const auto b = run_step(reference, shape, h0, dout, step);
    CHECK(identical(a.out, b.out));
    CHECK(identical(a.dh0, b.dh0));
    for (std::size_t k = 0; k < a.grads.size(); ++k) CHECK(identical(a.grads[k], b.grads[k]));
    CHECK(stack.reconstruction().describe() == "exact (bit for bit)");
  }
}
