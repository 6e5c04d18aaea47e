// The CUDA backend's context, error reporting, fused combine kernels and monitor reduction,
// each against its host twin on fresh random data, with poisoned outputs and guard
// elements, odd sizes and misaligned starts.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/gpu_test.cuh"
#include "dr2net/backend/cuda/cuda.cuh"
#include "dr2net/backend/host/context.hpp"
#include "dr2net/block/combine.hpp"
#include "dr2net/core/half.hpp"

using namespace dr2net;
using namespace dr2net::testing;

namespace {

constexpr std::size_t kGuard = 19;  // poisoned elements after each operand: must stay untouched

//! One operand: a poisoned device buffer of off + n + kGuard elements holding host data at off.
template <class T>
struct Operand {
  std::vector<T> host;  // the n elements (the host twin works on this copy)
  DeviceBuffer<T> dev;
  std::size_t off = 0;
  T* ptr() const { return dev.data() + off; }
};

template <class T>
Operand<T> make_operand(CudaContext& ctx, std::mt19937_64& rng, std::size_t n, std::size_t off, double lo = -1,
                        double hi = 1) {
  Operand<T> o{random_values<T>(n, rng, lo, hi), ctx.allocate<T>(off + n + kGuard, MemoryCategory::Other), off};
  copy_to_device(ctx, o.ptr(), o.host.data(), n);
  return o;
}

template <class T>
bool is_nan_bits(T v) {
  return std::isnan(to_double(v));
}

//! The device result of an operand, and a check that its guard elements are still NaN.
template <class T>
std::vector<T> result_of(CudaContext& ctx, const Operand<T>& o, std::size_t n, const char* name) {
  std::vector<T> all = to_host(ctx, o.dev.data(), o.off + n + kGuard);
  bool guards_ok = true;
  for (std::size_t i = 0; i < o.off; ++i) guards_ok = guards_ok && is_nan_bits(all[i]);
  for (std::size_t i = o.off + n; i < all.size(); ++i) guards_ok = guards_ok && is_nan_bits(all[i]);
  GPU_CHECK(guards_ok, std::string(name) + ": a kernel wrote outside [off, off + n)");
  return std::vector<T>(all.begin() + static_cast<std::ptrdiff_t>(o.off),
                        all.begin() + static_cast<std::ptrdiff_t>(o.off + n));
}

template <class T>
double mag(T v) {
  return std::abs(to_double(v));
}

//! Every fused pass at one size and set of offsets, S streams, C compute, A accumulate.
template <class S, class C, class A>
void check_combines(CudaContext& ctx, std::mt19937_64& rng, std::size_t n, std::size_t off_s, std::size_t off_c,
                    bool force_scalar) {
  HostContext host;
  const Tolerance tol = tolerances_for<A>().elementwise;
  std::uniform_real_distribution<double> coef(0.2, 1.3);
  const A alpha = static_cast<A>(coef(rng)), beta = static_cast<A>(coef(rng));
  auto launch = [&](const auto& fn) {
    if (force_scalar) for_each_index_scalar(ctx, n, fn);
    else for_each_index(ctx, n, fn);
  };
  const std::string where = " (n " + std::to_string(n) + ", offsets " + std::to_string(off_s) + "/" +
                            std::to_string(off_c) + (force_scalar ? ", scalar path)" : ")");

  {  // forward: x <- alpha*y + f + beta*x
    auto x = make_operand<S>(ctx, rng, n, off_s), y = make_operand<S>(ctx, rng, n, off_s + 0);
    auto f = make_operand<C>(ctx, rng, n, off_c);
    std::vector<double> scale(n);
    for (std::size_t i = 0; i < n; ++i)
      scale[i] = mag(alpha) * mag(y.host[i]) + mag(f.host[i]) + mag(beta) * mag(x.host[i]);
    launch(ForwardCombine<S, C, A>{x.ptr(), y.ptr(), f.ptr(), alpha, beta});
    for_each_index(host, n, ForwardCombine<S, C, A>{x.host.data(), y.host.data(), f.host.data(), alpha, beta});
    GPU_CHECK_CLOSE(result_of(ctx, x, n, "forward x"), x.host, tol, &scale);
    GPU_CHECK(result_of(ctx, y, n, "forward y") == y.host, "forward must not write y" + where);
  }
  {  // inverse: y <- (y - alpha*x - f)/beta
    auto y = make_operand<S>(ctx, rng, n, off_s), x = make_operand<S>(ctx, rng, n, off_s);
    auto f = make_operand<C>(ctx, rng, n, off_c);
    std::vector<double> scale(n);
    for (std::size_t i = 0; i < n; ++i)
      scale[i] = (mag(y.host[i]) + mag(alpha) * mag(x.host[i]) + mag(f.host[i])) / mag(beta);
    launch(InverseCombine<S, C, A>{y.ptr(), x.ptr(), f.ptr(), alpha, beta});
    for_each_index(host, n, InverseCombine<S, C, A>{y.host.data(), x.host.data(), f.host.data(), alpha, beta});
    GPU_CHECK_CLOSE(result_of(ctx, y, n, "inverse y"), y.host, tol, &scale);
  }
  for (int variant = 0; variant < 3; ++variant) {  // backward: with/without jt, with/without reconstruction
    const bool with_jt = variant != 1, reconstruct = variant != 2;
    auto gx = make_operand<S>(ctx, rng, n, off_s), gy = make_operand<S>(ctx, rng, n, off_s);
    auto jt = make_operand<C>(ctx, rng, n, off_c);
    auto y = make_operand<S>(ctx, rng, n, off_s), x = make_operand<S>(ctx, rng, n, off_s);
    auto f = make_operand<C>(ctx, rng, n, off_c);
    std::vector<double> sgx(n), sgy(n), sy(n);
    for (std::size_t i = 0; i < n; ++i) {
      sgx[i] = mag(gx.host[i]) + mag(alpha) * mag(gy.host[i]) + (with_jt ? mag(jt.host[i]) : 0.0);
      sgy[i] = mag(beta) * mag(gy.host[i]);
      sy[i] = (mag(y.host[i]) + mag(alpha) * mag(x.host[i]) + mag(f.host[i])) / mag(beta);
    }
    const C* jt_dev = with_jt ? jt.ptr() : nullptr;
    const C* jt_host = with_jt ? jt.host.data() : nullptr;
    if (reconstruct) {
      launch(BackwardCombine<S, C, A, true>{gx.ptr(), gy.ptr(), jt_dev, y.ptr(), x.ptr(), f.ptr(), alpha, beta});
      for_each_index(host, n, BackwardCombine<S, C, A, true>{gx.host.data(), gy.host.data(), jt_host, y.host.data(),
                                                             x.host.data(), f.host.data(), alpha, beta});
      GPU_CHECK_CLOSE(result_of(ctx, y, n, "backward y"), y.host, tol, &sy);
    } else {
      launch(BackwardCombine<S, C, A, false>{gx.ptr(), gy.ptr(), jt_dev, nullptr, nullptr, nullptr, alpha, beta});
      for_each_index(host, n, BackwardCombine<S, C, A, false>{gx.host.data(), gy.host.data(), jt_host, nullptr,
                                                              nullptr, nullptr, alpha, beta});
      GPU_CHECK(result_of(ctx, y, n, "backward y untouched") == y.host, "y must be untouched" + where);
    }
    GPU_CHECK_CLOSE(result_of(ctx, gx, n, "backward gx"), gx.host, tol, &sgx);
    GPU_CHECK_CLOSE(result_of(ctx, gy, n, "backward gy"), gy.host, tol, &sgy);
  }
  {  // conversions both ways: exactly the host's rounding, into poisoned destinations
    auto src = make_operand<S>(ctx, rng, n, off_s);
    Operand<C> dst{std::vector<C>(n), ctx.allocate<C>(off_c + n + kGuard, MemoryCategory::Other), off_c};
    launch(ConvertCopy<S, C>{dst.ptr(), src.ptr()});
    for_each_index(host, n, ConvertCopy<S, C>{dst.host.data(), src.host.data()});
    const auto got = result_of(ctx, dst, n, "convert dst");
    GPU_CHECK(std::memcmp(got.data(), dst.host.data(), n * sizeof(C)) == 0,
              "stream -> compute conversion differs from the host bit for bit" + where);
    Operand<S> back{std::vector<S>(n), ctx.allocate<S>(off_s + n + kGuard, MemoryCategory::Other), off_s};
    launch(ConvertCopy<C, S>{back.ptr(), dst.ptr()});
    for_each_index(host, n, ConvertCopy<C, S>{back.host.data(), dst.host.data()});
    const auto got_back = result_of(ctx, back, n, "convert back");
    GPU_CHECK(std::memcmp(got_back.data(), back.host.data(), n * sizeof(S)) == 0,
              "compute -> stream conversion differs from the host bit for bit" + where);
  }
}

template <class S, class C, class A>
void combine_case(CudaContext& ctx, std::mt19937_64& rng, const char* name) {
  // DR2NET_GPU_TEST_QUICK (set by scripts/gpu-check under compute-sanitizer) drops the largest size.
  const bool quick = std::getenv("DR2NET_GPU_TEST_QUICK") != nullptr;
  run_case(std::string("combine kernels ") + name, [&] {
    for (std::size_t n : {std::size_t{1}, std::size_t{3}, std::size_t{7}, std::size_t{8}, std::size_t{9},
                          std::size_t{31}, std::size_t{1000}, std::size_t{4097}, std::size_t{(1u << 20) + 5}}) {
      if (quick && n > 5000) continue;
      for (std::size_t off : {std::size_t{0}, std::size_t{1}, std::size_t{3}}) {
        check_combines<S, C, A>(ctx, rng, n, off, off, false);  // same phase: vector path after a head
        check_combines<S, C, A>(ctx, rng, n, off, off + 1, false);  // different phases: element path
      }
    }
    check_combines<S, C, A>(ctx, rng, 4099, 0, 0, true);
  });
}

}  // namespace

