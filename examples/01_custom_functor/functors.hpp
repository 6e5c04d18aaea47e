#pragma once
// Two residual functions written by a user, not by dr2net: everything the library needs
// from them is the ResidualFunction concept (see dr2net/block/residual_function.hpp).

#include <cmath>
#include <cstdint>
#include <random>
#include <string_view>
#include <vector>

#include <dr2net/dr2net.hpp>

namespace example {

using dr2net::ConstView;
using dr2net::Shape;
using dr2net::TensorView;

// F(x) = W2 tanh(W1 x + b1) for each token row x in R^D; W1 [H, D], W2 [D, H].
class TinyMlp {
 public:
  using value_type = double;

  TinyMlp(std::int64_t dim, std::int64_t hidden, std::mt19937_64& rng)
      : d_(dim), h_(hidden), w1_(size(h_ * d_)), b1_(size(h_)), w2_(size(d_ * h_)),
        gw1_(w1_.size()), gb1_(b1_.size()), gw2_(w2_.size()) {
    std::normal_distribution<double> n(0.0, 1.0);
    for (auto& w : w1_) w = n(rng) / std::sqrt(double(d_));
    for (auto& w : w2_) w = 0.5 * n(rng) / std::sqrt(double(h_));
  }

  // Saved for backward: the hidden activations t = tanh(W1 x + b1), one row of H per token.
  std::size_t saved_elements(const Shape& in) const {
    DR2NET_CHECK(in.last() == d_, "TinyMlp expects width ", d_, ", got ", in.last());
    return size(in.rows() * h_);
  }

  template <class Call>
  void forward(const Call& call, ConstView<double> in, TensorView<double> out, TensorView<double> scratch) {
    recompute(call, in, out, scratch);  // nothing cheaper to do without saving
  }

  template <class Call>
  void recompute(const Call&, ConstView<double> in, TensorView<double> out, TensorView<double> saved) {
    for (std::int64_t r = 0; r < in.shape().rows(); ++r) {
      const double* x = in.data() + r * d_;
      double* t = saved.data() + r * h_;
      for (std::int64_t j = 0; j < h_; ++j) {
        double a = b1_[size(j)];
        for (std::int64_t k = 0; k < d_; ++k) a += w1_[size(j * d_ + k)] * x[k];
        t[j] = std::tanh(a);
      }
      for (std::int64_t i = 0; i < d_; ++i) {
        double y = 0;
        for (std::int64_t j = 0; j < h_; ++j) y += w2_[size(i * h_ + j)] * t[j];
        out.data()[r * d_ + i] = y;
      }
    }
  }

  // Accumulates: grad_in += J^T g, parameter gradients += their share.
  template <class Call>
  void backward(const Call&, ConstView<double> in, ConstView<double> saved, ConstView<double> g,
                TensorView<double> grad_in) {
    std::vector<double> gt(size(h_));
    for (std::int64_t r = 0; r < in.shape().rows(); ++r) {
      const double* x = in.data() + r * d_;
      const double* t = saved.data() + r * h_;
      const double* gr = g.data() + r * d_;
      for (std::int64_t j = 0; j < h_; ++j) {
        double s = 0;
        for (std::int64_t i = 0; i < d_; ++i) {
          s += w2_[size(i * h_ + j)] * gr[i];
          gw2_[size(i * h_ + j)] += gr[i] * t[j];
        }
        gt[size(j)] = s * (1 - t[j] * t[j]);  // through tanh
        gb1_[size(j)] += gt[size(j)];
      }
      for (std::int64_t j = 0; j < h_; ++j)
        for (std::int64_t k = 0; k < d_; ++k) {
          grad_in.data()[r * d_ + k] += w1_[size(j * d_ + k)] * gt[size(j)];
          gw1_[size(j * d_ + k)] += gt[size(j)] * x[k];
        }
    }
  }

  template <class V>
  void for_each_parameter(V&& visit) {
    visit("w1", TensorView<double>(w1_.data(), Shape{h_, d_}), TensorView<double>(gw1_.data(), Shape{h_, d_}));
    visit("b1", TensorView<double>(b1_.data(), Shape{h_}), TensorView<double>(gb1_.data(), Shape{h_}));
    visit("w2", TensorView<double>(w2_.data(), Shape{d_, h_}), TensorView<double>(gw2_.data(), Shape{d_, h_}));
  }

 private:
  static std::size_t size(std::int64_t n) { return static_cast<std::size_t>(n); }
  std::int64_t d_, h_;
  std::vector<double> w1_, b1_, w2_, gw1_, gb1_, gw2_;
};

// G(x) = s * x * sigmoid(x) (a learned per-channel SiLU), elementwise; it saves nothing
// because its backward can recompute sigmoid from the input it is handed.
class ChannelSilu {
 public:
  using value_type = double;
  static constexpr std::string_view parameter_prefix = "silu";

  explicit ChannelSilu(std::int64_t dim) : d_(dim), s_(static_cast<std::size_t>(dim), 0.1), gs_(s_.size()) {}

  std::size_t saved_elements(const Shape& in) const {
    DR2NET_CHECK(in.last() == d_, "ChannelSilu expects width ", d_, ", got ", in.last());
    return 0;
  }
  template <class Call>
  void forward(const Call&, ConstView<double> in, TensorView<double> out, TensorView<double>) {
    for (std::size_t i = 0; i < in.size(); ++i) out.data()[i] = s_[i % s_.size()] * in.data()[i] * sigmoid(in.data()[i]);
  }
  template <class Call>
  void recompute(const Call& call, ConstView<double> in, TensorView<double> out, TensorView<double> saved) {
    forward(call, in, out, saved);
  }
  template <class Call>
  void backward(const Call&, ConstView<double> in, ConstView<double>, ConstView<double> g, TensorView<double> grad_in) {
    for (std::size_t i = 0; i < in.size(); ++i) {
      const double x = in.data()[i], sg = sigmoid(x), c = s_[i % s_.size()];
      grad_in.data()[i] += g.data()[i] * c * (sg + x * sg * (1 - sg));
      gs_[i % s_.size()] += g.data()[i] * x * sg;
    }
  }
  template <class V>
  void for_each_parameter(V&& visit) {
    visit("scale", TensorView<double>(s_.data(), Shape{d_}), TensorView<double>(gs_.data(), Shape{d_}));
  }

 private:
  static double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }
  std::int64_t d_;
  std::vector<double> s_, gs_;
};

}  // namespace example
