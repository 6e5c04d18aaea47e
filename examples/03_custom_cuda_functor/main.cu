// 03_custom_cuda_functor: a residual function of your own on the GPU, inside a Dr²Net stack.
//
// GatedMlp (gated_mlp.hpp) is written once over the backend: its GEMMs are the library's
// primitives, its gate is its own kernel on the context's stream, and GatedMlp<float> (the
// host instantiation of the same code) is the oracle the device result is checked against.
// For a stack of (GatedMlp, GatedMlp) layers this program
//   1. runs one training step on the device and on the host, in standard and in reversible
//      mode: forward, the gradient of a mean squared error, backward, a plain SGD update over
//      every parameter, and an inference forward of the updated model; and compares outputs,
//      the input gradient, every parameter gradient and the updated output with the host's,
//      each within |device - host| <= atol + rtol * max|host| (printed);
//   2. checks that the device's reversible step gives the forward output of its standard step
//      bit for bit and the same gradients within that tolerance;
//   3. in exact mode (FixedFp32 streams), checks that reversible gradients equal standard ones
//      bit for bit on the device, which holds only when the function is deterministic;
//   4. checks that the device meter counts every parameter byte once (DeviceParameter is not
//      metered; the stack records the bytes from the parameter enumeration).
// Exit status: 0 when everything matches, 1 on a mismatch or an error, 77 when no usable CUDA
// device is present (ctest reports that as skipped).

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "gated_mlp.hpp"  // includes dr2net.hpp and, under nvcc, the CUDA backend

#include "cli.hpp"

