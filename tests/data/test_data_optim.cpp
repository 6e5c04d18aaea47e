// IDX files and the Fashion-MNIST loader (on files generated here: the real dataset is not
// needed), the ViT classifier's ends against central finite differences, AdamW, the
// warmup-cosine learning rate and gradient clipping.

#include <catch2/catch.hpp>
#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include "dr2net/data/fashion_mnist.hpp"
#include "dr2net/data/idx.hpp"
#include "dr2net/dr2net.hpp"
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/safetensors.hpp"
#include "dr2net/modules/vit.hpp"
#include "dr2net/modules/vit_classifier_ends.hpp"
#include "dr2net/optim/adamw.hpp"
#include "dr2net/optim/lr_schedule.hpp"
#include "support/test_functors.hpp"

using namespace dr2net;
using Catch::Matchers::Contains;
using dr2net::testing::random_vector;

namespace {

//! A fresh directory under the system's temporary directory, removed with its contents.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = std::filesystem::temp_directory_path() /
            ("dr2net-test-data-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::filesystem::create_directories(path_);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

//! The bytes of an IDX file built by hand (not by write_idx), so the reader is checked
//! against the format itself.
std::vector<std::uint8_t> idx_bytes(std::uint8_t type, const std::vector<std::uint32_t>& dims,
                                    const std::vector<std::uint8_t>& data) {
  std::vector<std::uint8_t> out = {0, 0, type, static_cast<std::uint8_t>(dims.size())};
  for (std::uint32_t d : dims)
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<std::uint8_t>(d >> s));
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

void write_plain(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

void write_gzip(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  REQUIRE(f != nullptr);
  if (!bytes.empty()) REQUIRE(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())) == static_cast<int>(bytes.size()));
  REQUIRE(gzclose(f) == Z_OK);
}

std::vector<std::uint8_t> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<std::uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

std::vector<std::uint8_t> random_bytes(std::size_t n, std::mt19937_64& rng) {
  std::vector<std::uint8_t> v(n);
  for (auto& b : v) b = static_cast<std::uint8_t>(rng() & 0xFF);
  return v;
}

//! Checks that read_idx(path) throws an Error whose message names the file and contains `what`.
void require_idx_error(const std::string& path, const std::string& what, const data::IdxReadOptions& o = {}) {
  try {
    (void)data::read_idx(path, o);
    FAIL("read_idx('" << path << "') did not throw; expected an error about: " << what);
  } catch (const Error& e) {
    INFO(e.what());
    CHECK_THAT(std::string(e.what()), Contains(path));
    CHECK_THAT(std::string(e.what()), Contains(what));
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------
// IDX
// ------------------------------------------------------------------------------------------

TEST_CASE("IDX files round-trip, plain and gzip-compressed", "[idx]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  TempDir dir;
  const std::vector<std::uint32_t> dims = {3, 4, 5};
  const auto data = random_bytes(60, rng);
  const auto bytes = idx_bytes(0x08, dims, data);

  SECTION("files written by hand, read back") {
    write_plain(dir.file("a-idx3-ubyte"), bytes);
    write_gzip(dir.file("a-idx3-ubyte.gz"), bytes);
    for (const char* name : {"a-idx3-ubyte", "a-idx3-ubyte.gz"}) {
      INFO(name);
      const auto arr = data::read_idx(dir.file(name));
      CHECK(arr.dims == std::vector<std::int64_t>{3, 4, 5});
      CHECK(arr.numel() == 60);
      CHECK(arr.data == data);
    }
  }
  SECTION("write_idx writes exactly the format, in both forms") {
    data::write_idx(dir.file("w"), {3, 4, 5}, data);
    data::write_idx(dir.file("w.gz"), {3, 4, 5}, data, data::IdxCompression::Gzip);
    CHECK(read_all(dir.file("w")) == bytes);
    const auto gz = read_all(dir.file("w.gz"));
    REQUIRE(gz.size() >= 2);
    CHECK((gz[0] == 0x1f && gz[1] == 0x8b));  // the gzip magic: it really is compressed
    CHECK(data::read_idx(dir.file("w.gz")).data == data);
  }
  SECTION("one dimension, an empty array, large dimensions") {
    write_plain(dir.file("labels"), idx_bytes(0x08, {7}, {0, 1, 2, 3, 4, 5, 6}));
    CHECK(data::read_idx(dir.file("labels")).dims == std::vector<std::int64_t>{7});
    write_plain(dir.file("empty"), idx_bytes(0x08, {0, 28, 28}, {}));
    const auto empty = data::read_idx(dir.file("empty"));
    CHECK(empty.numel() == 0);
    CHECK(empty.data.empty());
    const auto big = random_bytes(std::size_t{5} << 19, rng);  // 2.5 MiB: the reader's buffer grows twice
    write_gzip(dir.file("big.gz"), idx_bytes(0x08, {2560, 1024}, big));
    CHECK(data::read_idx(dir.file("big.gz")).data == big);
  }
}

TEST_CASE("bad IDX files give errors naming the file and the problem", "[idx][errors]") {
  TempDir dir;
  const std::vector<std::uint8_t> data(24, 7);

  SECTION("missing file or a directory") {
    require_idx_error(dir.file("nope.gz"), "does not exist");
    require_idx_error(dir.str(), "is a directory");
  }
  SECTION("bad magic: not starting with two zero bytes, unknown or unsupported type") {
    auto b = idx_bytes(0x08, {24}, data);
    b[0] = 0x1f;
    write_plain(dir.file("m1"), b);
    require_idx_error(dir.file("m1"), "bad magic");
    write_plain(dir.file("m2"), idx_bytes(0x42, {24}, data));
    require_idx_error(dir.file("m2"), "unknown element type 0x42");
    write_gzip(dir.file("m3.gz"), idx_bytes(0x0D, {6}, data));
    require_idx_error(dir.file("m3.gz"), "0x0D (32-bit float); only unsigned byte (0x08)");
  }
  SECTION("truncated: magic, dimensions, data; plain and gzip") {
    write_plain(dir.file("t0"), {0, 0});
    require_idx_error(dir.file("t0"), "too short for the 4-byte magic");
    auto b = idx_bytes(0x08, {2, 3, 4}, data);
    write_plain(dir.file("t1"), std::vector<std::uint8_t>(b.begin(), b.begin() + 9));
    require_idx_error(dir.file("t1"), "truncated in its header");
    b.pop_back();
    write_plain(dir.file("t2"), b);
    require_idx_error(dir.file("t2"), "need 24 data bytes, found 23");
    write_gzip(dir.file("t3.gz"), b);
    require_idx_error(dir.file("t3.gz"), "need 24 data bytes, found 23");
    // A gzip stream cut short (its end and checksum missing) is an error too, not silent data.
    write_gzip(dir.file("full.gz"), idx_bytes(0x08, {2, 3, 4}, data));
    auto gz = read_all(dir.file("full.gz"));
    gz.resize(gz.size() - 10);
    write_plain(dir.file("t4.gz"), gz);
    CHECK_THROWS_AS(data::read_idx(dir.file("t4.gz")), Error);
    CHECK_THROWS_WITH(data::read_idx(dir.file("t4.gz")), Contains(dir.file("t4.gz")));
  }
  SECTION("absurd dimensions are refused before anything is allocated") {
    write_plain(dir.file("a1"), idx_bytes(0x08, {0xFFFFFFFFu, 0xFFFFFFFFu, 0xFFFFFFFFu}, {}));
    require_idx_error(dir.file("a1"), "absurd dimensions [4294967295, 4294967295, 4294967295]");
    write_plain(dir.file("a2"), idx_bytes(0x08, {2, 3, 4}, data));
    require_idx_error(dir.file("a2"), "more than the 10-byte limit", {.max_bytes = 10});
    CHECK(data::read_idx(dir.file("a2"), {.max_bytes = 24}).numel() == 24);
    // A header claiming 1 GiB over a few bytes of data: truncated, after reading what is there.
    write_plain(dir.file("a3"), idx_bytes(0x08, {1024, 1024, 1024}, data));
    require_idx_error(dir.file("a3"), "found 24");
  }
  SECTION("zero dimensions, trailing data") {
    write_plain(dir.file("z"), idx_bytes(0x08, {}, {}));
    require_idx_error(dir.file("z"), "declares 0 dimensions");
    auto b = idx_bytes(0x08, {2, 3, 4}, data);
    b.push_back(1);
    write_plain(dir.file("tr"), b);
    require_idx_error(dir.file("tr"), "trailing data after the 24 bytes");
  }
  SECTION("write_idx checks its arguments") {
    CHECK_THROWS_WITH(data::write_idx(dir.file("x"), {2, 3}, data), Contains("hold 6 elements but 24 were given"));
    CHECK_THROWS_WITH(data::write_idx(dir.file("x"), {}, {}), Contains("dimensions"));
    CHECK_THROWS_WITH(data::write_idx(dir.str() + "/no/such/dir/x", {24}, data), Contains("cannot open"));
  }
}

// ------------------------------------------------------------------------------------------
// Fashion-MNIST layout, class selection, subsets
// ------------------------------------------------------------------------------------------

namespace {

//! Writes a miniature dataset in Fashion-MNIST's file layout: `n_train` / `n_test` images of
//! 4x3 pixels whose first pixel is the sample index (mod 256), labels i mod 10.
void write_fake_fashion_mnist(const TempDir& dir, std::int64_t n_train, std::int64_t n_test) {
  const auto set = [&](std::int64_t n, const char* images, const char* labels) {
    std::vector<std::uint8_t> px(static_cast<std::size_t>(n * 12)), lb(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) {
      px[static_cast<std::size_t>(i * 12)] = static_cast<std::uint8_t>(i % 256);
      lb[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(i % 10);
    }
    data::write_idx(dir.file(images), {n, 4, 3}, px, data::IdxCompression::Gzip);
    data::write_idx(dir.file(labels), {n}, lb, data::IdxCompression::Gzip);
  };
  set(n_train, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz");
  set(n_test, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz");
}

}  // namespace

TEST_CASE("the Fashion-MNIST loader reads the four files and checks them", "[fashion-mnist]") {
  TempDir dir;
  SECTION("missing files are listed and named in the error") {
    CHECK(data::missing_fashion_mnist_files(dir.str()).size() == 4);
    CHECK_THROWS_WITH(data::load_fashion_mnist(dir.str()), Contains("train-images-idx3-ubyte.gz") &&
                                                               Contains("dataset-fashion-mnist"));
  }
  SECTION("a complete directory loads") {
    write_fake_fashion_mnist(dir, 40, 20);
    CHECK(data::missing_fashion_mnist_files(dir.str()).empty());
    const auto f = data::load_fashion_mnist(dir.str());
    CHECK(f.train.size() == 40);
    CHECK(f.test.size() == 20);
    CHECK(f.train.height == 4);
    CHECK(f.train.width == 3);
    CHECK(f.train.image(13)[0] == 13);
    CHECK(f.test.labels[7] == 7);
    CHECK_THROWS_WITH(f.train.image(40), Contains("out of range"));
  }
  SECTION("images and labels must agree; labels must be classes") {
    write_fake_fashion_mnist(dir, 40, 20);
    data::write_idx(dir.file("t10k-labels-idx1-ubyte.gz"), {19}, std::vector<std::uint8_t>(19, 1),
                    data::IdxCompression::Gzip);
    CHECK_THROWS_WITH(data::load_fashion_mnist(dir.str()), Contains("holds 20 images") && Contains("holds 19 labels"));
    data::write_idx(dir.file("t10k-labels-idx1-ubyte.gz"), {20}, std::vector<std::uint8_t>(20, 10),
                    data::IdxCompression::Gzip);
    CHECK_THROWS_WITH(data::load_fashion_mnist(dir.str()), Contains("label 10 of sample 0"));
    data::write_idx(dir.file("t10k-images-idx3-ubyte.gz"), {20, 12}, std::vector<std::uint8_t>(240, 0));
    CHECK_THROWS_WITH(data::load_fashion_mnist(dir.str()), Contains("expected [count, height, width]"));
  }
}

TEST_CASE("class selection relabels; subsets and shuffles are deterministic", "[fashion-mnist]") {
  TempDir dir;
  write_fake_fashion_mnist(dir, 100, 10);
  const auto f = data::load_fashion_mnist(dir.str());

  const auto upper = data::select_classes(f.train, 5, 9);
  REQUIRE(upper.size() == 50);
  for (std::int64_t i = 0; i < upper.size(); ++i) {
    // Sample i of the selection is original sample 10 (i / 5) + 5 + i % 5, in original order.
    const std::int64_t original = 10 * (i / 5) + 5 + i % 5;
    CHECK(upper.labels[static_cast<std::size_t>(i)] == original % 10 - 5);
    CHECK(upper.image(i)[0] == original);
  }
  CHECK(data::select_classes(f.train, 0, 4).size() == 50);
  CHECK_THROWS_WITH(data::select_classes(f.train, 5, 4), Contains("invalid class range"));

  const auto perm = data::shuffled_indices(1000, 42);
  auto sorted = perm;
  std::sort(sorted.begin(), sorted.end());
  for (std::int64_t i = 0; i < 1000; ++i) REQUIRE(sorted[static_cast<std::size_t>(i)] == i);
  CHECK(perm == data::shuffled_indices(1000, 42));
  CHECK(perm != data::shuffled_indices(1000, 43));
  CHECK(perm != sorted);
  // Fixed by the definition (Fisher-Yates over splitmix64; values from an independent Python
  // implementation): a change of the generator, which would change every experiment's data
  // order, shows up here.
  CHECK(data::shuffled_indices(10, 0) == std::vector<std::int64_t>{6, 3, 2, 9, 8, 1, 4, 7, 0, 5});
  CHECK(data::shuffled_indices(0, 3).empty());
  CHECK(data::shuffled_indices(1, 3) == std::vector<std::int64_t>{0});

  const auto sub = data::deterministic_subset(upper, 20, 7);
  REQUIRE(sub.size() == 20);
  const auto sub2 = data::deterministic_subset(upper, 20, 7);
  CHECK(sub.pixels == sub2.pixels);
  CHECK(sub.labels == sub2.labels);
  CHECK(data::deterministic_subset(upper, 20, 8).pixels != sub.pixels);
  for (std::int64_t i = 1; i < sub.size(); ++i) CHECK(sub.image(i - 1)[0] < sub.image(i)[0]);  // original order kept
  CHECK(data::deterministic_subset(upper, 1000, 7).size() == 50);
}

// ------------------------------------------------------------------------------------------
// The classifier's ends: finite differences in fp64
// ------------------------------------------------------------------------------------------

namespace {

//! Overwrites every parameter with values far from the initialisation (norm weights near 1),
//! so every path of the module matters in a gradient check.
template <class Module>
void randomize(Module& m, std::mt19937_64& rng) {
  m.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
    const bool scale = name.find("norm") != std::string_view::npos && name.ends_with("weight");
    const auto r = random_vector<double>(v.size(), rng, scale ? 0.5 : -0.5, scale ? 1.5 : 0.5);
    std::copy(r.begin(), r.end(), v.data());
  });
}

template <class Module>
std::vector<std::vector<double>> grads_of(Module& m) {
  std::vector<std::vector<double>> g;
  m.for_each_parameter([&](std::string_view, TensorView<double>, TensorView<double> gr) {
    g.emplace_back(gr.data(), gr.data() + gr.size());
  });
  return g;
}

//! Compares analytic gradient `grad` of `loss` with respect to the n values at `x` with
//! central differences, relative to the largest gradient entry.
void check_fd(const std::function<double()>& loss, double* x, const double* grad, std::size_t n,
              const std::string& what) {
  constexpr double h = 1e-6;
  double scale = 1e-3;
  for (std::size_t i = 0; i < n; ++i) scale = std::max(scale, std::abs(grad[i]));
  for (std::size_t i = 0; i < n; ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double up = loss();
    x[i] = keep - h;
    const double down = loss();
    x[i] = keep;
    const double fd = (up - down) / (2 * h);
    INFO(what << "[" << i << "]: analytic " << grad[i] << ", central difference " << fd);
    REQUIRE(std::abs(fd - grad[i]) <= 1e-6 * scale);
  }
}

}  // namespace

TEST_CASE("VitEmbedding: timm's patch projection, class token and positions; gradients match central differences",
          "[ends][grad]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  const VitEmbeddingConfig cfg{2, 4, 6, 2, 3};  // C = 2, 4x6 images, 2x2 patches (2 x 3 grid), D = 3
  VitEmbedding<double> emb(ctx, cfg, rng());
  randomize(emb, rng);
  const std::int64_t B = 2, N = emb.num_tokens(), D = 3;
  REQUIRE(N == 7);
  auto images = random_vector<double>(static_cast<std::size_t>(B * 2 * 4 * 6), rng);
  const auto weights = random_vector<double>(static_cast<std::size_t>(B * N * D), rng);  // L = sum w * tokens
  std::vector<double> tokens(weights.size());
  const Shape ishape{B, 2, 4, 6}, tshape{B, N, D};

  const auto loss = [&] {
    emb.forward(ConstView<double>(images.data(), ishape), TensorView<double>(tokens.data(), tshape));
    double l = 0;
    for (std::size_t i = 0; i < tokens.size(); ++i) l += weights[i] * tokens[i];
    return l;
  };

  SECTION("forward is a Conv2d with kernel = stride = P, plus class token and positions") {
    loss();
    std::vector<const double*> p;
    emb.for_each_parameter([&](std::string_view, TensorView<double> v, TensorView<double>) { p.push_back(v.data()); });
    const double *cls = p[0], *pos = p[1], *w = p[2], *bias = p[3];
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < N; ++t)
        for (std::int64_t d = 0; d < D; ++d) {
          double expect = pos[t * D + d];
          if (t == 0) {
            expect += cls[d];
          } else {
            const std::int64_t pr = (t - 1) / 3, pc = (t - 1) % 3;
            expect += bias[d];
            for (std::int64_t c = 0; c < 2; ++c)
              for (std::int64_t i = 0; i < 2; ++i)
                for (std::int64_t j = 0; j < 2; ++j)
                  expect += w[((d * 2 + c) * 2 + i) * 2 + j] * images[static_cast<std::size_t>(((b * 2 + c) * 4 + 2 * pr + i) * 6 + 2 * pc + j)];
          }
          CHECK(tokens[static_cast<std::size_t>((b * N + t) * D + d)] == Approx(expect).epsilon(1e-12));
        }
  }
  SECTION("parameter and image gradients match central differences") {
    emb.zero_grad();
    loss();
    std::vector<double> gimages(images.size(), 0.0);
    emb.backward(ConstView<double>(weights.data(), tshape), TensorView<double>(gimages.data(), ishape));
    const auto g = grads_of(emb);
    std::size_t k = 0;
    emb.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
      check_fd(loss, v.data(), g[k++].data(), v.size(), std::string(name));
    });
    check_fd(loss, images.data(), gimages.data(), images.size(), "images");
  }
  SECTION("backward accumulates into parameter and image gradients") {
    emb.zero_grad();
    loss();
    std::vector<double> g1(images.size(), 0.0);
    emb.backward(ConstView<double>(weights.data(), tshape), TensorView<double>(g1.data(), ishape));
    const auto once = grads_of(emb);
    const auto prefill = random_vector<double>(images.size(), rng);
    std::vector<double> g2 = prefill;
    loss();
    emb.backward(ConstView<double>(weights.data(), tshape), TensorView<double>(g2.data(), ishape));
    const auto twice = grads_of(emb);
    for (std::size_t i = 0; i < once.size(); ++i)
      for (std::size_t j = 0; j < once[i].size(); ++j) CHECK(twice[i][j] == Approx(2 * once[i][j]).epsilon(1e-12));
    for (std::size_t i = 0; i < g2.size(); ++i) CHECK(g2[i] == Approx(prefill[i] + g1[i]).epsilon(1e-12).margin(1e-14));
  }
}

TEST_CASE("VitHead: final norm and head on the class token; gradients match central differences", "[ends][grad]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  const std::int64_t B = 3, N = 4, D = 5, K = 3;
  VitHead<double> head(ctx, {D, K, 1e-6}, rng());
  randomize(head, rng);
  auto tokens = random_vector<double>(static_cast<std::size_t>(B * N * D), rng);
  const auto weights = random_vector<double>(static_cast<std::size_t>(B * K), rng);
  std::vector<double> logits(weights.size());
  const Shape tshape{B, N, D}, lshape{B, K};
  const auto loss = [&] {
    head.forward(ConstView<double>(tokens.data(), tshape), TensorView<double>(logits.data(), lshape));
    double l = 0;
    for (std::size_t i = 0; i < logits.size(); ++i) l += weights[i] * logits[i];
    return l;
  };

  SECTION("only the class token matters; gradients match") {
    head.zero_grad();
    loss();
    std::vector<double> gtokens(tokens.size(), 0.0);
    head.backward(ConstView<double>(weights.data(), lshape), TensorView<double>(gtokens.data(), tshape));
    const auto g = grads_of(head);
    std::size_t k = 0;
    head.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
      check_fd(loss, v.data(), g[k++].data(), v.size(), std::string(name));
    });
    check_fd(loss, tokens.data(), gtokens.data(), tokens.size(), "tokens");
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 1; t < N; ++t)
        for (std::int64_t d = 0; d < D; ++d) CHECK(gtokens[static_cast<std::size_t>((b * N + t) * D + d)] == 0.0);
  }
  SECTION("backward accumulates") {
    head.zero_grad();
    loss();
    std::vector<double> g1(tokens.size(), 0.0);
    head.backward(ConstView<double>(weights.data(), lshape), TensorView<double>(g1.data(), tshape));
    const auto once = grads_of(head);
    const auto prefill = random_vector<double>(tokens.size(), rng);
    std::vector<double> g2 = prefill;
    loss();
    head.backward(ConstView<double>(weights.data(), lshape), TensorView<double>(g2.data(), tshape));
    const auto twice = grads_of(head);
    for (std::size_t i = 0; i < once.size(); ++i)
      for (std::size_t j = 0; j < once[i].size(); ++j) CHECK(twice[i][j] == Approx(2 * once[i][j]).epsilon(1e-12));
    for (std::size_t i = 0; i < g2.size(); ++i) CHECK(g2[i] == Approx(prefill[i] + g1[i]).epsilon(1e-12).margin(1e-14));
  }
  SECTION("reset_classifier replaces the head and keeps the norm") {
    std::vector<double> norm_before;
    head.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
      if (name.starts_with("norm")) norm_before.insert(norm_before.end(), v.data(), v.data() + v.size());
    });
    const std::size_t bytes_before = ctx.meter().current(MemoryCategory::Parameters);
    head.reset_classifier(7, 3);
    CHECK(head.num_classes() == 7);
    std::vector<double> norm_after;
    std::vector<std::int64_t> head_shape;
    head.for_each_parameter([&](std::string_view name, TensorView<double> v, TensorView<double>) {
      if (name.starts_with("norm")) norm_after.insert(norm_after.end(), v.data(), v.data() + v.size());
      if (name == "head.weight") head_shape = {v.shape()[0], v.shape()[1]};
    });
    CHECK(norm_after == norm_before);
    CHECK(head_shape == std::vector<std::int64_t>{7, D});
    CHECK(ctx.meter().current(MemoryCategory::Parameters) == bytes_before + (7 - K) * (D + 1) * sizeof(double));
  }
}

