// timm Swin checkpoints (io/swin.hpp): a save/load round trip of the builder's backbone, 2-D
// and 3-D, whose loaded stages compute the loop reference of timm's Swin from the file's
// tensors; the configuration inferred from a file; derived buffers never read; and every
// malformed checkpoint refused with an error naming the tensor or key while the model stays
// unchanged: missing tensors and keys, bad metadata, a bias table of the wrong size for its
// window, heads that do not divide a stage's width, depths that do not match the blocks
// present, tensors no Swin stage has, a model that is not the configuration's.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/io/safetensors.hpp"
#include "dr2net/io/swin.hpp"
#include "dr2net/modules/swin.hpp"
#include "support/swin_reference.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;
using dr2net::testing::fresh_rng;
using dr2net::testing::random_vector;

namespace {

using Tensors = std::map<std::string, std::vector<double>>;
using Shapes = std::map<std::string, std::vector<std::int64_t>>;

template <class Net>
void randomize(Net& net, std::mt19937_64& rng) {
  net.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    const bool ln_weight = name.find("norm") != std::string_view::npos && name.ends_with("weight");
    const auto r = random_vector<double>(v.size(), rng, ln_weight ? 0.5 : -0.4, ln_weight ? 1.5 : 0.4);
    std::copy(r.begin(), r.end(), v.data());
  });
}

template <class Net>
Tensors values_of(Net& net) {
  Tensors t;
  net.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    t[std::string(name)] = std::vector<double>(v.data(), v.data() + v.size());
  });
  return t;
}

template <class Net>
Shapes shapes_of(Net& net) {
  Shapes s;
  net.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    for (int d = 0; d < v.shape().rank(); ++d) s[std::string(name)].push_back(v.shape()[d]);
  });
  return s;
}

io::SafetensorsReader file_of(const Tensors& t, const Shapes& shapes, const std::map<std::string, std::string>& meta,
                              io::DType dtype = io::DType::F64) {
  io::SafetensorsWriter w;
  for (const auto& [k, v] : meta) w.set_metadata(k, v);
  for (const auto& [name, values] : t) w.add(name, dtype, shapes.at(name), values.data());
  return io::SafetensorsReader::from_bytes(w.to_bytes());
}

SwinConfig two_stage() {
  SwinConfig c;
  c.embed_dim = 8;
  c.depths = {2, 2};
  c.num_heads = {2, 4};
  c.window_size = {1, 4, 4};
  c.grid = {1, 8, 8};
  return c;
}

}  // namespace

TEST_CASE("timm Swin checkpoints: save and load round trip, 2-D and 3-D", "[swin][checkpoint]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  SwinConfig video;
  video.embed_dim = 4;
  video.depths = {2, 1};
  video.num_heads = {1, 2};
  video.window_size = {2, 2, 4};
  video.grid = {4, 4, 8};
  for (const SwinConfig& c : {two_stage(), video}) {
    const bool is_video = c.grid[0] > 1;
    INFO((is_video ? "3-D" : "2-D"));
    HostContext ctx;
    const std::int64_t B = 2;
    auto a = make_swin_stages<2, double>(ctx, c, B, ConstantSchedule(1.0, 0.0), {.mode = BackpropMode::Standard}, rng());
    randomize(a, rng);
    io::SafetensorsWriter w;
    io::save_timm_swin(a, w, c, io::DType::F64);
    const auto file = io::SafetensorsReader::from_bytes(w.to_bytes());
    CHECK(file.metadata().at("arch") == "swin");
    CHECK(file.metadata().at("window_size") == (is_video ? "2,2,4" : "4"));
    CHECK(file.metadata().at("num_heads") == (is_video ? "1,2" : "2,4"));
    CHECK(file.metadata().at("depths") == (is_video ? "2,1" : "2,2"));
    // Exactly the stages' tensors: no derived buffer is written.
    std::vector<std::string> want;
    for (const auto& [name, shape] : io::timm_swin_tensors(c)) want.push_back(name);
    std::sort(want.begin(), want.end());
    CHECK(file.names() == want);
    for (const auto& name : file.names()) CHECK(name.find("relative_position_index") == std::string::npos);

    // The configuration read back from the file and the map.
    const SwinConfig got = io::infer_timm_swin_config(file, c.grid);
    CHECK(got.embed_dim == c.embed_dim);
    CHECK(got.depths == c.depths);
    CHECK(got.num_heads == c.num_heads);
    CHECK(got.window_size == c.window_size);
    CHECK(got.mlp_ratio == 4.0);
    CHECK(got.eps == 1e-5);

    // Loaded into a backbone drawn from another seed: every value restored bit for bit.
    auto b = make_swin_stages<2, double>(ctx, got, B, ConstantSchedule(1.0, 0.0), {}, rng());
    CHECK(values_of(b) != values_of(a));
    io::load_timm_swin(b, file, got);
    const Tensors stored = values_of(b);
    CHECK(stored == values_of(a));
    // ... and the loaded stages are timm's Swin of the file's tensors at (1, 0).
    const auto x = random_vector<double>(static_cast<std::size_t>(b.input_shape().numel()), rng, -2.0, 2.0);
    std::vector<double> out(static_cast<std::size_t>(b.output_shape(B).numel()));
    b.predict(ConstView<double>(x.data(), b.input_shape()), TensorView<double>(out.data(), b.output_shape(B)), 0);
    Tensors from_file;
    for (const auto& name : file.names()) from_file[name] = file.read<double>(name);
    const auto ref = dr2net::testing::SwinReference(from_file, {c.embed_dim, c.depths, c.num_heads, c.window_size,
                                                                c.grid, c.eps})
                         .run(B, x);
    double worst = 0, scale = 1;
    for (std::size_t i = 0; i < out.size(); ++i) {
      worst = std::max(worst, std::abs(out[i] - ref[i]));
      scale = std::max(scale, std::abs(ref[i]));
    }
    INFO("worst " << worst);
    CHECK(worst <= 1e-12 * scale);
  }
}

