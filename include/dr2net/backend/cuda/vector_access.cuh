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

template <std::size_t Bytes>
struct WordOf;  // an unsigned type of exactly Bytes bytes, aligned to Bytes
template <> struct WordOf<2> { using type = unsigned short; };
template <> struct WordOf<4> { using type = unsigned int; };
template <> struct WordOf<8> { using type = uint2; };
template <> struct WordOf<16> { using type = uint4; };

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
  const void* pointer;
  std::size_t element_bytes;
};

template <class T>
constexpr std::size_t min_size() { return sizeof(T); }
template <class T, class U, class... R>
constexpr std::size_t min_size() {
  return sizeof(T) < min_size<U, R...>() ? sizeof(T) : min_size<U, R...>();
}

//! Primary template: not vectorised.
template <class Fn>
struct VectorAccess {
  static constexpr bool enabled = false;
  static constexpr int width = 1;
};

//! x <- alpha*y + f + beta*x
template <class S, class C, class A>
struct VectorAccess<ForwardCombine<S, C, A>> {
  using Fn = ForwardCombine<S, C, A>;
  static constexpr bool enabled = true;
  static constexpr int width = static_cast<int>(16 / min_size<S, C>());
  static constexpr int count = 3;
  static void addresses(const Fn& k, OperandAddress (&a)[count]) {
    a[0] = {k.x, sizeof(S)};
    a[1] = {k.y, sizeof(S)};
    a[2] = {k.f, sizeof(C)};
  }
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

//! y <- (y - alpha*x - f)/beta
template <class S, class C, class A>
struct VectorAccess<InverseCombine<S, C, A>> {
  using Fn = InverseCombine<S, C, A>;
  static constexpr bool enabled = true;
  static constexpr int width = static_cast<int>(16 / min_size<S, C>());
  static constexpr int count = 3;
  static void addresses(const Fn& k, OperandAddress (&a)[count]) {
    a[0] = {k.y, sizeof(S)};
    a[1] = {k.x, sizeof(S)};
    a[2] = {k.f, sizeof(C)};
  }
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

//! gx <- gx + alpha*gy (+ jt);  gy <- beta*gy;  [y <- (y - alpha*x - f)/beta]
template <class S, class C, class A, bool Reconstruct>
struct VectorAccess<BackwardCombine<S, C, A, Reconstruct>> {
  using Fn = BackwardCombine<S, C, A, Reconstruct>;
  static constexpr bool enabled = true;
  static constexpr int width = static_cast<int>(16 / min_size<S, C>());
  static constexpr int count = 6;
  //! Absent operands (jt == nullptr, or no reconstruction) are reported as null and ignored.
  static void addresses(const Fn& k, OperandAddress (&a)[count]) {
    a[0] = {k.gx, sizeof(S)};
    a[1] = {k.gy, sizeof(S)};
    a[2] = {k.jt, sizeof(C)};
    a[3] = {Reconstruct ? k.y : nullptr, sizeof(S)};
    a[4] = {Reconstruct ? k.x : nullptr, sizeof(S)};
    a[5] = {Reconstruct ? k.f : nullptr, sizeof(C)};
  }
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

//! dst <- src, converting
template <class From, class To>
struct VectorAccess<ConvertCopy<From, To>> {
  using Fn = ConvertCopy<From, To>;
  static constexpr bool enabled = true;
  static constexpr int width = static_cast<int>(16 / min_size<From, To>());
  static constexpr int count = 2;
  static void addresses(const Fn& k, OperandAddress (&a)[count]) {
    a[0] = {k.dst, sizeof(To)};
    a[1] = {k.src, sizeof(From)};
  }
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
