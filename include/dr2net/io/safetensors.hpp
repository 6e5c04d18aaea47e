#pragma once
//! \file
//! Reading and writing checkpoints in the safetensors format.
//!
//! Layout: an 8-byte little-endian unsigned header length N, N bytes of JSON
//! header, then the data section. The header maps each tensor name to
//! `{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}` (byte offsets
//! relative to the start of the data section) and may hold a `"__metadata__"`
//! object of string to string. Tensor data is raw little-endian, row-major.
//!
//! Only the floating-point dtypes F64, F32, F16 and BF16 are supported. Values
//! are always converted: reads produce float or double from any stored dtype,
//! writes round float or double to the stored dtype (nearest, ties to even).
//!
//! Checkpoints come from outside, so the reader validates the whole header up
//! front and reports every problem as a dr2net::Error naming the file, tensor,
//! field or offset; it never reads outside the input and never allocates more
//! than the input's own size suggests. A file is not read whole: the header is
//! checked against the file size first, and tensor data is read tensor by
//! tensor when asked for. Header parsing takes time linear in its size (the
//! duplicate-key check included). Writing a file is atomic: the previous file
//! stays intact until the new one is complete on disk. Byte order is assembled
//! explicitly, so the code is correct on hosts of either endianness.
//!
//! Files are accessed through POSIX calls (open, pread, fsync, rename).
//!
//! Needs nlohmann-json: link the dr2net::io target.

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "dr2net/core/checked.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/half.hpp"
#include "dr2net/core/moved_from.hpp"

namespace dr2net::io {

//! Element types a checkpoint tensor may be stored in.
enum class DType : std::uint8_t { F64, F32, F16, BF16 };

//! The safetensors spelling of `dtype` ("F64", "F32", "F16", "BF16").
inline std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F64: return "F64";
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
  }
  DR2NET_FAIL("invalid DType value ", static_cast<int>(dtype));
}

//! Bytes per element of `dtype`.
inline std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F64: return 8;
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
  }
  DR2NET_FAIL("invalid DType value ", static_cast<int>(dtype));
}

//! The DType spelled `name`, or nothing when it is not a supported dtype.
inline std::optional<DType> try_parse_dtype(std::string_view name) {
  for (DType d : {DType::F64, DType::F32, DType::F16, DType::BF16}) {
    if (dtype_name(d) == name) return d;
  }
  return std::nullopt;
}

//! The DType spelled `name`; throws naming the unknown dtype otherwise.
inline DType parse_dtype(std::string_view name) {
  if (auto d = try_parse_dtype(name)) return *d;
  DR2NET_FAIL("unknown dtype '", name, "' (supported: F64, F32, F16, BF16)");
}

