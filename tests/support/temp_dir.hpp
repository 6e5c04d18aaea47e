#pragma once
// A fresh directory under the system's temporary directory, removed with everything in it
// when the object goes out of scope: where tests write checkpoints, data files and links.

#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <system_error>

namespace dr2net::testing {

class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path = std::filesystem::temp_directory_path() /
           ("dr2net-test-" + std::to_string(rd()) + "-" + std::to_string(rd()));
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  //! The path of `name` inside the directory, as a string.
  std::string file(const std::string& name) const { return (path / name).string(); }
  //! The names of the directory's entries.
  std::set<std::string> entries() const {
    std::set<std::string> out;
    for (const auto& e : std::filesystem::directory_iterator(path)) out.insert(e.path().filename().string());
    return out;
  }

  std::filesystem::path path;
};

}  // namespace dr2net::testing
