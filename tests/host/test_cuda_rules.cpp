// The CUDA backend's decisions that need no GPU, checked on the host: how the error checks
// treat the runtime's pending error (a fake runtime stands in for it), the scoped current
// device and the shared pool release threshold (fake runtimes again), the cuBLASLt bias
// alignment rule, the GPU benchmark's transfer counts and largest-batch search, and the
// Philox mask evaluation that host and device share (against the documented formula).

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "bandwidth.hpp"
#include "batch_search.hpp"
#include "dr2net/backend/cuda/device_scope.hpp"
#include "dr2net/backend/cuda/error_state.hpp"
#include "dr2net/backend/host/context.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/philox.hpp"
#include "dr2net/modules/cuda/bias_alignment.hpp"
#include "dr2net/modules/drop.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;
using namespace dr2net::cuda_detail;

namespace {

// ---- a fake CUDA runtime: one pending error per thread, sticky errors never cleared ----------

struct FakeRuntime {
  int pending = 0;
  bool sticky = false;
  //! A failed call: sets the pending error, unless a sticky one holds it (as the runtime does).
  void fail(int code, bool make_sticky = false) {
    if (sticky) return;
    pending = code;
    sticky = make_sticky;
  }
};

struct FakeSource {
  FakeRuntime* rt;
  using code_type = int;
  static constexpr int success = 0;
  int take() const {
    const int e = rt->pending;
    if (!rt->sticky) rt->pending = 0;
    return e;
  }
  int peek() const { return rt->pending; }
  std::string describe(int e) const { return "fake error " + std::to_string(e); }
};

//! What DR2NET_CUDA_CHECK does with a call's status, against the fake runtime.
void fake_check(FakeRuntime& rt, int status, const char* call) {
  if (status != 0) {
    rt.fail(status);
    throw_failed_call(FakeSource{&rt}, status, call, "fake.cu", 7);
  }
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return {};
}

}  // namespace

TEST_CASE("a reported failed call leaves nothing pending, so the next launch check does not report it",
          "[cuda_rules][errors]") {
  FakeRuntime rt;
  const FakeSource src{&rt};
  const std::string m = message_of([&] { fake_check(rt, 101, "cudaSetDevice(1 << 20)"); });
  CHECK_THAT(m, Catch::Contains("CUDA call `cudaSetDevice(1 << 20)` failed: fake error 101"));
  CHECK_THAT(m, Catch::Contains("fake.cu:7"));
  CHECK(rt.pending == 0);  // cleared by the check that reported it
  // The next kernel's check, with a launch that succeeded, reports nothing.
  CHECK_NOTHROW(check_launch_after(src, "next kernel", "k.cu", 1));
  const LaunchCheck<FakeSource> check(src, "next kernel", "k.cu", 1);
  CHECK(check.pending_before() == 0);
  CHECK_NOTHROW(check.after());
  // Without the clearing, the same sequence blames the kernel: what the rule prevents.
  rt.fail(101);
  const std::string blamed = message_of([&] { check_launch_after(src, "next kernel", "k.cu", 1); });
  CHECK_THAT(blamed, Catch::Contains("launch of next kernel failed: fake error 101"));
  CHECK(rt.pending == 0);  // the launch check clears what it reports too
}

TEST_CASE("a launch check does not blame the kernel for an error pending before the launch", "[cuda_rules][errors]") {
  FakeRuntime rt;
  const FakeSource src{&rt};
  SECTION("earlier unchecked failure, launch succeeds: no error, the earlier one is cleared") {
    rt.fail(55);  // someone else's unchecked call
    const LaunchCheck<FakeSource> check(src, "dr2net elementwise kernel", "e.cuh", 3);
    CHECK(check.pending_before() == 55);
    CHECK(rt.pending == 0);
    // the launch: no failure
    CHECK_NOTHROW(check.after());
    CHECK(rt.pending == 0);
  }
  SECTION("earlier unchecked failure, launch fails too: the launch's own error, the earlier one named apart") {
    rt.fail(55);
    const LaunchCheck<FakeSource> check(src, "dr2net elementwise kernel", "e.cuh", 3);
    rt.fail(9);  // the launch's own failure (too many resources, say)
    const std::string m = message_of([&] { check.after(); });
    CHECK_THAT(m, Catch::Contains("launch of dr2net elementwise kernel failed: fake error 9"));
    CHECK_THAT(m, Catch::Contains("earlier, unrelated failure (fake error 55)"));
    CHECK_THAT(m, Catch::Contains("e.cuh:3"));
    CHECK(rt.pending == 0);
  }
  SECTION("a sticky error pending before the launch is reported as such") {
    rt.fail(700, true);  // a fault in earlier device work
    const LaunchCheck<FakeSource> check(src, "k", "e.cuh", 3);
    rt.fail(9);  // ignored: the sticky error holds the state
    const std::string m = message_of([&] { check.after(); });
    CHECK_THAT(m, Catch::Contains("launch of k failed: fake error 700"));
    CHECK_THAT(m, Catch::Contains("already pending before this launch"));
    CHECK(rt.pending == 700);  // sticky: nothing clears it
    const std::string after = message_of([&] { check_launch_after(src, "k2", "e.cuh", 4); });
    CHECK_THAT(after, Catch::Contains("sticky"));
  }
  SECTION("nothing pending, launch succeeds") {
    const LaunchCheck<FakeSource> check(src, "k", "e.cuh", 3);
    CHECK(check.pending_before() == 0);
    CHECK_NOTHROW(check.after());
  }
}

