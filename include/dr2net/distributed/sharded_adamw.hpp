#pragma once
//! \file
//! DistributedAdamW: AdamW over a DataParallel driver's parameters, either replicated (every
//! rank keeps both moments of every parameter and updates all of them from the all-reduced
//! gradients) or sharded, ZeRO stage 1 as DeepSpeed names it (GradientSync::ReduceScatter):
//!
//!   finish():  reduce-scatter: rank r receives the averaged gradients of shard r of every bucket
//!   step():    rank r updates the parameters of its shard with the moments of its shard alone
//!              (so optimizer state per rank = the whole state / world size, plus < world size
//!              elements of padding per bucket), writes them into the bucket buffer, and the
//!              buckets are all-gathered: every rank ends with every updated parameter.
//!
//! The update is optim::AdamW's, element for element, in the same double arithmetic, so the
//! replicated optimizer gives optim::AdamW's parameters bit for bit from the same gradients,
//! and every rank's parameters are bit for bit equal after every step in both modes (the
//! sharded one copies each updated value to every rank). Host memory only.
//!
//! Clipping: step(lr, max_norm) clips the reduced gradients first (DataParallel::clip_grad_norm:
//! the global norm, summed over the shards when sharded) and returns that norm.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/distributed/data_parallel.hpp"
#include "dr2net/optim/adamw.hpp"

namespace dr2net::distributed {

//! AdamW over a DataParallel driver (see the file comment). The driver must be finalized and
//! outlive the optimizer; its GradientSync decides the mode (ReduceScatter: sharded).
//! \tparam Comm, T as the driver's; its context is HostContext
template <Communicator Comm, class T = float>
class DistributedAdamW {
 public:
  using driver_type = DataParallel<Comm, HostContext, T>;  //!< the driver it updates from
  using DecayRule = typename optim::AdamW<T>::DecayRule;  //!< true when a parameter (by name) decays

  //! One contiguous run of this rank's optimizer state: elements [begin, begin + count) of
  //! parameter `param`, whose moments are at `state` in first_moments()/second_moments().
  struct Segment {
    std::size_t param = 0;   //!< index into the driver's parameters()
    std::size_t begin = 0;   //!< first element within the parameter
    std::size_t count = 0;   //!< elements
    std::size_t state = 0;   //!< first element in the moment arrays
    std::size_t bucket = 0;  //!< the bucket it belongs to
    std::size_t flat = 0;    //!< its first element in the driver's flat bucket buffer
  };

  //! Allocates this rank's moments through the driver's context (MemoryCategory::Other,
  //! "AdamW first moment"/"AdamW second moment"), zeroed: every parameter's elements when
  //! replicated, this rank's shard of every bucket when sharded. Throws dr2net::Error for a
  //! driver that is not finalized, invalid options (optim::AdamWOptions) or an empty rule.
  DistributedAdamW(driver_type& dp, optim::AdamWOptions options = {},
                   DecayRule decay_rule = optim::default_weight_decay)
      : dp_(&dp), options_(options), sharded_(dp.options().sync == GradientSync::ReduceScatter) {
    check_options(options_);
    DR2NET_CHECK(decay_rule != nullptr, "DistributedAdamW: the weight-decay rule is empty");
    DR2NET_CHECK(!dp.buckets().empty(), "DistributedAdamW: the driver is not finalized (call finalize() first)");
    const auto& params = dp.parameters();
    for (const auto& p : params) decays_.push_back(decay_rule(p.name));
    const auto r = static_cast<std::size_t>(dp.rank());
    std::size_t state = 0;
    for (std::size_t k = 0; k < dp.buckets().size(); ++k) {
      const auto& b = dp.buckets()[k];
      // This rank's range of the bucket: all of it when replicated, shard r when sharded.
      const std::size_t lo = sharded_ ? r * b.shard() : 0, hi = sharded_ ? lo + b.shard() : b.elements;
      std::size_t off = 0;
      for (std::size_t i : b.params) {
        const std::size_t n = params[i].value.size();
        const std::size_t s = std::max(off, lo), e = std::min(off + n, hi);
        if (s < e) segments_.push_back({i, s - off, e - s, state + (s - lo), k, b.offset + s});
        off += n;
      }
      state += sharded_ ? b.shard() : b.elements;
    }
    state_elements_ = state;
    m_ = dp.context().template allocate<T>(state, MemoryCategory::Other, "AdamW first moment");
    v_ = dp.context().template allocate<T>(state, MemoryCategory::Other, "AdamW second moment");
    std::fill(m_.data(), m_.data() + state, T(0));
    std::fill(v_.data(), v_.data() + state, T(0));
  }
  DistributedAdamW(const DistributedAdamW&) = delete;
  DistributedAdamW& operator=(const DistributedAdamW&) = delete;

