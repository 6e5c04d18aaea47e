#pragma once
//! \file
//! The geometry of Swin's (shifted) window attention on a token grid (T, H, W), and the
//! elementwise kernels that use it, shared by host and device (DR2NET_HD):
//!
//!   WindowGeometry        grid, window and shift per axis; the index maps below
//!   swin_block_geometry   timm 0.9's per-axis rule for block j of a stage (2-D and 3-D)
//!   WindowTokens          the cyclic shift + window partition as ONE gather (grid -> window
//!                         rows), and its inverse (window rows -> grid: reverse + roll back)
//!   WindowLogitBias       logits += relative position bias + shifted-window mask
//!   RelativeBiasGradient  the bias table's gradient from the logits' gradient
//!
//! Conventions (timm's SwinTransformerBlock and the Video Swin generalisation). Grid token g
//! of a sample is row-major over (t, h, w): g = (t H + h) W + w. After the cyclic shift by
//! -shift (torch.roll), shifted position p holds grid position (p + shift) mod r on each axis.
//! Windows are row-major over (t, h, w) window indices; token o of a window is row-major over
//! the offsets inside it, o = (ot wh + oh) ww + ow; window rows of a batch are sample-major,
//! row = (b nW + w) N + o (timm's B_ = B nW). With r the grid size, w the window and s the
//! shift of one axis:
//!
//!   window -> grid    g_axis = (window_index_axis * w + offset_axis + s) mod r
//!   relative index    ((at - ct + wt - 1)(2wh - 1) + (ah - ch + wh - 1))(2ww - 1) + (aw - cw + ww - 1)
//!                     for query a, key c (2-D: t terms vanish: (ah - ch + wh - 1)(2ww - 1) + ...)
//!   region (mask)     shifted axis (s > 0): p in [0, r - w) -> 0, [r - w, r - s) -> 1,
//!                     [r - s, r) -> 2 (timm's slices (0, -w), (-w, -s), (-s, None));
//!                     unshifted axis: one region. Tokens of different regions on any axis
//!                     get kWindowMaskValue (-100) added to their logit, others 0.
//!
//! Every index and the mask are derived from the geometry: nothing is loaded from a checkpoint.

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "dr2net/core/compute_type.hpp"
#include "dr2net/core/config.hpp"
#include "dr2net/core/error.hpp"

namespace dr2net {

//! What timm adds to the logit of a query/key pair from different regions of a shifted window.
inline constexpr double kWindowMaskValue = -100.0;

//! The window layout of one attention function on a token grid of T x H x W (T = 1 for
//! images): window and cyclic shift per axis, axes ordered (t, h, w). A valid geometry
//! (check_window_geometry) has 1 <= window <= grid, grid a multiple of window and
//! 0 <= shift < window on every axis. Trivially copyable: device kernels receive it by value.
struct WindowGeometry {
  std::int64_t grid[3] = {1, 1, 1};    //!< token grid (T, H, W)
  std::int64_t window[3] = {1, 1, 1};  //!< window (wt, wh, ww); divides the grid
  std::int64_t shift[3] = {0, 0, 0};   //!< cyclic shift per axis; 0 on an unshifted axis

  //! Windows along axis a: grid[a] / window[a].
  DR2NET_HD_INLINE std::int64_t windows_along(int a) const { return grid[a] / window[a]; }
  //! nW: windows per sample.
  DR2NET_HD_INLINE std::int64_t num_windows() const { return windows_along(0) * windows_along(1) * windows_along(2); }
  //! N: tokens per window.
  DR2NET_HD_INLINE std::int64_t window_tokens() const { return window[0] * window[1] * window[2]; }
  //! T H W: tokens per sample.
  DR2NET_HD_INLINE std::int64_t grid_tokens() const { return grid[0] * grid[1] * grid[2]; }
  //! Whether any axis is shifted (then the attention mask applies).
  DR2NET_HD_INLINE bool shifted() const { return shift[0] != 0 || shift[1] != 0 || shift[2] != 0; }
  //! Rows of the relative position bias table: (2wt - 1)(2wh - 1)(2ww - 1).
  DR2NET_HD_INLINE std::int64_t table_rows() const {
    return (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1);
  }

