#pragma once
//! \file
//! Reading and writing IDX files, the format of MNIST and Fashion-MNIST, plain or
//! gzip-compressed (zlib reads both through one path: gzread passes plain files through).
//!
//! Layout (all integers big-endian):
//!   bytes 0-1  zero
//!   byte  2    element type: 0x08 unsigned byte (the only one supported here), 0x09 signed
//!              byte, 0x0B i16, 0x0C i32, 0x0D f32, 0x0E f64
//!   byte  3    number of dimensions n
//!   n u32      the dimensions, outermost first
//!   then       prod(dims) elements, row-major
//!
//! Files come from outside, so every problem is a dr2net::Error naming the file and what was
//! wrong: missing or unreadable file, bad magic, unsupported element type, no dimensions, a
//! declared size above IdxReadOptions::max_bytes (checked before anything is allocated, and
//! the data buffer grows only with bytes actually read), truncated data, and trailing data
//! after the declared elements (an error on purpose: a file longer than its header says is
//! more likely a wrong or damaged file than a valid one; zlib itself ignores bytes after the
//! end of a gzip stream, so for .gz files this concerns the decompressed content).
//!
//! Needs zlib: link ZLIB::ZLIB.

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "dr2net/core/error.hpp"

namespace dr2net::data {

//! The element type code of unsigned bytes, the only one read_idx accepts.
inline constexpr std::uint8_t kIdxUnsignedByte = 0x08;

//! An n-dimensional array of unsigned bytes as stored in an IDX file.
struct IdxArray {
  std::vector<std::int64_t> dims;  //!< outermost first
  std::vector<std::uint8_t> data;  //!< prod(dims) elements, row-major

  //! Number of elements, prod(dims).
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (std::int64_t d : dims) n *= d;
    return n;
  }
};

//! Limits that read_idx applies to a file before it allocates or reads its data.
struct IdxReadOptions {
  //! Largest data size accepted, in bytes: a guard against headers declaring absurd sizes.
  //! The default (1 GiB) is 20 times Fashion-MNIST's training images.
  std::size_t max_bytes = std::size_t{1} << 30;
};

//! Whether write_idx writes the file plain (None) or as a gzip stream (Gzip, as the
//! distribution's `.gz` files); read_idx reads either without being told.
enum class IdxCompression { None, Gzip };

namespace detail {

//! Closes a gzFile when it goes out of scope.
class GzFile {
 public:
  GzFile(const std::string& path, const char* mode) : f_(gzopen(path.c_str(), mode)) {}
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;
  ~GzFile() {
    if (f_ != nullptr) gzclose(f_);
  }
  gzFile get() const noexcept { return f_; }
  //! Closes now and returns gzclose's result (Z_OK on success), for writers that must know.
  int close() noexcept {
    const int rc = f_ != nullptr ? gzclose(f_) : Z_OK;
    f_ = nullptr;
    return rc;
  }