  //! The driver it updates from.
  driver_type& driver() { return *dp_; }
  //! Whether the state is sharded (ZeRO stage 1).
  bool sharded() const { return sharded_; }
  //! The options in force.
  const optim::AdamWOptions& options() const { return options_; }
  //! Steps taken (t of the last step).
  std::int64_t steps_taken() const { return t_; }
  //! Sets the step count (a checkpoint's); throws dr2net::Error for a negative count.
  void set_steps_taken(std::int64_t t) {
    DR2NET_CHECK(t >= 0, "DistributedAdamW: negative step count ", t);
    t_ = t;
  }
  //! Elements of each moment this rank holds.
  std::size_t state_elements() const { return state_elements_; }
  //! Bytes of optimizer state this rank holds (both moments).
  std::size_t state_bytes() const { return 2 * state_elements_ * sizeof(T); }
  //! This rank's runs of optimizer state, in bucket order.
  const std::vector<Segment>& segments() const { return segments_; }
  //! The first moments (state_elements()).
  T* first_moments() { return m_.data(); }
  //! The second moments (state_elements()).
  T* second_moments() { return v_.data(); }
  //! Whether parameter i (the driver's order) gets weight decay.
  bool decays(std::size_t i) const { return decays_.at(i); }
  //! Sets the learning rate; throws dr2net::Error unless finite and >= 0.
  void set_lr(double lr) {
    DR2NET_CHECK(std::isfinite(lr) && lr >= 0, "DistributedAdamW: learning rate must be finite and >= 0, got ", lr);
    options_.lr = lr;
  }

  //! Sets every registered gradient to zero (before the next backward).
  void zero_grad() {
    for (const auto& p : dp_->parameters()) std::fill(p.grad.data(), p.grad.data() + p.grad.size(), T(0));
  }

  //! One AdamW step from the reduced gradients of the driver's last finish() at the current
  //! learning rate; when sharded, then the all-gather of the parameters (collective).
  void step() {
    ++t_;
    const double b1 = options_.beta1, b2 = options_.beta2, lr = options_.lr;
    const double bc1 = 1.0 - std::pow(b1, static_cast<double>(t_)), bc2 = 1.0 - std::pow(b2, static_cast<double>(t_));
    const auto& params = dp_->parameters();
    T* flat = dp_->flat_buffer();
    const T* shard = dp_->shard_gradients();
    for (const Segment& s : segments_) {
      const auto& p = params[s.param];
      const T* g = sharded_ ? shard + s.state : p.grad.data() + s.begin;
      const T* x = p.value.data() + s.begin;
      T* out = sharded_ ? flat + s.flat : p.value.data() + s.begin;  // sharded: gathered below
      T *m = m_.data() + s.state, *v = v_.data() + s.state;
      const double shrink = 1.0 - lr * (decays_[s.param] ? options_.weight_decay : 0.0);
      for (std::size_t k = 0; k < s.count; ++k) {  // optim::AdamW::step()'s arithmetic, in its order
        const double gk = static_cast<double>(g[k]);
        const double mk = b1 * static_cast<double>(m[k]) + (1.0 - b1) * gk;
        const double vk = b2 * static_cast<double>(v[k]) + (1.0 - b2) * gk * gk;
        m[k] = static_cast<T>(mk);
        v[k] = static_cast<T>(vk);
        const double update = (mk / bc1) / (std::sqrt(vk / bc2) + options_.eps);
        out[k] = static_cast<T>(static_cast<double>(x[k]) * shrink - lr * update);
      }
    }
    if (!sharded_) return;
    auto& comm = dp_->communicator();
    const auto r = static_cast<std::size_t>(dp_->rank());
    std::vector<typename Comm::request_type> gathers;
    for (const auto& b : dp_->buckets()) {
      T* base = flat + b.offset;
      gathers.push_back(comm.all_gather(base + r * b.shard(), base, b.shard()));
    }
    for (auto& g : gathers) g.wait();
    for (const auto& b : dp_->buckets()) {
      std::size_t off = b.offset;
      for (std::size_t i : b.params) {
        const auto& p = params[i];
        std::copy(flat + off, flat + off + p.value.size(), p.value.data());
        off += p.value.size();
      }
    }
  }

  //! set_lr(lr), then step().
  void step(double lr) {
    set_lr(lr);
    step();
  }

  //! Clips the reduced gradients to max_norm (DataParallel::clip_grad_norm), then step(lr).
  //! Returns the norm before clipping; a non-finite norm is returned without a step (the
  //! parameters and moments unchanged on every rank, since every rank sees the same norm).
  double step(double lr, double max_norm) {
    const double norm = dp_->clip_grad_norm(max_norm);
    if (!std::isfinite(norm)) return norm;
    step(lr);
    return norm;
  }

 private:
  static void check_options(const optim::AdamWOptions& o) {
    DR2NET_CHECK(std::isfinite(o.lr) && o.lr >= 0, "DistributedAdamW: learning rate must be finite and >= 0, got ", o.lr);
    DR2NET_CHECK(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1,
                 "DistributedAdamW: betas must lie in [0, 1), got ", o.beta1, " and ", o.beta2);
    DR2NET_CHECK(std::isfinite(o.eps) && o.eps > 0, "DistributedAdamW: eps must be positive, got ", o.eps);
    DR2NET_CHECK(std::isfinite(o.weight_decay) && o.weight_decay >= 0,
                 "DistributedAdamW: weight_decay must be >= 0, got ", o.weight_decay);
  }

  driver_type* dp_;
  optim::AdamWOptions options_;
  bool sharded_;
  std::vector<bool> decays_;
  std::vector<Segment> segments_;
  std::size_t state_elements_ = 0;
  HostBuffer<T> m_, v_;
  std::int64_t t_ = 0;
};

}  // namespace dr2net::distributed
