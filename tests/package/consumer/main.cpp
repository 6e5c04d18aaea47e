// Builds a small Dr²Net stack with a consumer-defined residual function and checks that
// reversible and standard backprop agree: proof that the package is complete and usable.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <dr2net/backend/host/gemm.hpp>
#include <dr2net/dr2net.hpp>

struct Cubic {  // F(x) = w * x^3 / 3, elementwise
  using value_type = double;
  double w = 0.4, gw = 0;
  std::size_t saved_elements(const dr2net::Shape&) const { return 0; }
  template <class Call>
  void forward(const Call&, dr2net::ConstView<double> in, dr2net::TensorView<double> out, dr2net::TensorView<double>) {
    for (std::size_t i = 0; i < in.size(); ++i) out.data()[i] = w * in.data()[i] * in.data()[i] * in.data()[i] / 3;
  }
  template <class Call>
  void recompute(const Call& c, dr2net::ConstView<double> in, dr2net::TensorView<double> out, dr2net::TensorView<double> s) {
    forward(c, in, out, s);
  }
  template <class Call>
  void backward(const Call&, dr2net::ConstView<double> in, dr2net::ConstView<double>, dr2net::ConstView<double> g,
                dr2net::TensorView<double> gin) {
    for (std::size_t i = 0; i < in.size(); ++i) {
      const double x = in.data()[i];
      gin.data()[i] += g.data()[i] * w * x * x;
      gw += g.data()[i] * x * x * x / 3;
    }
  }
  template <class V>
  void for_each_parameter(V&& visit) {
    visit("w", dr2net::TensorView<double>(&w, dr2net::Shape{1}), dr2net::TensorView<double>(&gw, dr2net::Shape{1}));
  }
};

int main() {
  using Layer = dr2net::ReversibleDualResidual<Cubic, Cubic, dr2net::ConstantSchedule, dr2net::Fp64>;
  dr2net::HostContext ctx;
  dr2net::ReversibleStack<Layer> stack(ctx, std::vector<Layer>(3, Layer(Cubic{}, Cubic{})), dr2net::ConstantSchedule(0.5, 0.5));
  const dr2net::Shape shape{2, 3};
  std::vector<double> h0{0.1, -0.4, 0.7, 0.2, -0.9, 0.5}, out(6), dh[2] = {std::vector<double>(6), std::vector<double>(6)};
  for (int m = 0; m < 2; ++m) {
    stack.set_mode(m ? dr2net::BackpropMode::Standard : dr2net::BackpropMode::Reversible);
    stack.forward(dr2net::ConstView<double>(h0.data(), shape), dr2net::TensorView<double>(out.data(), shape), 0);
    stack.backward(dr2net::ConstView<double>(out.data(), shape), dr2net::TensorView<double>(dh[m].data(), shape));
  }
  for (std::size_t i = 0; i < 6; ++i)
    if (std::abs(dh[0][i] - dh[1][i]) > 1e-12) {
      std::printf("consumer: reversible and standard gradients differ at %zu\n", i);
      return 1;
    }
  // The host GEMM, CBLAS or blocked loops as this consumer configured it, against a plain loop.
  const double a[6] = {0.5, -1.0, 2.0, 0.25, 3.0, -0.75}, b[6] = {1.5, -2.0, 0.5, 4.0, -1.0, 0.125};
  double c[4], ref[4] = {0, 0, 0, 0};
  dr2net::host_gemm(dr2net::Transpose::No, dr2net::Transpose::No, 2, 2, 3, 1.0, a, 3, b, 2, 0.0, c, 2);
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      for (int l = 0; l < 3; ++l) ref[i * 2 + j] += a[i * 3 + l] * b[l * 2 + j];
  for (int i = 0; i < 4; ++i)
    if (std::abs(c[i] - ref[i]) > 1e-12) {
      std::printf("consumer: host_gemm (%s) differs from the loop at %d\n", std::string(dr2net::host_gemm_backend()).c_str(), i);
      return 1;
    }
  std::printf("consumer: dr2net %d.%d.%d works (host GEMM: %s)\n", DR2NET_VERSION_MAJOR, DR2NET_VERSION_MINOR,
              DR2NET_VERSION_PATCH, std::string(dr2net::host_gemm_backend()).c_str());
  return 0;
}
