#pragma once
//! \file
//! How the fused combine functors of block/combine.hpp are applied to a few consecutive
//! elements at once with wide (up to 16-byte) loads and stores, without restating their
//! arithmetic: each specialisation of VectorAccess loads every operand's V elements into
//! registers, points a copy of the functor at those registers, calls that copy's
//! operator()(j) for j < V (the very __host__ __device__ code the host backend runs), and
//! stores what the functor wrote.
//!
//! A functor without a specialisation is applied element by element.

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "dr2net/block/combine.hpp"

namespace dr2net::cuda_detail {

//! Elements per thread of a functor whose smallest operand type is `Smallest`: 16 bytes of it.
template <class Smallest>
inline constexpr int kVectorWidth = 16 / static_cast<int>(sizeof(Smallest)) > 0 ? 16 / static_cast<int>(sizeof(Smallest)) : 1;

//! The word load_vector and store_vector move a vector of fewer than 16 bytes in: `type` is
//! an unsigned type of exactly Bytes bytes, aligned to Bytes, so one access is one
//! instruction. Only 2, 4, 8 and 16 are defined. (The VectorAccess widths below always give
//! the narrowest operand 16 bytes, so they never take this path; it serves other widths.)
template <std::size_t Bytes>
struct WordOf;  // an unsigned type of exactly Bytes bytes, aligned to Bytes
//! 2-byte word (two 8-bit elements, or one 16-bit element).
template <> struct WordOf<2> { using type = unsigned short; };
//! \typedef WordOf<2>::type
//! unsigned short, the 2-byte word.

//! 4-byte word (two bf16/fp16 elements, or one float).
template <> struct WordOf<4> { using type = unsigned int; };
//! \typedef WordOf<4>::type
//! unsigned int, the 4-byte word.

//! 8-byte word: CUDA's uint2, 8-byte aligned (four bf16/fp16, two float, one double).
template <> struct WordOf<8> { using type = uint2; };
//! \typedef WordOf<8>::type
//! CUDA's uint2, the 8-byte word.

//! 16-byte word: CUDA's uint4, 16-byte aligned (vectors of 16 bytes or more are moved as
//! uint4 words directly).
template <> struct WordOf<16> { using type = uint4; };
//! \typedef WordOf<16>::type
//! CUDA's uint4, the 16-byte word.

//! r[0, V) <- p[0, V); p must be aligned to min(16, V * sizeof(T)) bytes.
template <int V, class T>
__device__ __forceinline__ void load_vector(const T* p, T (&r)[V]) {
  constexpr std::size_t bytes = V * sizeof(T);
  if constexpr (bytes >= 16) {
    static_assert(bytes % 16 == 0, "vector of whole 16-byte words");
#pragma unroll
    for (std::size_t w = 0; w < bytes / 16; ++w) {
      const uint4 word = reinterpret_cast<const uint4*>(p)[w];
      std::memcpy(reinterpret_cast<unsigned char*>(r) + 16 * w, &word, 16);
    }
  } else {
    using W = typename WordOf<bytes>::type;
    const W word = *reinterpret_cast<const W*>(p);
    std::memcpy(r, &word, bytes);
  }
}

//! p[0, V) <- r[0, V); same alignment as load_vector.
template <int V, class T>
__device__ __forceinline__ void store_vector(T* p, const T (&r)[V]) {
  constexpr std::size_t bytes = V * sizeof(T);
  if constexpr (bytes >= 16) {
#pragma unroll
    for (std::size_t w = 0; w < bytes / 16; ++w) {
      uint4 word;
      std::memcpy(&word, reinterpret_cast<const unsigned char*>(r) + 16 * w, 16);
      reinterpret_cast<uint4*>(p)[w] = word;
    }
  } else {
    using W = typename WordOf<bytes>::type;
    W word;
    std::memcpy(&word, r, bytes);
    *reinterpret_cast<W*>(p) = word;
  }
}

//! An operand pointer as the launcher sees it: address and element size, for the alignment
//! check that decides between the vector path and the element-by-element path.
struct OperandAddress {
  const void* pointer;        //!< first element of the operand (device memory); null: absent, ignored
  std::size_t element_bytes;  //!< sizeof the operand's element type
};

//! sizeof(T): the one-type end of the recursion below.
template <class T>
constexpr std::size_t min_size() { return sizeof(T); }
//! The smallest sizeof among T, U, R...: the narrowest operand, which sets a functor's vector
//! width (16 bytes of it).
template <class T, class U, class... R>
constexpr std::size_t min_size() {
  return sizeof(T) < min_size<U, R...>() ? sizeof(T) : min_size<U, R...>();
}

//! How for_each_index applies functor `Fn` with wide accesses. Primary template: not
//! vectorised, so every functor without a specialisation runs one element per call.
//!
//! A specialisation provides: `enabled = true`; `width`, the elements per vector (16 bytes of
//! the narrowest operand); `count`, the number of operand pointers; `addresses(k, a)`, which
//! reports each operand's pointer and element size for the alignment check; and a device
//! `apply(k, i)`, which processes elements [i, i + width) of functor `k`; the launcher calls
//! it only with i at which every present operand's pointer + i is aligned to width elements.
template <class Fn>
struct VectorAccess {
  static constexpr bool enabled = false;  //!< no vector path: for_each_index launches the scalar kernel
  static constexpr int width = 1;         //!< one element at a time
};

//! Vector path of the forward combine x <- alpha*y + f + beta*x (streams S, F's output C).
template <class S, class C, class A>
struct VectorAccess<ForwardCombine<S, C, A>> {
  using Fn = ForwardCombine<S, C, A>;  //!< the functor this specialisation applies
  static constexpr bool enabled = true;  //!< for_each_index takes the vector path when aligned
  //! Elements per vector: 16 bytes of the narrower of S and C (4 for fp32, 8 with bf16 F).
  static constexpr int width = static_cast<int>(16 / min_size<S, C>());
  static constexpr int count = 3;  //!< operands x, y, f
  //! a <- (x, y, f) with their element sizes.
  static void addresses(const Fn& k, OperandAddress (&a)[count]) {
    a[0] = {k.x, sizeof(S)};
    a[1] = {k.y, sizeof(S)};
    a[2] = {k.f, sizeof(C)};
  }
  //! Elements [i, i + width): loads x, y, f into registers, runs k's operator() on them (the
  //! finiteness flag still points at k.flag) and stores x.
  __device__ __forceinline__ static void apply(const Fn& k, std::size_t i) {
    S x[width], y[width];
    C f[width];
    load_vector<width>(k.x + i, x);
    load_vector<width>(k.y + i, y);
    load_vector<width>(k.f + i, f);
    const Fn local{x, y, f, k.alpha, k.beta, k.flag};
#pragma unroll
    for (int j = 0; j < width; ++j) local(static_cast<std::size_t>(j));
    store_vector<width>(k.x + i, x);
  }
};

//! Vector path of the inverse combine y <- (y - alpha*x - f)/beta (streams S, F's output C).
template <class S, class C, class A>
struct VectorAccess<InverseCombine<S, C, A>> {
  using Fn = InverseCombine<S, C, A>;  //!< the functor this specialisation applies
  static constexpr bool enabled = true;  //!< for_each_index takes the vector path when aligned
  //! Elements per vector: 16 bytes of the narrower of S and C.
  static constexpr int width = static_cast<int>(16 / min_size<S, C>());
  static constexpr int count = 3;  //!< operands y, x, f
  //! a <- (y, x, f) with their element sizes.
  static void addresses(const Fn& k, OperandAddress (&a)[count]) {
    a[0] = {k.y, sizeof(S)};
    a[1] = {k.x, sizeof(S)};
    a[2] = {k.f, sizeof(C)};
  }
  //! Elements [i, i + width): loads y, x, f into registers, runs k's operator() on them and
  //! stores y.
  __device__ __forceinline__ static void apply(const Fn& k, std::size_t i) {
    S y[width], x[width];
    C f[width];
    load_vector<width>(k.y + i, y);
    load_vector<width>(k.x + i, x);
    load_vector<width>(k.f + i, f);
    const Fn local{y, x, f, k.alpha, k.beta};
#pragma unroll
    for (int j = 0; j < width; ++j) local(static_cast<std::size_t>(j));
    store_vector<width>(k.y + i, y);
  }
};

//! Vector path of the backward combine
//!   gx <- gx + alpha*gy (+ jt);  gy <- beta*gy;  [y <- (y - alpha*x - f)/beta]
//! with and without the fused reconstruction (bracketed) and the separate J^T g operand jt.
template <class S, class C, class A, bool Reconstruct>
struct VectorAccess<BackwardCombine<S, C, A, Reconstruct>> {
  using Fn = BackwardCombine<S, C, A, Reconstruct>;  //!< the functor this specialisation applies
  static constexpr bool enabled = true;  //!< for_each_index takes the vector path when aligned
  //! Elements per vector: 16 bytes of the narrower of S and C.
  static constexpr int width = static_cast<int>(16 / min_size<S, C>());
  static constexpr int count = 6;  //!< operands gx, gy, jt, y, x, f (the last four may be absent)
  //! Absent operands (jt == nullptr, or no reconstruction) are reported as null and ignored.
  static void addresses(const Fn& k, OperandAddress (&a)[count]) {
    a[0] = {k.gx, sizeof(S)};
    a[1] = {k.gy, sizeof(S)};
    a[2] = {k.jt, sizeof(C)};
    a[3] = {Reconstruct ? k.y : nullptr, sizeof(S)};
    a[4] = {Reconstruct ? k.x : nullptr, sizeof(S)};
    a[5] = {Reconstruct ? k.f : nullptr, sizeof(C)};
  }
  //! Elements [i, i + width): loads gx, gy, jt when present, and y, x, f when reconstructing;
  //! runs k's operator() on the registers (flag still k.flag); stores gx, gy, and y when
  //! reconstructing.
  __device__ __forceinline__ static void apply(const Fn& k, std::size_t i) {
    S gx[width], gy[width];
    C jt[width];
    load_vector<width>(k.gx + i, gx);
    load_vector<width>(k.gy + i, gy);
    if (k.jt != nullptr) load_vector<width>(k.jt + i, jt);
    if constexpr (Reconstruct) {
      S y[width], x[width];
      C f[width];
      load_vector<width>(k.y + i, y);
      load_vector<width>(k.x + i, x);
      load_vector<width>(k.f + i, f);
      const Fn local{gx, gy, k.jt != nullptr ? jt : nullptr, y, x, f, k.alpha, k.beta, k.flag};
#pragma unroll
      for (int j = 0; j < width; ++j) local(static_cast<std::size_t>(j));
      store_vector<width>(k.y + i, y);
    } else {
      const Fn local{gx, gy, k.jt != nullptr ? jt : nullptr, nullptr, nullptr, nullptr, k.alpha, k.beta, k.flag};
#pragma unroll
      for (int j = 0; j < width; ++j) local(static_cast<std::size_t>(j));
    }
    store_vector<width>(k.gx + i, gx);
    store_vector<width>(k.gy + i, gy);
  }
};

//! Vector path of the converting copy dst <- src (stream type to compute type, or back).
template <class From, class To>
struct VectorAccess<ConvertCopy<From, To>> {
  using Fn = ConvertCopy<From, To>;  //!< the functor this specialisation applies
  static constexpr bool enabled = true;  //!< for_each_index takes the vector path when aligned
  //! Elements per vector: 16 bytes of the narrower of From and To.
  static constexpr int width = static_cast<int>(16 / min_size<From, To>());
  static constexpr int count = 2;  //!< operands dst, src
  //! a <- (dst, src) with their element sizes.
  static void addresses(const Fn& k, OperandAddress (&a)[count]) {
    a[0] = {k.dst, sizeof(To)};
    a[1] = {k.src, sizeof(From)};
  }
  //! Elements [i, i + width): loads src, converts in registers with k's operator(), stores dst.
  __device__ __forceinline__ static void apply(const Fn& k, std::size_t i) {
    From src[width];
    To dst[width];
    load_vector<width>(k.src + i, src);
    const Fn local{dst, src};
#pragma unroll
    for (int j = 0; j < width; ++j) local(static_cast<std::size_t>(j));
    store_vector<width>(k.dst + i, dst);
  }
};

//! The common element phase (address / element size, modulo `width`) of all present
//! operands, or -1 when they differ or one is not element-aligned: then only the
//! element-by-element path is correct.
template <int Count>
inline int common_phase(const OperandAddress (&a)[Count], int width) {
  int phase = -2;
  for (const auto& op : a) {
    if (op.pointer == nullptr) continue;
    const auto addr = reinterpret_cast<std::uintptr_t>(op.pointer);
    if (addr % op.element_bytes != 0) return -1;
    const int p = static_cast<int>((addr / op.element_bytes) % static_cast<std::uintptr_t>(width));
    if (phase == -2) phase = p;
    else if (p != phase) return -1;
  }
  return phase == -2 ? 0 : phase;
}

}  // namespace dr2net::cuda_detail
