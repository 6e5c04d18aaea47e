#pragma once
//! \file
//! The stages of a timm 0.9 Swin transformer (and of Video Swin) as a Dr²Net backbone: a
//! Stages composition (block/stages.hpp) of one ReversibleStack per stage and a PatchMerging
//! transition at the start of every stage s >= 1,
//!
//!   h0 -> [stage 0: blocks 0..d0-1] -> merge -> [stage 1] -> merge -> ... -> [stage S-1] -> out
//!
//! Stage s has width C_s = 2^s C, heads num_heads[s] and the map (T, H / 2^s, W / 2^s) (Video
//! Swin merges over height and width only). Block j of stage s is timm's SwinTransformerBlock
//! j as a ReversibleDualResidual layer, F = WindowAttention (norm1, shifted-window attention
//! with the relative position bias, proj), G = VitMlp (norm2, fc1, GELU, fc2, hidden
//! int(mlp_ratio C_s)), its window and shift from swin_block_geometry (modules/window.hpp):
//! per axis the window is min(window_size, map) and odd blocks shift by window_size // 2
//! where the map is larger than window_size. At (alpha, beta) = (1, 0) every stack computes
//! h += F(h); h += G(h), so the backbone is exactly the pretrained network.
//!
//! Parameter names are timm's (DESIGN §4): the stack of stage s is named "layers.{s}." and
//! names its layers "blocks.{j}.", so a parameter reads "layers.1.blocks.0.attn.qkv.weight";
//! the merge is "layers.{s}.downsample." ("layers.1.downsample.reduction.weight").
//!
//! Shapes (batch B first; Shape holds at most four dimensions, so the frames of a video ride
//! along the height, which is the same memory as [B, T, H, W, C]):
//!   input   [B, T H, W, C]          (2-D, T = 1: the NHWC map [B, H, W, C])
//!   stage s streams [B, T H_s W_s, C_s]   (token rows, what VitMlp takes)
//!   merge s input   [B, T H_{s-1}, W_{s-1}, C_{s-1}] -> [B, T H_s, W_s, 2 C_{s-1}]
//!   output  [B, T H_{S-1} W_{S-1}, C_{S-1}]   (the last stage's tokens)
//! The number of stages S is a template parameter (the composition's parts are types); the
//! configuration must have S entries in depths and num_heads.
//!
//! Randomness: the stack of stage s draws its drop-path and dropout masks with the seed
//! mix_seed(options.seed, s), so the blocks of different stages (whose module indices restart
//! at 0) never share masks. Drop-path rates follow timm: linearly from 0 to drop_path_rate over
//! all blocks of all stages (DropPathRule::Linear), or the same rate everywhere (Uniform).

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dr2net/block/reversible_dual_residual.hpp"
#include "dr2net/block/stack.hpp"
#include "dr2net/block/stages.hpp"
#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/modules/drop.hpp"
#include "dr2net/modules/parameter.hpp"
#include "dr2net/modules/patch_merging.hpp"
#include "dr2net/modules/vit.hpp"
#include "dr2net/modules/vit_mlp.hpp"
#include "dr2net/modules/window.hpp"
#include "dr2net/modules/window_attention.hpp"
#include "dr2net/precision/precision.hpp"

