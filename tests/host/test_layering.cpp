// The operand protocol of core/operands.hpp, through which a backend applies an elementwise
// functor V elements at a time without knowing it: every combine functor that declares its
// operands gives, applied V at a time through register copies (apply_operands), the same
// bits as element by element (the host backend's for_each_index), on odd sizes, every head
// offset and several widths; written-only registers start as NaN so that a read of one shows;
// the order of a functor's fields does not matter; and wrong declarations are caught.

#include <catch2/catch.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/block/combine.hpp"
#include "dr2net/core/half.hpp"
#include "dr2net/core/operands.hpp"

using namespace dr2net;

namespace {

//! A 2-byte compute type for the host (bf16 bits, converted by core/half.hpp), so that the
//! mixed-width operand lists of the bf16 policies run here too.
struct Bf16Bits {
  std::uint16_t bits;
  Bf16Bits() = default;
  explicit Bf16Bits(float v) : bits(float_to_bf16_bits(v)) {}
  explicit Bf16Bits(double v) : bits(double_to_bf16_bits(v)) {}
  explicit operator float() const { return bf16_bits_to_float(bits); }
  explicit operator double() const { return static_cast<double>(bf16_bits_to_float(bits)); }
};

template <class T>
T quiet_nan() {
  if constexpr (std::is_same_v<T, Bf16Bits>) return Bf16Bits(std::numeric_limits<float>::quiet_NaN());
  else return std::numeric_limits<T>::quiet_NaN();
}

//! Element copies like ElementMover, and NaN in the registers of a written-only operand, so a
//! functor that reads an operand it declares WriteOperand computes NaN instead of by chance
//! the right value.
struct PoisoningMover : ElementMover {
  template <int V, class T>
  static void fresh(T (&r)[V]) {
    for (int j = 0; j < V; ++j) r[j] = quiet_nan<T>();
  }
};

//! A buffer twice over: one copy for the element-by-element run, one for the V-wide run.
template <class T>
struct Twin {
  std::vector<T> elem, wide;
  T* e() { return elem.data(); }
  T* w() { return wide.data(); }
  bool same() const { return elem.size() == wide.size() && std::memcmp(elem.data(), wide.data(), elem.size() * sizeof(T)) == 0; }
};

template <class T>
Twin<T> twin(std::size_t n, std::mt19937_64& rng, double lo = -2.0, double hi = 2.0) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) {
    if constexpr (std::is_same_v<T, Bf16Bits>) x = Bf16Bits(u(rng));
    else x = static_cast<T>(u(rng));
  }
  return {v, v};
}

//! fe element by element over [0, n) (the host backend), and fw with elements [0, head) and
//! the tail one at a time and every V-element block from head on through apply_operands.
template <int V, class Fn>
void run_both(std::size_t n, std::size_t head, const Fn& fe, const Fn& fw) {
  HostContext host;
  for_each_index(host, n, fe);
  head = head < n ? head : n;
  const std::size_t vectors = (n - head) / V, tail = head + vectors * V;
  for (std::size_t i = 0; i < head; ++i) fw(i);
  for (std::size_t v = 0; v < vectors; ++v) apply_operands<V, PoisoningMover>(fw, head + v * V);
  for (std::size_t i = tail; i < n; ++i) fw(i);
}

