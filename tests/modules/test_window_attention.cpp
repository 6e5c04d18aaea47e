// Swin's window attention: timm's per-axis window and shift rule, the index maps against a
// literal roll and partition, a stack of WindowAttention + VitMlp blocks at (1, 0) against an
// independent loop implementation of timm's SwinTransformerBlock (fp64; square, non-square,
// window == map and 3-D grids), central finite differences of every gradient (the bias table
// included, with a shift), reversible vs standard stacks, drop-mask replay, results
// independent of the thread count, the accepted views, parameter names and errors.

#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/modules/vit.hpp"
#include "dr2net/modules/window_attention.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;
using dr2net::testing::random_vector;

// The host instantiations are residual functions with the adds-into members, on host views;
// the functors a device kernel receives are trivially copyable.
static_assert(ResidualFunction<WindowAttention<float>> && AddsInto<WindowAttention<float>>);
static_assert(ResidualFunction<WindowAttention<double>> && AddsInto<WindowAttention<double>>);
static_assert(std::is_same_v<function_space_t<WindowAttention<double>>, HostSpace>);
static_assert(std::is_trivially_copyable_v<WindowGeometry> && std::is_trivially_copyable_v<WindowTokens<float>> &&
              std::is_trivially_copyable_v<WindowLogitBias<float>> &&
              std::is_trivially_copyable_v<RelativeBiasGradient<float>>);

namespace {

using Call = ModuleCall<HostContext>;
using I64 = std::int64_t;
using Grid3 = std::array<I64, 3>;

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

std::size_t at(I64 i) { return static_cast<std::size_t>(i); }

//! Parameters drawn far from timm's tiny init, so every path of the function matters:
//! LayerNorm weights around 1, everything else (the bias table too) in [-0.5, 0.5].
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
  fn.for_each_parameter([](std::string_view, auto, auto g) { std::fill(g.data(), g.data() + g.size(), 0.0); });
}

template <class Fn>
std::vector<std::vector<double>> grads_of(Fn& fn) {
  std::vector<std::vector<double>> out;
  fn.for_each_parameter([&](std::string_view, auto, auto g) { out.emplace_back(g.data(), g.data() + g.size()); });
  return out;
}

Shape flat(std::size_t n) { return Shape{static_cast<I64>(n)}; }

//! out = F(x) through forward() with a NaN-poisoned scratch.
template <class Fn>
std::vector<double> apply(Fn& fn, const Call& call, const Shape& s, const std::vector<double>& x) {
  std::vector<double> out(x.size(), std::numeric_limits<double>::quiet_NaN());
  std::vector<double> scratch(fn.saved_elements(s), std::numeric_limits<double>::quiet_NaN());
  fn.forward(call, ConstView<double>(x.data(), s), TensorView<double>(out.data(), s),
             TensorView<double>(scratch.data(), flat(scratch.size())));
  return out;
}

//! recompute() then backward() with grad_out = w, accumulating into gin and the parameter grads.
template <class Fn>
void backprop(Fn& fn, const Call& call, const Shape& s, const std::vector<double>& x, const std::vector<double>& w,
              std::vector<double>& gin, std::vector<double>* out_copy = nullptr) {
  std::vector<double> out(x.size(), std::numeric_limits<double>::quiet_NaN());
  std::vector<double> saved(fn.saved_elements(s), std::numeric_limits<double>::quiet_NaN());
  const TensorView<double> sv(saved.data(), flat(saved.size()));
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
    double largest = 0;
    for (std::size_t i = 0; i < v.size(); ++i) {
      double& p = v.data()[i];
      const double p0 = p;
      p = p0 + h;
      const double lp = loss_at(x);
      p = p0 - h;
      const double lm = loss_at(x);
      p = p0;
      const double fd = (lp - lm) / (2 * h);
      largest = std::max(largest, std::abs(fd));
      INFO("parameter " << name << " [" << i << "] analytic " << pgrads[k][i] << " fd " << fd);
      CHECK(near(pgrads[k][i], fd));
    }
    INFO("parameter " << name);
    CHECK(largest > 1e-3);  // every tensor matters to the loss
    ++k;
  });
}

// ---- An independent plain implementation of timm's SwinTransformerBlock ------------------

//! Python's slice(start, stop) on an axis of length r as [begin, end); nullopt is None.
std::pair<I64, I64> py_slice(std::optional<I64> start, std::optional<I64> stop, I64 r) {
  auto resolve = [r](I64 i) { return std::clamp<I64>(i < 0 ? i + r : i, 0, r); };
  const I64 b = start ? resolve(*start) : 0, e = stop ? resolve(*stop) : r;
  return {b, std::max(b, e)};
}

//! LayerNorm of `rows` rows of width C.
std::vector<double> layer_norm(const std::vector<double>& x, I64 C, const double* g, const double* b, double eps) {
  std::vector<double> y(x.size());
  for (std::size_t r = 0; r < x.size() / at(C); ++r) {
    const double* xr = x.data() + r * at(C);
    double mu = 0, var = 0;
    for (I64 j = 0; j < C; ++j) mu += xr[j] / static_cast<double>(C);
    for (I64 j = 0; j < C; ++j) var += (xr[j] - mu) * (xr[j] - mu) / static_cast<double>(C);
    for (I64 j = 0; j < C; ++j) y[r * at(C) + at(j)] = (xr[j] - mu) / std::sqrt(var + eps) * g[j] + b[j];
  }
  return y;
}