TEST_CASE("timm Swin checkpoints: derived buffers and tensors outside the stages are never read", "[swin][checkpoint]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  const SwinConfig c = two_stage();
  auto a = make_swin_stages<2, double>(ctx, c, 1, ConstantSchedule(1.0, 0.0), {}, rng());
  randomize(a, rng);
  Tensors t = values_of(a);
  Shapes s = shapes_of(a);
  // Buffers of any shape (timm <= 0.6 stored them): ignored. A head outside layers.: the caller's.
  t["layers.0.blocks.1.attn.relative_position_index"] = {1, 2, 3};
  s["layers.0.blocks.1.attn.relative_position_index"] = {3};
  t["layers.0.blocks.1.attn_mask"] = {0, -100};
  s["layers.0.blocks.1.attn_mask"] = {1, 2};
  t["head.fc.weight"] = {1, 2};
  s["head.fc.weight"] = {1, 2};
  auto b = make_swin_stages<2, double>(ctx, c, 1, ConstantSchedule(1.0, 0.0), {}, rng());
  io::load_timm_swin(b, file_of(t, s, io::timm_swin_metadata(c), io::DType::F32), c);
  // F32 storage: every value is the F32 rounding of the saved one.
  const Tensors saved = values_of(a);
  for (const auto& [name, v] : values_of(b)) {
    INFO(name);
    const auto& want = saved.at(name);
    for (std::size_t i = 0; i < v.size(); ++i) CHECK(v[i] == static_cast<double>(static_cast<float>(want[i])));
  }
}

