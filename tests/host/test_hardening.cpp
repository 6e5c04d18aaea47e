// Bad input at the size and ownership boundaries: size arithmetic that would overflow, parameter
// storage that cannot exist, memory limits, metering that counts every byte once, and objects
// that refuse every call once they were moved from.

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <catch2/catch.hpp>
#include <string>
#include <utility>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/modules/vit.hpp"
#include "dr2net/optim/adamw.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;
using dr2net::testing::SineGate;
using dr2net::testing::TanhLinear;

// Every 64-byte-aligned allocation in this program is a HostBuffer's (HostContext::allocate):
// counting them here measures what the host context really holds, independently of its meter.
namespace {
std::atomic<std::size_t> g_aligned_live{0}, g_aligned_peak{0};
constexpr std::size_t kHeader = 64;
}  // namespace

void* operator new(std::size_t n, std::align_val_t al) {
  const auto a = static_cast<std::size_t>(al) < kHeader ? kHeader : static_cast<std::size_t>(al);
  const std::size_t total = (n + a + a - 1) / a * a;  // room for the size ahead of the block
  void* base = std::aligned_alloc(a, total);
  if (base == nullptr) throw std::bad_alloc();
  *static_cast<std::size_t*>(base) = n;
  *(static_cast<std::size_t*>(base) + 1) = a;
  const std::size_t live = g_aligned_live += n;
  std::size_t peak = g_aligned_peak.load();
  while (live > peak && !g_aligned_peak.compare_exchange_weak(peak, live)) {
  }
  return static_cast<char*>(base) + a;
}
void operator delete(void* p, std::align_val_t al) noexcept {
  if (p == nullptr) return;
  const auto a = static_cast<std::size_t>(al) < kHeader ? kHeader : static_cast<std::size_t>(al);
  void* base = static_cast<char*>(p) - a;
  g_aligned_live -= *static_cast<std::size_t*>(base);
  std::free(base);
}
void operator delete(void* p, std::size_t, std::align_val_t al) noexcept { operator delete(p, al); }

namespace {

template <class P>
using UserBlock = ReversibleDualResidual<TanhLinear<typename P::compute_type>, SineGate<typename P::compute_type>,
                                         ConstantSchedule, P>;
template <class P>
using GateBlock = ReversibleDualResidual<SineGate<typename P::compute_type>, SineGate<typename P::compute_type>,
                                         ConstantSchedule, P>;

template <class P>
std::vector<UserBlock<P>> user_layers(int L, std::int64_t D, std::mt19937_64& rng) {
  std::vector<UserBlock<P>> layers;
  for (int l = 0; l < L; ++l)
    layers.emplace_back(TanhLinear<typename P::compute_type>(D, rng), SineGate<typename P::compute_type>(D, rng));
  return layers;
}

template <class Stack>
std::size_t parameter_bytes(Stack& stack) {
  std::size_t bytes = 0;
  for (const auto& p : stack.parameters()) bytes += p.value.size() * sizeof(typename Stack::compute_type);
  return bytes;
}

}  // namespace

TEST_CASE("a shape whose element count overflows int64 is refused, naming its dimensions", "[hardening]") {
  CHECK_THROWS_WITH((Shape{std::int64_t{1} << 40, std::int64_t{1} << 40}),
                    Catch::Contains("element count of shape [1099511627776, 1099511627776]") &&
                        Catch::Contains("overflows"));
  CHECK_THROWS_WITH((Shape{3, std::int64_t{1} << 62}), Catch::Contains("3 x 4611686018427387904"));
  // The largest representable count is accepted, and numel() is exact.
  const Shape big{std::int64_t{1} << 31, std::int64_t{1} << 31, 1};
  CHECK(big.numel() == std::int64_t{1} << 62);
  CHECK((Shape{std::numeric_limits<std::int64_t>::max(), 1}).numel() == std::numeric_limits<std::int64_t>::max());
  CHECK((Shape{0, std::int64_t{1} << 40, std::int64_t{1} << 40}).numel() == 0);
  // A strided view whose last offset overflows int64 is refused before any index is formed.
  float x = 0;
  CHECK_THROWS_WITH((TensorView<float>(&x, Shape{4, 2}, {std::int64_t{1} << 62, 1, 0, 0})),
                    Catch::Contains("offset of its last element overflows"));
}

