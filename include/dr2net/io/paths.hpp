#pragma once
//! \file
//! Whether two paths name the same file, and a check that a program's output does not replace
//! one of its inputs.
//!
//! Two paths are the same file when both exist and std::filesystem::equivalent says so (one
//! device and inode: `./a` and `a`, a symbolic link and its target, two hard links), or, when
//! one does not exist yet, when their weakly canonical forms (absolute, `.`/`..` removed,
//! symbolic links of the existing part resolved) are equal.

#include <filesystem>
#include <initializer_list>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "dr2net/core/error.hpp"

namespace dr2net::io {

//! Whether `a` and `b` name the same file (see the file comment). Paths that cannot be
//! examined (a permission error part way) compare by their lexically normal absolute forms.
inline bool same_file(const std::filesystem::path& a, const std::filesystem::path& b) {
  namespace fs = std::filesystem;
  std::error_code ec_a, ec_b;
  const bool a_exists = fs::exists(a, ec_a), b_exists = fs::exists(b, ec_b);
  if (a_exists && b_exists) {
    std::error_code ec;
    const bool same = fs::equivalent(a, b, ec);
    if (!ec) return same;
  }
  // Absolute first: weakly_canonical leaves a relative path with no existing prefix relative.
  std::error_code ec;
  const fs::path aa = fs::absolute(a, ec).lexically_normal(), ab = fs::absolute(b, ec).lexically_normal();
  const fs::path ca = fs::weakly_canonical(aa, ec);
  if (!ec) {
    const fs::path cb = fs::weakly_canonical(ab, ec);
    if (!ec) return ca == cb;
  }
  return aa == ab;
}

//! One input of a program: the flag (or role) that named it and its path.
struct NamedPath {
  std::string_view flag;       //!< Flag or role quoted in the error ("--data"); not owned.
  std::filesystem::path path;  //!< The input's path; an empty one is skipped by require_distinct_output().
};

//! Throws dr2net::Error, naming both flags and both paths, when `output` (given by
//! `output_flag`) is the same file as one of `inputs` (empty input paths are skipped):
//! writing it would replace that input.
inline void require_distinct_output(std::string_view output_flag, const std::filesystem::path& output,
                                    std::initializer_list<NamedPath> inputs) {
  if (output.empty()) return;
  for (const NamedPath& in : inputs) {
    if (in.path.empty()) continue;
    DR2NET_CHECK(!same_file(output, in.path), output_flag, " '", output.string(), "' is the same file as ", in.flag,
                 " '", in.path.string(), "': writing it would replace that input; choose another ", output_flag);
  }
}

}  // namespace dr2net::io
