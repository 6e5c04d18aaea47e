#pragma once
// A residual function written by a user, once, over the backend: GatedMlp<T, Ctx> is a gated
// MLP over each token row x in R^D,
//
//   u    = x W_up^T + b_up                  [M, 2H]  one GEMM: value half v = u[:, :H],
//                                                    gate half g = u[:, H:]
//   a    = tanh(v) * sigmoid(g) * m         [M, H]   m: the hidden dropout mask (Philox)
//   F(x) = a W_down^T + b_down              [M, D]
//
// (M = the rows of the stream, B N for [B, N, D]). GatedMlp<T> (Ctx = HostContext) is the
// host function, the oracle; GatedMlp<T, CudaContext> is the same code on the device:
//   - the GEMMs and the bias gradients are the library's primitives (gemm_bias_add, gemm,
//     column_sums_add), which have the same names and contracts on both backends;
//   - the gate is this file's own elementwise functors, run by a host loop or by this file's
//     own CUDA kernel launched on the context's stream (run_gate below);
//   - the parameters are dr2net::parameter_t<T, Ctx>: Parameter<T> on the host,
//     DeviceParameter<T> on the device;
//   - the saved internals u and a are laid out with SavedLayoutBuilder: packed on the host,
//     256-byte aligned regions on the device.
// Deterministic: every output element is written by one thread, no atomics, the dropout mask
// is a pure function of (call.seed, call.step, call.module, element), so recompute() equals
// forward() bit for bit and exact mode's reversible gradients equal standard mode's.
//
// The device half needs nvcc (__CUDACC__); without it this header still gives the host function.

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <dr2net/dr2net.hpp>
#include <dr2net/backend/host/primitives.hpp>  // gemm, gemm_bias_add, column_sums_add on the host
#include <dr2net/modules/drop.hpp>             // make_drop_scale, DropScale, check_drop_rate
#include <dr2net/modules/parameter.hpp>        // Parameter, parameter_t, mix_seed
#include <dr2net/modules/saved_layout.hpp>     // SavedLayoutBuilder

#if defined(__CUDACC__)
#include <dr2net/modules/cuda/types.cuh>       // first of the device headers (see its note)
#include <dr2net/backend/cuda/cuda.cuh>        // CudaContext, for_each_index, DR2NET_CUDA_LAUNCH
#include <dr2net/modules/cuda/parameter.cuh>   // DeviceParameter (parameter_t on CudaContext)
#include <dr2net/modules/cuda/primitives.cuh>  // gemm, gemm_bias_add, column_sums_add on the device
#endif

namespace example {

// Scalar math usable on host and device: the C library's global functions, which CUDA also
// provides in device code (the std:: overloads are host-only there).
DR2NET_HD_INLINE float tanh_of(float x) { return ::tanhf(x); }
DR2NET_HD_INLINE double tanh_of(double x) { return ::tanh(x); }
DR2NET_HD_INLINE float sigmoid_of(float x) { return 1.0f / (1.0f + ::expf(-x)); }
DR2NET_HD_INLINE double sigmoid_of(double x) { return 1.0 / (1.0 + ::exp(-x)); }

// a[r, j] = tanh(u[r, j]) * sigmoid(u[r, H + j]) * mask(r H + j), index i = r H + j.
// Arithmetic in accumulate_t<T> (float for bf16/fp16, T itself for float and double).
template <class T>
struct GateForward {
  using A = dr2net::accumulate_t<T>;
  T* a;                         // [M, H], element i written by index i only
  const T* u;                   // [M, 2H]
  std::int64_t hidden;          // H
  dr2net::DropScale<A> mask;    // the hidden dropout (factor 1 when inactive)
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    const auto k = static_cast<std::int64_t>(i);
    const T* row = u + (k / hidden) * 2 * hidden;
    const std::int64_t j = k % hidden;
    const A v = dr2net::widen(row[j]), g = dr2net::widen(row[hidden + j]);
    a[i] = dr2net::narrow<T>(tanh_of(v) * sigmoid_of(g) * mask(static_cast<std::uint64_t>(i)));
  }
};

