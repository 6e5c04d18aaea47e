// The pretrained ViT block's residual functions: an independent reference forward, central
// finite differences of every gradient, the accumulate contract, replayable drop-path and
// dropout inside a reversible stack, parameter names and loading, configuration errors.

#include <algorithm>
#include <cmath>
#include <catch2/catch.hpp>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/modules/vit.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;

// The host instantiations are residual functions with the adds-into members, on host views.
static_assert(ResidualFunction<VitAttention<float>> && AddsInto<VitAttention<float>>);
static_assert(ResidualFunction<VitMlp<double>> && AddsInto<VitMlp<double>>);
static_assert(std::is_same_v<function_space_t<VitMlp<float>>, HostSpace>);
using dr2net::testing::random_vector;

namespace {

using Call = ModuleCall<HostContext>;

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

//! Parameters drawn far from timm's tiny init, so every path of the function matters:
//! LayerNorm weights around 1, everything else in [-0.5, 0.5].
template <class Fn>
void randomize(Fn& fn, std::mt19937_64& rng) {
  fn.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    const bool ln_weight = name.find("norm") != std::string_view::npos && name.ends_with("weight");
    const auto r = random_vector<double>(v.size(), rng, ln_weight ? 0.5 : -0.5, ln_weight ? 1.5 : 0.5);
    std::copy(r.begin(), r.end(), v.data());
  });
}

template <class Fn>
void zero_grads(Fn& fn) {
  fn.for_each_parameter([](std::string_view, TensorView<double>, TensorView<double> g) {
    std::fill(g.data(), g.data() + g.size(), 0.0);
  });
}

template <class Fn>
std::vector<std::vector<double>> grads_of(Fn& fn) {
  std::vector<std::vector<double>> out;
  fn.for_each_parameter([&](std::string_view, TensorView<double>, TensorView<double> g) {
    out.emplace_back(g.data(), g.data() + g.size());
  });
  return out;
}

//! out = F(x) through forward() with a NaN-poisoned scratch.
template <class Fn>
std::vector<double> apply(Fn& fn, const Call& call, const Shape& s, const std::vector<double>& x) {
  std::vector<double> out(x.size(), std::numeric_limits<double>::quiet_NaN());
  std::vector<double> scratch(fn.saved_elements(s), std::numeric_limits<double>::quiet_NaN());
  fn.forward(call, ConstView<double>(x.data(), s), TensorView<double>(out.data(), s),
             TensorView<double>(scratch.data(), Shape{static_cast<std::int64_t>(scratch.size())}));
  return out;
}

//! recompute() then backward() with grad_out = w, accumulating into gin and the parameter grads.
template <class Fn>
void backprop(Fn& fn, const Call& call, const Shape& s, const std::vector<double>& x, const std::vector<double>& w,
              std::vector<double>& gin, std::vector<double>* out_copy = nullptr) {
  std::vector<double> out(x.size(), std::numeric_limits<double>::quiet_NaN());
  std::vector<double> saved(fn.saved_elements(s), std::numeric_limits<double>::quiet_NaN());
  const TensorView<double> sv(saved.data(), Shape{static_cast<std::int64_t>(saved.size())});
  fn.recompute(call, ConstView<double>(x.data(), s), TensorView<double>(out.data(), s), sv);
  fn.backward(call, ConstView<double>(x.data(), s), sv, ConstView<double>(w.data(), s),
              TensorView<double>(gin.data(), s));
  if (out_copy) *out_copy = out;
}

//! Every input and parameter gradient of L = sum(F(x) * w) against central differences.
template <class Fn>
void check_against_finite_differences(Fn& fn, const Call& call, const Shape& s, std::mt19937_64& rng) {
  const auto n = static_cast<std::size_t>(s.numel());
  const auto x = random_vector<double>(n, rng, -2.0, 2.0);
  const auto w = random_vector<double>(n, rng);
  auto loss = [&]() {
    const auto out = apply(fn, call, s, x);
    double l = 0;
    for (std::size_t i = 0; i < n; ++i) l += out[i] * w[i];
    return l;
  };
  auto loss_at = [&](const std::vector<double>& xx) {
    const auto out = apply(fn, call, s, xx);
    double l = 0;
    for (std::size_t i = 0; i < n; ++i) l += out[i] * w[i];
    return l;
  };
  zero_grads(fn);
  std::vector<double> gin(n, 0.0);
  backprop(fn, call, s, x, w, gin);
  for (double g : gin) REQUIRE(std::isfinite(g));
  const auto pgrads = grads_of(fn);

  const double h = 1e-6;
  auto near = [](double analytic, double fd) { return std::abs(analytic - fd) <= 1e-6 * std::max(1.0, std::abs(fd)); };
  for (std::size_t i = 0; i < n; ++i) {
    auto xp = x, xm = x;
    xp[i] += h;
    xm[i] -= h;
    const double fd = (loss_at(xp) - loss_at(xm)) / (2 * h);
    INFO("input [" << i << "] analytic " << gin[i] << " fd " << fd);
    CHECK(near(gin[i], fd));
  }
  std::size_t k = 0;
  fn.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    for (std::size_t i = 0; i < v.size(); ++i) {
      double& p = v.data()[i];
      const double p0 = p;
      p = p0 + h;
      const double lp = loss();
      p = p0 - h;
      const double lm = loss();
      p = p0;
      const double fd = (lp - lm) / (2 * h);
      INFO("parameter " << name << " [" << i << "] analytic " << pgrads[k][i] << " fd " << fd);
      CHECK(near(pgrads[k][i], fd));
    }
    ++k;
  });
}