//! timm's SwinTransformerBlock._attn after norm1 (and Video Swin's for T > 1), literally: roll
//! by -shift, window_partition, WindowAttention with the bias from relative_position_index and
//! the mask from the slices, window_reverse, roll back. x is [B, T, H, W, C].
std::vector<double> reference_window_attention(WindowAttention<double>& a, I64 B, const std::vector<double>& x) {
  const auto& c = a.config();
  const I64 T = c.grid[0], H = c.grid[1], W = c.grid[2], C = c.dim, heads = c.num_heads, hd = C / heads;
  const I64 wt = c.window[0], wh = c.window[1], ww = c.window[2], N = wt * wh * ww;
  const I64 st = c.shift[0], sh = c.shift[1], sw = c.shift[2];
  const I64 Ng = T * H * W;
  const auto xn = layer_norm(x, C, a.norm1().weight().data(), a.norm1().bias().data(), c.eps);
  auto tok = [&](I64 t, I64 h, I64 w) { return (t * H + h) * W + w; };

  // torch.roll(x, shifts=-s): out[(i - s) mod r] = in[i] on every axis.
  std::vector<double> shifted(xn.size());
  for (I64 b = 0; b < B; ++b)
    for (I64 t = 0; t < T; ++t)
      for (I64 h = 0; h < H; ++h)
        for (I64 w = 0; w < W; ++w)
          for (I64 e = 0; e < C; ++e)
            shifted[at((b * Ng + tok(((t - st) % T + T) % T, ((h - sh) % H + H) % H, ((w - sw) % W + W) % W)) * C + e)] =
                xn[at((b * Ng + tok(t, h, w)) * C + e)];

  // The attention mask: img_mask regions from the slices, only when shifted.
  const bool has_shift = st > 0 || sh > 0 || sw > 0;
  std::vector<I64> img(at(Ng), 0);
  if (has_shift) {
    auto slices = [](I64 w, I64 s, I64 r) {
      return std::array<std::pair<I64, I64>, 3>{py_slice(0, -w, r), py_slice(-w, -s, r), py_slice(-s, std::nullopt, r)};
    };
    I64 cnt = 0;
    for (auto [t0, t1] : slices(wt, st, T))
      for (auto [h0, h1] : slices(wh, sh, H))
        for (auto [w0, w1] : slices(ww, sw, W)) {
          for (I64 t = t0; t < t1; ++t)
            for (I64 h = h0; h < h1; ++h)
              for (I64 w = w0; w < w1; ++w) img[at(tok(t, h, w))] = cnt;
          ++cnt;
        }
  }
  // relative_position_index: coords of the flattened window, pairwise differences shifted to
  // start at 0, then weighted (Video Swin; for wt = 1 it is Swin's (2wh-1)(2ww-1) table).
  std::vector<std::array<I64, 3>> coords;
  for (I64 t = 0; t < wt; ++t)
    for (I64 h = 0; h < wh; ++h)
      for (I64 w = 0; w < ww; ++w) coords.push_back({t, h, w});
  std::vector<I64> index(at(N * N));
  for (I64 i = 0; i < N; ++i)
    for (I64 j = 0; j < N; ++j) {
      const I64 r0 = coords[at(i)][0] - coords[at(j)][0] + wt - 1, r1 = coords[at(i)][1] - coords[at(j)][1] + wh - 1;
      const I64 r2 = coords[at(i)][2] - coords[at(j)][2] + ww - 1;
      index[at(i * N + j)] = r0 * (2 * wh - 1) * (2 * ww - 1) + r1 * (2 * ww - 1) + r2;
    }

  const double* wq = a.qkv().weight().data();
  const double* bq = a.qkv().bias().data();
  const double* wp = a.proj().weight().data();
  const double* bp = a.proj().bias().data();
  const double* table = a.relative_position_bias_table().data();
  const double scale = std::pow(static_cast<double>(hd), -0.5);
  std::vector<double> merged(xn.size());
  for (I64 b = 0; b < B; ++b)
    for (I64 it = 0; it < T / wt; ++it)
      for (I64 ih = 0; ih < H / wh; ++ih)
        for (I64 iw = 0; iw < W / ww; ++iw) {
          // window_partition: the window's tokens in row-major (t, h, w) order.
          std::vector<I64> where(at(N));
          for (I64 o = 0; o < N; ++o)
            where[at(o)] = tok(it * wt + coords[at(o)][0], ih * wh + coords[at(o)][1], iw * ww + coords[at(o)][2]);
          std::vector<double> qkv(at(N * 3 * C)), ctx(at(N * C));
          for (I64 o = 0; o < N; ++o)
            for (I64 r = 0; r < 3 * C; ++r) {
              double acc = bq[r];
              for (I64 e = 0; e < C; ++e) acc += shifted[at((b * Ng + where[at(o)]) * C + e)] * wq[r * C + e];
              qkv[at(o * 3 * C + r)] = acc;
            }
          // reshape(B_, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
          auto el = [&](I64 which, I64 h, I64 o, I64 e) { return qkv[at(o * 3 * C + which * C + h * hd + e)]; };
          for (I64 h = 0; h < heads; ++h)
            for (I64 i = 0; i < N; ++i) {
              std::vector<double> l(at(N));
              for (I64 j = 0; j < N; ++j) {
                double acc = 0;
                for (I64 e = 0; e < hd; ++e) acc += (el(0, h, i, e) * scale) * el(1, h, j, e);
                acc += table[index[at(i * N + j)] * heads + h];
                if (has_shift && img[at(where[at(i)])] != img[at(where[at(j)])]) acc += -100.0;
                l[at(j)] = acc;
              }
              const double mx = *std::max_element(l.begin(), l.end());
              double z = 0;
              for (double& v : l) z += (v = std::exp(v - mx));
              for (I64 e = 0; e < hd; ++e) {
                double acc = 0;
                for (I64 j = 0; j < N; ++j) acc += l[at(j)] / z * el(2, h, j, e);
                ctx[at(i * C + h * hd + e)] = acc;
              }
            }
          // proj, then window_reverse: the token goes back to its place in the shifted grid.
          for (I64 o = 0; o < N; ++o)
            for (I64 r = 0; r < C; ++r) {
              double acc = bp[r];
              for (I64 e = 0; e < C; ++e) acc += ctx[at(o * C + e)] * wp[r * C + e];
              merged[at((b * Ng + where[at(o)]) * C + r)] = acc;
            }
        }
  // torch.roll(x, shifts=+s): out[(i + s) mod r] = in[i].
  std::vector<double> out(xn.size());
  for (I64 b = 0; b < B; ++b)
    for (I64 t = 0; t < T; ++t)
      for (I64 h = 0; h < H; ++h)
        for (I64 w = 0; w < W; ++w)
          for (I64 e = 0; e < C; ++e)
            out[at((b * Ng + tok((t + st) % T, (h + sh) % H, (w + sw) % W)) * C + e)] =
                merged[at((b * Ng + tok(t, h, w)) * C + e)];
  return out;
}

