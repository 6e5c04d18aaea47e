// The CUDA backend's context, error reporting, fused combine kernels and monitor reduction,
// each against its host twin on fresh random data, with poisoned outputs and guard
// elements, odd sizes and misaligned starts. Exact mode: the fixed-point combines bit for bit
// against the host (raw int64 and side-bit words), forward then inverse restoring the input
// bit for bit, the stream checksum and count_not_finite against the host, and the check
// flags of every pass that has one (vector and element paths).

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


// ---- exact mode ------------------------------------------------------------------------------

using Fx = FixedPoint<32>;
constexpr std::int64_t kPoisonRaw = -1;                  // what 0xFF poison bytes read as
constexpr std::uint64_t kPoisonWord = ~std::uint64_t{0};  // side-bit guard words (set by hand)

//! Fixed-point elements with every raw bit random, |h| < lim.
std::vector<Fx> random_fixed(std::size_t n, std::mt19937_64& rng, double lim) {
  const auto bound = static_cast<std::int64_t>(lim * Fx::scale);
  std::uniform_int_distribution<std::int64_t> u(-bound, bound);
  std::vector<Fx> v(n);
  for (auto& x : v) x = Fx{u(rng)};
  return v;
}

std::vector<std::int64_t> raws(const std::vector<Fx>& v) {
  std::vector<std::int64_t> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = v[i].raw;
  return r;
}

//! A poisoned device buffer of n + kGuard fixed-point elements holding `host` at the start.
DeviceBuffer<Fx> fixed_on_device(CudaContext& ctx, const std::vector<Fx>& host) {
  auto b = ctx.allocate<Fx>(host.size() + kGuard, MemoryCategory::Other);
  copy_to_device(ctx, b.data(), host.data(), host.size());
  return b;
}

//! The first n raw values of a device buffer; checks the kGuard elements after them are untouched.
std::vector<std::int64_t> fixed_result(CudaContext& ctx, const DeviceBuffer<Fx>& b, std::size_t n, const std::string& what) {
  const auto all = to_host(ctx, b.data(), n + kGuard);
  bool guards = true;
  for (std::size_t i = n; i < all.size(); ++i) guards = guards && all[i].raw == kPoisonRaw;
  GPU_CHECK(guards, what + ": a kernel wrote past the end");
  std::vector<std::int64_t> r(n);
  for (std::size_t i = 0; i < n; ++i) r[i] = all[i].raw;
  return r;
}

//! One uint32 check flag in device memory, zeroed.
DeviceBuffer<std::uint32_t> device_flag(CudaContext& ctx) {
  auto f = ctx.allocate<std::uint32_t>(1, MemoryCategory::Other);
  DR2NET_CUDA_CHECK(cudaMemsetAsync(f.data(), 0, sizeof(std::uint32_t), ctx.stream()));
  return f;
}
std::uint32_t read_flag(CudaContext& ctx, const DeviceBuffer<std::uint32_t>& f) {
  std::uint32_t v = 0;
  copy_to_host(ctx, &v, f.data(), 1);
  return v;
}

