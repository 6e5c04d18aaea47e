#pragma once
// An independent plain-loop implementation of the stages of timm 0.9's SwinTransformer (and
// of Video Swin's 3-D blocks), written from timm's code and not from dr2net's: per stage the
// PatchMerging at its start (s >= 1), then SwinTransformerBlocks
//   x = x + proj(window_attention(roll(norm1(x), -shift)))   (rolled back after window_reverse)
//   x = x + fc2(gelu(fc1(norm2(x))))
// with the window and shift rule of timm 0.9's SwinTransformerBlock (per axis: window =
// min(window_size, map), shift = window_size // 2 on odd blocks where map > window_size),
// the relative position index from the window's coordinates, the mask from timm's slices.
// Tensors are read by timm name from a map; activations are [B, T, H, W, C] in fp64.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace dr2net::testing {

//! What the reference needs of a Swin configuration.
struct SwinReferenceSpec {
  std::int64_t embed_dim = 0;
  std::vector<int> depths;
  std::vector<std::int64_t> num_heads;
  std::array<std::int64_t, 3> window_size{1, 1, 1};  //!< (t, h, w)
  std::array<std::int64_t, 3> grid{1, 1, 1};         //!< (T, H, W) of stage 0
  double eps = 1e-5;
};

//! Tensors by timm name.
using SwinTensors = std::map<std::string, std::vector<double>>;

class SwinReference {
 public:
  SwinReference(const SwinTensors& tensors, SwinReferenceSpec spec) : t_(tensors), spec_(std::move(spec)) {}

  //! The last stage's output [B, T, H_S, W_S, C_S] for stage 0's input x [B, T, H, W, C].
  std::vector<double> run(std::int64_t B, std::vector<double> x) const {
    auto grid = spec_.grid;
    std::int64_t C = spec_.embed_dim;
    for (std::size_t s = 0; s < spec_.depths.size(); ++s) {
      const std::string stage = "layers." + std::to_string(s) + ".";
      if (s > 0) {
        x = merge(stage + "downsample.", B, grid, C, x);
        grid[1] /= 2;
        grid[2] /= 2;
        C *= 2;
      }
      for (int j = 0; j < spec_.depths[s]; ++j)
        block(stage + "blocks." + std::to_string(j) + ".", B, grid, C, spec_.num_heads[s], j, x);
    }
    return x;
  }

 private:
  using I64 = std::int64_t;
  static std::size_t at(I64 i) { return static_cast<std::size_t>(i); }

  const std::vector<double>& p(const std::string& name) const { return t_.at(name); }

  std::vector<double> layer_norm(const std::vector<double>& x, I64 C, const std::string& name) const {
    const auto& g = p(name + ".weight");
    const auto& b = p(name + ".bias");
    std::vector<double> y(x.size());
    for (std::size_t r = 0; r < x.size() / at(C); ++r) {
      const double* xr = x.data() + r * at(C);
      double mu = 0, var = 0;
      for (I64 k = 0; k < C; ++k) mu += xr[k];
      mu /= static_cast<double>(C);
      for (I64 k = 0; k < C; ++k) var += (xr[k] - mu) * (xr[k] - mu);
      var /= static_cast<double>(C);
      for (I64 k = 0; k < C; ++k) y[r * at(C) + at(k)] = (xr[k] - mu) / std::sqrt(var + spec_.eps) * g[at(k)] + b[at(k)];
    }
    return y;
  }

  //! rows x [R, in] -> [R, out] through weight [out, in] (+ bias when `bias`).
  std::vector<double> linear(const std::vector<double>& x, I64 in, I64 out, const std::string& name, bool bias) const {
    const auto& w = p(name + ".weight");
    const std::vector<double>* b = bias ? &p(name + ".bias") : nullptr;
    const std::size_t rows = x.size() / at(in);
    std::vector<double> y(rows * at(out));
    for (std::size_t r = 0; r < rows; ++r)
      for (I64 o = 0; o < out; ++o) {
        double s = b ? (*b)[at(o)] : 0.0;
        for (I64 k = 0; k < in; ++k) s += x[r * at(in) + at(k)] * w[at(o * in + k)];
        y[r * at(out) + at(o)] = s;
      }
    return y;
  }

