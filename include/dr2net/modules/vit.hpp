#pragma once
//! \file
//! Umbrella for the ready residual functions, plus the ViT layer type and a builder for a
//! stack of them: layer i is timm's Block i, F = VitAttention, G = VitMlp, with parameter
//! names blocks.{i}.norm1.weight ... blocks.{i}.mlp.fc2.bias inside a ReversibleStack.

#include <cstdint>
#include <vector>

#include "dr2net/block/reversible_dual_residual.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/modules/drop.hpp"
#include "dr2net/modules/layer_norm.hpp"
#include "dr2net/modules/linear.hpp"
#include "dr2net/modules/parameter.hpp"
#include "dr2net/modules/vit_attention.hpp"
#include "dr2net/modules/vit_mlp.hpp"
#include "dr2net/precision/precision.hpp"
#include "dr2net/schedule/coefficients.hpp"

namespace dr2net {

//! One pretrained ViT block as a Dr²Net layer, computing in T.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>>
using VitLayer = ReversibleDualResidual<VitAttention<T>, VitMlp<T>, ScheduleT, PrecisionT>;

//! timm's name for the same thing.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>>
using VitBlock = VitLayer<T, ScheduleT, PrecisionT>;

//! How the drop-path rate is spread over the layers.
enum class DropPathRule {
  Linear,   //!< timm: layer i of L gets rate * i / (L - 1) (0 for the first layer and when L = 1)
  Uniform,  //!< every layer gets the rate
};

//! Sizes and rates of every layer of a ViT stack.
struct VitLayerConfig {
  std::int64_t dim = 0;        //!< D
  std::int64_t num_heads = 0;  //!< H; must divide D
  std::int64_t hidden = 0;     //!< MLP hidden width (4D in ViT)
  double eps = 1e-6;           //!< both LayerNorms' epsilon
  double drop_path = 0.0;      //!< stochastic-depth rate, spread by drop_path_rule
  double proj_drop = 0.0;      //!< dropout rate of attention's output and of the MLP (timm's proj_drop_rate)
  DropPathRule drop_path_rule = DropPathRule::Linear;  //!< how drop_path is spread over the layers (see vit_drop_path_rate)
};

//! The drop-path rate of layer `layer` of `num_layers` under `config`.
inline double vit_drop_path_rate(const VitLayerConfig& config, int layer, int num_layers) {
  if (config.drop_path_rule == DropPathRule::Uniform) return config.drop_path;
  if (num_layers <= 1) return 0.0;
  return config.drop_path * static_cast<double>(layer) / static_cast<double>(num_layers - 1);
}

//! `num_layers` ViT layers with weights initialised as timm does, layer i from
//! mix_seed(seed, i). Load pretrained tensors afterwards with f().load / g().load.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>>
std::vector<VitLayer<T, ScheduleT, PrecisionT>> make_vit_layers(int num_layers, const VitLayerConfig& config,
                                                                std::uint64_t seed = 0) {
  DR2NET_CHECK(num_layers > 0, "make_vit_layers: the number of layers must be positive, got ", num_layers);
  check_drop_rate(config.drop_path, "drop_path", "make_vit_layers");
  std::vector<VitLayer<T, ScheduleT, PrecisionT>> layers;
  layers.reserve(static_cast<std::size_t>(num_layers));
  for (int i = 0; i < num_layers; ++i) {
    const double dp = vit_drop_path_rate(config, i, num_layers);
    const std::uint64_t s = mix_seed(seed, static_cast<std::uint64_t>(i));
    layers.emplace_back(VitAttention<T>({config.dim, config.num_heads, config.eps, dp, config.proj_drop}, s),
                        VitMlp<T>({config.dim, config.hidden, config.eps, dp, config.proj_drop}, s));
  }
  return layers;
}

//! Shorthand: drop-path rate spread linearly as timm does, no dropout.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>>
std::vector<VitLayer<T, ScheduleT, PrecisionT>> make_vit_layers(int num_layers, std::int64_t dim,
                                                                std::int64_t num_heads, std::int64_t hidden,
                                                                double eps = 1e-6, double drop_path = 0.0,
                                                                std::uint64_t seed = 0) {
  return make_vit_layers<T, ScheduleT, PrecisionT>(
      num_layers, VitLayerConfig{dim, num_heads, hidden, eps, drop_path, 0.0, DropPathRule::Linear}, seed);
}

}  // namespace dr2net