TEST_CASE("attention whose batch x heads x tokens^2 overflows int64 is refused before any allocation", "[hardening]") {
  const std::int64_t B = 2, N = std::int64_t{1} << 31, D = 64;  // the stream (2^38 elements) fits; the scores do not
  const VitAttention<float> attn({.dim = D, .num_heads = 4});
  CHECK_THROWS_WITH(attn.saved_elements(Shape{B, N, D}),
                    Catch::Contains("attention probabilities (batch x heads x tokens x tokens)") &&
                        Catch::Contains("2 x 4 x 2147483648 x 2147483648") && Catch::Contains("overflows"));

  HostContext ctx;
  ReversibleStack<VitLayer<float, ConstantSchedule>> stack(
      ctx, make_vit_layers<float, ConstantSchedule>(1, D, 4, 2 * D), ConstantSchedule(0.0, 1.0));
  const std::size_t held = ctx.meter().current_total();
  const std::size_t aligned = g_aligned_live.load();
  float dummy = 0;  // never read: the stack must refuse the shape first
  const ConstView<float> h0(&dummy, Shape{B, N, D});
  const TensorView<float> out(&dummy, Shape{B, N, D});
  CHECK_THROWS_WITH(stack.forward(h0, out, 0), Catch::Contains("module 0 (layer 0, F)") &&
                                                   Catch::Contains("attention probabilities") &&
                                                   Catch::Contains("overflows"));
  CHECK(ctx.meter().current_total() == held);
  CHECK(ctx.meter().peak_total() == held);  // nothing was allocated, even briefly
  CHECK(g_aligned_live.load() == aligned);
}

TEST_CASE("a stack whose streams' byte count overflows is refused before any allocation", "[hardening]") {
  std::uint64_t seed = 0;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  std::vector<GateBlock<Fp64>> layers;
  layers.emplace_back(SineGate<double>(1, rng), SineGate<double>(1, rng));
  ReversibleStack<GateBlock<Fp64>> stack(ctx, std::move(layers), ConstantSchedule(0.0, 1.0));
  const std::size_t held = ctx.meter().current_total();
  // 2^61 elements fit int64 as a count; their bytes (2^64) do not fit size_t.
  const Shape shape{std::int64_t{1} << 61, 1, 1};
  double dummy = 0;
  for (BackpropMode mode : {BackpropMode::Reversible, BackpropMode::Standard, BackpropMode::ErrorBounded}) {
    stack.set_mode(mode);
    CHECK_THROWS_WITH(stack.forward(ConstView<double>(&dummy, shape), TensorView<double>(&dummy, shape), 0),
                      Catch::Contains("ReversibleStack: the stream buffers x and y for streams of shape "
                                      "[2305843009213693952, 1, 1]") &&
                          Catch::Contains("overflows"));
    CHECK(ctx.meter().peak_total() == held);
  }
  // Standard mode's stored inputs (modules x stream) overflow where one stream does not.
  std::vector<GateBlock<Fp64>> many;
  for (int l = 0; l < 4; ++l) many.emplace_back(SineGate<double>(1, rng), SineGate<double>(1, rng));
  ReversibleStack<GateBlock<Fp64>> standard(ctx, std::move(many), ConstantSchedule(0.0, 1.0),
                                            {.mode = BackpropMode::Standard});
  const Shape wide{std::int64_t{1} << 59, 1, 1};  // 2^62 bytes a stream; 8 modules of it overflow int64
  CHECK_THROWS_WITH(standard.forward(ConstView<double>(&dummy, wide), TensorView<double>(&dummy, wide), 0),
                    Catch::Contains("standard mode's stored inputs (8 modules x the stream) for streams of shape "
                                    "[576460752303423488, 1, 1]") &&
                        Catch::Contains("overflows"));
}

