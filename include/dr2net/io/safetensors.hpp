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
//! front and reports every problem as a dr2net::Error naming the tensor, field
//! or offset; it never reads outside the input and never allocates more than
//! the input's own size suggests. Byte order is assembled explicitly, so the
//! code is correct on hosts of either endianness.
//!
//! Needs nlohmann-json: link the dr2net::io target.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dr2net/core/error.hpp"
#include "dr2net/core/half.hpp"

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
  std::string name;
  DType dtype = DType::F32;
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
//! product overflows size_t.
inline std::optional<std::size_t> checked_numel(const std::vector<std::int64_t>& shape) {
  std::size_t n = 1;
  for (std::int64_t extent : shape) {
    if (extent < 0) return std::nullopt;
    const auto e = static_cast<std::uint64_t>(extent);
    if (e > std::numeric_limits<std::size_t>::max()) return std::nullopt;
    if (e != 0 && n > std::numeric_limits<std::size_t>::max() / e) return std::nullopt;
    n *= static_cast<std::size_t>(e);
  }
  return n;
}

//! Byte count of `numel` elements of `dtype`, or nothing on overflow.
inline std::optional<std::size_t> checked_nbytes(std::size_t numel, DType dtype) {
  const std::size_t width = dtype_size(dtype);
  if (numel > std::numeric_limits<std::size_t>::max() / width) return std::nullopt;
  return numel * width;
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

//! Checks the JSON text for duplicate keys, which nlohmann would silently
//! resolve to the last one; a checkpoint whose meaning depends on that is
//! rejected rather than guessed at.
class DuplicateKeyCheck {
 public:
  bool operator()(int /*depth*/, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if (event == Event::object_start) {
      keys_.emplace_back();
    } else if (event == Event::object_end) {
      if (!keys_.empty()) keys_.pop_back();
    } else if (event == Event::key && !keys_.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      DR2NET_CHECK(keys_.back().insert(key).second,
                   "safetensors header has the key '", key, "' twice in one object");
    }
    return true;
  }

 private:
  std::vector<std::set<std::string>> keys_;
};

}  // namespace detail

//! A checkpoint loaded into memory and validated; tensors are decoded on demand.
class SafetensorsReader {
 public:
  //! Loads the whole file. Errors name the path: it cannot be opened or read,
  //! or its content is invalid (see from_bytes).
  static SafetensorsReader from_file(const std::string& path) {
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    DR2NET_CHECK(std::filesystem::exists(status), "cannot open safetensors file '", path,
                 "': ", ec ? ec.message() : "no such file");
    // A directory "opens" as a stream on some platforms and reports a bogus
    // size; refuse anything that is not a regular file up front.
    DR2NET_CHECK(std::filesystem::is_regular_file(status), "cannot open safetensors file '", path,
                 "': not a regular file");
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    DR2NET_CHECK(!ec, "cannot open safetensors file '", path, "': ", ec.message());
    std::ifstream in(path, std::ios::binary);
    DR2NET_CHECK(in.is_open(), "cannot open safetensors file '", path, "'");
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    DR2NET_CHECK(in.gcount() == static_cast<std::streamsize>(bytes.size()),
                 "cannot read safetensors file '", path, "': got ", in.gcount(), " of ",
                 bytes.size(), " bytes");
    try {
      return from_bytes(std::move(bytes));
    } catch (const Error& e) {
      DR2NET_FAIL("in safetensors file '", path, "': ", e.detail());
    }
  }

  //! Takes ownership of a complete checkpoint image and validates the header,
  //! every tensor entry, and that tensors' byte ranges lie inside the data
  //! section without overlapping (gaps are allowed).
  static SafetensorsReader from_bytes(std::vector<std::uint8_t> bytes) {
    SafetensorsReader r;
    r.bytes_ = std::move(bytes);
    r.parse();
    return r;
  }

