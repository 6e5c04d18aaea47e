#pragma once
// A small ViT image classifier: VitEmbedding -> ReversibleStack of timm ViT layers -> VitHead,
// with every activation buffer taken from one HostContext so its meter sees the whole model,
// and timm-named safetensors checkpoints.

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <dr2net/dr2net.hpp>
#include <dr2net/io/checkpoint.hpp>
#include <dr2net/io/safetensors.hpp>
#include <dr2net/modules/vit.hpp>
#include <dr2net/modules/vit_classifier_ends.hpp>

namespace example {

// One layer type per precision policy: the schedule is chosen at run time, so standard
// finetuning at a constant (1, 0) and Dr²Net's moving schedule train through the same code.
// dr2net::Fp32 keeps the streams in fp32; dr2net::FixedFp32 keeps them in fixed point, which
// makes reversible backprop exact (the functions compute in fp32 either way).
template <class Precision>
using Layer = dr2net::VitLayer<float, dr2net::AnySchedule, Precision>;
template <class Precision>
using Stack = dr2net::ReversibleStack<Layer<Precision>>;

struct ModelConfig {
  std::int64_t image = 28, channels = 1, patch = 7;
  std::int64_t dim = 64, heads = 4, hidden = 128;
  int layers = 4;
  std::int64_t classes = 5;
};

struct StepResult {
  double loss = 0;
  std::int64_t correct = 0;
};

// train_step's default: no data-parallel driver.
struct NoDriver {
  void mark_ready(int) {}
};

template <class Precision = dr2net::Fp32>
class VitClassifier {
  // The stack's input and output are fp32 views whatever the streams are stored in.
  static_assert(std::is_same_v<typename Stack<Precision>::value_type, float>, "an fp32 classifier");

 public:
  VitClassifier(dr2net::HostContext& ctx, const ModelConfig& c, dr2net::AnySchedule schedule,
                dr2net::StackOptions options, std::uint64_t seed)
      : ctx_(&ctx), config_(c),
        embedding_(ctx, {c.channels, c.image, c.image, c.patch, c.dim}, dr2net::mix_seed(seed, 1000)),
        stack_(ctx, dr2net::make_vit_layers<float, dr2net::AnySchedule, Precision>(c.layers, c.dim, c.heads, c.hidden,
                                                                                   1e-6, 0.0, seed),
               std::move(schedule), std::move(options)),
        head_(ctx, {c.dim, c.classes, 1e-6}, dr2net::mix_seed(seed, 1001)) {}

  const ModelConfig& config() const { return config_; }
  Stack<Precision>& stack() { return stack_; }
  dr2net::VitEmbedding<float>& embedding() { return embedding_; }
  dr2net::VitHead<float>& head() { return head_; }

  // Every parameter: embedding, blocks, head (the order of a timm state dict).
  std::vector<dr2net::NamedParameter<float>> parameters() {
    std::vector<dr2net::NamedParameter<float>> all;
    dr2net::append_parameters(all, embedding_);
    dr2net::append_parameters(all, stack_);
    dr2net::append_parameters(all, head_);
    return all;
  }

  // Registers every parameter with a data-parallel driver (dr2net::distributed::DataParallel)
  // in the order the backward finishes them: the head, the stack's layers L-1, ..., 0 (the
  // stack's hook marks each ready as its backward ends), the embedding. `sample_offset` is the
  // global index of this rank's first sample in every batch (the masks' key). train_step(...,
  // &dp) then marks the head and the embedding; detach() undoes the registration's hook.
  template <class DP>
  void attach(DP& dp, std::uint64_t sample_offset) {
    std::vector<dr2net::NamedParameter<float>> head, embedding;
    dr2net::append_parameters(head, head_);
    dr2net::append_parameters(embedding, embedding_);
    head_group_ = dp.add_group("head", std::move(head));
    dp.add_stack(stack_, sample_offset);
    embedding_group_ = dp.add_group("embedding", std::move(embedding));
  }
  void detach() {
    stack_.set_layer_backward_hook({});
    stack_.set_sample_offset(0);
    head_group_ = embedding_group_ = -1;
  }

