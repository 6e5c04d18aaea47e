#pragma once
//! \file
//! VitEmbedding<T>: the input end of a timm ViT classifier, turning images into the token
//! stream a ReversibleStack of ViT layers takes,
//!
//!   tokens[b, 0]     = cls_token + pos_embed[0]
//!   tokens[b, 1 + p] = W vec(patch_p(image_b)) + bias + pos_embed[1 + p]
//!
//! where patch_p is the p-th non-overlapping P x P patch (row-major over the patch grid) of a
//! C x H x W image, flattened in (channel, row, column) order. That order makes the weight
//! [D, C, P, P] exactly timm's Conv2d patch_embed.proj (kernel = stride = P), so its tensors
//! keep timm's names: cls_token [1, 1, D], pos_embed [1, 1 + num_patches, D],
//! patch_embed.proj.weight [D, C, P, P], patch_embed.proj.bias [D].
//!
//! Unlike residual functions inside the stack, this module keeps its activations as usual:
//! forward saves the flattened patches (what the weight gradient needs) in a buffer taken
//! from the context as MemoryCategory::SavedActivations, so the meter counts it. Its weights
//! and gradients are recorded as Parameters and Gradients for as long as it lives.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "dr2net/backend/host/context.hpp"
#include "dr2net/backend/host/gemm.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/modules/parameter.hpp"

namespace dr2net {

//! Image and embedding sizes of a ViT's input end.
struct VitEmbeddingConfig {
  std::int64_t channels = 1;    //!< C
  std::int64_t height = 0;      //!< H, a multiple of patch
  std::int64_t width = 0;       //!< W, a multiple of patch
  std::int64_t patch = 0;       //!< P: patches are P x P and do not overlap
  std::int64_t dim = 0;         //!< D, the token width
};

//! The host patch embedding of a ViT: images [B, C, H, W] -> tokens [B, 1 + num_patches, D]
//! (the formula and tensor names are in the file comment). Outside the reversible stack, it
//! keeps its own saved activations between one forward() and one backward(). Holds a pointer
//! to the HostContext it was built with, which must outlive it. Not thread-safe.
//! \tparam T compute type (float or double).
template <class T>
class VitEmbedding {
 public:
  //! Validates the sizes; records parameter and gradient bytes in ctx's meter; initialises
  //! the weights (see init()).
  VitEmbedding(HostContext& ctx, const VitEmbeddingConfig& config, std::uint64_t seed = 0)
      : ctx_(&ctx), config_(validated(config)), cls_token_("cls_token", Shape{1, 1, config.dim}),
        pos_embed_("pos_embed", Shape{1, 1 + num_patches(config), config.dim}),
        weight_("patch_embed.proj.weight", Shape{config.dim, config.channels, config.patch, config.patch}),
        bias_("patch_embed.proj.bias", Shape{config.dim}) {
    init(seed);
    std::size_t bytes = 0;
    for_each_parameter_object([&](Parameter<T>& p) { bytes += p.bytes(); });
    parameter_bytes_ = ctx.reserve_bytes(MemoryCategory::Parameters, bytes, "VitEmbedding parameters");
    gradient_bytes_ = ctx.reserve_bytes(MemoryCategory::Gradients, bytes, "VitEmbedding parameter gradients");
  }

  //! timm's initialisation: pos_embed ~ trunc_normal(std 0.02), cls_token ~ normal(std 1e-6);
  //! the projection, a Conv2d that timm leaves to PyTorch's default, gets a (truncated)
  //! normal of the default's variance, 1 / (3 fan_in), and bias 0. Deterministic in seed.
  void init(std::uint64_t seed) {
    const double fan_in = static_cast<double>(patch_elements());
    cls_token_.fill_truncated_normal(1e-6, 2e-6, seed, 0);
    pos_embed_.fill_truncated_normal(0.02, 2.0, seed, 1);
    const double std = 1.0 / std::sqrt(3.0 * fan_in);
    weight_.fill_truncated_normal(std, 2.0 * std, seed, 2);
    bias_.fill(T(0));
  }

  //! The validated image and embedding sizes.
  const VitEmbeddingConfig& config() const noexcept { return config_; }
  //! Patches per image, (H / P) * (W / P), in row-major order over the patch grid.
  std::int64_t num_patches() const noexcept { return num_patches(config_); }
  //! Tokens per image: the class token and one per patch.
  std::int64_t num_tokens() const noexcept { return 1 + num_patches(); }
  //! D, the width of every token (the stream width of the stack that follows).
  std::int64_t dim() const noexcept { return config_.dim; }
  //! C * P * P, the length of a flattened patch.
  std::int64_t patch_elements() const noexcept { return config_.channels * config_.patch * config_.patch; }