namespace dr2net {

//! Sizes and rates of the stages of a Swin (2-D: grid t = 1, window t = 1) or Video Swin
//! transformer. validate_swin_config() checks a configuration; swin_t_config() and
//! video_swin_t_config() give the paper's models.
struct SwinConfig {
  std::int64_t embed_dim = 0;                      //!< C, the width of stage 0 (stage s: 2^s C)
  std::vector<int> depths;                         //!< blocks per stage (Swin-T: 2, 2, 6, 2)
  std::vector<std::int64_t> num_heads;             //!< heads per stage; num_heads[s] divides 2^s C
  std::array<std::int64_t, 3> window_size{1, 7, 7};  //!< configured window (t, h, w); 2-D: (1, w, w)
  std::array<std::int64_t, 3> grid{1, 56, 56};     //!< token map (T, H, W) of stage 0; 2-D: T = 1
  double eps = 1e-5;                               //!< every LayerNorm's epsilon (timm's Swin: 1e-5)
  double mlp_ratio = 4.0;                          //!< MLP hidden width int(mlp_ratio C_s) (timm: 4)
  double drop_path_rate = 0.0;                     //!< stochastic depth, spread by drop_path_rule, in [0, 1)
  DropPathRule drop_path_rule = DropPathRule::Linear;  //!< timm: linear from 0 over all blocks of all stages
  double proj_drop = 0.0;                          //!< dropout of attention's output and of the MLP, in [0, 1)
};

//! One stage of a validated SwinConfig, as swin_stage_layouts() derives it.
struct SwinStageLayout {
  int depth = 0;                              //!< blocks in the stage
  std::int64_t dim = 0;                       //!< C_s = 2^s C
  std::int64_t num_heads = 0;                 //!< heads of every block of the stage
  std::int64_t hidden = 0;                    //!< MLP hidden width int(mlp_ratio C_s)
  std::array<std::int64_t, 3> grid{1, 1, 1};  //!< token map (T, H_s, W_s)
  int first_block = 0;                        //!< global index of the stage's block 0 (drop-path rates)
  std::vector<WindowGeometry> blocks;         //!< block j's window and shift (swin_block_geometry)
};

//! Swin-T's stages (timm swin_tiny_patch4_window7_224): C 96, depths 2-2-6-2, heads 3-6-12-24,
//! window 7 on the 56x56 map of a 224x224 image in 4x4 patches.
inline SwinConfig swin_t_config() {
  SwinConfig c;
  c.embed_dim = 96;
  c.depths = {2, 2, 6, 2};
  c.num_heads = {3, 6, 12, 24};
  c.window_size = {1, 7, 7};
  c.grid = {1, 56, 56};
  return c;
}

//! Video Swin-T's stages: Swin-T's widths, depths and heads with the 3-D window (8, 7, 7) on
//! the map of `frames` frames at 224x224 in 2x4x4 tubelets: (frames / 2, 56, 56).
inline SwinConfig video_swin_t_config(std::int64_t frames = 16) {
  DR2NET_CHECK(frames > 0 && frames % 2 == 0, "video_swin_t_config: frames must be positive and even (tubelets of 2 "
               "frames), got ", frames);
  SwinConfig c = swin_t_config();
  c.window_size = {8, 7, 7};
  c.grid = {frames / 2, 56, 56};
  return c;
}

//! Block `block` of `num_blocks` (global indices over every stage): its drop-path rate.
inline double swin_drop_path_rate(const SwinConfig& c, int block, int num_blocks) {
  if (c.drop_path_rule == DropPathRule::Uniform) return c.drop_path_rate;
  if (num_blocks <= 1) return 0.0;
  return c.drop_path_rate * static_cast<double>(block) / static_cast<double>(num_blocks - 1);
}

//! Checks `c` and derives every stage: widths, heads, MLP widths, maps and each block's
//! geometry. Throws dr2net::Error naming the field, the stage and block, and the sizes: a
//! non-positive size, num_heads or depths of the wrong length, heads that do not divide a
//! stage's width, a map that is not a multiple of a block's window ("grid h = 10 is not a
//! multiple of window h = 4"), an odd map where a merge needs an even one, a rate out of
//! range, a width that overflows.
inline std::vector<SwinStageLayout> swin_stage_layouts(const SwinConfig& c) {
  static constexpr const char* axis[3] = {"t", "h", "w"};
  DR2NET_CHECK(c.embed_dim > 0, "SwinConfig: embed_dim must be positive, got ", c.embed_dim);
  DR2NET_CHECK(!c.depths.empty(), "SwinConfig: depths is empty (one entry per stage)");
  DR2NET_CHECK(c.num_heads.size() == c.depths.size(), "SwinConfig: num_heads has ", c.num_heads.size(),
               " entries but depths has ", c.depths.size(), " (one entry per stage each)");
  DR2NET_CHECK(c.depths.size() <= 16, "SwinConfig: ", c.depths.size(), " stages; at most 16 are supported");
  for (int a = 0; a < 3; ++a) {
    const auto i = static_cast<std::size_t>(a);
    DR2NET_CHECK(c.window_size[i] > 0, "SwinConfig: window_size ", axis[a], " = ", c.window_size[i],
                 " must be positive");
    DR2NET_CHECK(c.grid[i] > 0, "SwinConfig: grid ", axis[a], " = ", c.grid[i], " must be positive");
  }
  DR2NET_CHECK(std::isfinite(c.eps) && c.eps > 0, "SwinConfig: eps must be positive and finite, got ", c.eps);
  DR2NET_CHECK(std::isfinite(c.mlp_ratio) && c.mlp_ratio > 0 && c.mlp_ratio <= 1024,
               "SwinConfig: mlp_ratio must lie in (0, 1024], got ", c.mlp_ratio);
  check_drop_rate(c.drop_path_rate, "drop_path_rate", "SwinConfig");
  check_drop_rate(c.proj_drop, "proj_drop", "SwinConfig");
  for (std::size_t s = 0; s < c.depths.size(); ++s)
    DR2NET_CHECK(c.depths[s] > 0 && c.depths[s] <= (1 << 16), "SwinConfig: depths[", s, "] = ", c.depths[s],
                 " must lie in [1, 65536]");
  std::vector<SwinStageLayout> stages(c.depths.size());
  std::array<std::int64_t, 3> grid = c.grid;
  std::int64_t dim = c.embed_dim;
  int first = 0;
  for (std::size_t s = 0; s < c.depths.size(); ++s) {
    if (s > 0) {
      DR2NET_CHECK(grid[1] % 2 == 0 && grid[2] % 2 == 0, "SwinConfig: stage ", s, " starts by merging 2x2 patches of "
                   "stage ", s - 1, "'s ", grid[1], "x", grid[2], " map, which needs an even height and width");
      grid[1] /= 2;
      grid[2] /= 2;
      dim = checked::mul(dim, 2, "SwinConfig: stage width 2^s x embed_dim");
    }
    SwinStageLayout& L = stages[s];
    L.depth = c.depths[s];
    L.dim = dim;
    L.num_heads = c.num_heads[s];
    DR2NET_CHECK(L.num_heads > 0 && dim % L.num_heads == 0, "SwinConfig: num_heads[", s, "] = ", L.num_heads,
                 " does not divide stage ", s, "'s width ", dim, " (2^", s, " x embed_dim ", c.embed_dim, ")");
    const double hidden = std::floor(static_cast<double>(dim) * c.mlp_ratio);  // timm: int(dim * mlp_ratio)
    DR2NET_CHECK(hidden >= 1 && hidden < 9.0e15, "SwinConfig: stage ", s, "'s MLP width int(", c.mlp_ratio, " x ",
                 dim, ") is out of range");
    L.hidden = static_cast<std::int64_t>(hidden);
    L.grid = grid;
    L.first_block = first;
    for (int j = 0; j < L.depth; ++j) {
      try {
        L.blocks.push_back(swin_block_geometry(grid, c.window_size, j));
      } catch (const Error& e) {
        DR2NET_FAIL("SwinConfig: stage ", s, " block ", j, " on the ", grid[0], "x", grid[1], "x", grid[2],
                    " map (T x H x W): ", e.detail());
      }
    }
    first += L.depth;
  }
  return stages;
}

//! Throws dr2net::Error unless `c` is a valid configuration (see swin_stage_layouts).
inline void validate_swin_config(const SwinConfig& c) { (void)swin_stage_layouts(c); }

//! The input shape of the backbone of `c` at batch `batch`: [B, T H, W, C] (see the file comment).
inline Shape swin_input_shape(const SwinConfig& c, std::int64_t batch) {
  DR2NET_CHECK(batch > 0, "swin_input_shape: batch must be positive, got ", batch);
  validate_swin_config(c);
  return Shape{batch, checked::mul(c.grid[0], c.grid[1], "Swin input: frames x height"), c.grid[2], c.embed_dim};
}

//! The output shape of the backbone of `c` at batch `batch`: the last stage's tokens
//! [B, T H_{S-1} W_{S-1}, C_{S-1}].
inline Shape swin_output_shape(const SwinConfig& c, std::int64_t batch) {
  DR2NET_CHECK(batch > 0, "swin_output_shape: batch must be positive, got ", batch);
  const SwinStageLayout last = swin_stage_layouts(c).back();
  return Shape{batch, checked::product({last.grid[0], last.grid[1], last.grid[2]}, "Swin output tokens"), last.dim};
}

//! One timm Swin block as a Dr²Net layer: F = WindowAttention, G = VitMlp, computing in T on Ctx.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>, class Ctx = HostContext>
using SwinLayer = ReversibleDualResidual<WindowAttention<T, Ctx>, VitMlp<T, Ctx>, ScheduleT, PrecisionT>;

//! The reversible stack of one Swin stage.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>, class Ctx = HostContext>
using SwinStack = ReversibleStack<SwinLayer<T, ScheduleT, PrecisionT, Ctx>>;

//! The merge at the start of stages s >= 1, in the type of the activations between stages.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>, class Ctx = HostContext>
using SwinMerge = PatchMerging<typename SwinStack<T, ScheduleT, PrecisionT, Ctx>::value_type, Ctx>;

namespace detail {
template <class Stack, class Merge, class Seq>
struct swin_stages_of;
template <class Stack, class Merge, std::size_t... I>
struct swin_stages_of<Stack, Merge, std::index_sequence<I...>> {
  using type = Stages<std::conditional_t<I % 2 == 0, Stack, Merge>...>;
};
}  // namespace detail

//! The backbone of S stages: Stages<SwinStack, SwinMerge, SwinStack, ..., SwinStack> (2S - 1 parts:
//! part 2s is stage s's stack, part 2s - 1 the merge that starts it).
template <int S, class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>, class Ctx = HostContext>
using SwinStages =
    typename detail::swin_stages_of<SwinStack<T, ScheduleT, PrecisionT, Ctx>, SwinMerge<T, ScheduleT, PrecisionT, Ctx>,
                                    std::make_index_sequence<static_cast<std::size_t>(2 * S - 1)>>::type;

//! The layers of stage `stage` of `c` on `ctx`, initialised as timm does, block j from
//! mix_seed(seed, global block index) (so a stage's weights do not depend on the stages built
//! before it). Throws dr2net::Error for an invalid configuration or stage index.
template <class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>, class Ctx = HostContext>
std::vector<SwinLayer<T, ScheduleT, PrecisionT, Ctx>> make_swin_layers(Ctx& ctx, const SwinConfig& c, int stage,
                                                                       std::uint64_t seed = 0) {
  const auto stages = swin_stage_layouts(c);
  DR2NET_CHECK(stage >= 0 && static_cast<std::size_t>(stage) < stages.size(), "make_swin_layers: stage ", stage,
               " out of range (the configuration has ", stages.size(), " stages)");
  int total = 0;
  for (int d : c.depths) total += d;
  const SwinStageLayout& L = stages[static_cast<std::size_t>(stage)];
  const FunctionOptions options{PrecisionT::allow_tf32};
  std::vector<SwinLayer<T, ScheduleT, PrecisionT, Ctx>> layers;
  layers.reserve(static_cast<std::size_t>(L.depth));
  for (int j = 0; j < L.depth; ++j) {
    const int global = L.first_block + j;
    const double dp = swin_drop_path_rate(c, global, total);
    const std::uint64_t s = mix_seed(seed, static_cast<std::uint64_t>(global));
    layers.emplace_back(
        WindowAttention<T, Ctx>(ctx, window_attention_config(L.dim, L.num_heads, L.blocks[static_cast<std::size_t>(j)],
                                                             c.eps, dp, c.proj_drop),
                                s, options),
        VitMlp<T, Ctx>(ctx, VitMlpConfig{L.dim, L.hidden, c.eps, dp, c.proj_drop}, s, options));
  }
  return layers;
}

//! The Swin backbone of `c` (S stages) on `ctx` for inputs of batch `batch` (forward() takes
//! any batch): stage s a SwinStack named "layers.{s}." running `schedule` under `options`
//! (its seed mixed with s, see the file comment), the merge of stage s >= 1 named
//! "layers.{s}.downsample." (seed mix_seed(seed, 1000 + s)). Weights are timm's
//! initialisation; load pretrained ones with io/swin.hpp. Throws dr2net::Error when `c` is
//! invalid or does not have S stages.
template <int S, class T, class ScheduleT, Precision PrecisionT = PrecisionPolicy<T, T, T>, class Ctx = HostContext>
SwinStages<S, T, ScheduleT, PrecisionT, Ctx> make_swin_stages(Ctx& ctx, const SwinConfig& c, std::int64_t batch,
                                                              const ScheduleT& schedule, StackOptions options = {},
                                                              std::uint64_t seed = 0,
                                                              StagesOptions stages_options = {}) {
  static_assert(S >= 1, "dr2net: make_swin_stages<S>: a backbone has at least one stage");
  const auto stages = swin_stage_layouts(c);
  DR2NET_CHECK(stages.size() == static_cast<std::size_t>(S), "make_swin_stages<", S, ">: the configuration has ",
               stages.size(), " stage(s) (depths and num_heads entries), the backbone type ", S);
  DR2NET_CHECK(batch > 0, "make_swin_stages: batch must be positive, got ", batch);
  using Stack = SwinStack<T, ScheduleT, PrecisionT, Ctx>;
  using Merge = SwinMerge<T, ScheduleT, PrecisionT, Ctx>;
  const auto tokens = [&](std::size_t s) {
    const auto& g = stages[s].grid;
    return Shape{batch, g[0] * g[1] * g[2], stages[s].dim};  // bounded by the input's elements
  };
  const auto part = [&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
    constexpr std::size_t s = (I + 1) / 2;
    if constexpr (I % 2 == 0) {
      StackOptions o = options;
      o.seed = mix_seed(options.seed, s);
      return stage_part("layers." + std::to_string(s) + ".",
                        Stack(ctx, make_swin_layers<T, ScheduleT, PrecisionT, Ctx>(ctx, c, static_cast<int>(s), seed),
                              schedule, o),
                        tokens(s));
    } else {
      const auto& g = stages[s - 1].grid;
      return stage_part("layers." + std::to_string(s) + ".downsample.",
                        Merge(ctx, PatchMergingConfig{stages[s - 1].dim, 0, c.eps}, mix_seed(seed, 1000 + s),
                              FunctionOptions{PrecisionT::allow_tf32}),
                        Shape{batch, g[0] * g[1], g[2], stages[s - 1].dim});
    }
  };
  return [&]<std::size_t... I>(std::index_sequence<I...>) {
    return SwinStages<S, T, ScheduleT, PrecisionT, Ctx>(ctx, swin_input_shape(c, batch), stages_options,
                                                        part(std::integral_constant<std::size_t, I>{})...);
  }(std::make_index_sequence<static_cast<std::size_t>(2 * S - 1)>{});
}

}  // namespace dr2net
