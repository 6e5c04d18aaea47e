// timm ViT checkpoints: loading into a stack, the pretrained equivalence at (1, 0) against an
// independent implementation, bad checkpoints, and the dr2net-vjp tool end to end: exact
// (fixed-point) precisions equal standard mode bit for bit, guard trips and NaN inputs fail
// cleanly, metadata reads back exactly.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/safetensors.hpp"
#include "dr2net/modules/vit.hpp"
#include "support/test_functors.hpp"
#include "support/temp_dir.hpp"

using namespace dr2net;
namespace fs = std::filesystem;

namespace {

using Tensors = std::map<std::string, std::vector<double>>;

// Random timm-style block tensors: LayerNorm weights near 1, small linear weights.
Tensors random_checkpoint(int L, std::int64_t D, std::int64_t H, std::mt19937_64& rng) {
  Tensors t;
  std::normal_distribution<double> n(0.0, 1.0);
  for (int i = 0; i < L; ++i) {
    for (const auto& [suffix, shape] : io::timm_block_tensors(D, H)) {
      std::size_t count = 1;
      for (auto s : shape) count *= static_cast<std::size_t>(s);
      std::vector<double> v(count);
      const bool norm_weight = suffix.find("norm") == 0 && suffix.find("weight") != std::string::npos;
      const double scale = shape.size() == 2 ? 1.0 / std::sqrt(double(shape[1])) : 0.1;
      for (auto& x : v) x = norm_weight ? 1.0 + 0.1 * n(rng) : scale * n(rng);
      t["blocks." + std::to_string(i) + "." + suffix] = std::move(v);
    }
  }
  return t;
}

std::vector<std::uint8_t> write(const Tensors& t, std::int64_t D, std::int64_t H, io::DType dtype,
                                const std::map<std::string, std::string>& meta) {
  io::SafetensorsWriter w;
  for (const auto& [k, v] : meta) w.set_metadata(k, v);
  for (const auto& [name, values] : t) {
    const auto dot = name.find('.', 7);
    const std::string suffix = name.substr(dot + 1);
    for (const auto& [s, shape] : io::timm_block_tensors(D, H))
      if (s == suffix) w.add(name, dtype, shape, values.data());
  }
  return w.to_bytes();
}

// An independent pre-norm ViT block, written from the definitions with plain loops:
// h += proj(attn(LN1(h))); h += fc2(gelu(fc1(LN2(h)))).
struct ReferenceVit {
  const Tensors& t;
  std::int64_t B, N, D, H, heads;

  const std::vector<double>& p(int i, const std::string& s) const { return t.at("blocks." + std::to_string(i) + "." + s); }

  std::vector<double> layer_norm(const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& b) const {
    std::vector<double> y(x.size());
    for (std::int64_t r = 0; r < B * N; ++r) {
      double mean = 0, var = 0;
      for (std::int64_t k = 0; k < D; ++k) mean += x[r * D + k];
      mean /= double(D);
      for (std::int64_t k = 0; k < D; ++k) var += (x[r * D + k] - mean) * (x[r * D + k] - mean);
      var /= double(D);
      for (std::int64_t k = 0; k < D; ++k) y[r * D + k] = (x[r * D + k] - mean) / std::sqrt(var + 1e-6) * w[k] + b[k];
    }
    return y;
  }
  std::vector<double> linear(const std::vector<double>& x, std::int64_t in, std::int64_t out, const std::vector<double>& w,
                             const std::vector<double>& b) const {
    std::vector<double> y(static_cast<std::size_t>(B * N * out));
    for (std::int64_t r = 0; r < B * N; ++r)
      for (std::int64_t o = 0; o < out; ++o) {
        double s = b[o];
        for (std::int64_t k = 0; k < in; ++k) s += x[r * in + k] * w[o * in + k];
        y[r * out + o] = s;
      }
    return y;
  }
  std::vector<double> attention(const std::vector<double>& qkv) const {
    const std::int64_t hd = D / heads;
    std::vector<double> o(static_cast<std::size_t>(B * N * D));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t i = 0; i < N; ++i) {
          std::vector<double> s(static_cast<std::size_t>(N));
          double mx = -1e300;
          for (std::int64_t j = 0; j < N; ++j) {
            double d = 0;
            for (std::int64_t c = 0; c < hd; ++c)
              d += qkv[(b * N + i) * 3 * D + h * hd + c] * qkv[(b * N + j) * 3 * D + D + h * hd + c];
            s[j] = d / std::sqrt(double(hd));
            mx = std::max(mx, s[j]);
          }
          double z = 0;
          for (auto& v : s) z += (v = std::exp(v - mx));
          for (std::int64_t c = 0; c < hd; ++c) {
            double acc = 0;
            for (std::int64_t j = 0; j < N; ++j) acc += s[j] / z * qkv[(b * N + j) * 3 * D + 2 * D + h * hd + c];
            o[(b * N + i) * D + h * hd + c] = acc;
          }
        }
    return o;
  }
  std::vector<double> run(std::vector<double> h, int L) const {
    for (int i = 0; i < L; ++i) {
      auto a = linear(attention(linear(layer_norm(h, p(i, "norm1.weight"), p(i, "norm1.bias")), D, 3 * D,
                                       p(i, "attn.qkv.weight"), p(i, "attn.qkv.bias"))),
                      D, D, p(i, "attn.proj.weight"), p(i, "attn.proj.bias"));
      for (std::size_t k = 0; k < h.size(); ++k) h[k] += a[k];
      auto u = linear(layer_norm(h, p(i, "norm2.weight"), p(i, "norm2.bias")), D, H, p(i, "mlp.fc1.weight"),
                      p(i, "mlp.fc1.bias"));
      for (auto& v : u) v = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
      auto m = linear(u, H, D, p(i, "mlp.fc2.weight"), p(i, "mlp.fc2.bias"));
      for (std::size_t k = 0; k < h.size(); ++k) h[k] += m[k];
    }
    return h;
  }
};

