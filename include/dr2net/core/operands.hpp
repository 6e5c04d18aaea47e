#pragma once
//! \file
//! The operand protocol of elementwise functors: how a functor names the buffers its call
//! operator touches at element i, so that a backend can apply it to V consecutive elements
//! at a time through register copies without knowing the functor.
//!
//! A functor `Fn` that `k(i)` touches only at element i of some pointer members declares them
//! in one member type, each with how it is used:
//!
//!     template <class S, class A>
//!     struct Axpy {
//!       S* y;
//!       const S* x;
//!       A a;
//!       using operands = OperandList<UpdateOperand<&Axpy::y>, ReadOperand<&Axpy::x>>;
//!       DR2NET_HD_INLINE void operator()(std::size_t i) const { y[i] = static_cast<S>(a * x[i] + y[i]); }
//!     };
//!
//! apply_operands<V, Mover>(k, i) then processes elements [i, i + V): it loads every operand
//! that is read into a register array of V elements (Mover::load), points a copy of k at those
//! arrays by member (never by field order), calls the copy's operator()(j) for j = 0 .. V-1
//! with constant j, and stores every operand that is written (Mover::store). The arithmetic is
//! the functor's own; only where its operands live changes.
//!
//! What a declaration promises, and what the backends rely on:
//! - every pointer member that operator()(i) dereferences at an index depending on i is
//!   declared, and is dereferenced only at index i (a strided or gathered read must not be);
//! - an operand declared ReadOperand is never written, one declared WriteOperand never read;
//! - operands may alias only where the functor already allows it element by element (for
//!   instance an output that is also an input): each is loaded into its own registers, all
//!   loads happen before the calls and all stores after them, so operator()(i) must read every
//!   element i it needs before it writes element i of an aliased buffer, and no two written
//!   operands may alias;
//! - an OptionalReadOperand may be null, and the copy sees it null then (no load); every
//!   other operand is used unconditionally (a null one would be dereferenced).
//! Pointer members that are not element buffers (a shared flag) are not declared: the copy
//! keeps them. A functor without `operands` is applied element by element.

#include <array>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "dr2net/core/config.hpp"