//! timm's Attention.forward written out literally, element by element, for one sample set.
std::vector<double> reference_attention(VitAttention<double>& a, const Shape& s, const std::vector<double>& x) {
  const std::int64_t B = s[0], N = s[1], D = s[2], H = a.config().num_heads, hd = D / H;
  const double eps = a.config().eps;
  const double* g = a.norm1().weight().data();
  const double* be = a.norm1().bias().data();
  const double* wq = a.qkv().weight().data();
  const double* bq = a.qkv().bias().data();
  const double* wp = a.proj().weight().data();
  const double* bp = a.proj().bias().data();
  auto at = [](const std::vector<double>& v, std::int64_t i) { return v[static_cast<std::size_t>(i)]; };
  std::vector<double> xn(x.size()), qkv(static_cast<std::size_t>(B * N * 3 * D)), ctx(x.size()), out(x.size());
  for (std::int64_t r = 0; r < B * N; ++r) {
    double mu = 0, var = 0;
    for (std::int64_t j = 0; j < D; ++j) mu += at(x, r * D + j) / static_cast<double>(D);
    for (std::int64_t j = 0; j < D; ++j) var += (at(x, r * D + j) - mu) * (at(x, r * D + j) - mu) / static_cast<double>(D);
    for (std::int64_t j = 0; j < D; ++j)
      xn[static_cast<std::size_t>(r * D + j)] = (at(x, r * D + j) - mu) / std::sqrt(var + eps) * g[j] + be[j];
    for (std::int64_t o = 0; o < 3 * D; ++o) {
      double acc = bq[o];
      for (std::int64_t j = 0; j < D; ++j) acc += at(xn, r * D + j) * wq[o * D + j];
      qkv[static_cast<std::size_t>(r * 3 * D + o)] = acc;
    }
  }
  // qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4): q[b, h, n, e] = qkv[b, n, 0, h, e]
  auto elem = [&](int which, std::int64_t b, std::int64_t h, std::int64_t n, std::int64_t e) {
    return at(qkv, ((b * N + n) * 3 + which) * D + h * hd + e);
  };
  const double scale = std::pow(static_cast<double>(hd), -0.5);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < N; ++i) {
        std::vector<double> sc(static_cast<std::size_t>(N));
        for (std::int64_t j = 0; j < N; ++j) {
          double acc = 0;
          for (std::int64_t e = 0; e < hd; ++e) acc += elem(0, b, h, i, e) * scale * elem(1, b, h, j, e);
          sc[static_cast<std::size_t>(j)] = acc;
        }
        const double mx = *std::max_element(sc.begin(), sc.end());
        double z = 0;
        for (double& v : sc) z += (v = std::exp(v - mx));
        // (attn @ v).transpose(1, 2).reshape(B, N, D): ctx[b, i, h*hd + e]
        for (std::int64_t e = 0; e < hd; ++e) {
          double acc = 0;
          for (std::int64_t j = 0; j < N; ++j) acc += sc[static_cast<std::size_t>(j)] / z * elem(2, b, h, j, e);
          ctx[static_cast<std::size_t>((b * N + i) * D + h * hd + e)] = acc;
        }
      }
  for (std::int64_t r = 0; r < B * N; ++r)
    for (std::int64_t o = 0; o < D; ++o) {
      double acc = bp[o];
      for (std::int64_t j = 0; j < D; ++j) acc += at(ctx, r * D + j) * wp[o * D + j];
      out[static_cast<std::size_t>(r * D + o)] = acc;
    }
  return out;
}

//! timm's Mlp.forward after norm2, written out literally.
std::vector<double> reference_mlp(VitMlp<double>& m, const Shape& s, const std::vector<double>& x) {
  const std::int64_t R = s[0] * s[1], D = s[2], Hd = m.config().hidden;
  const double* g = m.norm2().weight().data();
  const double* be = m.norm2().bias().data();
  const double* w1 = m.fc1().weight().data();
  const double* b1 = m.fc1().bias().data();
  const double* w2 = m.fc2().weight().data();
  const double* b2 = m.fc2().bias().data();
  std::vector<double> out(x.size());
  for (std::int64_t r = 0; r < R; ++r) {
    const double* xr = x.data() + r * D;
    double mu = 0, var = 0;
    for (std::int64_t j = 0; j < D; ++j) mu += xr[j] / static_cast<double>(D);
    for (std::int64_t j = 0; j < D; ++j) var += (xr[j] - mu) * (xr[j] - mu) / static_cast<double>(D);
    std::vector<double> xn(static_cast<std::size_t>(D)), a(static_cast<std::size_t>(Hd));
    for (std::int64_t j = 0; j < D; ++j) xn[static_cast<std::size_t>(j)] = (xr[j] - mu) / std::sqrt(var + m.config().eps) * g[j] + be[j];
    for (std::int64_t o = 0; o < Hd; ++o) {
      double z = b1[o];
      for (std::int64_t j = 0; j < D; ++j) z += xn[static_cast<std::size_t>(j)] * w1[o * D + j];
      a[static_cast<std::size_t>(o)] = z * 0.5 * std::erfc(-z / std::sqrt(2.0));  // z Phi(z)
    }
    for (std::int64_t o = 0; o < D; ++o) {
      double acc = b2[o];
      for (std::int64_t j = 0; j < Hd; ++j) acc += a[static_cast<std::size_t>(j)] * w2[o * Hd + j];
      out[static_cast<std::size_t>(r * D + o)] = acc;
    }
  }
  return out;
}

}  // namespace

