#pragma once
//! \file
//! timm Swin checkpoints for the stages of modules/swin.hpp (DESIGN §4): the tensors
//!
//!   layers.{s}.downsample.norm.{weight,bias} [4C_{s-1}], layers.{s}.downsample.reduction.weight
//!   [2C_{s-1}, 4C_{s-1}]  (stages s >= 1: timm 0.9 merges at the start of a stage)
//!   layers.{s}.blocks.{j}.{norm1,norm2}.{weight,bias} [C_s], attn.qkv.{weight [3C_s, C_s], bias},
//!   attn.proj.{weight, bias}, attn.relative_position_bias_table [(2w_t-1)(2w_h-1)(2w_w-1), heads_s],
//!   mlp.fc1.{weight [H_s, C_s], bias}, mlp.fc2.{weight [C_s, H_s], bias}
//!
//! and the `__metadata__` strings `arch` = `swin`, `window_size` (one integer w for a square
//! 2-D window, "h,w" for a rectangular one, "t,h,w" for Video Swin's 3-D window), `num_heads`
//! and `depths` (comma lists, one entry per stage). The buffers timm derives
//! (`attn.relative_position_index`, `attn_mask`) are never read (they may be present) and never
//! written. Tensors outside `layers.` (a patch embedding, the final norm, a head) are left to
//! the caller. The bias table's size depends on the window, which shrinks to a map smaller than
//! window_size, so checking a file needs the map: the grid of the SwinConfig.
//!
//! Every check runs before anything is copied (io::check_parameters' check-then-load), so a
//! malformed checkpoint leaves the model unchanged; errors name the file and the tensor or
//! metadata key: a missing key, a table of the wrong size for its block's window, heads that do
//! not divide a stage's width, depths that do not match the blocks present, bad metadata.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dr2net/core/error.hpp"
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/safetensors.hpp"
#include "dr2net/modules/swin.hpp"

