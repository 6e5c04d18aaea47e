#pragma once
//! \file
//! The fused elementwise passes of a Dr²Net module, written once for host and device.
//! Each kernel functor is applied as `k(i)` for every element i by a backend's
//! for_each_index(); the arithmetic is in the precision policy's accumulate type.
//!
//! Template parameters, throughout: S the stream element type (PrecisionPolicy::stream_type),
//! C the compute type of residual-function outputs (compute_type), A the accumulate type
//! (accumulate_type), V the policy's value type (the stack's input, output and stream-gradient
//! type). Pointers are host or device memory as the backend requires; every buffer holds at
//! least the element count the pass is launched over, and no call operator checks bounds or
//! aliasing beyond what its comment allows (in-place buffers are named in:/out:).
//!
//! The passes that touch each buffer only at element i declare those buffers as their
//! `operands` (core/operands.hpp), which lets a backend apply them several elements at a
//! time through register copies; the others run element by element everywhere.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "dr2net/core/config.hpp"
#include "dr2net/core/fixed_point.hpp"
#include "dr2net/core/operands.hpp"

namespace dr2net {

//! Stores 1 into a shared flag word (flag may be null: nothing). Every thread that finds a bad
//! value stores the same 1; on the host the store is a relaxed atomic, since a pass may run on
//! several threads (backend/host/parallel.hpp) and concurrent plain stores would be a data race.
//! The caller reads the flag after the pass has joined.
DR2NET_HD_INLINE void raise_flag(std::uint32_t* flag) {
  if (flag == nullptr) return;
#if defined(__CUDA_ARCH__)
  *flag = 1;
#else
  std::atomic_ref<std::uint32_t>(*flag).store(1, std::memory_order_relaxed);
#endif
}

//! Sets *flag when v is NaN or infinite (flag may be null: no check). Passes that already
//! read or write the data check it this way, so the checks cost no extra pass.
template <class T>
DR2NET_HD_INLINE void flag_if_not_finite(std::uint32_t* flag, T v) {
  if (flag != nullptr && fixed::not_finite(static_cast<double>(v))) raise_flag(flag);
}

//! Forward of one module, in place over the x stream:
//!   y_i = alpha * y_{i-1} + f + beta * x_{i-1}   (f = F(y_{i-1}); written over x_{i-1})
//! Evaluated as (alpha*y + f) + beta*x, so (alpha, beta) = (1, 0) yields exactly y + f.
template <class S, class C, class A>
struct ForwardCombine {
  S* x;        //!< in: x_{i-1}; out: y_i
  const S* y;  //!< y_{i-1} = x_i
  const C* f;  //!< F(y_{i-1})
  //! \var alpha
  //! \brief alpha_i, weight of y_{i-1} (the pretrained residual), in the accumulate type.
  //! \var beta
  //! \brief beta_i, weight of x_{i-1} (the reversible residual), in the accumulate type.
  A alpha, beta;
  std::uint32_t* flag = nullptr;  //!< set when y_i is not finite (null: no check)
  //! x updated in place from y and f (core/operands.hpp); the flag is shared, not an operand.
  using operands = OperandList<UpdateOperand<&ForwardCombine::x>, ReadOperand<&ForwardCombine::y>,
                               ReadOperand<&ForwardCombine::f>>;
  //! Computes element i of y_i and stores it, converted to S, over x[i].
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    const A v = alpha * static_cast<A>(y[i]) + static_cast<A>(f[i]) + beta * static_cast<A>(x[i]);
    flag_if_not_finite(flag, v);
    x[i] = static_cast<S>(v);
  }
};

//! The part of a module's forward that does not involve F, in place over the x stream:
//!   x <- alpha * y + beta * x
//! used when F then adds its output into x itself (ResidualFunction's adds-into members).
template <class S, class A>
struct ForwardPreCombine {
  S* x;        //!< in: x_{i-1}; out: alpha y_{i-1} + beta x_{i-1}
  const S* y;  //!< y_{i-1}
  //! \var alpha
  //! \brief alpha_i, weight of y_{i-1}, in the accumulate type.
  //! \var beta
  //! \brief beta_i, weight of x_{i-1}, in the accumulate type.
  A alpha, beta;
  //! x[i] <- alpha * y[i] + beta * x[i] for element i (this pass has no finiteness flag).
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    x[i] = static_cast<S>(alpha * static_cast<A>(y[i]) + beta * static_cast<A>(x[i]));
  }
};