TEST_CASE("a parameter that cannot exist fails before touching memory, naming tensor, bytes and category",
          "[hardening]") {
  // [2^40, 2^20] floats: 2^62 bytes.
  try {
    Parameter<float> p("blocks.0.attn.qkv.weight", Shape{std::int64_t{1} << 40, std::int64_t{1} << 20});
    FAIL("an impossible parameter was created");
  } catch (const Error& e) {
    const std::string m = e.what();
    CHECK_THAT(m, Catch::Contains("parameters of tensor 'blocks.0.attn.qkv.weight' of shape [1099511627776, 1048576]"));
    CHECK_THAT(m, Catch::Contains("4611686018427387904 bytes"));
    CHECK_THAT(m, Catch::Contains("out of memory"));
  } catch (const std::bad_alloc&) {
    FAIL("a bare std::bad_alloc escaped from parameter creation");
  }
  // The same through a module: the error names the layer's tensor.
  CHECK_THROWS_WITH(Linear<float>("attn.proj", std::int64_t{1} << 20, std::int64_t{1} << 40),
                    Catch::Contains("tensor 'attn.proj.weight'") && Catch::Contains("parameters"));
  // Element counts whose bytes overflow size_t are refused by the checked byte count.
  CHECK_THROWS_WITH(Parameter<double>("w", Shape{std::int64_t{1} << 62}),
                    Catch::Contains("parameters of tensor 'w'") && Catch::Contains("overflows"));
  // Fresh parameters are zero (no poisoning, no garbage): value and gradient.
  Parameter<float> ok("bias", Shape{1000});
  for (std::size_t i = 0; i < ok.size(); ++i) {
    REQUIRE(ok.data()[i] == 0.0f);
    REQUIRE(ok.grad_data()[i] == 0.0f);
  }
}

TEST_CASE("a host context with a memory limit refuses a model that does not fit, naming the tensor", "[hardening]") {
  const std::int64_t D = 32;
  auto layers = make_vit_layers<float, ConstantSchedule>(3, D, 4, 4 * D);
  std::size_t params = 0;
  for (auto& l : layers) l.for_each_parameter("x", [&](std::string_view, TensorView<float> v, TensorView<float>) {
    params += v.size() * sizeof(float);
  });
  HostContext ctx({.memory_limit = params});  // room for the weights, not for their gradients
  try {
    ReversibleStack<VitLayer<float, ConstantSchedule>> stack(ctx, std::move(layers), ConstantSchedule(0.0, 1.0));
    FAIL("a model over the memory limit was accepted");
  } catch (const Error& e) {
    const std::string m = e.what();
    CHECK_THAT(m, Catch::Contains("host memory limit"));
    CHECK_THAT(m, Catch::Contains("'blocks."));
    CHECK_THAT(m, Catch::Contains("gradients") || Catch::Contains("parameters"));
  }
  CHECK(ctx.meter().current_total() == 0);  // the refused stack released what it had recorded

  // An allocation over the limit is refused with its name and category; one under it succeeds.
  HostContext small({.memory_limit = 1024});
  CHECK_THROWS_WITH(small.allocate<float>(1000, MemoryCategory::Scratch, "test scratch"),
                    Catch::Contains("test scratch needs 4000 bytes") && Catch::Contains("scratch") &&
                        Catch::Contains("limit of 1024 bytes"));
  auto b = small.allocate<float>(200, MemoryCategory::Scratch);
  CHECK(small.meter().current_total() == 800);
  CHECK_THROWS_WITH(small.allocate<float>(100, MemoryCategory::Other), Catch::Contains("meter holds 800 bytes"));
}