TEST_CASE("a failed library call clears and names what it left pending in the runtime", "[cuda_rules][errors]") {
  FakeRuntime rt;
  rt.fail(13);
  const std::string m = message_of([&] {
    throw_failed_library_call(FakeSource{&rt}, "cuBLAS", "cuBLAS status 13 (launch failed)", "cublasGemmEx(...)",
                              "g.cuh", 5);
  });
  CHECK_THAT(m, Catch::Contains("cuBLAS call `cublasGemmEx(...)` failed: cuBLAS status 13"));
  CHECK_THAT(m, Catch::Contains("the CUDA runtime reports fake error 13"));
  CHECK(rt.pending == 0);
  const std::string clean = message_of(
      [&] { throw_failed_library_call(FakeSource{&rt}, "cuBLAS", "status 7", "cublasCreate(&h)", "c.hpp", 1); });
  CHECK_THAT(clean, !Catch::Contains("runtime reports"));
}

// ---- the current device and the pool's release threshold ------------------------------------

namespace {

struct FakeDevices {
  int current = 0;
  int sets = 0;
};

struct FakeDeviceApi {
  FakeDevices* d;
  int current() const { return d->current; }
  void make_current(int device) const {
    if (device < 0 || device >= 4) throw std::runtime_error("no such device");
    d->current = device;
    ++d->sets;
  }
  void restore(int device) const noexcept {
    d->current = device;
    ++d->sets;
  }
};

}  // namespace

TEST_CASE("a device scope makes its device current and restores the caller's", "[cuda_rules][device]") {
  FakeDevices d;
  d.current = 2;
  {
    const BasicDeviceScope<FakeDeviceApi> scope({&d}, 1);
    CHECK(d.current == 1);
    CHECK(scope.previous() == 2);
    {
      const BasicDeviceScope<FakeDeviceApi> inner({&d}, 3);
      CHECK(d.current == 3);
    }
    CHECK(d.current == 1);
  }
  CHECK(d.current == 2);
  CHECK(d.sets == 4);
  {
    const BasicDeviceScope<FakeDeviceApi> same({&d}, 2);  // already current: no call at all
    CHECK(d.current == 2);
  }
  CHECK(d.sets == 4);
  // A device that cannot be made current: the caller's stays, nothing to restore.
  CHECK_THROWS_AS((BasicDeviceScope<FakeDeviceApi>({&d}, 9)), std::runtime_error);
  CHECK(d.current == 2);
  CHECK(d.sets == 4);
}

TEST_CASE("the pool's release threshold is raised while any context holds it and restored by the last",
          "[cuda_rules][device]") {
  std::map<int, std::uint64_t> threshold{{1, 12345}, {2, 0}};
  int reads = 0;
  ReleaseThresholdShare<int> share;
  const std::uint64_t keep = std::numeric_limits<std::uint64_t>::max();
  const auto acquire = [&](int pool) {
    share.acquire(
        pool, keep,
        [&] {
          ++reads;
          return threshold.at(pool);
        },
        [&](std::uint64_t v) { threshold.at(pool) = v; });
  };
  const auto release = [&](int pool) { share.release(pool, [&](std::uint64_t v) noexcept { threshold.at(pool) = v; }); };

  acquire(1);
  CHECK(threshold[1] == keep);
  acquire(1);  // a second context on the same device: the first one's saved value stays
  CHECK(reads == 1);
  CHECK(share.holders(1) == 2);
  acquire(2);
  CHECK(threshold[2] == keep);
  release(1);  // not LIFO: the first context ends while the second lives
  CHECK(threshold[1] == keep);
  release(1);
  CHECK(threshold[1] == 12345);
  CHECK(share.holders(1) == 0);
  release(2);
  CHECK(threshold[2] == 0);
  release(2);  // one release too many: ignored
  CHECK(threshold[2] == 0);
  // A threshold that cannot be read: nothing recorded, nothing set.
  CHECK_THROWS_AS(share.acquire(3, keep, []() -> std::uint64_t { throw std::runtime_error("unreadable"); },
                                [&](std::uint64_t) { FAIL("must not set"); }),
                  std::runtime_error);
  CHECK(share.holders(3) == 0);
}