TEST_CASE("the ViT functions compute timm's Attention and Mlp (independent reference)", "[vit]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  for (std::int64_t heads : {1, 2, 3}) {
    for (std::int64_t N : {5, 7}) {
      INFO("heads " << heads << " tokens " << N);
      const Shape s{2, N, 6};
      VitAttention<double> attn({6, heads}, rng());
      randomize(attn, rng);
      const auto x = random_vector<double>(static_cast<std::size_t>(s.numel()), rng, -2.0, 2.0);
      // Training with rates 0 is the plain function as well.
      CHECK(max_abs_diff(apply(attn, Call{ctx, 0, 3, 11, true}, s, x), reference_attention(attn, s, x)) < 1e-12);
    }
  }
  const Shape s{3, 5, 6};
  VitMlp<double> mlp({6, 10}, rng());
  randomize(mlp, rng);
  const auto x = random_vector<double>(static_cast<std::size_t>(s.numel()), rng, -2.0, 2.0);
  CHECK(max_abs_diff(apply(mlp, Call{ctx, 1, 0, 0, false}, s, x), reference_mlp(mlp, s, x)) < 1e-12);
}

TEST_CASE("VitAttention gradients match central differences (fp64; 1-3 heads, odd token counts)", "[vit][grad]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  for (std::int64_t heads : {1, 2, 3}) {
    for (std::int64_t N : {5, 7}) {
      for (bool drops : {false, true}) {
        INFO("heads " << heads << " tokens " << N << " drop-path/dropout " << drops);
        VitAttentionConfig cfg{6, heads};
        if (drops) {
          cfg.drop_path = 0.3;
          cfg.proj_drop = 0.25;
        }
        VitAttention<double> attn(cfg, rng());
        randomize(attn, rng);
        check_against_finite_differences(attn, Call{ctx, 2, 5, rng(), true}, Shape{2, N, 6}, rng);
      }
    }
  }
}

TEST_CASE("VitMlp gradients match central differences (fp64)", "[vit][grad]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  for (std::int64_t N : {5, 7}) {
    for (bool drops : {false, true}) {
      INFO("tokens " << N << " drop-path/dropout " << drops);
      VitMlpConfig cfg{6, 10};
      if (drops) {
        cfg.drop_path = 0.3;
        cfg.drop = 0.25;
      }
      VitMlp<double> mlp(cfg, rng());
      randomize(mlp, rng);
      check_against_finite_differences(mlp, Call{ctx, 3, 7, rng(), true}, Shape{3, N, 6}, rng);
    }
  }
}

namespace {

//! A D = 6 attention (3 heads) or MLP (hidden 10) with drop-path 0.2 and dropout 0.3 and
//! randomized parameters.
template <class Fn>
Fn dropping_function(std::mt19937_64& rng) {
  Fn fn = [&] {
    if constexpr (std::is_same_v<Fn, VitAttention<double>>) return Fn({6, 3, 1e-6, 0.2, 0.3}, rng());
    else return Fn({6, 10, 1e-6, 0.2, 0.3}, rng());
  }();
  randomize(fn, rng);
  return fn;
}

}  // namespace