//! Inverse of one module, in place over the y stream:
//!   x_{i-1} = (y_i - alpha * x_i - f) / beta   (f = F(x_i); written over y_i)
template <class S, class C, class A>
struct InverseCombine {
  S* y;        //!< in: y_i; out: x_{i-1}
  const S* x;  //!< x_i = y_{i-1}
  const C* f;  //!< F(x_i)
  //! \var alpha
  //! \brief alpha_i of the module being inverted, in the accumulate type.
  //! \var beta
  //! \brief beta_i of the module being inverted; divided by unguarded, so it must be nonzero
  //! (the stack reconstructs only modules with |beta| >= StackOptions::min_abs_beta).
  A alpha, beta;
  //! y updated in place from x and f (core/operands.hpp).
  using operands = OperandList<UpdateOperand<&InverseCombine::y>, ReadOperand<&InverseCombine::x>,
                               ReadOperand<&InverseCombine::f>>;
  //! Reconstructs element i of x_{i-1} and stores it over y[i] (no finiteness flag: the
  //! reconstruction monitor measures the result).
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    y[i] = static_cast<S>((static_cast<A>(y[i]) - alpha * static_cast<A>(x[i]) - static_cast<A>(f[i])) / beta);
  }
};

//! Gradient of one module after F's backward, in place over both gradient buffers:
//!   dL/dy_{i-1} = gx_i + alpha * gy_i + J^T gy_i   (written over gx_i)
//!   dL/dx_{i-1} = beta * gy_i                      (written over gy_i)
//! With `jt == nullptr`, J^T gy has already been accumulated into gx by F's backward.
//! With `reconstruct`, the inverse x_{i-1} = (y_i - alpha x_i - f)/beta happens in the same pass.
template <class S, class C, class A, bool Reconstruct>
struct BackwardCombine {
  S* gx;        //!< in: gx_i (+ J^T gy_i); out: dL/dy_{i-1}
  S* gy;        //!< in: gy_i; out: dL/dx_{i-1}
  const C* jt;  //!< J^T gy_i when kept apart from gx (mixed precision), else nullptr
  S* y;         //!< Reconstruct only: in y_i, out x_{i-1}
  const S* x;   //!< Reconstruct only: x_i
  const C* f;   //!< Reconstruct only: F(x_i)
  //! \var alpha
  //! \brief alpha_i of the module, in the accumulate type.
  //! \var beta
  //! \brief beta_i of the module, in the accumulate type; must be nonzero with Reconstruct
  //! (the inverse divides by it).
  A alpha, beta;
  std::uint32_t* flag = nullptr;  //!< set when dL/dy_{i-1} is not finite (null: no check)
  //! gx and gy updated in place, jt read when not null; with Reconstruct also y updated from
  //! x and f (core/operands.hpp). Without it y, x and f are not operands (never touched).
  using operands = std::conditional_t<
      Reconstruct,
      OperandList<UpdateOperand<&BackwardCombine::gx>, UpdateOperand<&BackwardCombine::gy>,
                  OptionalReadOperand<&BackwardCombine::jt>, UpdateOperand<&BackwardCombine::y>,
                  ReadOperand<&BackwardCombine::x>, ReadOperand<&BackwardCombine::f>>,
      OperandList<UpdateOperand<&BackwardCombine::gx>, UpdateOperand<&BackwardCombine::gy>,
                  OptionalReadOperand<&BackwardCombine::jt>>>;
  //! Updates gx[i] and gy[i] (and with Reconstruct, y[i]) for element i; gy[i] is read
  //! before either gradient is written, so the two buffers must not alias.
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    const A g = static_cast<A>(gy[i]);
    A gxi = static_cast<A>(gx[i]) + alpha * g;
    if (jt != nullptr) gxi += static_cast<A>(jt[i]);
    flag_if_not_finite(flag, gxi);
    gx[i] = static_cast<S>(gxi);
    gy[i] = static_cast<S>(beta * g);
    if constexpr (Reconstruct) {
      y[i] = static_cast<S>((static_cast<A>(y[i]) - alpha * static_cast<A>(x[i]) - static_cast<A>(f[i])) / beta);
    }
  }
};

