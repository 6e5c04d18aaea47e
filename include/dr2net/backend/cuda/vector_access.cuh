#pragma once
//! \file
//! How for_each_index applies an elementwise functor to a few consecutive elements at once
//! with wide (16-byte) loads and stores, without knowing the functor: a functor that declares
//! its operands (core/operands.hpp) is run through apply_operands with WideMover, which loads
//! each read operand's V elements into registers, points a copy of the functor at them by
//! member, calls that copy's operator()(j) for constant j < V (the very __host__ __device__
//! code the host backend runs element by element) and stores each written operand.
//! Every register array is indexed with compile-time indices only, so none is put in local
//! memory; a null optional operand takes its own compiled branch.
//!
//! This header names no functor: a functor without an `operands` declaration is applied
//! element by element.

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "dr2net/core/config.hpp"
#include "dr2net/core/operands.hpp"

namespace dr2net::cuda_detail {

//! Elements per thread of a functor whose smallest operand type is `Smallest`: 16 bytes of it.
template <class Smallest>
inline constexpr int kVectorWidth = 16 / static_cast<int>(sizeof(Smallest)) > 0 ? 16 / static_cast<int>(sizeof(Smallest)) : 1;

//! The word load_vector and store_vector move a vector of fewer than 16 bytes in: `type` is
//! an unsigned type of exactly Bytes bytes, aligned to Bytes, so one access is one
//! instruction. Only 2, 4, 8 and 16 are defined. (VectorAccess always gives the narrowest
//! operand 16 bytes, so it never takes this path; it serves other widths.)
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
DR2NET_HD_INLINE void load_vector(const T* p, T (&r)[V]) {
  constexpr std::size_t bytes = V * sizeof(T);
  if constexpr (bytes >= 16) {
    static_assert(bytes % 16 == 0, "vector of whole 16-byte words");
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
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
DR2NET_HD_INLINE void store_vector(T* p, const T (&r)[V]) {
  constexpr std::size_t bytes = V * sizeof(T);
  if constexpr (bytes >= 16) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
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

//! The Mover of apply_operands on the device: V elements per load_vector / store_vector
//! (16 bytes of the narrowest operand, one or more 16-byte words of the wider ones).
struct WideMover {
  //! r <- p[0, V) with wide loads; p aligned as load_vector requires.
  template <int V, class T>
  DR2NET_HD_INLINE static void load(const T* p, T (&r)[V]) {
    load_vector<V>(p, r);
  }
  //! p[0, V) <- r with wide stores; p aligned as store_vector requires.
  template <int V, class T>
  DR2NET_HD_INLINE static void store(T* p, const T (&r)[V]) {
    store_vector<V>(p, r);
  }
};

//! Whether an operand element size suits WideMover: a power of two of at most 16 bytes, so
//! that V = 16 / (narrowest size) elements of every operand are whole 16-byte words.
constexpr bool wide_element_size(std::size_t bytes) { return bytes != 0 && bytes <= 16 && (bytes & (bytes - 1)) == 0; }

//! Whether functor `Fn` can take the wide path: it declares its operands, each of a size
//! wide_element_size accepts.
template <class Fn>
constexpr bool wide_operands() {
  if constexpr (DeclaresOperands<Fn>) {
    for (std::size_t b : operand_element_bytes<Fn>) {
      if (!wide_element_size(b)) return false;
    }
    return true;
  } else {
    return false;
  }
}

//! How for_each_index applies functor `Fn` with wide accesses, from Fn's own operand
//! declaration (core/operands.hpp); no functor is named here.
//!
//! `enabled`: Fn declares operands of suitable sizes (otherwise for_each_index applies it
//! element by element); `width`, the elements per vector (16 bytes of the narrowest
//! operand); `count`, the number of declared operands; `addresses(k, a)`, each operand's
//! pointer and element size for the alignment check; and the device `apply(k, i)`, which
//! processes elements [i, i + width) of functor `k`. The launcher calls apply only with i at
//! which every present operand's pointer + i is aligned to width elements.
template <class Fn>
struct VectorAccess {
  static_assert(!HasOperandsMember<Fn> || DeclaresOperands<Fn>,
                "dr2net: Fn::operands must be a non-empty OperandList of Fn's own pointer members "
                "(core/operands.hpp)");
  static constexpr bool enabled = wide_operands<Fn>();  //!< for_each_index takes the vector path when aligned
  //! Elements per vector: 16 bytes of the narrowest operand (4 for fp32, 8 with a bf16
  //! operand); 1 when not enabled.
  static constexpr int width = [] {
    if constexpr (wide_operands<Fn>()) return static_cast<int>(16 / smallest_operand_bytes<Fn>);
    else return 1;
  }();
  //! Number of declared operands (0 when not enabled).
  static constexpr int count = [] {
    if constexpr (wide_operands<Fn>()) return static_cast<int>(Fn::operands::size);
    else return 0;
  }();
  //! a <- every declared operand's pointer (null for an absent optional one: ignored) and
  //! element size, in declaration order.
  static void addresses(const Fn& k, OperandAddress (&a)[count > 0 ? count : 1]) {
    int n = 0;
    for_each_operand(k, [&](const auto* p, auto op) {
      a[n++] = {p, sizeof(typename decltype(op)::element_type)};
    });
  }
  //! Elements [i, i + width) through register copies (apply_operands with WideMover).
  __device__ __forceinline__ static void apply(const Fn& k, std::size_t i) { apply_operands<width, WideMover>(k, i); }
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
