// A whole ReversibleStack on the device (device twins of the host test functions) against
// the same stack on the host: outputs, input gradients and parameter gradients, reversible
// and standard modes; reversible vs standard on the device; the reconstruction monitor; and
// activation memory that does not grow with depth, as the device meter measures it.

#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda/device_test_functors.cuh"
#include "cuda/gpu_test.cuh"
#include "dr2net/dr2net.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;
using namespace dr2net::testing;

namespace {

using HostBlock = ReversibleDualResidual<TanhLinear<float>, SineGate<float>, ConstantSchedule, Fp32>;
template <class T>
using DeviceBlock = ReversibleDualResidual<DeviceTanhLinear<T>, DeviceSineGate<T>, ConstantSchedule,
                                           PrecisionPolicy<float, T, float>>;

//! Everything one training step produces, on the host, as float.
struct StepResult {
  std::vector<float> out, dh0;
  std::vector<std::vector<float>> grads;
  std::vector<std::string> names;
};

template <class T>
std::vector<float> as_float(const std::vector<T>& v) {
  std::vector<float> f(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) f[i] = static_cast<float>(v[i]);
  return f;
}

StepResult host_step(ReversibleStack<HostBlock>& s, const Shape& shape, const std::vector<float>& h0,
                     const std::vector<float>& dout) {
  StepResult r;
  r.out.assign(h0.size(), 0.0f);
  r.dh0.assign(h0.size(), 0.0f);
  s.zero_grad();
  s.forward(ConstView<float>(h0.data(), shape), TensorView<float>(r.out.data(), shape), 3);
  s.backward(ConstView<float>(dout.data(), shape), TensorView<float>(r.dh0.data(), shape),
             ConstView<float>(h0.data(), shape));
  for (auto& p : s.parameters()) {
    r.names.push_back(p.name);
    r.grads.emplace_back(p.grad.data(), p.grad.data() + p.grad.size());
  }
  return r;
}

template <class T>
StepResult device_step(CudaContext& ctx, ReversibleStack<DeviceBlock<T>>& s, const Shape& shape,
                       const std::vector<float>& h0, const std::vector<float>& dout) {
  const std::size_t n = h0.size();
  auto dh = to_device(ctx, h0, MemoryCategory::Other);
  auto dd = to_device(ctx, dout, MemoryCategory::Other);
  auto out = ctx.allocate<float>(n, MemoryCategory::Other);
  auto dh0 = ctx.allocate<float>(n, MemoryCategory::Other);
  s.zero_grad();
  s.forward(ConstView<float>(dh.data(), shape), out.view(shape), 3);
  s.backward(ConstView<float>(dd.data(), shape), dh0.view(shape), ConstView<float>(dh.data(), shape));
  StepResult r;
  r.out = to_host(ctx, out.data(), n);
  r.dh0 = to_host(ctx, dh0.data(), n);
  for (auto& p : s.parameters()) {
    r.names.push_back(p.name);
    r.grads.push_back(as_float(to_host(ctx, p.grad.data(), p.grad.size())));
  }
  return r;
}

std::vector<HostBlock> host_layers(int L, std::int64_t d, std::mt19937_64& rng) {
  std::vector<HostBlock> layers;
  for (int l = 0; l < L; ++l) layers.emplace_back(TanhLinear<float>(d, rng), SineGate<float>(d, rng));
  return layers;
}

//! A device stack whose parameters are the host stack's, converted to T.
template <class T>
ReversibleStack<DeviceBlock<T>> device_twin(CudaContext& ctx, ReversibleStack<HostBlock>& host, std::int64_t d,
                                            std::pair<double, double> ab, BackpropMode mode) {
  std::vector<DeviceBlock<T>> layers;
  for (int l = 0; l < host.num_layers(); ++l)
    layers.emplace_back(DeviceTanhLinear<T>(ctx, d), DeviceSineGate<T>(ctx, d));
  ReversibleStack<DeviceBlock<T>> dev(ctx, std::move(layers), ConstantSchedule(ab.first, ab.second), {.mode = mode});
  const auto hp = host.parameters();
  std::size_t i = 0;
  dev.for_each_parameter([&](std::string_view name, TensorView<T> v, TensorView<T>) {
    GPU_CHECK(i < hp.size() && hp[i].name == name, "parameter order/names differ: " + std::string(name));
    std::vector<T> vals(v.size());
    for (std::size_t k = 0; k < vals.size(); ++k) vals[k] = static_cast<T>(hp[i].value.data()[k]);
    copy_to_device(ctx, v.data(), vals.data(), vals.size());
    ++i;
  });
  return dev;
}

void compare(const StepResult& got, const StepResult& want, const PrecisionTolerances& tol, const std::string& what) {
  GPU_CHECK_CLOSE(got.out, want.out, tol.gradient);
  GPU_CHECK_CLOSE(got.dh0, want.dh0, tol.gradient);
  GPU_CHECK(got.names == want.names, what + ": parameter names differ");
  for (std::size_t p = 0; p < got.grads.size() && p < want.grads.size(); ++p) {
    // Parameter gradients sum over rows: scale the tolerance by the largest gradient.
    double m = 0;
    for (float v : want.grads[p]) m = std::max(m, static_cast<double>(std::abs(v)));
    std::vector<double> scale(want.grads[p].size(), m);
    GPU_CHECK_CLOSE(got.grads[p], want.grads[p], tol.gradient, &scale);
  }
}

}  // namespace