TEMPLATE_TEST_CASE("backward accumulates; forward and recompute agree bit for bit", "[vit][grad]", VitAttention<double>,
                   VitMlp<double>) {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  auto fn = dropping_function<TestType>(rng);
  const Shape s{3, 5, 6};
  const auto n = static_cast<std::size_t>(s.numel());
  const auto x = random_vector<double>(n, rng, -2.0, 2.0);
  const auto w = random_vector<double>(n, rng);
  // A stack seed whose drop-path keeps at least one sample (all three dropped has chance 0.8%).
  std::uint64_t call_seed = rng();
  while (max_abs(apply(fn, Call{ctx, 4, 9, call_seed, true}, s, x)) == 0) call_seed = rng();
  const Call call{ctx, 4, 9, call_seed, true};

  // forward == recompute, bitwise, with masks active.
  std::vector<double> recomputed;
  std::vector<double> unused(n, 0.0);
  backprop(fn, call, s, x, w, unused, &recomputed);
  CHECK(apply(fn, call, s, x) == recomputed);

  // grad_in keeps its prior contents; a second backward adds the same again.
  zero_grads(fn);
  const auto prior = random_vector<double>(n, rng);
  auto gin = prior;
  backprop(fn, call, s, x, w, gin);
  const auto once = gin;
  const auto g1 = grads_of(fn);
  backprop(fn, call, s, x, w, gin);
  const auto g2 = grads_of(fn);
  double jt = 0;
  for (std::size_t i = 0; i < n; ++i) jt = std::max(jt, std::abs(once[i] - prior[i]));
  REQUIRE(jt > 0);
  for (std::size_t i = 0; i < n; ++i) CHECK(std::abs((gin[i] - prior[i]) - 2 * (once[i] - prior[i])) <= 1e-12 * std::max(1.0, jt));
  for (std::size_t k = 0; k < g1.size(); ++k) {
    REQUIRE(max_abs(g1[k]) > 0);
    for (std::size_t i = 0; i < g1[k].size(); ++i) CHECK(std::abs(g2[k][i] - 2 * g1[k][i]) <= 1e-12 * std::max(1.0, max_abs(g1[k])));
  }
}

namespace {

using Sched = ConstantSchedule;
using Layer = VitLayer<double, Sched>;

struct StepResult {
  std::vector<double> out, dh0;
  std::vector<std::vector<double>> grads;
};

StepResult train_step(ReversibleStack<Layer>& stack, const Shape& s, const std::vector<double>& h0,
                      const std::vector<double>& dout, std::int64_t step) {
  StepResult r{std::vector<double>(h0.size()), std::vector<double>(h0.size()), {}};
  stack.zero_grad();
  stack.forward(ConstView<double>(h0.data(), s), TensorView<double>(r.out.data(), s), step);
  stack.backward(ConstView<double>(dout.data(), s), TensorView<double>(r.dh0.data(), s));
  for (auto& p : stack.parameters()) r.grads.emplace_back(p.grad.data(), p.grad.data() + p.grad.size());
  return r;
}

std::vector<Layer> random_layers(int L, const VitLayerConfig& cfg, std::mt19937_64& rng) {
  auto layers = make_vit_layers<double, Sched>(L, cfg, rng());
  for (auto& l : layers) {
    randomize(l.f(), rng);
    randomize(l.g(), rng);
  }
  return layers;
}

}  // namespace

TEST_CASE("in a reversible stack with drop-path and dropout, reversible gradients equal standard gradients",
          "[vit][stack]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const Shape s{3, 5, 6};
  const auto n = static_cast<std::size_t>(s.numel());
  const VitLayerConfig cfg{6, 2, 12, 1e-6, 0.3, 0.2, DropPathRule::Uniform};
  for (Coefficients c : {Coefficients{0.5, 0.5}, Coefficients{0.0, 1.0}}) {
    INFO("alpha " << c.alpha << " beta " << c.beta);
    HostContext ctx({.poison_allocations = true});
    ReversibleStack<Layer> stack(ctx, random_layers(3, cfg, rng), Sched(c), {.seed = rng()});
    const auto h0 = random_vector<double>(n, rng);
    const auto dout = random_vector<double>(n, rng);
    for (std::int64_t step : {0, 1}) {
      stack.set_mode(BackpropMode::Standard);
      const auto standard = train_step(stack, s, h0, dout, step);
      stack.set_mode(BackpropMode::Reversible);
      const auto reversible = train_step(stack, s, h0, dout, step);
      CHECK(reversible.out == standard.out);
      CHECK(max_abs_diff(reversible.dh0, standard.dh0) <= 1e-10 * std::max(1.0, max_abs(standard.dh0)));
      for (std::size_t k = 0; k < standard.grads.size(); ++k)
        CHECK(max_abs_diff(reversible.grads[k], standard.grads[k]) <= 1e-10 * std::max(1.0, max_abs(standard.grads[k])));
      // The stack's input is recovered by the reconstruction.
      for (std::size_t i = 0; i < n; ++i) CHECK(std::abs(stack.reconstructed_x().data()[i] - h0[i]) <= 1e-12);
    }
    // The masks differ between steps: the training outputs of two steps differ.
    std::vector<double> o0(n), o1(n);
    stack.forward(ConstView<double>(h0.data(), s), TensorView<double>(o0.data(), s), 0);
    stack.forward(ConstView<double>(h0.data(), s), TensorView<double>(o1.data(), s), 1);
    CHECK(o0 != o1);
  }
}

