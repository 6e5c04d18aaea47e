#pragma once
// A labelled heatmap written as an RGB PNG: zlib does the deflate and the CRCs, a 5x7 bitmap
// font draws the numbers. Enough for the error-landscape picture, nothing more general.

#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "dr2net/core/error.hpp"

namespace dr2net::tools {

class Image {
 public:
  Image(int w, int h) : w_(w), h_(h), px_(static_cast<std::size_t>(w * h * 3), 255) {}
  int width() const { return w_; }
  int height() const { return h_; }

  void fill_rect(int x0, int y0, int w, int h, std::array<std::uint8_t, 3> c) {
    for (int y = std::max(0, y0); y < std::min(h_, y0 + h); ++y)
      for (int x = std::max(0, x0); x < std::min(w_, x0 + w); ++x)
        for (int k = 0; k < 3; ++k) px_[static_cast<std::size_t>((y * w_ + x) * 3 + k)] = c[static_cast<std::size_t>(k)];
  }

  //! Draws `text` (digits, '.', '-', '+', 'e', ' ', and a few letters) with its top-left at (x, y).
  void text(int x, int y, const std::string& text, int scale, std::array<std::uint8_t, 3> c) {
    for (char ch : text) {
      const auto& g = glyph(ch);
      for (int row = 0; row < 7; ++row)
        for (int col = 0; col < 5; ++col)
          if (g[static_cast<std::size_t>(row)] & (1 << (4 - col))) fill_rect(x + col * scale, y + row * scale, scale, scale, c);
      x += 6 * scale;
    }
  }
  static int text_width(const std::string& text, int scale) { return static_cast<int>(text.size()) * 6 * scale; }

  void write_png(const std::string& path) const {
    std::vector<std::uint8_t> raw;
    raw.reserve(static_cast<std::size_t>((w_ * 3 + 1) * h_));
    for (int y = 0; y < h_; ++y) {
      raw.push_back(0);  // filter: none
      raw.insert(raw.end(), px_.begin() + y * w_ * 3, px_.begin() + (y + 1) * w_ * 3);
    }
    uLongf size = compressBound(static_cast<uLong>(raw.size()));
    std::vector<std::uint8_t> z(size);
    DR2NET_CHECK(compress2(z.data(), &size, raw.data(), static_cast<uLong>(raw.size()), 9) == Z_OK,
                 "zlib failed to compress the picture");
    z.resize(size);

    std::vector<std::uint8_t> out{0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    std::vector<std::uint8_t> ihdr;
    put32(ihdr, static_cast<std::uint32_t>(w_));
    put32(ihdr, static_cast<std::uint32_t>(h_));
    ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8-bit RGB, deflate, no filter, no interlace
    chunk(out, "IHDR", ihdr);
    chunk(out, "IDAT", z);
    chunk(out, "IEND", {});
    std::ofstream f(path, std::ios::binary);
    DR2NET_CHECK(f.good(), "cannot write '", path, "': ", std::strerror(errno));
    f.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size()));
    f.close();  // a full disk shows only when the buffer is flushed
    DR2NET_CHECK(!f.fail(), "error writing '", path, "': ", std::strerror(errno));
  }

 private:
  static void put32(std::vector<std::uint8_t>& v, std::uint32_t x) {
    for (int s = 24; s >= 0; s -= 8) v.push_back(static_cast<std::uint8_t>(x >> s));
  }
  static void chunk(std::vector<std::uint8_t>& out, const char* type, const std::vector<std::uint8_t>& data) {
    put32(out, static_cast<std::uint32_t>(data.size()));
    const std::size_t start = out.size();
    out.insert(out.end(), type, type + 4);
    out.insert(out.end(), data.begin(), data.end());
    const auto crc = crc32(0L, out.data() + start, static_cast<uInt>(out.size() - start));
    put32(out, static_cast<std::uint32_t>(crc));
  }
  static const std::array<std::uint8_t, 7>& glyph(char c) {
    static const std::array<std::uint8_t, 7> digits[10] = {
        {14, 17, 19, 21, 25, 17, 14}, {4, 12, 4, 4, 4, 4, 14},     {14, 17, 1, 2, 4, 8, 31},
        {31, 2, 4, 2, 1, 17, 14},     {2, 6, 10, 18, 31, 2, 2},    {31, 16, 30, 1, 1, 17, 14},
        {6, 8, 16, 30, 17, 17, 14},   {31, 1, 2, 4, 8, 8, 8},      {14, 17, 17, 14, 17, 17, 14},
        {14, 17, 17, 15, 1, 2, 12}};
    static const std::array<std::uint8_t, 7> dot{0, 0, 0, 0, 0, 12, 12}, minus{0, 0, 0, 31, 0, 0, 0},
        plus{0, 4, 4, 31, 4, 4, 0}, e{0, 0, 14, 17, 31, 16, 14}, space{0, 0, 0, 0, 0, 0, 0},
        a{0, 0, 14, 1, 15, 17, 15}, b{16, 16, 22, 25, 17, 17, 30}, l{12, 4, 4, 4, 4, 4, 14},
        p{0, 0, 30, 17, 30, 16, 16}, h{16, 16, 22, 25, 17, 17, 17}, t{8, 8, 28, 8, 8, 9, 6},
        o{0, 0, 14, 17, 17, 17, 14}, g{0, 0, 15, 17, 15, 1, 14}, r{0, 0, 22, 25, 16, 16, 16},
        equals{0, 0, 31, 0, 31, 0, 0}, unknown{31, 17, 17, 17, 17, 17, 31};
    if (c >= '0' && c <= '9') return digits[c - '0'];
    switch (c) {
      case '.': return dot;
      case '-': return minus;
      case '+': return plus;
      case 'e': return e;
      case ' ': return space;
      case 'a': return a;
      case 'b': return b;
      case 'l': return l;
      case 'p': return p;
      case 'h': return h;
      case 't': return t;
      case 'o': return o;
      case 'g': return g;
      case 'r': return r;
      case '=': return equals;
      default: return unknown;
    }
  }