  //! The grid token (within a sample) that token `offset` of window `w` holds after the shift.
  DR2NET_HD_INLINE std::int64_t grid_token(std::int64_t w, std::int64_t offset) const {
    const std::int64_t ow = offset % window[2], oh = (offset / window[2]) % window[1], ot = offset / (window[2] * window[1]);
    const std::int64_t iw = w % windows_along(2), ih = (w / windows_along(2)) % windows_along(1);
    const std::int64_t it = w / (windows_along(2) * windows_along(1));
    const std::int64_t t = (it * window[0] + ot + shift[0]) % grid[0];
    const std::int64_t h = (ih * window[1] + oh + shift[1]) % grid[1];
    const std::int64_t x = (iw * window[2] + ow + shift[2]) % grid[2];
    return (t * grid[1] + h) * grid[2] + x;
  }

  //! The inverse of grid_token: the window row w N + offset (within a sample) holding grid token g.
  DR2NET_HD_INLINE std::int64_t window_row(std::int64_t g) const {
    const std::int64_t x = g % grid[2], h = (g / grid[2]) % grid[1], t = g / (grid[2] * grid[1]);
    // shifted position p = (g - s) mod r, in [0, r)
    const std::int64_t pt = (t - shift[0] + grid[0]) % grid[0];
    const std::int64_t ph = (h - shift[1] + grid[1]) % grid[1];
    const std::int64_t pw = (x - shift[2] + grid[2]) % grid[2];
    const std::int64_t w = ((pt / window[0]) * windows_along(1) + ph / window[1]) * windows_along(2) + pw / window[2];
    const std::int64_t o = ((pt % window[0]) * window[1] + ph % window[1]) * window[2] + pw % window[2];
    return w * window_tokens() + o;
  }

  //! Row of the bias table for query token i and key token j of one window (timm's
  //! relative_position_index[i, j]).
  DR2NET_HD_INLINE std::int64_t relative_index(std::int64_t i, std::int64_t j) const {
    const std::int64_t iw = i % window[2], ih = (i / window[2]) % window[1], it = i / (window[2] * window[1]);
    const std::int64_t jw = j % window[2], jh = (j / window[2]) % window[1], jt = j / (window[2] * window[1]);
    return ((it - jt + window[0] - 1) * (2 * window[1] - 1) + (ih - jh + window[1] - 1)) * (2 * window[2] - 1) +
           (iw - jw + window[2] - 1);
  }

  //! The mask region along axis a of shifted position p (0 on an unshifted axis).
  DR2NET_HD_INLINE std::int64_t region(int a, std::int64_t p) const {
    if (shift[a] == 0) return 0;
    return p < grid[a] - window[a] ? 0 : (p < grid[a] - shift[a] ? 1 : 2);
  }