namespace {

using dr2net::BackpropMode;
using dr2net::CudaContext;
using dr2net::HostContext;
using dr2net::MemoryCategory;
using dr2net::Shape;

using HostFn = example::GatedMlp<float>;                   // the oracle
using DeviceFn = example::GatedMlp<float, CudaContext>;    // the same code on the device
template <class P>
using HostLayer = dr2net::ReversibleDualResidual<HostFn, HostFn, dr2net::ConstantSchedule, P>;
template <class P>
using DeviceLayer = dr2net::ReversibleDualResidual<DeviceFn, DeviceFn, dr2net::ConstantSchedule, P>;

static_assert(dr2net::ResidualFunction<DeviceFn> && dr2net::ResidualFunction<HostFn>);
static_assert(std::is_same_v<dr2net::function_space_t<DeviceFn>, dr2net::DeviceSpace>);

// fp32 on both sides, but GEMMs and reductions summed in another order and the device's
// tanhf/expf: the tolerance of fp32 gradients and whole-stack outputs.
constexpr double kAtol = 1e-4, kRtol = 5e-4;
constexpr float kLearningRate = 0.1f;
// The coefficients of every module: |beta| = 1 keeps fp32 reconstruction error small at any
// depth the program allows (at beta = 0.5 it would double per module).
constexpr double kAlpha = 0.25, kBeta = 1.0;

struct Sizes {
  std::int64_t batch = 4, tokens = 9, dim = 32;
  example::GatedMlpConfig f{32, 48, 0.1};  // F with hidden dropout (replayed from Philox)
  example::GatedMlpConfig g{32, 24, 0.0};  // G narrower, without dropout
};

//! dout[i] = scale (out[i] - target[i]): the gradient of the mean squared error.
template <class T>
struct MseGradient {
  T* dout;
  const T* out;
  const T* target;
  T scale;
  DR2NET_HD_INLINE void operator()(std::size_t i) const { dout[i] = scale * (out[i] - target[i]); }
};

//! value[i] -= lr grad[i]: plain SGD, one parameter tensor per launch.
template <class T>
struct SgdUpdate {
  T* value;
  const T* grad;
  T lr;
  DR2NET_HD_INLINE void operator()(std::size_t i) const { value[i] -= lr * grad[i]; }
};

void upload(HostContext&, float* dst, const std::vector<float>& src) { std::copy(src.begin(), src.end(), dst); }
void upload(CudaContext& ctx, float* dst, const std::vector<float>& src) {
  dr2net::copy_to_device(ctx, dst, src.data(), src.size());
}
template <class Ctx, class T>
std::vector<float> download(Ctx& ctx, const T* p, std::size_t n) {
  std::vector<T> v(n);
  dr2net::copy_to_host(ctx, v.data(), p, n);  // waits for the stream on the device
  return std::vector<float>(v.begin(), v.end());
}

//! What one training step produced, on the host.
struct StepResult {
  std::vector<float> out, dh0, after;  // forward output, dL/dh0, output after the SGD update
  std::vector<std::string> names;
  std::vector<std::vector<float>> grads;
  double loss = 0;
  std::string reconstruction;
};

template <class P>
std::vector<HostLayer<P>> host_layers(const Sizes& s, int layers, std::uint64_t seed) {
  std::vector<HostLayer<P>> v;
  for (int l = 0; l < layers; ++l)
    v.emplace_back(HostFn(s.f, dr2net::mix_seed(seed, static_cast<std::uint64_t>(2 * l))),
                   HostFn(s.g, dr2net::mix_seed(seed, static_cast<std::uint64_t>(2 * l + 1))));
  return v;
}
//! The same layers on the device: drawn on the host, then copied.
template <class P>
std::vector<DeviceLayer<P>> device_layers(CudaContext& ctx, const Sizes& s, int layers, std::uint64_t seed) {
  std::vector<DeviceLayer<P>> v;
  for (int l = 0; l < layers; ++l)
    v.emplace_back(DeviceFn(ctx, HostFn(s.f, dr2net::mix_seed(seed, static_cast<std::uint64_t>(2 * l)))),
                   DeviceFn(ctx, HostFn(s.g, dr2net::mix_seed(seed, static_cast<std::uint64_t>(2 * l + 1)))));
  return v;
}

//! One training step of `stack` on backend `ctx` (the same code for host and device).
template <class Ctx, class Stack>
StepResult training_step(Ctx& ctx, Stack& stack, const Shape& shape, const std::vector<float>& h0_host,
                         const std::vector<float>& target_host, std::int64_t step) {
  using View = dr2net::ContextView<Ctx, const float>;
  const auto n = static_cast<std::size_t>(shape.numel());
  auto h0 = ctx.template allocate<float>(n, MemoryCategory::Other, "h0");
  auto target = ctx.template allocate<float>(n, MemoryCategory::Other, "target");
  auto out = ctx.template allocate<float>(n, MemoryCategory::Other, "out");
  auto dout = ctx.template allocate<float>(n, MemoryCategory::Other, "dout");
  auto dh0 = ctx.template allocate<float>(n, MemoryCategory::Other, "dh0");
  auto after = ctx.template allocate<float>(n, MemoryCategory::Other, "out after the update");
  upload(ctx, h0.data(), h0_host);
  upload(ctx, target.data(), target_host);

  stack.zero_grad();
  stack.forward(View(h0.data(), shape), out.view(shape), step);
  const float mse_scale = 2.0f / static_cast<float>(n);
  dr2net::for_each_index(ctx, n, MseGradient<float>{dout.data(), out.data(), target.data(), mse_scale});
  stack.backward(View(dout.data(), shape), dh0.view(shape), View(h0.data(), shape));  // h0: the monitor measures

  StepResult r;
  r.out = download(ctx, out.data(), n);
  r.dh0 = download(ctx, dh0.data(), n);
  for (auto& p : stack.parameters()) {  // views of the backend's memory: copied to the host to read
    r.names.push_back(p.name);
    r.grads.push_back(download(ctx, p.grad.data(), p.grad.size()));
  }
  for (std::size_t i = 0; i < n; ++i) r.loss += (r.out[i] - target_host[i]) * (r.out[i] - target_host[i]) / double(n);
  if (stack.mode() != BackpropMode::Standard) r.reconstruction = stack.reconstruction().describe();

  // SGD on every tensor: for_each_parameter hands out views of the backend's memory
  // (DeviceViews on the device), which the library's for_each_index runs over in place.
  stack.for_each_parameter([&](std::string_view, auto value, auto grad) {
    dr2net::for_each_index(ctx, value.size(), SgdUpdate<float>{value.data(), grad.data(), kLearningRate});
  });
  stack.predict(View(h0.data(), shape), after.view(shape), step + 1);
  r.after = download(ctx, after.data(), n);
  return r;
}

//! The worst |got - want| relative to its bound atol + rtol * max|want| over every compared tensor.
struct Comparison {
  double worst = 0;  // largest |got - want| / bound (<= 1: within the tolerance)
  double worst_abs = 0;
  std::string worst_what = "(none)";
  int tensors = 0;
  bool ok = true;