using dr2net::testing::TempDir;

void write_file(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

struct ToolResult {
  int status;
  std::string err;
};

ToolResult run_tool(const TempDir& dir, const std::string& args) {
  const std::string err = dir.file("stderr.txt");
  const int rc = std::system((std::string(DR2NET_VJP_PATH) + " " + args + " 2> " + err).c_str());
  std::ifstream f(err);
  std::stringstream ss;
  ss << f.rdbuf();
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, ss.str()};
}

double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num / std::max(den, 1e-300);
}

}  // namespace

TEST_CASE("a stack loaded from a timm checkpoint is exactly the pretrained ViT at (1, 0)", "[checkpoint]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const int L = 3;
  const std::int64_t B = 2, N = 5, D = 12, H = 24, heads = 3;
  const auto tensors = random_checkpoint(L, D, H, rng);
  for (auto dtype : {io::DType::F64, io::DType::F32}) {
    const auto file = io::SafetensorsReader::from_bytes(write(tensors, D, H, dtype, {{"num_heads", "3"}}));
    const auto cfg = io::infer_timm_vit_config(file);
    CHECK(cfg.num_layers == L);
    CHECK(cfg.dim == D);
    CHECK(cfg.hidden == H);
    CHECK(cfg.num_heads == heads);

    HostContext ctx;
    ReversibleStack<VitLayer<double, ConstantSchedule>> stack(
        ctx, make_vit_layers<double, ConstantSchedule>(cfg.num_layers, cfg.dim, cfg.num_heads, cfg.hidden),
        ConstantSchedule(1.0, 0.0));
    io::load_parameters(stack, file);
    const auto h0 = dr2net::testing::random_vector<double>(static_cast<std::size_t>(B * N * D), rng);
    std::vector<double> out(h0.size());
    stack.predict(ConstView<double>(h0.data(), Shape{B, N, D}), TensorView<double>(out.data(), Shape{B, N, D}), 0);

    // The reference reads the values exactly as stored (F32 rounding included).
    Tensors stored;
    for (const auto& name : file.names()) stored[name] = file.read<double>(name);
    const auto expected = ReferenceVit{stored, B, N, D, H, heads}.run(h0, L);
    CHECK(max_rel(out, expected) <= 1e-12);

    // Saving the parameters writes back exactly what was loaded, under the same names.
    io::SafetensorsWriter w;
    io::save_parameters(stack, w, io::DType::F64);
    const auto again = io::SafetensorsReader::from_bytes(w.to_bytes());
    CHECK(again.names() == file.names());
    for (const auto& name : file.names()) CHECK(again.read<double>(name) == stored.at(name));

    // Gradients travel under the same names with a prefix, both ways.
    stack.zero_grad();
    std::vector<double> dout(h0.size(), 1.0), dh(h0.size());
    stack.set_mode(BackpropMode::Standard);
    stack.forward(ConstView<double>(h0.data(), Shape{B, N, D}), TensorView<double>(out.data(), Shape{B, N, D}), 0);
    stack.backward(ConstView<double>(dout.data(), Shape{B, N, D}), TensorView<double>(dh.data(), Shape{B, N, D}));
    io::SafetensorsWriter gw;
    io::save_parameters(stack, gw, io::DType::F64, "grad.", /*gradients=*/true);
    const auto grads = io::SafetensorsReader::from_bytes(gw.to_bytes());
    std::vector<std::vector<double>> before;
    for (auto& p : stack.parameters()) before.emplace_back(p.grad.data(), p.grad.data() + p.grad.size());
    stack.zero_grad();
    io::load_parameters(stack, grads, "grad.", /*gradients=*/true);
    std::size_t k = 0;
    for (auto& p : stack.parameters()) CHECK(std::vector<double>(p.grad.data(), p.grad.data() + p.grad.size()) == before[k++]);
  }
}