//! timm's Mlp(norm2(x)) with exact GELU.
std::vector<double> reference_mlp(VitMlp<double>& m, const std::vector<double>& x) {
  const I64 D = m.config().dim, Hd = m.config().hidden;
  const auto xn = layer_norm(x, D, m.norm2().weight().data(), m.norm2().bias().data(), m.config().eps);
  const double* w1 = m.fc1().weight().data();
  const double* b1 = m.fc1().bias().data();
  const double* w2 = m.fc2().weight().data();
  const double* b2 = m.fc2().bias().data();
  std::vector<double> out(x.size()), hidden(at(Hd));
  for (std::size_t r = 0; r < x.size() / at(D); ++r) {
    for (I64 o = 0; o < Hd; ++o) {
      double z = b1[o];
      for (I64 j = 0; j < D; ++j) z += xn[r * at(D) + at(j)] * w1[o * D + j];
      hidden[at(o)] = z * 0.5 * std::erfc(-z / std::sqrt(2.0));
    }
    for (I64 o = 0; o < D; ++o) {
      double acc = b2[o];
      for (I64 j = 0; j < Hd; ++j) acc += hidden[at(j)] * w2[o * Hd + j];
      out[r * at(D) + at(o)] = acc;
    }
  }
  return out;
}

using Sched = ConstantSchedule;
using SwinLayer = ReversibleDualResidual<WindowAttention<double>, VitMlp<double>, Sched, Fp64>;

//! Blocks 0 .. L-1 of a stage on `grid` with configured window `window_cfg`: block j's
//! geometry from timm's rule (odd blocks shifted), norm eps 1e-5, random parameters.
std::vector<SwinLayer> swin_layers(int L, const Grid3& grid, const Grid3& window_cfg, I64 C, I64 heads, I64 hidden,
                                   std::mt19937_64& rng, double drop_path = 0.0, double drop = 0.0) {
  std::vector<SwinLayer> layers;
  for (int j = 0; j < L; ++j) {
    const WindowGeometry g = swin_block_geometry(grid, window_cfg, j);
    WindowAttention<double> f(window_attention_config(C, heads, g, 1e-5, drop_path, drop), rng());
    VitMlp<double> m({C, hidden, 1e-5, drop_path, drop}, rng());
    randomize(f, rng);
    randomize(m, rng);
    layers.emplace_back(std::move(f), std::move(m));
  }
  return layers;
}

struct StepResult {
  std::vector<double> out, dh0;
  std::vector<std::vector<double>> grads;
};

StepResult train_step(ReversibleStack<SwinLayer>& stack, const Shape& s, const std::vector<double>& h0,
                      const std::vector<double>& dout, std::int64_t step) {
  StepResult r{std::vector<double>(h0.size()), std::vector<double>(h0.size()), {}};
  stack.zero_grad();
  stack.forward(ConstView<double>(h0.data(), s), TensorView<double>(r.out.data(), s), step);
  stack.backward(ConstView<double>(dout.data(), s), TensorView<double>(r.dh0.data(), s));
  for (auto& p : stack.parameters()) r.grads.emplace_back(p.grad.data(), p.grad.data() + p.grad.size());
  return r;
}

//! The grids of the comparisons: (grid, configured window).
struct GridCase {
  Grid3 grid, window;
  const char* what;
};
constexpr GridCase kGridCases[] = {
    {{1, 8, 8}, {1, 4, 4}, "8x8 window 4 (block 1 shifts both axes)"},
    {{1, 8, 4}, {1, 4, 4}, "8x4 window 4 (block 1 shifts h only)"},
    {{1, 4, 4}, {1, 4, 4}, "4x4 window 4 (window == map: no shift)"},
    {{1, 4, 16}, {1, 8, 8}, "4x16 window 8 (h window shrinks to 4 and never shifts; w shifts by 4)"},
    {{4, 4, 4}, {2, 2, 2}, "3-D 4x4x4 window (2, 2, 2) (block 1 shifts every axis)"},
    {{2, 4, 8}, {2, 2, 4}, "3-D 2x4x8 window (2, 2, 4) (t window == map: t never shifts)"},
};

}  // namespace

// ---- Geometry -----------------------------------------------------------------------------

TEST_CASE("swin_block_geometry follows timm 0.9's per-axis rule", "[swin][geometry]") {
  auto same = [](const WindowGeometry& g, Grid3 grid, Grid3 window, Grid3 shift) {
    for (int a = 0; a < 3; ++a) {
      INFO("axis " << a << ": grid " << g.grid[a] << " window " << g.window[a] << " shift " << g.shift[a]);
      CHECK(g.grid[a] == grid[at(a)]);
      CHECK(g.window[a] == window[at(a)]);
      CHECK(g.shift[a] == shift[at(a)]);
    }
  };
  // Swin-T stage 1 and 4: even blocks never shift; at 7x7 the map equals the window.
  same(swin_block_geometry({56, 56}, 7, 0), {1, 56, 56}, {1, 7, 7}, {0, 0, 0});
  same(swin_block_geometry({56, 56}, 7, 1), {1, 56, 56}, {1, 7, 7}, {0, 3, 3});
  same(swin_block_geometry({56, 56}, 7, 3), {1, 56, 56}, {1, 7, 7}, {0, 3, 3});
  same(swin_block_geometry({7, 7}, 7, 1), {1, 7, 7}, {1, 7, 7}, {0, 0, 0});
  // The window shrinks to a smaller map, which then does not shift.
  same(swin_block_geometry({4, 4}, 7, 1), {1, 4, 4}, {1, 4, 4}, {0, 0, 0});
  // Non-square maps shift along one axis only.
  same(swin_block_geometry({8, 4}, 4, 1), {1, 8, 4}, {1, 4, 4}, {0, 2, 0});
  same(swin_block_geometry({14, 7}, 7, 1), {1, 14, 7}, {1, 7, 7}, {0, 3, 0});
  same(swin_block_geometry({3, 14}, 7, 1), {1, 3, 14}, {1, 3, 7}, {0, 0, 3});
  // 3-D (Video Swin): half of each configured axis.
  same(swin_block_geometry({8, 56, 56}, {2, 7, 7}, 1), {8, 56, 56}, {2, 7, 7}, {1, 3, 3});
  same(swin_block_geometry({16, 56, 56}, {8, 7, 7}, 1), {16, 56, 56}, {8, 7, 7}, {4, 3, 3});
  same(swin_block_geometry({8, 56, 56}, {8, 7, 7}, 1), {8, 56, 56}, {8, 7, 7}, {0, 3, 3});
  same(swin_block_geometry({4, 4, 4}, {2, 2, 2}, 1), {4, 4, 4}, {2, 2, 2}, {1, 1, 1});
  same(swin_block_geometry({4, 4, 4}, {2, 2, 2}, 2), {4, 4, 4}, {2, 2, 2}, {0, 0, 0});

  const WindowGeometry g = swin_block_geometry({8, 56, 56}, {2, 7, 7}, 1);
  CHECK(g.num_windows() == 4 * 8 * 8);
  CHECK(g.window_tokens() == 98);
  CHECK(g.table_rows() == 3 * 13 * 13);
  CHECK(swin_block_geometry({56, 56}, 7, 0).table_rows() == 169);
  CHECK(g.shifted());
  CHECK_FALSE(swin_block_geometry({56, 56}, 7, 0).shifted());

  // A map that is not a multiple of its window is refused (timm pads).
  CHECK_THROWS_WITH(swin_block_geometry({10, 8}, 4, 0),
                    Catch::Contains("grid h = 10") && Catch::Contains("not a multiple of window h = 4"));
  CHECK_THROWS_WITH(swin_block_geometry({8, 56, 50}, {2, 7, 7}, 1),
                    Catch::Contains("grid w = 50") && Catch::Contains("window w = 7"));
  CHECK_THROWS_WITH(swin_block_geometry({8, 8}, 4, -1), Catch::Contains("block index"));
  CHECK_THROWS_WITH(swin_block_geometry({0, 8}, 4, 0), Catch::Contains("grid h = 0"));
  CHECK_THROWS_WITH(swin_block_geometry({8, 8}, 0, 0), Catch::Contains("window h = 0"));
  WindowGeometry bad;
  bad.grid[1] = 8;
  bad.window[1] = 4;
  bad.shift[1] = 4;
  CHECK_THROWS_WITH(check_window_geometry(bad, "test"), Catch::Contains("shift h = 4") && Catch::Contains("[0, window h = 4)"));
  bad.shift[1] = 0;
  bad.window[2] = 2;
  CHECK_THROWS_WITH(check_window_geometry(bad, "test"), Catch::Contains("window w = 2") && Catch::Contains("grid w = 1"));
}

