#pragma once
//! \file
//! Vector math for the host kernels: SLEEF's erf, exp and tanh (1.0-ulp "u10" variants) on
//! the widest x86 vector the compiler's target flags allow, and the loads, stores and
//! fixed-order lane reductions the GELU, softmax and LayerNorm kernels are written with.
//!
//! Compiled in only where all of these hold: DR2NET_HAVE_SLEEF is defined (the dr2net::sleef
//! target, or a consumer that links libsleef itself), the code is not a CUDA device pass
//! (__CUDA_ARCH__: device code never sees SLEEF), and the target is x86 with SSE2. Then
//! DR2NET_HOST_VECTOR_MATH is 1 and the float kernels take the vector path; otherwise it is 0
//! and every kernel runs its scalar loops over the C library's erff/expf.
//!
//! The width is chosen at compile time from the compiler's target macros, never at run time
//! from the CPU, so one build computes one set of values:
//!
//!   __AVX512F__   16 lanes   Sleef_erff16_u10, Sleef_expf16_u10, Sleef_tanhf16_u10
//!   __AVX__        8 lanes   Sleef_erff8_u10,  Sleef_expf8_u10,  Sleef_tanhf8_u10
//!   __SSE2__       4 lanes   Sleef_erff4_u10,  Sleef_expf4_u10,  Sleef_tanhf4_u10
//!
//! dr2net's build passes no -march flag unless DR2NET_HOST_ARCH is set, so x86-64 builds get
//! SSE2's 4 lanes (libsleef's dispatcher then runs its SSE4.1 or AVX2-128 code where the CPU
//! has it); -march=x86-64-v3 (or native on an AVX2 machine) gives 8 lanes, -march=x86-64-v4 16. Softmax and LayerNorm
//! take the vector path at every width; GELU only where DR2NET_HOST_VECTOR_ERF is 1 (8 lanes
//! or more by default: see below).
//!
//! The rules the kernels keep (docs/host-performance.md, "Vector math"): every element goes
//! through the same vector function, a tail shorter than a vector included (it is loaded into
//! a padded vector, never handed to a scalar function that rounds differently), so an element's
//! value does not depend on where a range starts; and reductions over a row run in a fixed
//! order that depends on the row's length only: lane l accumulates elements l, l + W, l + 2W,
//! ... of the row's whole vectors, the W lanes are combined by a fixed pairwise tree, and the
//! last (length mod W) elements are added in index order. A row kernel's arithmetic on those
//! last elements may run element by element (the same expressions): which code an element
//! takes depends on its index and the row's length only, never on the row's address.

#include <cstddef>
#include <string_view>

#include "dr2net/core/config.hpp"

#if defined(DR2NET_HAVE_SLEEF) && !defined(__CUDA_ARCH__) && (defined(__x86_64__) || defined(__i386__)) && \
    defined(__SSE2__)
//! 1 where the host kernels evaluate float erf/exp through SLEEF's vector functions, else 0.
#define DR2NET_HOST_VECTOR_MATH 1
#include <immintrin.h>
#include <sleef.h>
#else
//! 1 where the host kernels evaluate float erf/exp through SLEEF's vector functions, else 0.
#define DR2NET_HOST_VECTOR_MATH 0
#endif

// GELU's erf through SLEEF from 8 lanes on: libsleef's 4-lane erff costs about 6.5 ns per
// element whatever the argument, the C library's erff 2.5 ns for |x| < 0.84 and 13 ns beyond,
// so at 4 lanes the vector GELU is slower on the small activations of a freshly initialised
// network and faster only from a spread of about 1; at 8 lanes it is never slower, at 16
// lanes 2-5x faster (docs/host-performance.md, "Vector math"). Defining
// DR2NET_HOST_VECTOR_ERF to 1 or 0 before any dr2net header overrides the choice.
#if DR2NET_HOST_VECTOR_MATH
#if !defined(DR2NET_HOST_VECTOR_ERF)
#if defined(__AVX__)
#define DR2NET_HOST_VECTOR_ERF 1
#else
#define DR2NET_HOST_VECTOR_ERF 0
#endif
#endif
#else
#undef DR2NET_HOST_VECTOR_ERF
//! 1 where the GELU functors' run_range evaluates float erf (and exp) through SLEEF, else 0:
//! by default where DR2NET_HOST_VECTOR_MATH is 1 and the vector has at least 8 lanes.
#define DR2NET_HOST_VECTOR_ERF 0
#endif

namespace dr2net {

//! What the host kernels' float erf/exp run on in this translation unit's build, for tools and
//! benchmarks to print beside host timings: "SLEEF, 16 lanes (AVX-512F)", "SLEEF, 8 lanes
//! (AVX)" or "SLEEF, 4 lanes (SSE2)", followed by "; GELU scalar erf" where GELU keeps the C
//! library's erff (DR2NET_HOST_VECTOR_ERF 0), or "C library, scalar" without vector math.
inline constexpr std::string_view host_vector_math() {
#if !DR2NET_HOST_VECTOR_MATH
  return "C library, scalar";
#elif defined(__AVX512F__)
  return DR2NET_HOST_VECTOR_ERF ? "SLEEF, 16 lanes (AVX-512F)" : "SLEEF, 16 lanes (AVX-512F); GELU scalar erf";
#elif defined(__AVX__)
  return DR2NET_HOST_VECTOR_ERF ? "SLEEF, 8 lanes (AVX)" : "SLEEF, 8 lanes (AVX); GELU scalar erf";
#else
  return DR2NET_HOST_VECTOR_ERF ? "SLEEF, 4 lanes (SSE2)" : "SLEEF, 4 lanes (SSE2); GELU scalar erf";
#endif
}

}  // namespace dr2net

