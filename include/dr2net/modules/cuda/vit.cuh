#pragma once
//! \file
//! The ViT layer on the device and a builder for a stack of them, mirroring modules/vit.hpp:
//! layer i is timm's Block i with F = CudaVitAttention, G = CudaVitMlp, parameter names
//! blocks.{i}.norm1.weight ... blocks.{i}.mlp.fc2.bias inside a ReversibleStack. The same
//! seed gives the same initial weights as make_vit_layers (they are drawn on the host by
//! the host functions, layer by layer, then copied and converted to T).

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <cstdint>
#include <vector>

#include "dr2net/backend/cuda/cuda.cuh"
#include "dr2net/block/reversible_dual_residual.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/modules/cuda/vit_attention.cuh"
#include "dr2net/modules/cuda/vit_mlp.cuh"
#include "dr2net/modules/vit.hpp"
#include "dr2net/precision/precision.hpp"
#include "dr2net/schedule/coefficients.hpp"

namespace dr2net {

//! One pretrained ViT block as a Dr²Net layer on the device, computing in T.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>>
using CudaVitLayer = ReversibleDualResidual<CudaVitAttention<T>, CudaVitMlp<T>, ScheduleT, PrecisionT>;

//! `num_layers` device ViT layers initialised as make_vit_layers initialises them (layer i
//! from mix_seed(seed, i), drop-path rates spread by config.drop_path_rule). GEMMs may use
//! TF32 when PrecisionT::allow_tf32.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>>
std::vector<CudaVitLayer<T, ScheduleT, PrecisionT>> make_cuda_vit_layers(CudaContext& ctx, int num_layers,
                                                                         const VitLayerConfig& config,
                                                                         std::uint64_t seed = 0) {
  DR2NET_CHECK(num_layers > 0, "make_cuda_vit_layers: the number of layers must be positive, got ", num_layers);
  check_drop_rate(config.drop_path, "drop_path", "make_cuda_vit_layers");
  const CudaFunctionOptions options{PrecisionT::allow_tf32};
  std::vector<CudaVitLayer<T, ScheduleT, PrecisionT>> layers;
  layers.reserve(static_cast<std::size_t>(num_layers));
  for (int i = 0; i < num_layers; ++i) {
    const double dp = vit_drop_path_rate(config, i, num_layers);
    const std::uint64_t s = mix_seed(seed, static_cast<std::uint64_t>(i));
    // One host layer at a time: host memory stays one layer's worth.
    const VitAttention<float> f({config.dim, config.num_heads, config.eps, dp, config.proj_drop}, s);
    const VitMlp<float> g({config.dim, config.hidden, config.eps, dp, config.proj_drop}, s);
    layers.emplace_back(CudaVitAttention<T>(ctx, f, options), CudaVitMlp<T>(ctx, g, options));
  }
  return layers;
}

//! Shorthand: drop-path rate spread linearly as timm does, no dropout.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>>
std::vector<CudaVitLayer<T, ScheduleT, PrecisionT>> make_cuda_vit_layers(CudaContext& ctx, int num_layers,
                                                                         std::int64_t dim, std::int64_t num_heads,
                                                                         std::int64_t hidden, double eps = 1e-6,
                                                                         double drop_path = 0.0, std::uint64_t seed = 0) {
  return make_cuda_vit_layers<T, ScheduleT, PrecisionT>(
      ctx, num_layers, VitLayerConfig{dim, num_heads, hidden, eps, drop_path, 0.0, DropPathRule::Linear}, seed);
}

//! Device copies of host ViT layers (configuration and parameters, converted to T): a host
//! stack and a device stack built from the same layers compute the same function.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>, class U, class HostPrecision>
std::vector<CudaVitLayer<T, ScheduleT, PrecisionT>> cuda_vit_layers_from(
    CudaContext& ctx, const std::vector<VitLayer<U, ScheduleT, HostPrecision>>& host) {
  const CudaFunctionOptions options{PrecisionT::allow_tf32};
  std::vector<CudaVitLayer<T, ScheduleT, PrecisionT>> layers;
  layers.reserve(host.size());
  for (const auto& l : host) layers.emplace_back(CudaVitAttention<T>(ctx, l.f(), options), CudaVitMlp<T>(ctx, l.g(), options));
  return layers;
}

}  // namespace dr2net