TEST_CASE("every byte of a small stack is metered once: peak_total is what is really allocated", "[hardening]") {
  std::uint64_t seed = 0;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const std::int64_t B = 2, N = 5, D = 6;
  const Shape shape{B, N, D};
  for (BackpropMode mode : {BackpropMode::Standard, BackpropMode::Reversible, BackpropMode::ErrorBounded}) {
    INFO("mode " << mode_name(mode));
    const std::size_t aligned_before = g_aligned_live.load();
    HostContext ctx;
    ReversibleStack<UserBlock<Fp64>> stack(ctx, user_layers<Fp64>(3, D, rng), ConstantSchedule(1.0, 0.5),
                                           {.mode = mode});
    const std::size_t params = parameter_bytes(stack);
    CHECK(ctx.meter().current(MemoryCategory::Parameters) == params);
    CHECK(ctx.meter().current(MemoryCategory::Gradients) == params);
    CHECK(ctx.meter().current_total() == 2 * params);
    g_aligned_peak = g_aligned_live.load();
    const auto h0 = dr2net::testing::random_vector<double>(static_cast<std::size_t>(shape.numel()), rng);
    const auto dout = dr2net::testing::random_vector<double>(h0.size(), rng);
    std::vector<double> out(h0.size()), dh0(h0.size());
    stack.forward(ConstView<double>(h0.data(), shape), TensorView<double>(out.data(), shape), 0);
    stack.backward(ConstView<double>(dout.data(), shape), TensorView<double>(dh0.data(), shape));
    // Host buffers really held at the peak (counted by the allocator above) plus the layers'
    // parameters and gradients (held by the functors, recorded once by the stack).
    const std::size_t really = g_aligned_peak.load() - aligned_before + 2 * params;
    CHECK(ctx.meter().peak_total() == really);
    CHECK(ctx.meter().current_total() == g_aligned_live.load() - aligned_before + 2 * params);
  }
}

TEST_CASE("a moved-from stack refuses forward and backward in every mode", "[hardening]") {
  std::uint64_t seed = 0;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const Shape shape{2, 3, 4};
  const auto h0 = dr2net::testing::random_vector<float>(24, rng);
  const auto dout = dr2net::testing::random_vector<float>(24, rng);
  std::vector<float> out(24), dh0(24);
  const ConstView<float> h0v(h0.data(), shape), doutv(dout.data(), shape);
  const TensorView<float> outv(out.data(), shape), dh0v(dh0.data(), shape);

  auto check = [&](auto& a, auto& b) {
    CHECK_THROWS_WITH(a.forward(h0v, outv, 0), Catch::Contains("ReversibleStack::forward()") &&
                                                   Catch::Contains("was moved from"));
    CHECK_THROWS_WITH(a.backward(doutv, dh0v), Catch::Contains("ReversibleStack::backward()") &&
                                                   Catch::Contains("was moved from"));
    CHECK_THROWS_WITH(a.predict(h0v, outv, 0), Catch::Contains("was moved from"));
    CHECK_THROWS_WITH(a.zero_grad(), Catch::Contains("was moved from"));
    CHECK_THROWS_WITH(a.parameters(), Catch::Contains("was moved from"));
    CHECK_THROWS_WITH(a.num_layers(), Catch::Contains("was moved from"));
    CHECK_THROWS_WITH(a.coefficients(0, 0), Catch::Contains("was moved from"));
    CHECK_THROWS_WITH(a.reconstruction(), Catch::Contains("was moved from"));
    CHECK_THROWS_WITH(a.release_workspace(), Catch::Contains("was moved from"));
    CHECK_THROWS_WITH(a.mode(), Catch::Contains("was moved from"));
    CHECK_THROWS_WITH(a.set_mode(BackpropMode::Standard), Catch::Contains("was moved from"));
    // The stack it moved into holds the forward's state and works.
    b.backward(doutv, dh0v);
    for (float v : dh0) REQUIRE(std::isfinite(v));
    b.forward(h0v, outv, 1);
    b.backward(doutv, dh0v);
  };
  for (BackpropMode mode : {BackpropMode::Standard, BackpropMode::Reversible, BackpropMode::ErrorBounded}) {
    INFO("mode " << mode_name(mode));
    HostContext ctx;
    ReversibleStack<UserBlock<Fp32>> a(ctx, user_layers<Fp32>(2, 4, rng), ConstantSchedule(0.0, 1.0), {.mode = mode});
    a.forward(h0v, outv, 0);  // pending state that a moved-from stack must not reach
    ReversibleStack<UserBlock<Fp32>> b(std::move(a));
    check(a, b);
    // Assigning a live stack to the moved-from one makes it usable again.
    a = std::move(b);
    a.forward(h0v, outv, 0);
    a.backward(doutv, dh0v);
    CHECK_THROWS_WITH(b.forward(h0v, outv, 0), Catch::Contains("was moved from"));
  }
  {
    INFO("mode exact (FixedFp32)");
    HostContext ctx;
    ReversibleStack<UserBlock<FixedFp32>> a(ctx, user_layers<FixedFp32>(2, 4, rng), ConstantSchedule(1.0, 0.5));
    a.forward(h0v, outv, 0);
    ReversibleStack<UserBlock<FixedFp32>> b(std::move(a));
    check(a, b);
  }
}