//! Every declared combine pass of streams S, compute C, accumulate A, V elements at a time.
template <class S, class C, class A, int V>
void check_combines(std::mt19937_64& rng, std::size_t n, std::size_t head) {
  std::uniform_real_distribution<double> coef(0.2, 1.3);
  const A alpha = static_cast<A>(coef(rng)), beta = static_cast<A>(coef(rng));
  std::uniform_int_distribution<std::size_t> pick(0, n - 1);
  INFO("n " << n << ", head " << head << ", V " << V << ", sizes " << sizeof(S) << "/" << sizeof(C) << "/" << sizeof(A));
  for (bool poisoned : {false, true}) {  // with a NaN in f the finiteness flag is set on both paths
    INFO((poisoned ? "a NaN in f" : "finite data"));
    {
      auto x = twin<S>(n, rng), y = twin<S>(n, rng);
      auto f = twin<C>(n, rng);
      if (poisoned) f.elem[pick(rng)] = quiet_nan<C>();
      f.wide = f.elem;
      std::uint32_t fe = 0, fw = 0;
      run_both<V>(n, head, ForwardCombine<S, C, A>{x.e(), y.e(), f.e(), alpha, beta, &fe},
                  ForwardCombine<S, C, A>{x.w(), y.w(), f.w(), alpha, beta, &fw});
      CHECK(x.same());
      CHECK((y.same() && f.same()));
      CHECK(fe == fw);
      CHECK(fe == (poisoned ? 1u : 0u));
    }
    {
      auto y = twin<S>(n, rng), x = twin<S>(n, rng);
      auto f = twin<C>(n, rng);
      if (poisoned) f.elem[pick(rng)] = quiet_nan<C>();
      f.wide = f.elem;
      run_both<V>(n, head, InverseCombine<S, C, A>{y.e(), x.e(), f.e(), alpha, beta},
                  InverseCombine<S, C, A>{y.w(), x.w(), f.w(), alpha, beta});
      CHECK(y.same());
      CHECK((x.same() && f.same()));
    }
    // jt: absent, its own buffer, or the same buffer as f (two read operands aliasing)
    for (int jt_kind = 0; jt_kind < 3; ++jt_kind) {
      INFO("jt " << (jt_kind == 0 ? "null" : (jt_kind == 1 ? "apart" : "= f")));
      auto gx = twin<S>(n, rng), gy = twin<S>(n, rng), y = twin<S>(n, rng), x = twin<S>(n, rng);
      auto f = twin<C>(n, rng), jt = twin<C>(n, rng);
      if (poisoned) jt.elem[pick(rng)] = quiet_nan<C>();
      jt.wide = jt.elem;
      Twin<C>* const j = jt_kind == 2 ? &f : &jt;
      const C* je = jt_kind == 0 ? nullptr : j->e();
      const C* jw = jt_kind == 0 ? nullptr : j->w();
      std::uint32_t fe = 0, fw = 0;
      run_both<V>(n, head, BackwardCombine<S, C, A, true>{gx.e(), gy.e(), je, y.e(), x.e(), f.e(), alpha, beta, &fe},
                  BackwardCombine<S, C, A, true>{gx.w(), gy.w(), jw, y.w(), x.w(), f.w(), alpha, beta, &fw});
      CHECK((gx.same() && gy.same()));
      CHECK(y.same());
      CHECK((x.same() && f.same() && jt.same()));
      CHECK(fe == fw);
      CHECK(fe == (poisoned && jt_kind == 1 ? 1u : 0u));
      auto gx2 = twin<S>(n, rng), gy2 = twin<S>(n, rng);
      fe = fw = 0;
      run_both<V>(n, head, BackwardCombine<S, C, A, false>{gx2.e(), gy2.e(), je, nullptr, nullptr, nullptr, alpha, beta, &fe},
                  BackwardCombine<S, C, A, false>{gx2.w(), gy2.w(), jw, nullptr, nullptr, nullptr, alpha, beta, &fw});
      CHECK((gx2.same() && gy2.same()));
      CHECK(fe == fw);
      CHECK(fe == (poisoned && jt_kind == 1 ? 1u : 0u));
    }
    {
      auto s = twin<S>(n, rng);
      auto c = twin<C>(n, rng);
      run_both<V>(n, head, ConvertCopy<S, C>{c.e(), s.e()}, ConvertCopy<S, C>{c.w(), s.w()});
      CHECK(c.same());
      auto back = twin<S>(n, rng);
      run_both<V>(n, head, ConvertCopy<C, S>{back.e(), c.e()}, ConvertCopy<C, S>{back.w(), c.w()});
      CHECK(back.same());
    }
  }
}

