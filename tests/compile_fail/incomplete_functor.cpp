// Compiled by ctest with one member (or the schedule) left out; the compiler must name what is missing.
#include "dr2net/dr2net.hpp"

struct Incomplete {
#ifndef DR2NET_MISSING_value_type
  using value_type = float;
#endif
#ifndef DR2NET_MISSING_saved_elements
  std::size_t saved_elements(const dr2net::Shape&) const { return 0; }
#endif
  template <class Call>
  void forward(const Call&, dr2net::ConstView<float>, dr2net::TensorView<float>, dr2net::TensorView<float>) {}
  template <class Call>
  void recompute(const Call&, dr2net::ConstView<float>, dr2net::TensorView<float>, dr2net::TensorView<float>) {}
#ifndef DR2NET_MISSING_backward
  template <class Call>
  void backward(const Call&, dr2net::ConstView<float>, dr2net::ConstView<float>, dr2net::ConstView<float>,
                dr2net::TensorView<float>) {}
#endif
  template <class V>
  void for_each_parameter(V&&) {}
};

#ifdef DR2NET_MISSING_schedule
struct NotASchedule {};  // no operator()(step, module)
using Block = dr2net::ReversibleDualResidual<Incomplete, Incomplete, NotASchedule, dr2net::Fp32>;
#else
using Block = dr2net::ReversibleDualResidual<Incomplete, Incomplete, dr2net::ConstantSchedule, dr2net::Fp32>;
#endif
Block* instantiate = nullptr;
static_assert(sizeof(Block) > 0);
