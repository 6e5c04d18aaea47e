// The device ViT residual functions against their host twins: CudaLinear vs Linear,
// CudaVitAttention vs VitAttention, CudaVitMlp vs VitMlp (outputs, accumulated input
// gradients, parameter gradients; fp32 tight, bf16/fp16 loose, from the tolerance table),
// adding into a destination (the last GEMM's C), drop masks bit for bit, a whole device ViT
// stack against the host stack, reversible vs standard on the device, and peak activation
// bytes that do not grow with depth. Exact mode: a device ViT stack with fixed-point streams
// (FixedFp32, drop-path and dropout on) gives reversible gradients equal to standard ones bit
// for bit, reconstructs h0 exactly, and matches the host FixedFp32 stack.
// Long rows: attention and MLP at D = 768 and 1024 (LayerNorm rows past 256) and N = 197 and
// 1568 (softmax rows past 128 and 1024), fp32, bf16 and fp16 against one host reference per
// shape. Precision policies: ViT stacks under Fp64, Fp32AllowTf32, Bf16ComputeFp64Streams and
// Fp16ComputeFp32Streams against the host stack of the same layers, and reversible vs
// standard on the device under each. Error-bounded mode with the MeanOfStreams output against
// the host. DR2NET_GPU_TEST_QUICK leaves out the N = 1568 shape.
// Outputs and saved internals are poisoned (NaN) before every launch; token counts are odd
// and there are several heads. Swin window attention: CudaWindowAttention vs WindowAttention
// (shifted on both axes and on one, window 7, window == map, a 3-D grid, token rows and NHWC;
// fp32, bf16, fp16), two device runs bit for bit equal (the bias table's gradient has no
// atomics), and a stack of two Swin blocks on the device vs the host and reversible vs standard.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "cuda/gpu_test.cuh"
#include "dr2net/block/stages.hpp"
#include "dr2net/dr2net.hpp"
#include "dr2net/modules/cuda/vit.cuh"
#include "dr2net/modules/cuda/window_attention.cuh"
#include "dr2net/modules/patch_merging.hpp"
#include "dr2net/modules/vit.hpp"
#include "dr2net/modules/window_attention.hpp"

using namespace dr2net;
using namespace dr2net::testing;

// The device instantiations of the one implementation are residual functions with the
// adds-into members (a signature mismatch would silently switch the block's fused path off).
static_assert(ResidualFunction<CudaVitAttention<float>> && AddsInto<CudaVitAttention<float>>);
static_assert(ResidualFunction<CudaVitMlp<__nv_bfloat16>> && AddsInto<CudaVitMlp<__nv_bfloat16>>);
static_assert(std::is_same_v<function_space_t<CudaVitAttention<float>>, DeviceSpace>);
static_assert(ResidualFunction<CudaWindowAttention<float>> && AddsInto<CudaWindowAttention<float>>);
static_assert(ResidualFunction<CudaWindowAttention<__nv_bfloat16>> && AddsInto<CudaWindowAttention<__nv_bfloat16>>);
static_assert(std::is_same_v<function_space_t<CudaWindowAttention<float>>, DeviceSpace>);

namespace {

template <class T>
std::vector<T> to_type(const std::vector<float>& v) {
  std::vector<T> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = T(v[i]);
  return r;
}
template <class T>
std::vector<float> as_float(const std::vector<T>& v) {
  std::vector<float> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = static_cast<float>(v[i]);
  return r;
}
//! Values representable in T (so host and device see the same inputs).
template <class T>
std::vector<float> random_in(std::size_t n, std::mt19937_64& rng) {
  return as_float(to_type<T>(random_values<float>(n, rng)));
}

template <class E>
double max_abs(const std::vector<E>& v) {
  double m = 0;
  for (E x : v) m = std::max(m, std::abs(static_cast<double>(x)));
  return m;
}

//! Parameter gradients sum over rows: compare with the tensor's largest gradient as scale.
template <class E>
bool close_scaled(const std::vector<E>& got, const std::vector<E>& want, Tolerance tol, const std::string& what) {
  std::vector<double> scale(want.size(), max_abs(want));
  return all_close(got, want, tol, what.c_str(), __FILE__, __LINE__, &scale);
}

//! v converted to T (float, double, bf16 or fp16), element by element.
template <class T, class E>
std::vector<T> converted(const std::vector<E>& v) {
  std::vector<T> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_floating_point_v<T>) r[i] = static_cast<T>(to_double(v[i]));
    else r[i] = T(static_cast<float>(to_double(v[i])));
  }
  return r;
}

//! x rounded to the nearest value of T and back (bf16 and fp16 through float).
template <class T, class U>
U representable_in(U x) {
  if constexpr (std::is_floating_point_v<T>) return static_cast<U>(static_cast<T>(x));
  else return static_cast<U>(static_cast<float>(T(static_cast<float>(x))));
}

//! Rounds every parameter of a host function to T, so that its device twin in T holds the
//! same values (the conversion in copy_from is then exact).
template <class T, class F>
void round_parameters_to(F& function) {
  function.for_each_parameter([](std::string_view, auto value, auto) {
    for (std::size_t i = 0; i < value.size(); ++i) value.data()[i] = representable_in<T>(value.data()[i]);
  });
}