  //! timm PatchMerging: x0 = x[0::2, 0::2], x1 = x[1::2, 0::2], x2 = x[0::2, 1::2],
  //! x3 = x[1::2, 1::2] concatenated, norm, reduction (no bias); per frame in 3-D.
  std::vector<double> merge(const std::string& name, I64 B, const std::array<I64, 3>& g, I64 C,
                            const std::vector<double>& x) const {
    const I64 T = g[0], H = g[1], W = g[2], H2 = H / 2, W2 = W / 2;
    const int dh[4] = {0, 1, 0, 1}, dw[4] = {0, 0, 1, 1};
    std::vector<double> rows(at(B * T * H2 * W2 * 4 * C));
    for (I64 b = 0; b < B; ++b)
      for (I64 t = 0; t < T; ++t)
        for (I64 i = 0; i < H2; ++i)
          for (I64 j = 0; j < W2; ++j)
            for (int k = 0; k < 4; ++k)
              for (I64 c = 0; c < C; ++c)
                rows[at((((b * T + t) * H2 + i) * W2 + j) * 4 * C + k * C + c)] =
                    x[at((((b * T + t) * H + 2 * i + dh[k]) * W + 2 * j + dw[k]) * C + c)];
    return linear(layer_norm(rows, 4 * C, name + "norm"), 4 * C, 2 * C, name + "reduction", false);
  }

  //! Python's slice(start, stop) on an axis of length r as [begin, end); nullopt is None.
  static std::pair<I64, I64> py_slice(std::optional<I64> start, std::optional<I64> stop, I64 r) {
    auto resolve = [r](I64 i) { return std::clamp<I64>(i < 0 ? i + r : i, 0, r); };
    const I64 b = start ? resolve(*start) : 0, e = stop ? resolve(*stop) : r;
    return {b, std::max(b, e)};
  }