  //! The region id (over all axes) of token `offset` of window `w`: tokens attend each other
  //! unmasked iff their ids are equal.
  DR2NET_HD_INLINE std::int64_t region_id(std::int64_t w, std::int64_t offset) const {
    const std::int64_t ow = offset % window[2], oh = (offset / window[2]) % window[1], ot = offset / (window[2] * window[1]);
    const std::int64_t iw = w % windows_along(2), ih = (w / windows_along(2)) % windows_along(1);
    const std::int64_t it = w / (windows_along(2) * windows_along(1));
    return (region(0, it * window[0] + ot) * 3 + region(1, ih * window[1] + oh)) * 3 + region(2, iw * window[2] + ow);
  }
};

//! Throws dr2net::Error unless `g` is a valid geometry (see WindowGeometry); `owner` names the
//! function in the message, which names the axis and its sizes.
inline void check_window_geometry(const WindowGeometry& g, std::string_view owner) {
  static constexpr const char* axis[3] = {"t", "h", "w"};
  for (int a = 0; a < 3; ++a) {
    DR2NET_CHECK(g.grid[a] > 0, owner, ": grid ", axis[a], " = ", g.grid[a], " must be positive");
    DR2NET_CHECK(g.window[a] > 0 && g.window[a] <= g.grid[a], owner, ": window ", axis[a], " = ", g.window[a],
                 " must lie in [1, grid ", axis[a], " = ", g.grid[a], "]");
    DR2NET_CHECK(g.grid[a] % g.window[a] == 0, owner, ": grid ", axis[a], " = ", g.grid[a],
                 " is not a multiple of window ", axis[a], " = ", g.window[a],
                 " (timm pads the map to a multiple; dr2net refuses)");
    DR2NET_CHECK(g.shift[a] >= 0 && g.shift[a] < g.window[a], owner, ": shift ", axis[a], " = ", g.shift[a],
                 " must lie in [0, window ", axis[a], " = ", g.window[a], ")");
  }
}

//! timm 0.9's rule for one axis of map size r and configured window w_cfg: the window is
//! min(w_cfg, r).
inline std::int64_t swin_axis_window(std::int64_t r, std::int64_t window_cfg) {
  return window_cfg < r ? window_cfg : r;
}

//! timm 0.9's rule for one axis: odd blocks shift by w_cfg // 2 where r > w_cfg, all else 0
//! (so a non-square map may shift along one axis only).
inline std::int64_t swin_axis_shift(std::int64_t r, std::int64_t window_cfg, int block_index) {
  return (block_index % 2 == 1 && r > window_cfg) ? window_cfg / 2 : 0;
}

//! The geometry of block `block_index` of a 3-D (Video Swin) stage on a grid (T, H, W) with
//! configured window (wt, wh, ww), e.g. (2, 7, 7) or (8, 7, 7): per axis the window shrinks
//! to the map and odd blocks shift by half the configured window where the map is larger.
//! Throws dr2net::Error naming the axis when a size is not positive, the block index is
//! negative, or a grid size is not a multiple of its window.
inline WindowGeometry swin_block_geometry(std::array<std::int64_t, 3> grid_thw, std::array<std::int64_t, 3> window_cfg,
                                          int block_index) {
  static constexpr const char* axis[3] = {"t", "h", "w"};
  DR2NET_CHECK(block_index >= 0, "swin_block_geometry: block index must not be negative, got ", block_index);
  WindowGeometry g;
  for (int a = 0; a < 3; ++a) {
    const auto i = static_cast<std::size_t>(a);
    DR2NET_CHECK(grid_thw[i] > 0, "swin_block_geometry: grid ", axis[a], " = ", grid_thw[i], " must be positive");
    DR2NET_CHECK(window_cfg[i] > 0, "swin_block_geometry: window ", axis[a], " = ", window_cfg[i],
                 " must be positive");
    g.grid[a] = grid_thw[i];
    g.window[a] = swin_axis_window(grid_thw[i], window_cfg[i]);
    g.shift[a] = swin_axis_shift(grid_thw[i], window_cfg[i], block_index);
  }
  check_window_geometry(g, "swin_block_geometry");
  return g;
}

//! The geometry of block `block_index` of a 2-D Swin stage on an H x W map with timm's square
//! window_size (T = 1, window t = 1). Same rule and errors as the 3-D overload.
inline WindowGeometry swin_block_geometry(std::array<std::int64_t, 2> grid_hw, std::int64_t window_cfg,
                                          int block_index) {
  return swin_block_geometry({1, grid_hw[0], grid_hw[1]}, {1, window_cfg, window_cfg}, block_index);
}

//! Moves token rows of C channels between grid order and window order (B samples):
//!   to_windows:  dst[row r] = src[grid token of r]  (cyclic shift by -shift, then partition)
//!   otherwise:   dst[grid token g] = src[window row of g]  (window reverse, then roll by +shift)
//! Both are gathers through a permutation (one writer per destination element, so any
//! parallel order gives the same result); the second is the first's inverse, which is also
//! its transpose: the backward of either is the other.
template <class T>
struct WindowTokens {
  T* dst;                   //!< B T H W C elements in the destination order
  const T* src;             //!< as many in the other order (never dst)
  WindowGeometry geometry;  //!< the layout
  std::int64_t batch;       //!< B
  std::int64_t channels;    //!< C
  bool to_windows;          //!< true: grid -> window rows; false: window rows -> grid