  //! tokens [B, 1 + num_patches, D] from images [B, C, H, W] (see the file comment). Saves
  //! the flattened patches for one backward().
  void forward(ConstView<T> images, TensorView<T> tokens) {
    const std::int64_t B = check_images(images, "images");
    check_contiguous(tokens, "VitEmbedding forward: tokens");
    check_shape(tokens, Shape{B, num_tokens(), config_.dim}, "VitEmbedding forward: tokens");
    const std::int64_t Np = num_patches(), D = config_.dim, K = patch_elements();
    ctx_->reserve(patches_, static_cast<std::size_t>(B * Np * K), MemoryCategory::SavedActivations);
    T* cols = patches_.data();
    im2col(images.data(), B, cols);

    const T *cls = cls_token_.data(), *pos = pos_embed_.data(), *bias = bias_.data();
    for (std::int64_t b = 0; b < B; ++b) {
      T* t = tokens.data() + b * (1 + Np) * D;
      for (std::int64_t j = 0; j < D; ++j) t[j] = cls[j] + pos[j];
      for (std::int64_t p = 0; p < Np; ++p)
        for (std::int64_t j = 0; j < D; ++j) t[(1 + p) * D + j] = bias[j] + pos[(1 + p) * D + j];
      // patch tokens += patches_b W^T: Np rows of K times W [D, K] transposed.
      host_gemm<T>(Transpose::No, Transpose::Yes, Np, D, K, T(1), cols + b * Np * K, K, weight_.data(), K, T(1),
                   t + D, D);
    }
    batch_ = B;
    pending_ = true;
  }

  //! Backward of the last forward given grad_tokens = dL/dtokens. Parameter gradients
  //! accumulate; when grad_images is given (non-empty), grad_images += dL/dimages.
  void backward(ConstView<T> grad_tokens, TensorView<T> grad_images = {}) {
    DR2NET_CHECK(pending_, "VitEmbedding backward() without a preceding forward() (or called twice)");
    pending_ = false;
    const std::int64_t B = batch_, Np = num_patches(), D = config_.dim, K = patch_elements();
    check_contiguous(grad_tokens, "VitEmbedding backward: grad_tokens");
    check_shape(grad_tokens, Shape{B, num_tokens(), D}, "VitEmbedding backward: grad_tokens");
    const T* cols = patches_.data();
    T *gcls = cls_token_.grad_data(), *gpos = pos_embed_.grad_data(), *gb = bias_.grad_data();
    for (std::int64_t b = 0; b < B; ++b) {
      const T* g = grad_tokens.data() + b * (1 + Np) * D;
      for (std::int64_t j = 0; j < D; ++j) gcls[j] += g[j];
      for (std::int64_t t = 0; t < (1 + Np) * D; ++t) gpos[t] += g[t];
      for (std::int64_t p = 0; p < Np; ++p)
        for (std::int64_t j = 0; j < D; ++j) gb[j] += g[(1 + p) * D + j];
      // dW [D, K] += dY_b^T patches_b, dY_b the Np patch-token rows of image b.
      host_gemm<T>(Transpose::Yes, Transpose::No, D, K, Np, T(1), g + D, D, cols + b * Np * K, K, T(1),
                   weight_.grad_data(), K);
    }
    if (grad_images.data() == nullptr) return;
    check_images(grad_images, "grad_images");
    DR2NET_CHECK(grad_images.shape()[0] == B, "VitEmbedding backward: grad_images has batch ", grad_images.shape()[0],
                 " but the forward had ", B);
    // d patches = dY W, then scattered back: patches do not overlap, so each pixel gets one term.
    HostBuffer<T> dcols = ctx_->allocate<T>(static_cast<std::size_t>(B * Np * K), MemoryCategory::Scratch);
    for (std::int64_t b = 0; b < B; ++b)
      host_gemm<T>(Transpose::No, Transpose::No, Np, K, D, T(1), grad_tokens.data() + b * (1 + Np) * D + D, D,
                   weight_.data(), K, T(0), dcols.data() + b * Np * K, K);
    col2im_add(dcols.data(), B, grad_images.data());
  }

  //! visit(name, value, grad) for cls_token, pos_embed, patch_embed.proj.weight,
  //! patch_embed.proj.bias (timm's order and names).
  template <class V>
  void for_each_parameter(V&& visit) {
    for_each_parameter_object([&](Parameter<T>& p) { p.visit(visit); });
  }

  //! fn(Parameter<T>&) in the order of for_each_parameter.
  template <class Fn>
  void for_each_parameter_object(Fn&& fn) {
    fn(cls_token_);
    fn(pos_embed_);
    fn(weight_);
    fn(bias_);
  }