  int w_, h_;
  std::vector<std::uint8_t> px_;
};

//! A perceptually ordered colour ramp (dark blue -> green -> yellow) for t in [0, 1].
inline std::array<std::uint8_t, 3> ramp(double t) {
  static const double stops[5][3] = {{68, 1, 84}, {59, 82, 139}, {33, 145, 140}, {94, 201, 98}, {253, 231, 37}};
  t = std::clamp(t, 0.0, 1.0) * 4.0;
  const int i = std::min(3, static_cast<int>(t));
  const double f = t - i;
  std::array<std::uint8_t, 3> c{};
  for (int k = 0; k < 3; ++k) c[static_cast<std::size_t>(k)] = static_cast<std::uint8_t>(stops[i][k] + f * (stops[i + 1][k] - stops[i][k]));
  return c;
}

//! Heatmap of log10(values[a][b]) over rows `alphas` (top to bottom) and columns `betas`,
//! each cell printed with its log10; NaN cells are grey. Colour scale from lo to hi.
inline void write_heatmap(const std::string& path, const std::vector<double>& alphas, const std::vector<double>& betas,
                          const std::vector<std::vector<double>>& values, double lo, double hi) {
  const int cell = 64, left = 80, top = 40, scale = 2;
  Image img(left + cell * static_cast<int>(betas.size()) + 20, top + cell * static_cast<int>(alphas.size()) + 70);
  const std::array<std::uint8_t, 3> black{0, 0, 0}, white{255, 255, 255}, grey{160, 160, 160};
  img.text(4, 8, "log10 rel err", scale, black);
  for (std::size_t i = 0; i < alphas.size(); ++i) {
    for (std::size_t j = 0; j < betas.size(); ++j) {
      const double v = values[i][j];
      const int x = left + static_cast<int>(j) * cell, y = top + static_cast<int>(i) * cell;
      char label[16];
      if (std::isfinite(v) && v > 0) {
        const double l10 = std::log10(v);
        const double tt = (l10 - std::log10(lo)) / (std::log10(hi) - std::log10(lo));
        img.fill_rect(x, y, cell - 2, cell - 2, ramp(tt));
        std::snprintf(label, sizeof label, "%.1f", l10);
        img.text(x + (cell - Image::text_width(label, scale)) / 2, y + cell / 2 - 7, label, scale, tt > 0.6 ? black : white);
      } else {
        img.fill_rect(x, y, cell - 2, cell - 2, grey);
        img.text(x + (cell - Image::text_width(v == 0 ? "0" : "-", scale)) / 2, y + cell / 2 - 7, v == 0 ? "0" : "-", scale, black);
      }
    }
    char a[16];
    std::snprintf(a, sizeof a, "%.2f", alphas[i]);
    img.text(left - Image::text_width(a, scale) - 6, top + static_cast<int>(i) * cell + cell / 2 - 7, a, scale, black);
  }
  for (std::size_t j = 0; j < betas.size(); ++j) {
    char b[16];
    std::snprintf(b, sizeof b, "%.2f", betas[j]);
    img.text(left + static_cast<int>(j) * cell + (cell - Image::text_width(b, scale)) / 2,
             top + static_cast<int>(alphas.size()) * cell + 6, b, scale, black);
  }
  const int by = top + static_cast<int>(alphas.size()) * cell + 30;
  img.text(4, by, "alpha", scale, black);
  img.text(left + 4, by + 18, "beta", scale, black);
  img.text(left - Image::text_width("alpha", scale) - 6, top - 18, "", scale, black);
  img.write_png(path);
}

}  // namespace dr2net::tools