namespace dr2net::io {

//! What a timm Swin checkpoint's metadata says (read_timm_swin_metadata).
struct TimmSwinMetadata {
  std::array<std::int64_t, 3> window_size{1, 1, 1};  //!< (t, h, w); a 2-D window has t = 1
  std::vector<std::int64_t> num_heads;               //!< heads per stage
  std::vector<int> depths;                           //!< blocks per stage
};

//! One expected tensor of a Swin checkpoint: its name and shape.
using SwinTensor = std::pair<std::string, std::vector<std::int64_t>>;

namespace detail {

//! "a,b,c" for metadata.
template <class V>
std::string comma_list(const V& values) {
  std::string s;
  for (const auto& v : values) {
    if (!s.empty()) s.push_back(',');
    s.append(std::to_string(v));
  }
  return s;
}

//! The positive integers of a comma list; throws naming the key and its value.
inline std::vector<std::int64_t> parse_positive_list(const std::string& key, const std::string& text) {
  std::vector<std::int64_t> out;
  std::size_t begin = 0;
  while (true) {
    const std::size_t end = std::min(text.find(',', begin), text.size());
    const std::string item = text.substr(begin, end - begin);
    const bool digits = !item.empty() && item.size() <= 9 &&
                        std::all_of(item.begin(), item.end(), [](char c) { return c >= '0' && c <= '9'; });
    DR2NET_CHECK(digits && std::stoll(item) > 0, "metadata ", key, " = '", text,
                 "' is not a comma list of positive integers (item '", item, "')");
    out.push_back(std::stoll(item));
    if (end == text.size()) break;
    begin = end + 1;
  }
  return out;
}

inline const std::string& metadata_value(const SafetensorsReader& file, const std::string& key, const char* what) {
  const auto it = file.metadata().find(key);
  DR2NET_CHECK(it != file.metadata().end(), "metadata lacks the key '", key, "' (", what, ")");
  return it->second;
}

inline std::string window_text(const std::array<std::int64_t, 3>& w) {
  if (w[0] != 1) return comma_list(w);
  if (w[1] == w[2]) return std::to_string(w[1]);
  return std::to_string(w[1]) + "," + std::to_string(w[2]);
}

inline TimmSwinMetadata read_metadata(const SafetensorsReader& file) {
  const std::string& arch = metadata_value(file, "arch", "'swin' for a Swin checkpoint");
  DR2NET_CHECK(arch == "swin", "metadata arch = '", arch, "', expected 'swin'");
  TimmSwinMetadata m;
  const std::string& window = metadata_value(file, "window_size", "one integer, 'h,w' or 't,h,w'");
  const auto w = parse_positive_list("window_size", window);
  DR2NET_CHECK(w.size() <= 3, "metadata window_size = '", window, "' has ", w.size(),
               " entries; expected 1 (square), 2 (h,w) or 3 (t,h,w)");
  if (w.size() == 1) m.window_size = {1, w[0], w[0]};
  else if (w.size() == 2) m.window_size = {1, w[0], w[1]};
  else m.window_size = {w[0], w[1], w[2]};
  m.num_heads = parse_positive_list("num_heads", metadata_value(file, "num_heads", "heads per stage, a comma list"));
  const std::string& depths = metadata_value(file, "depths", "blocks per stage, a comma list");
  for (const auto d : parse_positive_list("depths", depths)) {
    DR2NET_CHECK(d <= (1 << 16), "metadata depths = '", depths, "': ", d, " blocks in one stage is out of range");
    m.depths.push_back(static_cast<int>(d));
  }
  DR2NET_CHECK(m.num_heads.size() == m.depths.size(), "metadata num_heads = '", file.metadata().at("num_heads"),
               "' has ", m.num_heads.size(), " entries but depths = '", depths, "' has ", m.depths.size(),
               " (one entry per stage each)");
  return m;
}

//! "layers.{s}.rest" -> s and rest; false when the name does not start that way (a
//! malformed index throws).
inline bool split_index(const std::string& name, std::size_t from, int& index, std::string& rest) {
  const auto dot = name.find('.', from);
  const std::string digits = name.substr(from, dot == std::string::npos ? std::string::npos : dot - from);
  DR2NET_CHECK(!digits.empty() && digits.size() <= 6 && (digits.size() == 1 || digits[0] != '0') &&
                   std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
                   dot != std::string::npos,
               "tensor '", name, "' does not have an index at position ", from, " (expected 'layers.{s}.' and '",
               "blocks.{j}.' with indices spelled without leading zeros)");
  index = std::stoi(digits);
  rest = name.substr(dot + 1);
  return true;
}

inline std::string name_list(const std::vector<std::string>& names) {
  std::string list;
  for (std::size_t i = 0; i < names.size() && i < 8; ++i) list += (i == 0 ? "'" : ", '") + names[i] + "'";
  if (names.size() > 8) list += " and " + std::to_string(names.size() - 8) + " more";
  return list;
}

inline const std::vector<std::string>& block_suffixes() {
  static const std::vector<std::string> s{"norm1.weight",    "norm1.bias",   "attn.relative_position_bias_table",
                                          "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                                          "attn.proj.bias",  "norm2.weight", "norm2.bias",
                                          "mlp.fc1.weight",  "mlp.fc1.bias", "mlp.fc2.weight",
                                          "mlp.fc2.bias"};
  return s;
}

inline void check_file(const SafetensorsReader& file, const SwinConfig& c);

}  // namespace detail

//! The metadata of a timm Swin checkpoint: `arch` must be "swin"; `window_size`, `num_heads`
//! and `depths` parsed (positive integers; as many heads entries as depths entries). Throws
//! dr2net::Error naming the file and the key.
inline TimmSwinMetadata read_timm_swin_metadata(const SafetensorsReader& file) {
  try {
    return detail::read_metadata(file);
  } catch (const Error& e) {
    DR2NET_FAIL("timm Swin stages in ", file.where(), ": ", e.detail());
  }
}

//! The `__metadata__` strings of a checkpoint of `c`: arch, window_size, num_heads, depths.
inline std::map<std::string, std::string> timm_swin_metadata(const SwinConfig& c) {
  validate_swin_config(c);
  return {{"arch", "swin"},
          {"window_size", detail::window_text(c.window_size)},
          {"num_heads", detail::comma_list(c.num_heads)},
          {"depths", detail::comma_list(c.depths)}};
}

//! Every tensor of the stages of `c` with its shape, in the order the backbone of
//! make_swin_stages enumerates its parameters. Throws dr2net::Error for an invalid `c`.
inline std::vector<SwinTensor> timm_swin_tensors(const SwinConfig& c) {
  const auto stages = swin_stage_layouts(c);
  std::vector<SwinTensor> out;
  for (std::size_t s = 0; s < stages.size(); ++s) {
    const std::string stage = "layers." + std::to_string(s) + ".";
    const SwinStageLayout& L = stages[s];
    if (s > 0) {
      const std::int64_t K = 4 * stages[s - 1].dim;
      out.push_back({stage + "downsample.norm.weight", {K}});
      out.push_back({stage + "downsample.norm.bias", {K}});
      out.push_back({stage + "downsample.reduction.weight", {L.dim, K}});
    }
    const std::int64_t C = L.dim, H = L.hidden;
    for (int j = 0; j < L.depth; ++j) {
      const std::string b = stage + "blocks." + std::to_string(j) + ".";
      const std::int64_t rows = L.blocks[static_cast<std::size_t>(j)].table_rows();
      out.push_back({b + "norm1.weight", {C}});
      out.push_back({b + "norm1.bias", {C}});
      out.push_back({b + "attn.relative_position_bias_table", {rows, L.num_heads}});
      out.push_back({b + "attn.qkv.weight", {3 * C, C}});
      out.push_back({b + "attn.qkv.bias", {3 * C}});
      out.push_back({b + "attn.proj.weight", {C, C}});
      out.push_back({b + "attn.proj.bias", {C}});
      out.push_back({b + "norm2.weight", {C}});
      out.push_back({b + "norm2.bias", {C}});
      out.push_back({b + "mlp.fc1.weight", {H, C}});
      out.push_back({b + "mlp.fc1.bias", {H}});
      out.push_back({b + "mlp.fc2.weight", {C, H}});
      out.push_back({b + "mlp.fc2.bias", {C}});
    }
  }
  return out;
}

//! Checks, reading no tensor data, that `file` holds the stages of `c` as timm names them:
//! metadata arch = swin with the window, heads and depths of `c`; exactly depths[s] blocks in
//! stage s and no tensor under `layers.` that is not part of them (timm's derived buffers
//! attn.relative_position_index and attn_mask excepted: they are ignored); every tensor present
//! with the shape `c` gives it, the bias table (2w_t-1)(2w_h-1)(2w_w-1) x heads for its block's
//! window on its stage's map. Throws one dr2net::Error naming the file and the first kind of
//! problem found, with the tensors or keys concerned.
inline void check_timm_swin(const SafetensorsReader& file, const SwinConfig& c) {
  try {
    detail::check_file(file, c);
  } catch (const Error& e) {
    DR2NET_FAIL("timm Swin stages in ", file.where(), ": ", e.detail());
  }
}

//! The configuration a checkpoint describes for a stage-0 map `grid` (T, H, W) and LayerNorm
//! epsilon `eps`: window, heads and depths from the metadata, the width from
//! layers.0.blocks.0.norm1.weight and mlp_ratio from layers.0.blocks.0.mlp.fc1.weight; then
//! the whole file is checked against it (check_timm_swin). Throws dr2net::Error naming the
//! file and the tensor or key (the map's geometry errors name the stage, block and axis).
inline SwinConfig infer_timm_swin_config(const SafetensorsReader& file, std::array<std::int64_t, 3> grid,
                                         double eps = 1e-5) {
  SwinConfig c;
  try {
    const TimmSwinMetadata m = detail::read_metadata(file);
    const std::string norm = "layers.0.blocks.0.norm1.weight", fc1 = "layers.0.blocks.0.mlp.fc1.weight";
    DR2NET_CHECK(file.contains(norm) && file.contains(fc1), "missing key '", file.contains(norm) ? fc1 : norm,
                 "' (it gives the width of stage 0 and the MLP ratio)");
    const auto& ns = file.record(norm).shape;
    const auto& fs = file.record(fc1).shape;
    DR2NET_CHECK(ns.size() == 1 && ns[0] > 0, "tensor '", norm, "' has shape ", format_shape(ns), ", expected [C]");
    DR2NET_CHECK(fs.size() == 2 && fs[0] > 0 && fs[1] == ns[0], "tensor '", fc1, "' has shape ", format_shape(fs),
                 ", expected [hidden, ", ns[0], "]");
    c.embed_dim = ns[0];
    c.depths = m.depths;
    c.num_heads = m.num_heads;
    c.window_size = m.window_size;
    c.grid = grid;
    c.eps = eps;
    // The ratio timm's int(C * mlp_ratio) maps back to the stored width.
    double r = static_cast<double>(fs[0]) / static_cast<double>(ns[0]);
    while (std::floor(static_cast<double>(ns[0]) * r) < static_cast<double>(fs[0]))
      r = std::nextafter(r, std::numeric_limits<double>::infinity());
    c.mlp_ratio = r;
    detail::check_file(file, c);
  } catch (const Error& e) {
    DR2NET_FAIL("timm Swin stages in ", file.where(), ": ", e.detail());
  }
  return c;
}

namespace detail {

//! Throws unless `model`'s parameters are exactly the tensors of `c` (names and shapes).
template <class Backbone>
void check_model_matches(Backbone& model, const SwinConfig& c, const char* what) {
  const auto want = timm_swin_tensors(c);
  std::map<std::string, std::vector<std::int64_t>> have;
  model.for_each_parameter([&](std::string_view name, auto value, auto) {
    std::vector<std::int64_t> shape;
    for (int d = 0; d < value.shape().rank(); ++d) shape.push_back(value.shape()[d]);
    have[std::string(name)] = std::move(shape);
  });
  std::vector<std::string> problems;
  for (const auto& [name, shape] : want) {
    const auto it = have.find(name);
    if (it == have.end()) problems.push_back("no parameter '" + name + "'");
    else if (it->second != shape)
      problems.push_back("'" + name + "' is " + format_shape(it->second) + ", the configuration's " + format_shape(shape));
    if (it != have.end()) have.erase(it);
  }
  for (const auto& [name, shape] : have) problems.push_back("parameter '" + name + "' is not one of the configuration's");
  if (problems.empty()) return;
  std::string list;
  for (std::size_t i = 0; i < problems.size() && i < 6; ++i) list += (i == 0 ? "" : "; ") + problems[i];
  if (problems.size() > 6) list += " and " + std::to_string(problems.size() - 6) + " more";
  DR2NET_FAIL(what, ": the model's parameters are not the stages of the configuration (depths ", comma_list(c.depths),
              ", embed_dim ", c.embed_dim, "): ", list);
}

}  // namespace detail

//! Loads every parameter of `model` (a backbone from make_swin_stages, or any model whose
//! parameters are the stages of `c` under timm's names) from `file`, converting from the
//! file's dtype. Everything is checked first, reading no tensor data: the model against `c`,
//! the file against `c` (check_timm_swin) and every parameter's tensor (io::check_parameters),
//! so a bad checkpoint leaves the model unchanged. Throws dr2net::Error naming the file and
//! the tensor or key.
template <class Backbone>
void load_timm_swin(Backbone& model, const SafetensorsReader& file, const SwinConfig& c) {
  detail::check_model_matches(model, c, "load_timm_swin");
  check_timm_swin(file, c);
  load_parameters(model, file);  // checks every name and shape again, then copies
}

//! Adds the stages of `model` to `out` under timm's names, converted to `dtype`, with the
//! metadata of `c` (timm_swin_metadata); derived buffers are not written. Throws dr2net::Error
//! when the model's parameters are not the stages of `c`.
template <class Backbone>
void save_timm_swin(Backbone& model, SafetensorsWriter& out, const SwinConfig& c, DType dtype = DType::F32) {
  detail::check_model_matches(model, c, "save_timm_swin");
  for (const auto& [key, value] : timm_swin_metadata(c)) out.set_metadata(key, value);
  save_parameters(model, out, dtype);
}

namespace detail {

inline void check_file(const SafetensorsReader& file, const SwinConfig& c) {
  const TimmSwinMetadata m = read_metadata(file);
  DR2NET_CHECK(m.window_size == c.window_size, "metadata window_size = '", file.metadata().at("window_size"),
               "' but the model's window is ", window_text(c.window_size));
  DR2NET_CHECK(m.depths == c.depths, "metadata depths = '", file.metadata().at("depths"),
               "' but the model's depths are ", comma_list(c.depths));
  DR2NET_CHECK(m.num_heads == c.num_heads, "metadata num_heads = '", file.metadata().at("num_heads"),
               "' but the model's heads are ", comma_list(c.num_heads));
  const auto stages = swin_stage_layouts(c);  // heads dividing widths, the map's geometry
  const int S = static_cast<int>(stages.size());

  // Every name under layers.: a known tensor of a stage and block that exist, or a buffer.
  std::vector<std::string> unknown, beyond_stages, beyond_depth;
  std::set<std::pair<int, int>> blocks_present;
  for (const auto& name : file.names()) {
    if (name.rfind("layers.", 0) != 0) continue;
    int s = 0, j = 0;
    std::string rest, suffix;
    split_index(name, 7, s, rest);
    if (s >= S) {
      beyond_stages.push_back(name);
      continue;
    }
    if (rest.rfind("downsample.", 0) == 0) {
      const std::string d = rest.substr(11);
      if (s == 0 || (d != "norm.weight" && d != "norm.bias" && d != "reduction.weight")) unknown.push_back(name);
      continue;
    }
    if (rest.rfind("blocks.", 0) != 0) {
      unknown.push_back(name);
      continue;
    }
    split_index(name, name.size() - rest.size() + 7, j, suffix);
    if (j >= c.depths[static_cast<std::size_t>(s)]) {
      beyond_depth.push_back(name);
      continue;
    }
    blocks_present.insert({s, j});
    if (suffix == "attn.relative_position_index" || suffix == "attn_mask") continue;  // derived: never read
    const auto& known = block_suffixes();
    if (std::find(known.begin(), known.end(), suffix) == known.end()) unknown.push_back(name);
  }
  DR2NET_CHECK(beyond_stages.empty(), "metadata depths = '", file.metadata().at("depths"), "' has ", S,
               " stage(s) but the file holds tensors of more: ", name_list(beyond_stages));
  DR2NET_CHECK(beyond_depth.empty(), "metadata depths = '", file.metadata().at("depths"),
               "' does not match the blocks present: the file holds ", name_list(beyond_depth));
  DR2NET_CHECK(unknown.empty(), unknown.size(), " tensor(s) under 'layers.' are not part of a timm Swin stage ",
               "(downsample.{norm,reduction}, blocks.{j}.{norm1, attn.qkv, attn.proj, ",
               "attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}), so the stages cannot compute the ",
               "checkpoint's function: ", name_list(unknown));
  for (int s = 0; s < S; ++s)
    for (int j = 0; j < c.depths[static_cast<std::size_t>(s)]; ++j)
      DR2NET_CHECK(blocks_present.count({s, j}) == 1, "metadata depths = '", file.metadata().at("depths"), "' says stage ",
                   s, " has ", c.depths[static_cast<std::size_t>(s)], " blocks, but the file holds no tensor of block ",
                   j, " ('layers.", s, ".blocks.", j, ".*'): depths must match the blocks present");

  const auto want = timm_swin_tensors(c);
  std::vector<std::string> missing;
  for (const auto& [name, shape] : want)
    if (!file.contains(name)) missing.push_back(name);
  DR2NET_CHECK(missing.empty(), "missing ", missing.size(), " tensor(s): ", name_list(missing));

  std::string mismatches;
  std::size_t count = 0;
  for (const auto& [name, shape] : want) {
    const auto& got = file.record(name).shape;
    if (got == shape) continue;
    std::string why;
    const auto blocks = name.find(".blocks.");
    if (name.ends_with("relative_position_bias_table")) {
      const int s = std::stoi(name.substr(7));
      const int j = std::stoi(name.substr(blocks + 8));
      const SwinStageLayout& L = stages[static_cast<std::size_t>(s)];
      const WindowGeometry& g = L.blocks[static_cast<std::size_t>(j)];
      why = " (" + std::to_string(shape[0]) + " rows for the " +
            (g.window[0] > 1 ? std::to_string(g.window[0]) + "x" : std::string()) + std::to_string(g.window[1]) + "x" +
            std::to_string(g.window[2]) + " window of block " + std::to_string(j) + " of stage " + std::to_string(s) +
            " on its " + (L.grid[0] > 1 ? std::to_string(L.grid[0]) + "x" : std::string()) +
            std::to_string(L.grid[1]) + "x" + std::to_string(L.grid[2]) + " map, one column per head of " +
            std::to_string(L.num_heads) + ")";
    } else {
      const int s = std::stoi(name.substr(7));
      const SwinStageLayout& L = stages[static_cast<std::size_t>(s)];
      why = " (stage " + std::to_string(s) + ": width " + std::to_string(L.dim) + ", MLP " + std::to_string(L.hidden) +
            (blocks == std::string::npos ? ", merging " + std::to_string(stages[static_cast<std::size_t>(s - 1)].dim) +
                                               " channels"
                                         : std::string()) +
            ")";
    }
    mismatches += (count++ == 0 ? "" : "; ") + ("tensor '" + name + "' has shape " + format_shape(got) +
                                                 ", expected " + format_shape(shape) + why);
  }
  DR2NET_CHECK(count == 0, count, count == 1 ? " tensor does" : " tensors do",
               " not have the shape of the stages (nothing was loaded): ", mismatches);
}

}  // namespace detail

}  // namespace dr2net::io