//! dst = src, converting between stream and compute types.
template <class From, class To>
struct ConvertCopy {
  To* dst;          //!< destination, in the target type
  const From* src;  //!< source; must not overlap dst unless From and To are the same type
  //! dst written from src (core/operands.hpp).
  using operands = OperandList<WriteOperand<&ConvertCopy::dst>, ReadOperand<&ConvertCopy::src>>;
  //! dst[i] = static_cast<To>(src[i]): the types' own conversion, without a range check.
  DR2NET_HD_INLINE void operator()(std::size_t i) const { dst[i] = static_cast<To>(src[i]); }
};

//! dst = value
template <class T>
struct Fill {
  T* dst;   //!< buffer to overwrite
  T value;  //!< value every element receives (zero, to clear an accumulating gradient)
  //! dst[i] = value.
  DR2NET_HD_INLINE void operator()(std::size_t i) const { dst[i] = value; }
};

//! dst = a * (u + v): the stack's input gradient gx_0 + gy_0 (a = 1) and mean output (a = 1/2).
template <class S, class A>
struct ScaledSum {
  S* dst;      //!< result; may be u or v itself (each element is read before it is written)
  const S* u;  //!< first addend (gx_0, or x_N)
  const S* v;  //!< second addend (gy_0, or y_N)
  A a;         //!< scale applied to the sum, in the accumulate type
  //! dst[i] = a * (u[i] + v[i]), summed and scaled in A.
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    dst[i] = static_cast<S>(a * (static_cast<A>(u[i]) + static_cast<A>(v[i])));
  }
};

//! dst = a * src
template <class S, class A>
struct Scale {
  S* dst;        //!< result; may be src itself (in-place scaling)
  const S* src;  //!< input
  A a;           //!< factor, in the accumulate type
  //! dst[i] = a * src[i], multiplied in A.
  DR2NET_HD_INLINE void operator()(std::size_t i) const { dst[i] = static_cast<S>(a * static_cast<A>(src[i])); }
};

//! The stack's first pass: x_0 = y_0 = h0 (quantized for fixed-point streams). Sets *flag
//! when an element of h0 is not finite or, for fixed point, is outside the range.
template <class S, class V>
struct InitStreams {
  S* x;          //!< out: x_0, the first stream (A)
  S* y;          //!< out: y_0, the second stream (B)
  const V* h0;   //!< the stack's input, in the policy's value type
  std::uint32_t* flag = nullptr;  //!< set when h0 is not finite or not representable (null: no check)
  //! Writes element i of both streams from h0[i]. A fixed-point element that cannot be
  //! represented is stored as 0 and flagged.
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    if constexpr (is_fixed_point_v<S>) {
      bool bad = false;
      const std::int64_t raw = fixed::quantize(static_cast<double>(h0[i]), S::scale, bad);
      if (bad) raise_flag(flag);
      x[i] = S{raw};
      y[i] = S{raw};
    } else {
      flag_if_not_finite(flag, h0[i]);
      x[i] = static_cast<S>(h0[i]);
      y[i] = static_cast<S>(h0[i]);
    }
  }
};

//! The stack's output: out = y_N, or (x_N + y_N) / 2 with `mean`; checked for finiteness.
template <class S, class V, class A>
struct StackOutputPass {
  V* out;        //!< the stack's output, in the policy's value type
  const S* x;    //!< x_N (read only with `mean`)
  const S* y;    //!< y_N
  bool mean;     //!< false: out = y_N (StackOutput::LastStream); true: out = (x_N + y_N) / 2
  std::uint32_t* flag = nullptr;  //!< set when an output element is not finite (null: no check)
  //! Writes out[i], computed in A.
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    const A v = mean ? A(0.5) * (static_cast<A>(x[i]) + static_cast<A>(y[i])) : static_cast<A>(y[i]);
    flag_if_not_finite(flag, v);
    out[i] = static_cast<V>(v);
  }
};

//! The backward's first pass: (gx_N, gy_N) from dout: (0, dout), or (dout/2, dout/2) for the
//! mean of the streams; checked for finiteness.
template <class V, class A>
struct InitGradients {
  V* gx;          //!< out: gx_N = dL/dx_N
  V* gy;          //!< out: gy_N = dL/dy_N
  const V* dout;  //!< dL/d(stack output), as the caller passed it to backward
  bool mean;      //!< the forward's output was the mean of the streams (see StackOutputPass)
  std::uint32_t* flag = nullptr;  //!< set when dout is not finite (null: no check)
  //! Writes element i of both gradient buffers from dout[i].
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    const A d = static_cast<A>(dout[i]);
    flag_if_not_finite(flag, d);
    gx[i] = mean ? static_cast<V>(A(0.5) * d) : V(0);
    gy[i] = mean ? static_cast<V>(A(0.5) * d) : static_cast<V>(d);
  }
};