// From da = dL/da [M, H]: du[r, j] = da m (1 - t^2) s and du[r, H + j] = da m t s (1 - s),
// t = tanh(v), s = sigmoid(g). Index i = r H + j writes those two elements of du only.
template <class T>
struct GateBackward {
  using A = dr2net::accumulate_t<T>;
  T* du;                        // [M, 2H]
  const T* da;                  // [M, H]
  const T* u;                   // [M, 2H], as the forward saved it
  std::int64_t hidden;          // H
  dr2net::DropScale<A> mask;    // the forward's hidden dropout, replayed
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    const auto k = static_cast<std::int64_t>(i);
    const std::int64_t r = k / hidden, j = k % hidden;
    const T* row = u + r * 2 * hidden;
    T* drow = du + r * 2 * hidden;
    const A t = tanh_of(dr2net::widen(row[j])), s = sigmoid_of(dr2net::widen(row[hidden + j]));
    const A d = dr2net::widen(da[i]) * mask(static_cast<std::uint64_t>(i));
    drow[j] = dr2net::narrow<T>(d * (A(1) - t * t) * s);
    drow[hidden + j] = dr2net::narrow<T>(d * t * s * (A(1) - s));
  }
};

// Runs a gate functor for every index in [0, n): on the host a plain loop (the library's
// for_each_index), on the device this file's own kernel on the context's stream.
template <class Fn>
void run_gate(dr2net::HostContext& ctx, std::size_t n, const Fn& fn, const char* /*name*/) {
  dr2net::for_each_index(ctx, n, fn);
}

#if defined(__CUDACC__)
inline constexpr int kGateThreads = 256;

// One thread per index, grid-stride: each thread writes only what its index owns.
template <class Fn>
__global__ void __launch_bounds__(kGateThreads) gate_kernel(Fn fn, std::size_t n) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) fn(i);
}

// Enqueues the kernel on ctx.stream() and returns at once: no synchronisation here, the
// stack's next work is queued behind it on the same stream. A rejected launch throws
// dr2net::Error naming the kernel; a fault inside it surfaces at the next synchronising call.
template <class Fn>
void run_gate(dr2net::CudaContext& ctx, std::size_t n, const Fn& fn, const char* name) {
  if (n == 0) return;
  const std::size_t wanted = (n + kGateThreads - 1) / kGateThreads;
  const auto blocks = static_cast<unsigned>(
      std::min<std::size_t>(wanted, static_cast<std::size_t>(ctx.multiprocessor_count()) * 8));
  DR2NET_CUDA_LAUNCH(name, gate_kernel<Fn><<<blocks, kGateThreads, 0, ctx.stream()>>>(fn, n));
}
#endif

// Sizes and rate of a GatedMlp.
struct GatedMlpConfig {
  std::int64_t dim = 0;     // D, the stream width
  std::int64_t hidden = 0;  // H
  double dropout = 0.0;     // hidden dropout rate, in [0, 1); applies only when call.training
};

template <class T, class Ctx = dr2net::HostContext>
class GatedMlp {
 public:
  using value_type = T;      // the compute type
  using context_type = Ctx;  // HostContext or CudaContext: the backend its members run on
  using A = dr2net::accumulate_t<T>;
  template <class U>
  using View = dr2net::ContextView<Ctx, U>;  // host views on the host, DeviceView on the device
  using Param = dr2net::parameter_t<T, Ctx>;
  static constexpr std::string_view type_name = dr2net::is_host_context_v<Ctx> ? "GatedMlp" : "device GatedMlp";

  // A host function, weights drawn from `seed` (deterministic on every platform).
  GatedMlp(const GatedMlpConfig& config, std::uint64_t seed)
    requires dr2net::is_host_context_v<Ctx>
      : GatedMlp(nullptr, config) {
    const double su = 1.0 / std::sqrt(static_cast<double>(config_.dim));
    const double sd = 0.5 / std::sqrt(static_cast<double>(config_.hidden));
    up_w_.fill_truncated_normal(su, 2 * su, seed, 0);
    up_b_.fill_truncated_normal(0.1, 0.2, seed, 1);
    down_w_.fill_truncated_normal(sd, 2 * sd, seed, 2);
    down_b_.fill_truncated_normal(0.1, 0.2, seed, 3);
  }
  // A copy of a host function in the memory of `ctx` (on a device: copied and converted to T).
  template <class U>
  GatedMlp(Ctx& ctx, const GatedMlp<U, dr2net::HostContext>& host) : GatedMlp(&ctx, host.config()) {
    up_w_.load(host.up_weight().data(), host.up_weight().shape(), type_name);
    up_b_.load(host.up_bias().data(), host.up_bias().shape(), type_name);
    down_w_.load(host.down_weight().data(), host.down_weight().shape(), type_name);
    down_b_.load(host.down_bias().data(), host.down_bias().shape(), type_name);
  }

