#pragma once
//! \file
//! VitHead<T>: the output end of a timm ViT classifier with class-token pooling,
//!
//!   logits[b] = W_head LayerNorm(tokens[b, 0]) + b_head
//!
//! timm normalises every token (`norm`) and then pools token 0; LayerNorm works per token,
//! so normalising the class token alone gives the same logits and the same gradients (the
//! other tokens receive none). Tensors keep timm's names: norm.weight, norm.bias [D],
//! head.weight [K, D], head.bias [K].
//!
//! Like VitEmbedding, it stores its activations as usual: forward saves the class-token rows,
//! their normalised form and the row statistics in a buffer taken from the context as
//! MemoryCategory::SavedActivations; weights and gradients are recorded as Parameters and
//! Gradients.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/modules/layer_norm.hpp"
#include "dr2net/modules/linear.hpp"
#include "dr2net/modules/parameter.hpp"

namespace dr2net {

//! Sizes of a ViT classifier's output end.
struct VitHeadConfig {
  std::int64_t dim = 0;          //!< D, the token width
  std::int64_t num_classes = 0;  //!< K
  double eps = 1e-6;             //!< the final LayerNorm's epsilon (timm's ViT: 1e-6)
};

//! The host classifier end of a ViT (final LayerNorm on the class token, then a Linear to K
//! logits), outside the reversible stack: it keeps its own saved activations between one
//! forward() and one backward(). Holds a pointer to the HostContext it was built with, which
//! must outlive it. Not thread-safe.
//! \tparam T compute type (float or double).
template <class T>
class VitHead {
 public:
  //! Validates the sizes, records parameter and gradient bytes in ctx's meter and
  //! initialises as timm does: norm weight 1, bias 0; head weight trunc_normal(std 0.02),
  //! bias 0, from `seed`.
  VitHead(HostContext& ctx, const VitHeadConfig& config, std::uint64_t seed = 0)
      : ctx_(&ctx), config_(validated(config)), norm_("norm", config.dim, config.eps),
        head_("head", config.dim, config.num_classes) {
    head_.init(seed, 0);
    meter_parameters();
  }

  //! The validated configuration; num_classes follows reset_classifier().
  const VitHeadConfig& config() const noexcept { return config_; }
  //! K, the number of logits per image (the width of forward()'s output).
  std::int64_t num_classes() const noexcept { return config_.num_classes; }
  //! The final LayerNorm "norm" over width D, applied to the class token.
  LayerNorm<T>& norm() noexcept { return norm_; }
  //! The classifier Linear "head", D -> K. Replaced (not resized) by reset_classifier().
  Linear<T>& head() noexcept { return head_; }

  //! Replaces the classifier with a freshly initialised one of `num_classes` outputs and
  //! keeps the final norm (timm's reset_classifier): finetuning on new classes.
  void reset_classifier(std::int64_t num_classes, std::uint64_t seed) {
    DR2NET_CHECK(num_classes > 0, "VitHead reset_classifier: num_classes must be positive, got ", num_classes);
    config_.num_classes = num_classes;
    head_ = Linear<T>("head", config_.dim, num_classes);
    head_.init(seed, 0);
    meter_parameters();
    pending_ = false;
  }

  //! logits [B, K] from tokens [B, N, D]. Saves what one backward() needs.
  void forward(ConstView<T> tokens, TensorView<T> logits) {
    const Shape& s = tokens.shape();
    DR2NET_CHECK(s.rank() == 3 && s[0] > 0 && s[1] > 0 && s[2] == config_.dim, "VitHead forward: tokens have shape ",
                 s, ", expected [batch > 0, tokens > 0, ", config_.dim, "]");
    check_contiguous(tokens, "VitHead forward: tokens");
    const std::int64_t B = s[0], N = s[1], D = config_.dim;
    check_contiguous(logits, "VitHead forward: logits");
    check_shape(logits, Shape{B, config_.num_classes}, "VitHead forward: logits");
    const auto saved = checked::mul(B, checked::add(checked::mul(2, D, "VitHead saved: 2 x dim"), 2, "VitHead saved"),
                                    "VitHead saved internals (batch x (2 dim + 2))");
    ctx_->reserve(saved_, checked::to_size(saved, "VitHead saved internals"), MemoryCategory::SavedActivations,
                  "VitHead saved internals");
    T *x = saved_.data(), *xn = x + B * D, *mean = xn + B * D, *rstd = mean + B;
    for (std::int64_t b = 0; b < B; ++b) std::copy_n(tokens.data() + b * N * D, D, x + b * D);  // class tokens
    norm_.forward(*ctx_, x, B, xn, mean, rstd);
    head_.forward(*ctx_, xn, B, logits.data());
    batch_ = B;
    tokens_ = N;
    pending_ = true;
  }