//! The backward's last pass: dh0 = gx_0 + gy_0; checked for finiteness.
template <class V, class A>
struct InputGradient {
  V* dh0;        //!< out: dL/dh0, the stack's input gradient (may be gx or gy itself)
  const V* gx;   //!< gx_0 = dL/dx_0 after the last module's backward
  const V* gy;   //!< gy_0 = dL/dy_0 after the last module's backward
  std::uint32_t* flag = nullptr;  //!< set when dL/dh0 is not finite (null: no check)
  //! dh0[i] = gx[i] + gy[i], summed in A (x_0 and y_0 are both h0).
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    const A v = static_cast<A>(gx[i]) + static_cast<A>(gy[i]);
    flag_if_not_finite(flag, v);
    dh0[i] = static_cast<V>(v);
  }
};

//! Sets *flag when an element is NaN or infinite: the parameter gradients' check (16-bit
//! compute types widen through float).
template <class T>
struct FlagNotFinite {
  const T* p;            //!< the values checked (a parameter-gradient tensor)
  std::uint32_t* flag;   //!< set to 1 when any p[i] is NaN or infinite (null: no check)
  //! Checks p[i]; writes nothing else.
  DR2NET_HD_INLINE void operator()(std::size_t i) const {
    if constexpr (std::is_floating_point_v<T>) flag_if_not_finite(flag, p[i]);
    else flag_if_not_finite(flag, static_cast<float>(p[i]));
  }
};

//! dst[j] = src[j * stride]: the monitor's sample of a stream.
template <class T>
struct StridedGather {
  T* dst;              //!< the sample, one element per work item j
  const T* src;        //!< the stream sampled; count work items read up to src[(count - 1) * stride]
  std::size_t stride;  //!< distance in elements between sampled elements (>= 1)
  //! dst[j] = src[j * stride].
  DR2NET_HD_INLINE void operator()(std::size_t j) const { dst[j] = src[j * stride]; }
};

//! Where a fixed-point module keeps the bits its beta-term loses: `width` bits per element,
//! `per_word` elements to a 64-bit word, none straddling two words. Empty: nothing kept.
struct SideBits {
  std::uint64_t* words = nullptr;  //!< ceil(n / per_word) words of the module's side bits; null: none kept
  int width = 0;                   //!< bits per element, fixed::side_bit_width(p) of the module's beta
  int per_word = 1;                //!< elements per word, fixed::elements_per_word(width)
};

