#pragma once
// A tiny ViT classifier (patch embedding -> reversible stack of timm ViT layers with
// drop-path and dropout -> head) and its data, for the data-parallel tests: every rank builds
// the same model from one seed and draws the same global batch, then trains on its shard.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "dr2net/distributed/data_parallel.hpp"
#include "dr2net/dr2net.hpp"
#include "dr2net/modules/vit.hpp"
#include "dr2net/modules/vit_classifier_ends.hpp"

namespace dr2net::testing {

//! The four ways of training a stack the data-parallel tests cover.
enum class DpMode { Reversible, Exact, ErrorBounded, Standard };

inline const char* dp_mode_name(DpMode m) {
  switch (m) {
    case DpMode::Reversible: return "reversible";
    case DpMode::Exact: return "exact";
    case DpMode::ErrorBounded: return "error-bounded";
    case DpMode::Standard: return "standard";
  }
  return "?";
}

struct TinyVitConfig {
  std::int64_t image = 8, patch = 4, dim = 16, heads = 2, hidden = 32, classes = 3;
  int layers = 3;
  double drop_path = 0.3, dropout = 0.1;
};

//! The schedule and stack options of a mode.
inline AnySchedule dp_schedule(DpMode m) {
  switch (m) {
    case DpMode::Reversible: return AnySchedule(ConstantSchedule(0.0, 1.0));
    case DpMode::Exact: return AnySchedule(ConstantSchedule(1.0, 0.5));
    case DpMode::ErrorBounded: return AnySchedule(ConstantSchedule(1.0, 0.5));
    case DpMode::Standard: return AnySchedule(ConstantSchedule(1.0, 0.0));
  }
  return AnySchedule(ConstantSchedule(0.0, 1.0));
}
inline StackOptions dp_stack_options(DpMode m, std::uint64_t seed) {
  StackOptions o;
  o.seed = seed;
  o.mode = m == DpMode::Standard ? BackpropMode::Standard
           : m == DpMode::ErrorBounded ? BackpropMode::ErrorBounded
                                       : BackpropMode::Reversible;
  return o;
}

//! Embedding -> stack -> head on one HostContext. Precision: Fp32 or FixedFp32.
template <class Precision>
class TinyVit {
 public:
  using Layer = VitLayer<float, AnySchedule, Precision>;
  using Stack = ReversibleStack<Layer>;

  TinyVit(HostContext& ctx, const TinyVitConfig& c, DpMode mode, std::uint64_t seed)
      : ctx_(&ctx), c_(c),
        embedding_(ctx, {1, c.image, c.image, c.patch, c.dim}, mix_seed(seed, 1000)),
        stack_(ctx,
               make_vit_layers<float, AnySchedule, Precision>(
                   c.layers, VitLayerConfig{c.dim, c.heads, c.hidden, 1e-6, c.drop_path, c.dropout, DropPathRule::Uniform},
                   seed),
               dp_schedule(mode), dp_stack_options(mode, seed)),
        head_(ctx, {c.dim, c.classes, 1e-6}, mix_seed(seed, 1001)) {}

  Stack& stack() { return stack_; }
  std::int64_t tokens() const { return embedding_.num_tokens(); }

  std::vector<NamedParameter<float>> parameters() {
    std::vector<NamedParameter<float>> all;
    append_parameters(all, embedding_);
    append_parameters(all, stack_);
    append_parameters(all, head_);
    return all;
  }
  void zero_grad() {
    for (auto& p : parameters()) std::fill(p.grad.data(), p.grad.data() + p.grad.size(), 0.0f);
  }

  //! Registers head, stack layers and embedding with `dp` in backward order.
  template <class DP>
  void attach(DP& dp, std::uint64_t sample_offset) {
    std::vector<NamedParameter<float>> head, emb;
    append_parameters(head, head_);
    append_parameters(emb, embedding_);
    head_group_ = dp.add_group("head", head);
    dp.add_stack(stack_, sample_offset);
    embedding_group_ = dp.add_group("embedding", emb);
  }