int main() {
  skip_without_device();
  std::uint64_t seed = (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  CudaContext ctx({.poison_allocations = true});
  const std::int64_t d = 20;
  const Shape shape{3, 7, d};
  const auto n = static_cast<std::size_t>(shape.numel());
  const std::pair<double, double> ab{0.5, 0.5};

  for (BackpropMode mode : {BackpropMode::Reversible, BackpropMode::Standard}) {
    run_case(std::string("fp32 stack on device vs host, ") + std::string(mode_name(mode)), [&] {
      HostContext hctx;
      ReversibleStack<HostBlock> host(hctx, host_layers(3, d, rng), ConstantSchedule(ab.first, ab.second), {.mode = mode});
      auto dev = device_twin<float>(ctx, host, d, ab, mode);
      const auto h0 = random_vector<float>(n, rng), dout = random_vector<float>(n, rng);
      const auto want = host_step(host, shape, h0, dout);
      const auto got = device_step(ctx, dev, shape, h0, dout);
      compare(got, want, tolerances_for<float>(), "fp32");
      if (mode == BackpropMode::Reversible) {
        GPU_CHECK(dev.reconstruction().input_compared, "the monitor must compare x_0, y_0 with h0");
        GPU_CHECK(dev.reconstruction().relative_error < 1e-5, "reconstruction error " +
                                                                 std::to_string(dev.reconstruction().relative_error));
      }
    });
  }

  run_case("bf16 compute over fp32 streams on device vs fp32 host", [&] {
    HostContext hctx;
    ReversibleStack<HostBlock> host(hctx, host_layers(2, d, rng), ConstantSchedule(0.0, 1.0));
    auto dev = device_twin<__nv_bfloat16>(ctx, host, d, {0.0, 1.0}, BackpropMode::Reversible);
    const auto h0 = random_vector<float>(n, rng), dout = random_vector<float>(n, rng);
    compare(device_step(ctx, dev, shape, h0, dout), host_step(host, shape, h0, dout), tolerances_for<__nv_bfloat16>(),
            "bf16");
  });

  run_case("reversible vs standard on device", [&] {
    HostContext hctx;
    ReversibleStack<HostBlock> host(hctx, host_layers(4, d, rng), ConstantSchedule(0.0, 1.0));
    auto rev = device_twin<float>(ctx, host, d, {0.0, 1.0}, BackpropMode::Reversible);
    auto std_ = device_twin<float>(ctx, host, d, {0.0, 1.0}, BackpropMode::Standard);
    const auto h0 = random_vector<float>(n, rng), dout = random_vector<float>(n, rng);
    const auto a = device_step(ctx, rev, shape, h0, dout);
    const auto b = device_step(ctx, std_, shape, h0, dout);
    GPU_CHECK(a.out == b.out, "all modes share the forward arithmetic: outputs must be bitwise equal");
    compare(a, b, tolerances_for<float>(), "reversible vs standard");
  });

  run_case("device activation memory is constant in depth (reversible)", [&] {
    std::vector<std::size_t> peaks;
    for (int L : {2, 8}) {
      HostContext hctx;
      ReversibleStack<HostBlock> host(hctx, host_layers(L, d, rng), ConstantSchedule(0.0, 1.0));
      auto dev = device_twin<float>(ctx, host, d, {0.0, 1.0}, BackpropMode::Reversible);
      const auto h0 = random_vector<float>(n, rng), dout = random_vector<float>(n, rng);
      ctx.meter().reset_peaks();
      const auto base = ctx.meter().current_activation();
      device_step(ctx, dev, shape, h0, dout);
      peaks.push_back(ctx.meter().peak_activation() - base);
      dev.release_workspace();
    }
    GPU_CHECK(peaks[0] == peaks[1], "peak activation bytes: " + std::to_string(peaks[0]) + " (2 layers) vs " +
                                        std::to_string(peaks[1]) + " (8 layers)");
  });

  ctx.synchronize();
  return finish();
}