TEST_CASE("softmax cross-entropy: values, stability, gradient by central differences", "[ends][grad]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  const std::int64_t B = 4, K = 5;
  auto logits = random_vector<double>(static_cast<std::size_t>(B * K), rng, -3, 3);
  const std::vector<std::int32_t> labels = {0, 4, 2, 2};
  const Shape s{B, K};
  std::vector<double> grad(logits.size());
  const double l = softmax_cross_entropy<double>(ConstView<double>(logits.data(), s), labels,
                                                 TensorView<double>(grad.data(), s));
  double expect = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    double sum = 0;
    for (std::int64_t k = 0; k < K; ++k) sum += std::exp(logits[static_cast<std::size_t>(b * K + k)]);
    expect += (std::log(sum) - logits[static_cast<std::size_t>(b * K + labels[static_cast<std::size_t>(b)])]) /
              static_cast<double>(B);
  }
  CHECK(l == Approx(expect).epsilon(1e-12));
  check_fd([&] { return softmax_cross_entropy<double>(ConstView<double>(logits.data(), s), labels); }, logits.data(),
           grad.data(), logits.size(), "logits");

  // Logits of 1e4 overflow exp() unless the maximum is subtracted first.
  const std::vector<float> big = {1e4f, 0.0f, -1e4f, 1e4f};
  std::vector<float> gbig(4);
  const std::vector<std::int32_t> lbig = {1, 0};
  const double lb = softmax_cross_entropy<float>(ConstView<float>(big.data(), {2, 2}), lbig,
                                                 TensorView<float>(gbig.data(), {2, 2}));
  CHECK(lb == Approx((1e4 + 2e4) / 2));
  for (float g : gbig) CHECK(std::isfinite(g));
  CHECK(gbig[0] == Approx(0.5f));
  CHECK(gbig[1] == Approx(-0.5f));

  CHECK(count_correct<double>(ConstView<double>(logits.data(), s), labels) >= 0);
  const std::vector<double> z = {1, 3, 2, /**/ 5, 5, 0};
  CHECK(count_correct<double>(ConstView<double>(z.data(), {2, 3}), std::vector<std::int32_t>{1, 0}) == 2);  // ties: first
  CHECK(count_correct<double>(ConstView<double>(z.data(), {2, 3}), std::vector<std::int32_t>{2, 1}) == 0);
  CHECK_THROWS_WITH(softmax_cross_entropy<double>(ConstView<double>(z.data(), {2, 3}), std::vector<std::int32_t>{1, 3}),
                    Contains("label 3 of sample 1 is outside [0, 3)"));
  CHECK_THROWS_WITH(softmax_cross_entropy<double>(ConstView<double>(z.data(), {2, 3}), std::vector<std::int32_t>{1}),
                    Contains("1 labels for a batch of 2"));
}