  //! Sets every parameter gradient to zero.
  void zero_grad() {
    for_each_parameter_object([](Parameter<T>& p) {
      std::fill(p.grad_data(), p.grad_data() + p.size(), T(0));
    });
  }

  //! Frees the saved patches (a pending forward is discarded).
  void release_workspace() {
    patches_.reset();
    pending_ = false;
  }

 private:
  static std::int64_t num_patches(const VitEmbeddingConfig& c) {
    return (c.height / c.patch) * (c.width / c.patch);
  }

  static VitEmbeddingConfig validated(const VitEmbeddingConfig& c) {
    DR2NET_CHECK(c.channels > 0 && c.height > 0 && c.width > 0 && c.patch > 0 && c.dim > 0,
                 "VitEmbedding: sizes must be positive, got channels ", c.channels, ", image ", c.height, "x",
                 c.width, ", patch ", c.patch, ", dim ", c.dim);
    DR2NET_CHECK(c.height % c.patch == 0 && c.width % c.patch == 0, "VitEmbedding: image ", c.height, "x", c.width,
                 " is not a whole number of ", c.patch, "x", c.patch, " patches");
    // The sizes every later product is bounded by, in checked arithmetic: a patch's length, the
    // patch count, the token table and the projection (a batch's patches are bounded by its images).
    (void)checked::product({c.channels, c.patch, c.patch}, "VitEmbedding: patch length (channels x patch x patch)");
    (void)checked::product({c.channels, c.height, c.width}, "VitEmbedding: image size (channels x height x width)");
    const std::int64_t patches = checked::mul(c.height / c.patch, c.width / c.patch, "VitEmbedding: patch count");
    (void)checked::mul(checked::add(patches, 1, "VitEmbedding: token count (1 + patches)"), c.dim,
                       "VitEmbedding: position table ((1 + patches) x dim)");
    (void)checked::product({c.dim, c.channels, c.patch, c.patch},
                           "VitEmbedding: projection weight (dim x channels x patch x patch)");
    return c;
  }

  //! Checks an images-shaped view [B, C, H, W] (B > 0, contiguous) and returns B.
  template <class U>
  std::int64_t check_images(const TensorView<U>& v, const char* what) const {
    const Shape& s = v.shape();
    DR2NET_CHECK(s.rank() == 4 && s[0] > 0 && s[1] == config_.channels && s[2] == config_.height &&
                     s[3] == config_.width,
                 "VitEmbedding: ", what, " has shape ", s, ", expected [batch > 0, ", config_.channels, ", ",
                 config_.height, ", ", config_.width, "]");
    check_contiguous(v, std::string("VitEmbedding: ") + what);
    return s[0];
  }

  //! cols[(b, p), (c, i, j)] = images[b, c, pr * P + i, pc * P + j], p = pr * (W / P) + pc.
  void im2col(const T* images, std::int64_t B, T* cols) const {
    const std::int64_t C = config_.channels, H = config_.height, W = config_.width, P = config_.patch;
    const std::int64_t gw = W / P, Np = num_patches();
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t p = 0; p < Np; ++p) {
        const std::int64_t r0 = (p / gw) * P, c0 = (p % gw) * P;
        T* dst = cols + (b * Np + p) * patch_elements();
        for (std::int64_t c = 0; c < C; ++c)
          for (std::int64_t i = 0; i < P; ++i) {
            const T* src = images + ((b * C + c) * H + r0 + i) * W + c0;
            std::copy(src, src + P, dst + (c * P + i) * P);
          }
      }
  }

  //! images[b, c, pr * P + i, pc * P + j] += cols[(b, p), (c, i, j)]: im2col's transpose.
  void col2im_add(const T* cols, std::int64_t B, T* images) const {
    const std::int64_t C = config_.channels, H = config_.height, W = config_.width, P = config_.patch;
    const std::int64_t gw = W / P, Np = num_patches();
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t p = 0; p < Np; ++p) {
        const std::int64_t r0 = (p / gw) * P, c0 = (p % gw) * P;
        const T* src = cols + (b * Np + p) * patch_elements();
        for (std::int64_t c = 0; c < C; ++c)
          for (std::int64_t i = 0; i < P; ++i) {
            T* dst = images + ((b * C + c) * H + r0 + i) * W + c0;
            for (std::int64_t j = 0; j < P; ++j) dst[j] += src[(c * P + i) * P + j];
          }
      }
  }

  HostContext* ctx_;
  VitEmbeddingConfig config_;
  Parameter<T> cls_token_, pos_embed_, weight_, bias_;
  MeterReservation parameter_bytes_, gradient_bytes_;
  HostBuffer<T> patches_;
  std::int64_t batch_ = 0;
  bool pending_ = false;
};

}  // namespace dr2net
