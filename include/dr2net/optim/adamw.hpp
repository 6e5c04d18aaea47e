#pragma once
//! \file
//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization") over a model's
//! (name, value, grad) parameters, and global gradient-norm clipping.
//!
//! One step t (t = 1, 2, ...) for each parameter p with gradient g:
//!   m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
//!   p = p - lr * wd * p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
//! The decay term uses p before the update (as PyTorch's AdamW) and is not scaled by the
//! adaptive denominator: that is what "decoupled" means. Parameters the decay rule exempts
//! get wd = 0 (default_weight_decay: biases, norms, cls_token, pos_embed).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/block/stack.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/moved_from.hpp"

namespace dr2net::optim {

//! The default rule for which parameters get weight decay, by name (dot-separated path):
//! none for a last component "bias"; none when any component contains "norm" (norm, norm1,
//! fc_norm, layernorm: LayerNorm weights are scales, shrinking them toward 0 is not
//! regularisation); none for a last component cls_token, pos_embed, dist_token or reg_token
//! (learned embeddings, timm's no_weight_decay set). Everything else decays.
inline bool default_weight_decay(std::string_view name) {
  std::string_view last = name;
  std::size_t start = 0;
  while (start <= name.size()) {
    const std::size_t dot = name.find('.', start);
    const std::string_view part = name.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start);
    if (part.find("norm") != std::string_view::npos) return false;
    last = part;
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return !(last == "bias" || last == "cls_token" || last == "pos_embed" || last == "dist_token" ||
           last == "reg_token");
}

//! Hyperparameters of AdamW; the defaults are PyTorch's. AdamW's constructor throws
//! dr2net::Error unless lr is finite and >= 0, beta1 and beta2 lie in [0, 1), eps is finite
//! and > 0, and weight_decay is finite and >= 0.
struct AdamWOptions {
  double lr = 1e-3;            //!< learning rate (set_lr / step(lr) change it, e.g. from a schedule)
  double beta1 = 0.9;          //!< decay of the first moment
  double beta2 = 0.999;        //!< decay of the second moment
  double eps = 1e-8;           //!< added to the denominator
  double weight_decay = 0.01;  //!< decoupled decay rate, for the parameters the rule selects
};

//! AdamW over a fixed list of parameters on the host (see the file comment for the update).
//! The two moments of every parameter live in host buffers allocated through the context,
//! so the memory meter counts them (MemoryCategory::Other). The update runs in double
//! whatever T is, on the calling thread; one optimizer must not be used from two threads at
//! once.
//!
//! \tparam T element type of the parameters, their gradients and the moments (float or double)
template <class T>
class AdamW {
 public:
  //! A predicate on a parameter's name: true when it gets weight decay.
  using DecayRule = std::function<bool(std::string_view)>;

  //! Takes the parameters (views into their modules, which must outlive the optimizer) and
  //! allocates the two moments of each through ctx (MemoryCategory::Other), zeroed.
  AdamW(HostContext& ctx, std::vector<NamedParameter<T>> params, AdamWOptions options = {},
        DecayRule decay_rule = default_weight_decay)
      : params_(std::move(params)), options_(options) {
    check_options(options_);
    DR2NET_CHECK(decay_rule != nullptr, "AdamW: the weight-decay rule is empty");
    std::set<std::string> seen;
    for (const auto& p : params_) {
      DR2NET_CHECK(seen.insert(p.name).second, "AdamW: parameter '", p.name, "' was given twice");
      DR2NET_CHECK(p.value.size() == p.grad.size() && p.value.is_contiguous() && p.grad.is_contiguous(),
                   "AdamW: parameter '", p.name, "' has value ", p.value.shape(), " and gradient ", p.grad.shape(),
                   "; both must be contiguous and of one size");
      decays_.push_back(decay_rule(p.name));
      m_.push_back(ctx.allocate<T>(p.value.size(), MemoryCategory::Other, "AdamW first moment"));
      v_.push_back(ctx.allocate<T>(p.value.size(), MemoryCategory::Other, "AdamW second moment"));
      std::fill(m_.back().data(), m_.back().data() + p.value.size(), T(0));
      std::fill(v_.back().data(), v_.back().data() + p.value.size(), T(0));
    }
  }

  //! A moved-from optimizer refuses every call below with dr2net::Error ("... was moved from").
  AdamW(AdamW&&) = default;
  //! Takes over the source's parameters, moments and step count; the source then refuses
  //! every call.
  AdamW& operator=(AdamW&&) = default;
  AdamW(const AdamW&) = delete;
  AdamW& operator=(const AdamW&) = delete;
  ~AdamW() = default;

