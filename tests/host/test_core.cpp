// Core pieces: shapes and views, the memory meter, host context, schedules, precision.

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <vector>

#include "dr2net/backend/host/layer_norm.hpp"
#include "dr2net/backend/host/softmax.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/dr2net.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;

TEST_CASE("shapes and views check what they are given", "[core]") {
  const Shape s{2, 3, 4};
  CHECK(s.rank() == 3);
  CHECK(s.numel() == 24);
  CHECK(s.rows() == 6);
  CHECK(s.last() == 4);
  CHECK(s.str() == "[2, 3, 4]");
  CHECK_THROWS_WITH((Shape{1, 2, 3, 4, 5}), Catch::Contains("rank 5"));
  CHECK_THROWS_WITH((Shape{2, -1}), Catch::Contains("negative dimension -1"));
  CHECK_THROWS_WITH((Shape{1LL << 40, 1LL << 40}), Catch::Contains("overflow"));
  CHECK_THROWS_WITH(s[3], Catch::Contains("out of range"));

  std::vector<float> data(24);
  TensorView<float> v(data.data(), s);
  CHECK(v.is_contiguous());
  CHECK(v.stride(0) == 12);
  CHECK(v.reshaped(Shape{6, 4}).shape() == Shape{6, 4});
  CHECK_THROWS_WITH(v.reshaped(Shape{5, 5}), Catch::Contains("cannot reshape"));
  CHECK_THROWS_WITH(TensorView<float>(nullptr, s), Catch::Contains("null data"));
  TensorView<float> strided(data.data(), Shape{2, 3}, {1, 2, 0, 0});
  CHECK_FALSE(strided.is_contiguous());
  CHECK_THROWS_WITH(strided.span(), Catch::Contains("non-contiguous"));
  CHECK_THROWS_WITH(check_shape(v, Shape{2, 3, 5}, "weight"),
                    Catch::Contains("weight has shape [2, 3, 4], expected [2, 3, 5]"));
  ConstView<float> cv = v;
  CHECK(cv.data() == data.data());
}

TEST_CASE("the memory meter tracks current and peak bytes by category", "[core][memory]") {
  HostContext ctx;
  auto& m = ctx.meter();
  {
    auto a = ctx.allocate<float>(100, MemoryCategory::Streams);
    auto b = ctx.allocate<double>(10, MemoryCategory::Scratch);
    CHECK(m.current(MemoryCategory::Streams) == 400);
    CHECK(m.current(MemoryCategory::Scratch) == 80);
    CHECK(m.current_activation() == 480);
    {
      auto p = ctx.allocate<float>(50, MemoryCategory::Parameters);
      CHECK(m.current_total() == 680);
      CHECK(m.current_activation() == 480);
    }
    CHECK(m.peak_total() == 680);
    CHECK(m.current_total() == 480);
    auto moved = std::move(a);
    CHECK(m.current(MemoryCategory::Streams) == 400);
  }
  CHECK(m.current_total() == 0);
  CHECK(m.peak_activation() == 480);
  CHECK(m.peak(MemoryCategory::Parameters) == 200);
  m.reset_peaks();
  CHECK(m.peak_total() == 0);
  CHECK_THROWS_WITH(m.remove(MemoryCategory::Gradients, 8), Catch::Contains("gradients"));
  CHECK(m.report().find("saved_activations") != std::string::npos);
  CHECK(m.report().find("side_bits") != std::string::npos);
  // Human-readable units, three significant digits: small models do not read "0.00 MiB".
  CHECK(MemoryMeter::human_bytes(0) == "0 B");
  CHECK(MemoryMeter::human_bytes(1023) == "1023 B");
  CHECK(MemoryMeter::human_bytes(1536) == "1.50 KiB");
  CHECK(MemoryMeter::human_bytes(10 * 1024 * 1024 + 512 * 1024) == "10.5 MiB");
  CHECK(MemoryMeter::human_bytes(std::size_t{123} << 30) == "123 GiB");
  CHECK(MemoryMeter::mib(std::size_t{3} << 19) == "1.50 MiB");

  HostContext poisoned({.poison_allocations = true});
  auto buf = poisoned.allocate<float>(16, MemoryCategory::Other);
  for (std::size_t i = 0; i < buf.size(); ++i) CHECK(std::isnan(buf.data()[i]));
  CHECK_THROWS_WITH(buf.view(Shape{17}), Catch::Contains("holds 16"));
  CHECK_THROWS_WITH(ctx.allocate<double>(std::numeric_limits<std::size_t>::max() / 4, MemoryCategory::Other),
                    Catch::Contains("overflows"));
}