TEST_CASE("timm Swin checkpoints: every malformed file is refused naming the tensor or key, the model unchanged",
          "[swin][checkpoint][errors]") {
  std::uint64_t seed = 0;
  auto rng = fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx;
  const SwinConfig c = two_stage();
  auto source = make_swin_stages<2, double>(ctx, c, 1, ConstantSchedule(1.0, 0.0), {}, rng());
  randomize(source, rng);
  const Tensors good = values_of(source);
  const Shapes shapes = shapes_of(source);
  const auto meta = io::timm_swin_metadata(c);
  auto model = make_swin_stages<2, double>(ctx, c, 1, ConstantSchedule(1.0, 0.0), {}, rng());
  const Tensors before = values_of(model);

  struct Case {
    const char* what;
    std::function<void(Tensors&, Shapes&, std::map<std::string, std::string>&)> edit;
    std::vector<std::string> needles;
    std::vector<int> model_depths{};  // the model's depths when not the file's (2, 2); {0}: infer only
  };
  const std::string table0 = "layers.0.blocks.0.attn.relative_position_bias_table";
  const std::vector<Case> cases{
      {"a missing tensor",
       [](Tensors& t, Shapes&, auto&) { t.erase("layers.1.blocks.0.attn.proj.bias"); },
       {"missing 1 tensor(s)", "'layers.1.blocks.0.attn.proj.bias'"}},
      {"a missing metadata key",
       [](Tensors&, Shapes&, auto& m) { m.erase("window_size"); },
       {"metadata lacks the key 'window_size'"}},
      {"no arch", [](Tensors&, Shapes&, auto& m) { m.erase("arch"); }, {"metadata lacks the key 'arch'"}},
      {"another arch", [](Tensors&, Shapes&, auto& m) { m["arch"] = "vit"; }, {"metadata arch = 'vit'", "'swin'"}},
      {"a window that is not a number",
       [](Tensors&, Shapes&, auto& m) { m["window_size"] = "four"; },
       {"metadata window_size = 'four' is not a comma list of positive integers"}},
      {"a window of four entries",
       [](Tensors&, Shapes&, auto& m) { m["window_size"] = "1,2,4,4"; },
       {"window_size = '1,2,4,4' has 4 entries"}},
      {"another window than the model's",
       [](Tensors&, Shapes&, auto& m) { m["window_size"] = "8"; },
       {"metadata window_size = '8' but the model's window is 4"}},
      {"heads and depths of different lengths",
       [](Tensors&, Shapes&, auto& m) { m["num_heads"] = "2"; },
       {"metadata num_heads = '2' has 1 entries but depths = '2,2' has 2"}},
      {"a zero depth", [](Tensors&, Shapes&, auto& m) { m["depths"] = "2,0"; }, {"depths = '2,0'", "positive"}},
      {"a bias table of the wrong size for its window",
       [&](Tensors& t, Shapes& s, auto&) {
         t[table0] = std::vector<double>(9 * 2, 0.5);
         s[table0] = {9, 2};
       },
       {"'layers.0.blocks.0.attn.relative_position_bias_table' has shape [9, 2], expected [49, 2]",
        "49 rows for the 4x4 window of block 0 of stage 0 on its 8x8 map"}},
      {"a bias table with a column per head of another count",
       [&](Tensors& t, Shapes& s, auto&) {
         t[table0] = std::vector<double>(49 * 3, 0.5);
         s[table0] = {49, 3};
       },
       {"has shape [49, 3], expected [49, 2]", "one column per head of 2"}},
      {"a merge of the wrong width",
       [](Tensors& t, Shapes& s, auto&) {
         t["layers.1.downsample.reduction.weight"] = std::vector<double>(16 * 16, 0.1);
         s["layers.1.downsample.reduction.weight"] = {16, 16};
       },
       {"'layers.1.downsample.reduction.weight' has shape [16, 16], expected [16, 32]", "merging 8 channels"}},
      {"depths that say fewer blocks than present",
       [](Tensors&, Shapes&, auto& m) { m["depths"] = "2,1"; },
       {"does not match the blocks present", "layers.1.blocks.1."},
       {2, 1}},
      {"depths that say more blocks than present",
       [](Tensors&, Shapes&, auto& m) {
         m["depths"] = "2,3";
         m["num_heads"] = "2,4";
       },
       {"says stage 1 has 3 blocks", "no tensor of block 2"},
       {2, 3}},
      {"depths that say fewer stages than present",
       [](Tensors&, Shapes&, auto& m) {
         m["depths"] = "2";
         m["num_heads"] = "2";
       },
       {"has 1 stage(s) but the file holds tensors of more", "layers.1."},
       {0}},
      {"a tensor no Swin stage has (LayerScale)",
       [](Tensors& t, Shapes& s, auto&) {
         t["layers.0.blocks.1.ls1.gamma"] = std::vector<double>(8, 1.0);
         s["layers.0.blocks.1.ls1.gamma"] = {8};
       },
       {"not part of a timm Swin stage", "'layers.0.blocks.1.ls1.gamma'"}},
      {"a merge at stage 0 (timm 0.9 merges at the start of stages s >= 1)",
       [](Tensors& t, Shapes& s, auto&) {
         t["layers.0.downsample.norm.weight"] = std::vector<double>(8, 1.0);
         s["layers.0.downsample.norm.weight"] = {8};
       },
       {"'layers.0.downsample.norm.weight'"}},
      {"an index with a leading zero",
       [](Tensors& t, Shapes& s, auto&) {
         t["layers.01.blocks.0.norm1.weight"] = std::vector<double>(8, 1.0);
         s["layers.01.blocks.0.norm1.weight"] = {8};
       },
       {"'layers.01.blocks.0.norm1.weight' does not have an index"}},
  };
  for (const Case& k : cases) {
    INFO(k.what);
    Tensors t = good;
    Shapes s = shapes;
    auto m = meta;
    k.edit(t, s, m);
    const auto file = file_of(t, s, m);
    std::string message;
    const bool infer_only = k.model_depths == std::vector<int>{0};
    SwinConfig mc = c;
    if (!k.model_depths.empty() && !infer_only) mc.depths = k.model_depths;
    auto target = make_swin_stages<2, double>(ctx, mc, 1, ConstantSchedule(1.0, 0.0), {}, 9);
    const Tensors target_before = values_of(target);
    try {
      if (infer_only) (void)io::infer_timm_swin_config(file, c.grid);
      else io::load_timm_swin(target, file, mc);
    } catch (const Error& e) {
      message = e.what();
    }
    INFO(message);
    REQUIRE_FALSE(message.empty());
    CHECK(message.find("timm Swin stages in safetensors data: ") != std::string::npos);
    for (const auto& needle : k.needles) CHECK(message.find(needle) != std::string::npos);
    CHECK(std::count(message.begin(), message.end(), '\n') == 0);
    CHECK(values_of(target) == target_before);  // nothing was loaded
    // The inferred configuration refuses the file as well (for every case but those the
    // metadata alone describes consistently with another model).
    if (k.model_depths.empty()) CHECK_THROWS(io::infer_timm_swin_config(file, c.grid));
  }

  SECTION("the file of another map: stage 1's window shrinks to its 2x2 map, so its tables must be 3x3") {
    SwinConfig small = c;
    small.grid = {1, 4, 4};
    auto m = make_swin_stages<2, double>(ctx, small, 1, ConstantSchedule(1.0, 0.0), {}, 3);
    const Tensors m0 = values_of(m);
    CHECK_THROWS_WITH(io::load_timm_swin(m, file_of(good, shapes, meta), small),
                      Catch::Contains("'layers.1.blocks.0.attn.relative_position_bias_table' has shape [49, 4], "
                                      "expected [9, 4] (9 rows for the 2x2 window of block 0 of stage 1 on its 2x2 map"));
    CHECK(values_of(m) == m0);
  }
  SECTION("heads that do not divide a stage's width, inferred from the metadata") {
    auto m = meta;
    m["num_heads"] = "2,3";
    CHECK_THROWS_WITH(io::infer_timm_swin_config(file_of(good, shapes, m), c.grid),
                      Catch::Contains("num_heads[1] = 3 does not divide stage 1's width 16"));
  }
  SECTION("a map the windows do not tile, and an odd map where a merge needs an even one") {
    const auto file = file_of(good, shapes, meta);
    CHECK_THROWS_WITH(io::infer_timm_swin_config(file, {1, 10, 8}),
                      Catch::Contains("grid h = 10 is not a multiple of window h = 4"));
    CHECK_THROWS_WITH(io::infer_timm_swin_config(file, {1, 3, 4}),
                      Catch::Contains("stage 1 starts by merging 2x2 patches of stage 0's 3x4 map"));
  }
  SECTION("inference without the width tensor names it") {
    Tensors t = good;
    t.erase("layers.0.blocks.0.norm1.weight");
    CHECK_THROWS_WITH(io::infer_timm_swin_config(file_of(t, shapes, meta), c.grid),
                      Catch::Contains("missing key 'layers.0.blocks.0.norm1.weight'"));
  }
  SECTION("a model that is not the configuration's is refused before the file is read") {
    SwinConfig deeper = c;
    deeper.depths = {2, 3};
    CHECK_THROWS_WITH(io::load_timm_swin(model, file_of(good, shapes, meta), deeper),
                      Catch::Contains("the model's parameters are not the stages of the configuration") &&
                          Catch::Contains("no parameter 'layers.1.blocks.2.norm1.weight'"));
    io::SafetensorsWriter w;
    CHECK_THROWS_WITH(io::save_timm_swin(model, w, deeper), Catch::Contains("save_timm_swin"));
    CHECK(values_of(model) == before);
  }
}