TEST_CASE("a whole classifier (ends + ViT stack) has the gradients of central differences", "[ends][grad]") {
  std::uint64_t seed;
  auto rng = dr2net::testing::fresh_rng(seed);
  INFO("seed " << seed);
  HostContext ctx({.poison_allocations = true});
  using Layer = VitLayer<double, ConstantSchedule>;
  const std::int64_t B = 2, D = 4, K = 3;
  VitEmbedding<double> emb(ctx, {1, 4, 4, 2, D}, rng());
  ReversibleStack<Layer> stack(ctx, make_vit_layers<double, ConstantSchedule>(2, D, 2, 8, 1e-6, 0.0, rng()),
                               ConstantSchedule(1.0, 0.0), {.mode = BackpropMode::Standard});
  VitHead<double> head(ctx, {D, K, 1e-6}, rng());
  randomize(emb, rng);
  randomize(stack, rng);
  randomize(head, rng);
  const std::int64_t N = emb.num_tokens();
  auto images = random_vector<double>(static_cast<std::size_t>(B * 16), rng);
  const std::vector<std::int32_t> labels = {2, 0};
  std::vector<double> h0(static_cast<std::size_t>(B * N * D)), out(h0.size()), dout(h0.size()), dh0(h0.size()),
      logits(static_cast<std::size_t>(B * K)), dlogits(logits.size());
  const Shape ishape{B, 1, 4, 4}, tshape{B, N, D}, lshape{B, K};
  const auto forward = [&](bool train) {
    emb.forward(ConstView<double>(images.data(), ishape), TensorView<double>(h0.data(), tshape));
    if (train) stack.forward(ConstView<double>(h0.data(), tshape), TensorView<double>(out.data(), tshape), 0);
    else stack.predict(ConstView<double>(h0.data(), tshape), TensorView<double>(out.data(), tshape), 0);
    head.forward(ConstView<double>(out.data(), tshape), TensorView<double>(logits.data(), lshape));
    return softmax_cross_entropy<double>(ConstView<double>(logits.data(), lshape), labels,
                                         TensorView<double>(dlogits.data(), lshape));
  };
  std::vector<NamedParameter<double>> params;
  append_parameters(params, emb);
  append_parameters(params, stack);
  append_parameters(params, head);
  CHECK(params.front().name == "cls_token");
  CHECK(params[4].name == "blocks.0.norm1.weight");
  CHECK(params.back().name == "head.bias");
  for (auto& p : params) std::fill(p.grad.data(), p.grad.data() + p.grad.size(), 0.0);
  forward(true);
  std::fill(dout.begin(), dout.end(), 0.0);
  head.backward(ConstView<double>(dlogits.data(), lshape), TensorView<double>(dout.data(), tshape));
  stack.backward(ConstView<double>(dout.data(), tshape), TensorView<double>(dh0.data(), tshape));
  emb.backward(ConstView<double>(dh0.data(), tshape));
  for (auto& p : params) {
    const std::vector<double> g(p.grad.data(), p.grad.data() + p.grad.size());
    check_fd([&] { return forward(false); }, p.value.data(), g.data(), g.size(), p.name);
  }
}