TEST_CASE("constant and cosine schedules", "[schedule]") {
  const ConstantSchedule c(0.25, 0.75);
  CHECK(c(0, 0) == Coefficients{0.25, 0.75});
  CHECK(c(1000, 7) == Coefficients{0.25, 0.75});
  CHECK_THROWS_WITH(c(-1, 0), Catch::Contains("negative training step -1"));
  CHECK_THROWS_WITH(ConstantSchedule(std::nan(""), 1.0), Catch::Contains("finite"));

  const CosineSchedule cos({1.0, 0.1}, {0.0, 1.0}, 100);
  CHECK(cos(0, 0) == Coefficients{1.0, 0.1});
  CHECK(cos(50, 3).alpha == Approx(0.5));
  CHECK(cos(50, 3).beta == Approx(0.55));
  CHECK(cos(25, 0).alpha == Approx(1.0 - (1.0 - std::cos(M_PI / 4)) / 2));
  CHECK(cos(100, 0) == Coefficients{0.0, 1.0});
  CHECK(cos(5000, 0) == Coefficients{0.0, 1.0});
  CHECK_THROWS_WITH(CosineSchedule({1, 0}, {0, 1}, 0), Catch::Contains("total_steps"));
}

TEST_CASE("the paper's schedule changes every eta steps and holds after T", "[schedule]") {
  const PaperSchedule s(PaperSchedule::Options{{1.0, 0.1}, {0.0, 1.0}, 10, 100});
  CHECK(s.num_changes() == 10);
  CHECK(s(0, 0) == Coefficients{1.0, 0.1});
  CHECK(s(9, 5) == Coefficients{1.0, 0.1});  // no change before the first eta steps
  for (int k = 1; k < 10; ++k) {
    INFO("change " << k);
    const auto c = s(10 * k, 0);
    CHECK(c.alpha == Approx(1.0 - 0.1 * k));
    CHECK(c.beta == Approx(0.1 + 0.09 * k));
    CHECK(s(10 * k + 9, 1) == c);  // held until the next change
    CHECK(s(10 * k - 1, 1) != c);
  }
  CHECK(s(100, 0) == Coefficients{0.0, 1.0});
  CHECK(s(100000, 3) == Coefficients{0.0, 1.0});

  const PaperSchedule uneven(7, 20);  // 2 changes: at step 7 and step 14
  CHECK(uneven(6, 0) == Coefficients{1.0, 0.1});
  CHECK(uneven(7, 0).alpha == Approx(0.5));
  CHECK(uneven(14, 0) == Coefficients{0.0, 1.0});

  CHECK_THROWS_WITH(PaperSchedule(0, 100), Catch::Contains("eta"));
  CHECK_THROWS_WITH(PaperSchedule(10, 0), Catch::Contains("total_steps"));
  CHECK_THROWS_WITH(PaperSchedule(200, 100), Catch::Contains("never change"));
  CHECK_THROWS_WITH(PaperSchedule(PaperSchedule::Options{{std::nan(""), 0.1}, {0, 1}, 1, 10}), Catch::Contains("start"));
  CHECK_THROWS_WITH(PaperSchedule(PaperSchedule::Options{{1, 0.1}, {0, INFINITY}, 1, 10}), Catch::Contains("end"));
}