//! Forward of one module over fixed-point streams, in place over the x stream, one work item
//! per side-bit word (per element when nothing is kept):
//!   Y_i = A(Y_{i-1}) + Q(f) + B(X_{i-1}),   side bits <- X_{i-1} - ceil(R 2^k / p)
//! Sets *flag when f is not finite or a term or the sum leaves the fixed-point range.
template <class S, class C>
struct FixedForwardCombine {
  S* x;        //!< in: X_{i-1}; out: Y_i
  const S* y;  //!< Y_{i-1}
  const C* f;  //!< F(deq Y_{i-1})
  //! \var alpha
  //! \brief alpha_i on the coefficient grid (fixed::quantize_coefficient).
  //! \var beta
  //! \brief beta_i on the coefficient grid; the side bits are those of its term B.
  fixed::Coefficient alpha, beta;
  SideBits side;  //!< words == nullptr: keep nothing (standard mode, or beta needs no bits)
  std::size_t n;  //!< elements of each stream; the last work item covers the remainder
  std::uint32_t* flag;  //!< set when f is not finite or the range is left; may be null
  //! Computes the elements of work item w (elements w * per_word up to n) and stores their
  //! side-bit word side.words[w]. Launch over ceil(n / side.per_word) work items.
  DR2NET_HD_INLINE void operator()(std::size_t w) const {
    const std::size_t per = static_cast<std::size_t>(side.per_word);
    const std::size_t begin = w * per, end = begin + per < n ? begin + per : n;
    std::uint64_t word = 0;
    bool bad = false;
    // |alpha|, |beta| <= 1: every term is below 2^62 like the streams, so the sum's range is
    // checked in integers; larger coefficients can wrap inside a term and are bounded in double.
    const bool unit = alpha.p <= (std::int64_t{1} << fixed::kCoefficientBits) &&
                      beta.p <= (std::int64_t{1} << fixed::kCoefficientBits);
    for (std::size_t i = begin; i < end; ++i) {
      const std::int64_t yi = y[i].raw, xi = x[i].raw;
      const std::int64_t tf = fixed::quantize(static_cast<double>(f[i]), S::scale, bad);
      const std::int64_t ta = fixed::apply(alpha, yi);
      const std::int64_t r = fixed::mul_floor(xi, beta.p);
      const std::int64_t tb = beta.sign < 0 ? static_cast<std::int64_t>(0 - static_cast<std::uint64_t>(r)) : r;
      const std::int64_t sum = fixed::wrapping_sum(ta, tf, tb);
      if (unit) {
        bad |= !fixed::sum_in_range(ta, tf, tb, sum);
      } else {
        const double bound = (alpha.value < 0 ? -alpha.value : alpha.value) * (yi < 0 ? -static_cast<double>(yi) : static_cast<double>(yi)) +
                             (tf < 0 ? -static_cast<double>(tf) : static_cast<double>(tf)) +
                             (beta.value < 0 ? -beta.value : beta.value) * (xi < 0 ? -static_cast<double>(xi) : static_cast<double>(xi));
        bad |= !(bound < fixed::kLimit);
      }
      x[i] = S{sum};
      if (side.words != nullptr) {
        word |= fixed::side_bits_of(xi, beta.p, beta.inverse) << ((i - begin) * static_cast<std::size_t>(side.width));
      }
    }
    if (side.words != nullptr) side.words[w] = word;
    if (bad) raise_flag(flag);
  }
};

//! Inverse of one module over fixed-point streams, in place over the y stream, one work item
//! per side-bit word:  R = Y_i - A(X_i) - Q(f);  X_{i-1} = ceil(R 2^k / p) + side bits.
//! Bit-exact when f is bit-identical to the forward's. Sets *flag when f is not finite.
template <class S, class C>
struct FixedInverseCombine {
  S* y;        //!< in: Y_i; out: X_{i-1}
  const S* x;  //!< X_i = Y_{i-1}
  const C* f;  //!< F(deq X_i)
  //! \var alpha
  //! \brief alpha_i on the coefficient grid, as the forward used it.
  //! \var beta
  //! \brief beta_i on the coefficient grid, as the forward used it; p > 0 (invertible).
  fixed::Coefficient alpha, beta;
  SideBits side;  //!< the side bits the forward kept, same width; words == nullptr when width is 0
  std::size_t n;  //!< elements of each stream; the last work item covers the remainder
  std::uint32_t* flag;  //!< set when f is not finite; may be null
  //! Reconstructs the elements of work item w (elements w * per_word up to n) from the
  //! side-bit word side.words[w]. Launch over ceil(n / side.per_word) work items.
  DR2NET_HD_INLINE void operator()(std::size_t w) const {
    const std::size_t per = static_cast<std::size_t>(side.per_word);
    const std::size_t begin = w * per, end = begin + per < n ? begin + per : n;
    const std::uint64_t word = side.words != nullptr ? side.words[w] : 0;
    const std::uint64_t mask = side.width > 0 ? (std::uint64_t{1} << side.width) - 1 : 0;
    bool bad = false;
    for (std::size_t i = begin; i < end; ++i) {
      const std::int64_t tf = fixed::quantize(static_cast<double>(f[i]), S::scale, bad);
      const std::int64_t tb = fixed::wrapping_difference(y[i].raw, fixed::apply(alpha, x[i].raw), tf);
      const std::int64_t r = beta.sign < 0 ? static_cast<std::int64_t>(0 - static_cast<std::uint64_t>(tb)) : tb;
      const std::uint64_t s = (word >> ((i - begin) * static_cast<std::size_t>(side.width))) & mask;
      y[i] = S{static_cast<std::int64_t>(static_cast<std::uint64_t>(fixed::ceil_div_mul(r, beta.p, beta.inverse)) + s)};
    }
    if (bad) raise_flag(flag);
  }
};

}  // namespace dr2net