TEMPLATE_TEST_CASE("recompute_add adds F's output into a destination; masks switch it off", "[vit][adds-into]",
                   VitAttention<double>, VitMlp<double>) {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  auto fn = dropping_function<TestType>(rng);
  const Shape s{2, 7, 6};
  const auto n = static_cast<std::size_t>(s.numel());
  const auto x = random_vector<double>(n, rng, -2.0, 2.0);
  const Call inference{ctx, 3, 5, rng(), false};
  REQUIRE(fn.adds_into(inference));
  const auto f = apply(fn, inference, s, x);
  std::vector<double> ref_saved(fn.saved_elements(s), std::numeric_limits<double>::quiet_NaN());
  std::vector<double> ref_out(n);
  fn.recompute(inference, ConstView<double>(x.data(), s), TensorView<double>(ref_out.data(), s),
               TensorView<double>(ref_saved.data(), Shape{static_cast<std::int64_t>(ref_saved.size())}));
  const double tol = 1e-13 * std::max(1.0, max_abs(f));
  for (double scale : {0.0, 1.0, -0.7}) {
    for (bool alias : {false, true}) {
      INFO("scale " << scale << (alias ? ", addend is the destination" : ", separate addend"));
      const auto addend = random_vector<double>(n, rng, -3.0, 3.0);
      std::vector<double> dst = alias ? addend : std::vector<double>(n, std::numeric_limits<double>::quiet_NaN());
      // scale 0 must not read the addend: poison it.
      std::vector<double> separate = scale == 0.0 ? std::vector<double>(n, std::numeric_limits<double>::quiet_NaN()) : addend;
      const double* a = alias ? dst.data() : separate.data();
      std::vector<double> saved(ref_saved.size(), std::numeric_limits<double>::quiet_NaN());
      fn.recompute_add(inference, ConstView<double>(x.data(), s), ConstView<double>(a, s), scale,
                       TensorView<double>(dst.data(), s), TensorView<double>(saved.data(), Shape{static_cast<std::int64_t>(saved.size())}));
      double err = 0;
      for (std::size_t i = 0; i < n; ++i) err = std::max(err, std::abs(dst[i] - (f[i] + scale * addend[i])));
      CHECK(err <= tol * 4);
      CHECK(saved == ref_saved);  // backward reads the same internals either way
    }
  }
  // While training with drop-path or dropout, the output mask needs F's output alone.
  const Call training{ctx, 3, 5, rng(), true};
  CHECK_FALSE(fn.adds_into(training));
  std::vector<double> dst(n, 0.0), saved(ref_saved.size());
  CHECK_THROWS_WITH(fn.recompute_add(training, ConstView<double>(x.data(), s), ConstView<double>(dst.data(), s), 1.0,
                                     TensorView<double>(dst.data(), s),
                                     TensorView<double>(saved.data(), Shape{static_cast<std::int64_t>(saved.size())})),
                    Catch::Contains("output mask"));
  // The destination may alias the addend, never the input.
  std::vector<double> xin = x;
  CHECK_THROWS_WITH(fn.recompute_add(inference, ConstView<double>(xin.data(), s), ConstView<double>(xin.data(), s), 1.0,
                                     TensorView<double>(xin.data(), s),
                                     TensorView<double>(saved.data(), Shape{static_cast<std::int64_t>(saved.size())})),
                    Catch::Contains("overlaps the input"));
  fn.set_adds_into(false);
  CHECK_FALSE(fn.adds_into(inference));
}

TEST_CASE("in a stack, adding into the stream matches the separate combine pass; modes still agree",
          "[vit][stack][adds-into]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const Shape s{2, 5, 6};
  const auto n = static_cast<std::size_t>(s.numel());
  const VitLayerConfig cfg{6, 2, 12, 1e-6, 0.0, 0.0, DropPathRule::Uniform};
  for (Coefficients c : {Coefficients{1.0, 0.0}, Coefficients{0.0, 1.0}, Coefficients{0.6, 0.3}}) {
    INFO("alpha " << c.alpha << " beta " << c.beta);
    HostContext ctx({.poison_allocations = true});
    auto layers = random_layers(3, cfg, rng);
    auto plain_layers = layers;  // same weights; these combine in a separate pass
    for (auto& l : plain_layers) {
      l.f().set_adds_into(false);
      l.g().set_adds_into(false);
    }
    const std::uint64_t stack_seed = rng();
    ReversibleStack<Layer> adding(ctx, std::move(layers), Sched(c), {.seed = stack_seed});
    ReversibleStack<Layer> plain(ctx, std::move(plain_layers), Sched(c), {.seed = stack_seed});
    const auto h0 = random_vector<double>(n, rng);
    const auto dout = random_vector<double>(n, rng);
    const bool invertible = c.beta != 0.0;
    plain.set_mode(BackpropMode::Standard);
    const auto reference = train_step(plain, s, h0, dout, 0);
    for (BackpropMode mode : {BackpropMode::Standard, BackpropMode::Reversible}) {
      if (mode == BackpropMode::Reversible && !invertible) continue;
      INFO((mode == BackpropMode::Standard ? "standard" : "reversible") << " mode");
      adding.set_mode(mode);
      const auto r = train_step(adding, s, h0, dout, 0);
      CHECK(max_abs_diff(r.out, reference.out) <= 1e-12 * std::max(1.0, max_abs(reference.out)));
      CHECK(max_abs_diff(r.dh0, reference.dh0) <= 1e-10 * std::max(1.0, max_abs(reference.dh0)));
      for (std::size_t k = 0; k < reference.grads.size(); ++k)
        CHECK(max_abs_diff(r.grads[k], reference.grads[k]) <= 1e-10 * std::max(1.0, max_abs(reference.grads[k])));
    }
  }
}