#if DR2NET_HOST_VECTOR_MATH
namespace dr2net::detail::simd {

// Each width's definitions, and the vector kernels the other headers write with them
// (`namespace detail::simd { inline namespace DR2NET_DETAIL_SIMD_ISA { ... } }`), live in an
// inline namespace named after the width, so that translation units compiled with different
// target flags (a .cpp file with -march flags and a .cu file whose host pass has none, say)
// never share a mangled name between two widths.
#if defined(__AVX512F__)
#define DR2NET_DETAIL_SIMD_ISA avx512f
#elif defined(__AVX__)
#define DR2NET_DETAIL_SIMD_ISA avx
#else
#define DR2NET_DETAIL_SIMD_ISA sse2
#endif
inline namespace DR2NET_DETAIL_SIMD_ISA {

#if defined(__AVX512F__)
inline constexpr int kWidth = 16;
using vfloat = __m512;
inline vfloat load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
inline vfloat broadcast(float x) { return _mm512_set1_ps(x); }
inline vfloat add(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat sub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat mul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
// (the masked form: GCC 12 warns of _mm512_max_ps's undefined pass-through operand)
inline vfloat max(vfloat a, vfloat b) { return _mm512_mask_max_ps(a, static_cast<__mmask16>(0xffff), a, b); }
inline vfloat erf(vfloat x) { return Sleef_erff16_u10(x); }
inline vfloat exp(vfloat x) { return Sleef_expf16_u10(x); }
inline vfloat tanh(vfloat x) { return Sleef_tanhf16_u10(x); }
#elif defined(__AVX__)
inline constexpr int kWidth = 8;
using vfloat = __m256;
inline vfloat load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline vfloat broadcast(float x) { return _mm256_set1_ps(x); }
inline vfloat add(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat sub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat mul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat max(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline vfloat erf(vfloat x) { return Sleef_erff8_u10(x); }
inline vfloat exp(vfloat x) { return Sleef_expf8_u10(x); }
inline vfloat tanh(vfloat x) { return Sleef_tanhf8_u10(x); }
#else
inline constexpr int kWidth = 4;
using vfloat = __m128;
inline vfloat load(const float* p) { return _mm_loadu_ps(p); }
inline void store(float* p, vfloat v) { _mm_storeu_ps(p, v); }
inline vfloat broadcast(float x) { return _mm_set1_ps(x); }
inline vfloat add(vfloat a, vfloat b) { return _mm_add_ps(a, b); }
inline vfloat sub(vfloat a, vfloat b) { return _mm_sub_ps(a, b); }
inline vfloat mul(vfloat a, vfloat b) { return _mm_mul_ps(a, b); }
inline vfloat max(vfloat a, vfloat b) { return _mm_max_ps(a, b); }
inline vfloat erf(vfloat x) { return Sleef_erff4_u10(x); }
inline vfloat exp(vfloat x) { return Sleef_expf4_u10(x); }
inline vfloat tanh(vfloat x) { return Sleef_tanhf4_u10(x); }
#endif

inline constexpr std::size_t kLanes = static_cast<std::size_t>(kWidth);

// The first n (< kWidth) elements at p in lanes 0 .. n-1, `fill` in the others. Reads only
// p[0, n): a tail is never read past its end.
inline vfloat load_partial(const float* p, std::size_t n, float fill) {
  alignas(64) float buf[kWidth];
  for (std::size_t l = 0; l < kLanes; ++l) buf[l] = l < n ? p[l] : fill;
  return load(buf);
}

// Lanes 0 .. n-1 of v to p[0, n); nothing else is written.
inline void store_partial(float* p, vfloat v, std::size_t n) {
  alignas(64) float buf[kWidth];
  store(buf, v);
  for (std::size_t l = 0; l < n; ++l) p[l] = buf[l];
}

// The elements [0, n) at p, lanes beyond n (in a last, partial vector) set to `fill`.
inline vfloat load_n(const float* p, std::size_t n, float fill) {
  return n >= kLanes ? load(p) : load_partial(p, n, fill);
}

// Stores min(n, kWidth) lanes of v to p.
inline void store_n(float* p, vfloat v, std::size_t n) {
  if (n >= kLanes) store(p, v);
  else store_partial(p, v, n);
}

// Sum of the lanes by a fixed pairwise tree: lane l += lane l + W/2, then l + W/4, ...
inline float sum_lanes(vfloat v) {
  alignas(64) float b[kWidth];
  store(b, v);
  for (std::size_t w = kLanes / 2; w >= 1; w /= 2)
    for (std::size_t l = 0; l < w; ++l) b[l] += b[l + w];
  return b[0];
}

// Largest lane by the same tree (a NaN lane may or may not win; kernels that care let NaN
// propagate through their arithmetic instead).
inline float max_lanes(vfloat v) {
  alignas(64) float b[kWidth];
  store(b, v);
  for (std::size_t w = kLanes / 2; w >= 1; w /= 2)
    for (std::size_t l = 0; l < w; ++l) b[l] = b[l] > b[l + w] ? b[l] : b[l + w];
  return b[0];
}

// y[i] = f(x[i]) for i < n through the vector function f, a tail in a padded vector: what the
// tests use to check SLEEF's functions element by element. y may be x.
template <class F>
void apply(const float* x, float* y, std::size_t n, F f) {
  for (std::size_t i = 0; i < n; i += kLanes) {
    const std::size_t left = n - i;
    store_n(y + i, f(load_n(x + i, left, 0.0f)), left);
  }
}

}  // inline namespace of the width
}  // namespace dr2net::detail::simd
#endif  // DR2NET_HOST_VECTOR_MATH