  //! The options in force; lr is the latest set_lr() or step(lr).
  const AdamWOptions& options() const {
    moved_.check("AdamW::options()");
    return options_;
  }
  //! The learning rate of the next step().
  double lr() const {
    moved_.check("AdamW::lr()");
    return options_.lr;
  }
  //! Sets the learning rate of the following steps (e.g. from a schedule); throws
  //! dr2net::Error, changing nothing, unless `lr` is finite and >= 0.
  void set_lr(double lr) {
    moved_.check("AdamW::set_lr()");
    DR2NET_CHECK(std::isfinite(lr) && lr >= 0, "AdamW: learning rate must be finite and >= 0, got ", lr);
    options_.lr = lr;
  }
  //! Steps taken so far (t of the last step).
  std::int64_t steps_taken() const {
    moved_.check("AdamW::steps_taken()");
    return t_;
  }
  //! The parameters as given to the constructor, in that order: index i of decays(),
  //! first_moment() and second_moment() is parameters()[i].
  const std::vector<NamedParameter<T>>& parameters() const {
    moved_.check("AdamW::parameters()");
    return params_;
  }
  //! Whether parameter i gets weight decay; throws dr2net::Error naming the index unless
  //! i < parameters().size().
  bool decays(std::size_t i) const {
    moved_.check("AdamW::decays()");
    check_index(i, "AdamW::decays()");
    return decays_[i];
  }
  //! The first moment m of parameter i: parameters()[i].value.size() elements, zero before
  //! the first step. Throws dr2net::Error naming the index unless i < parameters().size().
  const T* first_moment(std::size_t i) const {
    moved_.check("AdamW::first_moment()");
    check_index(i, "AdamW::first_moment()");
    return m_[i].data();
  }
  //! The second moment v of parameter i, as first_moment().
  const T* second_moment(std::size_t i) const {
    moved_.check("AdamW::second_moment()");
    check_index(i, "AdamW::second_moment()");
    return v_[i].data();
  }

  //! One update of every parameter from its gradient at the current learning rate.
  void step() {
    moved_.check("AdamW::step()");
    ++t_;
    const double b1 = options_.beta1, b2 = options_.beta2, lr = options_.lr;
    const double bc1 = 1.0 - std::pow(b1, static_cast<double>(t_)), bc2 = 1.0 - std::pow(b2, static_cast<double>(t_));
    for (std::size_t i = 0; i < params_.size(); ++i) {
      T* p = params_[i].value.data();
      const T* g = params_[i].grad.data();
      T *m = m_[i].data(), *v = v_[i].data();
      const double shrink = 1.0 - lr * (decays_[i] ? options_.weight_decay : 0.0);
      for (std::size_t k = 0; k < params_[i].value.size(); ++k) {
        const double gk = static_cast<double>(g[k]);
        const double mk = b1 * static_cast<double>(m[k]) + (1.0 - b1) * gk;
        const double vk = b2 * static_cast<double>(v[k]) + (1.0 - b2) * gk * gk;
        m[k] = static_cast<T>(mk);
        v[k] = static_cast<T>(vk);
        const double update = (mk / bc1) / (std::sqrt(vk / bc2) + options_.eps);
        p[k] = static_cast<T>(static_cast<double>(p[k]) * shrink - lr * update);
      }
    }
  }

  //! set_lr(lr), then step().
  void step(double lr) {
    set_lr(lr);
    step();
  }

  //! Sets every parameter's gradient to zero.
  void zero_grad() {
    moved_.check("AdamW::zero_grad()");
    for (auto& p : params_) std::fill(p.grad.data(), p.grad.data() + p.grad.size(), T(0));
  }

 private:
  void check_index(std::size_t i, const char* call) const {
    DR2NET_CHECK(i < params_.size(), call, ": parameter index ", i, " out of range (the optimizer holds ",
                 params_.size(), " parameters)");
  }
  static void check_options(const AdamWOptions& o) {
    DR2NET_CHECK(std::isfinite(o.lr) && o.lr >= 0, "AdamW: learning rate must be finite and >= 0, got ", o.lr);
    DR2NET_CHECK(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1, "AdamW: betas must lie in [0, 1), got ",
                 o.beta1, " and ", o.beta2);
    DR2NET_CHECK(std::isfinite(o.eps) && o.eps > 0, "AdamW: eps must be positive, got ", o.eps);
    DR2NET_CHECK(std::isfinite(o.weight_decay) && o.weight_decay >= 0, "AdamW: weight_decay must be >= 0, got ",
                 o.weight_decay);
  }

  std::vector<NamedParameter<T>> params_;
  AdamWOptions options_;
  std::vector<bool> decays_;
  std::vector<HostBuffer<T>> m_, v_;
  std::int64_t t_ = 0;
  MovedFromGuard moved_;
};

//! Scales all gradients together so that their global L2 norm, sqrt(sum over every element
//! of every gradient of g^2), is at most max_norm: g *= max_norm / (norm + 1e-6) when
//! norm > max_norm (the 1e-6 as in PyTorch's clip_grad_norm_). Returns the norm before
//! clipping. A non-finite norm is returned with the gradients left as they are, for the
//! caller to handle (skip the step, stop).
template <class T>
double clip_grad_norm(const std::vector<NamedParameter<T>>& params, double max_norm) {
  DR2NET_CHECK(std::isfinite(max_norm) && max_norm > 0, "clip_grad_norm: max_norm must be positive, got ", max_norm);
  double sum = 0;
  for (const auto& p : params)
    for (std::size_t k = 0; k < p.grad.size(); ++k) {
      const double g = static_cast<double>(p.grad.data()[k]);
      sum += g * g;
    }
  const double norm = std::sqrt(sum);
  if (!std::isfinite(norm) || norm <= max_norm) return norm;
  const auto scale = static_cast<T>(max_norm / (norm + 1e-6));
  for (const auto& p : params)
    for (std::size_t k = 0; k < p.grad.size(); ++k) p.grad.data()[k] *= scale;
  return norm;
}

}  // namespace dr2net::optim