TEST_CASE("moved-from parameters, modules and optimizers refuse every call", "[hardening]") {
  Parameter<float> p("norm1.weight", Shape{8});
  p.fill(2.0f);
  Parameter<float> q(std::move(p));
  CHECK(q.data()[3] == 2.0f);
  CHECK_THROWS_WITH(p.value(), Catch::Contains("Parameter::value()") && Catch::Contains("was moved from"));
  CHECK_THROWS_WITH(p.grad(), Catch::Contains("was moved from"));
  CHECK_THROWS_WITH(p.data(), Catch::Contains("was moved from"));
  CHECK_THROWS_WITH(p.fill(1.0f), Catch::Contains("was moved from"));
  const float src[8] = {};
  CHECK_THROWS_WITH(p.load(src, Shape{8}, "test"), Catch::Contains("was moved from"));

  // A moved-from module refuses its computation instead of reading empty weights.
  HostContext ctx;
  VitAttention<float> attn({.dim = 8, .num_heads = 2});
  VitAttention<float> moved(std::move(attn));
  const Shape shape{1, 3, 8};
  std::vector<float> in(24, 0.5f), out(24), scratch(moved.saved_elements(shape));
  const ModuleCall<HostContext> call{ctx, 0, 0, 0, false};
  moved.forward(call, ConstView<float>(in.data(), shape), TensorView<float>(out.data(), shape),
                TensorView<float>(scratch.data(), Shape{static_cast<std::int64_t>(scratch.size())}));
  CHECK_THROWS_WITH(attn.forward(call, ConstView<float>(in.data(), shape), TensorView<float>(out.data(), shape),
                                 TensorView<float>(scratch.data(), Shape{static_cast<std::int64_t>(scratch.size())})),
                    Catch::Contains("was moved from"));

  std::vector<float> w(4, 1.0f), g(4, 0.5f);
  std::vector<NamedParameter<float>> params{{"w", TensorView<float>(w.data(), Shape{4}), TensorView<float>(g.data(), Shape{4})}};
  optim::AdamW<float> opt(ctx, params);
  optim::AdamW<float> opt2(std::move(opt));
  opt2.step();
  CHECK(w[0] < 1.0f);
  CHECK_THROWS_WITH(opt.step(), Catch::Contains("AdamW::step()") && Catch::Contains("was moved from"));
  CHECK_THROWS_WITH(opt.zero_grad(), Catch::Contains("was moved from"));
  CHECK_THROWS_WITH(opt.set_lr(0.1), Catch::Contains("was moved from"));
  CHECK_THROWS_WITH(opt.parameters(), Catch::Contains("was moved from"));

  // A moved-from host buffer is empty, like a default one: it holds nothing and views of it fail.
  HostBuffer<float> buf = ctx.allocate<float>(16, MemoryCategory::Other);
  HostBuffer<float> buf2(std::move(buf));
  CHECK(buf.size() == 0);
  CHECK(buf.data() == nullptr);
  CHECK(buf2.size() == 16);
  CHECK_THROWS_WITH(buf.view(Shape{4}), Catch::Contains("holds 0"));
}

