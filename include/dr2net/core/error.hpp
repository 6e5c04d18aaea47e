#pragma once
//! \file
//! The library's one exception type and the checks that raise it.
//!
//! Every error says what was wrong and where: the message carries the source
//! location of the check, and callers add the module index, tensor name,
//! shape, coefficient or step that the failure concerns.

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace dr2net {

//! Raised for every misuse and every failed runtime check in dr2net.
class Error : public std::runtime_error {
 public:
  //! Builds the error for message `what` raised at `file`:`line`; what() then reads
  //! "dr2net: <what> [<file>:<line>]". Normally raised through DR2NET_CHECK or DR2NET_FAIL,
  //! which pass `__FILE__` and `__LINE__`.
  Error(std::string what, const char* file, int line)
      : std::runtime_error("dr2net: " + what + " [" + file + ":" + std::to_string(line) + "]"),
        detail_(std::move(what)) {}

  //! The message without the "dr2net:" prefix and the source location.
  const std::string& detail() const noexcept { return detail_; }

 private:
  std::string detail_;
};

namespace detail {

//! Concatenates any streamable arguments into one string.
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

}  // namespace detail
}  // namespace dr2net

//! Throws dr2net::Error built from the streamable arguments.
#define DR2NET_FAIL(...) \
  throw ::dr2net::Error(::dr2net::detail::concat(__VA_ARGS__), __FILE__, __LINE__)

//! Throws dr2net::Error when `cond` is false; the arguments form the message.
#define DR2NET_CHECK(cond, ...)  \
  do {                           \
    if (!(cond)) {               \
      DR2NET_FAIL(__VA_ARGS__);  \
    }                            \
  } while (0)