  const GatedMlpConfig& config() const noexcept { return config_; }
  const Param& up_weight() const noexcept { return up_w_; }      // "up.weight" [2H, D]
  const Param& up_bias() const noexcept { return up_b_; }        // "up.bias" [2H]
  const Param& down_weight() const noexcept { return down_w_; }  // "down.weight" [D, H]
  const Param& down_bias() const noexcept { return down_b_; }    // "down.bias" [D]

  std::size_t saved_elements(const dr2net::Shape& in) const { return layout(in).total; }

  // out = F(in); the saved internals are the forward's own temporaries, so it is recompute.
  void forward(const dr2net::ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> scratch) {
    compute(call, in, out, scratch, "forward");
  }

  // out = F(in), bit for bit as forward() for the same call; `saved` holds u and a afterwards.
  void recompute(const dr2net::ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> saved) {
    compute(call, in, out, saved, "recompute");
  }

  // grad_in += J_F(in)^T grad_out, and every parameter gradient += its share (never assigned).
  // The temporaries da [M, H] and du [M, 2H] come from call.context as Scratch (stream-ordered
  // on the device: freed when this returns, after the work that uses them).
  void backward(const dr2net::ModuleCall<Ctx>& call, View<const T> in, View<const T> saved, View<const T> grad_out,
                View<T> grad_in) {
    const Layout L = layout(in.shape());
    check_views(in, grad_in, saved.size(), L, "backward", "grad_in");
    dr2net::check_shape(grad_out, in.shape(), std::string(type_name) + " backward: grad_out");
    dr2net::check_contiguous(grad_out, std::string(type_name) + " backward: grad_out");
    Ctx& cx = call.context;
    const std::int64_t M = L.rows, D = config_.dim, H = config_.hidden;
    const T* u = saved.data() + L.u;
    const T* a = saved.data() + L.a;
    const T* g = grad_out.data();
    using dr2net::MemoryCategory;
    using dr2net::Transpose;
    dr2net::gemm<T>(cx, Transpose::Yes, Transpose::No, D, H, M, A(1), g, D, a, H, A(1), down_w_.grad_data(), H);
    dr2net::column_sums_add<T>(cx, M, D, g, down_b_.grad_data());
    auto da = cx.template allocate<T>(static_cast<std::size_t>(M * H), MemoryCategory::Scratch,
                                      "GatedMlp backward: da");
    dr2net::gemm<T>(cx, Transpose::No, Transpose::No, M, H, D, A(1), g, D, down_w_.data(), H, A(0), da.data(), H);
    auto du = cx.template allocate<T>(static_cast<std::size_t>(M * 2 * H), MemoryCategory::Scratch,
                                      "GatedMlp backward: du");
    run_gate(cx, static_cast<std::size_t>(M * H), GateBackward<T>{du.data(), da.data(), u, H, hidden_mask(call)},
             "GatedMlp gate backward");
    da.reset();
    dr2net::gemm<T>(cx, Transpose::Yes, Transpose::No, 2 * H, D, M, A(1), du.data(), 2 * H, in.data(), D, A(1),
                    up_w_.grad_data(), D);
    dr2net::column_sums_add<T>(cx, M, 2 * H, du.data(), up_b_.grad_data());
    dr2net::gemm<T>(cx, Transpose::No, Transpose::No, M, D, 2 * H, A(1), du.data(), 2 * H, up_w_.data(), D, A(1),
                    grad_in.data(), D);
  }

  // visit(name, value, grad): host views on the host, DeviceViews on the device.
  template <class V>
  void for_each_parameter(V&& visit) {
    up_w_.visit(visit);
    up_b_.visit(visit);
    down_w_.visit(visit);
    down_b_.visit(visit);
  }