  //! The source row of destination row `row` (both counted over the whole batch).
  DR2NET_HD_INLINE std::int64_t source_row(std::int64_t row) const {
    const std::int64_t ng = geometry.grid_tokens(), b = row / ng, local = row % ng;
    if (to_windows) {
      const std::int64_t n = geometry.window_tokens();
      return b * ng + geometry.grid_token(local / n, local % n);
    }
    return b * ng + geometry.window_row(local);
  }
  //! Copies the element that lands at dst[i].
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    const auto k = static_cast<std::int64_t>(i);
    dst[i] = src[source_row(k / channels) * channels + k % channels];
  }
  //! Host only: dst[i] for i in [begin, end), exactly operator()(i)'s values, one index
  //! decomposition per row.
  void run_range(std::size_t begin, std::size_t end) const {
#if !defined(__CUDA_ARCH__)  // a host function: a device pass parses it, never compiles it
    auto i = static_cast<std::int64_t>(begin);
    const auto last = static_cast<std::int64_t>(end);
    while (i < last) {
      const std::int64_t row = i / channels, c = i % channels;
      const std::int64_t run = channels - c < last - i ? channels - c : last - i;
      const T* from = src + source_row(row) * channels + c;
      for (std::int64_t j = 0; j < run; ++j) dst[i + j] = from[j];
      i += run;
    }
#else
    (void)begin;
    (void)end;
#endif
  }
};

//! logits += bias + mask for attention logits laid out [B nW, heads, N, N]:
//!   l[(bw, h, i, j)] = (l + table[relative_index(i, j), h]) + (region_id(w, i) == region_id(w, j) ? 0 : -100)
//! with w = bw mod nW (timm adds the bias, then the mask, in that order; without a shift
//! there is no mask term). Arithmetic in accumulate_t<T>.
template <class T>
struct WindowLogitBias {
  T* logits;                //!< [B nW, heads, N, N], updated in place
  const T* table;           //!< relative position bias table [table_rows, heads]
  WindowGeometry geometry;  //!< the layout (its shift decides whether the mask applies)
  std::int64_t heads;       //!< attention heads

  //! The new value of logit (window w, head h, query i, key j); region_i is the query's
  //! region_id (unused without a shift).
  DR2NET_HD_INLINE T biased(T logit, std::int64_t w, std::int64_t h, std::int64_t i, std::int64_t j,
                            std::int64_t region_i) const {
    using A = accumulate_t<T>;
    A v = widen(logit) + widen(table[geometry.relative_index(i, j) * heads + h]);
    if (geometry.shifted() && region_i != geometry.region_id(w, j)) v += static_cast<A>(kWindowMaskValue);
    return narrow<T>(v);
  }
  //! Updates logits[idx].
  DR2NET_HD_INLINE void operator()(std::size_t idx) const {
    const auto k = static_cast<std::int64_t>(idx);
    const std::int64_t n = geometry.window_tokens();
    const std::int64_t j = k % n, i = (k / n) % n, h = (k / (n * n)) % heads;
    const std::int64_t w = (k / (n * n * heads)) % geometry.num_windows();
    logits[idx] = biased(logits[idx], w, h, i, j, geometry.shifted() ? geometry.region_id(w, i) : 0);
  }
  //! Host only: logits[i] for i in [begin, end), exactly operator()(i)'s values (the same
  //! table entry, mask term and additions), with the query and the window decomposed once per
  //! row of N logits and the key's coordinates stepped along the row (no division per element).
  void run_range(std::size_t begin, std::size_t end) const {
#if !defined(__CUDA_ARCH__)  // a host function: a device pass parses it, never compiles it
    using A = accumulate_t<T>;
    const WindowGeometry& g = geometry;
    const std::int64_t n = g.window_tokens(), nw = g.num_windows();
    const std::int64_t wt = g.window[0], wh = g.window[1], ww = g.window[2];
    const bool masked = g.shifted();
    auto k = static_cast<std::int64_t>(begin);
    const auto last = static_cast<std::int64_t>(end);
    while (k < last) {
      const std::int64_t j0 = k % n, row = k / n;
      const std::int64_t i = row % n, h = (row / n) % heads, w = (row / (n * heads)) % nw;
      const std::int64_t run = n - j0 < last - k ? n - j0 : last - k;
      // The query's offsets and the window's origin (shifted coordinates) per axis.
      const std::int64_t iw = i % ww, ih = (i / ww) % wh, it = i / (ww * wh);
      const std::int64_t xw = w % g.windows_along(2), xh = (w / g.windows_along(2)) % g.windows_along(1);
      const std::int64_t xt = w / (g.windows_along(2) * g.windows_along(1));
      const std::int64_t t0 = xt * wt, h0 = xh * wh, w0 = xw * ww;
      const std::int64_t region_i = masked ? g.region_id(w, i) : 0;
      // The key's offsets, stepped row-major from j0.
      std::int64_t jw = j0 % ww, jh = (j0 / ww) % wh, jt = j0 / (ww * wh);
      T* l = logits + k;
      for (std::int64_t t = 0; t < run; ++t) {
        const std::int64_t r =
            ((it - jt + wt - 1) * (2 * wh - 1) + (ih - jh + wh - 1)) * (2 * ww - 1) + (iw - jw + ww - 1);
        A v = widen(l[t]) + widen(table[r * heads + h]);
        if (masked) {
          const std::int64_t region_j = (g.region(0, t0 + jt) * 3 + g.region(1, h0 + jh)) * 3 + g.region(2, w0 + jw);
          if (region_i != region_j) v += static_cast<A>(kWindowMaskValue);
        }
        l[t] = narrow<T>(v);
        if (++jw == ww) {
          jw = 0;
          if (++jh == wh) {
            jh = 0;
            ++jt;
          }
        }
      }
      k += run;
    }
#else
    (void)begin;
    (void)end;
#endif
  }
};