bool all_finite(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

//! Module index and seed of every function call of these comparisons (host and device alike).
constexpr int kModule = 5;
constexpr std::uint64_t kCallSeed = 1234;

//! What one function computed for one input: its output, grad_in (g0 plus its backward's
//! share) and the parameter gradients by name.
struct FunctionResult {
  std::vector<float> out, gin;
  std::vector<std::string> names;
  std::vector<std::vector<float>> grads;
};

//! The host function's forward (recompute) and backward onto a copy of g0.
template <class HostF>
FunctionResult host_reference(HostF& host, const Shape& shape, const std::vector<float>& in,
                              const std::vector<float>& gout, const std::vector<float>& g0, bool training,
                              std::int64_t step) {
  HostContext hctx;
  const ModuleCall<HostContext> hcall{hctx, kModule, step, kCallSeed, training};
  std::vector<float> hsaved(host.saved_elements(shape));
  const Shape sshape{static_cast<std::int64_t>(hsaved.size())};
  FunctionResult r{std::vector<float>(in.size()), g0, {}, {}};
  host.recompute(hcall, ConstView<float>(in.data(), shape), TensorView<float>(r.out.data(), shape),
                 TensorView<float>(hsaved.data(), sshape));
  host.backward(hcall, ConstView<float>(in.data(), shape), ConstView<float>(hsaved.data(), sshape),
                ConstView<float>(gout.data(), shape), TensorView<float>(r.gin.data(), shape));
  host.for_each_parameter([&](std::string_view name, TensorView<float>, TensorView<float> g) {
    r.names.emplace_back(name);
    r.grads.emplace_back(g.data(), g.data() + g.size());
  });
  return r;
}

//! The device twin (fresh: zero gradients) on the same input and call as host_reference:
//! forward, recompute (bit for bit the forward's output), backward onto g0; output, grad_in
//! and parameter gradients compared with `want` within T's tolerances.
template <class T, class DevF>
void compare_device(CudaContext& ctx, DevF& dev, const Shape& shape, const std::vector<float>& in,
                    const std::vector<float>& gout, const std::vector<float>& g0, bool training, std::int64_t step,
                    const FunctionResult& want) {
  const auto& tol = tolerances_for<T>();
  const auto n = static_cast<std::size_t>(shape.numel());
  const ModuleCall<CudaContext> dcall{ctx, kModule, step, kCallSeed, training};
  auto din = to_device(ctx, to_type<T>(in)), dgout = to_device(ctx, to_type<T>(gout)), dgin = to_device(ctx, to_type<T>(g0));
  auto dout = ctx.allocate<T>(n, MemoryCategory::Other);  // poisoned
  const std::size_t ns = dev.saved_elements(shape);
  auto dsaved = ctx.allocate<T>(ns, MemoryCategory::Other);  // poisoned
  const Shape sshape{static_cast<std::int64_t>(ns)};
  dev.forward(dcall, ConstDeviceView<T>(din.data(), shape), dout.view(shape), dsaved.view(sshape));
  const auto fwd = as_float(to_host(ctx, dout.data(), n));
  // recompute must give the forward's output bit for bit
  auto dout2 = ctx.allocate<T>(n, MemoryCategory::Other);
  dev.recompute(dcall, ConstDeviceView<T>(din.data(), shape), dout2.view(shape), dsaved.view(sshape));
  const auto rec = as_float(to_host(ctx, dout2.data(), n));
  GPU_CHECK(std::memcmp(fwd.data(), rec.data(), n * sizeof(float)) == 0, "recompute differs from forward");
  dev.backward(dcall, ConstDeviceView<T>(din.data(), shape), ConstDeviceView<T>(dsaved.data(), sshape), ConstDeviceView<T>(dgout.data(), shape),
               dgin.view(shape));
  GPU_CHECK_CLOSE(fwd, want.out, tol.function);
  GPU_CHECK_CLOSE(as_float(to_host(ctx, dgin.data(), n)), want.gin, tol.gradient);

  std::vector<std::string> dnames;
  std::vector<std::vector<float>> dgrads;
  dev.for_each_parameter([&](std::string_view name, DeviceView<T>, DeviceView<T> g) {
    dnames.emplace_back(name);
    dgrads.push_back(as_float(to_host(ctx, g.data(), g.size())));
  });
  GPU_CHECK(want.names == dnames, "parameter names or order differ");
  for (std::size_t p = 0; p < want.grads.size() && p < dgrads.size(); ++p)
    close_scaled(dgrads[p], want.grads[p], tol.gradient, "gradient of " + want.names[p]);
}

//! One host function and its device twin on the same input: forward, then backward onto a
//! non-zero grad_in, compared output by output.
template <class T, class HostF, class DevF>
void compare_function(CudaContext& ctx, HostF& host, DevF& dev, const Shape& shape, bool training, std::int64_t step,
                      std::mt19937_64& rng) {
  const auto& tol = tolerances_for<T>();
  const auto n = static_cast<std::size_t>(shape.numel());
  const auto in = random_in<T>(n, rng), gout = random_in<T>(n, rng), g0 = random_in<T>(n, rng);
  compare_device<T>(ctx, dev, shape, in, gout, g0, training, step,
                    host_reference(host, shape, in, gout, g0, training, step));

  // Adding into a destination (the last GEMM's C): the same call decision on both backends,
  // and out = F(in) + scale * addend with the addend apart or being the destination itself.
  HostContext hctx;
  const ModuleCall<HostContext> hcall{hctx, kModule, step, kCallSeed, training};
  const ModuleCall<CudaContext> dcall{ctx, kModule, step, kCallSeed, training};
  GPU_CHECK(dev.adds_into(dcall) == host.adds_into(hcall), "host and device disagree on adds_into");
  if (!dev.adds_into(dcall)) return;
  std::vector<float> hsaved(host.saved_elements(shape));
  const Shape hshape{static_cast<std::int64_t>(hsaved.size())};
  auto din = to_device(ctx, to_type<T>(in));
  const std::size_t ns = dev.saved_elements(shape);
  auto dsaved = ctx.allocate<T>(ns, MemoryCategory::Other);
  const Shape sshape{static_cast<std::int64_t>(ns)};
  for (double scale : {1.0, -0.5}) {
    const auto addend = random_in<T>(n, rng);
    std::vector<float> hdst = addend;
    host.recompute_add(hcall, ConstView<float>(in.data(), shape), ConstView<float>(hdst.data(), shape), scale,
                       TensorView<float>(hdst.data(), shape), TensorView<float>(hsaved.data(), hshape));
    auto dsame = to_device(ctx, to_type<T>(addend)), dapart = to_device(ctx, to_type<T>(addend));
    auto dpoisoned = ctx.allocate<T>(n, MemoryCategory::Other);
    dev.recompute_add(dcall, ConstDeviceView<T>(din.data(), shape), ConstDeviceView<T>(dsame.data(), shape), scale, dsame.view(shape),
                      dsaved.view(sshape));
    dev.recompute_add(dcall, ConstDeviceView<T>(din.data(), shape), ConstDeviceView<T>(dapart.data(), shape), scale,
                      dpoisoned.view(shape), dsaved.view(sshape));
    GPU_CHECK_CLOSE(as_float(to_host(ctx, dsame.data(), n)), hdst, tol.function);
    GPU_CHECK_CLOSE(as_float(to_host(ctx, dpoisoned.data(), n)), hdst, tol.function);
  }
}

template <class T>
void linear_case(CudaContext& ctx, std::mt19937_64& rng) {
  const auto& tol = tolerances_for<T>();
  const std::int64_t rows = 21, in = 24, out = 40;
  Linear<float> host("fc", in, out);
  host.init(rng(), 0, 0.5);
  for (std::size_t i = 0; i < host.bias().size(); ++i) host.bias().value().data()[i] = static_cast<float>(i % 7) * 0.1f - 0.3f;
  // Host values representable in T.
  for (auto* p : {&host.weight(), &host.bias()}) {
    auto v = as_float(to_type<T>(std::vector<float>(p->data(), p->data() + p->size())));
    std::copy(v.begin(), v.end(), p->value().data());
  }
  CudaLinear<T> dev(ctx, "fc", in, out);
  dev.copy_from(host, "test");
  const auto x = random_in<T>(static_cast<std::size_t>(rows * in), rng);
  const auto dy = random_in<T>(static_cast<std::size_t>(rows * out), rng);
  std::vector<float> y(static_cast<std::size_t>(rows * out)), dx(x.size());
  HostContext hctx;
  host.forward(hctx, x.data(), rows, y.data());
  host.backward(hctx, x.data(), dy.data(), rows, dx.data());
  auto dxd = to_device(ctx, to_type<T>(x)), dyd = to_device(ctx, to_type<T>(dy));
  auto yd = ctx.allocate<T>(y.size(), MemoryCategory::Other), dxo = ctx.allocate<T>(x.size(), MemoryCategory::Other);
  dev.forward(ctx, dxd.data(), rows, yd.data());
  dev.backward(ctx, dxd.data(), dyd.data(), rows, dxo.data());
  GPU_CHECK_CLOSE(as_float(to_host(ctx, yd.data(), y.size())), y, tol.function);
  GPU_CHECK_CLOSE(as_float(to_host(ctx, dxo.data(), dx.size())), dx, tol.gradient);
  // y = x W^T + b + 0.75 * addend in one GEMM, into a poisoned destination.
  const auto addend = random_in<T>(y.size(), rng);
  std::vector<float> ya(y.size());
  host.forward_add(hctx, x.data(), rows, addend.data(), 0.75f, ya.data());
  auto da = to_device(ctx, to_type<T>(addend));
  auto yad = ctx.allocate<T>(y.size(), MemoryCategory::Other);
  dev.forward_add(ctx, dxd.data(), rows, da.data(), 0.75f, yad.data());
  GPU_CHECK_CLOSE(as_float(to_host(ctx, yad.data(), y.size())), ya, tol.function);
  close_scaled(as_float(to_host(ctx, dev.weight().grad_data(), dev.weight().size())),
               std::vector<float>(host.weight().grad().data(), host.weight().grad().data() + host.weight().size()),
               tol.gradient, "weight gradient");
  close_scaled(as_float(to_host(ctx, dev.bias().grad_data(), dev.bias().size())),
               std::vector<float>(host.bias().grad().data(), host.bias().grad().data() + host.bias().size()),
               tol.gradient, "bias gradient");
}

template <class T>
void function_cases(CudaContext& ctx, std::mt19937_64& rng, const char* type) {
  struct Case {
    std::int64_t batch, tokens, dim, heads;
    double drop_path, drop;
    bool training;
  };
  const Case cases[] = {{2, 7, 24, 3, 0.0, 0.0, true}, {3, 5, 32, 4, 0.25, 0.1, true}, {1, 13, 16, 2, 0.3, 0.2, false}};
  for (const Case& c : cases) {
    const Shape shape{c.batch, c.tokens, c.dim};
    const std::string tag = std::string(type) + " B" + std::to_string(c.batch) + " N" + std::to_string(c.tokens) + " D" +
                            std::to_string(c.dim) + " H" + std::to_string(c.heads) + (c.drop > 0 ? " drops" : "") +
                            (c.training ? "" : " inference");
    run_case("attention device vs host, " + tag, [&] {
      VitAttention<float> host({c.dim, c.heads, 1e-6, c.drop_path, c.drop}, rng());
      // Non-trivial LayerNorm parameters, representable in T.
      auto& w = host.norm1().weight();
      for (std::size_t i = 0; i < w.size(); ++i) w.value().data()[i] = static_cast<float>(T(1.0f + 0.05f * static_cast<float>(i % 5)));
      CudaVitAttention<T> dev(ctx, host);
      compare_function<T>(ctx, host, dev, shape, c.training, 7, rng);
    });
    run_case("mlp device vs host, " + tag, [&] {
      VitMlp<float> host({c.dim, 4 * c.dim, 1e-6, c.drop_path, c.drop}, rng());
      auto& b = host.norm2().bias();
      for (std::size_t i = 0; i < b.size(); ++i) b.value().data()[i] = static_cast<float>(T(0.01f * static_cast<float>(i % 3)));
      CudaVitMlp<T> dev(ctx, host);
      compare_function<T>(ctx, host, dev, shape, c.training, 7, rng);
    });
  }
}

//! A host Swin window-attention function with LayerNorm weights and a bias table far from
//! their initial values (the table's 0.02 would hide an indexing error), representable in T.
template <class T>
WindowAttention<float> window_host(const WindowGeometry& g, std::int64_t dim, std::int64_t heads, double drop_path,
                                   double drop, std::mt19937_64& rng) {
  WindowAttention<float> host(window_attention_config(dim, heads, g, 1e-5, drop_path, drop), rng());
  auto& w = host.norm1().weight();
  for (std::size_t i = 0; i < w.size(); ++i) w.value().data()[i] = static_cast<float>(T(1.0f + 0.05f * static_cast<float>(i % 5)));
  auto& table = host.relative_position_bias_table();
  const auto t = random_in<T>(table.size(), rng);
  std::copy(t.begin(), t.end(), table.value().data());
  return host;
}

//! CudaWindowAttention vs WindowAttention: shifted on both axes, on one axis (window 7: rows of
//! 49 tokens), unshifted with window == map, and a 3-D grid; token rows and the NHWC view.
template <class T>
void window_cases(CudaContext& ctx, std::mt19937_64& rng, const char* type) {
  struct Case {
    std::array<std::int64_t, 3> grid, window;
    int block;
    std::int64_t batch, dim, heads;
    double drop_path, drop;
    bool training, nhwc;
  };
  const Case cases[] = {{{1, 8, 8}, {1, 4, 4}, 1, 2, 24, 3, 0.0, 0.0, true, false},
                        {{1, 14, 7}, {1, 7, 7}, 1, 2, 32, 2, 0.25, 0.1, true, true},
                        {{1, 8, 8}, {1, 8, 8}, 1, 3, 16, 2, 0.0, 0.0, false, false},
                        {{4, 4, 8}, {2, 2, 4}, 1, 2, 16, 2, 0.0, 0.1, true, false}};
  for (const Case& c : cases) {
    const WindowGeometry g = swin_block_geometry(c.grid, c.window, c.block);
    const Shape shape = c.nhwc ? Shape{c.batch, c.grid[1], c.grid[2], c.dim} : Shape{c.batch, g.grid_tokens(), c.dim};
    const std::string tag = std::string(type) + " grid " + std::to_string(c.grid[0]) + "x" + std::to_string(c.grid[1]) +
                            "x" + std::to_string(c.grid[2]) + " window " + std::to_string(g.window[1]) + " shift " +
                            std::to_string(g.shift[0]) + "," + std::to_string(g.shift[1]) + "," +
                            std::to_string(g.shift[2]) + " B" + std::to_string(c.batch) + " C" + std::to_string(c.dim) +
                            " H" + std::to_string(c.heads) + (c.drop > 0 ? " drops" : "") +
                            (c.training ? "" : " inference") + (c.nhwc ? " NHWC" : "");
    run_case("window attention device vs host, " + tag, [&] {
      WindowAttention<float> host = window_host<T>(g, c.dim, c.heads, c.drop_path, c.drop, rng);
      CudaWindowAttention<T> dev(ctx, host);
      compare_function<T>(ctx, host, dev, shape, c.training, 7, rng);
    });
  }
}

//! Two fresh device twins on the same input and call: every output and gradient (the bias
//! table's, summed over windows and pairs without atomics) bit for bit equal.
void window_determinism_case(CudaContext& ctx, std::mt19937_64& rng) {
  const WindowGeometry g = swin_block_geometry({16, 16}, 4, 1);
  const Shape shape{4, 256, 32};
  const auto n = static_cast<std::size_t>(shape.numel());
  WindowAttention<float> host = window_host<float>(g, 32, 4, 0.0, 0.1, rng);
  const auto in = random_values<float>(n, rng), gout = random_values<float>(n, rng);
  std::vector<std::vector<float>> runs;
  for (int run = 0; run < 2; ++run) {
    CudaWindowAttention<float> dev(ctx, host);
    const ModuleCall<CudaContext> call{ctx, kModule, 7, kCallSeed, true};
    auto din = to_device(ctx, in), dgout = to_device(ctx, gout), dgin = to_device(ctx, std::vector<float>(n, 0.0f));
    auto dout = ctx.allocate<float>(n, MemoryCategory::Other);
    auto saved = ctx.allocate<float>(dev.saved_elements(shape), MemoryCategory::Other);
    const Shape sshape{static_cast<std::int64_t>(saved.size())};
    dev.recompute(call, ConstDeviceView<float>(din.data(), shape), dout.view(shape), saved.view(sshape));
    dev.backward(call, ConstDeviceView<float>(din.data(), shape), ConstDeviceView<float>(saved.data(), sshape),
                 ConstDeviceView<float>(dgout.data(), shape), dgin.view(shape));
    std::vector<float> all = to_host(ctx, dout.data(), n);
    const auto gi = to_host(ctx, dgin.data(), n);
    all.insert(all.end(), gi.begin(), gi.end());
    dev.for_each_parameter([&](std::string_view, DeviceView<float>, DeviceView<float> gr) {
      const auto h = to_host(ctx, gr.data(), gr.size());
      all.insert(all.end(), h.begin(), h.end());
    });
    runs.push_back(all);
  }
  GPU_CHECK(runs[0].size() == runs[1].size() &&
                std::memcmp(runs[0].data(), runs[1].data(), runs[0].size() * sizeof(float)) == 0,
            "two device runs differ");
}

using HostLayer = VitLayer<float, ConstantSchedule>;
using DevLayer = CudaVitLayer<float, ConstantSchedule>;
using HostFixedLayer = VitLayer<float, ConstantSchedule, FixedFp32>;
using DevFixedLayer = CudaVitLayer<float, ConstantSchedule, FixedFp32>;

//! One training step of a stack, widened to double (exact for every value type in play), so
//! that stacks of any precision policy compare through one type.
struct StepResult {
  std::vector<double> out, dh0;
  std::vector<std::vector<double>> grads;
  std::vector<std::string> names;
};

//! forward at step 3 and backward (given h0) on the host; h0 and dout (float values) are
//! converted to the stack's value type.
template <class Layer>
StepResult host_step(ReversibleStack<Layer>& s, const Shape& shape, const std::vector<float>& h0f,
                     const std::vector<float>& doutf) {
  using V = typename ReversibleStack<Layer>::value_type;
  const auto h0 = converted<V>(h0f), dout = converted<V>(doutf);
  std::vector<V> out(h0.size()), dh0(h0.size());
  s.zero_grad();
  s.forward(ConstView<V>(h0.data(), shape), TensorView<V>(out.data(), shape), 3);
  s.backward(ConstView<V>(dout.data(), shape), TensorView<V>(dh0.data(), shape), ConstView<V>(h0.data(), shape));
  StepResult r{converted<double>(out), converted<double>(dh0), {}, {}};
  for (auto& p : s.parameters()) {
    r.names.push_back(p.name);
    r.grads.push_back(converted<double>(std::vector(p.grad.data(), p.grad.data() + p.grad.size())));
  }
  return r;
}

//! The same step on a device stack.
template <class Layer>
StepResult device_step(CudaContext& ctx, ReversibleStack<Layer>& s, const Shape& shape, const std::vector<float>& h0,
                       const std::vector<float>& dout) {
  using V = typename ReversibleStack<Layer>::value_type;
  const std::size_t n = h0.size();
  auto dh = to_device(ctx, converted<V>(h0)), dd = to_device(ctx, converted<V>(dout));
  auto out = ctx.allocate<V>(n, MemoryCategory::Other), dh0 = ctx.allocate<V>(n, MemoryCategory::Other);
  s.zero_grad();
  s.forward(ConstDeviceView<V>(dh.data(), shape), out.view(shape), 3);
  s.backward(ConstDeviceView<V>(dd.data(), shape), dh0.view(shape), ConstDeviceView<V>(dh.data(), shape));
  StepResult r{converted<double>(to_host(ctx, out.data(), n)), converted<double>(to_host(ctx, dh0.data(), n)), {}, {}};
  for (auto& p : s.parameters()) {
    r.names.push_back(p.name);
    r.grads.push_back(converted<double>(to_host(ctx, p.grad.data(), p.grad.size())));
  }
  return r;
}

//! Output, dh0 and parameter gradients within `tol`; `what` (with the case's name) says which
//! comparison of a case failed.
void compare_steps(const StepResult& got, const StepResult& want, Tolerance tol, const std::string& what = "stack") {
  all_close(got.out, want.out, tol, (what + ": output").c_str(), __FILE__, __LINE__);
  all_close(got.dh0, want.dh0, tol, (what + ": dh0").c_str(), __FILE__, __LINE__);
  GPU_CHECK(got.names == want.names, what + ": parameter names differ");
  for (std::size_t p = 0; p < got.grads.size() && p < want.grads.size(); ++p)
    close_scaled(got.grads[p], want.grads[p], tol, what + ": gradient of " + want.names[p]);
}

//! The device twin of a host function type, computing in T.
template <class HostF, class T>
struct device_twin_of;
template <class T>
struct device_twin_of<VitAttention<float>, T> {
  using type = CudaVitAttention<T>;
};
template <class T>
struct device_twin_of<VitMlp<float>, T> {
  using type = CudaVitMlp<T>;
};

//! Inputs of one long-row comparison: bf16 values, so the host and the fp32, bf16 and fp16
//! twins all start from the same numbers.
struct LongRowData {
  std::vector<float> in, gout, g0;
};

template <class T, class HostF>
void long_row_device_case(CudaContext& ctx, HostF& host, const std::string& what, const char* type, const Shape& shape,
                          const LongRowData& data, const FunctionResult& want) {
  run_case(what + ", device " + type + " vs host", [&] {
    typename device_twin_of<HostF, T>::type dev(ctx, host);
    compare_device<T>(ctx, dev, shape, data.in, data.gout, data.g0, true, 7, want);
  });
}

//! One host reference (a training call, dropout on) and the device twins in fp32, bf16 and
//! fp16 against it; `host`'s parameters are rounded to bf16 first.
template <class HostF>
void long_row_function(CudaContext& ctx, std::mt19937_64& rng, const std::string& what, HostF& host,
                       const Shape& shape) {
  round_parameters_to<__nv_bfloat16>(host);
  const auto n = static_cast<std::size_t>(shape.numel());
  using Bf16 = __nv_bfloat16;
  const LongRowData data{random_in<Bf16>(n, rng), random_in<Bf16>(n, rng), random_in<Bf16>(n, rng)};
  FunctionResult want;
  bool have_reference = false;
  run_case(what + ", host reference", [&] {
    want = host_reference(host, shape, data.in, data.gout, data.g0, true, 7);
    bool finite = all_finite(want.out) && all_finite(want.gin);
    for (const auto& g : want.grads) finite = finite && all_finite(g);
    have_reference = GPU_CHECK(finite, "the host reference holds non-finite values");
  });
  if (!have_reference) return;
  long_row_device_case<float>(ctx, host, what, "fp32", shape, data, want);
  long_row_device_case<__nv_bfloat16>(ctx, host, what, "bf16", shape, data, want);
  long_row_device_case<__half>(ctx, host, what, "fp16", shape, data, want);
}

//! Rows longer than the small cases': LayerNorm over D = 768 and 1024 (past 256), softmax
//! over N = 197 and 1568 keys (past 128 and 1024). The batch stays at 1-2 so that the host
//! reference (most of this test's time) stays short; drop-path is off (with one sample it
//! would drop the whole output), dropout is on.
void long_row_cases(CudaContext& ctx, std::mt19937_64& rng, bool quick) {
  struct Case {
    std::int64_t batch, tokens, dim, heads;
  };
  const Case cases[] = {{2, 197, 768, 12}, {1, 197, 1024, 16}, {1, 1568, 768, 12}};
  for (const Case& c : cases) {
    if (quick && c.tokens > 197) continue;
    const Shape shape{c.batch, c.tokens, c.dim};
    const std::string tag = "B" + std::to_string(c.batch) + " N" + std::to_string(c.tokens) + " D" +
                            std::to_string(c.dim) + " H" + std::to_string(c.heads) + " dropout 0.1";
    {
      VitAttention<float> host({c.dim, c.heads, 1e-6, 0.0, 0.1}, rng());
      auto& w = host.norm1().weight();  // non-trivial LayerNorm parameters
      for (std::size_t i = 0; i < w.size(); ++i) w.value().data()[i] = 1.0f + 0.05f * static_cast<float>(i % 5);
      long_row_function(ctx, rng, "attention, long rows, " + tag, host, shape);
    }
    {
      VitMlp<float> host({c.dim, 4 * c.dim, 1e-6, 0.0, 0.1}, rng());
      auto& b = host.norm2().bias();
      for (std::size_t i = 0; i < b.size(); ++i) b.value().data()[i] = 0.01f * static_cast<float>(i % 3);
      long_row_function(ctx, rng, "mlp, long rows, " + tag, host, shape);
    }
  }
}

//! A ViT stack under device policy P (compute type T) against the host stack of the same
//! layers (host compute type U, policy HP; parameters rounded to T so both hold the same
//! values), reversible and standard; then reversible vs standard on the device. `tol` is the
//! tolerance row of the precision that limits P. Where F computes in fewer than fp32's bits, a
//! reconstructed stream that rounds differently into F changes F's output by an ulp of that
//! precision, so the guard's threshold is raised to the tolerance (default 1e-4 otherwise).
template <class T, class P, class U, class HP>
void policy_stack_cases(CudaContext& ctx, std::mt19937_64& rng, const std::string& policy, Tolerance tol) {
  using HostL = VitLayer<U, ConstantSchedule, HP>;
  using DevL = CudaVitLayer<T, ConstantSchedule, P>;
  const VitLayerConfig cfg{32, 4, 64, 1e-6, 0.2, 0.1, DropPathRule::Linear};
  const Shape shape{2, 9, 32};
  const auto n = static_cast<std::size_t>(shape.numel());
  const ConstantSchedule sched(0.5, 0.5);
  const double guard = std::max(ReconstructionGuard{}.max_relative_error, tol.rtol);
  const auto host_layers = [&](std::uint64_t seed) {
    auto layers = make_vit_layers<U, ConstantSchedule, HP>(3, cfg, seed);
    for (auto& l : layers) {
      round_parameters_to<T>(l.f());
      round_parameters_to<T>(l.g());
    }
    return layers;
  };
  for (BackpropMode mode : {BackpropMode::Reversible, BackpropMode::Standard}) {
    run_case(policy + " ViT stack on device vs host, " + std::string(mode_name(mode)), [&] {
      const StackOptions o{.mode = mode, .seed = 77, .guard = {.max_relative_error = guard}};
      auto hl = host_layers(rng());
      ReversibleStack<DevL> dev(ctx, cuda_vit_layers_from<T, ConstantSchedule, P>(ctx, hl), sched, o);
      HostContext hctx;
      ReversibleStack<HostL> host(hctx, std::move(hl), sched, o);
      const auto h0 = random_values<float>(n, rng), dout = random_values<float>(n, rng);
      compare_steps(device_step(ctx, dev, shape, h0, dout), host_step(host, shape, h0, dout), tol);
    });
  }
  run_case(policy + " ViT stack: reversible vs standard on device", [&] {
    const auto hl = host_layers(rng());
    ReversibleStack<DevL> rev(ctx, cuda_vit_layers_from<T, ConstantSchedule, P>(ctx, hl), sched,
                              {.mode = BackpropMode::Reversible, .seed = 3, .guard = {.max_relative_error = guard}});
    ReversibleStack<DevL> std_(ctx, cuda_vit_layers_from<T, ConstantSchedule, P>(ctx, hl), sched,
                               {.mode = BackpropMode::Standard, .seed = 3});
    const auto h0 = random_values<float>(n, rng), dout = random_values<float>(n, rng);
    compare_steps(device_step(ctx, rev, shape, h0, dout), device_step(ctx, std_, shape, h0, dout), tol);
  });
}

//! CudaPatchMerging (PatchMerging<T, CudaContext>) vs the host layer: output, din (written over
//! a poisoned buffer) and the three parameter gradients, on a 2-D map and on a 3-D one viewed
//! as [B, T*H, W, C]; what forward keeps is on the device meter exactly saved_bytes() until
//! backward releases it.
template <class T>
void patch_merging_case(CudaContext& ctx, std::mt19937_64& rng, const char* type) {
  const auto& tol = tolerances_for<T>();
  for (const Shape shape : {Shape{2, 6, 8, 24}, Shape{2, 3 * 4, 6, 16}}) {
    run_case(std::string("patch merging device vs host, ") + type + " " + shape.str(), [&] {
      HostContext hctx;
      PatchMerging<float> host(hctx, {shape[3]}, rng());
      host.for_each_parameter([&](std::string_view name, TensorView<float> v, TensorView<float>) {
        const bool w = name == "norm.weight";
        const auto r = random_in<T>(v.size(), rng);
        for (std::size_t i = 0; i < v.size(); ++i) v.data()[i] = representable_in<T>(w ? 1.0f + 0.5f * r[i] : r[i]);
      });
      PatchMerging<T, CudaContext> dev(ctx, host);
      const Shape os = host.output_shape(shape);
      GPU_CHECK(dev.output_shape(shape) == os, "device output shape " + dev.output_shape(shape).str());
      const auto n = static_cast<std::size_t>(shape.numel()), no = static_cast<std::size_t>(os.numel());
      const auto in = random_in<T>(n, rng), gout = random_in<T>(no, rng);
      std::vector<float> out(no), din(n);
      host.forward(hctx, ConstView<float>(in.data(), shape), TensorView<float>(out.data(), os));
      host.backward(hctx, ConstView<float>(gout.data(), os), TensorView<float>(din.data(), shape));

      auto d_in = to_device(ctx, to_type<T>(in)), d_gout = to_device(ctx, to_type<T>(gout));
      auto d_out = ctx.allocate<T>(no, MemoryCategory::Other), d_din = ctx.allocate<T>(n, MemoryCategory::Other);
      const std::size_t saved_before = ctx.meter().current(MemoryCategory::SavedActivations);
      dev.forward(ctx, ConstDeviceView<T>(d_in.data(), shape), d_out.view(os));
      GPU_CHECK(ctx.meter().current(MemoryCategory::SavedActivations) - saved_before == dev.saved_bytes(shape),
                "saved bytes on the meter differ from saved_bytes()");
      dev.backward(ctx, ConstDeviceView<T>(d_gout.data(), os), d_din.view(shape));
      GPU_CHECK(ctx.meter().current(MemoryCategory::SavedActivations) == saved_before, "backward kept its saved rows");
      GPU_CHECK_CLOSE(as_float(to_host(ctx, d_out.data(), no)), out, tol.function);
      GPU_CHECK_CLOSE(as_float(to_host(ctx, d_din.data(), n)), din, tol.gradient);
      std::vector<std::vector<float>> want;
      host.for_each_parameter([&](std::string_view, TensorView<float>, TensorView<float> g) {
        want.emplace_back(g.data(), g.data() + g.size());
      });
      std::size_t p = 0;
      dev.for_each_parameter([&](std::string_view name, DeviceView<T> v, DeviceView<T> g) {
        GPU_CHECK(p < want.size() && v.size() == want[p].size(), "parameter " + std::string(name));
        if (p < want.size()) close_scaled(as_float(to_host(ctx, g.data(), g.size())), want[p], tol.gradient,
                                          "gradient of " + std::string(name));
        ++p;
      });
      GPU_CHECK(p == 3, "the merge has norm.weight, norm.bias and reduction.weight");
    });
  }
}

//! Stages on the device: a ViT stack, a merge and a stack at twice the width against the host
//! composition of the same weights (output, dh0, every gradient by its prefixed name).
void stages_case(CudaContext& ctx, std::mt19937_64& rng) {
  run_case("fp32 Stages (stack, patch merging, stack) on device vs host", [&] {
    const std::int64_t B = 2, H = 4, W = 6, C = 16;
    const ConstantSchedule sched(0.5, 0.5);
    const StackOptions o{.seed = 5};
    HostContext hctx;
    auto hl0 = make_vit_layers<float, ConstantSchedule>(2, C, 2, 2 * C, 1e-6, 0.0, rng());
    auto hl1 = make_vit_layers<float, ConstantSchedule>(2, 2 * C, 4, 4 * C, 1e-6, 0.0, rng());
    PatchMerging<float> hmerge(hctx, {C}, rng());
    PatchMerging<float, CudaContext> dmerge(ctx, hmerge);
    Stages dev(ctx, Shape{B, H, W, C},
               stage_part("layers.0.", ReversibleStack<DevLayer>(ctx, cuda_vit_layers_from<float, ConstantSchedule>(ctx, hl0), sched, o),
                          Shape{B, H * W, C}),
               stage_part("layers.1.downsample.", std::move(dmerge)),
               stage_part("layers.1.", ReversibleStack<DevLayer>(ctx, cuda_vit_layers_from<float, ConstantSchedule>(ctx, hl1), sched, o),
                          Shape{B, H * W / 4, 2 * C}));
    Stages host(hctx, Shape{B, H, W, C},
                stage_part("layers.0.", ReversibleStack<HostLayer>(hctx, std::move(hl0), sched, o), Shape{B, H * W, C}),
                stage_part("layers.1.downsample.", std::move(hmerge)),
                stage_part("layers.1.", ReversibleStack<HostLayer>(hctx, std::move(hl1), sched, o),
                           Shape{B, H * W / 4, 2 * C}));
    const Shape in{B, H, W, C}, os = host.output_shape(B);
    const auto n = static_cast<std::size_t>(in.numel()), no = static_cast<std::size_t>(os.numel());
    const auto h0 = random_values<float>(n, rng), dout = random_values<float>(no, rng);
    std::vector<float> out(no), dh0(n);
    host.forward(ConstView<float>(h0.data(), in), TensorView<float>(out.data(), os), 3);
    host.backward(ConstView<float>(dout.data(), os), TensorView<float>(dh0.data(), in));
    auto d_h0 = to_device(ctx, h0), d_dout = to_device(ctx, dout);
    auto d_out = ctx.allocate<float>(no, MemoryCategory::Other), d_dh0 = ctx.allocate<float>(n, MemoryCategory::Other);
    dev.forward(ConstDeviceView<float>(d_h0.data(), in), d_out.view(os), 3);
    dev.backward(ConstDeviceView<float>(d_dout.data(), os), d_dh0.view(in));
    const auto& tol = tolerances_for<float>().gradient;
    GPU_CHECK_CLOSE(to_host(ctx, d_out.data(), no), out, tol);
    GPU_CHECK_CLOSE(to_host(ctx, d_dh0.data(), n), dh0, tol);
    const auto want = host.parameters();
    const auto got = dev.parameters();
    GPU_CHECK(got.size() == want.size(), "parameter counts differ");
    for (std::size_t p = 0; p < got.size() && p < want.size(); ++p) {
      GPU_CHECK(got[p].name == want[p].name, "parameter " + got[p].name + " vs " + want[p].name);
      close_scaled(to_host(ctx, got[p].grad.data(), got[p].grad.size()),
                   std::vector<float>(want[p].grad.data(), want[p].grad.data() + want[p].grad.size()), tol,
                   "gradient of " + want[p].name);
    }
    const auto r = dev.memory_report();
    GPU_CHECK(r.of(MemoryCategory::SavedActivations) > 0 && r.activation_bytes <= ctx.meter().current_activation(),
              "device memory report: " + r.str());
  });
}

}  // namespace