//! Formats a shape as "[2, 3]" for messages.
inline std::string format_shape(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i != 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

//! Where one tensor lives in a checkpoint.
struct TensorRecord {
  std::string name;          //!< The tensor's key in the JSON header.
  DType dtype = DType::F32;  //!< How its elements are stored; reads convert from it.
  std::vector<std::int64_t> shape;  //!< row-major; empty for a scalar
  std::size_t begin = 0;            //!< first byte, relative to the data section
  std::size_t end = 0;              //!< one past the last byte

  //! Number of elements (1 for a scalar). The reader has checked it does not overflow.
  std::size_t numel() const {
    std::size_t n = 1;
    for (std::int64_t extent : shape) n *= static_cast<std::size_t>(extent);
    return n;
  }
  //! Number of data bytes, end - begin.
  std::size_t nbytes() const { return end - begin; }
};

namespace detail {

//! The element types tensors are read into and written from.
template <class T>
inline constexpr bool is_checkpoint_scalar_v =
    std::is_same_v<T, float> || std::is_same_v<T, double>;

inline std::uint64_t load_le(const std::uint8_t* p, std::size_t width) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < width; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
  return v;
}

inline void store_le(std::uint8_t* p, std::uint64_t v, std::size_t width) {
  for (std::size_t i = 0; i < width; ++i) p[i] = static_cast<std::uint8_t>(v >> (8 * i));
}

//! Element count of `shape`, or nothing if an extent is negative or the
//! product overflows int64 (dr2net::checked's size limit). Optional rather than
//! throwing so that the reader can name the tensor and the field.
inline std::optional<std::size_t> checked_numel(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (std::int64_t extent : shape) {
    const auto r = checked::try_mul(n, extent);
    if (!r) return std::nullopt;
    n = *r;
  }
  return static_cast<std::size_t>(n);
}

//! Byte count of `numel` elements of `dtype`, or nothing on overflow (int64).
inline std::optional<std::size_t> checked_nbytes(std::size_t numel, DType dtype) {
  if (numel > static_cast<std::size_t>(std::numeric_limits<std::int64_t>::max())) return std::nullopt;
  const auto r = checked::try_mul(static_cast<std::int64_t>(numel), static_cast<std::int64_t>(dtype_size(dtype)));
  if (!r) return std::nullopt;
  return static_cast<std::size_t>(*r);
}

//! Decodes `count` little-endian elements of `dtype` at `src` into `dst`.
template <class T>
void decode(const std::uint8_t* src, DType dtype, std::size_t count, T* dst) {
  static_assert(is_checkpoint_scalar_v<T>);
  // One loop per dtype so the per-element work is a load and a conversion.
  switch (dtype) {
    case DType::F64:
      for (std::size_t i = 0; i < count; ++i) {
        const auto d = dr2net::detail::bit_copy<double>(load_le(src + 8 * i, 8));
        if constexpr (std::is_same_v<T, double>) {
          dst[i] = d;
        } else {
          dst[i] = double_to_float(d);  // well defined even beyond float's range
        }
      }
      break;
    case DType::F32:
      for (std::size_t i = 0; i < count; ++i) {
        const auto bits = static_cast<std::uint32_t>(load_le(src + 4 * i, 4));
        dst[i] = dr2net::detail::bit_copy<float>(bits);
      }
      break;
    case DType::F16:
      for (std::size_t i = 0; i < count; ++i) {
        dst[i] = half_bits_to_float(static_cast<std::uint16_t>(load_le(src + 2 * i, 2)));
      }
      break;
    case DType::BF16:
      for (std::size_t i = 0; i < count; ++i) {
        dst[i] = bf16_bits_to_float(static_cast<std::uint16_t>(load_le(src + 2 * i, 2)));
      }
      break;
  }
}

//! Rounds `count` values to `dtype` and appends them little-endian to `out`.
template <class T>
void encode(const T* src, std::size_t count, DType dtype, std::vector<std::uint8_t>& out) {
  static_assert(is_checkpoint_scalar_v<T>);
  const std::size_t width = dtype_size(dtype);
  const std::size_t start = out.size();
  out.resize(start + count * width);
  std::uint8_t* p = out.data() + start;
  for (std::size_t i = 0; i < count; ++i, p += width) {
    std::uint64_t bits = 0;
    switch (dtype) {
      case DType::F64:
        bits = dr2net::detail::bit_copy<std::uint64_t>(static_cast<double>(src[i]));
        break;
      case DType::F32:
        if constexpr (std::is_same_v<T, double>) {
          bits = dr2net::detail::bit_copy<std::uint32_t>(double_to_float(src[i]));
        } else {
          bits = dr2net::detail::bit_copy<std::uint32_t>(src[i]);
        }
        break;
      case DType::F16:
        // From double, round once: going through float would round twice.
        if constexpr (std::is_same_v<T, double>) {
          bits = double_to_half_bits(src[i]);
        } else {
          bits = float_to_half_bits(src[i]);
        }
        break;
      case DType::BF16:
        if constexpr (std::is_same_v<T, double>) {
          bits = double_to_bf16_bits(src[i]);
        } else {
          bits = float_to_bf16_bits(src[i]);
        }
        break;
    }
    store_le(p, bits, width);
  }
}

//! Describes a JSON value briefly for messages, without dumping large content.
inline std::string describe_json(const nlohmann::json& value) {
  if (value.is_number() || value.is_boolean() || value.is_null()) return value.dump();
  return std::string(value.type_name());
}

//! Reads a non-negative JSON integer no larger than `max`; `what` names the
//! field for the message.
inline std::uint64_t json_to_index(const nlohmann::json& value, std::uint64_t max,
                                   const std::string& what) {
  DR2NET_CHECK(value.is_number_unsigned(), what, " must be a non-negative integer, got ",
               describe_json(value));
  const auto v = value.get<std::uint64_t>();
  DR2NET_CHECK(v <= max, what, " = ", v, " is too large");
  return v;
}

//! A SAX pass over the JSON text that validates its syntax and rejects duplicate
//! keys, which nlohmann's DOM parser would silently resolve to the last one (a
//! checkpoint whose meaning depends on that is rejected rather than guessed at).
//!
//! Each object's keys are collected and, when the object closes, sorted and
//! compared with their neighbours: O(k log k) per object of k keys, whatever
//! the keys are (a hash set could be driven quadratic by colliding keys). This
//! replaces a parser callback: nlohmann's callback parser scans the parent
//! object after every nested object closes, which made a header of n tensor
//! entries take O(n^2) time.
class HeaderSyntaxCheck final : public nlohmann::json_sax<nlohmann::json> {
 public:
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    keys_.emplace_back();
    return true;
  }
  bool key(string_t& key) override {
    if (!keys_.empty()) keys_.back().push_back(std::move(key));
    return true;
  }
  bool end_object() override {
    if (keys_.empty()) return true;
    std::vector<std::string>& keys = keys_.back();
    std::sort(keys.begin(), keys.end());
    const auto dup = std::adjacent_find(keys.begin(), keys.end());
    DR2NET_CHECK(dup == keys.end(), "safetensors header has the key '", *dup, "' twice in one object");
    keys_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override { return true; }
  bool end_array() override { return true; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) override {
    DR2NET_FAIL("safetensors header is not valid JSON: ", e.what());
  }

 private:
  std::vector<std::vector<std::string>> keys_;
};

//! `what` failed with the OS error `err`: "what: reason".
[[noreturn]] inline void fail_os(const std::string& what, int err) {
  DR2NET_FAIL(what, ": ", std::strerror(err));
}

//! The largest header the reader accepts, as the reference implementation does: a real
//! header is a few megabytes at most; a claim of gigabytes is a corrupt or hostile file.
inline constexpr std::uint64_t kMaxHeaderSize = 100'000'000;

//! Where a reader's bytes come from: a buffer it owns, or an open file read with pread.
//!
//! pread rather than mmap: a read error or a file truncated by someone else after
//! it was opened becomes an error naming the file and the tensor, where a mapping
//! would deliver SIGBUS; and pread needs no shared file position, so const reads
//! from several threads are safe.
class ByteSource {
 public:
  explicit ByteSource(std::vector<std::uint8_t> bytes)
      : bytes_(std::move(bytes)), size_(bytes_.size()), where_("safetensors data") {}

  //! Opens `path` for reading; errors name the path and the OS reason.
  explicit ByteSource(const std::string& path) : path_(path), where_("safetensors file '" + path + "'") {
    // Refuse a FIFO or device before opening it: opening a FIFO would block.
    struct stat before {};
    if (::stat(path.c_str(), &before) != 0) fail_os("cannot open safetensors file '" + path + "'", errno);
    DR2NET_CHECK(S_ISREG(before.st_mode), "cannot open safetensors file '", path, "': not a regular file");
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) fail_os("cannot open safetensors file '" + path + "'", errno);
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      ::close(fd_);
      fail_os("cannot open safetensors file '" + path + "'", err);
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd_);
      DR2NET_FAIL("cannot open safetensors file '", path, "': not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
  }
  ~ByteSource() {
    if (fd_ >= 0) ::close(fd_);
  }
  ByteSource(const ByteSource&) = delete;
  ByteSource& operator=(const ByteSource&) = delete;

  //! Total size in bytes.
  std::size_t size() const { return size_; }
  //! "safetensors file 'path'" or "safetensors data", for messages.
  const std::string& where() const { return where_; }
  //! The whole image when it is in memory, else null.
  const std::uint8_t* memory() const { return fd_ < 0 ? bytes_.data() : nullptr; }
  //! Whether the image is in memory (memory() may still be null for an empty one).
  bool in_memory() const { return fd_ < 0; }

  //! Copies `n` bytes at `offset` into `dst`; `what` names the content for messages.
  void read(std::size_t offset, std::size_t n, std::uint8_t* dst, const std::string& what) const {
    const std::size_t end = static_cast<std::size_t>(
        checked::add(checked::to_int64(offset, "read offset"), checked::to_int64(n, "read size"), "read range"));
    DR2NET_CHECK(end <= size_, "cannot read ", what, " from ", where_, ": bytes [", offset, ", ", end,
                 ") lie beyond its ", size_, " bytes");
    if (fd_ < 0) {
      if (n != 0) std::memcpy(dst, bytes_.data() + offset, n);
      return;
    }
    std::size_t done = 0;
    while (done < n) {
      // pread may return fewer bytes than asked; Linux caps one call near 2 GiB.
      const std::size_t ask = std::min<std::size_t>(n - done, std::size_t{1} << 30);
      const ssize_t got = ::pread(fd_, dst + done, ask, static_cast<off_t>(offset + done));
      if (got < 0) {
        if (errno == EINTR) continue;
        fail_os("cannot read " + what + " from " + where_, errno);
      }
      DR2NET_CHECK(got != 0, "cannot read ", what, " from ", where_, ": the file ended at byte ",
                   offset + done, " of the ", size_, " it had when opened (changed while in use?)");
      done += static_cast<std::size_t>(got);
    }
  }

 private:
  std::vector<std::uint8_t> bytes_;
  int fd_ = -1;
  std::size_t size_ = 0;
  std::string path_;
  std::string where_;
};

}  // namespace detail

