#pragma once
// Residual functions written the way a user would, for the block and stack tests.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "dr2net/dr2net.hpp"

namespace dr2net::testing {

//! F(x) = tanh(x W^T + b) row by row; W [D, D], b [D]. Saves tanh's output.
template <class T>
class TanhLinear {
 public:
  using value_type = T;

  TanhLinear(std::int64_t width, std::mt19937_64& rng, double scale = 0.5)
      : d_(width), w_(static_cast<std::size_t>(width * width)), b_(static_cast<std::size_t>(width)),
        gw_(w_.size(), T(0)), gb_(b_.size(), T(0)) {
    std::normal_distribution<double> n(0.0, scale / std::sqrt(static_cast<double>(width)));
    for (auto& v : w_) v = static_cast<T>(n(rng));
    for (auto& v : b_) v = static_cast<T>(0.2 * n(rng));
  }

  std::size_t saved_elements(const Shape& s) const {
    DR2NET_CHECK(s.last() == d_, "TanhLinear: input width ", s.last(), " does not match its weight width ", d_);
    return static_cast<std::size_t>(s.numel());
  }
  template <class Call>
  void forward(const Call& call, ConstView<T> in, TensorView<T> out, TensorView<T> scratch) {
    recompute(call, in, out, scratch);
  }
  template <class Call>
  void recompute(const Call&, ConstView<T> in, TensorView<T> out, TensorView<T> saved) {
    const std::int64_t rows = in.shape().rows();
    const T* x = in.data();
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t j = 0; j < d_; ++j) {
        T acc = b_[static_cast<std::size_t>(j)];
        for (std::int64_t k = 0; k < d_; ++k) acc += x[r * d_ + k] * w_[static_cast<std::size_t>(j * d_ + k)];
        const T t = std::tanh(acc);
        out.data()[r * d_ + j] = t;
        saved.data()[r * d_ + j] = t;
      }
  }
  template <class Call>
  void backward(const Call&, ConstView<T> in, ConstView<T> saved, ConstView<T> gout, TensorView<T> gin) {
    const std::int64_t rows = in.shape().rows();
    std::vector<T> gp(static_cast<std::size_t>(d_));
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t j = 0; j < d_; ++j) {
        const T t = saved.data()[r * d_ + j];
        gp[static_cast<std::size_t>(j)] = gout.data()[r * d_ + j] * (T(1) - t * t);
        gb_[static_cast<std::size_t>(j)] += gp[static_cast<std::size_t>(j)];
      }
      for (std::int64_t j = 0; j < d_; ++j)
        for (std::int64_t k = 0; k < d_; ++k) {
          gin.data()[r * d_ + k] += gp[static_cast<std::size_t>(j)] * w_[static_cast<std::size_t>(j * d_ + k)];
          gw_[static_cast<std::size_t>(j * d_ + k)] += gp[static_cast<std::size_t>(j)] * in.data()[r * d_ + k];
        }
    }
  }
  template <class V>
  void for_each_parameter(V&& visit) {
    visit("weight", TensorView<T>(w_.data(), Shape{d_, d_}), TensorView<T>(gw_.data(), Shape{d_, d_}));
    visit("bias", TensorView<T>(b_.data(), Shape{d_}), TensorView<T>(gb_.data(), Shape{d_}));
  }

 private:
  std::int64_t d_;
  std::vector<T> w_, b_, gw_, gb_;
};

//! G(x)_j = a_j sin(x_j + c_j): elementwise, needs no saved internals (scratch size 0).
template <class T>
class SineGate {
 public:
  using value_type = T;
  static constexpr std::string_view parameter_prefix = "gate";

  SineGate(std::int64_t width, std::mt19937_64& rng)
      : d_(width), a_(static_cast<std::size_t>(width)), c_(a_.size()), ga_(a_.size(), T(0)), gc_(a_.size(), T(0)) {
    std::uniform_real_distribution<double> u(-0.6, 0.6);
    for (auto& v : a_) v = static_cast<T>(u(rng));
    for (auto& v : c_) v = static_cast<T>(u(rng));
  }

  std::size_t saved_elements(const Shape& s) const {
    DR2NET_CHECK(s.last() == d_, "SineGate: input width ", s.last(), " does not match its width ", d_);
    return 0;
  }
  template <class Call>
  void forward(const Call&, ConstView<T> in, TensorView<T> out, TensorView<T>) {
    for (std::size_t i = 0; i < in.size(); ++i) {
      const auto j = i % static_cast<std::size_t>(d_);
      out.data()[i] = a_[j] * std::sin(in.data()[i] + c_[j]);
    }
  }
  template <class Call>
  void recompute(const Call& call, ConstView<T> in, TensorView<T> out, TensorView<T> saved) {
    forward(call, in, out, saved);
  }
  template <class Call>
  void backward(const Call&, ConstView<T> in, ConstView<T>, ConstView<T> gout, TensorView<T> gin) {
    for (std::size_t i = 0; i < in.size(); ++i) {
      const auto j = i % static_cast<std::size_t>(d_);
      const T g = gout.data()[i];
      const T cs = std::cos(in.data()[i] + c_[j]);
      gin.data()[i] += g * a_[j] * cs;
      ga_[j] += g * std::sin(in.data()[i] + c_[j]);
      gc_[j] += g * a_[j] * cs;
    }
  }
  template <class V>
  void for_each_parameter(V&& visit) {
    visit("amplitude", TensorView<T>(a_.data(), Shape{d_}), TensorView<T>(ga_.data(), Shape{d_}));
    visit("phase", TensorView<T>(c_.data(), Shape{d_}), TensorView<T>(gc_.data(), Shape{d_}));
  }

 private:
  std::int64_t d_;
  std::vector<T> a_, c_, ga_, gc_;
};

//! Fresh random values in [-1, 1].
template <class T>
std::vector<T> random_vector(std::size_t n, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(u(rng));
  return v;
}

//! A generator seeded from std::random_device; the seed goes into Catch's log on failure.
//! DR2NET_TEST_SEED=<seed> in the environment replays a logged seed.
inline std::mt19937_64 fresh_rng(std::uint64_t& seed_out) {
  if (const char* s = std::getenv("DR2NET_TEST_SEED"); s != nullptr && *s != '\0')
    seed_out = std::strtoull(s, nullptr, 10);
  else
    seed_out = (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  return std::mt19937_64(seed_out);
}

}  // namespace dr2net::testing
