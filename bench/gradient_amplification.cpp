// How much more than the streams' reconstruction error the gradients err, per residual
// function: error-bounded mode bounds the first (ErrorBoundOptions::stream_tolerance), users
// care about the second. A 12-layer stack whose F and G are a user-style saturating tanh layer
// (tests/support/test_functors.hpp), at (alpha, beta) = (1, 0.5), fp32, for a few weight scales
// and seeds: per step, error-bounded mode's measured stream error, its gradient error against
// fp32 standard mode, their ratio; and per model, fp32 standard and exact (FixedFp32) gradient
// error against fp64 standard mode.
//
//   gradient_amplification [--steps K]

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "support/test_functors.hpp"

#include "cli.hpp"

namespace {

using namespace dr2net;
using dr2net::testing::TanhLinear;

template <class P>
using Block = ReversibleDualResidual<TanhLinear<typename P::compute_type>, TanhLinear<typename P::compute_type>,
                                     ConstantSchedule, P>;

template <class P>
std::vector<Block<P>> layers(std::uint64_t seed, double scale) {
  std::mt19937_64 r(seed);
  std::vector<Block<P>> v;
  using T = typename P::compute_type;
  for (int l = 0; l < 12; ++l) v.emplace_back(TanhLinear<T>(16, r, scale), TanhLinear<T>(16, r, scale));
  return v;
}

using Grads = std::vector<std::vector<double>>;

template <class Stack, class V>
Grads step(Stack& s, const Shape& shape, const std::vector<V>& h0, const std::vector<V>& dout, std::int64_t k) {
  std::vector<V> out(h0.size()), dh(h0.size());
  s.zero_grad();
  s.forward(ConstView<V>(h0.data(), shape), TensorView<V>(out.data(), shape), k);
  s.backward(ConstView<V>(dout.data(), shape), TensorView<V>(dh.data(), shape));
  Grads g;
  for (auto& p : s.parameters()) g.emplace_back(p.grad.data(), p.grad.data() + p.grad.size());
  return g;
}

//! Worst relative L2 error over the parameter tensors.
double error(const Grads& got, const Grads& want) {
  double worst = 0;
  for (std::size_t k = 0; k < got.size(); ++k) {
    double num = 0, den = 0;
    for (std::size_t i = 0; i < got[k].size(); ++i) {
      num += (got[k][i] - want[k][i]) * (got[k][i] - want[k][i]);
      den += want[k][i] * want[k][i];
    }
    worst = std::max(worst, den > 0 ? std::sqrt(num / den) : std::sqrt(num));
  }
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 4;
  CLI::App app("How much error-bounded mode's gradient error exceeds the stream error it bounds.",
               "dr2net_bench_gradient_amplification");
  dr2net_cli::add_integer(app, "--steps", steps, 1, 1 << 20, "error-bounded steps per model");
  if (const auto status = dr2net_cli::parse(app, argc, argv)) return *status;
  std::printf("| weight scale | seed | step | snapshots | stream error (EB) | gradient error (EB vs fp32 standard) | ratio |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  std::vector<std::string> models;
  for (double scale : {1.0, 1.5}) {
    for (std::uint64_t seed : {1ull, 2ull, 3ull}) {
      std::mt19937_64 rng(seed + 100);
      const Shape shape{2, 8, 16};
      const auto n = static_cast<std::size_t>(shape.numel());
      const auto h0 = dr2net::testing::random_vector<float>(n, rng, -2, 2);
      const auto dout = dr2net::testing::random_vector<float>(n, rng);
      const std::vector<double> h0d(h0.begin(), h0.end()), doutd(dout.begin(), dout.end());
      HostContext ctx;
      const ConstantSchedule at(1.0, 0.5);
      ReversibleStack<Block<Fp64>> ref(ctx, layers<Fp64>(seed, scale), at, {.mode = BackpropMode::Standard});
      ReversibleStack<Block<Fp32>> standard(ctx, layers<Fp32>(seed, scale), at, {.mode = BackpropMode::Standard});
      ReversibleStack<Block<Fp32>> bounded(ctx, layers<Fp32>(seed, scale), at,
                                           {.mode = BackpropMode::ErrorBounded,
                                            .guard = {.action = GuardAction::Warn, .warn = [](std::string_view) {}}});
      ReversibleStack<Block<FixedFp32>> exact(ctx, layers<FixedFp32>(seed, scale), at);
      const Grads g64 = step(ref, shape, h0d, doutd, 0), g32 = step(standard, shape, h0, dout, 0);
      const Grads gx = step(exact, shape, h0, dout, 0);
      for (int k = 0; k < steps; ++k) {
        const Grads ge = step(bounded, shape, h0, dout, k);
        const double stream = bounded.reconstruction().worst_relative_error(), grad = error(ge, g32);
        std::printf("| %.1f | %llu | %d | %d | %.2e | %.2e | %.0f |\n", scale, static_cast<unsigned long long>(seed), k,
                    bounded.reconstruction().snapshots, stream, grad, grad / stream);
      }
      char line[200];
      std::snprintf(line, sizeof line, "| %.1f | %llu | %.2e | %.2e |", scale, static_cast<unsigned long long>(seed),
                    error(g32, g64), error(gx, g64));
      models.emplace_back(line);
    }
  }
  std::printf("\n| weight scale | seed | fp32 standard vs fp64 standard | exact FixedFp32 vs fp64 standard |\n|---|---|---|---|\n");
  for (const auto& m : models) std::printf("%s\n", m.c_str());
  return 0;
}