 private:
  // Everything is enqueued on the context's stream (on the device nothing here waits for it).
  void compute(const dr2net::ModuleCall<Ctx>& call, View<const T> in, View<T> out, View<T> saved, const char* where) {
    const Layout L = layout(in.shape());
    check_views(in, out, saved.size(), L, where, "output");
    Ctx& cx = call.context;
    const std::int64_t M = L.rows, D = config_.dim, H = config_.hidden;
    T* u = saved.data() + L.u;
    T* a = saved.data() + L.a;
    using dr2net::Transpose;
    dr2net::gemm_bias_add<T>(cx, Transpose::No, Transpose::Yes, M, 2 * H, D, A(1), in.data(), D, up_w_.data(), D,
                             up_b_.data(), A(0), nullptr, u, 2 * H);
    run_gate(cx, static_cast<std::size_t>(M * H), GateForward<T>{a, u, H, hidden_mask(call)}, "GatedMlp gate forward");
    dr2net::gemm_bias_add<T>(cx, Transpose::No, Transpose::Yes, M, D, H, A(1), a, H, down_w_.data(), H,
                             down_b_.data(), A(0), nullptr, out.data(), D);
  }

  GatedMlp(Ctx* ctx, const GatedMlpConfig& config)
      : config_(validated(config)),
        up_w_(dr2net::parameter_of<T, Ctx>::make(ctx, "up.weight", dr2net::Shape{2 * config.hidden, config.dim})),
        up_b_(dr2net::parameter_of<T, Ctx>::make(ctx, "up.bias", dr2net::Shape{2 * config.hidden})),
        down_w_(dr2net::parameter_of<T, Ctx>::make(ctx, "down.weight", dr2net::Shape{config.dim, config.hidden})),
        down_b_(dr2net::parameter_of<T, Ctx>::make(ctx, "down.bias", dr2net::Shape{config.dim})) {}

  static GatedMlpConfig validated(const GatedMlpConfig& c) {
    DR2NET_CHECK(c.dim > 0 && c.hidden > 0, "GatedMlp: dim and hidden must be positive, got dim ", c.dim,
                 ", hidden ", c.hidden);
    dr2net::check_drop_rate(c.dropout, "dropout", "GatedMlp");
    return c;
  }

  struct Layout {
    std::int64_t rows = 0;
    std::size_t u = 0, a = 0, total = 0;
  };

  // The saved regions for an input of shape `in`, in checked arithmetic; on the device each
  // region starts on a 256-byte boundary of the (256-byte aligned) slice the stack hands over.
  Layout layout(const dr2net::Shape& in) const {
    DR2NET_CHECK(in.rank() >= 1 && in.last() == config_.dim, type_name, ": input width ", in.last(),
                 " does not match dim ", config_.dim, " (input shape ", in, ")");
    DR2NET_CHECK(in.numel() > 0, type_name, ": input shape ", in, " is empty");
    Layout L;
    L.rows = in.rows();
    dr2net::SavedLayoutBuilder<T, Ctx> b(type_name);
    L.u = b.take({L.rows, 2, config_.hidden}, "u (rows x 2 hidden)");
    L.a = b.take({L.rows, config_.hidden}, "a (rows x hidden)");
    L.total = b.total();
    return L;
  }

  // Contiguous views of one shape (`out` is the output or grad_in, as `what` says) and enough
  // saved space; errors name the function, the member and the view.
  static void check_views(View<const T> in, View<T> out, std::size_t saved, const Layout& L, const char* where,
                          const char* what) {
    const std::string me = std::string(type_name) + " " + where + ": ";
    dr2net::check_contiguous(in, me + "input");
    dr2net::check_contiguous(out, me + what);
    dr2net::check_shape(out, in.shape(), me + what);
    DR2NET_CHECK(saved >= L.total, me, "saved/scratch holds ", saved, " elements, needs ", L.total);
  }

  dr2net::DropScale<A> hidden_mask(const dr2net::ModuleCall<Ctx>& call) const {
    return dr2net::make_drop_scale<A>(call, 0.0, config_.dropout, dr2net::RandomPurpose::HiddenDropout, 1);
  }

  GatedMlpConfig config_;
  Param up_w_, up_b_, down_w_, down_b_;
};

}  // namespace example