//! grad[r, h] += sum of dsum[h, i, j] over the pairs (i, j) with relative_index(i, j) == r:
//! the bias table's gradient, given dsum [heads, N, N] = the logits' gradient summed over the
//! B nW windows. One index per table element; each sums its pairs in a fixed order (query
//! t, h, w ascending) in accumulate_t<T>, so the result is deterministic on every backend.
template <class T>
struct RelativeBiasGradient {
  T* grad;                  //!< the table's gradient [table_rows, heads], accumulated into
  const T* dsum;            //!< [heads, N, N]
  WindowGeometry geometry;  //!< the window sizes
  std::int64_t heads;       //!< attention heads
  //! Adds the share of table element e = r heads + h.
  DR2NET_HD_INLINE void operator()(std::size_t e) const {
    using A = accumulate_t<T>;
    const auto k = static_cast<std::int64_t>(e);
    const std::int64_t h = k % heads, r = k / heads;
    const std::int64_t wt = geometry.window[0], wh = geometry.window[1], ww = geometry.window[2];
    const std::int64_t n = wt * wh * ww;
    // r = ((dt + wt - 1)(2wh - 1) + dh + wh - 1)(2ww - 1) + dw + ww - 1, d = query - key.
    const std::int64_t dw = r % (2 * ww - 1) - (ww - 1);
    const std::int64_t dh = (r / (2 * ww - 1)) % (2 * wh - 1) - (wh - 1);
    const std::int64_t dt = r / ((2 * ww - 1) * (2 * wh - 1)) - (wt - 1);
    const T* base = dsum + h * n * n;
    A sum = A(0);
    for (std::int64_t at = dt > 0 ? dt : 0; at < (dt < 0 ? wt + dt : wt); ++at)
      for (std::int64_t ah = dh > 0 ? dh : 0; ah < (dh < 0 ? wh + dh : wh); ++ah)
        for (std::int64_t aw = dw > 0 ? dw : 0; aw < (dw < 0 ? ww + dw : ww); ++aw) {
          const std::int64_t i = (at * wh + ah) * ww + aw;
          const std::int64_t j = ((at - dt) * wh + (ah - dh)) * ww + (aw - dw);
          sum += widen(base[i * n + j]);
        }
    grad[e] = narrow<T>(widen(grad[e]) + sum);
  }
};

}  // namespace dr2net