  void check(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
    ++tensors;
    if (got.size() != want.size()) {
      std::printf("  MISMATCH %s: %zu elements, want %zu\n", what.c_str(), got.size(), want.size());
      ok = false;
      return;
    }
    double scale = 0;
    for (float w : want) scale = std::max(scale, static_cast<double>(std::abs(w)));
    const double bound = kAtol + kRtol * scale;
    std::size_t bad = 0, at = 0;
    double tensor_worst = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      const double err = std::abs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
      if (!(err <= bound)) ++bad;  // NaN fails too
      const double rel = std::isnan(err) ? std::numeric_limits<double>::infinity() : err / bound;
      if (rel > tensor_worst) {
        tensor_worst = rel;
        at = i;
      }
    }
    if (tensor_worst > worst) {
      worst = tensor_worst;
      worst_abs = std::abs(static_cast<double>(got[at]) - static_cast<double>(want[at]));
      worst_what = what;
    }
    if (bad > 0) {
      std::printf("  MISMATCH %s: %zu of %zu elements outside %.1e; worst at %zu: %.9g, want %.9g\n", what.c_str(), bad,
                  got.size(), bound, at, static_cast<double>(got[at]), static_cast<double>(want[at]));
      ok = false;
    }
  }
  void check_steps(const StepResult& got, const StepResult& want) {
    check("output", got.out, want.out);
    check("dL/dh0", got.dh0, want.dh0);
    if (got.names != want.names) {
      std::printf("  MISMATCH parameter names or order differ\n");
      ok = false;
    }
    for (std::size_t p = 0; p < got.grads.size() && p < want.grads.size(); ++p)
      check("gradient of " + want.names[p], got.grads[p], want.grads[p]);
    check("output after the SGD update", got.after, want.after);
  }
  bool report(const char* what) const {
    std::printf("  %-44s %s: %d tensors, worst %.2e of the bound (|diff| %.2e, %s)\n", what, ok ? "ok" : "MISMATCH",
                tensors, worst, worst_abs, worst_what.c_str());
    return ok;
  }
};

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](float x, float y) {
           return std::memcmp(&x, &y, sizeof(float)) == 0;
         });
}

//! Why no CUDA device can be used, or an empty string when one can (as the GPU tests probe).
std::string no_device_reason() {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e == cudaSuccess && count > 0) e = cudaFree(nullptr);  // creates the primary context
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return cudaGetErrorString(e);
  }
  return count == 0 ? "device count is 0" : "";
}