// ---- the cuBLASLt bias epilogue's alignment -------------------------------------------------

TEST_CASE("the bias epilogue needs a 16-byte aligned bias; a null bias needs nothing", "[cuda_rules][gemm]") {
  alignas(256) static unsigned char buffer[1024];
  CHECK(lt_bias_pointer_ok(nullptr));
  CHECK(lt_bias_pointer_ok(buffer));
  CHECK(lt_bias_pointer_ok(buffer + 16));
  CHECK(lt_bias_pointer_ok(buffer + 48));
  CHECK_FALSE(lt_bias_pointer_ok(buffer + 4));  // one fp32 element off: element-aligned, not enough
  CHECK_FALSE(lt_bias_pointer_ok(buffer + 2));  // one bf16 element off
  CHECK_FALSE(lt_bias_pointer_ok(buffer + 8));  // one fp64 element off
  CHECK_FALSE(lt_bias_pointer_ok(buffer + 1));
  for (std::size_t off = 0; off < 256; ++off)
    CHECK(lt_bias_pointer_ok(buffer + off) == (off % 16 == 0));
  CHECK(address_alignment(0x1000) == 256);
  CHECK(address_alignment(0x1010) == 16);
  CHECK(address_alignment(0x1008) == 8);
  CHECK(address_alignment(0x1001) == 1);
  CHECK(lt_bias_alignment_ok(16));
  CHECK(lt_bias_alignment_ok(256));
  CHECK_FALSE(lt_bias_alignment_ok(8));
}

// ---- the GPU benchmark's arithmetic ---------------------------------------------------------