TEST_CASE("bad checkpoints are clear errors", "[checkpoint]") {
  std::mt19937_64 rng(1);
  const std::int64_t D = 8, H = 16;
  auto t = random_checkpoint(2, D, H, rng);
  auto file_of = [&](const Tensors& ts, std::map<std::string, std::string> meta = {{"num_heads", "2"}}) {
    return io::SafetensorsReader::from_bytes(write(ts, D, H, io::DType::F32, meta));
  };
  CHECK(io::infer_timm_vit_config(file_of(t)).num_layers == 2);

  auto missing = t;
  missing.erase("blocks.1.attn.proj.bias");
  missing.erase("blocks.0.mlp.fc2.weight");
  CHECK_THROWS_WITH(io::infer_timm_vit_config(file_of(missing)),
                    Catch::Contains("missing 2 tensor(s)") && Catch::Contains("blocks.1.attn.proj.bias") &&
                        Catch::Contains("blocks.0.mlp.fc2.weight"));

  auto gap = t;  // blocks 0 and 2 but no block 1
  for (auto it = gap.begin(); it != gap.end();)
    if (it->first.rfind("blocks.1.", 0) == 0) {
      gap["blocks.2." + it->first.substr(9)] = it->second;
      it = gap.erase(it);
    } else {
      ++it;
    }
  CHECK_THROWS_WITH(io::infer_timm_vit_config(file_of(gap)), Catch::Contains("inconsistent block count"));

  CHECK_THROWS_WITH(io::infer_timm_vit_config(file_of(t, {})), Catch::Contains("num_heads"));
  CHECK_THROWS_WITH(io::infer_timm_vit_config(file_of(t, {{"num_heads", "3"}})), Catch::Contains("does not divide"));
  CHECK_THROWS_WITH(io::infer_timm_vit_config(file_of(t, {{"num_heads", "two"}})), Catch::Contains("not an integer"));
  CHECK(io::infer_timm_vit_config(file_of(t, {}), 4).num_heads == 4);

  // A block whose width disagrees with block 0.
  io::SafetensorsWriter w;
  w.set_metadata("num_heads", "2");
  for (const auto& [name, values] : t) {
    const std::string suffix = name.substr(name.find('.', 7) + 1);
    for (const auto& [s, shape] : io::timm_block_tensors(D, H)) {
      if (s != suffix) continue;
      auto sh = shape;
      if (name == "blocks.1.mlp.fc1.bias") sh = {H - 1};
      w.add(name, io::DType::F32, sh, values.data());
    }
  }
  CHECK_THROWS_WITH(io::infer_timm_vit_config(io::SafetensorsReader::from_bytes(w.to_bytes())),
                    Catch::Contains("inconsistent width") && Catch::Contains("blocks.1.mlp.fc1.bias"));

  // Loading into a stack of another width names the tensor and both shapes.
  HostContext ctx;
  ReversibleStack<VitLayer<float, ConstantSchedule>> wide(ctx, make_vit_layers<float, ConstantSchedule>(2, 12, 2, 16),
                                                          ConstantSchedule(1, 0));
  CHECK_THROWS_WITH(io::load_parameters(wide, file_of(t)), Catch::Contains("blocks.0.norm1.weight"));
}

