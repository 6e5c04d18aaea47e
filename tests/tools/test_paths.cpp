// include/dr2net/io/paths.hpp: an output path that is the same file as an input is refused,
// whatever way it is spelled or linked.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "dr2net/io/paths.hpp"
#include "support/temp_dir.hpp"

namespace fs = std::filesystem;
using dr2net::io::require_distinct_output;
using dr2net::io::same_file;

namespace {

using dr2net::testing::TempDir;

void write(const fs::path& p, const std::string& text) { std::ofstream(p) << text; }

std::string read(const fs::path& p) {
  std::ifstream f(p);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

//! The message of the error require_distinct_output throws, or "" when it does not.
std::string refusal(const fs::path& out, const fs::path& in) {
  try {
    require_distinct_output("--out", out, {{"--weights", in}});
  } catch (const dr2net::Error& e) {
    return e.detail();
  }
  return "";
}

}  // namespace

TEST_CASE("same_file: one file however it is named", "[paths]") {
  TempDir dir;
  const fs::path a = dir.path / "a.safetensors", b = dir.path / "b.safetensors";
  write(a, "a");
  write(b, "b");
  fs::create_symlink(a, dir.path / "link");
  fs::create_hard_link(a, dir.path / "hard");
  fs::create_directories(dir.path / "sub");

  CHECK(same_file(a, a));
  CHECK(same_file(a, dir.path / "sub" / ".." / "a.safetensors"));
  CHECK(same_file(a, dir.path / "." / "a.safetensors"));
  CHECK(same_file(a, dir.path / "link"));
  CHECK(same_file(dir.path / "link", dir.path / "hard"));
  CHECK(same_file(a, dir.path / "hard"));
  CHECK_FALSE(same_file(a, b));
  CHECK_FALSE(same_file(a, dir.path / "absent"));
  // Neither exists yet: compared by their weakly canonical forms.
  CHECK(same_file(dir.path / "new.json", dir.path / "sub" / ".." / "new.json"));
  CHECK(same_file(dir.path / "link-dir-absent" / "x", dir.path / "link-dir-absent" / "." / "x"));
  CHECK_FALSE(same_file(dir.path / "new.json", dir.path / "new.png"));

  // Relative spellings: ./a vs a from the working directory.
  const fs::path cwd = fs::current_path();
  fs::current_path(dir.path);
  CHECK(same_file("a.safetensors", "./a.safetensors"));
  CHECK(same_file("new.json", "./new.json"));  // neither exists
  CHECK_FALSE(same_file("a.safetensors", "b.safetensors"));
  fs::current_path(cwd);
}

TEST_CASE("require_distinct_output: refuses an output that is an input, naming both, and leaves the input alone",
          "[paths]") {
  TempDir dir;
  const fs::path w = dir.path / "w.safetensors";
  write(w, "weights");
  fs::create_symlink(w, dir.path / "link.safetensors");
  fs::create_hard_link(w, dir.path / "hard.safetensors");
  for (const fs::path& out : {w, dir.path / "." / "w.safetensors", dir.path / "link.safetensors",
                              dir.path / "hard.safetensors"}) {
    INFO(out.string());
    const std::string why = refusal(out, w);
    CHECK(why.find("--out '" + out.string() + "'") != std::string::npos);
    CHECK(why.find("--weights '" + w.string() + "'") != std::string::npos);
    CHECK(why.find("same file") != std::string::npos);
    CHECK(read(w) == "weights");
  }
  CHECK(refusal(dir.path / "r.safetensors", w).empty());
  CHECK(refusal(dir.path / "r.safetensors", "").empty());  // an input not given
  CHECK(refusal("", w).empty());                           // an output not given
}