TEST_CASE("bandwidth counts each buffer once per direction", "[cuda_rules][bench]") {
  using namespace dr2net_bench;
  static char storage[8];
  const void *gx = storage, *gy = storage + 1, *y = storage + 2, *x = storage + 3, *f = storage + 4,
             *jt = storage + 5;
  const std::uint64_t fs = 4, bs = 2;
  // fp32 backward + inverse, J^T g already in gx: gx, gy, y updated; x, f read.
  CHECK(bytes_per_element({updates(gx, fs), updates(gy, fs), reads(nullptr, fs), updates(y, fs), reads(x, fs),
                           reads(f, fs)}) == 8 * fs);
  // Mixed precision, J^T g apart in the same compute-typed buffer as f: seven fp32 transfers and one bf16.
  CHECK(bytes_per_element({updates(gx, fs), updates(gy, fs), reads(f, bs), updates(y, fs), reads(x, fs),
                           reads(f, bs)}) == 7 * fs + bs);
  // Apart in a buffer of its own, it is one more bf16 read.
  CHECK(bytes_per_element({updates(gx, fs), updates(gy, fs), reads(jt, bs), updates(y, fs), reads(x, fs),
                           reads(f, bs)}) == 7 * fs + 2 * bs);
  CHECK(bytes_per_element({writes(y, fs), reads(x, fs)}) == 8);                               // copy
  CHECK(bytes_per_element({updates(x, fs), reads(y, fs), reads(f, fs)}) == 16);               // forward fp32
  CHECK(bytes_per_element({updates(x, fs), reads(y, fs), reads(f, bs)}) == 14);               // forward fp32/bf16
  CHECK(bytes_per_element({writes(f, bs), reads(x, fs)}) == 6);                               // convert
  CHECK(bytes_per_element({reads(x, fs), writes(x, fs)}) == bytes_per_element({updates(x, fs)}));
  const std::uint64_t n = std::uint64_t{1} << 26;
  CHECK(bytes_moved({updates(gx, fs), updates(gy, fs), reads(f, bs), updates(y, fs), reads(x, fs), reads(f, bs)}, n) ==
        30 * n);
  CHECK(gb_per_s(2'000'000'000, 1000.0) == 2.0);
  CHECK_THROWS_AS(bytes_per_element({reads(f, 2), reads(f, 4)}), std::invalid_argument);
}

TEST_CASE("the largest-batch search reports only a batch that ran within the budget", "[cuda_rules][bench]") {
  using namespace dr2net_bench;
  const std::size_t fixed = 1000, per = 100;
  std::vector<std::pair<std::int64_t, std::size_t>> runs;  // every batch run and its peak
  const auto model = [&](auto&& peak) {
    return [&runs, peak](std::int64_t b) {
      const std::size_t p = peak(b);
      runs.emplace_back(b, p);
      return p;
    };
  };
  const auto affine = [&](std::int64_t b) { return fixed + static_cast<std::size_t>(b) * per; };
  // A reported batch is one that was run and whose peak fit the budget.
  const auto ran_and_fit = [&](const BatchSearch& r, std::size_t budget) {
    return std::any_of(runs.begin(), runs.end(), [&](const auto& run) {
      return run.first == r.largest_batch && run.second > 0 && run.second <= budget;
    });
  };
  const std::size_t budget = 1000 + 37 * 100 + 50;

  SECTION("affine peaks: the estimate fits at the first try") {
    const BatchSearch r = largest_fitting_batch(model(affine), budget);
    CHECK(r.largest_batch == 37);
    CHECK(ran_and_fit(r, budget));
    CHECK(r.estimate == 37);
    CHECK(r.tries == 1);
    CHECK(r.bytes_per_sample == 100.0);
    CHECK(r.fixed_bytes == 1000.0);
  }
  SECTION("peaks above the model: it steps down to a batch that fits") {
    const auto bumpy = [&](std::int64_t b) { return affine(b) + (b > 35 ? std::size_t{200} : 0); };
    const BatchSearch r = largest_fitting_batch(model(bumpy), budget);
    CHECK(r.largest_batch == 35);
    CHECK(ran_and_fit(r, budget));
    CHECK(r.tries == 3);
  }
  SECTION("no try fits: none, not a batch that never ran") {
    const auto wall = [&](std::int64_t b) { return b > 2 ? std::size_t{1} << 40 : affine(b); };
    const BatchSearch r = largest_fitting_batch(model(wall), budget);
    CHECK(r.largest_batch == 0);
    CHECK_FALSE(r.found());
    CHECK(r.estimate == 37);
    CHECK(r.tries == 4);
    for (const auto& run : runs) CHECK((run.first <= 2 || run.second > budget));  // every try was over
  }
  SECTION("out of memory at batch 1, or a budget below the fixed bytes: none") {
    const BatchSearch oom = largest_fitting_batch(model([](std::int64_t) { return std::size_t{0}; }), 1 << 30);
    CHECK_FALSE(oom.found());
    CHECK(oom.tries == 0);
    const BatchSearch small = largest_fitting_batch(model(affine), 500);
    CHECK_FALSE(small.found());
    CHECK(small.tries == 0);
  }
  SECTION("out of memory at the estimate: treated as not fitting") {
    const auto ooms = [&](std::int64_t b) { return b >= 36 ? std::size_t{0} : affine(b); };
    const BatchSearch r = largest_fitting_batch(model(ooms), budget);
    CHECK(r.largest_batch == 35);
    CHECK(ran_and_fit(r, budget));
  }
}

// ---- Philox and the drop masks --------------------------------------------------------------

namespace {

//! The documented stream layout (core/philox.hpp), written out independently.
std::uint32_t reference_bits(std::uint64_t seed, std::int64_t step, std::uint32_t module, RandomPurpose purpose,
                             std::uint64_t index) {
  const auto ustep = static_cast<std::uint64_t>(step);
  const PhiloxKey key{{static_cast<std::uint32_t>(seed & 0xffffffffu),
                       static_cast<std::uint32_t>((seed >> 32) ^ (ustep >> 32))}};
  const std::uint64_t g = index / 4;
  const PhiloxBlock counter{{static_cast<std::uint32_t>(g & 0xffffffffu), static_cast<std::uint32_t>(g >> 32),
                             module * 8 + static_cast<std::uint32_t>(purpose),
                             static_cast<std::uint32_t>(ustep & 0xffffffffu)}};
  return philox4x32_10(counter, key).v[index % 4];
}

//! The documented factor of element i (modules/drop.hpp), from the reference bits.
template <class T>
T reference_factor(std::uint64_t seed, std::int64_t step, std::uint32_t module, RandomPurpose purpose, double p_path,
                   double p_drop, std::uint64_t sample_elements, std::uint64_t i) {
  T f = T(1);
  if (p_path > 0) {
    const std::uint32_t bits = reference_bits(seed, step, module, RandomPurpose::DropPath, i / sample_elements);
    if ((bits >> 8) >= keep_threshold(p_path)) return T(0);
    f = static_cast<T>(1.0 / (1.0 - p_path));
  }
  if (p_drop > 0) {
    if ((reference_bits(seed, step, module, purpose, i) >> 8) >= keep_threshold(p_drop)) return T(0);
    f *= static_cast<T>(1.0 / (1.0 - p_drop));
  }
  return f;
}

template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

}  // namespace

TEST_CASE("philox_word selects the word its index names", "[cuda_rules][philox]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  for (int t = 0; t < 100; ++t) {
    const PhiloxBlock b{{static_cast<std::uint32_t>(rng()), static_cast<std::uint32_t>(rng()),
                         static_cast<std::uint32_t>(rng()), static_cast<std::uint32_t>(rng())}};
    for (std::uint32_t lane = 0; lane < 8; ++lane) CHECK(philox_word(b, lane) == b.v[lane % 4]);
  }
}

TEMPLATE_TEST_CASE("drop masks follow the documented formula, per element and per run, across the cached samples",
                   "[cuda_rules][philox][drop]", float, double) {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  const std::uint64_t stack_seed = rng();
  // A step beyond 32 bits exercises the key's fold of the step's high bits.
  const std::int64_t step = static_cast<std::int64_t>(rng() >> 20);
  const int module = static_cast<int>(rng() % 1000);
  struct Rates {
    double path, drop;
  };
  for (const Rates r : {Rates{0.3, 0.0}, Rates{0.0, 0.25}, Rates{0.4, 0.3}}) {
    for (const std::uint64_t se : {std::uint64_t{1}, std::uint64_t{3}, std::uint64_t{7}, std::uint64_t{100}}) {
      INFO("p_path " << r.path << " p_drop " << r.drop << " sample elements " << se);
      const ModuleCall<HostContext> call{ctx, module, step, stack_seed, true};
      const DropScale<TestType> d = make_drop_scale<TestType>(call, r.path, r.drop, RandomPurpose::OutputDropout, se);
      REQUIRE(d.active());
      // Past the cached samples (256) too: 600 samples of `se` elements, capped for the large ones.
      const std::uint64_t n = std::min<std::uint64_t>(600 * se, 40000);
      DropScale<TestType> uncached = d;
      uncached.path_cached = 0;  // every sample from the stream
      long mismatches = 0;
      for (std::uint64_t i = 0; i < n; ++i) {
        const TestType want = reference_factor<TestType>(stack_seed, step, static_cast<std::uint32_t>(module),
                                                         RandomPurpose::OutputDropout, r.path, r.drop, se, i);
        mismatches += !same_bits(d(i), want);
        mismatches += !same_bits(uncached(i), want);
      }
      CHECK(mismatches == 0);
      // Runs of N consecutive elements at every alignment equal the per-element factors bit for bit.
      long run_mismatches = 0;
      for (std::uint64_t first = 0; first + 8 < n; first += 5) {
        TestType f1[1], f3[3], f4[4], f8[8];
        d.factors(first, f1);
        d.factors(first, f3);
        d.factors(first, f4);
        d.factors(first, f8);
        for (int j = 0; j < 8; ++j) {
          const TestType want = d(first + static_cast<std::uint64_t>(j));
          if (j < 1) run_mismatches += !same_bits(f1[j], want);
          if (j < 3) run_mismatches += !same_bits(f3[j], want);
          if (j < 4) run_mismatches += !same_bits(f4[j], want);
          run_mismatches += !same_bits(f8[j], want);
        }
      }
      CHECK(run_mismatches == 0);
    }
  }
  // Inactive: every factor, per element or per run, is 1.
  const ModuleCall<HostContext> inference{ctx, module, step, stack_seed, false};
  const DropScale<TestType> off = make_drop_scale<TestType>(inference, 0.5, 0.5, RandomPurpose::OutputDropout, 3);
  CHECK_FALSE(off.active());
  TestType run[4];
  off.factors(5, run);
  for (TestType v : run) CHECK(v == TestType(1));
}

TEST_CASE("the cached drop-path decisions keep 1 - p of the samples", "[cuda_rules][drop]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  const ModuleCall<HostContext> call{ctx, 4, 17, rng(), true};
  const DropScale<double> d = make_drop_scale<double>(call, 0.3, 0.0, RandomPurpose::OutputDropout, 1);
  CHECK(d.path_cached == kDropPathCachedSamples);
  int kept = 0;
  for (std::uint64_t b = 0; b < kDropPathCachedSamples; ++b) kept += d.keep_sample(b);
  // 256 Bernoulli(0.7) draws: mean 179.2, sd 7.3; 6 sd either way.
  CHECK(kept > 135);
  CHECK(kept < 223);
}