  void block(const std::string& name, I64 B, const std::array<I64, 3>& g, I64 C, I64 heads, int j,
             std::vector<double>& x) const {
    const I64 T = g[0], H = g[1], W = g[2], Ng = T * H * W, hd = C / heads;
    I64 win[3], sh[3];
    for (int a = 0; a < 3; ++a) {  // timm 0.9 SwinTransformerBlock._calc_window_shift
      const I64 r = g[static_cast<std::size_t>(a)], ws = spec_.window_size[static_cast<std::size_t>(a)];
      win[a] = r <= ws ? r : ws;
      sh[a] = (j % 2 == 1 && r > ws) ? ws / 2 : 0;
    }
    const I64 wt = win[0], wh = win[1], ww = win[2], N = wt * wh * ww;
    auto tok = [&](I64 t, I64 h, I64 w) { return (t * H + h) * W + w; };
    const auto xn = layer_norm(x, C, name + "norm1");
    // torch.roll(x, -shift): out[(i - s) mod r] = in[i].
    std::vector<double> shifted(xn.size());
    for (I64 b = 0; b < B; ++b)
      for (I64 t = 0; t < T; ++t)
        for (I64 h = 0; h < H; ++h)
          for (I64 w = 0; w < W; ++w)
            for (I64 e = 0; e < C; ++e)
              shifted[at((b * Ng + tok(((t - sh[0]) % T + T) % T, ((h - sh[1]) % H + H) % H, ((w - sh[2]) % W + W) % W)) *
                             C +
                         e)] = xn[at((b * Ng + tok(t, h, w)) * C + e)];
    const bool has_shift = sh[0] > 0 || sh[1] > 0 || sh[2] > 0;
    std::vector<I64> img(at(Ng), 0);
    if (has_shift) {
      auto slices = [](I64 w, I64 s, I64 r) {
        return std::array<std::pair<I64, I64>, 3>{py_slice(0, -w, r), py_slice(-w, -s, r),
                                                   py_slice(-s, std::nullopt, r)};
      };
      I64 cnt = 0;
      for (auto [t0, t1] : slices(wt, sh[0], T))
        for (auto [h0, h1] : slices(wh, sh[1], H))
          for (auto [w0, w1] : slices(ww, sh[2], W)) {
            for (I64 t = t0; t < t1; ++t)
              for (I64 h = h0; h < h1; ++h)
                for (I64 w = w0; w < w1; ++w) img[at(tok(t, h, w))] = cnt;
            ++cnt;
          }
    }
    std::vector<std::array<I64, 3>> coords;
    for (I64 t = 0; t < wt; ++t)
      for (I64 h = 0; h < wh; ++h)
        for (I64 w = 0; w < ww; ++w) coords.push_back({t, h, w});
    std::vector<I64> index(at(N * N));
    for (I64 a = 0; a < N; ++a)
      for (I64 c = 0; c < N; ++c) {
        const auto& u = coords[at(a)];
        const auto& v = coords[at(c)];
        index[at(a * N + c)] =
            ((u[0] - v[0] + wt - 1) * (2 * wh - 1) + (u[1] - v[1] + wh - 1)) * (2 * ww - 1) + (u[2] - v[2] + ww - 1);
      }
    const auto& table = p(name + "attn.relative_position_bias_table");
    const double scale = std::pow(static_cast<double>(hd), -0.5);
    std::vector<double> merged(xn.size());
    for (I64 b = 0; b < B; ++b)
      for (I64 it = 0; it < T / wt; ++it)
        for (I64 ih = 0; ih < H / wh; ++ih)
          for (I64 iw = 0; iw < W / ww; ++iw) {
            std::vector<I64> where(at(N));
            for (I64 o = 0; o < N; ++o)
              where[at(o)] = tok(it * wt + coords[at(o)][0], ih * wh + coords[at(o)][1], iw * ww + coords[at(o)][2]);
            std::vector<double> rows(at(N * C));
            for (I64 o = 0; o < N; ++o)
              std::copy_n(shifted.begin() + static_cast<std::ptrdiff_t>((b * Ng + where[at(o)]) * C), C,
                          rows.begin() + static_cast<std::ptrdiff_t>(o * C));
            const auto qkv = linear(rows, C, 3 * C, name + "attn.qkv", true);
            // reshape(B_, N, 3, heads, hd)
            auto el = [&](I64 which, I64 h, I64 o, I64 e) { return qkv[at(o * 3 * C + which * C + h * hd + e)]; };
            std::vector<double> ctx(at(N * C));
            for (I64 h = 0; h < heads; ++h)
              for (I64 a = 0; a < N; ++a) {
                std::vector<double> l(at(N));
                for (I64 c = 0; c < N; ++c) {
                  double acc = 0;
                  for (I64 e = 0; e < hd; ++e) acc += (el(0, h, a, e) * scale) * el(1, h, c, e);
                  acc += table[at(index[at(a * N + c)] * heads + h)];
                  if (has_shift && img[at(where[at(a)])] != img[at(where[at(c)])]) acc += -100.0;
                  l[at(c)] = acc;
                }
                const double mx = *std::max_element(l.begin(), l.end());
                double z = 0;
                for (double& v : l) z += (v = std::exp(v - mx));
                for (I64 e = 0; e < hd; ++e) {
                  double acc = 0;
                  for (I64 c = 0; c < N; ++c) acc += l[at(c)] / z * el(2, h, c, e);
                  ctx[at(a * C + h * hd + e)] = acc;
                }
              }
            const auto out = linear(ctx, C, C, name + "attn.proj", true);
            for (I64 o = 0; o < N; ++o)
              std::copy_n(out.begin() + static_cast<std::ptrdiff_t>(o * C), C,
                          merged.begin() + static_cast<std::ptrdiff_t>((b * Ng + where[at(o)]) * C));
          }
    // torch.roll(x, +shift), then the residual.
    for (I64 b = 0; b < B; ++b)
      for (I64 t = 0; t < T; ++t)
        for (I64 h = 0; h < H; ++h)
          for (I64 w = 0; w < W; ++w)
            for (I64 e = 0; e < C; ++e)
              x[at((b * Ng + tok((t + sh[0]) % T, (h + sh[1]) % H, (w + sh[2]) % W)) * C + e)] +=
                  merged[at((b * Ng + tok(t, h, w)) * C + e)];
    // x = x + mlp(norm2(x)), exact GELU.
    const I64 hidden = static_cast<I64>(p(name + "mlp.fc1.bias").size());
    auto u = linear(layer_norm(x, C, name + "norm2"), C, hidden, name + "mlp.fc1", true);
    for (double& v : u) v = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    const auto m = linear(u, hidden, C, name + "mlp.fc2", true);
    for (std::size_t k = 0; k < x.size(); ++k) x[k] += m[k];
  }

  const SwinTensors& t_;
  SwinReferenceSpec spec_;
};

}  // namespace dr2net::testing