TEST_CASE("the window gather is torch.roll then window_partition; its inverse undoes it", "[swin][geometry]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const WindowGeometry cases[] = {swin_block_geometry({8, 8}, 4, 1), swin_block_geometry({8, 4}, 4, 1),
                                  swin_block_geometry({12, 6}, 3, 1), swin_block_geometry({4, 4, 4}, {2, 2, 2}, 1),
                                  swin_block_geometry({4, 6, 4}, {2, 3, 2}, 1), swin_block_geometry({4, 4}, 4, 0)};
  for (const WindowGeometry& g : cases) {
    const I64 T = g.grid[0], H = g.grid[1], W = g.grid[2], Ng = g.grid_tokens(), N = g.window_tokens();
    INFO("grid " << T << "x" << H << "x" << W << " window " << g.window[0] << "x" << g.window[1] << "x" << g.window[2]
                 << " shift " << g.shift[0] << "," << g.shift[1] << "," << g.shift[2]);
    // torch.roll(ids, -shift) in scatter form: out[(i - s) mod r] = in[i].
    std::vector<I64> rolled(at(Ng));
    for (I64 t = 0; t < T; ++t)
      for (I64 h = 0; h < H; ++h)
        for (I64 w = 0; w < W; ++w) {
          const I64 rt = ((t - g.shift[0]) % T + T) % T, rh = ((h - g.shift[1]) % H + H) % H;
          const I64 rw = ((w - g.shift[2]) % W + W) % W;
          rolled[at((rt * H + rh) * W + rw)] = (t * H + h) * W + w;
        }
    // window_partition of the rolled ids: view(B, T/wt, wt, H/wh, wh, W/ww, ww).permute(0, 1, 3, 5, 2, 4, 6).
    std::vector<I64> partitioned;
    for (I64 it = 0; it < T / g.window[0]; ++it)
      for (I64 ih = 0; ih < H / g.window[1]; ++ih)
        for (I64 iw = 0; iw < W / g.window[2]; ++iw)
          for (I64 ot = 0; ot < g.window[0]; ++ot)
            for (I64 oh = 0; oh < g.window[1]; ++oh)
              for (I64 ow = 0; ow < g.window[2]; ++ow)
                partitioned.push_back(
                    rolled[at(((it * g.window[0] + ot) * H + ih * g.window[1] + oh) * W + iw * g.window[2] + ow)]);
    REQUIRE(static_cast<I64>(partitioned.size()) == Ng);
    for (I64 r = 0; r < Ng; ++r) {
      CHECK(g.grid_token(r / N, r % N) == partitioned[at(r)]);
      CHECK(g.window_row(partitioned[at(r)]) == r);
    }

    // WindowTokens over a batch: to windows and back is the identity; run_range equals operator().
    const I64 B = 2, C = 5;
    const auto n = at(B * Ng * C);
    const auto x = random_vector<double>(n, rng);
    std::vector<double> win(n, std::numeric_limits<double>::quiet_NaN()), back(n, std::numeric_limits<double>::quiet_NaN());
    const WindowTokens<double> to{win.data(), x.data(), g, B, C, true};
    for (std::size_t i = 0; i < n; ++i) to(i);
    for (I64 b = 0; b < B; ++b)
      for (I64 r = 0; r < Ng; ++r)
        for (I64 c = 0; c < C; ++c) CHECK(win[at((b * Ng + r) * C + c)] == x[at((b * Ng + partitioned[at(r)]) * C + c)]);
    const WindowTokens<double> from{back.data(), win.data(), g, B, C, false};
    for (std::size_t i = 0; i < n; ++i) from(i);
    CHECK(back == x);
    for (const WindowTokens<double>* fn : {&to, &from}) {
      std::vector<double> ranged(n, std::numeric_limits<double>::quiet_NaN());
      WindowTokens<double> f = *fn;
      const std::vector<double> want = f.to_windows ? win : back;
      f.dst = ranged.data();
      for (std::size_t begin = 0; begin < n;) {
        const std::size_t end = std::min(n, begin + std::uniform_int_distribution<std::size_t>(1, 13)(rng));
        f.run_range(begin, end);
        begin = end;
      }
      CHECK(ranged == want);
    }
  }
}