TEST_CASE("masks differ between steps and modules; rate 0 and inference are the plain function", "[vit][drop]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  const Shape s{4, 5, 6};
  const auto n = static_cast<std::size_t>(s.numel());
  const std::uint64_t wseed = rng(), stack_seed = rng();
  VitAttention<double> dropped({6, 3, 1e-6, 0.0, 0.4}, wseed), plain({6, 3}, wseed);
  randomize(dropped, rng);
  // Same weights in both.
  std::vector<std::vector<double>> values;
  dropped.for_each_parameter([&](std::string_view, TensorView<double> v, TensorView<double>) {
    values.emplace_back(v.data(), v.data() + v.size());
  });
  std::size_t k = 0;
  plain.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    plain.load(name, values[k++].data(), v.shape());
  });
  const auto x = random_vector<double>(n, rng, -2.0, 2.0);
  const auto f = apply(plain, Call{ctx, 0, 0, stack_seed, true}, s, x);
  // Inference: exactly the function without drops.
  CHECK(apply(dropped, Call{ctx, 0, 0, stack_seed, false}, s, x) == f);
  CHECK(apply(plain, Call{ctx, 0, 0, stack_seed, false}, s, x) == f);
  // Training: a mask that depends on step and module, each element either 0 or f / (1 - p).
  const auto t00 = apply(dropped, Call{ctx, 0, 0, stack_seed, true}, s, x);
  const auto t10 = apply(dropped, Call{ctx, 0, 1, stack_seed, true}, s, x);
  const auto t02 = apply(dropped, Call{ctx, 2, 0, stack_seed, true}, s, x);
  CHECK(t00 != t10);
  CHECK(t00 != t02);
  CHECK(t00 == apply(dropped, Call{ctx, 0, 0, stack_seed, true}, s, x));
  std::size_t zeros = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (t00[i] == 0.0) ++zeros;
    else CHECK(t00[i] == Approx(f[i] / 0.6).epsilon(1e-14));
  }
  CHECK(zeros > n / 6);  // 0.4 n = 48 expected, sd 5.4
  CHECK(zeros < n * 2 / 3);

  // The mean of the training output over many steps approaches the function (E[mask] = 1).
  VitMlp<double> mlp({6, 10, 1e-6, 0.3, 0.2}, wseed);
  randomize(mlp, rng);
  const auto g = apply(mlp, Call{ctx, 1, 0, stack_seed, false}, s, x);
  const int steps = 1500;
  std::vector<double> sum(n, 0.0), sum_sq(n, 0.0);
  for (int step = 0; step < steps; ++step) {
    const auto t = apply(mlp, Call{ctx, 1, step, stack_seed, true}, s, x);
    for (std::size_t i = 0; i < n; ++i) {
      sum[i] += t[i];
      sum_sq[i] += t[i] * t[i];
    }
  }
  // Each element's mean over the steps lies within 5.5 standard errors of the function's value
  // (a z-test per element; all 120 pass by chance with probability > 0.9999), and the bound
  // is not vacuous: the standard error is a small fraction of the values.
  double se_max = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double mean = sum[i] / steps, var = std::max(0.0, sum_sq[i] / steps - mean * mean);
    const double se = std::sqrt(var / steps);
    se_max = std::max(se_max, se);
    INFO("element " << i << " mean " << mean << " function " << g[i] << " standard error " << se);
    CHECK(std::abs(mean - g[i]) <= 5.5 * se + 1e-12 * max_abs(g));
  }
  CHECK(se_max < 0.1 * max_abs(g));

  // Stack with every rate 0: training output == inference output, bitwise.
  const VitLayerConfig cfg{6, 3, 12};
  ReversibleStack<Layer> stack(ctx, random_layers(2, cfg, rng), Sched(0.5, 0.5), {.seed = stack_seed});
  std::vector<double> train(n), infer(n);
  stack.forward(ConstView<double>(x.data(), s), TensorView<double>(train.data(), s), 3);
  stack.predict(ConstView<double>(x.data(), s), TensorView<double>(infer.data(), s), 3);
  CHECK(train == infer);

  // A stack with drop-path and dropout predicts exactly what the same weights without them do.
  const VitLayerConfig dropping{6, 3, 12, 1e-6, 0.5, 0.3, DropPathRule::Uniform};
  ReversibleStack<Layer> noisy(ctx, make_vit_layers<double, Sched>(2, dropping, wseed), Sched(0.5, 0.5), {.seed = stack_seed});
  ReversibleStack<Layer> quiet(ctx, make_vit_layers<double, Sched>(2, cfg, wseed), Sched(0.5, 0.5), {.seed = stack_seed});
  std::vector<double> noisy_out(n), quiet_out(n), noisy_train(n);
  noisy.predict(ConstView<double>(x.data(), s), TensorView<double>(noisy_out.data(), s), 3);
  quiet.predict(ConstView<double>(x.data(), s), TensorView<double>(quiet_out.data(), s), 3);
  CHECK(noisy_out == quiet_out);
  noisy.forward(ConstView<double>(x.data(), s), TensorView<double>(noisy_train.data(), s), 3);
  CHECK(noisy_train != quiet_out);
}