  // Forward and backward of one batch of images [B, C, H, W] at `step`; parameter gradients
  // accumulate (zero them first). Returns the mean loss and the number of correct predictions.
  // With a driver (attach()), each part's gradients are handed to it as its backward ends.
  template <class DP = NoDriver>
  StepResult train_step(std::span<const float> images, std::span<const std::int32_t> labels, std::int64_t step,
                        DP* dp = nullptr) {
    const auto B = static_cast<std::int64_t>(labels.size());
    prepare(B);
    const dr2net::Shape tokens{B, embedding_.num_tokens(), config_.dim};
    embedding_.forward(image_view(images, B), h0_.view(tokens));
    stack_.forward(h0_.view(tokens), out_.view(tokens), step);
    head_.forward(out_.view(tokens), logits_.view({B, config_.classes}));
    StepResult r;
    r.loss = dr2net::softmax_cross_entropy<float>(logits_.view({B, config_.classes}), labels,
                                                  dlogits_.view({B, config_.classes}));
    r.correct = dr2net::count_correct<float>(logits_.view({B, config_.classes}), labels);
    std::fill(dout_.data(), dout_.data() + tokens.numel(), 0.0f);  // the head accumulates into it
    head_.backward(dlogits_.view({B, config_.classes}), dout_.view(tokens));
    if (dp != nullptr) dp->mark_ready(head_group_);
    stack_.backward(dout_.view(tokens), dh0_.view(tokens), h0_.view(tokens));  // h0: reconstruction monitor
    embedding_.backward(dh0_.view(tokens));
    if (dp != nullptr) dp->mark_ready(embedding_group_);
    return r;
  }

  // Correct predictions on a batch, inference only, with the coefficients of `step`.
  std::int64_t predict_correct(std::span<const float> images, std::span<const std::int32_t> labels, std::int64_t step) {
    const auto B = static_cast<std::int64_t>(labels.size());
    prepare(B);
    const dr2net::Shape tokens{B, embedding_.num_tokens(), config_.dim};
    embedding_.forward(image_view(images, B), h0_.view(tokens));
    stack_.predict(h0_.view(tokens), out_.view(tokens), step);
    head_.forward(out_.view(tokens), logits_.view({B, config_.classes}));
    return dr2net::count_correct<float>(logits_.view({B, config_.classes}), labels);
  }

  // Everything as one timm-named checkpoint (blocks.{i}.*, patch_embed.*, cls_token, pos_embed,
  // norm.*, head.*), with num_heads in the metadata for infer_timm_vit_config.
  void save(const std::string& path) {
    dr2net::io::SafetensorsWriter w;
    dr2net::io::save_parameters(embedding_, w, dr2net::io::DType::F32);
    dr2net::io::save_parameters(stack_, w, dr2net::io::DType::F32);
    dr2net::io::save_parameters(head_, w, dr2net::io::DType::F32);
    w.set_metadata("num_heads", std::to_string(config_.heads));
    w.set_metadata("architecture", "timm VisionTransformer, class-token pooling");
    w.write_file(path);
  }

  // Loads everything but the classifier (head.*) from `file`: the backbone and the final norm.
  // All three parts are checked before any is loaded, so a bad checkpoint changes nothing.
  void load_backbone(const dr2net::io::SafetensorsReader& file) {
    FinalNorm norm{head_};
    dr2net::io::check_parameters(embedding_, file);
    dr2net::io::check_parameters(stack_, file);
    dr2net::io::check_parameters(norm, file);
    dr2net::io::load_parameters(embedding_, file);
    dr2net::io::load_parameters(stack_, file);
    dr2net::io::load_parameters(norm, file);
  }

 private:
  // The final norm's tensors alone, in the (name, value, grad) form load_parameters takes.
  struct FinalNorm {
    dr2net::VitHead<float>& head;
    template <class V>
    void for_each_parameter(V&& visit) {
      head.norm().for_each_parameter_object([&](dr2net::Parameter<float>& p) { p.visit(visit); });
    }
  };