TEST_CASE("bias and mask kernels: range path exact; the table gradient is the index's scatter-add",
          "[swin][geometry]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  for (const WindowGeometry& g : {swin_block_geometry({8, 4}, 4, 1), swin_block_geometry({4, 4, 4}, {2, 2, 2}, 1),
                                  swin_block_geometry({4, 6, 4}, {2, 3, 2}, 0)}) {
    const I64 heads = 3, N = g.window_tokens(), B = 2, BW = B * g.num_windows();
    const auto table = random_vector<double>(at(g.table_rows() * heads), rng);
    const auto logits = random_vector<double>(at(BW * heads * N * N), rng);
    // operator() against the formula; run_range against operator().
    auto by_element = logits, by_range = logits;
    const WindowLogitBias<double> f{by_element.data(), table.data(), g, heads};
    for (std::size_t i = 0; i < logits.size(); ++i) f(i);
    std::size_t masked = 0;
    for (I64 bw = 0; bw < BW; ++bw)
      for (I64 h = 0; h < heads; ++h)
        for (I64 i = 0; i < N; ++i)
          for (I64 j = 0; j < N; ++j) {
            const I64 w = bw % g.num_windows();
            const std::size_t k = at(((bw * heads + h) * N + i) * N + j);
            const I64 r = g.relative_index(i, j);
            REQUIRE((r >= 0 && r < g.table_rows()));
            const bool other = g.region_id(w, i) != g.region_id(w, j);
            masked += other ? 1 : 0;
            CHECK(by_element[k] == (logits[k] + table[at(r * heads + h)]) + (other ? -100.0 : 0.0));
          }
    CHECK((masked > 0) == g.shifted());
    WindowLogitBias<double> fr{by_range.data(), table.data(), g, heads};
    for (std::size_t begin = 0; begin < logits.size();) {
      const std::size_t end = std::min(logits.size(), begin + std::uniform_int_distribution<std::size_t>(1, 29)(rng));
      fr.run_range(begin, end);
      begin = end;
    }
    CHECK(by_range == by_element);

    // The gradient: every pair's dS lands on its table row, nowhere else.
    const auto dsum = random_vector<double>(at(heads * N * N), rng);
    const auto prior = random_vector<double>(table.size(), rng);
    auto grad = prior, naive = prior;
    const RelativeBiasGradient<double> rg{grad.data(), dsum.data(), g, heads};
    for (std::size_t e = 0; e < grad.size(); ++e) rg(e);
    for (I64 h = 0; h < heads; ++h)
      for (I64 i = 0; i < N; ++i)
        for (I64 j = 0; j < N; ++j) naive[at(g.relative_index(i, j) * heads + h)] += dsum[at((h * N + i) * N + j)];
    CHECK(max_abs_diff(grad, naive) <= 1e-13 * static_cast<double>(N));
  }
}

// ---- The function against timm's block ---------------------------------------------------

TEST_CASE("a stack of WindowAttention + VitMlp blocks at (1, 0) is timm's SwinTransformerBlock (fp64)",
          "[swin][reference]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  const I64 C = 6, heads = 2, hidden = 12, B = 2;
  for (const GridCase& gc : kGridCases) {
    INFO(gc.what);
    const I64 Ng = gc.grid[0] * gc.grid[1] * gc.grid[2];
    const Shape s{B, Ng, C};
    const auto n = at(s.numel());
    auto layers = swin_layers(2, gc.grid, gc.window, C, heads, hidden, rng);
    CHECK(layers[1].g().config().eps == 1e-5);  // VitMlp's norm2 with Swin's eps
    auto plain = layers;
    for (auto& l : plain) {
      l.f().set_adds_into(false);
      l.g().set_adds_into(false);
    }
    const auto x = random_vector<double>(n, rng, -2.0, 2.0);
    // timm: two SwinTransformerBlocks, x = x + attn(norm1(x)); x = x + mlp(norm2(x)).
    std::vector<double> ref = x;
    for (auto& l : layers) {
      const auto a = reference_window_attention(l.f(), B, ref);
      for (std::size_t i = 0; i < n; ++i) ref[i] += a[i];
      const auto m = reference_mlp(l.g(), ref);
      for (std::size_t i = 0; i < n; ++i) ref[i] += m[i];
    }
    for (bool adding : {true, false}) {
      INFO((adding ? "adding into the stream" : "separate combine pass"));
      ReversibleStack<SwinLayer> stack(ctx, adding ? layers : plain, Sched(1.0, 0.0),
                                       {.mode = BackpropMode::Standard, .seed = rng()});
      std::vector<double> out(n, std::numeric_limits<double>::quiet_NaN()), train(n);
      stack.predict(ConstView<double>(x.data(), s), TensorView<double>(out.data(), s), 0);
      // Not the loops' summation order (GEMMs, LayerNorm): a few ulps (measured about 4e-16 relative).
      CHECK(max_abs_diff(out, ref) <= 1e-13 * std::max(1.0, max_abs(ref)));
      stack.forward(ConstView<double>(x.data(), s), TensorView<double>(train.data(), s), 0);
      CHECK(train == out);  // training with rates 0 is the plain function
    }
    // Block 1 is shifted exactly where timm shifts it.
    const WindowGeometry g1 = layers[1].f().geometry();
    for (int a = 0; a < 3; ++a) CHECK(g1.shift[a] == (gc.grid[at(a)] > gc.window[at(a)] ? gc.window[at(a)] / 2 : 0));
  }
  // A map that is not a multiple of the window is refused (timm would pad it).
  CHECK_THROWS_WITH(swin_layers(1, {1, 4, 8}, {1, 7, 7}, C, heads, hidden, rng),
                    Catch::Contains("grid w = 8") && Catch::Contains("window w = 7"));
}