//! FixedForwardCombine and FixedInverseCombine, one size and coefficient pair, C compute:
//! device against the host loop bit for bit (streams, side-bit words, flags), and forward then
//! inverse restoring the input bit for bit on both. `keep` false: standard mode (no side bits;
//! only the forward is checked when beta loses bits).
template <class C>
void check_fixed_combines(CudaContext& ctx, std::mt19937_64& rng, std::size_t n, double alpha_value,
                          double beta_value, bool keep) {
  HostContext host;
  const fixed::Coefficient alpha = fixed::quantize_coefficient(alpha_value);
  const fixed::Coefficient beta = fixed::quantize_coefficient(beta_value);
  const int width = fixed::side_bit_width(beta.p);
  SideBits hside, dside;  // empty: one work item per element
  if (keep && width > 0) {
    hside.width = dside.width = width;
    hside.per_word = dside.per_word = fixed::elements_per_word(width);
  }
  const auto per = static_cast<std::size_t>(hside.per_word);
  const std::size_t items = (n + per - 1) / per;
  const bool sided = hside.width > 0;
  const std::string where = std::string(sizeof(C) == 4 ? "fp32" : "fp64") + " n " + std::to_string(n) + " alpha " +
                            std::to_string(alpha_value) + " beta " + std::to_string(beta_value) + " width " +
                            std::to_string(width) + (keep ? "" : " (no side bits)");

  const auto x0 = random_fixed(n, rng, 6.0), y0 = random_fixed(n, rng, 6.0);
  const auto f = random_values<C>(n, rng, -2.0, 2.0);
  auto dx = fixed_on_device(ctx, x0), dy = fixed_on_device(ctx, y0);
  auto df = to_device(ctx, f);
  DeviceBuffer<std::uint64_t> dwords;
  std::vector<std::uint64_t> hwords;
  if (sided) {
    dwords = ctx.allocate<std::uint64_t>(items + kGuard, MemoryCategory::SideBits);
    DR2NET_CUDA_CHECK(cudaMemsetAsync(dwords.data(), 0xFF, (items + kGuard) * sizeof(std::uint64_t), ctx.stream()));
    hwords.assign(items, kPoisonWord);
    dside.words = dwords.data();
    hside.words = hwords.data();
  }
  auto dflag = device_flag(ctx);
  std::uint32_t hflag = 0;

  // forward: x <- A(y) + Q(f) + B(x), side bits <- what B lost
  std::vector<Fx> hx = x0;
  for_each_index(ctx, items, FixedForwardCombine<Fx, C>{dx.data(), dy.data(), df.data(), alpha, beta, dside, n, dflag.data()});
  for_each_index(host, items, FixedForwardCombine<Fx, C>{hx.data(), y0.data(), f.data(), alpha, beta, hside, n, &hflag});
  const auto fwd = fixed_result(ctx, dx, n, "fixed forward x " + where);
  GPU_CHECK(fwd == raws(hx), "fixed forward: raw stream differs from the host's (" + where + ")");
  GPU_CHECK(fixed_result(ctx, dy, n, "fixed forward y " + where) == raws(y0), "fixed forward wrote y (" + where + ")");
  if (sided) {
    const auto words = to_host(ctx, dwords.data(), items + kGuard);
    GPU_CHECK(std::vector<std::uint64_t>(words.begin(), words.begin() + static_cast<std::ptrdiff_t>(items)) == hwords,
              "fixed forward: side-bit words differ from the host's (" + where + ")");
    bool guards = true;
    for (std::size_t w = items; w < words.size(); ++w) guards = guards && words[w] == kPoisonWord;
    GPU_CHECK(guards, "fixed forward wrote past the side-bit words (" + where + ")");
  }
  GPU_CHECK(read_flag(ctx, dflag) == hflag && hflag == 0, "fixed forward: flag set on in-range data (" + where + ")");

  if (!keep && width > 0) return;  // not invertible without the side bits
  // inverse: x_{i-1} = ceil((Y - A(X) - Q(f)) 2^k / p) + side bits, over the forward's output
  for_each_index(ctx, items, FixedInverseCombine<Fx, C>{dx.data(), dy.data(), df.data(), alpha, beta, dside, n, dflag.data()});
  for_each_index(host, items, FixedInverseCombine<Fx, C>{hx.data(), y0.data(), f.data(), alpha, beta, hside, n, &hflag});
  const auto inv = fixed_result(ctx, dx, n, "fixed inverse " + where);
  GPU_CHECK(inv == raws(hx), "fixed inverse: raw stream differs from the host's (" + where + ")");
  GPU_CHECK(inv == raws(x0), "fixed forward then inverse did not restore the input bit for bit on the device (" + where + ")");
  GPU_CHECK(raws(hx) == raws(x0), "fixed forward then inverse did not restore the input on the host (" + where + ")");
  GPU_CHECK(read_flag(ctx, dflag) == hflag && hflag == 0, "fixed inverse: flag set on in-range data (" + where + ")");
}