TEST_CASE("dr2net-vjp end to end", "[tool]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  TempDir dir;
  const std::int64_t B = 2, N = 7, D = 8, H = 16;
  const int L = 2;
  const auto tensors = random_checkpoint(L, D, H, rng);
  write_file(dir.file("w.safetensors"), write(tensors, D, H, io::DType::BF16, {{"num_heads", "2"}}));
  const auto x = dr2net::testing::random_vector<double>(static_cast<std::size_t>(B * N * D), rng);
  const auto dout = dr2net::testing::random_vector<double>(x.size(), rng);
  {
    io::SafetensorsWriter w;
    w.add("x", io::DType::F64, {B, N, D}, x.data());
    w.add("dout", io::DType::F64, {B, N, D}, dout.data());
    w.write_file(dir.file("x.safetensors"));
  }
  const std::string common = "--weights " + dir.file("w.safetensors") + " --input " + dir.file("x.safetensors") +
                             " --alpha 0.5 --beta 0.5";
  std::map<std::string, io::SafetensorsReader> results;
  for (std::string mode : {"reversible", "standard"})
    for (std::string prec : {"fp64", "fp32"}) {
      const std::string out = dir.file(mode + prec + ".safetensors");
      const auto r = run_tool(dir, common + " --mode " + mode + " --precision " + prec + " --out " + out);
      INFO(r.err);
      REQUIRE(r.status == 0);
      results.emplace(mode + prec, io::SafetensorsReader::from_file(out));
    }
  const auto& rev = results.at("reversiblefp64");
  const auto& std64 = results.at("standardfp64");
  CHECK(rev.record("out").dtype == io::DType::F64);
  CHECK(results.at("standardfp32").record("grad.x").dtype == io::DType::F32);
  std::vector<std::string> expected_names{"grad.x", "out"};
  for (const auto& [name, v] : tensors) expected_names.push_back("grad." + name);
  std::sort(expected_names.begin(), expected_names.end());
  CHECK(rev.names() == expected_names);
  for (const auto& name : expected_names) {
    INFO(name);
    CHECK(max_rel(rev.read<double>(name), std64.read<double>(name)) <= 1e-10);
    CHECK(max_rel(results.at("reversiblefp32").read<double>(name), std64.read<double>(name)) <= 1e-3);
  }

  // fp64 output round-trips: what the file holds is bit for bit what the library computes.
  const auto file = io::SafetensorsReader::from_file(dir.file("w.safetensors"));
  HostContext ctx;
  ReversibleStack<VitLayer<double, ConstantSchedule>> stack(
      ctx, make_vit_layers<double, ConstantSchedule>(L, D, 2, H), ConstantSchedule(0.5, 0.5), {.mode = BackpropMode::Standard});
  io::load_parameters(stack, file);
  std::vector<double> out(x.size()), dx(x.size());
  stack.zero_grad();
  stack.forward(ConstView<double>(x.data(), Shape{B, N, D}), TensorView<double>(out.data(), Shape{B, N, D}), 0);
  stack.backward(ConstView<double>(dout.data(), Shape{B, N, D}), TensorView<double>(dx.data(), Shape{B, N, D}));
  CHECK(std64.read<double>("out") == out);
  CHECK(std64.read<double>("grad.x") == dx);
  for (auto& p : stack.parameters())
    CHECK(std64.read<double>("grad." + p.name) == std::vector<double>(p.grad.data(), p.grad.data() + p.grad.size()));
}