//! A validated checkpoint; tensors are read and decoded on demand.
//!
//! Opening checks the header completely (its length against the file size first,
//! then every entry's offsets against the data section) and keeps only the header's
//! records; tensor data is read when a tensor is asked for. Copies share the open file.
class SafetensorsReader {
 public:
  //! Opens `path` and validates its header without reading tensor data. Errors
  //! name the path: it cannot be opened, is not a regular file, or its content is
  //! invalid (see from_bytes); the header length is checked against the file size
  //! before anything is allocated for it.
  static SafetensorsReader from_file(const std::string& path) {
    SafetensorsReader r;
    r.source_ = std::make_shared<const detail::ByteSource>(path);
    try {
      r.parse();
    } catch (const Error& e) {
      DR2NET_FAIL("in safetensors file '", path, "': ", e.detail());
    }
    return r;
  }

  //! Takes ownership of a complete checkpoint image and validates the header,
  //! every tensor entry, and that tensors' byte ranges lie inside the data
  //! section without overlapping (gaps are allowed).
  static SafetensorsReader from_bytes(std::vector<std::uint8_t> bytes) {
    SafetensorsReader r;
    r.source_ = std::make_shared<const detail::ByteSource>(std::move(bytes));
    r.parse();
    return r;
  }

  //! "safetensors file 'path'" for a reader made by from_file, else "safetensors data".
  const std::string& where() const {
    moved_.check("SafetensorsReader::where()");
    return source_->where();
  }