//! The fixed-point combines' flags: a NaN in f, an f outside the range, and a sum leaving
//! the range each set the flag on the device exactly when they do on the host.
template <class C>
void check_fixed_flags(CudaContext& ctx, std::mt19937_64& rng) {
  HostContext host;
  const std::size_t n = 1001;
  const auto alpha = fixed::quantize_coefficient(1.0), beta = fixed::quantize_coefficient(0.1);
  const int width = fixed::side_bit_width(beta.p);
  const int per = fixed::elements_per_word(width);
  const std::size_t items = (n + static_cast<std::size_t>(per) - 1) / static_cast<std::size_t>(per);
  const double big = 0.9 * std::ldexp(1.0, 62 - Fx::frac_bits);  // in range alone, not twice over
  struct Bad {
    const char* what;
    std::size_t at;
    double f;          // f[at]
    double y;          // y[at] (0: unchanged)
    bool forward_bad;  // whether the forward flags it
  };
  const Bad cases[] = {{"none", 0, 0.5, 0, false},
                       {"NaN in f (first element)", 0, std::numeric_limits<double>::quiet_NaN(), 0, true},
                       {"NaN in f (last element)", n - 1, std::numeric_limits<double>::quiet_NaN(), 0, true},
                       {"Inf in f", 500, std::numeric_limits<double>::infinity(), 0, true},
                       {"f outside the range", 37, 4.0 * big, 0, true},
                       {"sum outside the range", 38, big, big, true}};
  for (const Bad& b : cases) {
    auto x = random_fixed(n, rng, 4.0), y = random_fixed(n, rng, 4.0);
    auto f = random_values<C>(n, rng);
    f[b.at] = static_cast<C>(b.f);
    if (b.y != 0) {
      bool bad = false;
      y[b.at] = Fx{fixed::quantize(b.y, Fx::scale, bad)};
    }
    auto dx = fixed_on_device(ctx, x), dy = fixed_on_device(ctx, y);
    auto df = to_device(ctx, f);
    std::vector<std::uint64_t> hw(items);
    auto dw = ctx.allocate<std::uint64_t>(items, MemoryCategory::SideBits);
    const SideBits hs{hw.data(), width, per}, ds{dw.data(), width, per};
    auto dflag = device_flag(ctx);
    std::uint32_t hflag = 0;
    for_each_index(ctx, items, FixedForwardCombine<Fx, C>{dx.data(), dy.data(), df.data(), alpha, beta, ds, n, dflag.data()});
    for_each_index(host, items, FixedForwardCombine<Fx, C>{x.data(), y.data(), f.data(), alpha, beta, hs, n, &hflag});
    const std::uint32_t dfwd = read_flag(ctx, dflag);
    GPU_CHECK(dfwd == hflag, std::string("fixed forward flag differs from the host's: ") + b.what);
    GPU_CHECK((hflag != 0) == b.forward_bad, std::string("host fixed forward flag: ") + b.what);
    GPU_CHECK(fixed_result(ctx, dx, n, b.what) == raws(x), std::string("fixed forward raw differs: ") + b.what);
    // The inverse reads the same f: a non-finite or out-of-range f is flagged there too.
    auto iflag = device_flag(ctx);
    std::uint32_t hiflag = 0;
    for_each_index(ctx, items, FixedInverseCombine<Fx, C>{dx.data(), dy.data(), df.data(), alpha, beta, ds, n, iflag.data()});
    for_each_index(host, items, FixedInverseCombine<Fx, C>{x.data(), y.data(), f.data(), alpha, beta, hs, n, &hiflag});
    GPU_CHECK(read_flag(ctx, iflag) == hiflag, std::string("fixed inverse flag differs from the host's: ") + b.what);
    GPU_CHECK(fixed_result(ctx, dx, n, b.what) == raws(x), std::string("fixed inverse raw differs: ") + b.what);
  }
}

//! Random values with NaN, +Inf and -Inf at `bad` random positions (some repeated).
template <class T>
std::vector<T> with_non_finite(std::size_t n, std::size_t bad, std::mt19937_64& rng) {
  auto v = random_values<T>(n, rng, -1e3, 1e3);
  if (n > 2) v[n / 2] = std::numeric_limits<T>::max();  // finite: must not count (unless overwritten below)
  std::uniform_int_distribution<std::size_t> at(0, n - 1);
  const T specials[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                        -std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::quiet_NaN()};
  for (std::size_t k = 0; k < bad; ++k) v[k == 0 ? n - 1 : (k == 1 ? 0 : at(rng))] = specials[k % 4];
  return v;
}

template <class T>
void check_count_not_finite(CudaContext& ctx, std::mt19937_64& rng, const char* type) {
  HostContext host;
  const bool quick = std::getenv("DR2NET_GPU_TEST_QUICK") != nullptr;
  for (std::size_t n : {std::size_t{1}, std::size_t{2}, std::size_t{257}, std::size_t{100003}, std::size_t{(1u << 20) + 9}}) {
    if (quick && n > 200000) continue;
    for (std::size_t bad : {std::size_t{0}, std::size_t{1}, std::size_t{2}, std::size_t{17}}) {
      if (bad > n) continue;
      const auto v = with_non_finite<T>(n, bad, rng);
      auto d = ctx.allocate<T>(n + 1, MemoryCategory::Other);  // one poisoned (NaN) element after: not counted
      copy_to_device(ctx, d.data(), v.data(), n);
      const std::size_t got = count_not_finite(ctx, d.data(), n);
      const std::size_t want = count_not_finite(host, v.data(), n);
      GPU_CHECK(got == want, std::string(type) + " n " + std::to_string(n) + ": device counts " + std::to_string(got) +
                                 ", host " + std::to_string(want));
      GPU_CHECK(bad > 0 ? want > 0 : want == 0, std::string(type) + ": the host oracle itself");
    }
  }
}