  // The images as [B, C, H, W] of this model's configuration; a batch of another size (images
  // of another resolution or channel count) is refused before the embedding reads it.
  dr2net::ConstView<float> image_view(std::span<const float> images, std::int64_t B) const {
    const dr2net::Shape shape{B, config_.channels, config_.image, config_.image};
    DR2NET_CHECK(images.size() == static_cast<std::size_t>(shape.numel()), "VitClassifier: a batch of ", B,
                 " images holds ", images.size(), " values, but this model takes ", shape, " (",
                 config_.channels, " channel(s) of ", config_.image, "x", config_.image, ")");
    return dr2net::ConstView<float>(images.data(), shape);
  }

  // Activation buffers of the ends, sized for the largest batch seen and metered: the stack's
  // input h0 and output, the gradients flowing between the parts, the logits.
  void prepare(std::int64_t B) {
    const auto n = static_cast<std::size_t>(B * embedding_.num_tokens() * config_.dim);
    const auto k = static_cast<std::size_t>(B * config_.classes);
    ctx_->reserve(h0_, n, dr2net::MemoryCategory::SavedActivations);
    ctx_->reserve(out_, n, dr2net::MemoryCategory::SavedActivations);
    ctx_->reserve(dout_, n, dr2net::MemoryCategory::Scratch);
    ctx_->reserve(dh0_, n, dr2net::MemoryCategory::Scratch);
    ctx_->reserve(logits_, k, dr2net::MemoryCategory::SavedActivations);
    ctx_->reserve(dlogits_, k, dr2net::MemoryCategory::Scratch);
  }

  dr2net::HostContext* ctx_;
  ModelConfig config_;
  dr2net::VitEmbedding<float> embedding_;
  Stack<Precision> stack_;
  dr2net::VitHead<float> head_;
  dr2net::HostBuffer<float> h0_, out_, dout_, dh0_, logits_, dlogits_;
  int head_group_ = -1, embedding_group_ = -1;  // the driver's groups (attach())
};

// The model sizes a checkpoint written by save() describes: blocks from
// infer_timm_vit_config, image and patch sizes from patch_embed.proj.weight [D, C, P, P] and
// pos_embed [1, 1 + (image / P)^2, D] (square images), classes from head.weight [K, D].
inline ModelConfig infer_model_config(const dr2net::io::SafetensorsReader& file) {
  const auto blocks = dr2net::io::infer_timm_vit_config(file);
  ModelConfig c;
  c.layers = blocks.num_layers;
  c.dim = blocks.dim;
  c.heads = blocks.num_heads;
  c.hidden = blocks.hidden;
  const auto& w = file.record("patch_embed.proj.weight").shape;
  const auto& pos = file.record("pos_embed").shape;
  const auto& head = file.record("head.weight").shape;
  DR2NET_CHECK(w.size() == 4 && w[0] == c.dim && w[2] == w[3], "patch_embed.proj.weight has shape ",
               dr2net::io::format_shape(w), ", expected [", c.dim, ", C, P, P]");
  DR2NET_CHECK(pos.size() == 3 && pos[0] == 1 && pos[2] == c.dim && pos[1] >= 2, "pos_embed has shape ",
               dr2net::io::format_shape(pos), ", expected [1, 1 + patches, ", c.dim, "]");
  DR2NET_CHECK(head.size() == 2 && head[1] == c.dim, "head.weight has shape ", dr2net::io::format_shape(head),
               ", expected [classes, ", c.dim, "]");
  c.channels = w[1];
  c.patch = w[2];
  const auto grid = static_cast<std::int64_t>(std::llround(std::sqrt(static_cast<double>(pos[1] - 1))));
  DR2NET_CHECK(grid * grid == pos[1] - 1, "pos_embed holds ", pos[1] - 1, " patch positions, not a square grid");
  c.image = grid * c.patch;
  c.classes = head[0];
  return c;
}

}  // namespace example