//! Sizes (odd, and around multiples of V) and every head offset in [0, V].
template <class S, class C, class A, int V>
void check_sizes(std::mt19937_64& rng) {
  for (std::size_t n : {std::size_t{1}, std::size_t{3}, std::size_t{7}, std::size_t{V + 1}, std::size_t{31},
                        std::size_t{4 * V - 1}, std::size_t{1001}}) {
    for (std::size_t head = 0; head <= static_cast<std::size_t>(V); ++head) check_combines<S, C, A, V>(rng, n, head);
  }
}

//! The widths a backend may choose: its own (16 bytes of the narrowest operand) and others.
template <class S, class C, class A>
void check_widths(std::mt19937_64& rng) {
  constexpr int wide = static_cast<int>(16 / smallest_operand_bytes<ForwardCombine<S, C, A>>);
  static_assert(wide == static_cast<int>(16 / smallest_operand_bytes<BackwardCombine<S, C, A, true>>));
  check_sizes<S, C, A, wide>(rng);
  check_sizes<S, C, A, 1>(rng);
  check_sizes<S, C, A, 3>(rng);
}

std::uint64_t fresh_seed() {
  return (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^ std::random_device{}();
}

// ---- functors of this test ------------------------------------------------------------------

//! ForwardCombine's arithmetic with its fields in another order and its operands listed in yet
//! another: the protocol binds by member, so neither order matters.
template <class S, class C, class A>
struct ShuffledForward {
  A beta;
  const C* f;
  std::uint32_t* flag;
  const S* y;
  A alpha;
  S* x;
  using operands = OperandList<ReadOperand<&ShuffledForward::f>, UpdateOperand<&ShuffledForward::x>,
                               ReadOperand<&ShuffledForward::y>>;
  void operator()(std::size_t i) const {
    const A v = alpha * static_cast<A>(y[i]) + static_cast<A>(f[i]) + beta * static_cast<A>(x[i]);
    flag_if_not_finite(flag, v);
    x[i] = static_cast<S>(v);
  }
};

enum class AxpyDecl { right, update_as_read, update_as_write, x_left_out };

//! y <- a x + y, declared rightly or in one of three wrong ways.
template <AxpyDecl D>
struct Axpy {
  double* y;
  const double* x;
  double a;
  using operands = std::conditional_t<
      D == AxpyDecl::right, OperandList<UpdateOperand<&Axpy::y>, ReadOperand<&Axpy::x>>,
      std::conditional_t<D == AxpyDecl::update_as_read, OperandList<ReadOperand<&Axpy::y>, ReadOperand<&Axpy::x>>,
                         std::conditional_t<D == AxpyDecl::update_as_write,
                                            OperandList<WriteOperand<&Axpy::y>, ReadOperand<&Axpy::x>>,
                                            OperandList<UpdateOperand<&Axpy::y>>>>>;
  void operator()(std::size_t i) const { y[i] = a * x[i] + y[i]; }
};

template <AxpyDecl D>
bool axpy_agrees(std::mt19937_64& rng) {
  auto y = twin<double>(37, rng), x = twin<double>(37, rng);
  run_both<4>(37, 1, Axpy<D>{y.e(), x.e(), 0.75}, Axpy<D>{y.w(), x.w(), 0.75});
  return y.same() && x.same();
}

//! Names a member of another functor: not a declaration of its own operands.
struct Borrowed {
  float* p;
  using operands = OperandList<UpdateOperand<&Axpy<AxpyDecl::right>::y>>;
  void operator()(std::size_t i) const { p[i] += 1; }
};

//! Declares one member twice: refused too (which of the two copies would the functor see?).
struct Twice {
  float* p;
  using operands = OperandList<UpdateOperand<&Twice::p>, ReadOperand<&Twice::p>>;
  void operator()(std::size_t i) const { p[i] += 1; }
};

}  // namespace