TEST_CASE("dr2net-vjp rejects bad input with one line and a non-zero status", "[tool]") {
  TempDir dir;
  std::mt19937_64 rng(3);
  const std::int64_t D = 8, H = 16;
  const auto tensors = random_checkpoint(1, D, H, rng);
  const auto good = write(tensors, D, H, io::DType::F32, {{"num_heads", "2"}});
  write_file(dir.file("w.safetensors"), good);
  write_file(dir.file("nometa.safetensors"), write(tensors, D, H, io::DType::F32, {}));
  write_file(dir.file("truncated.safetensors"), std::vector<std::uint8_t>(good.begin(), good.begin() + 5));
  write_file(dir.file("cut.safetensors"), std::vector<std::uint8_t>(good.begin(), good.end() - 9));
  const std::vector<double> x(2 * 3 * D, 0.25), narrow(2 * 3 * (D - 1), 0.25);
  {
    io::SafetensorsWriter w;
    w.add("x", io::DType::F32, {2, 3, D}, x.data());
    w.add("dout", io::DType::F32, {2, 3, D}, x.data());
    w.write_file(dir.file("x.safetensors"));
  }
  {
    io::SafetensorsWriter w;
    w.add("x", io::DType::F32, {2, 3, D - 1}, narrow.data());
    w.add("dout", io::DType::F32, {2, 3, D - 1}, narrow.data());
    w.write_file(dir.file("narrow.safetensors"));
  }
  {
    io::SafetensorsWriter w;
    w.add("x", io::DType::F32, {2, 3, D}, x.data());
    w.write_file(dir.file("nodout.safetensors"));
  }
  const std::string W = " --weights " + dir.file("w.safetensors"), X = " --input " + dir.file("x.safetensors"),
                    O = " --out " + dir.file("r.safetensors"), AB = " --alpha 0 --beta 1";
  const std::vector<std::pair<std::string, std::string>> cases{
      {W + X + O + AB + " --mode sideways", "--mode"},
      {W + X + O + AB + " --precision fp16", "--precision"},
      {W + X + O + " --alpha 1 --beta nan", "--beta"},
      {W + X + O + " --beta 0.5", "--alpha is required"},
      {X + O + AB, "--weights is required"},
      {W + X + O + AB + " --frobnicate 1", "unknown argument"},
      {W + X + O + AB + " --backend cuda", "CUDA"},
      {" --weights " + dir.file("absent.safetensors") + X + O + AB, "absent.safetensors"},
      {" --weights " + dir.file("truncated.safetensors") + X + O + AB, "truncated"},
      {" --weights " + dir.file("cut.safetensors") + X + O + AB, "data"},
      {" --weights " + dir.file("nometa.safetensors") + X + O + AB, "num_heads"},
      {W + " --input " + dir.file("narrow.safetensors") + O + AB, "expected [B, N, 8]"},
      {W + " --input " + dir.file("nodout.safetensors") + O + AB, "dout"},
      {W + X + O + " --alpha 1 --beta 0", "not reversible"},
      {W + X + " --out " + dir.file("no/such/dir/r.safetensors") + AB + " --mode standard", "no/such/dir"},
  };
  for (const auto& [args, needle] : cases) {
    INFO(args);
    const auto r = run_tool(dir, args);
    INFO(r.err);
    CHECK(r.status != 0);
    CHECK(r.err.find(needle) != std::string::npos);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  }
}