namespace dr2net {

//! How a functor's operator()(i) uses element i of an operand.
enum class OperandAccess {
  read,        //!< read, never written: loaded, not stored
  write,       //!< written, never read: stored, not loaded
  read_write,  //!< read and then written (in place): loaded and stored
};

namespace detail {
//! Splits a pointer-to-data-member type `P C::*` into its class and member type.
template <class M>
struct member_pointer_parts {
  static constexpr bool valid = false;
};
template <class C, class P>
struct member_pointer_parts<P C::*> {
  static constexpr bool valid = true;
  using class_type = C;
  using member_type = P;
};
}  // namespace detail

//! One declared operand: the pointer member `Member` (`&Fn::name`, of type `T* Fn::*` or
//! `const T* Fn::*`), used as `Access` says; `Optional` operands may be null at run time.
template <auto Member, OperandAccess Access, bool Optional = false>
struct Operand {
  static_assert(detail::member_pointer_parts<decltype(Member)>::valid,
                "dr2net: an operand is a pointer to a data member, &Fn::name");
  //! The functor the member belongs to.
  using functor_type = typename detail::member_pointer_parts<decltype(Member)>::class_type;
  //! The member's own type, `T*` or `const T*`.
  using pointer_type = typename detail::member_pointer_parts<decltype(Member)>::member_type;
  static_assert(std::is_pointer_v<pointer_type>, "dr2net: an operand member must be a pointer");
  //! T: what one register of the operand holds.
  using element_type = std::remove_cv_t<std::remove_pointer_t<pointer_type>>;
  static_assert(Access == OperandAccess::read || !std::is_const_v<std::remove_pointer_t<pointer_type>>,
                "dr2net: an operand that is written must be a pointer to non-const");
  static_assert(!Optional || Access == OperandAccess::read, "dr2net: only read operands may be optional");
  static constexpr auto member = Member;        //!< the pointer to member, &Fn::name
  static constexpr OperandAccess access = Access;  //!< how operator()(i) uses element i
  static constexpr bool reads = Access != OperandAccess::write;  //!< loaded before the calls
  static constexpr bool writes = Access != OperandAccess::read;  //!< stored after the calls
  static constexpr bool optional = Optional;  //!< may be null: then neither loaded nor stored
};

//! An operand read at element i and never written (e.g. a stream on the right-hand side).
template <auto Member>
using ReadOperand = Operand<Member, OperandAccess::read>;
//! An operand read at element i when its pointer is not null (e.g. an input present only in
//! some precisions); the functor itself checks the pointer against null.
template <auto Member>
using OptionalReadOperand = Operand<Member, OperandAccess::read, true>;
//! An operand written at element i and never read (a destination).
template <auto Member>
using WriteOperand = Operand<Member, OperandAccess::write>;
//! An operand read and then overwritten at element i (updated in place).
template <auto Member>
using UpdateOperand = Operand<Member, OperandAccess::read_write>;

//! The list of a functor's operands, declared as its member type `operands`.
template <class... Ops>
struct OperandList {
  static constexpr std::size_t size = sizeof...(Ops);  //!< number of declared operands
};

namespace detail {
template <class A, class B>
constexpr bool same_member() {
  if constexpr (std::is_same_v<decltype(A::member), decltype(B::member)>) return A::member == B::member;
  else return false;
}
template <class A, class... Ops>
constexpr std::size_t times_declared() {
  return (std::size_t{same_member<A, Ops>()} + ...);
}
template <class Fn, class List>
struct operand_list_of : std::false_type {};
template <class Fn, class... Ops>
struct operand_list_of<Fn, OperandList<Ops...>>
    : std::bool_constant<(sizeof...(Ops) > 0) && (std::is_same_v<typename Ops::functor_type, Fn> && ...) &&
                         ((times_declared<Ops, Ops...>() == 1) && ...)> {};

template <class... Ops>
constexpr std::array<std::size_t, sizeof...(Ops)> element_bytes(OperandList<Ops...>) {
  return {sizeof(typename Ops::element_type)...};
}
}  // namespace detail

//! Whether `Fn` declares its operands: a member type `operands` that is a non-empty
//! OperandList of Fn's own members, each named once.
template <class Fn>
concept DeclaresOperands = requires { typename Fn::operands; } &&
                           detail::operand_list_of<Fn, typename Fn::operands>::value;

//! Whether `Fn` has a member `operands` at all (declared, correctly or not): backends refuse
//! to compile a functor whose declaration is not a valid OperandList of its own members
//! rather than silently apply it element by element.
template <class Fn>
concept HasOperandsMember = requires { typename Fn::operands; };

//! sizeof each declared operand's element type, in declaration order.
template <DeclaresOperands Fn>
inline constexpr std::array<std::size_t, Fn::operands::size> operand_element_bytes =
    detail::element_bytes(typename Fn::operands{});

//! sizeof the narrowest element type among Fn's declared operands.
template <DeclaresOperands Fn>
inline constexpr std::size_t smallest_operand_bytes = [] {
  std::size_t s = operand_element_bytes<Fn>[0];
  for (std::size_t b : operand_element_bytes<Fn>) s = b < s ? b : s;
  return s;
}();

//! Calls visit(pointer, Op{}) for each declared operand of k, in declaration order, with the
//! operand's pointer as k holds it (possibly null for an OptionalReadOperand). Host code: the
//! backends use it to check alignment before choosing the V-wide path.
template <DeclaresOperands Fn, class Visit>
constexpr void for_each_operand(const Fn& k, Visit&& visit) {
  [&]<class... Ops>(OperandList<Ops...>) { (visit(k.*(Ops::member), Ops{}), ...); }(typename Fn::operands{});
}

//! A Mover that copies elements one at a time: p[j] to r[j] and back. Backends provide wider
//! ones (a CUDA mover issues 16-byte loads and stores); a Mover is any type with static
//! `load<V>(const T* p, T (&r)[V])` and `store<V>(T* p, const T (&r)[V])`, and optionally
//! `fresh<V>(T (&r)[V])`, called on the registers of a written-only operand before the calls.
struct ElementMover {
  //! r[j] = p[j] for j < V.
  template <int V, class T>
  DR2NET_HD_INLINE static void load(const T* p, T (&r)[V]) {
    for (int j = 0; j < V; ++j) r[j] = p[j];
  }
  //! p[j] = r[j] for j < V.
  template <int V, class T>
  DR2NET_HD_INLINE static void store(T* p, const T (&r)[V]) {
    for (int j = 0; j < V; ++j) p[j] = r[j];
  }
};

namespace detail {
template <class Fn, std::size_t... J>
DR2NET_HD_INLINE void call_each(const Fn& local, std::index_sequence<J...>) {
  (local(J), ...);  // constant indices: every register array is indexed at compile time
}

template <int V, class Mover, class Fn>
DR2NET_HD_INLINE void bind_operands(const Fn&, Fn& local, std::size_t, OperandList<>) {
  call_each(local, std::make_index_sequence<static_cast<std::size_t>(V)>{});
}

//! Binds the first operand to registers (or, optional and null, to a constant null), then the
//! rest; runs the calls at the end of the chain and stores on the way back. Each branch on an
//! optional operand instantiates the remaining chain separately, so no pointer in `local` is
//! ever chosen at run time between a register array and something else.
template <int V, class Mover, class Fn, auto M, OperandAccess Acc, bool Opt, class... Rest>
DR2NET_HD_INLINE void bind_operands(const Fn& k, Fn& local, std::size_t i, OperandList<Operand<M, Acc, Opt>, Rest...>) {
  using Op = Operand<M, Acc, Opt>;
  using T = typename Op::element_type;
  if constexpr (Opt) {
    if (k.*M == nullptr) {
      local.*M = nullptr;
      bind_operands<V, Mover>(k, local, i, OperandList<Rest...>{});
      return;
    }
  }
  T r[V];
  if constexpr (Op::reads) {
    Mover::template load<V>(k.*M + i, r);
  } else if constexpr (requires { Mover::template fresh<V>(r); }) {
    Mover::template fresh<V>(r);
  }
  local.*M = r;
  bind_operands<V, Mover>(k, local, i, OperandList<Rest...>{});
  if constexpr (Op::writes) Mover::template store<V>(k.*M + i, r);
}
}  // namespace detail

//! Applies k to elements [i, i + V) through register copies of its declared operands (see
//! the file comment): the same results, bit for bit, as k(i), ..., k(i + V - 1). Mover moves
//! V elements between an operand and its registers and sets the alignment it needs of
//! pointer + i; ElementMover needs none.
template <int V, class Mover, DeclaresOperands Fn>
DR2NET_HD_INLINE void apply_operands(const Fn& k, std::size_t i) {
  static_assert(V >= 1, "dr2net: apply_operands needs at least one element");
  Fn local = k;
  detail::bind_operands<V, Mover>(k, local, i, typename Fn::operands{});
}

}  // namespace dr2net
