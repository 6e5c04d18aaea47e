// A whole ReversibleStack on the device (device twins of the host test functions) against
// the same stack on the host: outputs, input gradients and parameter gradients, reversible
// and standard modes; reversible vs standard on the device; the reconstruction monitor; and
// activation memory that does not grow with depth, as the device meter measures it.
// Exact mode (FixedFp32): reversible equals standard on the device bit for bit, the device
// stack is the host stack within the fp32 function tolerance, the reconstruction is exact and
// x_0 = y_0 = the quantized h0; non-finite or out-of-range inputs, a NaN dout and a NaN weight
// are errors that name the tensor (and the module and parameter).
// Error-bounded mode on the device places the host's snapshots, matches the host's gradients,
// and stays within its stream tolerance of standard backprop where plain reversible does not;
// the MeanOfStreams output matches the host in every mode; and the meter counts every
// parameter and gradient byte of the device functions once.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "cuda/device_test_functors.cuh"
#include "cuda/gpu_test.cuh"
#include "dr2net/dr2net.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;
using namespace dr2net::testing;

namespace {

template <class P = Fp32>
using HostBlockP = ReversibleDualResidual<TanhLinear<float>, SineGate<float>, ConstantSchedule, P>;
using HostBlock = HostBlockP<Fp32>;
using HostFixedBlock = HostBlockP<FixedFp32>;
template <class T, class P = PrecisionPolicy<float, T, float>>
using DeviceBlock = ReversibleDualResidual<DeviceTanhLinear<T>, DeviceSineGate<T>, ConstantSchedule, P>;
using Fx = FixedPoint<32>;

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

template <class Block>
StepResult host_step(ReversibleStack<Block>& s, const Shape& shape, const std::vector<float>& h0,
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

template <class Block>
StepResult device_step(CudaContext& ctx, ReversibleStack<Block>& s, const Shape& shape,
                       const std::vector<float>& h0, const std::vector<float>& dout) {
  const std::size_t n = h0.size();
  auto dh = to_device(ctx, h0, MemoryCategory::Other);
  auto dd = to_device(ctx, dout, MemoryCategory::Other);
  auto out = ctx.allocate<float>(n, MemoryCategory::Other);
  auto dh0 = ctx.allocate<float>(n, MemoryCategory::Other);
  s.zero_grad();
  s.forward(ConstDeviceView<float>(dh.data(), shape), out.view(shape), 3);
  s.backward(ConstDeviceView<float>(dd.data(), shape), dh0.view(shape), ConstDeviceView<float>(dh.data(), shape));
  StepResult r;
  r.out = to_host(ctx, out.data(), n);
  r.dh0 = to_host(ctx, dh0.data(), n);
  for (auto& p : s.parameters()) {
    r.names.push_back(p.name);
    r.grads.push_back(as_float(to_host(ctx, p.grad.data(), p.grad.size())));
  }
  return r;
}

//! `scale`: the spread of TanhLinear's weights (its default 0.5; the host error-bounded tests use 0.9).
template <class P = Fp32>
std::vector<HostBlockP<P>> host_layers(int L, std::int64_t d, std::mt19937_64& rng, double scale = 0.5) {
  std::vector<HostBlockP<P>> layers;
  for (int l = 0; l < L; ++l) layers.emplace_back(TanhLinear<float>(d, rng, scale), SineGate<float>(d, rng));
  return layers;
}

//! A device stack under policy P with `options` whose parameters are the host stack's, converted to T.
template <class T, class P = PrecisionPolicy<float, T, float>, class HostB>
ReversibleStack<DeviceBlock<T, P>> device_twin(CudaContext& ctx, ReversibleStack<HostB>& host, std::int64_t d,
                                               std::pair<double, double> ab, StackOptions options) {
  std::vector<DeviceBlock<T, P>> layers;
  for (int l = 0; l < host.num_layers(); ++l)
    layers.emplace_back(DeviceTanhLinear<T>(ctx, d), DeviceSineGate<T>(ctx, d));
  ReversibleStack<DeviceBlock<T, P>> dev(ctx, std::move(layers), ConstantSchedule(ab.first, ab.second),
                                         std::move(options));
  const auto hp = host.parameters();
  std::size_t i = 0;
  dev.for_each_parameter([&](std::string_view name, DeviceView<T> v, DeviceView<T>) {
    GPU_CHECK(i < hp.size() && hp[i].name == name, "parameter order/names differ: " + std::string(name));
    std::vector<T> vals(v.size());
    for (std::size_t k = 0; k < vals.size(); ++k) vals[k] = static_cast<T>(hp[i].value.data()[k]);
    copy_to_device(ctx, v.data(), vals.data(), vals.size());
    ++i;
  });
  return dev;
}

void compare(const StepResult& got, const StepResult& want, Tolerance tol, const std::string& what) {
  all_close(got.out, want.out, tol, (what + ": output").c_str(), __FILE__, __LINE__);
  all_close(got.dh0, want.dh0, tol, (what + ": dh0").c_str(), __FILE__, __LINE__);
  GPU_CHECK(got.names == want.names, what + ": parameter names differ");
  for (std::size_t p = 0; p < got.grads.size() && p < want.grads.size(); ++p) {
    // Parameter gradients sum over rows: scale the tolerance by the largest gradient.
    double m = 0;
    for (float v : want.grads[p]) m = std::max(m, static_cast<double>(std::abs(v)));
    std::vector<double> scale(want.grads[p].size(), m);
    all_close(got.grads[p], want.grads[p], tol, (what + ": gradient of " + want.names[p]).c_str(), __FILE__, __LINE__,
              &scale);
  }
}

//! max over tensors k of ||a_k - b_k|| / ||b_k|| (0 where they are equal; inf for a NaN or a
//! size mismatch).
double max_rel_l2(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  double worst = a.size() == b.size() ? 0.0 : std::numeric_limits<double>::infinity();
  for (std::size_t k = 0; k < a.size() && k < b.size(); ++k) {
    if (a[k].size() != b[k].size()) return std::numeric_limits<double>::infinity();
    double num = 0, den = 0;
    for (std::size_t i = 0; i < a[k].size(); ++i) {
      const double e = static_cast<double>(a[k][i]) - static_cast<double>(b[k][i]);
      num += e * e;
      den += static_cast<double>(b[k][i]) * static_cast<double>(b[k][i]);
    }
    const double r = num == 0 ? 0.0 : std::sqrt(num / den);  // den == 0 < num: inf
    worst = std::isnan(r) ? std::numeric_limits<double>::infinity() : std::max(worst, r);
  }
  return worst;
}

//! Whether two step results are equal bit for bit (no NaN expected).
bool identical(const StepResult& a, const StepResult& b) {
  return a.out == b.out && a.dh0 == b.dh0 && a.grads == b.grads && a.names == b.names;
}

//! Runs body, which must throw dr2net::Error with every one of `words` in its message.
template <class Body>
void expect_error(const std::string& what, std::initializer_list<const char*> words, Body&& body) {
  try {
    body();
  } catch (const Error& e) {
    const std::string m = e.what();
    for (const char* w : words) GPU_CHECK(m.find(w) != std::string::npos, what + ": \"" + w + "\" missing from: " + m);
    return;
  }
  GPU_CHECK(false, what + ": no error was raised");
}

//! Sets one element of the device parameter `name` to `value`.
template <class Stack>
void poison_parameter(CudaContext& ctx, Stack& s, std::string_view name, std::size_t at, float value) {
  bool found = false;
  s.for_each_parameter([&](std::string_view pname, DeviceView<float> v, DeviceView<float>) {
    if (pname != name) return;
    copy_to_device(ctx, v.data() + at, &value, 1);
    found = true;
  });
  GPU_CHECK(found, "no parameter " + std::string(name));
}

//! A stack of the device test functions on a context of its own: the functions meter nothing
//! themselves, the stack records each parameter and its gradient once, and the peak total is
//! exactly those bytes until a step runs (and they stay put through it).
template <class T>
void parameter_metering_case(const char* type) {
  const std::string name = std::string("device test functions (") + type +
                           ") in a stack: every parameter and gradient byte metered once";
  run_case(name, [&] {
    CudaContext fresh;  // a meter of its own
    const MemoryMeter& m = fresh.meter();
    {
      const std::int64_t w = 24;
      const int L = 3;
      std::vector<DeviceBlock<T>> layers;
      for (int l = 0; l < L; ++l) layers.emplace_back(DeviceTanhLinear<T>(fresh, w), DeviceSineGate<T>(fresh, w));
      GPU_CHECK(m.current_total() == 0 && m.peak_total() == 0, "functions outside a stack metered:\n" + m.report());
      ReversibleStack<DeviceBlock<T>> dev(fresh, std::move(layers), ConstantSchedule(0.5, 0.5));
      std::size_t bytes = 0;
      for (const auto& p : dev.parameters()) bytes += p.value.size() * sizeof(T);
      // per layer: weight w x w, bias w, amplitude w, phase w
      const auto expected = static_cast<std::size_t>(L * (w * w + 3 * w)) * sizeof(T);
      GPU_CHECK(bytes == expected,
                "parameters() holds " + std::to_string(bytes) + " bytes, the layers " + std::to_string(expected));
      GPU_CHECK(m.current(MemoryCategory::Parameters) == bytes && m.current(MemoryCategory::Gradients) == bytes &&
                    m.current(MemoryCategory::Other) == 0 && m.peak_total() == 2 * bytes,
                "expected " + std::to_string(bytes) + " bytes of parameters and of gradients, once:\n" + m.report());
      // A training step allocates activations and scratch, never parameters or gradients.
      std::mt19937_64 rng(std::random_device{}());
      const Shape s{2, 5, w};
      const auto n = static_cast<std::size_t>(s.numel());
      device_step(fresh, dev, s, random_vector<float>(n, rng), random_vector<float>(n, rng));
      GPU_CHECK(m.current(MemoryCategory::Parameters) == bytes && m.current(MemoryCategory::Gradients) == bytes &&
                    m.peak(MemoryCategory::Parameters) == bytes && m.peak(MemoryCategory::Gradients) == bytes,
                "parameter or gradient bytes changed in a step:\n" + m.report());
    }
    GPU_CHECK(m.current_total() == 0, "bytes left on the meter:\n" + m.report());
  });
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
      // Reversible mode holds the device's reconstruction error to 1e-5, which fresh data
      // leaves little room: over fresh seeds the host stack's error at this point has a median
      // of 8e-6 and passes 1e-5 at about one seed in six. At this fixed seed it is 4.0e-6 to
      // 4.7e-6 on the host under three roundings (as written, FMA-contracted, reassociated),
      // so the threshold judges the device's arithmetic, not the draw. Standard mode: fresh data.
      const bool fixed_data = mode == BackpropMode::Reversible;
      std::mt19937_64 crng(fixed_data ? 0x5eed0094ull : rng());
      HostContext hctx;
      ReversibleStack<HostBlock> host(hctx, host_layers(3, d, crng), ConstantSchedule(ab.first, ab.second),
                                      {.mode = mode});
      auto dev = device_twin<float>(ctx, host, d, ab, {.mode = mode});
      const auto h0 = random_vector<float>(n, crng), dout = random_vector<float>(n, crng);
      const auto want = host_step(host, shape, h0, dout);
      const auto got = device_step(ctx, dev, shape, h0, dout);
      compare(got, want, tolerances_for<float>().gradient, "fp32");
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
    auto dev = device_twin<__nv_bfloat16>(ctx, host, d, {0.0, 1.0}, {.mode = BackpropMode::Reversible});
    const auto h0 = random_vector<float>(n, rng), dout = random_vector<float>(n, rng);
    compare(device_step(ctx, dev, shape, h0, dout), host_step(host, shape, h0, dout),
            tolerances_for<__nv_bfloat16>().gradient, "bf16");
  });

