// examples/02_vit_finetune with inputs that do not fit: a checkpoint whose patch embedding is
// for other images than the data's, data of a size the example cannot take, a directory where a
// data file should be. Each is refused with a message naming the file and the sizes; none may
// read past a buffer (the sanitizer build runs this test too).
#include <catch2/catch.hpp>

#include <sys/wait.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dr2net/data/idx.hpp"
#include "vit_classifier.hpp"
#include "support/temp_dir.hpp"

namespace fs = std::filesystem;

namespace {

using dr2net::testing::TempDir;

//! A miniature Fashion-MNIST in `dir`: n images of h x w pixels per set, labels i mod 10.
void write_data(const fs::path& dir, std::int64_t n, std::int64_t h, std::int64_t w) {
  fs::create_directories(dir);
  std::vector<std::uint8_t> px(static_cast<std::size_t>(n * h * w)), lb(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < px.size(); ++i) px[i] = static_cast<std::uint8_t>(i * 37 % 251);
  for (std::size_t i = 0; i < lb.size(); ++i) lb[i] = static_cast<std::uint8_t>(i % 10);
  for (const char* prefix : {"train", "t10k"}) {
    dr2net::data::write_idx((dir / (std::string(prefix) + "-images-idx3-ubyte.gz")).string(), {n, h, w}, px,
                            dr2net::data::IdxCompression::Gzip);
    dr2net::data::write_idx((dir / (std::string(prefix) + "-labels-idx1-ubyte.gz")).string(), {n}, lb,
                            dr2net::data::IdxCompression::Gzip);
  }
}

//! A classifier checkpoint written by the example's own save(), for images of the given size.
void write_checkpoint(const std::string& path, std::int64_t image, std::int64_t channels, std::int64_t patch) {
  dr2net::HostContext ctx;
  example::ModelConfig c;
  c.image = image;
  c.channels = channels;
  c.patch = patch;
  c.dim = 16;
  c.heads = 2;
  c.hidden = 32;
  c.layers = 1;
  example::VitClassifier<> model(ctx, c, dr2net::AnySchedule(dr2net::ConstantSchedule(1.0, 0.0)),
                                 {.mode = dr2net::BackpropMode::Standard}, 3);
  model.save(path);
}

struct Result {
  int status;
  std::string err;
};

Result run_demo(const TempDir& dir, const std::string& args) {
  const std::string err = dir.file("stderr.txt");
  const int rc = std::system((std::string(DR2NET_DEMO_PATH) + " " + args + " > /dev/null 2> " + err).c_str());
  std::ifstream f(err);
  std::stringstream ss;
  ss << f.rdbuf();
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, ss.str()};
}

}  // namespace

TEST_CASE("the demo refuses a checkpoint whose patch embedding does not fit the 28x28x1 data", "[demo]") {
  TempDir dir;
  write_data(dir.path / "data", 20, 28, 28);
  struct Case {
    std::int64_t image, channels, patch;
    std::string needle;
  };
  for (const Case& c : {Case{32, 1, 4, "embeds 32x32 images of 1 channel(s) in patches of 4"},
                        Case{28, 3, 7, "embeds 28x28 images of 3 channel(s) in patches of 7"},
                        Case{14, 1, 7, "embeds 14x14 images of 1 channel(s) in patches of 7"}}) {
    const std::string ckpt = dir.file("ckpt-" + std::to_string(c.image) + "-" + std::to_string(c.channels) + ".safetensors");
    write_checkpoint(ckpt, c.image, c.channels, c.patch);
    const auto r = run_demo(dir, "--data " + dir.file("data") + " --skip-pretrain --out " + ckpt +
                                     " --finetune-epochs 1 --batch 4");
    INFO(r.err);
    CHECK(r.status == 1);  // an error, not a crash (a signal gives -1, a sanitizer report another status)
    CHECK(r.err.find("checkpoint '" + ckpt + "'") != std::string::npos);
    CHECK(r.err.find(c.needle) != std::string::npos);
    CHECK(r.err.find("are 28x28 images of 1 channel") != std::string::npos);
  }
}

