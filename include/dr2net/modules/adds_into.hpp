#pragma once
//! \file
//! OutputAddsInto<Derived>: the optional adds-into members of ResidualFunction for functions
//! whose last step is a Linear layer (ViT attention's proj, the MLP's fc2, host or device):
//! that layer's GEMM accumulates onto scale * addend instead of overwriting, so the block
//! need not write F's output and read it back in a separate combine pass.
//!
//! Derived provides, reachable from this base (a friend declaration will do):
//!   void compute(const ModuleCall<Ctx>&, ConstView<T> in, TensorView<T> out, TensorView<T> saved,
//!                const T* addend, double scale);   // addend == nullptr: plain F
//!   double output_drop_path() const; double output_dropout() const;   // rates of its output mask
//!   static constexpr std::string_view type_name;

#include <cstdint>
#include <string>

#include "dr2net/block/residual_function.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/modules/drop.hpp"

namespace dr2net {

//! CRTP base that gives a residual function the ResidualFunction concept's optional adds-into
//! members (adds_into, recompute_add) on top of Derived::compute (see the file comment for what
//! Derived provides). Adding is on by default; set_adds_into(false) turns it off per object.
template <class Derived>
class OutputAddsInto {
 public:
  //! Whether this call can add into a destination: switched on (the default) and no output
  //! mask applies (drop-path and dropout scale F's output alone, so they need it apart).
  template <class Ctx>
  bool adds_into(const ModuleCall<Ctx>& call) const {
    const Derived& d = static_cast<const Derived&>(*this);
    return enabled_ && output_unmasked(call, d.output_drop_path(), d.output_dropout());
  }

  //! Off: the block always writes F's output and combines in a separate pass (benchmarks
  //! compare both paths).
  void set_adds_into(bool on) noexcept { enabled_ = on; }

  //! out = F(in) + scale * addend, with `saved` as recompute leaves it. `addend` may be `out`
  //! or `in`; scale == 0 never reads it. Throws where adds_into(call) is false.
  template <class Ctx, class T, class S>
  void recompute_add(const ModuleCall<Ctx>& call, TensorView<const T, S> in, TensorView<const T, S> addend,
                     double scale, TensorView<T, S> out, TensorView<T, S> saved) {
    const std::string what = std::string(Derived::type_name) + " recompute_add: addend";
    check_shape(addend, in.shape(), what);
    check_contiguous(addend, what);
    // The function reads `in` while its last GEMM writes `out`: they must not share memory.
    const auto lo = [](const auto& v) { return reinterpret_cast<std::uintptr_t>(v.data()); };
    const auto hi = [&](const auto& v) { return lo(v) + v.size() * sizeof(T); };
    DR2NET_CHECK(in.size() == 0 || hi(out) <= lo(in) || hi(in) <= lo(out), Derived::type_name,
                 " recompute_add: the destination overlaps the input");
    DR2NET_CHECK(adds_into(call), Derived::type_name,
                 " recompute_add: an output mask (drop-path or dropout) applies in this call, or adding is "
                 "switched off; ask adds_into(call) first");
    static_cast<Derived&>(*this).compute(call, in, out, saved, addend.data(), scale);
  }

 private:
  bool enabled_ = true;
};

}  // namespace dr2net