  //! The `__metadata__` entries (empty if the header has none).
  const std::map<std::string, std::string>& metadata() const {
    moved_.check("SafetensorsReader::metadata()");
    return metadata_;
  }

  //! All tensor names, sorted.
  std::vector<std::string> names() const {
    moved_.check("SafetensorsReader::names()");
    std::vector<std::string> out;
    out.reserve(records_.size());
    for (const auto& [name, rec] : records_) out.push_back(name);
    return out;
  }

  //! Whether a tensor called `name` exists.
  bool contains(std::string_view name) const {
    moved_.check("SafetensorsReader::contains()");
    return records_.find(name) != records_.end();
  }

  //! The record of tensor `name`; throws "missing tensor 'name' in <where()>".
  const TensorRecord& record(std::string_view name) const {
    moved_.check("SafetensorsReader::record()");
    const auto it = records_.find(name);
    DR2NET_CHECK(it != records_.end(), "missing tensor '", name, "' in ", where());
    return it->second;
  }

  //! Throws one error listing every name in `names` that is not present.
  void require(const std::vector<std::string>& names) const {
    moved_.check("SafetensorsReader::require()");
    std::string missing;
    std::size_t count = 0;
    for (const auto& name : names) {
      if (contains(name)) continue;
      missing += (count++ == 0 ? "'" : ", '") + name + "'";
    }
    DR2NET_CHECK(count == 0, "missing ", count, count == 1 ? " tensor" : " tensors", " in ", where(), ": ",
                 missing);
  }

  //! Decodes tensor `name` into a new vector, converting from its stored dtype.
  template <class T>
  std::vector<T> read(std::string_view name) const {
    static_assert(detail::is_checkpoint_scalar_v<T>, "read<T> supports float and double");
    const TensorRecord& rec = record(name);
    std::vector<T> out(rec.numel());
    decode_tensor(rec, out.data());
    return out;
  }

  //! Decodes tensor `name` into `dst` (numel elements) after checking that its
  //! shape equals `expected_shape`.
  template <class T>
  void read_into(std::string_view name, const std::vector<std::int64_t>& expected_shape,
                 T* dst) const {
    static_assert(detail::is_checkpoint_scalar_v<T>, "read_into<T> supports float and double");
    const TensorRecord& rec = record(name);
    DR2NET_CHECK(rec.shape == expected_shape, "tensor '", name, "' in ", where(), " has shape ",
                 format_shape(rec.shape), " but shape ", format_shape(expected_shape),
                 " was expected");
    DR2NET_CHECK(dst != nullptr || rec.numel() == 0, "read_into('", name,
                 "'): destination is null");
    decode_tensor(rec, dst);
  }