TEST_CASE("a stack of ViT layers has timm's parameter names; load checks names and shapes", "[vit][params]") {
  HostContext ctx;
  const VitLayerConfig cfg{12, 3, 20, 1e-6, 0.1};
  auto layers = make_vit_layers<float, Sched>(2, cfg, 42);
  CHECK(layers[0].f().config().drop_path == 0.0);  // timm's linear rule: 0 at the first layer
  CHECK(layers[1].f().config().drop_path == Approx(0.1));
  CHECK(layers[1].g().config().drop_path == Approx(0.1));
  // Deterministic initialisation: the same seed gives the same weights, another seed others.
  const auto again = make_vit_layers<float, Sched>(2, cfg, 42);
  const auto other = make_vit_layers<float, Sched>(2, cfg, 43);
  auto first = [](const auto& layer) { return std::vector<float>(layer.f().qkv().weight().data(), layer.f().qkv().weight().data() + 30); };
  CHECK(first(layers[0]) == first(again[0]));
  CHECK(first(layers[0]) != first(other[0]));
  CHECK(first(layers[0]) != first(layers[1]));
  {
    const auto& w = layers[1].g().fc1().weight();
    double sum = 0, sq = 0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      sum += w.data()[i];
      sq += double(w.data()[i]) * w.data()[i];
    }
    const double sd = std::sqrt(sq / double(w.size()) - (sum / double(w.size())) * (sum / double(w.size())));
    CHECK(sd == Approx(0.02).epsilon(0.15));  // 240 draws of N(0, 0.02)
    CHECK(layers[1].g().norm2().weight().data()[3] == 1.0f);
    CHECK(layers[1].g().fc1().bias().data()[3] == 0.0f);
  }

  ReversibleStack<VitLayer<float, Sched>> stack(ctx, std::move(layers), Sched(0.0, 1.0));
  std::vector<std::string> names;
  std::vector<Shape> shapes;
  for (auto& p : stack.parameters()) {
    names.push_back(p.name);
    shapes.push_back(p.value.shape());
    CHECK(p.grad.shape() == p.value.shape());
  }
  const std::vector<std::string> timm = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                         "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                                         "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"};
  const std::vector<Shape> timm_shapes = {Shape{12}, Shape{12}, Shape{36, 12}, Shape{36}, Shape{12, 12}, Shape{12},
                                          Shape{12}, Shape{12}, Shape{20, 12}, Shape{20}, Shape{12, 20}, Shape{12}};
  REQUIRE(names.size() == 24);
  for (std::size_t i = 0; i < 24; ++i) {
    CHECK(names[i] == "blocks." + std::to_string(i / 12) + "." + timm[i % 12]);
    CHECK(shapes[i] == timm_shapes[i % 12]);
  }

  // load(): converts, checks the shape, names the tensor and both shapes on error.
  auto& attn = stack.layer(1).f();
  std::vector<double> w(36 * 12);
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = 0.001 * double(i);
  attn.load("attn.qkv.weight", w.data(), Shape{36, 12});
  CHECK(attn.qkv().weight().data()[100] == 0.1f);
  CHECK_THROWS_WITH(attn.load("attn.qkv.weight", w.data(), Shape{12, 36}),
                    Catch::Contains("attn.qkv.weight") && Catch::Contains("[36, 12]") && Catch::Contains("[12, 36]"));
  CHECK_THROWS_WITH(attn.load("attn.qkv.weights", w.data(), Shape{36, 12}),
                    Catch::Contains("attn.qkv.weights") && Catch::Contains("attn.proj.bias"));
  CHECK_THROWS_WITH(stack.layer(0).g().load("mlp.fc2.bias", w.data(), Shape{20}),
                    Catch::Contains("mlp.fc2.bias") && Catch::Contains("[12]") && Catch::Contains("[20]"));
}