int main() {
  skip_without_device();
  const std::uint64_t seed = (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  CudaContext ctx({.poison_allocations = true});
  // DR2NET_GPU_TEST_QUICK (set by scripts/gpu-check under compute-sanitizer) drops the N = 1568 shape.
  const bool quick = std::getenv("DR2NET_GPU_TEST_QUICK") != nullptr;

  run_case("linear fp32", [&] { linear_case<float>(ctx, rng); });
  run_case("linear bf16", [&] { linear_case<__nv_bfloat16>(ctx, rng); });
  run_case("linear fp16", [&] { linear_case<__half>(ctx, rng); });
  function_cases<float>(ctx, rng, "fp32");
  function_cases<__nv_bfloat16>(ctx, rng, "bf16");
  function_cases<__half>(ctx, rng, "fp16");
  window_cases<float>(ctx, rng, "fp32");
  window_cases<__nv_bfloat16>(ctx, rng, "bf16");
  window_cases<__half>(ctx, rng, "fp16");
  run_case("window attention on device: outputs and gradients bit for bit across runs",
           [&] { window_determinism_case(ctx, rng); });
  long_row_cases(ctx, rng, quick);
  patch_merging_case<float>(ctx, rng, "fp32");
  patch_merging_case<__nv_bfloat16>(ctx, rng, "bf16");
  stages_case(ctx, rng);

  run_case("drop masks: device bit for bit as host", [&] {
    HostContext hctx;
    const std::size_t n = 4099;
    const ModuleCall<HostContext> hcall{hctx, 9, (std::int64_t{1} << 33) + 5, 0xABCDEF0123ull, true};
    const ModuleCall<CudaContext> dcall{ctx, 9, (std::int64_t{1} << 33) + 5, 0xABCDEF0123ull, true};
    const auto hs = make_drop_scale<float>(hcall, 0.3, 0.15, RandomPurpose::OutputDropout, 37);
    const auto ds = make_drop_scale<float>(dcall, 0.3, 0.15, RandomPurpose::OutputDropout, 37);
    std::vector<float> ones(n, 1.0f), want(n);
    for_each_index(hctx, n, DropApply<float>{want.data(), ones.data(), hs});
    auto d = to_device(ctx, ones);
    for_each_index(ctx, n, DropApply<float>{d.data(), d.data(), ds});
    const auto got = to_host(ctx, d.data(), n);
    GPU_CHECK(std::memcmp(got.data(), want.data(), n * sizeof(float)) == 0, "drop mask differs from the host's");
  });

  const VitLayerConfig cfg{32, 4, 64, 1e-6, 0.2, 0.1, DropPathRule::Linear};
  const Shape shape{2, 9, 32};
  const auto n = static_cast<std::size_t>(shape.numel());
  for (BackpropMode mode : {BackpropMode::Reversible, BackpropMode::Standard}) {
    run_case(std::string("fp32 ViT stack on device vs host, ") + std::string(mode_name(mode)), [&] {
      HostContext hctx;
      auto hl = make_vit_layers<float, ConstantSchedule>(3, cfg, 11);
      ReversibleStack<DevLayer> dev(ctx, make_cuda_vit_layers<float, ConstantSchedule>(ctx, 3, cfg, 11),
                                    ConstantSchedule(0.5, 0.5), {.mode = mode, .seed = 77});
      ReversibleStack<HostLayer> host(hctx, std::move(hl), ConstantSchedule(0.5, 0.5), {.mode = mode, .seed = 77});
      const auto h0 = random_values<float>(n, rng), dout = random_values<float>(n, rng);
      compare_steps(device_step(ctx, dev, shape, h0, dout), host_step(host, shape, h0, dout),
                    tolerances_for<float>().gradient);
    });
  }

  // Policies: the host reference of the same layers in the stream type (fp64 streams: fp64
  // functions), tolerances of the precision that limits the device result (TF32 rounds GEMM
  // inputs to fp16's 11-bit significand).
  policy_stack_cases<double, Fp64, double, Fp64>(ctx, rng, "Fp64", tolerances(PrecisionKind::Fp64).gradient);
  policy_stack_cases<float, Fp32AllowTf32, float, Fp32>(ctx, rng, "Fp32AllowTf32",
                                                        tolerances(PrecisionKind::Fp16).gradient);
  policy_stack_cases<__nv_bfloat16, Bf16ComputeFp64Streams, double, Fp64>(ctx, rng, "Bf16ComputeFp64Streams",
                                                                          tolerances(PrecisionKind::Bf16).gradient);
  policy_stack_cases<__half, Fp16ComputeFp32Streams, float, Fp32>(ctx, rng, "Fp16ComputeFp32Streams",
                                                                  tolerances(PrecisionKind::Fp16).gradient);

  run_case("fp32 ViT stack, error-bounded mode, MeanOfStreams output, on device vs host", [&] {
    // At (0.5, 0.5) the first step's plan (error scale 8, stream tolerance 1e-5) stores some
    // boundaries of the six and reconstructs the rest: both paths of the mode run.
    const ConstantSchedule sched(0.5, 0.5);
    const StackOptions o{.mode = BackpropMode::ErrorBounded, .output = StackOutput::MeanOfStreams, .seed = 77};
    auto hl = make_vit_layers<float, ConstantSchedule>(3, cfg, rng());
    ReversibleStack<DevLayer> dev(ctx, cuda_vit_layers_from<float, ConstantSchedule>(ctx, hl), sched, o);
    HostContext hctx;
    ReversibleStack<HostLayer> host(hctx, std::move(hl), sched, o);
    const auto h0 = random_values<float>(n, rng), dout = random_values<float>(n, rng);
    const auto want = host_step(host, shape, h0, dout);
    const auto got = device_step(ctx, dev, shape, h0, dout);
    const auto hb = host.snapshot_boundaries(), db = dev.snapshot_boundaries();
    GPU_CHECK(!hb.empty() && static_cast<int>(hb.size()) < dev.num_modules() - 1,
              "the host plan stores " + std::to_string(hb.size()) +
                  " snapshots: this point no longer mixes both paths");
    GPU_CHECK(db == hb, "device snapshot boundaries differ from the host's: " + std::to_string(db.size()) + " vs " +
                            std::to_string(hb.size()));
    GPU_CHECK(dev.reconstruction().snapshots == host.reconstruction().snapshots,
              "device: " + dev.reconstruction().describe() + "; host: " + host.reconstruction().describe());
    compare_steps(got, want, tolerances_for<float>().gradient);
  });

  run_case("ViT stack: reversible vs standard on device", [&] {
    ReversibleStack<DevLayer> rev(ctx, make_cuda_vit_layers<float, ConstantSchedule>(ctx, 4, cfg, 5),
                                  ConstantSchedule(0.0, 1.0), {.mode = BackpropMode::Reversible, .seed = 3});
    ReversibleStack<DevLayer> std_(ctx, make_cuda_vit_layers<float, ConstantSchedule>(ctx, 4, cfg, 5),
                                   ConstantSchedule(0.0, 1.0), {.mode = BackpropMode::Standard, .seed = 3});
    const auto h0 = random_values<float>(n, rng), dout = random_values<float>(n, rng);
    const auto a = device_step(ctx, rev, shape, h0, dout), b = device_step(ctx, std_, shape, h0, dout);
    GPU_CHECK(a.out == b.out, "all modes share the forward arithmetic: outputs must be bitwise equal");
    compare_steps(a, b, tolerances_for<float>().gradient);
  });

  run_case("ViT stack, exact mode (FixedFp32) on device: reversible == standard bit for bit, vs host", [&] {
    for (const auto& ab : {std::pair<double, double>{1.0, 0.1}, std::pair<double, double>{0.5, 0.5}}) {
      const std::string at = "(alpha, beta) = (" + std::to_string(ab.first) + ", " + std::to_string(ab.second) + ")";
      const ConstantSchedule sched(ab.first, ab.second);
      ReversibleStack<DevFixedLayer> rev(ctx, make_cuda_vit_layers<float, ConstantSchedule, FixedFp32>(ctx, 3, cfg, 11),
                                         sched, {.mode = BackpropMode::Reversible, .seed = 77});
      ReversibleStack<DevFixedLayer> std_(ctx, make_cuda_vit_layers<float, ConstantSchedule, FixedFp32>(ctx, 3, cfg, 11),
                                          sched, {.mode = BackpropMode::Standard, .seed = 77});
      HostContext hctx;
      ReversibleStack<HostFixedLayer> host(hctx, make_vit_layers<float, ConstantSchedule, FixedFp32>(3, cfg, 11), sched,
                                           {.mode = BackpropMode::Reversible, .seed = 77});
      const auto h0 = random_values<float>(n, rng), dout = random_values<float>(n, rng);
      const auto a = device_step(ctx, rev, shape, h0, dout), b = device_step(ctx, std_, shape, h0, dout);
      GPU_CHECK(a.out == b.out && a.dh0 == b.dh0 && a.grads == b.grads,
                "device reversible and standard differ (a device function is not deterministic?) " + at);
      GPU_CHECK(rev.reconstruction().exact && rev.reconstruction().measured && rev.reconstruction().relative_error == 0.0,
                "reconstruction: " + rev.reconstruction().describe() + " " + at);
      const auto x0 = to_host(ctx, rev.reconstructed_x().data(), n), y0 = to_host(ctx, rev.reconstructed_y().data(), n);
      bool inputs = true;
      for (std::size_t i = 0; i < n; ++i) {
        bool bad = false;
        const std::int64_t q = fixed::quantize(static_cast<double>(h0[i]), FixedPoint<32>::scale, bad);
        inputs = inputs && x0[i].raw == q && y0[i].raw == q;
      }
      GPU_CHECK(inputs, "reconstructed x_0, y_0 are not the quantized h0 " + at);
      compare_steps(a, host_step(host, shape, h0, dout), tolerances_for<float>().gradient, "device vs host " + at);
    }
  });

  run_case("ViT stack: peak activation bytes equal for 12 and 24 layers (reversible)", [&] {
    const VitLayerConfig small{16, 2, 32, 1e-6, 0.0, 0.0, DropPathRule::Linear};
    const Shape s{2, 5, 16};
    const auto m = static_cast<std::size_t>(s.numel());
    std::vector<std::size_t> peaks;
    for (int L : {12, 24}) {
      ReversibleStack<DevLayer> dev(ctx, make_cuda_vit_layers<float, ConstantSchedule>(ctx, L, small, 1),
                                    ConstantSchedule(0.0, 1.0));
      const auto h0 = random_values<float>(m, rng), dout = random_values<float>(m, rng);
      ctx.meter().reset_peaks();
      const auto base = ctx.meter().current_activation();
      device_step(ctx, dev, s, h0, dout);
      peaks.push_back(ctx.meter().peak_activation() - base);
      dev.release_workspace();
    }
    GPU_CHECK(peaks[0] == peaks[1], "peak activation bytes: " + std::to_string(peaks[0]) + " (12 layers) vs " +
                                        std::to_string(peaks[1]) + " (24 layers)");
  });

  run_case("ViT stack on device: every parameter and gradient byte metered once", [&] {
    CudaContext fresh;  // a meter of its own
    const VitLayerConfig small{16, 2, 32, 1e-6, 0.0, 0.0, DropPathRule::Linear};
    {
      auto layers = make_cuda_vit_layers<float, ConstantSchedule>(fresh, 2, small, 1);
      GPU_CHECK(fresh.meter().current_total() == 0, "layers outside a stack metered:\n" + fresh.meter().report());
      ReversibleStack<DevLayer> dev(fresh, std::move(layers), ConstantSchedule(0.0, 1.0));
      std::size_t bytes = 0;
      for (const auto& p : dev.parameters()) bytes += p.value.size() * sizeof(float);
      const MemoryMeter& m = fresh.meter();
      GPU_CHECK(m.current(MemoryCategory::Parameters) == bytes && m.current(MemoryCategory::Gradients) == bytes &&
                    m.current(MemoryCategory::Other) == 0 && m.peak_total() == 2 * bytes,
                "expected " + std::to_string(bytes) + " bytes of parameters and of gradients, once:\n" + m.report());
    }
    GPU_CHECK(fresh.meter().current_total() == 0, "bytes left on the meter:\n" + fresh.meter().report());
  });

  run_case("Swin stack (window attention + MLP, block 1 shifted) on device vs host, and reversible vs standard", [&] {
    using HostSwin = ReversibleDualResidual<WindowAttention<float>, VitMlp<float>, ConstantSchedule, Fp32>;
    using DevSwin = ReversibleDualResidual<CudaWindowAttention<float>, CudaVitMlp<float>, ConstantSchedule, Fp32>;
    const std::int64_t C = 32;
    std::vector<HostSwin> host_layers;
    std::vector<DevSwin> dev_layers, dev_std_layers;
    for (int j = 0; j < 2; ++j) {
      WindowAttention<float> f = window_host<float>(swin_block_geometry({14, 14}, 7, j), C, 2, 0.1, 0.0, rng);
      VitMlp<float> g({C, 4 * C, 1e-5, 0.1, 0.0}, rng());
      dev_layers.emplace_back(CudaWindowAttention<float>(ctx, f), CudaVitMlp<float>(ctx, g));
      dev_std_layers.emplace_back(CudaWindowAttention<float>(ctx, f), CudaVitMlp<float>(ctx, g));
      host_layers.emplace_back(std::move(f), std::move(g));
    }
    const ConstantSchedule sched(0.5, 0.5);
    HostContext hctx;
    ReversibleStack<HostSwin> host(hctx, std::move(host_layers), sched, {.seed = 21});
    ReversibleStack<DevSwin> rev(ctx, std::move(dev_layers), sched, {.mode = BackpropMode::Reversible, .seed = 21});
    ReversibleStack<DevSwin> std_(ctx, std::move(dev_std_layers), sched, {.mode = BackpropMode::Standard, .seed = 21});
    const Shape shape{2, 196, C};
    const auto m = static_cast<std::size_t>(shape.numel());
    const auto h0 = random_values<float>(m, rng), dout = random_values<float>(m, rng);
    const auto a = device_step(ctx, rev, shape, h0, dout), b = device_step(ctx, std_, shape, h0, dout);
    GPU_CHECK(a.out == b.out, "all modes share the forward arithmetic: outputs must be bitwise equal");
    compare_steps(a, b, tolerances_for<float>().gradient, "device reversible vs standard");
    compare_steps(a, host_step(host, shape, h0, dout), tolerances_for<float>().gradient, "device vs host");
  });

  ctx.synchronize();
  return finish();
}