 private:
  SafetensorsReader() = default;

  //! Bytes read and decoded at a time from a file: bounds the staging buffer.
  static constexpr std::size_t kChunkBytes = std::size_t{1} << 20;

  template <class T>
  void decode_tensor(const TensorRecord& rec, T* dst) const {
    const std::size_t count = rec.numel();
    if (count == 0) return;
    const auto start = static_cast<std::size_t>(checked::add(checked::to_int64(data_start_, "data section start"),
                                                             checked::to_int64(rec.begin, "tensor offset"),
                                                             "tensor position in the file"));
    if (source_->in_memory()) {
      detail::decode(source_->memory() + start, rec.dtype, count, dst);
      return;
    }
    const std::size_t width = dtype_size(rec.dtype);
    const std::size_t chunk = kChunkBytes / width;
    std::vector<std::uint8_t> buffer(std::min(count, chunk) * width);
    const std::string what = "tensor '" + rec.name + "'";
    for (std::size_t i = 0; i < count; i += chunk) {
      const std::size_t n = std::min(chunk, count - i);
      source_->read(start + i * width, n * width, buffer.data(), what);
      detail::decode(buffer.data(), rec.dtype, n, dst + i);
    }
  }

  void parse() {
    const std::size_t size = source_->size();
    DR2NET_CHECK(size >= 8, "safetensors data is truncated: ", size,
                 " bytes, fewer than the 8-byte header length prefix");
    std::uint8_t prefix[8] = {};
    source_->read(0, 8, prefix, "the header length");
    const std::uint64_t header_len = detail::load_le(prefix, 8);
    const std::size_t available = size - 8;
    DR2NET_CHECK(header_len <= available, "safetensors header length ", header_len, " exceeds the ", available,
                 " bytes after the 8-byte length prefix (", size, " bytes in all)");
    DR2NET_CHECK(header_len <= detail::kMaxHeaderSize, "safetensors header length ", header_len,
                 " exceeds the limit of ", detail::kMaxHeaderSize, " bytes");
    const auto header_size = static_cast<std::size_t>(header_len);
    data_start_ = 8 + header_size;
    const std::size_t data_size = size - data_start_;

    std::vector<std::uint8_t> from_file;
    const std::uint8_t* first = nullptr;
    if (source_->in_memory()) {
      first = source_->memory() + 8;
    } else {
      from_file.resize(header_size);
      source_->read(8, header_size, from_file.data(), "the header");
      first = from_file.data();
    }

    // Two linear passes: syntax and duplicate keys by SAX, then the DOM.
    {
      detail::HeaderSyntaxCheck check;
      (void)nlohmann::json::sax_parse(first, first + header_size, &check);
    }
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(first, first + header_size);
    } catch (const nlohmann::json::exception& e) {
      DR2NET_FAIL("safetensors header is not valid JSON: ", e.what());
    }
    from_file = {};
    DR2NET_CHECK(header.is_object(), "safetensors header must be a JSON object, got ",
                 header.type_name());

    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        parse_metadata(value);
      } else {
        TensorRecord rec = parse_entry(key, value, data_size);
        records_.emplace_hint(records_.end(), key, std::move(rec));
      }
    }
    check_overlaps();
  }

  void parse_metadata(const nlohmann::json& value) {
    DR2NET_CHECK(value.is_object(), "safetensors __metadata__ must be an object, got ",
                 value.type_name());
    for (const auto& [key, item] : value.items()) {
      DR2NET_CHECK(item.is_string(), "safetensors __metadata__ value for key '", key,
                   "' must be a string, got ", detail::describe_json(item));
      metadata_.emplace(key, item.get<std::string>());
    }
  }

  static TensorRecord parse_entry(const std::string& name, const nlohmann::json& entry,
                                  std::size_t data_size) {
    const std::string where = "tensor '" + name + "'";
    DR2NET_CHECK(entry.is_object(), where, ": header entry must be an object, got ",
                 entry.type_name());
    TensorRecord rec;
    rec.name = name;

    const auto dtype_it = entry.find("dtype");
    DR2NET_CHECK(dtype_it != entry.end(), where, ": missing field 'dtype'");
    DR2NET_CHECK(dtype_it->is_string(), where, ": field 'dtype' must be a string, got ",
                 detail::describe_json(*dtype_it));
    const auto& dtype_str = dtype_it->get_ref<const std::string&>();
    const auto dtype = try_parse_dtype(dtype_str);
    DR2NET_CHECK(dtype.has_value(), where, ": unknown dtype '", dtype_str,
                 "' (supported: F64, F32, F16, BF16)");
    rec.dtype = *dtype;

    const auto shape_it = entry.find("shape");
    DR2NET_CHECK(shape_it != entry.end(), where, ": missing field 'shape'");
    DR2NET_CHECK(shape_it->is_array(), where, ": field 'shape' must be an array, got ",
                 detail::describe_json(*shape_it));
    rec.shape.reserve(shape_it->size());
    for (std::size_t i = 0; i < shape_it->size(); ++i) {
      const auto extent =
          detail::json_to_index((*shape_it)[i], std::numeric_limits<std::int64_t>::max(),
                                where + ": shape[" + std::to_string(i) + "]");
      rec.shape.push_back(static_cast<std::int64_t>(extent));
    }

    const auto offsets_it = entry.find("data_offsets");
    DR2NET_CHECK(offsets_it != entry.end(), where, ": missing field 'data_offsets'");
    DR2NET_CHECK(offsets_it->is_array() && offsets_it->size() == 2, where,
                 ": field 'data_offsets' must be an array [begin, end], got ",
                 offsets_it->is_array() ? "an array of " + std::to_string(offsets_it->size()) +
                                              " elements"
                                        : detail::describe_json(*offsets_it));
    constexpr auto max_offset = static_cast<std::uint64_t>(std::numeric_limits<std::size_t>::max());
    rec.begin = static_cast<std::size_t>(
        detail::json_to_index((*offsets_it)[0], max_offset, where + ": data_offsets[0]"));
    rec.end = static_cast<std::size_t>(
        detail::json_to_index((*offsets_it)[1], max_offset, where + ": data_offsets[1]"));

    const std::string offsets =
        "data_offsets [" + std::to_string(rec.begin) + ", " + std::to_string(rec.end) + "]";
    DR2NET_CHECK(rec.begin <= rec.end, where, ": ", offsets, " has begin after end");
    const auto numel = detail::checked_numel(rec.shape);
    DR2NET_CHECK(numel.has_value(), where, ": element count of shape ", format_shape(rec.shape),
                 " overflows");
    const auto nbytes = detail::checked_nbytes(*numel, rec.dtype);
    DR2NET_CHECK(nbytes.has_value(), where, ": byte size of shape ", format_shape(rec.shape),
                 " with dtype ", dtype_name(rec.dtype), " overflows");
    DR2NET_CHECK(rec.end - rec.begin == *nbytes, where, ": ", offsets, " span ",
                 rec.end - rec.begin, " bytes, but dtype ", dtype_name(rec.dtype), " with shape ",
                 format_shape(rec.shape), " needs ", *nbytes, " bytes");
    DR2NET_CHECK(rec.end <= data_size, where, ": ", offsets,
                 " lie outside the data section of ", data_size, " bytes");
    return rec;
  }

  void check_overlaps() const {
    // Empty tensors occupy no bytes and so overlap nothing.
    std::vector<const TensorRecord*> sorted;
    for (const auto& [name, rec] : records_) {
      if (rec.begin != rec.end) sorted.push_back(&rec);
    }
    std::sort(sorted.begin(), sorted.end(), [](const TensorRecord* a, const TensorRecord* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    // Sorted by begin, any overlap shows up between a range and the one
    // reaching furthest among those before it.
    const TensorRecord* furthest = nullptr;
    for (const TensorRecord* rec : sorted) {
      if (furthest != nullptr) {
        DR2NET_CHECK(rec->begin >= furthest->end, "tensors '", furthest->name, "' (data_offsets [",
                     furthest->begin, ", ", furthest->end, "]) and '", rec->name,
                     "' (data_offsets [", rec->begin, ", ", rec->end, "]) overlap");
      }
      if (furthest == nullptr || rec->end > furthest->end) furthest = rec;
    }
  }

  std::shared_ptr<const detail::ByteSource> source_;
  std::size_t data_start_ = 0;
  std::map<std::string, TensorRecord, std::less<>> records_;
  std::map<std::string, std::string> metadata_;
  MovedFromGuard moved_;  // a moved-from reader has no source: every call refuses
};

//! Collects tensors and metadata, then serialises them as one checkpoint.
class SafetensorsWriter {
 public:
  //! Sets (or replaces) a `__metadata__` entry.
  void set_metadata(std::string key, std::string value) {
    check_encodable(key, "metadata key");
    check_encodable(value, "metadata value for key '" + key + "'");
    metadata_[std::move(key)] = std::move(value);
  }

  //! Adds tensor `name` with `shape`, taking numel(shape) values from `values`
  //! and rounding them to `dtype` (nearest, ties to even; out of range -> inf).
  //! Throws on an empty, reserved or duplicate name, a negative extent, an
  //! element count that overflows, or null `values` for a non-empty tensor.
  template <class T>
  void add(std::string name, DType dtype, std::vector<std::int64_t> shape, const T* values) {
    static_assert(detail::is_checkpoint_scalar_v<T>, "add<T> supports float and double");
    const std::size_t numel = check_new_tensor(name, dtype, shape);
    DR2NET_CHECK(values != nullptr || numel == 0, "tensor '", name, "': values are null");
    Entry entry{dtype, std::move(shape), {}};
    detail::encode(values, numel, dtype, entry.data);
    entries_.emplace(std::move(name), std::move(entry));
  }

  //! As add() with a pointer, but also checks that `values` holds exactly
  //! numel(shape) elements.
  template <class T>
  void add(std::string name, DType dtype, std::vector<std::int64_t> shape,
           const std::vector<T>& values) {
    const auto numel = detail::checked_numel(shape);
    DR2NET_CHECK(!numel || *numel == values.size(), "tensor '", name, "': shape ",
                 format_shape(shape), " has ", *numel, " elements but ", values.size(),
                 " values were given");
    add(std::move(name), dtype, std::move(shape), values.data());
  }

  //! The complete checkpoint: header padded with spaces to a multiple of 8
  //! bytes (so the data section stays aligned), then the tensors contiguous in
  //! sorted-name order.
  std::vector<std::uint8_t> to_bytes() const {
    std::size_t data_size = 0;
    const std::string text = header_text(data_size);
    // Sized once and filled in place.
    std::vector<std::uint8_t> out(8 + text.size() + data_size);
    detail::store_le(out.data(), text.size(), 8);
    auto pos = std::copy(text.begin(), text.end(), out.begin() + 8);
    for (const auto& [name, entry] : entries_) {
      pos = std::copy(entry.data.begin(), entry.data.end(), pos);
    }
    return out;
  }

  //! Writes the checkpoint of to_bytes() to `path`, atomically: into a new
  //! temporary file in the same directory, flushed to disk (fsync), then renamed
  //! over `path` (the directory is synced too, best effort). If anything fails
  //! (full disk, file-size limit, permissions, a directory that does not exist)
  //! the temporary file is removed, a previous file at `path` is left untouched,
  //! and the error names `path` and the OS reason. An existing file's permission
  //! bits are kept; a new one gets 0666 less the umask.
  void write_file(const std::string& path) const {
    namespace fs = std::filesystem;
    const std::string what = "cannot write safetensors file '" + path + "'";
    const fs::path target(path);
    DR2NET_CHECK(!path.empty() && target.has_filename(), what, ": not a file name");
    const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
    std::error_code ec;
    const auto dir_status = fs::status(dir, ec);
    DR2NET_CHECK(fs::exists(dir_status), what, ": directory '", dir.string(), "' does not exist");
    DR2NET_CHECK(fs::is_directory(dir_status), what, ": '", dir.string(), "' is not a directory");
    struct stat old {};
    const bool replacing = ::stat(path.c_str(), &old) == 0;
    DR2NET_CHECK(!replacing || !S_ISDIR(old.st_mode), what, ": it is a directory");
    // The rename below would put a regular file in place of a device, FIFO or socket
    // (/dev/null included, for a user allowed to write /dev).
    DR2NET_CHECK(!replacing || S_ISREG(old.st_mode), what, ": it exists and is not a regular file (a device, FIFO "
                 "or socket), which a checkpoint must not replace");

    std::size_t data_size = 0;
    const std::string text = header_text(data_size);
    std::uint8_t prefix[8] = {};
    detail::store_le(prefix, text.size(), 8);

    TempFile tmp(dir, target.filename().string(), what);
    if (replacing) (void)::fchmod(tmp.fd, old.st_mode & 07777);  // best effort
    tmp.write(prefix, sizeof prefix);
    tmp.write(reinterpret_cast<const std::uint8_t*>(text.data()), text.size());
    for (const auto& [name, entry] : entries_) tmp.write(entry.data.data(), entry.data.size());
    tmp.commit(path);

    // Make the rename itself durable; failing here loses nothing, so it is not an error.
    const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd >= 0) {
      (void)::fsync(dir_fd);
      ::close(dir_fd);
    }
  }

 private:
  struct Entry {
    DType dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::uint8_t> data;  //!< already encoded little-endian
  };

  // A new, uniquely named file beside the target, removed unless commit() renamed it.
  struct TempFile {
    std::string path;
    int fd = -1;
    const std::string& what;

    TempFile(const std::filesystem::path& dir, const std::string& name, const std::string& what_)
        : what(what_) {
      static std::atomic<unsigned> counter{0};
      std::random_device rd;
      for (int attempt = 0; attempt < 100; ++attempt) {
        // Hidden and unmistakable, short enough for any file-name limit; O_EXCL makes it ours alone.
        std::string leaf = ".";  // appended piecewise: gcc 12 misreports "." + string
        leaf.append(name, 0, 160);
        leaf.append(".tmp.").append(std::to_string(::getpid())).append(".");
        leaf.append(std::to_string(counter++)).append(".").append(std::to_string(rd()));
        const std::string candidate = (dir / leaf).string();
        fd = ::open(candidate.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0) {
          path = candidate;
          return;
        }
        if (errno != EEXIST) {
          detail::fail_os(what + ": cannot create a temporary file in '" + dir.string() + "'", errno);
        }
      }
      DR2NET_FAIL(what, ": cannot find an unused temporary file name in '", dir.string(), "'");
    }
    ~TempFile() {
      if (fd >= 0) ::close(fd);
      if (!path.empty()) ::unlink(path.c_str());
    }
    TempFile(const TempFile&) = delete;
    TempFile& operator=(const TempFile&) = delete;

    void write(const std::uint8_t* p, std::size_t n) {
      while (n > 0) {
        const ssize_t done = ::write(fd, p, std::min<std::size_t>(n, std::size_t{1} << 30));
        if (done < 0) {
          if (errno == EINTR) continue;
          detail::fail_os(what, errno);
        }
        p += done;
        n -= static_cast<std::size_t>(done);
      }
    }

    // Flushes, closes and renames over `target`; on failure the destructor cleans up.
    void commit(const std::string& target) {
      if (::fsync(fd) != 0) detail::fail_os(what, errno);
      const int closing = fd;
      fd = -1;
      if (::close(closing) != 0) detail::fail_os(what, errno);
      if (::rename(path.c_str(), target.c_str()) != 0) detail::fail_os(what, errno);
      path.clear();
    }
  };

  // The JSON header padded with spaces to a multiple of 8 bytes; `data_size` receives the
  // size of the data section it describes.
  std::string header_text(std::size_t& data_size) const {
    nlohmann::json header = nlohmann::json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::size_t offset = 0;
    for (const auto& [name, entry] : entries_) {
      header[name] = {{"dtype", dtype_name(entry.dtype)},
                      {"shape", entry.shape},
                      {"data_offsets", {offset, offset + entry.data.size()}}};
      offset += entry.data.size();
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    data_size = offset;
    return text;
  }

  // Rejects strings the JSON header cannot hold (invalid UTF-8) now, where the
  // caller can still tell which one it was, instead of failing in to_bytes().
  static void check_encodable(const std::string& text, const std::string& what) {
    try {
      (void)nlohmann::json(text).dump();
    } catch (const nlohmann::json::exception& e) {
      DR2NET_FAIL(what, " cannot be stored in a safetensors header: ", e.what());
    }
  }

  std::size_t check_new_tensor(const std::string& name, DType dtype,
                               const std::vector<std::int64_t>& shape) const {
    DR2NET_CHECK(!name.empty(), "safetensors tensor names must not be empty");
    DR2NET_CHECK(name != "__metadata__", "'__metadata__' is reserved and cannot name a tensor");
    DR2NET_CHECK(entries_.find(name) == entries_.end(), "duplicate tensor '", name, "'");
    check_encodable(name, "tensor name");
    for (std::size_t i = 0; i < shape.size(); ++i) {
      DR2NET_CHECK(shape[i] >= 0, "tensor '", name, "': shape ", format_shape(shape),
                   " has negative extent at dimension ", i);
    }
    const auto numel = detail::checked_numel(shape);
    DR2NET_CHECK(numel.has_value(), "tensor '", name, "': element count of shape ",
                 format_shape(shape), " overflows");
    DR2NET_CHECK(detail::checked_nbytes(*numel, dtype).has_value(), "tensor '", name,
                 "': byte size of shape ", format_shape(shape), " with dtype ", dtype_name(dtype),
                 " overflows");
    return *numel;
  }

  std::map<std::string, Entry, std::less<>> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace dr2net::io