int run(std::uint64_t seed, int layers) {
  const Sizes sizes;
  const Shape shape{sizes.batch, sizes.tokens, sizes.dim};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> h0(n), target(n);
  for (auto& v : h0) v = normal(rng);
  for (auto& v : target) v = normal(rng);
  const std::uint64_t weights = rng(), stack_seed = rng();
  const dr2net::ConstantSchedule schedule(kAlpha, kBeta);
  const std::int64_t step = 5;

  // Poisoned contexts: every new floating-point buffer is NaN, so a function that reads memory
  // it never wrote shows up as NaN in the comparison instead of passing by chance.
  CudaContext ctx({.poison_allocations = true});
  HostContext hctx({.poison_allocations = true});
  std::printf("stack: %d layers of (GatedMlp D=%lld H=%lld dropout %.2f, GatedMlp D=%lld H=%lld), streams [%lld, %lld, "
              "%lld], (alpha, beta) = (%.2f, %.2f), fp32\n",
              layers, static_cast<long long>(sizes.f.dim), static_cast<long long>(sizes.f.hidden), sizes.f.dropout,
              static_cast<long long>(sizes.g.dim), static_cast<long long>(sizes.g.hidden),
              static_cast<long long>(shape[0]), static_cast<long long>(shape[1]), static_cast<long long>(shape[2]),
              kAlpha, kBeta);
  std::printf("tolerance per tensor: |device - host| <= %.0e + %.0e * max|host|\n", kAtol, kRtol);
  bool ok = true;

  // 1. Device against host, one training step in each mode (fresh stacks, the same weights).
  StepResult device_steps[2];
  for (const BackpropMode mode : {BackpropMode::Standard, BackpropMode::Reversible}) {
    const dr2net::StackOptions options{.mode = mode, .seed = stack_seed};
    const std::size_t params_before = ctx.meter().current(MemoryCategory::Parameters);
    auto dlayers = device_layers<dr2net::Fp32>(ctx, sizes, layers, weights);
    const bool unmetered = ctx.meter().current(MemoryCategory::Parameters) == params_before;
    dr2net::ReversibleStack<DeviceLayer<dr2net::Fp32>> dev(ctx, std::move(dlayers), schedule, options);
    dr2net::ReversibleStack<HostLayer<dr2net::Fp32>> host(hctx, host_layers<dr2net::Fp32>(sizes, layers, weights),
                                                          schedule, options);
    // 4. Every parameter byte on the meter once, put there by the stack.
    std::size_t bytes = 0;
    for (const auto& p : dev.parameters()) bytes += p.value.size() * sizeof(float);
    const std::size_t metered = ctx.meter().current(MemoryCategory::Parameters) - params_before;
    if (!unmetered || metered != bytes) {
      std::printf("  MISMATCH meter: %zu parameter bytes metered, the stack holds %zu (layers alone metered %s)\n",
                  metered, bytes, unmetered ? "nothing" : "bytes");
      ok = false;
    }

    const StepResult d = training_step(ctx, dev, shape, h0, target, step);
    const StepResult h = training_step(hctx, host, shape, h0, target, step);
    const std::string name(dr2net::mode_name(mode));
    std::printf("%s: loss %.6f on the device, %.6f on the host%s%s\n", name.c_str(), d.loss, h.loss,
                d.reconstruction.empty() ? "" : "; reconstruction ", d.reconstruction.c_str());
    Comparison c;
    c.check_steps(d, h);
    ok = c.report(("device vs host, " + name).c_str()) && ok;
    device_steps[mode == BackpropMode::Reversible] = d;
  }

  // 2. Reversible against standard on the device: the same forward arithmetic (bit for bit),
  //    gradients through reconstruction within the tolerance.
  {
    const StepResult &s = device_steps[0], &r = device_steps[1];
    const bool same_out = bitwise_equal(r.out, s.out);
    if (!same_out)
      std::printf("  MISMATCH reversible forward output differs from standard's (forward != recompute?)\n");
    Comparison c;
    c.check("dL/dh0", r.dh0, s.dh0);
    for (std::size_t p = 0; p < r.grads.size() && p < s.grads.size(); ++p)
      c.check("gradient of " + s.names[p], r.grads[p], s.grads[p]);
    c.ok = c.ok && same_out;
    ok = c.report("device reversible vs standard") && ok;
  }

  // 3. Exact mode: fixed-point streams make reversal lossless, so reversible gradients equal
  //    standard ones bit for bit, provided every function is deterministic.
  {
    StepResult exact[2];
    std::string recon;
    bool exact_recon = false;
    for (const BackpropMode mode : {BackpropMode::Standard, BackpropMode::Reversible}) {
      auto dlayers = device_layers<dr2net::FixedFp32>(ctx, sizes, layers, weights);
      dr2net::ReversibleStack<DeviceLayer<dr2net::FixedFp32>> dev(ctx, std::move(dlayers), schedule,
                                                                  {.mode = mode, .seed = stack_seed});
      exact[mode == BackpropMode::Reversible] = training_step(ctx, dev, shape, h0, target, step);
      if (mode == BackpropMode::Reversible) {
        recon = dev.reconstruction().describe();
        exact_recon = dev.reconstruction().exact && dev.reconstruction().relative_error == 0.0;
      }
    }
    bool same = bitwise_equal(exact[0].out, exact[1].out) && bitwise_equal(exact[0].dh0, exact[1].dh0) &&
                bitwise_equal(exact[0].after, exact[1].after) && exact[0].names == exact[1].names &&
                exact[0].grads.size() == exact[1].grads.size();
    for (std::size_t p = 0; same && p < exact[0].grads.size(); ++p)
      same = bitwise_equal(exact[0].grads[p], exact[1].grads[p]);
    std::printf("  %-44s %s (reconstruction %s)\n", "device exact mode (FixedFp32): reversible == standard",
                same && exact_recon ? "ok, bit for bit" : "MISMATCH", recon.c_str());
    ok = ok && same && exact_recon;
  }

  ctx.synchronize();
  std::printf("%s\n", ok ? "all comparisons passed" : "MISMATCH: see above");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t seed = (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  int layers = 3;
  CLI::App app("Runs one training step of a stack of a user-written device residual function (a gated MLP with its "
               "own CUDA kernel) on the GPU and compares it with the host instantiation of the same code, in "
               "standard, reversible and exact mode. Exits 77 when no CUDA device is usable.",
               "03_custom_cuda_functor");
  dr2net_cli::add_integer(app, "--seed", seed, std::uint64_t{0}, ~std::uint64_t{0}, "seed of the data and the weights")
      ->default_str("a fresh one, printed");
  dr2net_cli::add_integer(app, "--layers", layers, 1, 8, "layers of the stack");
  if (const auto status = dr2net_cli::parse(app, argc, argv)) return *status;

  if (const std::string why = no_device_reason(); !why.empty()) {
    std::printf("no usable CUDA device (%s): nothing to compare; exiting with 77 (skipped)\n", why.c_str());
    return 77;
  }
  std::printf("seed %llu (rerun with --seed %llu)\n", static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  try {
    return run(seed, layers);
  } catch (const dr2net::Error& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "03_custom_cuda_functor: %s\n", e.detail().c_str());
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "03_custom_cuda_functor: %s\n", e.what());
  }
  return 1;
}
