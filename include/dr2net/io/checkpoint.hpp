#pragma once
//! \file
//! Stack parameters and gradients to and from safetensors checkpoints, and the timm ViT
//! checkpoint layout (DESIGN §4): `blocks.{i}.norm1.weight`, `blocks.{i}.attn.qkv.weight`, ...
//!
//! Loading and saving work on any stack through its (name, value, grad) enumeration, so a
//! stack of ViT layers reads a timm state dict under timm's own names, and a stack of a
//! user's functions reads what the same functions wrote.

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "dr2net/core/error.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/io/safetensors.hpp"

namespace dr2net::io {

//! Checks, without writing anything, that load_parameters(stack, file, prefix, gradients)
//! would succeed: every parameter (or gradient) of `stack` has a tensor `prefix + name` in
//! `file` of exactly the parameter's shape, in a dtype the parameter's element type can be
//! read from. Throws one error listing every missing tensor, else one error listing every
//! shape mismatch (tensor, the shape found in the file, the shape expected), each naming
//! the file. A model made of several modules calls this for each of them before loading
//! any, so that a bad checkpoint leaves the whole model unchanged.
template <class Stack>
void check_parameters(Stack& stack, const SafetensorsReader& file, std::string_view prefix = "",
                      bool gradients = false) {
  std::vector<std::string> names;
  stack.for_each_parameter([&](std::string_view name, auto, auto) { names.push_back(std::string(prefix) + std::string(name)); });
  file.require(names);
  std::string mismatches;
  std::size_t count = 0;
  stack.for_each_parameter([&](std::string_view name, auto value, auto grad) {
    const auto& dst = gradients ? grad : value;
    using Element = std::remove_cv_t<std::remove_pointer_t<decltype(dst.data())>>;
    static_assert(detail::is_checkpoint_scalar_v<Element>, "checkpoint parameters must be float or double");
    std::vector<std::int64_t> shape;
    for (int d = 0; d < dst.shape().rank(); ++d) shape.push_back(dst.shape()[d]);
    const std::string full = std::string(prefix) + std::string(name);
    const TensorRecord& rec = file.record(full);
    // Every stored dtype (F64, F32, F16, BF16) converts to float and double; the reader has
    // rejected any other when it opened the file.
    if (rec.shape == shape) return;
    mismatches += (count++ == 0 ? "" : "; ") + ("tensor '" + full + "' has shape " + format_shape(rec.shape) +
                                                 ", expected " + format_shape(shape));
  });
  DR2NET_CHECK(count == 0, count, count == 1 ? " tensor" : " tensors", " in ", file.where(),
               " do not match the parameters' shapes (nothing was loaded): ", mismatches);
}

//! Copies every parameter (or, with `gradients`, every parameter gradient) of `stack` from
//! the tensor named `prefix + name` in `file`, converting from the file's dtype. The load is
//! checked whole first (check_parameters): a missing tensor or a wrong shape anywhere is
//! reported before any parameter is written, so the stack is either loaded completely or
//! left unchanged. (An I/O error of the file itself while copying, such as a file truncated
//! by another program after it was opened, can still stop the copy part-way.)
template <class Stack>
void load_parameters(Stack& stack, const SafetensorsReader& file, std::string_view prefix = "",
                     bool gradients = false) {
  check_parameters(stack, file, prefix, gradients);
  stack.for_each_parameter([&](std::string_view name, auto value, auto grad) {
    const auto& dst = gradients ? grad : value;
    std::vector<std::int64_t> shape;
    for (int d = 0; d < dst.shape().rank(); ++d) shape.push_back(dst.shape()[d]);
    file.read_into(std::string(prefix) + std::string(name), shape, dst.data());
  });
}

//! Adds every parameter (or, with `gradients`, every parameter gradient) of `stack` to
//! `out` as `prefix + name`, converted to `dtype`.
template <class Stack>
void save_parameters(Stack& stack, SafetensorsWriter& out, DType dtype, std::string_view prefix = "",
                     bool gradients = false) {
  stack.for_each_parameter([&](std::string_view name, auto value, auto grad) {
    const auto& v = gradients ? grad : value;
    std::vector<std::int64_t> shape;
    for (int d = 0; d < v.shape().rank(); ++d) shape.push_back(v.shape()[d]);
    out.add(std::string(prefix) + std::string(name), dtype, shape, v.data());
  });
}

//! The sizes of a stack of timm ViT blocks.
struct TimmVitConfig {
  int num_layers = 0;       //!< Number of blocks L (`blocks.0` .. `blocks.{L-1}`).
  std::int64_t dim = 0;     //!< Token width D, the length of `norm1.weight`.
  int num_heads = 0;        //!< Attention heads; divides dim (head width D / num_heads).
  std::int64_t hidden = 0;  //!< MLP width H, the rows of `mlp.fc1.weight` ([H, D]).
};

//! The per-block tensor names of timm's ViT `Block`, with their shapes for (dim D, hidden H).
inline std::vector<std::pair<std::string, std::vector<std::int64_t>>> timm_block_tensors(std::int64_t D,
                                                                                          std::int64_t H) {
  return {{"norm1.weight", {D}},       {"norm1.bias", {D}},       {"attn.qkv.weight", {3 * D, D}},
          {"attn.qkv.bias", {3 * D}},  {"attn.proj.weight", {D, D}}, {"attn.proj.bias", {D}},
          {"norm2.weight", {D}},       {"norm2.bias", {D}},       {"mlp.fc1.weight", {H, D}},
          {"mlp.fc1.bias", {H}},       {"mlp.fc2.weight", {D, H}}, {"mlp.fc2.bias", {D}}};
}

namespace detail {

inline TimmVitConfig infer_timm_vit_config(const SafetensorsReader& file, std::optional<int> num_heads) {
  std::map<int, int> blocks;  // index -> tensors seen
  const auto known = timm_block_tensors(1, 1);
  std::vector<std::string> unknown;
  for (const auto& name : file.names()) {
    if (name.rfind("blocks.", 0) != 0) continue;
    const auto dot = name.find('.', 7);
    const std::string index = name.substr(7, dot == std::string::npos ? std::string::npos : dot - 7);
    // "blocks.01" would be read as block 1 beside the real blocks.1: one spelling per index.
    DR2NET_CHECK(!index.empty() && index.size() <= 6 && (index.size() == 1 || index[0] != '0') &&
                     std::all_of(index.begin(), index.end(), [](char ch) { return ch >= '0' && ch <= '9'; }),
                 "checkpoint tensor '", name, "' does not have a block index after 'blocks.'");
    ++blocks[std::stoi(index)];
    // A tensor the stack has no place for (LayerScale's ls1.gamma, qk-norm's attn.q_norm.*) would
    // change the block's function if it were silently left out.
    const std::string suffix = dot == std::string::npos ? std::string() : name.substr(dot + 1);
    if (std::none_of(known.begin(), known.end(), [&](const auto& k) { return k.first == suffix; }))
      unknown.push_back(name);
  }
  if (!unknown.empty()) {
    std::string list;
    for (std::size_t i = 0; i < unknown.size() && i < 8; ++i) list += (i == 0 ? "'" : ", '") + unknown[i] + "'";
    if (unknown.size() > 8) list += " and " + std::to_string(unknown.size() - 8) + " more";
    DR2NET_FAIL(unknown.size(), " tensor(s) under 'blocks.' are not part of a plain timm ViT block (norm1, ",
                "attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2; no LayerScale or qk-norm), so the stack cannot ",
                "compute the checkpoint's function: ", list);
  }
  DR2NET_CHECK(!blocks.empty(), "checkpoint holds no 'blocks.{i}.*' tensors (timm ViT names expected)");
  TimmVitConfig c;
  c.num_layers = static_cast<int>(blocks.size());
  DR2NET_CHECK(blocks.rbegin()->first == c.num_layers - 1, "inconsistent block count: ", c.num_layers,
               " blocks found but the highest index is ", blocks.rbegin()->first, " (indices must be 0..L-1)");

  DR2NET_CHECK(file.contains("blocks.0.norm1.weight") && file.contains("blocks.0.mlp.fc1.weight"),
               "checkpoint lacks blocks.0.norm1.weight or blocks.0.mlp.fc1.weight: cannot tell the width");
  const auto& norm = file.record("blocks.0.norm1.weight");
  const auto& fc1 = file.record("blocks.0.mlp.fc1.weight");
  DR2NET_CHECK(norm.shape.size() == 1 && norm.shape[0] > 0, "blocks.0.norm1.weight has shape ",
               format_shape(norm.shape), ", expected [D]");
  DR2NET_CHECK(fc1.shape.size() == 2 && fc1.shape[0] > 0, "blocks.0.mlp.fc1.weight has shape ",
               format_shape(fc1.shape), ", expected [H, D]");
  c.dim = norm.shape[0];
  c.hidden = fc1.shape[0];

  std::vector<std::string> missing;
  const auto expected = timm_block_tensors(c.dim, c.hidden);
  for (int i = 0; i < c.num_layers; ++i) {
    for (const auto& [suffix, shape] : expected) {
      const std::string name = "blocks." + std::to_string(i) + "." + suffix;
      if (!file.contains(name)) {
        missing.push_back(name);
        continue;
      }
      const auto& got = file.record(name).shape;
      DR2NET_CHECK(got == shape, "inconsistent width: ", name, " has shape ", format_shape(got), ", expected ",
                   format_shape(shape), " (D = ", c.dim, ", H = ", c.hidden, " from block 0)");
    }
  }
  if (!missing.empty()) {
    std::string list;
    for (const auto& m : missing) list += (list.empty() ? "" : ", ") + m;
    DR2NET_FAIL("checkpoint is missing ", missing.size(), " tensor(s): ", list);
  }

  if (num_heads) {
    c.num_heads = *num_heads;
  } else {
    const auto it = file.metadata().find("num_heads");
    DR2NET_CHECK(it != file.metadata().end(),
                 "the number of heads is neither given nor in the checkpoint's metadata ('num_heads')");
    try {
      std::size_t used = 0;
      c.num_heads = std::stoi(it->second, &used);
      DR2NET_CHECK(used == it->second.size(), "trailing characters");
    } catch (const std::exception&) {
      DR2NET_FAIL("metadata num_heads = '", it->second, "' is not an integer");
    }
  }
  DR2NET_CHECK(c.num_heads > 0 && c.dim % c.num_heads == 0, "num_heads = ", c.num_heads,
               num_heads ? " (given)" : " (metadata)", " does not divide the width D = ", c.dim);
  return c;
}

}  // namespace detail

//! Reads L, D, H from a checkpoint of timm ViT blocks and the head count from the metadata
//! entry "num_heads" (or `num_heads` when given, which wins). Everything is checked: block
//! indices 0..L-1 without gaps (each spelled without leading zeros), every tensor of every
//! block present and no other tensor under `blocks.` (a LayerScale or qk-norm tensor would
//! change the function the stack computes), every shape consistent with block 0's width and
//! MLP width, and D divisible by the head count. Errors name the file.
inline TimmVitConfig infer_timm_vit_config(const SafetensorsReader& file, std::optional<int> num_heads = std::nullopt) {
  try {
    return detail::infer_timm_vit_config(file, num_heads);
  } catch (const Error& e) {
    DR2NET_FAIL("timm ViT blocks in ", file.where(), ": ", e.detail());
  }
}

}  // namespace dr2net::io