TEST_CASE("callable schedules and per-module overrides", "[schedule]") {
  const CallableSchedule fn([](std::int64_t step, int module) {
    return Coefficients{1.0 / double(step + 1), 0.1 * module};
  });
  CHECK(fn(3, 2) == Coefficients{0.25, 0.1 * 2});
  static_assert(Schedule<decltype(fn)>);
  static_assert(Schedule<AnySchedule>);

  ModuleOverride over(PaperSchedule(10, 100));
  over.set(3, {0.0, 1.0});
  CHECK(over(0, 3) == Coefficients{0.0, 1.0});
  CHECK(over(0, 2) == Coefficients{1.0, 0.1});
  over.clear(3);
  CHECK(over(0, 3) == Coefficients{1.0, 0.1});
  CHECK_THROWS_WITH(over.set(-1, {0, 1}), Catch::Contains("negative module"));
  CHECK_THROWS_WITH(over.set(1, {0, std::nan("")}), Catch::Contains("finite"));
  CHECK(over.max_overridden_module() == -1);

  // An override for a module the stack does not have is refused when the stack is built.
  using Block = ReversibleDualResidual<dr2net::testing::SineGate<float>, dr2net::testing::SineGate<float>,
                                       ModuleOverride<ConstantSchedule>, Fp32>;
  std::mt19937_64 rng(1);
  auto layers = [&] {
    std::vector<Block> v;
    for (int l = 0; l < 2; ++l) v.emplace_back(dr2net::testing::SineGate<float>(4, rng), dr2net::testing::SineGate<float>(4, rng));
    return v;
  };
  HostContext ctx;
  ModuleOverride<ConstantSchedule> ok(ConstantSchedule(0.0, 1.0)), absent(ConstantSchedule(0.0, 1.0));
  ok.set(3, {0.5, 0.5});
  absent.set(4, {0.5, 0.5});
  CHECK_NOTHROW(ReversibleStack<Block>(ctx, layers(), ok));
  CHECK_THROWS_WITH(ReversibleStack<Block>(ctx, layers(), absent),
                    Catch::Contains("overrides module 4") && Catch::Contains("has 4 modules"));
}

TEST_CASE("precision policies", "[precision]") {
  static_assert(Precision<Fp32> && Precision<Fp64> && Precision<Fp64StreamsFp32Compute>);
  CHECK(precision_name<Fp32>() == "fp32");
  CHECK(precision_name<Fp64>() == "fp64");
  CHECK(precision_name<Fp64StreamsFp32Compute>() == "fp64/fp32");
  CHECK(unit_roundoff<float>() == std::numeric_limits<float>::epsilon() / 2);
  CHECK(unit_roundoff<double>() == std::numeric_limits<double>::epsilon() / 2);
}

TEST_CASE("errors carry the source location and the detail", "[core]") {
  try {
    DR2NET_FAIL("module ", 3, " broke");
  } catch (const Error& e) {
    CHECK(e.detail() == "module 3 broke");
    CHECK(std::string(e.what()).find("test_core.cpp") != std::string::npos);
  }
}

TEST_CASE("host softmax and layer norm refuse rows without elements", "[core][hardening]") {
  std::vector<float> buf(8, 1.0f);
  CHECK_THROWS_WITH(dr2net::softmax_rows_inplace(buf.data(), 2, 0, 0), Catch::Contains("at least one element"));
  CHECK_NOTHROW(dr2net::softmax_rows_inplace(buf.data(), 0, 0, 0));
  float mean = 0, rstd = 0;
  CHECK_THROWS_WITH(dr2net::layer_norm_forward(buf.data(), 1, 0, buf.data(), buf.data(), 1e-5f, buf.data(), &mean,
                                               &rstd),
                    Catch::Contains("width must be at least 1"));
}

TEST_CASE("checked size arithmetic names the quantity and never wraps", "[core][hardening]") {
  namespace ck = dr2net::checked;
  CHECK(ck::mul(3, 4, "x") == 12);
  CHECK(ck::product({2, 3, 5}, "x") == 30);
  CHECK(ck::product({}, "x") == 1);
  CHECK(ck::bytes(10, 4, "x") == 40u);
  CHECK_THROWS_WITH(ck::mul(std::int64_t{1} << 32, std::int64_t{1} << 31, "attention scores"),
                    Catch::Contains("attention scores") && Catch::Contains("overflows"));
  CHECK_THROWS_WITH(ck::product({64, 12, 1 << 20, 1 << 20, 1 << 20}, "scores"), Catch::Contains("64 x 12"));
  CHECK_THROWS_WITH(ck::add(INT64_MAX, 1, "offset"), Catch::Contains("offset"));
  CHECK_THROWS_WITH(ck::mul(-1, 2, "rows"), Catch::Contains("negative"));
  CHECK_THROWS_WITH(ck::bytes(INT64_MAX, 8, "buffer"), Catch::Contains("overflow"));
  CHECK_THROWS_WITH(ck::to_size(-3, "count"), Catch::Contains("negative"));
  CHECK_THROWS_WITH(ck::to_int64(SIZE_MAX, "count"), Catch::Contains("exceeds"));
}