TEST_CASE("the ends meter their memory, keep timm's names and round-trip through safetensors", "[ends][io]") {
  HostContext ctx;
  VitEmbedding<float> emb(ctx, {1, 28, 28, 7, 16}, 5);
  VitHead<float> head(ctx, {16, 10, 1e-6}, 6);
  const std::size_t param_bytes = (16 + 17 * 16 + 16 * 49 + 16 + 16 + 16 + 10 * 16 + 10) * sizeof(float);
  CHECK(ctx.meter().current(MemoryCategory::Parameters) == param_bytes);
  CHECK(ctx.meter().current(MemoryCategory::Gradients) == param_bytes);

  std::vector<std::string> names;
  std::vector<Shape> shapes;
  const auto collect = [&](std::string_view n, TensorView<float> v, TensorView<float>) {
    names.emplace_back(n);
    shapes.push_back(v.shape());
  };
  emb.for_each_parameter(collect);
  head.for_each_parameter(collect);
  CHECK(names == std::vector<std::string>{"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                                          "norm.weight", "norm.bias", "head.weight", "head.bias"});
  CHECK(shapes[0] == Shape{1, 1, 16});
  CHECK(shapes[1] == Shape{1, 17, 16});
  CHECK(shapes[2] == Shape{16, 1, 7, 7});
  CHECK(shapes[6] == Shape{10, 16});

  // Activations: the saved patches [B * 16, 49] and the head's [B, 2D + 2], as SavedActivations.
  const std::int64_t B = 3;
  std::vector<float> images(static_cast<std::size_t>(B * 784), 0.5f), tokens(static_cast<std::size_t>(B * 17 * 16)),
      logits(static_cast<std::size_t>(B * 10));
  emb.forward(ConstView<float>(images.data(), {B, 1, 28, 28}), TensorView<float>(tokens.data(), {B, 17, 16}));
  head.forward(ConstView<float>(tokens.data(), {B, 17, 16}), TensorView<float>(logits.data(), {B, 10}));
  CHECK(ctx.meter().current(MemoryCategory::SavedActivations) == (B * 16 * 49 + B * (2 * 16 + 2)) * sizeof(float));
  emb.release_workspace();
  head.release_workspace();
  CHECK(ctx.meter().current(MemoryCategory::SavedActivations) == 0);

  io::SafetensorsWriter w;
  io::save_parameters(emb, w, io::DType::F32);
  io::save_parameters(head, w, io::DType::F32);
  const auto file = io::SafetensorsReader::from_bytes(w.to_bytes());
  VitEmbedding<float> emb2(ctx, {1, 28, 28, 7, 16}, 99);
  VitHead<float> head2(ctx, {16, 10, 1e-6}, 98);
  io::load_parameters(emb2, file);
  io::load_parameters(head2, file);
  std::vector<std::vector<float>> a, b;
  emb.for_each_parameter([&](std::string_view, TensorView<float> v, TensorView<float>) { a.emplace_back(v.data(), v.data() + v.size()); });
  head.for_each_parameter([&](std::string_view, TensorView<float> v, TensorView<float>) { a.emplace_back(v.data(), v.data() + v.size()); });
  emb2.for_each_parameter([&](std::string_view, TensorView<float> v, TensorView<float>) { b.emplace_back(v.data(), v.data() + v.size()); });
  head2.for_each_parameter([&](std::string_view, TensorView<float> v, TensorView<float>) { b.emplace_back(v.data(), v.data() + v.size()); });
  CHECK(a == b);
  VitHead<float> wrong(ctx, {16, 5, 1e-6}, 1);
  CHECK_THROWS_WITH(io::load_parameters(wrong, file), Contains("head.weight"));
}

TEST_CASE("the ends reject bad sizes and misuse, saying what is wrong", "[ends][errors]") {
  HostContext ctx;
  CHECK_THROWS_WITH(VitEmbedding<float>(ctx, {1, 28, 28, 5, 16}), Contains("not a whole number of 5x5 patches"));
  CHECK_THROWS_WITH(VitEmbedding<float>(ctx, {1, 28, 28, 7, 0}), Contains("sizes must be positive"));
  CHECK_THROWS_WITH(VitHead<float>(ctx, {16, 0}), Contains("num_classes must be positive"));
  VitEmbedding<float> emb(ctx, {1, 8, 8, 4, 4});
  VitHead<float> head(ctx, {4, 3});
  std::vector<float> img(2 * 64), tok(2 * 5 * 4), lg(6);
  CHECK_THROWS_WITH(emb.forward(ConstView<float>(img.data(), {2, 64}), TensorView<float>(tok.data(), {2, 5, 4})),
                    Contains("images has shape [2, 64], expected [batch > 0, 1, 8, 8]"));
  CHECK_THROWS_WITH(emb.forward(ConstView<float>(img.data(), {2, 1, 8, 8}), TensorView<float>(tok.data(), {2, 4, 5})),
                    Contains("tokens has shape [2, 4, 5], expected [2, 5, 4]"));
  CHECK_THROWS_WITH(emb.backward(ConstView<float>(tok.data(), {2, 5, 4})), Contains("without a preceding forward"));
  CHECK_THROWS_WITH(head.backward(ConstView<float>(lg.data(), {2, 3}), TensorView<float>(tok.data(), {2, 5, 4})),
                    Contains("without a preceding forward"));
  CHECK_THROWS_WITH(head.forward(ConstView<float>(tok.data(), {2, 5, 4}), TensorView<float>(lg.data(), {3, 2})),
                    Contains("logits has shape [3, 2], expected [2, 3]"));
  emb.forward(ConstView<float>(img.data(), {2, 1, 8, 8}), TensorView<float>(tok.data(), {2, 5, 4}));
  CHECK_THROWS_WITH(emb.backward(ConstView<float>(tok.data(), {1, 5, 4})), Contains("grad_tokens has shape [1, 5, 4]"));
}

// ------------------------------------------------------------------------------------------
// AdamW, learning rate, clipping
// ------------------------------------------------------------------------------------------

namespace {

//! A parameter owned by the test, exposed as a NamedParameter.
struct OwnedParameter {
  std::string name;
  std::vector<double> value, grad;
  NamedParameter<double> view() {
    return {name, TensorView<double>(value.data(), {static_cast<std::int64_t>(value.size())}),
            TensorView<double>(grad.data(), {static_cast<std::int64_t>(grad.size())})};
  }
};

}  // namespace

TEST_CASE("AdamW: two steps match the update computed by hand", "[optim]") {
  HostContext ctx;
  OwnedParameter w{"blocks.0.attn.qkv.weight", {1.0, -2.0, 0.0}, {0.5, 0.1, -0.25}};
  const double lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
  optim::AdamW<double> opt(ctx, {w.view()}, {.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd});
  CHECK(ctx.meter().current(MemoryCategory::Other) == 2 * 3 * sizeof(double));  // the two moments
  CHECK(opt.decays(0));

  std::vector<double> p = w.value, m(3, 0.0), v(3, 0.0);
  const std::vector<std::vector<double>> grads = {{0.5, 0.1, -0.25}, {-0.3, 0.2, 0.0}};
  for (int t = 1; t <= 2; ++t) {
    w.grad = grads[static_cast<std::size_t>(t - 1)];
    opt.step();
    for (std::size_t k = 0; k < 3; ++k) {  // PyTorch's formulation: decay, then lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
      const double g = grads[static_cast<std::size_t>(t - 1)][k];
      m[k] = b1 * m[k] + (1 - b1) * g;
      v[k] = b2 * v[k] + (1 - b2) * g * g;
      const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
      p[k] = p[k] * (1 - lr * wd);
      p[k] -= lr / bc1 * m[k] / (std::sqrt(v[k]) / std::sqrt(bc2) + eps);
      CHECK(w.value[k] == Approx(p[k]).epsilon(1e-13).margin(1e-15));
    }
  }
  // The first step, by hand: m / bc1 = g and v / bc2 = g^2, so the update is lr * sign(g).
  CHECK(opt.steps_taken() == 2);
  OwnedParameter x{"head.weight", {1.0}, {0.5}};
  optim::AdamW<double> one(ctx, {x.view()}, {.lr = 0.1, .weight_decay = 0.1});
  one.step();
  CHECK(x.value[0] == Approx(1.0 * (1 - 0.01) - 0.1 * 0.5 / (0.5 + 1e-8)).epsilon(1e-14));
  CHECK(x.value[0] == Approx(0.89).epsilon(1e-8));
}

TEST_CASE("AdamW: no weight decay for biases, norms, cls_token and pos_embed", "[optim]") {
  using optim::default_weight_decay;
  for (const char* name : {"blocks.3.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "head.weight", "patch_embed.proj.weight"})
    CHECK(default_weight_decay(name));
  for (const char* name : {"blocks.3.attn.qkv.bias", "head.bias", "blocks.0.norm1.weight", "blocks.0.norm2.bias",
                           "norm.weight", "fc_norm.weight", "cls_token", "pos_embed", "dist_token"})
    CHECK_FALSE(default_weight_decay(name));

  HostContext ctx;
  // With zero gradients the moments stay 0 and only the decay moves a parameter.
  std::vector<OwnedParameter> owned = {{"head.weight", {2.0}, {0.0}},  {"head.bias", {2.0}, {0.0}},
                                       {"norm.weight", {2.0}, {0.0}},  {"cls_token", {2.0}, {0.0}},
                                       {"pos_embed", {2.0}, {0.0}},    {"blocks.1.mlp.fc2.weight", {2.0}, {0.0}}};
  std::vector<NamedParameter<double>> views;
  for (auto& o : owned) views.push_back(o.view());
  optim::AdamW<double> opt(ctx, views, {.lr = 0.5, .weight_decay = 0.1});
  opt.step();
  CHECK(owned[0].value[0] == Approx(2.0 * (1 - 0.05)));
  for (std::size_t i = 1; i <= 4; ++i) CHECK(owned[i].value[0] == 2.0);
  CHECK(owned[5].value[0] == Approx(1.9));

  // A custom rule replaces the default; zero_grad clears every gradient.
  owned[1].grad[0] = 3.0;
  optim::AdamW<double> all(ctx, views, {.lr = 0.5, .weight_decay = 0.1}, [](std::string_view) { return true; });
  for (std::size_t i = 0; i < views.size(); ++i) CHECK(all.decays(i));
  all.zero_grad();
  CHECK(owned[1].grad[0] == 0.0);

  CHECK_THROWS_WITH(optim::AdamW<double>(ctx, {views[0], views[0]}), Contains("'head.weight' was given twice"));
  CHECK_THROWS_WITH(optim::AdamW<double>(ctx, views, {.beta2 = 1.0}), Contains("betas must lie in [0, 1)"));
  CHECK_THROWS_WITH(optim::AdamW<double>(ctx, views, {.lr = -1}), Contains("learning rate"));
}

TEST_CASE("warmup-cosine learning rate: warmup start and end, cosine middle and end", "[optim]") {
  const optim::WarmupCosine s({.base_lr = 1e-3, .warmup_steps = 10, .total_steps = 110, .min_lr = 1e-5});
  CHECK(s(0) == Approx(1e-4));    // (0 + 1) / 10 of base: the first step already learns
  CHECK(s(4) == Approx(5e-4));
  CHECK(s(9) == Approx(1e-3));    // warmup ends at base
  CHECK(s(10) == Approx(1e-3));   // cosine starts at base
  CHECK(s(60) == Approx(1e-5 + (1e-3 - 1e-5) / 2));
  CHECK(s(109) == Approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + std::cos(3.14159265358979323846 * 99 / 100))));
  CHECK(s(110) == Approx(1e-5));  // the end of the cosine
  CHECK(s(100000) == Approx(1e-5));
  for (std::int64_t t = 10; t < 110; ++t) CHECK(s(t + 1) <= s(t));

  const optim::WarmupCosine none({.base_lr = 0.5, .warmup_steps = 0, .total_steps = 4});
  CHECK(none(0) == Approx(0.5));
  CHECK(none(2) == Approx(0.25));
  CHECK(none(4) == 0.0);

  CHECK_THROWS_WITH(optim::WarmupCosine({.base_lr = 1, .warmup_steps = 5, .total_steps = 5}), Contains("warmup_steps"));
  CHECK_THROWS_WITH(optim::WarmupCosine({.base_lr = 1, .total_steps = 5, .min_lr = 2}), Contains("min_lr"));
  CHECK_THROWS_WITH(s(-1), Contains("negative step"));
}

TEST_CASE("clip_grad_norm scales all gradients together and returns the norm before clipping", "[optim]") {
  OwnedParameter a{"a", {0, 0}, {3.0, 4.0}}, b{"b", {0}, {12.0}};
  const std::vector<NamedParameter<double>> params = {a.view(), b.view()};
  CHECK(optim::clip_grad_norm(params, 100.0) == Approx(13.0));  // sqrt(9 + 16 + 144)
  CHECK(a.grad == std::vector<double>{3.0, 4.0});                // below the limit: untouched
  CHECK(optim::clip_grad_norm(params, 1.3) == Approx(13.0));
  const double scale = 1.3 / (13.0 + 1e-6);
  CHECK(a.grad[0] == Approx(3.0 * scale));
  CHECK(a.grad[1] == Approx(4.0 * scale));
  CHECK(b.grad[0] == Approx(12.0 * scale));
  CHECK(optim::clip_grad_norm(params, 100.0) == Approx(1.3).epsilon(1e-6));  // the new norm

  b.grad[0] = std::numeric_limits<double>::quiet_NaN();
  const std::vector<double> before = a.grad;
  CHECK(std::isnan(optim::clip_grad_norm(params, 1.0)));
  CHECK(a.grad == before);  // left for the caller to handle
  CHECK_THROWS_WITH(optim::clip_grad_norm(params, 0.0), Contains("max_norm must be positive"));
}

TEST_CASE("Fashion-MNIST errors name the file and the sizes; a directory is 'is a directory'",
          "[fashion-mnist][errors]") {
  TempDir dir;
  write_fake_fashion_mnist(dir, 40, 20);
  SECTION("a directory in a file's place") {
    const std::string path = dir.file("t10k-labels-idx1-ubyte.gz");
    std::filesystem::remove(path);
    std::filesystem::create_directory(path);
    try {
      (void)data::load_fashion_mnist(dir.str());
      FAIL("a directory in place of a file was accepted");
    } catch (const Error& e) {
      INFO(e.what());
      CHECK_THAT(std::string(e.what()), Contains("'" + path + "' is a directory"));
      CHECK_THAT(std::string(e.what()), !Contains("not found"));
    }
    CHECK_THROWS_WITH(data::load_labelled_images(dir.file("t10k-images-idx3-ubyte.gz"), path, 10),
                      Contains(path) && Contains("is a directory"));
  }
  SECTION("the directory itself missing, or a file") {
    CHECK_THROWS_WITH(data::load_fashion_mnist(dir.file("absent")),
                      Contains(dir.file("absent")) && Contains("not found"));
    CHECK_THROWS_WITH(data::load_fashion_mnist(dir.file("train-images-idx3-ubyte.gz")),
                      Contains(dir.file("train-images-idx3-ubyte.gz")) && Contains("not a directory"));
  }
  SECTION("training and test images of different sizes: both files and both sizes") {
    data::write_idx(dir.file("t10k-images-idx3-ubyte.gz"), {20, 5, 3}, std::vector<std::uint8_t>(300, 0),
                    data::IdxCompression::Gzip);
    CHECK_THROWS_WITH(data::load_fashion_mnist(dir.str()),
                      Contains(dir.file("train-images-idx3-ubyte.gz")) && Contains("are 4x3") &&
                          Contains(dir.file("t10k-images-idx3-ubyte.gz")) && Contains("are 5x3"));
  }
  SECTION("images of no pixels") {
    data::write_idx(dir.file("t10k-images-idx3-ubyte.gz"), {20, 0, 3}, {}, data::IdxCompression::Gzip);
    CHECK_THROWS_WITH(data::load_fashion_mnist(dir.str()),
                      Contains(dir.file("t10k-images-idx3-ubyte.gz")) && Contains("[20, 0, 3]"));
  }
}