TEST_CASE("indexed accessors name a bad index with a dr2net::Error", "[hardening]") {
  std::uint64_t seed = 0;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  ReversibleStack<UserBlock<Fp32>> stack(ctx, user_layers<Fp32>(2, 4, rng), ConstantSchedule(0.0, 1.0));
  CHECK_NOTHROW(stack.layer(1));
  CHECK_THROWS_WITH(stack.layer(2), Catch::Contains("layer 2 out of range"));
  CHECK_THROWS_AS(stack.layer(2), dr2net::Error);
  CHECK_THROWS_WITH(stack.layer(-1), Catch::Contains("layer -1 out of range"));
  CHECK_THROWS_AS(stack.layer(-1), dr2net::Error);
  // Two layers are four modules: a module index past them is named, not answered from the schedule.
  CHECK_NOTHROW(stack.coefficients(0, 3));
  CHECK_THROWS_WITH(stack.coefficients(0, 4), Catch::Contains("module 4 out of range") && Catch::Contains("4 modules"));
  CHECK_THROWS_WITH(stack.coefficients(0, -1), Catch::Contains("module -1 out of range"));

  std::vector<float> w(4, 1.0f), g(4, 0.5f);
  std::vector<NamedParameter<float>> params{{"w", TensorView<float>(w.data(), Shape{4}), TensorView<float>(g.data(), Shape{4})}};
  optim::AdamW<float> opt(ctx, params);
  CHECK_NOTHROW(opt.first_moment(0));
  for (auto call : {+[](const optim::AdamW<float>& o) { (void)o.decays(1); },
                    +[](const optim::AdamW<float>& o) { (void)o.first_moment(1); },
                    +[](const optim::AdamW<float>& o) { (void)o.second_moment(1); }}) {
    CHECK_THROWS_WITH(call(opt), Catch::Contains("index 1 out of range"));
    CHECK_THROWS_AS(call(opt), dr2net::Error);
  }
}

#if defined(__SANITIZE_ADDRESS__)
#define DR2NET_TEST_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DR2NET_TEST_UNDER_ASAN 1
#endif
#endif

TEST_CASE("parameters that fit one by one but not together are refused, naming the tensor", "[hardening]") {
#ifdef DR2NET_TEST_UNDER_ASAN
  WARN("not checked under AddressSanitizer, whose allocator reserves shadow memory for such requests");
#else
  const std::size_t physical = dr2net::detail::physical_memory_bytes();
  if (physical == 0) {
    WARN("not checked: the platform does not report its physical memory");
    return;
  }
  // Value and gradient of 30% of the machine each: the first parameter holds 60% (untouched
  // zero pages), a second would need 120%.
  const auto elements = static_cast<std::int64_t>(physical / 10 * 3 / sizeof(float));
  {
    Parameter<float> first("blocks.0.mlp.fc1.weight", Shape{elements});
    try {
      Parameter<float> second("blocks.0.mlp.fc2.weight", Shape{elements});
      FAIL("a model larger than the machine was created");
    } catch (const Error& e) {
      CHECK_THAT(std::string(e.what()), Catch::Contains("tensor 'blocks.0.mlp.fc2.weight'") &&
                                            Catch::Contains("already hold") && Catch::Contains("physical memory"));
    }
    Parameter<float> small("blocks.0.norm1.weight", Shape{64});  // the refused one left nothing held
    CHECK(small.size() == 64);
  }
  // Released storage is no longer counted: the same tensor can be made again.
  Parameter<float> again("blocks.0.mlp.fc2.weight", Shape{elements});
  CHECK(again.size() == static_cast<std::size_t>(elements));
#endif
}

TEST_CASE("a mode or output outside its enumeration is refused by the stack, naming the value", "[hardening]") {
  std::uint64_t seed = 0;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  const auto bad_mode = static_cast<BackpropMode>(7);
  const auto bad_output = static_cast<StackOutput>(7);
  CHECK_THROWS_WITH(ReversibleStack<UserBlock<Fp32>>(ctx, user_layers<Fp32>(2, 4, rng), ConstantSchedule(0.0, 1.0),
                                                     {.mode = bad_mode}),
                    Catch::Contains("BackpropMode value 7"));
  CHECK_THROWS_WITH(ReversibleStack<UserBlock<Fp32>>(ctx, user_layers<Fp32>(2, 4, rng), ConstantSchedule(0.0, 1.0),
                                                     {.output = bad_output}),
                    Catch::Contains("StackOutput value 7"));
  ReversibleStack<UserBlock<Fp32>> stack(ctx, user_layers<Fp32>(2, 4, rng), ConstantSchedule(0.0, 1.0));
  CHECK_THROWS_WITH(stack.set_mode(bad_mode), Catch::Contains("BackpropMode value 7"));
  CHECK_THROWS_WITH(stack.set_output(bad_output), Catch::Contains("StackOutput value 7"));
  CHECK(stack.mode() == BackpropMode::Reversible);  // unchanged
  CHECK(stack.options().output == StackOutput::LastStream);
}