TEST_CASE("bad configurations and inputs give errors that say what is wrong", "[vit][errors]") {
  CHECK_THROWS_WITH(VitAttention<float>({10, 3}), Catch::Contains("num_heads = 3") && Catch::Contains("dim = 10"));
  CHECK_THROWS_WITH(VitAttention<float>({0, 1}), Catch::Contains("dim"));
  CHECK_THROWS_WITH(VitAttention<float>({8, 0}), Catch::Contains("num_heads"));
  CHECK_THROWS_WITH(VitAttention<float>({8, 2, 1e-6, 1.0}), Catch::Contains("drop_path"));
  CHECK_THROWS_WITH(VitAttention<float>({8, 2, 1e-6, 0.0, -0.1}), Catch::Contains("proj_drop"));
  CHECK_THROWS_WITH(VitAttention<float>({8, 2, 0.0}), Catch::Contains("eps"));
  CHECK_THROWS_WITH(VitMlp<float>({8, 0}), Catch::Contains("hidden"));
  CHECK_THROWS_WITH(VitMlp<float>({8, 16, 1e-6, 0.0, 1.5}), Catch::Contains("drop"));
  CHECK_THROWS_WITH((make_vit_layers<float, Sched>(0, 8, 2, 16)), Catch::Contains("number of layers"));

  VitAttention<float> attn({8, 2});
  VitMlp<float> mlp({8, 16});
  CHECK_THROWS_WITH(attn.saved_elements(Shape{2, 3, 9}), Catch::Contains("width 9") && Catch::Contains("dim 8"));
  CHECK_THROWS_WITH(mlp.saved_elements(Shape{2, 3, 9}), Catch::Contains("width 9") && Catch::Contains("dim 8"));
  CHECK_THROWS_WITH(attn.saved_elements(Shape{6, 8}), Catch::Contains("[batch, tokens, width]"));
  CHECK(attn.saved_elements(Shape{2, 3, 8}) == std::size_t(6 * 8 + 12 + 6 * 24 + 2 * 2 * 9 + 6 * 8));
  CHECK(mlp.saved_elements(Shape{2, 3, 8}) == std::size_t(6 * 8 + 12 + 2 * 6 * 16));

  // Through a stack: the module is named as well as the width.
  HostContext ctx;
  ReversibleStack<VitLayer<float, Sched>> stack(ctx, make_vit_layers<float, Sched>(2, 8, 2, 16), Sched(0.0, 1.0));
  std::vector<float> h(2 * 3 * 9), out(h.size());
  CHECK_THROWS_WITH(stack.forward(ConstView<float>(h.data(), Shape{2, 3, 9}), TensorView<float>(out.data(), Shape{2, 3, 9}), 0),
                    Catch::Contains("module 0") && Catch::Contains("width 9"));
  // Scratch that is too small.
  std::vector<float> x(2 * 3 * 8), small(10);
  CHECK_THROWS_WITH(attn.forward(Call{ctx}, ConstView<float>(x.data(), Shape{2, 3, 8}), TensorView<float>(out.data(), Shape{2, 3, 8}),
                                 TensorView<float>(small.data(), Shape{10})),
                    Catch::Contains("needs"));
}

TEST_CASE("a ViT stack meters each parameter and gradient byte once, and nothing else at construction",
          "[vit][memory]") {
  // The device twins used to meter their parameters as Other while the stack recorded them again
  // as Parameters and Gradients (every byte twice). With one implementation the functions meter
  // nothing themselves, on either backend: the stack's record is the only one.
  using Sched = ConstantSchedule;
  HostContext ctx;
  const VitLayerConfig cfg{16, 2, 32, 1e-6, 0.0, 0.0, DropPathRule::Linear};
  ReversibleStack<VitLayer<float, Sched>> stack(ctx, make_vit_layers<float, Sched>(3, cfg, 7), Sched(0.5, 0.5));
  std::size_t bytes = 0;
  stack.for_each_parameter([&](std::string_view, TensorView<float> v, TensorView<float>) { bytes += v.size() * 4; });
  // Per layer: norm1/norm2 2 x 2 x 16, qkv 16 x 48 + 48, proj 16 x 16 + 16, fc1 16 x 32 + 32, fc2 32 x 16 + 16.
  CHECK(bytes == 3 * 4 * (4 * 16 + 16 * 48 + 48 + 16 * 16 + 16 + 16 * 32 + 32 + 32 * 16 + 16));
  CHECK(ctx.meter().current(MemoryCategory::Parameters) == bytes);
  CHECK(ctx.meter().current(MemoryCategory::Gradients) == bytes);
  CHECK(ctx.meter().current_total() == 2 * bytes);
  CHECK(ctx.meter().peak_total() == 2 * bytes);
}

TEST_CASE("HeadLayout's host range path moves exactly what its per-element operator moves", "[vit][layout]") {
  std::mt19937_64 rng(std::random_device{}());
  for (const bool to_heads : {true, false}) {
    for (const std::int64_t groups : {1, 3}) {
      const std::int64_t B = 2, N = 5, H = 3, hd = 4;
      const auto n = static_cast<std::size_t>(B * N * groups * H * hd);
      std::vector<float> src(n), want(n, -1.0f), got(n, -2.0f);
      for (std::size_t i = 0; i < n; ++i) src[i] = static_cast<float>(i);
      HeadLayout<float> ref{want.data(), src.data(), B, N, groups, H, hd, to_heads};
      for (std::size_t i = 0; i < n; ++i) ref(i);
      // A permutation: every source element lands exactly once.
      std::vector<float> sorted = want;
      std::sort(sorted.begin(), sorted.end());
      CHECK(sorted == src);
      // Random splits of [0, n) into ranges, each run through run_range.
      HeadLayout<float> fast{got.data(), src.data(), B, N, groups, H, hd, to_heads};
      for (std::size_t begin = 0; begin < n;) {
        const std::size_t len = std::uniform_int_distribution<std::size_t>(1, 11)(rng);
        const std::size_t end = std::min(n, begin + len);
        fast.run_range(begin, end);
        begin = end;
      }
      CHECK(got == want);
    }
  }
}