  //! The `__metadata__` entries (empty if the header has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  //! All tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(records_.size());
    for (const auto& [name, rec] : records_) out.push_back(name);
    return out;
  }

  //! Whether a tensor called `name` exists.
  bool contains(std::string_view name) const { return records_.find(name) != records_.end(); }

  //! The record of tensor `name`; throws "missing tensor 'name'".
  const TensorRecord& record(std::string_view name) const {
    const auto it = records_.find(name);
    DR2NET_CHECK(it != records_.end(), "missing tensor '", name, "' in safetensors checkpoint");
    return it->second;
  }

  //! Throws one error listing every name in `names` that is not present.
  void require(const std::vector<std::string>& names) const {
    std::string missing;
    std::size_t count = 0;
    for (const auto& name : names) {
      if (contains(name)) continue;
      missing += (count++ == 0 ? "'" : ", '") + name + "'";
    }
    DR2NET_CHECK(count == 0, "missing ", count, count == 1 ? " tensor" : " tensors",
                 " in safetensors checkpoint: ", missing);
  }

  //! Decodes tensor `name` into a new vector, converting from its stored dtype.
  template <class T>
  std::vector<T> read(std::string_view name) const {
    static_assert(detail::is_checkpoint_scalar_v<T>, "read<T> supports float and double");
    const TensorRecord& rec = record(name);
    std::vector<T> out(rec.numel());
    detail::decode(data(rec), rec.dtype, out.size(), out.data());
    return out;
  }

  //! Decodes tensor `name` into `dst` (numel elements) after checking that its
  //! shape equals `expected_shape`.
  template <class T>
  void read_into(std::string_view name, const std::vector<std::int64_t>& expected_shape,
                 T* dst) const {
    static_assert(detail::is_checkpoint_scalar_v<T>, "read_into<T> supports float and double");
    const TensorRecord& rec = record(name);
    DR2NET_CHECK(rec.shape == expected_shape, "tensor '", name, "' has shape ",
                 format_shape(rec.shape), " but shape ", format_shape(expected_shape),
                 " was expected");
    DR2NET_CHECK(dst != nullptr || rec.numel() == 0, "read_into('", name,
                 "'): destination is null");
    detail::decode(data(rec), rec.dtype, rec.numel(), dst);
  }

 private:
  SafetensorsReader() = default;

  const std::uint8_t* data(const TensorRecord& rec) const {
    return bytes_.data() + data_start_ + rec.begin;
  }

  void parse() {
    DR2NET_CHECK(bytes_.size() >= 8, "safetensors data is truncated: ", bytes_.size(),
                 " bytes, fewer than the 8-byte header length prefix");
    const std::uint64_t header_len = detail::load_le(bytes_.data(), 8);
    const std::size_t available = bytes_.size() - 8;
    DR2NET_CHECK(header_len <= available, "safetensors header length ", header_len,
                 " exceeds the ", available, " bytes after the 8-byte length prefix");
    const auto header_size = static_cast<std::size_t>(header_len);
    data_start_ = 8 + header_size;
    const std::size_t data_size = bytes_.size() - data_start_;

    nlohmann::json header;
    try {
      const std::uint8_t* first = bytes_.data() + 8;
      header = nlohmann::json::parse(first, first + header_size, detail::DuplicateKeyCheck{});
    } catch (const nlohmann::json::exception& e) {
      DR2NET_FAIL("safetensors header is not valid JSON: ", e.what());
    }
    DR2NET_CHECK(header.is_object(), "safetensors header must be a JSON object, got ",
                 header.type_name());

    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        parse_metadata(value);
      } else {
        TensorRecord rec = parse_entry(key, value, data_size);
        records_.emplace(key, std::move(rec));
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

  std::vector<std::uint8_t> bytes_;
  std::size_t data_start_ = 0;
  std::map<std::string, TensorRecord, std::less<>> records_;
  std::map<std::string, std::string> metadata_;
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

    // Sized once and filled in place (offset is now the data section's size).
    std::vector<std::uint8_t> out(8 + text.size() + offset);
    detail::store_le(out.data(), text.size(), 8);
    auto pos = std::copy(text.begin(), text.end(), out.begin() + 8);
    for (const auto& [name, entry] : entries_) {
      pos = std::copy(entry.data.begin(), entry.data.end(), pos);
    }
    return out;
  }

  //! Writes to_bytes() to `path`, replacing it; errors name the path.
  void write_file(const std::string& path) const {
    const std::vector<std::uint8_t> bytes = to_bytes();
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    DR2NET_CHECK(out.is_open(), "cannot open '", path, "' for writing a safetensors file");
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    out.close();
    DR2NET_CHECK(!out.fail(), "cannot write safetensors file '", path, "'");
  }

 private:
  struct Entry {
    DType dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::uint8_t> data;  //!< already encoded little-endian
  };

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
