// Loading parameters from a checkpoint is transactional: everything is checked before
// anything is written, so a bad checkpoint leaves the model exactly as it was.

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/safetensors.hpp"
#include "dr2net/modules/vit.hpp"

namespace io = dr2net::io;
using Catch::Matchers::Contains;
using Stack = dr2net::ReversibleStack<dr2net::VitLayer<float, dr2net::ConstantSchedule>>;

namespace {

std::vector<std::uint32_t> bits(Stack& stack) {
  std::vector<std::uint32_t> out;
  for (auto& p : stack.parameters()) {
    for (std::size_t i = 0; i < p.value.size(); ++i) {
      std::uint32_t b;
      std::memcpy(&b, p.value.data() + i, sizeof b);
      out.push_back(b);
    }
  }
  return out;
}

Stack make_stack(dr2net::HostContext& ctx, std::uint64_t seed) {
  return Stack(ctx, dr2net::make_vit_layers<float, dr2net::ConstantSchedule>(2, 8, 2, 16, 1e-6, 0.0, seed),
               dr2net::ConstantSchedule(1.0, 0.0));
}

// Every parameter of `stack` under `prefix + name` with values from `rng`; the last one
// enumerated gets shape `last_shape` instead when it is not empty.
io::SafetensorsWriter checkpoint_of(Stack& stack, std::mt19937& rng, const std::string& prefix,
                                    const std::vector<std::int64_t>& last_shape, std::string& last_name) {
  std::vector<std::string> names;
  stack.for_each_parameter([&](std::string_view name, auto, auto) { names.emplace_back(name); });
  last_name = prefix + names.back();
  std::normal_distribution<float> dist(0.0f, 1.0f);
  io::SafetensorsWriter w;
  stack.for_each_parameter([&](std::string_view name, auto value, auto) {
    std::vector<std::int64_t> shape;
    for (int d = 0; d < value.shape().rank(); ++d) shape.push_back(value.shape()[d]);
    const std::string full = prefix + std::string(name);
    if (full == last_name && !last_shape.empty()) shape = last_shape;
    std::int64_t n = 1;
    for (auto e : shape) n *= e;
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = dist(rng);
    w.add(full, io::DType::F32, shape, v);
  });
  return w;
}

}  // namespace

TEST_CASE("load_parameters: a wrong shape in the last tensor changes no parameter", "[checkpoint]") {
  dr2net::HostContext ctx;
  Stack stack = make_stack(ctx, 3);
  std::mt19937 rng(11);
  std::string last;
  // Find the last parameter's true shape, then store it with one extra row.
  std::vector<std::int64_t> true_shape;
  stack.for_each_parameter([&](std::string_view, auto value, auto) {
    true_shape.clear();
    for (int d = 0; d < value.shape().rank(); ++d) true_shape.push_back(value.shape()[d]);
  });
  std::vector<std::int64_t> wrong = true_shape;
  wrong[0] += 1;
  const auto file = io::SafetensorsReader::from_bytes(checkpoint_of(stack, rng, "", wrong, last).to_bytes());

  const auto before = bits(stack);
  const std::string msg = [&] {
    try {
      io::load_parameters(stack, file);
    } catch (const dr2net::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  }();
  CHECK_THAT(msg, Contains("tensor '" + last + "'") && Contains(io::format_shape(wrong)) &&
                      Contains(io::format_shape(true_shape)) && Contains("nothing was loaded"));
  CHECK(bits(stack) == before);  // bit for bit: not one earlier tensor was copied
  CHECK_THROWS_WITH(io::check_parameters(stack, file), Contains(last));

  // The same checkpoint with the right shape loads, and changes the parameters.
  const auto good = io::SafetensorsReader::from_bytes(checkpoint_of(stack, rng, "", {}, last).to_bytes());
  CHECK_NOTHROW(io::check_parameters(stack, good));
  io::load_parameters(stack, good);
  CHECK(bits(stack) != before);
  CHECK(stack.parameters().back().value.data()[0] == good.read<float>(last)[0]);
}

TEST_CASE("check_parameters: a model of several modules checks all before loading any", "[checkpoint]") {
  dr2net::HostContext ctx;
  Stack a = make_stack(ctx, 1);
  Stack b = make_stack(ctx, 2);
  std::mt19937 rng(5);
  std::string last_a, last_b;
  auto w = checkpoint_of(a, rng, "a.", {}, last_a);
  // b's tensors are missing from the file entirely except under the wrong prefix.
  const auto file = io::SafetensorsReader::from_bytes(w.to_bytes());
  const auto before_a = bits(a);
  const auto before_b = bits(b);
  auto load_both = [&] {
    io::check_parameters(a, file, "a.");
    io::check_parameters(b, file, "b.");
    io::load_parameters(a, file, "a.");
    io::load_parameters(b, file, "b.");
  };
  CHECK_THROWS_WITH(load_both(), Contains("missing") && Contains("b.blocks.0.norm1.weight"));
  CHECK(bits(a) == before_a);
  CHECK(bits(b) == before_b);
}