// The declarations themselves, checked at compile time.
static_assert(DeclaresOperands<ForwardCombine<float, float, float>>);
static_assert(DeclaresOperands<InverseCombine<double, float, double>>);
static_assert(DeclaresOperands<BackwardCombine<float, float, float, true>>);
static_assert(DeclaresOperands<ConvertCopy<float, double>>);
static_assert(ForwardCombine<float, float, float>::operands::size == 3);
static_assert(BackwardCombine<float, float, float, true>::operands::size == 6);
static_assert(BackwardCombine<float, float, float, false>::operands::size == 3);  // y, x, f unused
static_assert(smallest_operand_bytes<BackwardCombine<double, Bf16Bits, double, true>> == 2);
static_assert(operand_element_bytes<ConvertCopy<float, double>> == std::array<std::size_t, 2>{8, 4});
// Passes that touch a buffer away from element i, or many elements per work item, do not declare.
static_assert(!DeclaresOperands<StridedGather<float>>);
static_assert(!DeclaresOperands<FixedForwardCombine<FixedPoint<32>, float>>);
static_assert(!DeclaresOperands<FixedInverseCombine<FixedPoint<32>, float>>);
static_assert(!HasOperandsMember<StridedGather<float>>);
// A list of another functor's members is a member `operands` but not a declaration (backends
// refuse it at compile time rather than run it element by element).
static_assert(HasOperandsMember<Borrowed> && !DeclaresOperands<Borrowed>);
static_assert(HasOperandsMember<Twice> && !DeclaresOperands<Twice>);
static_assert(UpdateOperand<&Axpy<AxpyDecl::right>::y>::reads && UpdateOperand<&Axpy<AxpyDecl::right>::y>::writes);
static_assert(!WriteOperand<&Axpy<AxpyDecl::right>::y>::reads && !ReadOperand<&Axpy<AxpyDecl::right>::x>::writes);

TEST_CASE("operand protocol: combines V-wide through registers equal element by element, bit for bit", "[layering]") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  SECTION("fp32") { check_widths<float, float, float>(rng); }
  SECTION("fp64") { check_widths<double, double, double>(rng); }
  SECTION("fp64 streams / fp32 compute") { check_widths<double, float, double>(rng); }
  SECTION("fp32 streams / bf16 compute") { check_widths<float, Bf16Bits, float>(rng); }
  SECTION("fp64 streams / bf16 compute") { check_widths<double, Bf16Bits, double>(rng); }
}

TEST_CASE("operand protocol: members are bound by name, not by field order", "[layering]") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (std::size_t n : {std::size_t{5}, std::size_t{33}, std::size_t{1003}}) {
    auto x = twin<float>(n, rng), y = twin<float>(n, rng), x2 = twin<float>(n, rng);
    auto f = twin<Bf16Bits>(n, rng);
    x2.elem = x.elem;
    std::uint32_t fe = 0, fw = 0;
    run_both<8>(n, 3, ShuffledForward<float, Bf16Bits, float>{0.5f, f.e(), &fe, y.e(), 0.25f, x.e()},
                ShuffledForward<float, Bf16Bits, float>{0.5f, f.w(), &fw, y.w(), 0.25f, x.w()});
    CHECK(x.same());
    CHECK(fe == fw);
    // and the same bits as the library's ForwardCombine itself
    HostContext host;
    for_each_index(host, n, ForwardCombine<float, Bf16Bits, float>{x2.e(), y.e(), f.e(), 0.25f, 0.5f});
    CHECK(std::memcmp(x2.e(), x.e(), n * sizeof(float)) == 0);
  }
}

TEST_CASE("operand protocol: a wrong declaration gives different results, so the check above has teeth", "[layering]") {
  const std::uint64_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  CHECK(axpy_agrees<AxpyDecl::right>(rng));
  CHECK_FALSE(axpy_agrees<AxpyDecl::update_as_read>(rng));   // the update stays in the registers
  CHECK_FALSE(axpy_agrees<AxpyDecl::update_as_write>(rng));  // y is read from NaN registers
  CHECK_FALSE(axpy_agrees<AxpyDecl::x_left_out>(rng));       // x is read at j instead of i + j
}