TEST_CASE("WindowAttention alone equals the reference in every accepted view", "[swin][reference]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  for (const GridCase& gc : {kGridCases[1], kGridCases[4]}) {
    INFO(gc.what);
    const I64 C = 8, heads = 4, B = 3, T = gc.grid[0], H = gc.grid[1], W = gc.grid[2];
    CAPTURE(T, H, W);
    WindowAttention<double> attn(window_attention_config(C, heads, swin_block_geometry(gc.grid, gc.window, 1)), rng());
    randomize(attn, rng);
    const Shape rows{B, T * H * W, C};
    const auto n = at(rows.numel());
    const auto x = random_vector<double>(n, rng, -2.0, 2.0);
    const auto w = random_vector<double>(n, rng);
    const Call call{ctx, 0, 3, rng(), true};
    const auto f = apply(attn, call, rows, x);
    const auto ref = reference_window_attention(attn, B, x);
    CHECK(max_abs_diff(f, ref) <= 1e-13 * std::max(1.0, max_abs(ref)));
    // NHWC for a 2-D map; a 3-D grid has only the token-row view (Shape's rank is at most 4).
    std::vector<Shape> views;
    if (T == 1) views.push_back(Shape{B, H, W, C});
    else CHECK_THROWS_WITH(attn.saved_elements(Shape{B, T, H * W, C}), Catch::Contains("configured grid"));
    zero_grads(attn);
    std::vector<double> gin_rows(n, 0.0);
    backprop(attn, call, rows, x, w, gin_rows);
    const auto grads_rows = grads_of(attn);
    for (const Shape& v : views) {
      INFO("view " << v);
      CHECK(attn.saved_elements(v) == attn.saved_elements(rows));
      CHECK(apply(attn, call, v, x) == f);
      zero_grads(attn);
      std::vector<double> gin(n, 0.0);
      backprop(attn, call, v, x, w, gin);
      CHECK(gin == gin_rows);
      CHECK(grads_of(attn) == grads_rows);
    }
  }
}

// ---- Gradients ----------------------------------------------------------------------------

TEST_CASE("WindowAttention gradients match central differences (fp64, shifted; bias table included)",
          "[swin][grad]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  struct Case {
    Grid3 grid, window;
    I64 batch, dim, heads;
    int block;
    bool drops;
  };
  const Case cases[] = {{{1, 8, 4}, {1, 4, 4}, 1, 6, 2, 1, false},  // shift on h only
                        {{1, 8, 8}, {1, 4, 4}, 2, 4, 2, 1, true},   // both axes, with drop-path and dropout
                        {{4, 4, 4}, {2, 2, 2}, 1, 4, 2, 1, false},  // 3-D, every axis shifted
                        {{1, 4, 4}, {1, 4, 4}, 2, 6, 3, 0, false}};  // one window, unshifted
  for (const Case& c : cases) {
    const WindowGeometry g = swin_block_geometry(c.grid, c.window, c.block);
    INFO("grid " << c.grid[0] << "x" << c.grid[1] << "x" << c.grid[2] << " block " << c.block << " heads " << c.heads
                 << (c.drops ? " with drops" : ""));
    WindowAttention<double> attn(window_attention_config(c.dim, c.heads, g, 1e-5, c.drops ? 0.3 : 0.0, c.drops ? 0.25 : 0.0),
                                 rng());
    randomize(attn, rng);
    std::uint64_t call_seed = rng();
    const Shape s{c.batch, g.grid_tokens(), c.dim};
    // With drop-path, a seed that keeps at least one sample.
    if (c.drops)
      while (max_abs(apply(attn, Call{ctx, 2, 5, call_seed, true}, s,
                           random_vector<double>(at(s.numel()), rng))) == 0)
        call_seed = rng();
    check_against_finite_differences(attn, Call{ctx, 2, 5, call_seed, true}, s, rng);
  }
}

TEST_CASE("backward accumulates; forward and recompute agree bit for bit with drop masks", "[swin][grad][drop]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  const I64 C = 6;
  WindowAttention<double> fn(window_attention_config(C, 3, swin_block_geometry({8, 4}, 4, 1), 1e-5, 0.2, 0.3), rng());
  randomize(fn, rng);
  const Shape s{4, 32, C};
  const auto n = at(s.numel());
  const auto x = random_vector<double>(n, rng, -2.0, 2.0);
  const auto w = random_vector<double>(n, rng);
  std::uint64_t call_seed = rng();
  while (max_abs(apply(fn, Call{ctx, 4, 9, call_seed, true}, s, x)) == 0) call_seed = rng();
  const Call call{ctx, 4, 9, call_seed, true};

  const auto f = apply(fn, call, s, x);
  std::vector<double> recomputed, unused(n, 0.0);
  backprop(fn, call, s, x, w, unused, &recomputed);
  CHECK(f == recomputed);
  // The masks: whole samples dropped (drop-path over T H W C elements) and single elements.
  const auto plain = apply(fn, Call{ctx, 4, 9, call_seed, false}, s, x);
  std::size_t zeros = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (f[i] == 0.0) ++zeros;
    else CHECK(std::abs(f[i] - plain[i] / (0.8 * 0.7)) <= 1e-13 * std::max(1.0, max_abs(plain)));
  }
  CHECK(zeros > 0);
  CHECK(apply(fn, Call{ctx, 4, 10, call_seed, true}, s, x) != f);  // another step, other masks

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
  for (std::size_t i = 0; i < n; ++i)
    CHECK(std::abs((gin[i] - prior[i]) - 2 * (once[i] - prior[i])) <= 1e-12 * std::max(1.0, jt));
  for (std::size_t k = 0; k < g1.size(); ++k) {
    REQUIRE(max_abs(g1[k]) > 0);
    for (std::size_t i = 0; i < g1[k].size(); ++i)
      CHECK(std::abs(g2[k][i] - 2 * g1[k][i]) <= 1e-12 * std::max(1.0, max_abs(g1[k])));
  }
}