int main() {
  skip_without_device();
  std::uint64_t seed = (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  CudaContext ctx({.poison_allocations = true});

  run_case("allocations are metered and poisoned", [&] {
    const auto before = ctx.meter().current_total();
    {
      auto a = ctx.allocate<float>(1001, MemoryCategory::Streams);
      auto b = ctx.allocate<double>(17, MemoryCategory::SavedActivations);
      GPU_CHECK(ctx.meter().current(MemoryCategory::Streams) >= 1001 * sizeof(float));
      GPU_CHECK(ctx.meter().current_total() == before + 1001 * sizeof(float) + 17 * sizeof(double));
      const auto h = to_host(ctx, a.data(), a.size());
      bool all_nan = true;
      for (float v : h) all_nan = all_nan && std::isnan(v);
      GPU_CHECK(all_nan, "new allocations must be NaN when poisoning is on");
      ctx.reserve(a, 500, MemoryCategory::Streams);
      GPU_CHECK(a.size() == 1001, "reserve must not shrink");
      ctx.reserve(a, 5000, MemoryCategory::Streams);
      GPU_CHECK(a.size() == 5000);
      GPU_CHECK(a.view(Shape{50, 100}).numel() == 5000);
    }
    GPU_CHECK(ctx.meter().current_total() == before, "freed buffers leave the meter");
  });

  run_case("out of memory names the request and the meter", [&] {
    auto held = ctx.allocate<float>(1 << 20, MemoryCategory::Parameters);
    bool thrown = false;
    try {
      auto huge = ctx.allocate<std::byte>(std::size_t{1} << 52, MemoryCategory::Scratch);
    } catch (const Error& e) {
      thrown = true;
      const std::string m = e.what();
      GPU_CHECK(m.find(std::to_string(std::size_t{1} << 52)) != std::string::npos, m);
      GPU_CHECK(m.find("meter holds") != std::string::npos, m);
      GPU_CHECK(m.find("scratch") != std::string::npos, m);
    }
    GPU_CHECK(thrown, "a 4 PiB allocation must throw");
    auto after = ctx.allocate<float>(16, MemoryCategory::Other);  // still usable
    GPU_CHECK(after.data() != nullptr);
  });

  run_case("CUDA errors carry the call, file, line and error string", [&] {
    bool thrown = false;
    try {
      DR2NET_CUDA_CHECK(cudaSetDevice(1 << 20));
    } catch (const Error& e) {
      thrown = true;
      const std::string m = e.what();
      GPU_CHECK(m.find("cudaSetDevice(1 << 20)") != std::string::npos, m);
      GPU_CHECK(m.find("cudaErrorInvalidDevice") != std::string::npos, m);
      GPU_CHECK(m.find("test_cuda_combine.cu:") != std::string::npos, m);
    }
    GPU_CHECK(thrown);
    thrown = false;
    try {
      DR2NET_CUBLAS_CHECK(cublasSetStream(nullptr, ctx.stream()));
    } catch (const Error& e) {
      thrown = true;
      GPU_CHECK(std::string(e.what()).find("cuBLAS call `cublasSetStream") != std::string::npos, e.what());
    }
    GPU_CHECK(thrown);
  });

  combine_case<float, float, float>(ctx, rng, "fp32");
  combine_case<double, double, double>(ctx, rng, "fp64");
  combine_case<double, float, double>(ctx, rng, "fp64 streams / fp32 compute");
  combine_case<float, __nv_bfloat16, float>(ctx, rng, "fp32 streams / bf16 compute");
  combine_case<float, __half, float>(ctx, rng, "fp32 streams / fp16 compute");

  run_case("(alpha, beta) = (1, 0) is y + f bit for bit", [&] {
    const std::size_t n = 10007;
    auto x = make_operand<float>(ctx, rng, n, 0), y = make_operand<float>(ctx, rng, n, 0);
    auto f = make_operand<float>(ctx, rng, n, 0);
    for_each_index(ctx, n, ForwardCombine<float, float, float>{x.ptr(), y.ptr(), f.ptr(), 1.0f, 0.0f});
    const auto got = result_of(ctx, x, n, "x");
    bool same = true;
    for (std::size_t i = 0; i < n; ++i) same = same && got[i] == y.host[i] + f.host[i];
    GPU_CHECK(same);
  });

  run_case("bf16 conversion matches core/half.hpp bit for bit", [&] {
    const std::size_t n = 65537;
    auto src = make_operand<float>(ctx, rng, n, 0, -300.0, 300.0);
    auto dst = ctx.allocate<__nv_bfloat16>(n, MemoryCategory::Other);
    auto dst_h = ctx.allocate<__half>(n, MemoryCategory::Other);
    for_each_index(ctx, n, ConvertCopy<float, __nv_bfloat16>{dst.data(), src.ptr()});
    for_each_index(ctx, n, ConvertCopy<float, __half>{dst_h.data(), src.ptr()});
    const auto b = to_host(ctx, dst.data(), n);
    const auto h = to_host(ctx, dst_h.data(), n);
    bool same = true;
    for (std::size_t i = 0; i < n; ++i) {
      std::uint16_t bb, hb;
      std::memcpy(&bb, &b[i], 2);
      std::memcpy(&hb, &h[i], 2);
      same = same && bb == float_to_bf16_bits(src.host[i]) && hb == float_to_half_bits(src.host[i]);
    }
    GPU_CHECK(same);
  });

  run_case("max_abs_diff_and_max against the host", [&] {
    HostContext host;
    for (std::size_t n : {std::size_t{1}, std::size_t{255}, std::size_t{257}, std::size_t{100003}, std::size_t{3000001}}) {
      auto a = make_operand<float>(ctx, rng, n, 0), b = make_operand<float>(ctx, rng, n, 1, -5, 5);
      const auto d = max_abs_diff_and_max(ctx, a.ptr(), b.ptr(), n);
      const auto h = max_abs_diff_and_max(host, a.host.data(), b.host.data(), n);
      GPU_CHECK(d.first == h.first && d.second == h.second, "n " + std::to_string(n));
    }
    auto a = make_operand<double>(ctx, rng, 4001, 0), b = make_operand<double>(ctx, rng, 4001, 0);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    copy_to_device(ctx, a.ptr() + 1234, &nan, 1);
    GPU_CHECK(std::isnan(max_abs_diff_and_max(ctx, a.ptr(), b.ptr(), 4001).first), "NaN must be reported");
  });

  ctx.synchronize();
  return finish();
}