 private:
  gzFile f_;
};

//! zlib's message for the last error on `f`, or "" when there was none.
inline std::string gz_error_text(gzFile f) {
  int code = Z_OK;
  const char* msg = gzerror(f, &code);
  if (code == Z_OK) return "";
  if (code == Z_ERRNO) return std::strerror(errno);
  return msg != nullptr ? msg : "zlib error";
}

//! Reads up to `n` bytes into `dst`; returns how many were read (fewer only at the end of
//! the data). Throws when zlib reports an error (a damaged gzip stream, a read failure).
inline std::size_t gz_read_some(gzFile f, std::uint8_t* dst, std::size_t n, const std::string& path,
                                const char* what) {
  std::size_t done = 0;
  while (done < n) {
    // gzread takes an unsigned count and returns an int: read in chunks well below INT_MAX.
    const auto want = static_cast<unsigned>(std::min<std::size_t>(n - done, std::size_t{1} << 24));
    const int got = gzread(f, dst + done, want);
    if (got < 0)
      DR2NET_FAIL("IDX file '", path, "': cannot read ", what, " (", n, " bytes wanted, ", done, " read): ",
                  gz_error_text(f));
    if (got == 0) break;
    done += static_cast<std::size_t>(got);
  }
  return done;
}

inline const char* idx_type_name(std::uint8_t type) {
  switch (type) {
    case 0x08: return "unsigned byte";
    case 0x09: return "signed byte";
    case 0x0B: return "16-bit integer";
    case 0x0C: return "32-bit integer";
    case 0x0D: return "32-bit float";
    case 0x0E: return "64-bit float";
    default: return nullptr;
  }
}

inline std::string format_dims(const std::vector<std::int64_t>& dims) {
  std::string s = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline std::string hex_byte(std::uint8_t b) {
  const char* digits = "0123456789ABCDEF";
  return std::string("0x") + digits[b >> 4] + digits[b & 15];
}

}  // namespace detail

//! Reads the unsigned-byte IDX file at `path`, gzip-compressed or plain. Throws dr2net::Error
//! naming the file and the problem (see the file comment for the cases).
inline IdxArray read_idx(const std::string& path, const IdxReadOptions& options = {}) {
  std::error_code ec;
  const bool exists = std::filesystem::exists(path, ec);
  DR2NET_CHECK(!ec, "IDX file '", path, "' cannot be examined: ", ec.message());
  DR2NET_CHECK(exists, "IDX file '", path, "' does not exist");
  DR2NET_CHECK(!std::filesystem::is_directory(path, ec), "IDX file '", path, "' is a directory, not a file");
  detail::GzFile file(path, "rb");
  DR2NET_CHECK(file.get() != nullptr, "IDX file '", path, "' cannot be opened: ", std::strerror(errno));
  const gzFile f = file.get();

  std::uint8_t magic[4] = {};
  const std::size_t got_magic = detail::gz_read_some(f, magic, 4, path, "the header");
  DR2NET_CHECK(got_magic == 4, "IDX file '", path, "' is truncated: ", got_magic,
               " bytes, too short for the 4-byte magic number");
  DR2NET_CHECK(magic[0] == 0 && magic[1] == 0, "IDX file '", path, "' has a bad magic number (first bytes ",
               detail::hex_byte(magic[0]), " ", detail::hex_byte(magic[1]),
               "; an IDX file starts with two zero bytes): not an IDX file");
  const char* type_name = detail::idx_type_name(magic[2]);
  DR2NET_CHECK(type_name != nullptr, "IDX file '", path, "' has a bad magic number: unknown element type ",
               detail::hex_byte(magic[2]));
  DR2NET_CHECK(magic[2] == kIdxUnsignedByte, "IDX file '", path, "' holds elements of type ",
               detail::hex_byte(magic[2]), " (", type_name, "); only unsigned byte (0x08) is supported");
  const int ndims = magic[3];
  DR2NET_CHECK(ndims > 0, "IDX file '", path, "' declares 0 dimensions (magic byte 3); at least 1 is needed");

  std::vector<std::uint8_t> header(static_cast<std::size_t>(ndims) * 4);
  const std::size_t got_dims = detail::gz_read_some(f, header.data(), header.size(), path, "the dimensions");
  DR2NET_CHECK(got_dims == header.size(), "IDX file '", path, "' is truncated in its header: ", ndims,
               " dimensions need ", header.size(), " bytes, found ", got_dims);
  IdxArray out;
  std::size_t bytes = 1;
  bool too_large = false;
  for (int i = 0; i < ndims; ++i) {
    const std::uint8_t* p = header.data() + 4 * i;
    const std::uint32_t d = (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) |
                            std::uint32_t{p[3]};
    out.dims.push_back(static_cast<std::int64_t>(d));
    // Multiply with an overflow-proof bound check: a u32 product of up to 255 factors can wrap.
    if (d != 0 && bytes > options.max_bytes / d) too_large = true;
    else bytes *= d;
  }
  if (std::find(out.dims.begin(), out.dims.end(), 0) != out.dims.end()) {
    too_large = false;
    bytes = 0;
  }
  DR2NET_CHECK(!too_large, "IDX file '", path, "' declares absurd dimensions ", detail::format_dims(out.dims),
               ": more than the ", options.max_bytes, "-byte limit (IdxReadOptions::max_bytes)");

  // Grow the buffer only as data arrives, so a lying header cannot make us allocate its claim.
  std::size_t have = 0;
  while (have < bytes) {
    if (have == out.data.size())
      out.data.resize(std::min(bytes, std::max<std::size_t>(2 * out.data.size(), std::size_t{1} << 20)));
    const std::size_t got = detail::gz_read_some(f, out.data.data() + have, out.data.size() - have, path, "the data");
    have += got;
    if (got == 0) break;
  }
  if (have < bytes) {
    const std::string why = detail::gz_error_text(f);
    DR2NET_FAIL("IDX file '", path, "' is truncated: dimensions ", detail::format_dims(out.dims), " need ", bytes,
                " data bytes, found ", have, why.empty() ? "" : " (" + why + ")");
  }
  out.data.resize(bytes);
  std::uint8_t extra[64];
  const std::size_t trailing = detail::gz_read_some(f, extra, sizeof extra, path, "past the data");
  DR2NET_CHECK(trailing == 0, "IDX file '", path, "' has trailing data after the ", bytes,
               " bytes its dimensions ", detail::format_dims(out.dims), " declare");
  return out;
}

//! Writes `data` (prod(dims) unsigned bytes) as an IDX file at `path`, replacing it.
//! Dimensions must be in [0, 2^32) and at most 255 of them (the format's limits).
inline void write_idx(const std::string& path, const std::vector<std::int64_t>& dims, std::span<const std::uint8_t> data,
                      IdxCompression compression = IdxCompression::None) {
  DR2NET_CHECK(!dims.empty() && dims.size() <= 255, "write_idx '", path, "': ", dims.size(),
               " dimensions, the format allows 1 to 255");
  std::vector<std::uint8_t> header = {0, 0, kIdxUnsignedByte, static_cast<std::uint8_t>(dims.size())};
  std::size_t numel = 1;
  for (std::int64_t d : dims) {
    DR2NET_CHECK(d >= 0 && d <= 0xFFFFFFFFll, "write_idx '", path, "': dimension ", d, " out of the u32 range");
    const auto u = static_cast<std::uint32_t>(d);
    for (int shift = 24; shift >= 0; shift -= 8) header.push_back(static_cast<std::uint8_t>(u >> shift));
    numel *= static_cast<std::size_t>(d);
  }
  DR2NET_CHECK(numel == data.size(), "write_idx '", path, "': dimensions ", detail::format_dims(dims), " hold ",
               numel, " elements but ", data.size(), " were given");
  // "T" makes zlib write the bytes as they are: one code path for both forms.
  detail::GzFile file(path, compression == IdxCompression::Gzip ? "wb" : "wbT");
  DR2NET_CHECK(file.get() != nullptr, "write_idx: cannot open '", path, "' for writing: ", std::strerror(errno));
  const auto put = [&](const std::uint8_t* p, std::size_t n) {
    while (n > 0) {
      const auto chunk = static_cast<unsigned>(std::min<std::size_t>(n, std::size_t{1} << 24));
      DR2NET_CHECK(gzwrite(file.get(), p, chunk) == static_cast<int>(chunk), "write_idx: cannot write '", path,
                   "': ", detail::gz_error_text(file.get()));
      p += chunk;
      n -= chunk;
    }
  };
  put(header.data(), header.size());
  put(data.data(), data.size());
  DR2NET_CHECK(file.close() == Z_OK, "write_idx: cannot finish writing '", path, "' (", header.size() + data.size(),
               " bytes): ", std::strerror(errno));
}

}  // namespace dr2net::data
