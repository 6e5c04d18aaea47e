// Error-bounded mode's fused comparison and snapshot restore on the device
// (compare_and_restore, backend/cuda/reduce.cuh) against its host twin
// (backend/host/reduce.hpp): the same (max |a - b|, max |b|) bit for bit, computed in the stream
// type, on fresh random data of odd sizes with NaN and infinities placed at block boundaries and
// in the tail; the stream equal to the snapshot afterwards and nothing written past n.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cuda/gpu_test.cuh"
#include "dr2net/backend/cuda/cuda.cuh"
#include "dr2net/backend/host/context.hpp"

using namespace dr2net;
using namespace dr2net::testing;

namespace {

constexpr std::size_t kGuard = 19;  // elements after the stream that must stay untouched

bool same(double x, double y) { return (std::isnan(x) && std::isnan(y)) || x == y; }

template <class T>
std::vector<T> random_stream(std::size_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(-1.0, 1.0), e(-5.0, 3.0);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(u(rng) * std::pow(10.0, e(rng)));
  return v;
}

template <class T>
void check(CudaContext& ctx, HostContext& host, std::mt19937_64& rng, const char* type) {
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  for (std::size_t n : {std::size_t{1}, std::size_t{255}, std::size_t{257}, std::size_t{100003}, std::size_t{3000001}}) {
    const std::vector<T> snap = random_stream<T>(n, rng);
    std::vector<T> base(n);
    std::uniform_real_distribution<double> u(-1e-4, 1e-4);
    for (std::size_t i = 0; i < n; ++i) base[i] = static_cast<T>(static_cast<double>(snap[i]) * (1.0 + u(rng)));
    // case 0: all finite; then NaN in the stream, NaN in the snapshot, +inf, inf - inf, at the
    // first element, a block boundary (256 threads) and the last element.
    const std::size_t positions[] = {0, n > 256 ? std::size_t{256} : n - 1, n - 1};
    for (int c = 0; c < 5; ++c) {
      std::vector<T> a = base, b = snap;
      if (c > 0)
        for (std::size_t at : positions) {
          if (c == 1) a[at] = nan;
          if (c == 2) b[at] = nan;
          if (c == 3) a[at] = inf;
          if (c == 4) a[at] = b[at] = -inf;
        }
      const std::string where = std::string(type) + " n " + std::to_string(n) + " case " + std::to_string(c);
      auto da = ctx.allocate<T>(n + kGuard, MemoryCategory::Other), db = ctx.allocate<T>(n, MemoryCategory::Other);
      std::vector<T> guard(kGuard, static_cast<T>(7));
      copy_to_device(ctx, da.data(), a.data(), n);
      copy_to_device(ctx, da.data() + n, guard.data(), kGuard);
      copy_to_device(ctx, db.data(), b.data(), n);
      const auto got = compare_and_restore(ctx, da.data(), db.data(), n);
      const auto want = compare_and_restore(host, a.data(), b.data(), n);
      GPU_CHECK(same(got.first, want.first) && same(got.second, want.second),
                where + ": device (" + std::to_string(got.first) + ", " + std::to_string(got.second) + ") vs host (" +
                    std::to_string(want.first) + ", " + std::to_string(want.second) + ")");
      GPU_CHECK((c == 1 || c == 2 || c == 4) == std::isnan(got.first), where + ": NaN must be reported, and only NaN");
      const std::vector<T> restored = to_host(ctx, da.data(), n + kGuard);
      GPU_CHECK(std::memcmp(restored.data(), b.data(), n * sizeof(T)) == 0, where + ": stream not restored");
      GPU_CHECK(std::memcmp(restored.data() + n, guard.data(), kGuard * sizeof(T)) == 0, where + ": wrote past n");
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
  HostContext host;

  run_case("compare_and_restore: device equals host bit for bit (fp32, fp64), stream restored", [&] {
    check<float>(ctx, host, rng, "fp32");
    check<double>(ctx, host, rng, "fp64");
  });
  run_case("compare_and_restore: fixed-point streams compare in double, as the host", [&] {
    using Fx = FixedPoint<32>;
    const std::size_t n = 70001;
    std::vector<Fx> a(n), b(n);
    std::uniform_int_distribution<std::int64_t> raw(-(std::int64_t{1} << 40), std::int64_t{1} << 40);
    for (std::size_t i = 0; i < n; ++i) {
      b[i].raw = raw(rng);
      a[i].raw = b[i].raw + raw(rng) / 4096;
    }
    auto da = ctx.allocate<Fx>(n, MemoryCategory::Other), db = ctx.allocate<Fx>(n, MemoryCategory::Other);
    copy_to_device(ctx, da.data(), a.data(), n);
    copy_to_device(ctx, db.data(), b.data(), n);
    const auto got = compare_and_restore(ctx, da.data(), db.data(), n);
    const auto want = compare_and_restore(host, a.data(), b.data(), n);
    GPU_CHECK(got == want, "fixed point: device vs host");
    const std::vector<Fx> restored = to_host(ctx, da.data(), n);
    GPU_CHECK(std::memcmp(restored.data(), b.data(), n * sizeof(Fx)) == 0, "fixed point: stream not restored");
  });
  run_case("compare_and_restore: n == 0 is (0, 0) without a launch", [&] {
    const auto r = compare_and_restore(ctx, static_cast<float*>(nullptr), static_cast<const float*>(nullptr), 0);
    GPU_CHECK(r.first == 0.0 && r.second == 0.0);
  });
  return finish();
}