// ---- operands declared by the functor ---------------------------------------------------------

//! x <- (x + y) + z, z read only when not null, flagged when not finite: fields in an order no
//! launcher could guess, and only additions (one rounding each, nothing to contract), so the
//! device's vector path, its element path and the host agree bit for bit.
template <class S, class C>
struct ShuffledSum {
  const C* z;           // optional
  std::uint32_t* flag;  // shared flag, not an operand
  const S* y;
  S* x;
  using operands = OperandList<ReadOperand<&ShuffledSum::y>, OptionalReadOperand<&ShuffledSum::z>,
                               UpdateOperand<&ShuffledSum::x>>;
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    S v = x[i] + y[i];
    if (z != nullptr) v = v + static_cast<S>(static_cast<float>(z[i]));
    flag_if_not_finite(flag, v);
    x[i] = v;
  }
};

template <class S, class C>
void check_shuffled_sum(CudaContext& ctx, std::mt19937_64& rng, const char* name) {
  using Fn = ShuffledSum<S, C>;
  static_assert(cuda_detail::VectorAccess<Fn>::enabled && cuda_detail::VectorAccess<Fn>::width == 8,
                "16 bytes of the 2-byte operand: 8 elements a vector");
  HostContext host;
  for (std::size_t n : {std::size_t{1}, std::size_t{9}, std::size_t{1001}, std::size_t{65543}}) {
    for (std::size_t off_z : {std::size_t{1}, std::size_t{2}}) {  // same phase as x, y (vector path), or not
      for (bool with_z : {true, false}) {
        for (bool bad : {false, true}) {
          const std::string where = std::string(name) + ", n " + std::to_string(n) + (off_z == 1 ? ", vector" : ", element") +
                                    " path" + (with_z ? "" : ", z null") + (bad ? ", a NaN in y" : "");
          auto x = make_operand<S>(ctx, rng, n, 1), y = make_operand<S>(ctx, rng, n, 1);
          auto z = make_operand<C>(ctx, rng, n, off_z);
          if (bad) {
            y.host[n / 2] = std::numeric_limits<S>::quiet_NaN();
            copy_to_device(ctx, y.ptr(), y.host.data(), n);
          }
          auto flag = device_flag(ctx);
          std::uint32_t hflag = 0;
          for_each_index(ctx, n, Fn{with_z ? z.ptr() : nullptr, flag.data(), y.ptr(), x.ptr()});
          for_each_index(host, n, Fn{with_z ? z.host.data() : nullptr, &hflag, y.host.data(), x.host.data()});
          const auto got = result_of(ctx, x, n, "shuffled x");
          GPU_CHECK(std::memcmp(got.data(), x.host.data(), n * sizeof(S)) == 0, "x differs from the host, " + where);
          GPU_CHECK(read_flag(ctx, flag) == hflag && hflag == (bad ? 1u : 0u), "flag, " + where);
          GPU_CHECK(result_of(ctx, y, n, "shuffled y") == y.host || bad, "y must not be written, " + where);
        }
      }
    }
  }
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
    // The check cleared what the failed call left pending: the next launch check must not
    // report it under a kernel's name.
    const cudaError_t pending = cudaPeekAtLastError();
    GPU_CHECK(pending == cudaSuccess, std::string("still pending after the check: ") + cudaGetErrorName(pending));
    (void)cudaGetLastError();  // whatever the check left, so the cases below start clean
    auto ones = ctx.allocate<float>(16, MemoryCategory::Other);
    for_each_index(ctx, ones.size(), Fill<float>{ones.data(), 1.0f});  // its launch check finds nothing
    ctx.synchronize();
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

  run_case("fixed-point combines: device bit for bit as host, forward then inverse exact", [&] {
    const bool quick = std::getenv("DR2NET_GPU_TEST_QUICK") != nullptr;
    // Elements per side-bit word: 64 at beta 0.5, 16 at 0.1, 9 at 0.01, 32 at -0.3; none kept at
    // |beta| >= 1. The sizes are mostly not multiples of those (576 is of all of them).
    const double betas[] = {1.0, 0.5, 0.1, 0.01, -0.3, -1.0, 1.5};
    const double alphas[] = {1.0, 0.9, 0.0};
    for (double beta : betas)
      for (double alpha : alphas)
        for (std::size_t n : {std::size_t{1}, std::size_t{7}, std::size_t{65}, std::size_t{576}, std::size_t{1001},
                              std::size_t{4099}, std::size_t{100003}}) {
          check_fixed_combines<float>(ctx, rng, n, alpha, beta, true);
          if (n == 1001) {
            check_fixed_combines<double>(ctx, rng, n, alpha, beta, true);
            check_fixed_combines<float>(ctx, rng, n, alpha, beta, false);  // standard mode: no side bits
          }
        }
    if (!quick) {
      check_fixed_combines<float>(ctx, rng, (std::size_t{1} << 20) + 3, 0.9, 0.1, true);
      check_fixed_combines<double>(ctx, rng, (std::size_t{1} << 20) + 5, 1.0, 0.01, true);
    }
  });

  run_case("fixed-point combines: flags on device as on host", [&] {
    check_fixed_flags<float>(ctx, rng);
    check_fixed_flags<double>(ctx, rng);
  });

  run_case("stream_checksum: device equals host", [&] {
    HostContext host;
    const bool quick = std::getenv("DR2NET_GPU_TEST_QUICK") != nullptr;
    for (std::size_t n : {std::size_t{1}, std::size_t{2}, std::size_t{255}, std::size_t{256}, std::size_t{257},
                          std::size_t{100003}, std::size_t{(1u << 20) + 7}, std::size_t{3000001}}) {
      if (quick && n > 200000) continue;
      std::vector<Fx> v(n);
      for (auto& e : v) e = Fx{static_cast<std::int64_t>(rng())};  // every bit pattern, negatives included
      auto d = fixed_on_device(ctx, v);
      const std::uint64_t got = stream_checksum(ctx, d.data(), n), want = stream_checksum(host, v.data(), n);
      GPU_CHECK(got == want, "n " + std::to_string(n) + ": device " + std::to_string(got) + ", host " + std::to_string(want));
      // One bit flipped anywhere changes both, identically.
      const std::size_t at = n / 3;
      v[at].raw ^= std::int64_t{1} << (rng() % 63);
      copy_to_device(ctx, d.data() + at, v.data() + at, 1);
      const std::uint64_t got2 = stream_checksum(ctx, d.data(), n), want2 = stream_checksum(host, v.data(), n);
      GPU_CHECK(got2 == want2 && got2 != got, "n " + std::to_string(n) + ": after a bit flip");
    }
    GPU_CHECK(stream_checksum(ctx, static_cast<const Fx*>(nullptr), 0) == 0, "empty stream");
  });

  run_case("count_not_finite: device equals host (fp32, fp64)", [&] {
    check_count_not_finite<float>(ctx, rng, "fp32");
    check_count_not_finite<double>(ctx, rng, "fp64");
  });

  run_case("combine flags: a NaN sets the flag on device as on host (vector and element paths)", [&] {
    HostContext host;
    const std::size_t n = 4101;  // at phase 1 and 4 floats a vector: 3 head elements, 1024 vectors, 2 tail elements
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    struct Path {
      const char* name;
      std::size_t off_y, off_f;  // x at offset 1; same phase: head + vector body + tail
      bool scalar;
    };
    const Path paths[] = {{"vector path", 1, 1, false}, {"element path (phases differ)", 1, 2, false},
                          {"scalar launcher", 1, 1, true}};
    for (const Path& p : paths) {
      auto launch = [&](const auto& fn) {
        if (p.scalar) for_each_index_scalar(ctx, n, fn);
        else for_each_index(ctx, n, fn);
      };
      // Positions: the head (before the vector boundary), the body, the tail, nowhere.
      for (std::size_t at : {std::size_t{0}, std::size_t{2000}, n - 1, n}) {
        const std::string where = std::string(p.name) + ", bad element " + (at < n ? std::to_string(at) : "none");
        {  // ForwardCombine: NaN in f
          auto x = make_operand<float>(ctx, rng, n, 1), y = make_operand<float>(ctx, rng, n, p.off_y);
          auto f = make_operand<float>(ctx, rng, n, p.off_f);
          if (at < n) {
            f.host[at] = nan;
            copy_to_device(ctx, f.ptr() + at, &nan, 1);
          }
          auto dflag = device_flag(ctx);
          std::uint32_t hflag = 0;
          launch(ForwardCombine<float, float, float>{x.ptr(), y.ptr(), f.ptr(), 0.5f, 0.5f, dflag.data()});
          for_each_index(host, n, ForwardCombine<float, float, float>{x.host.data(), y.host.data(), f.host.data(), 0.5f,
                                                                      0.5f, &hflag});
          GPU_CHECK(read_flag(ctx, dflag) == hflag && hflag == (at < n ? 1u : 0u), "ForwardCombine, " + where);
          result_of(ctx, x, n, "flagged forward x");
        }
        {  // ForwardCombine over fp64 streams with fp32 compute: Inf in y
          auto x = make_operand<double>(ctx, rng, n, 1), y = make_operand<double>(ctx, rng, n, p.off_y);
          auto f = make_operand<float>(ctx, rng, n, p.off_f);
          if (at < n) {
            const double dinf = std::numeric_limits<double>::infinity();
            y.host[at] = dinf;
            copy_to_device(ctx, y.ptr() + at, &dinf, 1);
          }
          auto dflag = device_flag(ctx);
          std::uint32_t hflag = 0;
          launch(ForwardCombine<double, float, double>{x.ptr(), y.ptr(), f.ptr(), 1.0, 0.1, dflag.data()});
          for_each_index(host, n, ForwardCombine<double, float, double>{x.host.data(), y.host.data(), f.host.data(), 1.0,
                                                                        0.1, &hflag});
          GPU_CHECK(read_flag(ctx, dflag) == hflag && hflag == (at < n ? 1u : 0u), "ForwardCombine fp64/fp32, " + where);
        }
        for (int variant = 0; variant < 2; ++variant) {  // BackwardCombine: Inf in jt, with and without reconstruction
          auto gx = make_operand<float>(ctx, rng, n, 1), gy = make_operand<float>(ctx, rng, n, 1);
          auto jt = make_operand<float>(ctx, rng, n, p.off_f);
          auto y = make_operand<float>(ctx, rng, n, p.off_y), x = make_operand<float>(ctx, rng, n, 1);
          auto f = make_operand<float>(ctx, rng, n, p.off_f);
          if (at < n) {
            jt.host[at] = inf;
            copy_to_device(ctx, jt.ptr() + at, &inf, 1);
          }
          auto dflag = device_flag(ctx);
          std::uint32_t hflag = 0;
          if (variant == 0) {
            launch(BackwardCombine<float, float, float, true>{gx.ptr(), gy.ptr(), jt.ptr(), y.ptr(), x.ptr(), f.ptr(),
                                                              0.5f, 0.5f, dflag.data()});
            for_each_index(host, n, BackwardCombine<float, float, float, true>{gx.host.data(), gy.host.data(),
                                                                               jt.host.data(), y.host.data(),
                                                                               x.host.data(), f.host.data(), 0.5f,
                                                                               0.5f, &hflag});
          } else {
            launch(BackwardCombine<float, float, float, false>{gx.ptr(), gy.ptr(), jt.ptr(), nullptr, nullptr, nullptr,
                                                               0.5f, 0.5f, dflag.data()});
            for_each_index(host, n, BackwardCombine<float, float, float, false>{gx.host.data(), gy.host.data(),
                                                                                jt.host.data(), nullptr, nullptr,
                                                                                nullptr, 0.5f, 0.5f, &hflag});
          }
          GPU_CHECK(read_flag(ctx, dflag) == hflag && hflag == (at < n ? 1u : 0u),
                    std::string("BackwardCombine") + (variant == 0 ? " (reconstructing), " : ", ") + where);
        }
      }
    }
  });

  run_case("stack passes (InitStreams, StackOutputPass, InitGradients, InputGradient, StridedGather): bit for bit, flags", [&] {
    HostContext host;
    const std::size_t n = 3001;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float too_big = 2.0f * static_cast<float>(std::ldexp(1.0, 62 - Fx::frac_bits));  // finite, out of range
    for (int bad = 0; bad < 3; ++bad) {  // none, a NaN, a finite value outside the fixed-point range
      const std::string where = bad == 0 ? "clean" : (bad == 1 ? "NaN" : "out of range");
      auto h0 = random_values<float>(n, rng, -3.0, 3.0);
      if (bad == 1) h0[1234] = nan;
      if (bad == 2) h0[n - 1] = too_big;
      auto dh0 = to_device(ctx, h0);
      {  // fixed-point streams from h0
        std::vector<Fx> hx(n), hy(n);
        auto dx = ctx.allocate<Fx>(n + kGuard, MemoryCategory::Streams), dy = ctx.allocate<Fx>(n + kGuard, MemoryCategory::Streams);
        auto dflag = device_flag(ctx);
        std::uint32_t hflag = 0;
        for_each_index(ctx, n, InitStreams<Fx, float>{dx.data(), dy.data(), dh0.data(), dflag.data()});
        for_each_index(host, n, InitStreams<Fx, float>{hx.data(), hy.data(), h0.data(), &hflag});
        GPU_CHECK(fixed_result(ctx, dx, n, "InitStreams x") == raws(hx) && fixed_result(ctx, dy, n, "InitStreams y") == raws(hy),
                  "InitStreams<fixed>: raw streams differ from the host's, " + where);
        GPU_CHECK(read_flag(ctx, dflag) == hflag && hflag == (bad != 0 ? 1u : 0u), "InitStreams<fixed> flag, " + where);
        if (bad == 0) {
          for (bool mean : {false, true}) {  // the output from fixed-point streams, dequantized
            std::vector<float> hout(n);
            auto dout = ctx.allocate<float>(n, MemoryCategory::Other);
            auto of = device_flag(ctx);
            std::uint32_t hof = 0;
            for_each_index(ctx, n, StackOutputPass<Fx, float, float>{dout.data(), dx.data(), dy.data(), mean, of.data()});
            for_each_index(host, n, StackOutputPass<Fx, float, float>{hout.data(), hx.data(), hy.data(), mean, &hof});
            const auto got = to_host(ctx, dout.data(), n);
            GPU_CHECK(std::memcmp(got.data(), hout.data(), n * sizeof(float)) == 0 && read_flag(ctx, of) == hof && hof == 0,
                      std::string("StackOutputPass<fixed>") + (mean ? " (mean)" : ""));
          }
        }
      }
      {  // fp32 streams from h0 (the range does not apply: only the NaN is flagged)
        std::vector<float> hx(n), hy(n);
        auto dx = ctx.allocate<float>(n, MemoryCategory::Streams), dy = ctx.allocate<float>(n, MemoryCategory::Streams);
        auto dflag = device_flag(ctx);
        std::uint32_t hflag = 0;
        for_each_index(ctx, n, InitStreams<float, float>{dx.data(), dy.data(), dh0.data(), dflag.data()});
        for_each_index(host, n, InitStreams<float, float>{hx.data(), hy.data(), h0.data(), &hflag});
        const auto gx = to_host(ctx, dx.data(), n), gy = to_host(ctx, dy.data(), n);
        GPU_CHECK(std::memcmp(gx.data(), hx.data(), n * sizeof(float)) == 0 &&
                      std::memcmp(gy.data(), hy.data(), n * sizeof(float)) == 0,
                  "InitStreams<float>, " + where);
        GPU_CHECK(read_flag(ctx, dflag) == hflag && hflag == (bad == 1 ? 1u : 0u), "InitStreams<float> flag, " + where);
        for (bool mean : {false, true}) {  // the output, NaN flagged
          std::vector<float> hout(n);
          auto dout = ctx.allocate<float>(n, MemoryCategory::Other);
          auto of = device_flag(ctx);
          std::uint32_t hof = 0;
          for_each_index(ctx, n, StackOutputPass<float, float, float>{dout.data(), dx.data(), dy.data(), mean, of.data()});
          for_each_index(host, n, StackOutputPass<float, float, float>{hout.data(), hx.data(), hy.data(), mean, &hof});
          const auto got = to_host(ctx, dout.data(), n);
          bool same = true;
          for (std::size_t i = 0; i < n; ++i) same = same && (got[i] == hout[i] || (std::isnan(got[i]) && std::isnan(hout[i])));
          GPU_CHECK(same && read_flag(ctx, of) == hof && hof == (bad == 1 ? 1u : 0u),
                    std::string("StackOutputPass<float>") + (mean ? " (mean), " : ", ") + where);
        }
      }
      for (bool mean : {false, true}) {  // dout -> (gx, gy) -> dh0, with h0 standing in for dout
        std::vector<float> hgx(n), hgy(n), hd(n);
        auto dgx = ctx.allocate<float>(n, MemoryCategory::Other), dgy = ctx.allocate<float>(n, MemoryCategory::Other);
        auto dd = ctx.allocate<float>(n, MemoryCategory::Other);
        auto f1 = device_flag(ctx), f2 = device_flag(ctx);
        std::uint32_t h1 = 0, h2 = 0;
        for_each_index(ctx, n, InitGradients<float, float>{dgx.data(), dgy.data(), dh0.data(), mean, f1.data()});
        for_each_index(host, n, InitGradients<float, float>{hgx.data(), hgy.data(), h0.data(), mean, &h1});
        for_each_index(ctx, n, InputGradient<float, float>{dd.data(), dgx.data(), dgy.data(), f2.data()});
        for_each_index(host, n, InputGradient<float, float>{hd.data(), hgx.data(), hgy.data(), &h2});
        const auto a = to_host(ctx, dgx.data(), n), b = to_host(ctx, dgy.data(), n), c = to_host(ctx, dd.data(), n);
        bool same = true;
        for (std::size_t i = 0; i < n; ++i)
          same = same && (std::isnan(hd[i]) ? std::isnan(c[i]) : c[i] == hd[i]) &&
                 (std::isnan(hgy[i]) ? std::isnan(b[i]) : b[i] == hgy[i]) &&
                 (std::isnan(hgx[i]) ? std::isnan(a[i]) : a[i] == hgx[i]);
        GPU_CHECK(same, std::string("InitGradients/InputGradient") + (mean ? " (mean), " : ", ") + where);
        GPU_CHECK(read_flag(ctx, f1) == h1 && h1 == (bad == 1 ? 1u : 0u), "InitGradients flag, " + where);
        GPU_CHECK(read_flag(ctx, f2) == h2 && h2 == (bad == 1 ? 1u : 0u), "InputGradient flag, " + where);
      }
    }
    {  // the monitor's strided sample
      const auto src = random_values<float>(n, rng);
      auto ds = to_device(ctx, src);
      const std::size_t count = 97, stride = n / count;
      std::vector<float> hs(count);
      auto dd = ctx.allocate<float>(count, MemoryCategory::Other);
      for_each_index(ctx, count, StridedGather<float>{dd.data(), ds.data(), stride});
      for_each_index(host, count, StridedGather<float>{hs.data(), src.data(), stride});
      GPU_CHECK(to_host(ctx, dd.data(), count) == hs, "StridedGather");
    }
  });

  run_case("operands declared by the functor: shuffled fields, optional operand, vector and element paths bit for bit", [&] {
    check_shuffled_sum<float, __nv_bfloat16>(ctx, rng, "fp32 + bf16");
    check_shuffled_sum<double, __half>(ctx, rng, "fp64 + fp16");
  });

  run_case("BackwardCombine with jt and f one buffer (two read operands aliasing) on the vector path", [&] {
    HostContext host;
    const Tolerance tol = tolerances_for<float>().elementwise;
    for (std::size_t n : {std::size_t{17}, std::size_t{4099}}) {
      auto gx = make_operand<float>(ctx, rng, n, 0), gy = make_operand<float>(ctx, rng, n, 0);
      auto y = make_operand<float>(ctx, rng, n, 0), x = make_operand<float>(ctx, rng, n, 0);
      auto f = make_operand<__nv_bfloat16>(ctx, rng, n, 0);
      const float alpha = 0.75f, beta = 0.5f;
      std::vector<double> sgx(n), sgy(n), sy(n);
      for (std::size_t i = 0; i < n; ++i) {
        sgx[i] = mag(gx.host[i]) + mag(alpha) * mag(gy.host[i]) + mag(f.host[i]);
        sgy[i] = mag(beta) * mag(gy.host[i]);
        sy[i] = (mag(y.host[i]) + mag(alpha) * mag(x.host[i]) + mag(f.host[i])) / mag(beta);
      }
      using Fn = BackwardCombine<float, __nv_bfloat16, float, true>;
      for_each_index(ctx, n, Fn{gx.ptr(), gy.ptr(), f.ptr(), y.ptr(), x.ptr(), f.ptr(), alpha, beta});
      for_each_index(host, n, Fn{gx.host.data(), gy.host.data(), f.host.data(), y.host.data(), x.host.data(),
                                 f.host.data(), alpha, beta});
      GPU_CHECK_CLOSE(result_of(ctx, gx, n, "aliased gx"), gx.host, tol, &sgx);
      GPU_CHECK_CLOSE(result_of(ctx, gy, n, "aliased gy"), gy.host, tol, &sgy);
      GPU_CHECK_CLOSE(result_of(ctx, y, n, "aliased y"), y.host, tol, &sy);
      const auto f_after = result_of(ctx, f, n, "aliased f");
      GPU_CHECK(std::memcmp(f_after.data(), f.host.data(), n * sizeof(__nv_bfloat16)) == 0, "f (= jt) must not be written");
    }
  });

  ctx.synchronize();
  return finish();
}