  //! Backward of the last forward given grad_logits = dL/dlogits [B, K]: parameter gradients
  //! accumulate, and grad_tokens [B, N, D] += dL/dtokens (non-zero only at token 0).
  void backward(ConstView<T> grad_logits, TensorView<T> grad_tokens) {
    DR2NET_CHECK(pending_, "VitHead backward() without a preceding forward() (or called twice)");
    pending_ = false;
    const std::int64_t B = batch_, N = tokens_, D = config_.dim;
    check_contiguous(grad_logits, "VitHead backward: grad_logits");
    check_shape(grad_logits, Shape{B, config_.num_classes}, "VitHead backward: grad_logits");
    check_contiguous(grad_tokens, "VitHead backward: grad_tokens");
    check_shape(grad_tokens, Shape{B, N, D}, "VitHead backward: grad_tokens");
    const T *x = saved_.data(), *xn = x + B * D, *mean = xn + B * D, *rstd = mean + B;
    HostBuffer<T> dxn = ctx_->allocate<T>(static_cast<std::size_t>(B * D), MemoryCategory::Scratch);
    head_.backward(*ctx_, xn, grad_logits.data(), B, dxn.data());  // dxn = dlogits W (written)
    for (std::int64_t b = 0; b < B; ++b)  // one row at a time: class tokens are N rows apart
      norm_.backward(*ctx_, x + b * D, mean + b, rstd + b, dxn.data() + b * D, 1, grad_tokens.data() + b * N * D);
  }

  //! visit(name, value, grad) for norm.weight, norm.bias, head.weight, head.bias.
  template <class V>
  void for_each_parameter(V&& visit) {
    for_each_parameter_object([&](Parameter<T>& p) { p.visit(visit); });
  }

  //! fn(Parameter<T>&) in the order of for_each_parameter.
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    norm_.for_each_parameter_object(fn);
    head_.for_each_parameter_object(fn);
  }

  //! Sets every parameter gradient to zero.
  void zero_grad() {
    for_each_parameter_object([](Parameter<T>& p) {
      std::fill(p.grad_data(), p.grad_data() + p.size(), T(0));
    });
  }

  //! Frees the saved activations (a pending forward is discarded).
  void release_workspace() {
    saved_.reset();
    pending_ = false;
  }

 private:
  static VitHeadConfig validated(const VitHeadConfig& c) {
    DR2NET_CHECK(c.dim > 0 && c.num_classes > 0, "VitHead: dim and num_classes must be positive, got ", c.dim,
                 " and ", c.num_classes);
    return c;
  }

  void meter_parameters() {
    parameter_bytes_ = MeterReservation();  // release first, so a replaced head is never counted twice
    gradient_bytes_ = MeterReservation();
    std::size_t bytes = 0;
    for_each_parameter_object([&](Parameter<T>& p) { bytes += p.bytes(); });
    parameter_bytes_ = ctx_->reserve_bytes(MemoryCategory::Parameters, bytes, "VitHead parameters");
    gradient_bytes_ = ctx_->reserve_bytes(MemoryCategory::Gradients, bytes, "VitHead parameter gradients");
  }

  HostContext* ctx_;
  VitHeadConfig config_;
  LayerNorm<T> norm_;
  Linear<T> head_;
  MeterReservation parameter_bytes_, gradient_bytes_;
  HostBuffer<T> saved_;
  std::int64_t batch_ = 0, tokens_ = 0;
  bool pending_ = false;
};

}  // namespace dr2net