TEST_CASE("the demo names the file and the sizes of data it cannot take", "[demo]") {
  TempDir dir;
  SECTION("non-square images") {
    write_data(dir.path / "data", 20, 4, 3);
    const auto r = run_demo(dir, "--data " + dir.file("data") + " --out " + dir.file("c.safetensors"));
    INFO(r.err);
    CHECK(r.status == 1);
    CHECK(r.err.find("train-images-idx3-ubyte.gz") != std::string::npos);
    CHECK(r.err.find(dir.file("data")) != std::string::npos);
    CHECK(r.err.find("4x3") != std::string::npos);
  }
  SECTION("a directory in place of a data file") {
    write_data(dir.path / "data", 20, 28, 28);
    const std::string labels = dir.file("data/train-labels-idx1-ubyte.gz");
    fs::remove(labels);
    fs::create_directory(labels);
    const auto r = run_demo(dir, "--data " + dir.file("data") + " --out " + dir.file("c.safetensors"));
    INFO(r.err);
    CHECK(r.status == 1);
    CHECK(r.err.find("'" + labels + "' is a directory") != std::string::npos);
    CHECK(r.err.find("not found") == std::string::npos);
  }
  SECTION("--out one of the data files: refused before anything is written") {
    write_data(dir.path / "data", 20, 28, 28);
    const std::string images = dir.file("data/train-images-idx3-ubyte.gz");
    const auto before = fs::file_size(images);
    const auto r = run_demo(dir, "--data " + dir.file("data") + " --out " + dir.file("data/./train-images-idx3-ubyte.gz"));
    INFO(r.err);
    CHECK(r.status == 2);
    CHECK(r.err.find("is the same file as --data '" + images + "'") != std::string::npos);
    CHECK(fs::file_size(images) == before);
  }
}

TEST_CASE("VitClassifier refuses a batch of images of another size than its configuration", "[demo]") {
  dr2net::HostContext ctx;
  example::ModelConfig c;
  c.image = 32;
  c.patch = 8;
  c.dim = 8;
  c.heads = 2;
  c.hidden = 16;
  c.layers = 1;
  example::VitClassifier<> model(ctx, c, dr2net::AnySchedule(dr2net::ConstantSchedule(0.0, 1.0)), {}, 5);
  const std::vector<float> images(2 * 28 * 28, 0.5f);  // two 28x28 images, not 32x32
  const std::vector<std::int32_t> labels{1, 2};
  CHECK_THROWS_WITH(model.train_step(images, labels, 0),
                    Catch::Matchers::Contains("holds 1568 values") && Catch::Matchers::Contains("32x32"));
  CHECK_THROWS_WITH(model.predict_correct(images, labels, 0), Catch::Matchers::Contains("holds 1568 values"));
}

TEST_CASE("the demo refuses, before training, data without images of a class range it uses", "[demo][hardening]") {
  TempDir dir;
  const fs::path data = dir.path / "data";
  write_data(data, 20, 28, 28);
  const std::string out = " > " + dir.file("stdout.txt");
  auto stdout_text = [&] {
    std::ifstream f(dir.file("stdout.txt"));
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  };
  SECTION("a test set without classes 5-9: its accuracy would be NaN") {
    std::vector<std::uint8_t> px(20 * 28 * 28, 7), lb(20);
    for (std::size_t i = 0; i < lb.size(); ++i) lb[i] = static_cast<std::uint8_t>(i % 5);
    dr2net::data::write_idx((data / "t10k-images-idx3-ubyte.gz").string(), {20, 28, 28}, px,
                            dr2net::data::IdxCompression::Gzip);
    dr2net::data::write_idx((data / "t10k-labels-idx1-ubyte.gz").string(), {20}, lb, dr2net::data::IdxCompression::Gzip);
    const int rc = std::system((std::string(DR2NET_DEMO_PATH) + " --data " + data.string() + " --out " +
                                dir.file("c.safetensors") + " --pretrain-epochs 1 --finetune-epochs 1 --batch 4" + out +
                                " 2> " + dir.file("stderr.txt"))
                                   .c_str());
    std::ifstream f(dir.file("stderr.txt"));
    std::stringstream err;
    err << f.rdbuf();
    INFO(err.str());
    CHECK((WIFEXITED(rc) ? WEXITSTATUS(rc) : -1) == 1);
    CHECK(err.str().find("t10k-images-idx3-ubyte.gz") != std::string::npos);
    CHECK(err.str().find("holds no test images of classes 5-9") != std::string::npos);
    CHECK(stdout_text().find("nan") == std::string::npos);
    CHECK(stdout_text().find("stage 1") == std::string::npos);  // refused before pretraining
    CHECK(!fs::exists(dir.file("c.safetensors")));
  }
  SECTION("a batch larger than a training set is refused naming --batch, before pretraining") {
    const auto r = run_demo(dir, "--data " + data.string() + " --out " + dir.file("c.safetensors") + " --batch 11");
    INFO(r.err);
    CHECK(r.status == 1);
    CHECK(r.err.find("--batch 11 is larger than the 10 training images of classes 0-4") != std::string::npos);
    CHECK(!fs::exists(dir.file("c.safetensors")));
  }
}
