// What the README's quick start leaves to the reader: two residual functions, a way to load
// the layers, the batch and the loss. Declared just enough for the snippet to
// compile as written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string_view>
#include <vector>

#include <dr2net/dr2net.hpp>

namespace dr2net_snippet_uses::readme {

//! F(x) = w * x (elementwise), computing in float; saves nothing.
struct ScaleFunction {
  using value_type = float;
  float w = 0.5f, gw = 0.0f;
  std::size_t saved_elements(const dr2net::Shape&) const { return 0; }
  template <class Call>
  void forward(const Call&, dr2net::ConstView<float> in, dr2net::TensorView<float> out, dr2net::TensorView<float>) {
    for (std::size_t i = 0; i < in.size(); ++i) out.data()[i] = w * in.data()[i];
  }
  template <class Call>
  void recompute(const Call& call, dr2net::ConstView<float> in, dr2net::TensorView<float> out,
                 dr2net::TensorView<float> saved) {
    forward(call, in, out, saved);
  }
  template <class Call>
  void backward(const Call&, dr2net::ConstView<float> in, dr2net::ConstView<float>, dr2net::ConstView<float> grad_out,
                dr2net::TensorView<float> grad_in) {
    for (std::size_t i = 0; i < in.size(); ++i) {
      grad_in.data()[i] += w * grad_out.data()[i];
      gw += in.data()[i] * grad_out.data()[i];
    }
  }
  template <class V>
  void for_each_parameter(V&& visit) {
    visit("w", dr2net::TensorView<float>(&w, dr2net::Shape{1}), dr2net::TensorView<float>(&gw, dr2net::Shape{1}));
  }
};
struct MyAttention : ScaleFunction {};
struct MyMlp : ScaleFunction {};

//! Converts to the std::vector of whatever layer type the snippet defines.
struct LoadedLayers {
  template <class Layer>
  operator std::vector<Layer>() const {
    return std::vector<Layer>(2, Layer(MyAttention{}, MyMlp{}));
  }
};
inline LoadedLayers load_my_layers() { return {}; }

inline constexpr std::int64_t batch = 2, tokens = 3, dim = 4, steps = 2;
inline void embed_my_batch(std::vector<float>& h0) {
  for (std::size_t i = 0; i < h0.size(); ++i) h0[i] = 0.01f * static_cast<float>(i);
}
inline void compute_loss_gradient(const std::vector<float>& out, std::vector<float>& dout) { dout = out; }

}  // namespace dr2net_snippet_uses::readme