namespace {

// x and dout as one F64 input file for dr2net-vjp.
void write_input(const std::string& path, const std::vector<double>& x, const std::vector<double>& dout, std::int64_t B,
                 std::int64_t N, std::int64_t D) {
  io::SafetensorsWriter w;
  w.add("x", io::DType::F64, {B, N, D}, x.data());
  w.add("dout", io::DType::F64, {B, N, D}, dout.data());
  w.write_file(path);
}

// A metadata value parsed as a whole number (fails the test if it is not one).
double metadata_number(const io::SafetensorsReader& r, const std::string& key) {
  INFO("metadata key " << key);
  REQUIRE(r.metadata().count(key) == 1);
  const std::string& text = r.metadata().at(key);
  INFO("value '" << text << "'");
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  REQUIRE(!text.empty());
  REQUIRE(*end == '\0');
  return v;
}

// No metadata value spells a non-number ("nan", "inf") where a number should be.
void check_no_nan(const io::SafetensorsReader& r) {
  for (const auto& [key, value] : r.metadata()) {
    std::string lower = value;
    for (auto& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    INFO(key << " = " << value);
    CHECK(lower.find("nan") == std::string::npos);
    CHECK(lower != "inf");
    CHECK(lower != "-inf");
  }
}

}  // namespace

TEST_CASE("dr2net-vjp fixed-point precisions: reversible gives standard's gradients bit for bit", "[tool]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  TempDir dir;
  const std::int64_t B = 2, N = 5, D = 8, H = 16;
  const int L = 3;
  const auto tensors = random_checkpoint(L, D, H, rng);
  write_file(dir.file("w.safetensors"), write(tensors, D, H, io::DType::F32, {{"num_heads", "2"}}));
  const auto x = dr2net::testing::random_vector<double>(static_cast<std::size_t>(B * N * D), rng);
  const auto dout = dr2net::testing::random_vector<double>(x.size(), rng);
  write_input(dir.file("x.safetensors"), x, dout, B, N, D);
  const std::string common = "--weights " + dir.file("w.safetensors") + " --input " + dir.file("x.safetensors") +
                             " --alpha 1 --beta 0.1";
  // The coefficients on the fixed-point grid: multiples of 2^-24.
  const double grid_beta = std::round(0.1 * 16777216.0) / 16777216.0;
  REQUIRE(grid_beta != 0.1);

  for (std::string prec : {"fixed-fp32", "fixed-fp64"}) {
    INFO(prec);
    std::map<std::string, io::SafetensorsReader> results;
    for (std::string mode : {"standard", "reversible", "error-bounded"}) {
      const std::string out = dir.file(prec + mode + ".safetensors");
      const auto r = run_tool(dir, common + " --mode " + mode + " --precision " + prec + " --out " + out);
      INFO(mode << ": " << r.err);
      REQUIRE(r.status == 0);
      results.emplace(mode, io::SafetensorsReader::from_file(out));
    }
    const auto& ref = results.at("standard");
    const auto dtype = prec == "fixed-fp32" ? io::DType::F32 : io::DType::F64;
    std::vector<std::string> expected_names{"grad.x", "out"};
    for (const auto& [name, v] : tensors) expected_names.push_back("grad." + name);
    std::sort(expected_names.begin(), expected_names.end());
    for (std::string mode : {"reversible", "error-bounded"}) {
      INFO(mode);
      const auto& got = results.at(mode);
      REQUIRE(got.names() == expected_names);
      for (const auto& name : expected_names) {
        INFO(name);
        CHECK(got.record(name).dtype == dtype);
        CHECK(ref.record(name).dtype == dtype);
        // Exact: every element equal (both files hold the compute type; reading into double is exact).
        CHECK(got.read<double>(name) == ref.read<double>(name));
      }
      CHECK(got.metadata().at("reconstruction") == "exact");
      CHECK(metadata_number(got, "reconstruction_relative_error") == 0.0);
      CHECK(metadata_number(got, "side_bits_bytes") > 0);  // |beta| < 1: every module keeps side bits
      check_no_nan(got);
    }
    for (const auto& [mode, r] : results) {
      INFO(mode);
      CHECK(metadata_number(r, "alpha") == 1.0);
      CHECK(metadata_number(r, "beta") == grid_beta);
      CHECK(metadata_number(r, "requested_beta") == 0.1);
      CHECK(r.metadata().at("coefficient_grid") == "2^-24");
      CHECK(r.metadata().at("precision") == prec);
    }
    CHECK(ref.metadata().at("reconstruction_relative_error") == "not measured");
    CHECK(metadata_number(ref, "side_bits_bytes") == 0);
    check_no_nan(ref);
  }
}

TEST_CASE("dr2net-vjp: a reconstruction guard trip, a NaN input: one line, non-zero status, no output", "[tool]") {
  TempDir dir;
  std::mt19937_64 rng(11);
  const std::int64_t B = 2, N = 5, D = 8, H = 16;
  // 8 modules at (1, 0.1): fp32 reconstruction error grows ~11x per module, to about 1e2 with
  // this seed (the guard trips at 1e-4) while staying finite.
  const int L = 4;
  const auto tensors = random_checkpoint(L, D, H, rng);
  write_file(dir.file("w.safetensors"), write(tensors, D, H, io::DType::F32, {{"num_heads", "2"}}));
  auto x = dr2net::testing::random_vector<double>(static_cast<std::size_t>(B * N * D), rng);
  const auto dout = dr2net::testing::random_vector<double>(x.size(), rng);
  write_input(dir.file("x.safetensors"), x, dout, B, N, D);
  auto bad_dout = dout;
  bad_dout[3] = -std::numeric_limits<double>::infinity();
  write_input(dir.file("inf-dout.safetensors"), x, bad_dout, B, N, D);
  x[17] = std::numeric_limits<double>::quiet_NaN();
  write_input(dir.file("nan.safetensors"), x, dout, B, N, D);
  const std::string W = "--weights " + dir.file("w.safetensors"), AB = " --alpha 1 --beta 0.1";

  auto expect_failure = [&](const std::string& args, const std::string& needle, const std::string& out) {
    INFO(args);
    const auto r = run_tool(dir, args + " --out " + out);
    INFO(r.err);
    CHECK(r.status == 1);
    CHECK(r.err.find(needle) != std::string::npos);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK(!fs::exists(out));
  };
  const std::string X = " --input " + dir.file("x.safetensors"), NaN = " --input " + dir.file("nan.safetensors");
  expect_failure(W + X + AB + " --mode reversible --precision fp32", "reconstruction guard", dir.file("trip.safetensors"));
  for (const auto& [prec, mode] : std::vector<std::pair<std::string, std::string>>{
           {"fp32", "reversible"}, {"fp64", "standard"}, {"fixed-fp32", "reversible"}, {"fixed-fp64", "error-bounded"}})
    expect_failure(W + NaN + AB + " --mode " + mode + " --precision " + prec, "h0", dir.file("nan" + prec + mode));
  expect_failure(W + " --input " + dir.file("inf-dout.safetensors") + AB + " --mode standard --precision fixed-fp32", "dout",
                 dir.file("inf-dout-result.safetensors"));

  // The same configuration in exact mode: no guard to trip, the gradients of standard mode.
  const auto r = run_tool(dir, W + X + AB + " --mode reversible --precision fixed-fp32 --out " + dir.file("exact.safetensors"));
  INFO(r.err);
  CHECK(r.status == 0);
}

TEST_CASE("dr2net-vjp metadata: every number with 17 significant digits", "[tool]") {
  TempDir dir;
  std::mt19937_64 rng(5);
  const std::int64_t B = 2, N = 4, D = 8, H = 16;
  const int L = 2;
  const double alpha = 0.7, beta = 0.3;  // neither is short in binary: "%.6f" or "%g" would not read back
  const auto tensors = random_checkpoint(L, D, H, rng);
  write_file(dir.file("w.safetensors"), write(tensors, D, H, io::DType::F64, {{"num_heads", "2"}}));
  const auto x = dr2net::testing::random_vector<double>(static_cast<std::size_t>(B * N * D), rng);
  const auto dout = dr2net::testing::random_vector<double>(x.size(), rng);
  write_input(dir.file("x.safetensors"), x, dout, B, N, D);
  const std::string args = "--weights " + dir.file("w.safetensors") + " --input " + dir.file("x.safetensors") +
                           " --alpha 0.7 --beta 0.3 --precision fp64";

  // The library's own report of the same run.
  const auto file = io::SafetensorsReader::from_file(dir.file("w.safetensors"));
  HostContext ctx;
  ReversibleStack<VitLayer<double, ConstantSchedule>> stack(ctx, make_vit_layers<double, ConstantSchedule>(L, D, 2, H),
                                                            ConstantSchedule(alpha, beta));
  io::load_parameters(stack, file);
  const Shape shape{B, N, D};
  std::vector<double> out(x.size()), dx(x.size());
  stack.zero_grad();
  stack.forward(ConstView<double>(x.data(), shape), TensorView<double>(out.data(), shape), 0);
  stack.backward(ConstView<double>(dout.data(), shape), TensorView<double>(dx.data(), shape),
                 ConstView<double>(x.data(), shape));
  const auto& rep = stack.reconstruction();
  REQUIRE(rep.measured);
  REQUIRE(rep.relative_error > 0);

  for (std::string mode : {"reversible", "standard", "error-bounded"}) {
    INFO(mode);
    const std::string path = dir.file(mode + ".safetensors");
    const auto r = run_tool(dir, args + " --mode " + mode + " --out " + path);
    INFO(r.err);
    REQUIRE(r.status == 0);
    const auto res = io::SafetensorsReader::from_file(path);
    CHECK(metadata_number(res, "alpha") == alpha);
    CHECK(metadata_number(res, "beta") == beta);
    CHECK(res.metadata().at("alpha") == "0.69999999999999996");
    CHECK(res.metadata().count("coefficient_grid") == 0);
    check_no_nan(res);
    if (mode == "reversible") {
      CHECK(res.metadata().at("reconstruction") == "measured");
      CHECK(metadata_number(res, "reconstruction_relative_error") == rep.relative_error);
      CHECK(metadata_number(res, "reconstruction_max_abs_error") == rep.max_abs_error);
    } else if (mode == "standard") {
      CHECK(res.metadata().at("reconstruction_relative_error") == "not measured");
    } else {
      CHECK(metadata_number(res, "snapshots") >= 0);
    }
  }
}

TEST_CASE("dr2net-vjp: an --out that is one of the inputs is refused, and the input is unchanged", "[tool]") {
  TempDir dir;
  std::mt19937_64 rng(3);
  const std::int64_t B = 1, N = 3, D = 8, H = 16;
  const auto tensors = random_checkpoint(1, D, H, rng);
  const auto bytes = write(tensors, D, H, io::DType::F32, {{"num_heads", "2"}});
  write_file(dir.file("w.safetensors"), bytes);
  const auto x = dr2net::testing::random_vector<double>(static_cast<std::size_t>(B * N * D), rng);
  write_input(dir.file("x.safetensors"), x, x, B, N, D);
  const auto input_bytes = [&] {
    std::ifstream f(dir.file("x.safetensors"), std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(f), {});
  }();
  fs::create_symlink(dir.file("w.safetensors"), dir.file("link.safetensors"));
  fs::create_hard_link(dir.file("w.safetensors"), dir.file("hard.safetensors"));
  fs::create_directories(dir.path / "sub");
  const std::string AB = " --alpha 0 --beta 1 --mode standard";
  const std::string W = " --weights " + dir.file("w.safetensors"), X = " --input " + dir.file("x.safetensors");
  const std::vector<std::pair<std::string, std::string>> cases{
      {W + X + " --out " + dir.file("w.safetensors"), "--weights"},
      {W + X + " --out " + (dir.path / "sub" / ".." / "w.safetensors").string(), "--weights"},
      {W + X + " --out " + (dir.path / "." / "x.safetensors").string(), "--input"},
      {W + X + " --out " + dir.file("link.safetensors"), "--weights"},
      {W + X + " --out " + dir.file("hard.safetensors"), "--weights"},
      {" --weights " + dir.file("link.safetensors") + X + " --out " + dir.file("hard.safetensors"), "--weights"},
  };
  for (const auto& [args, flag] : cases) {
    INFO(args);
    const auto r = run_tool(dir, args + AB);
    INFO(r.err);
    CHECK(r.status == 2);
    CHECK(r.err.find("is the same file as " + flag) != std::string::npos);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    std::ifstream f(dir.file("w.safetensors"), std::ios::binary);
    CHECK(std::vector<char>(std::istreambuf_iterator<char>(f), {}) == std::vector<char>(bytes.begin(), bytes.end()));
    std::ifstream g(dir.file("x.safetensors"), std::ios::binary);
    CHECK(std::vector<char>(std::istreambuf_iterator<char>(g), {}) == input_bytes);
  }
  // "./x" vs "x" from the working directory: the tool runs in dir.
  const std::string rel = "cd " + dir.path.string() + " && " + std::string(DR2NET_VJP_PATH) +
                          " --weights w.safetensors --input x.safetensors --out ./w.safetensors" + AB + " 2> /dev/null";
  const int rc = std::system(rel.c_str());
  CHECK((WIFEXITED(rc) ? WEXITSTATUS(rc) : -1) == 2);
  // A different output is written.
  const auto ok = run_tool(dir, W + X + " --out " + dir.file("r.safetensors") + AB);
  INFO(ok.err);
  CHECK(ok.status == 0);
  CHECK(fs::exists(dir.file("r.safetensors")));
}

TEST_CASE("a checkpoint with tensors the stack has no place for is refused, naming them and the file",
          "[checkpoint][hardening]") {
  std::mt19937_64 rng(5);
  const std::int64_t D = 8, H = 16;
  const auto t = random_checkpoint(2, D, H, rng);
  auto with = [&](const std::string& name, std::vector<std::int64_t> shape) {
    io::SafetensorsWriter w;
    w.set_metadata("num_heads", "2");
    for (const auto& [n, values] : t) {
      const std::string suffix = n.substr(n.find('.', 7) + 1);
      for (const auto& [s, sh] : io::timm_block_tensors(D, H))
        if (s == suffix) w.add(n, io::DType::F32, sh, values.data());
    }
    std::size_t count = 1;
    for (auto e : shape) count *= static_cast<std::size_t>(e);
    w.add(name, io::DType::F32, shape, std::vector<float>(count, 0.5f));
    return io::SafetensorsReader::from_bytes(w.to_bytes());
  };
  // LayerScale and qk-norm change the block's function: leaving them out would be silently wrong.
  for (const auto& [name, shape] : std::vector<std::pair<std::string, std::vector<std::int64_t>>>{
           {"blocks.0.ls1.gamma", {D}}, {"blocks.1.attn.q_norm.weight", {D / 2}}, {"blocks.1", {1}}}) {
    INFO(name);
    CHECK_THROWS_WITH(io::infer_timm_vit_config(with(name, shape)),
                      Catch::Contains("'" + name + "'") && Catch::Contains("not part of a plain timm ViT block") &&
                          Catch::Contains("safetensors data"));
  }
  // A second spelling of block 0's index.
  CHECK_THROWS_WITH(io::infer_timm_vit_config(with("blocks.00.norm1.weight", {D})),
                    Catch::Contains("blocks.00.norm1.weight") && Catch::Contains("block index"));
  // Tensors outside the blocks (an embedding, a head) stay allowed.
  CHECK(io::infer_timm_vit_config(with("cls_token", {1, 1, D})).num_layers == 2);
  // The head count's error says where the count came from and names the file.
  CHECK_THROWS_WITH(io::infer_timm_vit_config(with("cls_token", {1, 1, D}), 3),
                    Catch::Contains("num_heads = 3 (given)") && Catch::Contains("safetensors data"));
}