  //! One forward and backward of images [B, 1, image, image] at `step`, gradients accumulated;
  //! with a driver the groups are marked as their backward finishes. Returns the mean loss.
  template <class DP = distributed::DataParallel<distributed::LocalCommunicator, HostContext>>
  double train_step(std::span<const float> images, std::span<const std::int32_t> labels, std::int64_t step,
                    DP* dp = nullptr, double* stack_backward_end = nullptr) {
    const auto B = static_cast<std::int64_t>(labels.size());
    const Shape tok{B, tokens(), c_.dim};
    const auto n = static_cast<std::size_t>(tok.numel());
    h0_.assign(n, 0.f);
    out_.assign(n, 0.f);
    dout_.assign(n, 0.f);
    dh0_.assign(n, 0.f);
    logits_.assign(static_cast<std::size_t>(B * c_.classes), 0.f);
    dlogits_ = logits_;
    embedding_.forward(ConstView<float>(images.data(), {B, 1, c_.image, c_.image}), TensorView<float>(h0_.data(), tok));
    stack_.forward(ConstView<float>(h0_.data(), tok), TensorView<float>(out_.data(), tok), step);
    head_.forward(ConstView<float>(out_.data(), tok), TensorView<float>(logits_.data(), {B, c_.classes}));
    const double loss = softmax_cross_entropy<float>(ConstView<float>(logits_.data(), {B, c_.classes}), labels,
                                                     TensorView<float>(dlogits_.data(), {B, c_.classes}));
    head_.backward(ConstView<float>(dlogits_.data(), {B, c_.classes}), TensorView<float>(dout_.data(), tok));
    if (dp) dp->mark_ready(head_group_);
    stack_.backward(ConstView<float>(dout_.data(), tok), TensorView<float>(dh0_.data(), tok),
                    ConstView<float>(h0_.data(), tok));
    if (dp && stack_backward_end) *stack_backward_end = dp->elapsed();
    embedding_.backward(ConstView<float>(dh0_.data(), tok));
    if (dp) dp->mark_ready(embedding_group_);
    return loss;
  }

 private:
  HostContext* ctx_;
  TinyVitConfig c_;
  VitEmbedding<float> embedding_;
  Stack stack_;
  VitHead<float> head_;
  int head_group_ = -1, embedding_group_ = -1;
  std::vector<float> h0_, out_, dout_, dh0_, logits_, dlogits_;
};

//! A global batch of `batch` random images and labels for `step` (the same on every rank).
struct Batch {
  std::vector<float> images;
  std::vector<std::int32_t> labels;
  std::int64_t size = 0, pixels = 0;

  std::span<const float> images_of(std::int64_t begin, std::int64_t end) const {
    return std::span<const float>(images).subspan(static_cast<std::size_t>(begin * pixels),
                                                  static_cast<std::size_t>((end - begin) * pixels));
  }
  std::span<const std::int32_t> labels_of(std::int64_t begin, std::int64_t end) const {
    return std::span<const std::int32_t>(labels).subspan(static_cast<std::size_t>(begin),
                                                         static_cast<std::size_t>(end - begin));
  }
};
inline Batch make_batch(const TinyVitConfig& c, std::int64_t batch, std::uint64_t seed) {
  Batch b;
  b.size = batch;
  b.pixels = c.image * c.image;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  b.images.resize(static_cast<std::size_t>(batch * b.pixels));
  for (auto& v : b.images) v = n(rng);
  std::uniform_int_distribution<std::int32_t> cls(0, static_cast<std::int32_t>(c.classes - 1));
  b.labels.resize(static_cast<std::size_t>(batch));
  for (auto& l : b.labels) l = cls(rng);
  return b;
}

//! The largest |a - b| over a tensor relative to its largest |b| (absolute where that is 0).
inline double max_rel_diff(const float* a, const float* b, std::size_t n) {
  double d = 0, m = 0;
  for (std::size_t i = 0; i < n; ++i) {
    d = std::max(d, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    m = std::max(m, std::abs(static_cast<double>(b[i])));
  }
  return m > 0 ? d / m : d;
}

}  // namespace dr2net::testing