TEST_CASE("Swin stacks: reversible gradients equal standard gradients with drop-path and dropout",
          "[swin][stack]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const I64 C = 6, heads = 2, hidden = 12, B = 3;
  for (const GridCase& gc : {kGridCases[1], kGridCases[4]}) {
    INFO(gc.what);
    const I64 Ng = gc.grid[0] * gc.grid[1] * gc.grid[2];
    const Shape s{B, Ng, C};
    const auto n = at(s.numel());
    for (Coefficients c : {Coefficients{0.0, 1.0}, Coefficients{0.5, 0.5}}) {
      INFO("alpha " << c.alpha << " beta " << c.beta);
      HostContext ctx({.poison_allocations = true});
      ReversibleStack<SwinLayer> stack(ctx, swin_layers(2, gc.grid, gc.window, C, heads, hidden, rng, 0.3, 0.2), Sched(c),
                                       {.seed = rng()});
      const auto h0 = random_vector<double>(n, rng);
      const auto dout = random_vector<double>(n, rng);
      for (std::int64_t step : {0, 1}) {
        stack.set_mode(BackpropMode::Standard);
        const auto standard = train_step(stack, s, h0, dout, step);
        stack.set_mode(BackpropMode::Reversible);
        const auto reversible = train_step(stack, s, h0, dout, step);
        CHECK(reversible.out == standard.out);
        CHECK(max_abs_diff(reversible.dh0, standard.dh0) <= 1e-10 * std::max(1.0, max_abs(standard.dh0)));
        // (A function whose every sample drop-path removed has zero gradients in both modes.)
        double largest = 0;
        for (std::size_t k = 0; k < standard.grads.size(); ++k) {
          INFO("parameter " << stack.parameters()[k].name);
          largest = std::max(largest, max_abs(standard.grads[k]));
          CHECK(max_abs_diff(reversible.grads[k], standard.grads[k]) <=
                1e-10 * std::max(1.0, max_abs(standard.grads[k])));
        }
        REQUIRE(largest > 0);
        for (std::size_t i = 0; i < n; ++i) CHECK(std::abs(stack.reconstructed_x().data()[i] - h0[i]) <= 1e-12);
      }
    }
  }
}

TEST_CASE("WindowAttention results do not depend on the host's thread count", "[swin][threads]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  // Large enough for several chunks of every kernel: 3 x 256 tokens of width 16, 64 windows.
  WindowAttention<double> fn(window_attention_config(16, 2, swin_block_geometry({16, 16}, 4, 1)), rng());
  randomize(fn, rng);
  const Shape s{3, 16, 16, 16};
  const auto n = at(s.numel());
  const auto x = random_vector<double>(n, rng, -2.0, 2.0);
  const auto w = random_vector<double>(n, rng);
  const std::uint64_t call_seed = rng();
  std::vector<std::vector<double>> outs, gins;
  std::vector<std::vector<std::vector<double>>> grads;
  for (int threads : {1, 2, 3}) {
    HostContext ctx({.poison_allocations = true, .threads = threads});
    zero_grads(fn);
    std::vector<double> gin(n, 0.0), out;
    backprop(fn, Call{ctx, 1, 2, call_seed, true}, s, x, w, gin, &out);
    outs.push_back(out);
    gins.push_back(gin);
    grads.push_back(grads_of(fn));
  }
  for (std::size_t t = 1; t < outs.size(); ++t) {
    CHECK(outs[t] == outs[0]);
    CHECK(gins[t] == gins[0]);
    CHECK(grads[t] == grads[0]);  // the bias table's included
  }
}

// ---- Names and errors -----------------------------------------------------------------------

TEST_CASE("a Swin stack has timm's parameter names and shapes; load checks them", "[swin][params]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  ReversibleStack<SwinLayer> stack(ctx, swin_layers(2, {1, 8, 4}, {1, 4, 4}, 8, 2, 16, rng), Sched(0.0, 1.0));
  const std::vector<std::string> timm = {"norm1.weight", "norm1.bias", "attn.relative_position_bias_table",
                                         "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                                         "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                                         "mlp.fc2.weight", "mlp.fc2.bias"};
  const std::vector<Shape> shapes = {Shape{8}, Shape{8}, Shape{49, 2}, Shape{24, 8}, Shape{24}, Shape{8, 8}, Shape{8},
                                     Shape{8}, Shape{8}, Shape{16, 8}, Shape{16}, Shape{8, 16}, Shape{8}};
  const auto params = stack.parameters();
  REQUIRE(params.size() == 26);
  for (std::size_t i = 0; i < params.size(); ++i) {
    CHECK(params[i].name == "blocks." + std::to_string(i / 13) + "." + timm[i % 13]);
    CHECK(params[i].value.shape() == shapes[i % 13]);
  }
  // The initial table is timm's trunc_normal(std 0.02), not zeros.
  WindowAttention<float> fresh(window_attention_config(8, 2, swin_block_geometry({8, 4}, 4, 1)), 7);
  const auto& table = fresh.relative_position_bias_table();
  double sq = 0;
  for (std::size_t i = 0; i < table.size(); ++i) sq += double(table.data()[i]) * table.data()[i];
  CHECK(std::sqrt(sq / double(table.size())) == Approx(0.02).epsilon(0.3));  // 98 draws
  // 3-D: the Video Swin table.
  WindowAttention<float> video(window_attention_config(8, 4, swin_block_geometry({8, 56, 56}, {2, 7, 7}, 1)));
  CHECK(video.relative_position_bias_table().shape() == Shape{3 * 13 * 13, 4});

  auto& attn = stack.layer(1).f();
  std::vector<double> v(49 * 2);
  std::iota(v.begin(), v.end(), 0.0);
  attn.load("attn.relative_position_bias_table", v.data(), Shape{49, 2});
  CHECK(attn.relative_position_bias_table().data()[17] == 17.0);
  CHECK_THROWS_WITH(attn.load("attn.relative_position_bias_table", v.data(), Shape{48, 2}),
                    Catch::Contains("attn.relative_position_bias_table") && Catch::Contains("[49, 2]") &&
                        Catch::Contains("[48, 2]"));
  CHECK_THROWS_WITH(attn.load("attn.relative_position_index", v.data(), Shape{49, 2}),
                    Catch::Contains("attn.relative_position_index") && Catch::Contains("attn.proj.bias"));
  // copy_from refuses another geometry (block 0 of the same stage is not shifted).
  WindowAttention<float> unshifted(window_attention_config(8, 2, swin_block_geometry({8, 4}, 4, 0)));
  CHECK_THROWS_WITH(attn.copy_from(unshifted), Catch::Contains("geometry") && Catch::Contains("shift (0, 0, 0)"));
}