  run_case("reversible vs standard on device", [&] {
    HostContext hctx;
    ReversibleStack<HostBlock> host(hctx, host_layers(4, d, rng), ConstantSchedule(0.0, 1.0));
    auto rev = device_twin<float>(ctx, host, d, {0.0, 1.0}, {.mode = BackpropMode::Reversible});
    auto std_ = device_twin<float>(ctx, host, d, {0.0, 1.0}, {.mode = BackpropMode::Standard});
    const auto h0 = random_vector<float>(n, rng), dout = random_vector<float>(n, rng);
    const auto a = device_step(ctx, rev, shape, h0, dout);
    const auto b = device_step(ctx, std_, shape, h0, dout);
    GPU_CHECK(a.out == b.out, "all modes share the forward arithmetic: outputs must be bitwise equal");
    compare(a, b, tolerances_for<float>().gradient, "reversible vs standard");
  });

  run_case("device activation memory is constant in depth (reversible)", [&] {
    std::vector<std::size_t> peaks;
    for (int L : {2, 8}) {
      HostContext hctx;
      ReversibleStack<HostBlock> host(hctx, host_layers(L, d, rng), ConstantSchedule(0.0, 1.0));
      auto dev = device_twin<float>(ctx, host, d, {0.0, 1.0}, {.mode = BackpropMode::Reversible});
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

  run_case("exact mode (FixedFp32) on device: reversible == standard bit for bit, host within fp32 function tolerance", [&] {
    // A fixed seed: device and host functions differ in rounding only, and the function
    // tolerance is tight for whole-stack gradients (on the host, FixedFp32 against FixedFp64
    // stays below 5% of it at these points).
    const std::uint64_t fixed_seed = 0x5eed0f1dull;
    std::mt19937_64 frng(fixed_seed);
    const std::vector<std::pair<double, double>> points{{1.0, 0.1}, {1.0, 0.01}, {0.9, 0.3}, {0.5, 0.5}, {0.0, 1.0}};
    for (const auto& ab : points) {
      const std::string at = "(alpha, beta) = (" + std::to_string(ab.first) + ", " + std::to_string(ab.second) + ")";
      HostContext hctx;
      ReversibleStack<HostFixedBlock> host(hctx, host_layers<FixedFp32>(3, d, frng), ConstantSchedule(ab.first, ab.second),
                                           {.mode = BackpropMode::Reversible});
      auto rev = device_twin<float, FixedFp32>(ctx, host, d, ab, {.mode = BackpropMode::Reversible});
      auto std_ = device_twin<float, FixedFp32>(ctx, host, d, ab, {.mode = BackpropMode::Standard});
      const auto h0 = random_vector<float>(n, frng), dout = random_vector<float>(n, frng);
      const auto want = host_step(host, shape, h0, dout);
      const auto a = device_step(ctx, rev, shape, h0, dout);
      const auto b = device_step(ctx, std_, shape, h0, dout);
      GPU_CHECK(identical(a, b), "device reversible and standard differ " + at);
      compare(a, want, tolerances_for<float>().function, "device vs host FixedFp32 " + at);
      const ReconstructionReport& r = rev.reconstruction();
      GPU_CHECK(r.exact && r.measured && r.relative_error == 0.0 && r.max_abs_error == 0.0,
                "the device stack's reconstruction report: " + r.describe() + " " + at);
      GPU_CHECK(r.compared_elements == n, at);
      GPU_CHECK(rev.side_bit_width(3, 0) == fixed::side_bit_width(fixed::quantize_coefficient(ab.second).p), at);
      // x_0 and y_0 on the device are the quantized h0, bit for bit.
      const auto x0 = to_host(ctx, rev.reconstructed_x().data(), n), y0 = to_host(ctx, rev.reconstructed_y().data(), n);
      bool inputs = true;
      for (std::size_t i = 0; i < n; ++i) {
        bool bad = false;
        const std::int64_t q = fixed::quantize(static_cast<double>(h0[i]), Fx::scale, bad);
        inputs = inputs && !bad && x0[i].raw == q && y0[i].raw == q;
      }
      GPU_CHECK(inputs, "reconstructed x_0, y_0 are not the quantized h0 " + at);
      // A second step on the same stacks gives the same bits (nothing left over from the first).
      const auto a2 = device_step(ctx, rev, shape, h0, dout);
      GPU_CHECK(identical(a, a2), "a second identical device step differs " + at);
    }
  });

  run_case("exact mode on device: non-finite inputs, dout and weights are errors naming them", [&] {
    HostContext hctx;
    ReversibleStack<HostFixedBlock> host(hctx, host_layers<FixedFp32>(2, d, rng), ConstantSchedule(0.9, 0.3));
    ReversibleStack<HostBlock> host32(hctx, host_layers(2, d, rng), ConstantSchedule(0.9, 0.3));
    const auto h0 = random_vector<float>(n, rng), dout = random_vector<float>(n, rng);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    auto bad_at = [&](std::size_t i, float v) {
      auto h = h0;
      h[i] = v;
      return h;
    };
    {
      auto dev = device_twin<float, FixedFp32>(ctx, host, d, {0.9, 0.3}, {.mode = BackpropMode::Reversible});
      expect_error("NaN in h0 (fixed)", {"h0"}, [&] { device_step(ctx, dev, shape, bad_at(17, nan), dout); });
      expect_error("h0 out of the fixed-point range", {"h0", "fixed-point range"},
                   [&] { device_step(ctx, dev, shape, bad_at(n - 1, 3.0e9f), dout); });
      auto dd = dout;
      dd[5] = std::numeric_limits<float>::infinity();
      expect_error("Inf in dout (fixed)", {"dout"}, [&] { device_step(ctx, dev, shape, h0, dd); });
      // After the errors the stack still trains.
      const auto ok = device_step(ctx, dev, shape, h0, dout);
      GPU_CHECK(dev.reconstruction().exact && dev.reconstruction().relative_error == 0.0, "after errors");
      compare(ok, host_step(host, shape, h0, dout), tolerances_for<float>().function, "after errors");
      poison_parameter(ctx, dev, "blocks.0.f.weight", 7, nan);
      expect_error("NaN weight (fixed)", {"module 0", "blocks.0.f.weight"}, [&] { device_step(ctx, dev, shape, h0, dout); });
    }
    {  // fp32 streams: the vectorised ForwardCombine flags a NaN in F's output
      auto dev = device_twin<float>(ctx, host32, d, {0.9, 0.3}, {.mode = BackpropMode::Reversible});
      expect_error("NaN in h0 (fp32)", {"h0"}, [&] { device_step(ctx, dev, shape, bad_at(0, nan), dout); });
      poison_parameter(ctx, dev, "blocks.1.gate.amplitude", 3, nan);
      expect_error("NaN weight (fp32)", {"module 3", "blocks.1.gate.amplitude", "non-finite output"},
                   [&] { device_step(ctx, dev, shape, h0, dout); });
    }
  });

  run_case("error-bounded mode on device: the host's snapshots and gradients, standard's within tolerance", [&] {
    // As tests/host/test_error_bounded.cpp: 12 layers of the test functions, stream tolerance
    // 1e-5, the guard only warns (plain reversible at (1, 0.1) is far outside it, on purpose).
    const std::int64_t w = 16;
    const Shape eshape{2, 8, w};
    const auto en = static_cast<std::size_t>(eshape.numel());
    const double tolerance = 1e-5;
    const StackOptions bounded{.mode = BackpropMode::ErrorBounded,
                               .error_bound = {.stream_tolerance = tolerance},
                               .guard = {.action = GuardAction::Warn, .warn = [](std::string_view) {}}};
    const std::vector<std::pair<double, double>> points{{1.0, 0.1}, {0.5, 0.55}, {0.9, 0.05}, {0.0, 1.0}};
    for (const auto& p : points) {
      const std::string at = "(alpha, beta) = (" + std::to_string(p.first) + ", " + std::to_string(p.second) + ")";
      HostContext hctx;
      ReversibleStack<HostBlock> host(hctx, host_layers(12, w, rng, 0.9), ConstantSchedule(p.first, p.second), bounded);
      auto dev = device_twin<float>(ctx, host, w, p, bounded);
      const auto h0 = random_vector<float>(en, rng), dout = random_vector<float>(en, rng);
      // First steps of fresh stacks: the plan depends only on the coefficients and options.
      const auto want = host_step(host, eshape, h0, dout);
      const auto got = device_step(ctx, dev, eshape, h0, dout);
      const auto boundaries = dev.snapshot_boundaries();
      GPU_CHECK(boundaries == host.snapshot_boundaries(),
                "device snapshot boundaries differ from the host's " + at + ": " + std::to_string(boundaries.size()) +
                    " vs " + std::to_string(host.snapshot_boundaries().size()));
      GPU_CHECK(dev.reconstruction().snapshots == static_cast<int>(boundaries.size()),
                "snapshots stored: " + dev.reconstruction().describe() + " " + at);
      compare(got, want, tolerances_for<float>().gradient, "error-bounded device vs host " + at);
      dev.set_mode(BackpropMode::Standard);
      const auto standard = device_step(ctx, dev, eshape, h0, dout);
      const double eg = max_rel_l2(got.grads, standard.grads), ed = max_rel_l2({got.dh0}, {standard.dh0});
      GPU_CHECK(eg <= tolerance && ed <= tolerance, "error-bounded vs standard on device " + at +
                                                        ": parameter gradients " + std::to_string(eg) + ", dh0 " +
                                                        std::to_string(ed) + " (relative L2)");
      if (p == std::pair<double, double>{1.0, 0.1}) {  // the problem is real on the device too
        dev.set_mode(BackpropMode::Reversible);
        const auto plain = device_step(ctx, dev, eshape, h0, dout);
        GPU_CHECK(max_rel_l2(plain.grads, standard.grads) > tolerance,
                  "plain reversible gradients at " + at + " are within " + std::to_string(tolerance) +
                      " of standard: the point no longer tests error-bounded mode");
      }
    }
  });

  for (BackpropMode mode : {BackpropMode::Reversible, BackpropMode::ErrorBounded, BackpropMode::Standard}) {
    run_case(std::string("MeanOfStreams output on device vs host, ") + std::string(mode_name(mode)), [&] {
      const StackOptions o{.mode = mode, .output = StackOutput::MeanOfStreams};
      HostContext hctx;
      ReversibleStack<HostBlock> host(hctx, host_layers(3, d, rng), ConstantSchedule(ab.first, ab.second), o);
      auto dev = device_twin<float>(ctx, host, d, ab, o);
      const auto h0 = random_vector<float>(n, rng), dout = random_vector<float>(n, rng);
      const auto tol = tolerances_for<float>().gradient;
      compare(device_step(ctx, dev, shape, h0, dout), host_step(host, shape, h0, dout), tol,
              std::string("MeanOfStreams, ") + std::string(mode_name(mode)));
      // Inference writes the same mean.
      std::vector<float> want(n);
      host.predict(ConstView<float>(h0.data(), shape), TensorView<float>(want.data(), shape), 3);
      auto dh = to_device(ctx, h0, MemoryCategory::Other);
      auto out = ctx.allocate<float>(n, MemoryCategory::Other);
      dev.predict(ConstDeviceView<float>(dh.data(), shape), out.view(shape), 3);
      GPU_CHECK_CLOSE(to_host(ctx, out.data(), n), want, tol);
    });
  }

  parameter_metering_case<float>("fp32");
  parameter_metering_case<__nv_bfloat16>("bf16");

  ctx.synchronize();
  return finish();
}