TEST_CASE("bad window-attention configurations and inputs give errors that say what is wrong", "[swin][errors]") {
  auto cfg = [](I64 dim, I64 heads, Grid3 grid, Grid3 window, Grid3 shift = {0, 0, 0}) {
    return WindowAttentionConfig{dim, heads, grid, window, shift};
  };
  CHECK_THROWS_WITH(WindowAttention<float>(cfg(10, 3, {1, 8, 8}, {1, 4, 4})),
                    Catch::Contains("num_heads = 3") && Catch::Contains("dim = 10"));
  CHECK_THROWS_WITH(WindowAttention<float>(cfg(0, 1, {1, 8, 8}, {1, 4, 4})), Catch::Contains("dim"));
  CHECK_THROWS_WITH(WindowAttention<float>(cfg(8, 0, {1, 8, 8}, {1, 4, 4})), Catch::Contains("num_heads"));
  CHECK_THROWS_WITH(WindowAttention<float>(cfg(8, 2, {1, 10, 8}, {1, 4, 4})),
                    Catch::Contains("grid h = 10") && Catch::Contains("not a multiple of window h = 4"));
  CHECK_THROWS_WITH(WindowAttention<float>(cfg(8, 2, {1, 8, 4}, {1, 4, 8})),
                    Catch::Contains("window w = 8") && Catch::Contains("grid w = 4"));
  CHECK_THROWS_WITH(WindowAttention<float>(cfg(8, 2, {1, 8, 8}, {1, 4, 4}, {0, 4, 0})), Catch::Contains("shift h = 4"));
  CHECK_THROWS_WITH(WindowAttention<float>(cfg(8, 2, {1, 8, 8}, {1, 4, 4}, {0, -1, 0})), Catch::Contains("shift h = -1"));
  CHECK_THROWS_WITH(WindowAttention<float>(cfg(8, 2, {0, 8, 8}, {1, 4, 4})), Catch::Contains("grid t = 0"));
  auto rates = cfg(8, 2, {1, 8, 8}, {1, 4, 4});
  rates.drop_path = 1.0;
  CHECK_THROWS_WITH(WindowAttention<float>(rates), Catch::Contains("drop_path"));
  rates.drop_path = 0.0;
  rates.proj_drop = -0.1;
  CHECK_THROWS_WITH(WindowAttention<float>(rates), Catch::Contains("proj_drop"));
  rates.proj_drop = 0.0;
  rates.eps = 0.0;
  CHECK_THROWS_WITH(WindowAttention<float>(rates), Catch::Contains("eps"));

  // Views: the width, the grid, the rank; each names the member and the shape.
  WindowAttention<float> attn(window_attention_config(8, 2, swin_block_geometry({8, 4}, 4, 1)));
  CHECK_THROWS_WITH(attn.saved_elements(Shape{2, 32, 9}),
                    Catch::Contains("saved_elements") && Catch::Contains("width 9") && Catch::Contains("dim is 8"));
  CHECK_THROWS_WITH(attn.saved_elements(Shape{2, 31, 8}),
                    Catch::Contains("[2, 31, 8]") && Catch::Contains("[B, 32, 8]") && Catch::Contains("[B, 8, 4, 8]"));
  CHECK_THROWS_WITH(attn.saved_elements(Shape{2, 4, 8, 8}), Catch::Contains("does not hold the configured grid (1, 8, 4)"));
  CHECK_THROWS_WITH(attn.saved_elements(Shape{64, 8}), Catch::Contains("not a token grid"));
  CHECK_THROWS_WITH(attn.saved_elements(Shape{0, 32, 8}), Catch::Contains("empty batch"));
  CHECK(attn.saved_elements(Shape{2, 8, 4, 8}) == attn.saved_elements(Shape{2, 32, 8}));
  // mean, rstd, xw, qkv, probs (2 x 2 windows, 2 heads, 16 x 16), ctx.
  CHECK(attn.saved_elements(Shape{2, 32, 8}) == std::size_t(64 + 64 + 64 * 8 + 64 * 24 + 4 * 2 * 256 + 64 * 8));
  WindowAttention<float> video(window_attention_config(8, 2, swin_block_geometry({4, 4, 4}, {2, 2, 2}, 1)));
  CHECK_THROWS_WITH(video.saved_elements(Shape{2, 4, 16, 8}),
                    Catch::Contains("configured grid (4, 4, 4)") && Catch::Contains("expected [B, 64, 8]"));
  CHECK(video.saved_elements(Shape{2, 64, 8}) > 0);

  HostContext ctx;
  const Shape s{2, 32, 8};
  std::vector<float> x(512), out(512), scratch(attn.saved_elements(s)), small(10);
  CHECK_THROWS_WITH(attn.forward(Call{ctx}, ConstView<float>(x.data(), Shape{2, 8, 4, 8}), TensorView<float>(out.data(), s),
                                 TensorView<float>(scratch.data(), Shape{static_cast<I64>(scratch.size())})),
                    Catch::Contains("forward: output"));
  CHECK_THROWS_WITH(attn.forward(Call{ctx}, ConstView<float>(x.data(), s), TensorView<float>(out.data(), s),
                                 TensorView<float>(small.data(), Shape{10})),
                    Catch::Contains("forward") && Catch::Contains("needs"));
  attn.forward(Call{ctx}, ConstView<float>(x.data(), s), TensorView<float>(out.data(), s),
               TensorView<float>(scratch.data(), Shape{static_cast<I64>(scratch.size())}));
  CHECK_THROWS_WITH(attn.backward(Call{ctx}, ConstView<float>(x.data(), s),
                                  ConstView<float>(scratch.data(), Shape{static_cast<I64>(scratch.size())}),
                                  ConstView<float>(out.data(), Shape{2, 8, 4, 8}), TensorView<float>(out.data(), s)),
                    Catch::Contains("backward: grad_out"));
  CHECK_THROWS_WITH(attn.backward(Call{ctx}, ConstView<float>(x.data(), Shape{2, 16, 8}),
                                  ConstView<float>(scratch.data(), Shape{static_cast<I64>(scratch.size())}),
                                  ConstView<float>(out.data(), Shape{2, 16, 8}), TensorView<float>(out.data(), Shape{2, 16, 8})),
                    Catch::Contains("backward: input of shape [2, 16, 8]"));

  // Through a stack: the module is named as well as the grid.
  std::mt19937_64 rng(5);
  ReversibleStack<SwinLayer> stack(ctx, swin_layers(1, {1, 8, 4}, {1, 4, 4}, 8, 2, 16, rng), Sched(0.0, 1.0));
  std::vector<double> h(2 * 16 * 8), o(h.size());
  CHECK_THROWS_WITH(stack.forward(ConstView<double>(h.data(), Shape{2, 16, 8}), TensorView<double>(o.data(), Shape{2, 16, 8}), 0),
                    Catch::Contains("module 0") && Catch::Contains("configured grid"));
}
