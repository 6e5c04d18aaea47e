// Tests for the fp16/bf16 conversions and the safetensors reader/writer.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dr2net/core/error.hpp"
#include "dr2net/core/half.hpp"
#include "dr2net/io/safetensors.hpp"
#include "support/temp_dir.hpp"

using dr2net::bf16_bits_to_float;
using dr2net::double_to_bf16_bits;
using dr2net::double_to_float;
using dr2net::double_to_half_bits;
using dr2net::float_to_bf16_bits;
using dr2net::float_to_half_bits;
using dr2net::half_bits_to_float;
using dr2net::io::DType;
using dr2net::io::SafetensorsReader;
using dr2net::io::SafetensorsWriter;
using Catch::Matchers::Contains;

namespace {

float float_from_bits(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

std::uint32_t bits_of(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

std::uint64_t bits_of(double d) {
  std::uint64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  return bits;
}

bool is_half_nan(std::uint16_t h) { return (h & 0x7C00u) == 0x7C00u && (h & 0x03FFu) != 0; }
bool is_bf16_nan(std::uint16_t b) { return (b & 0x7F80u) == 0x7F80u && (b & 0x007Fu) != 0; }

// Runs `f`, requires it to throw dr2net::Error, and returns the message.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const dr2net::Error& e) {
    return e.what();
  }
  FAIL("expected dr2net::Error, but nothing was thrown");
  return {};
}

// A checkpoint image made of an arbitrary header text and `data_size` zero bytes.
std::vector<std::uint8_t> image(const std::string& header, std::size_t data_size) {
  // Sized once and filled in place (gcc 12 misreports insert() after a fixed-size start).
  std::vector<std::uint8_t> out(8 + header.size() + data_size, 0);
  const std::uint64_t n = header.size();
  for (std::size_t i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(n >> (8 * i));
  std::copy(header.begin(), header.end(), out.begin() + 8);
  return out;
}

std::string parse_error(const std::string& header, std::size_t data_size) {
  return error_of([&] { (void)SafetensorsReader::from_bytes(image(header, data_size)); });
}

// What a value becomes after storage as `dtype`, computed independently of the
// writer's encoder where possible.
template <class T>
T stored_value(T v, DType dtype) {
  switch (dtype) {
    case DType::F64: return v;
    case DType::F32: return static_cast<T>(static_cast<float>(v));
    case DType::F16:
      if constexpr (std::is_same_v<T, double>) return half_bits_to_float(double_to_half_bits(v));
      else return half_bits_to_float(float_to_half_bits(v));
    case DType::BF16:
      if constexpr (std::is_same_v<T, double>) return bf16_bits_to_float(double_to_bf16_bits(v));
      else return bf16_bits_to_float(float_to_bf16_bits(v));
  }
  return v;
}

// A unique file under the temp directory, removed when it goes out of scope.
struct TempFile {
  std::filesystem::path path;
  TempFile() {
    std::random_device rd;
    path = std::filesystem::temp_directory_path() /
           ("dr2net_test_" + std::to_string(rd()) + "_" + std::to_string(rd()) + ".safetensors");
  }
  ~TempFile() {
    std::error_code ec;
    std::filesystem::remove(path, ec);
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
};

constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr double kInfD = std::numeric_limits<double>::infinity();
constexpr DType kAllDTypes[] = {DType::F64, DType::F32, DType::F16, DType::BF16};

}  // namespace

// ---- fp16 / bf16 conversions -----------------------------------------------------------

TEST_CASE("half: exact bit patterns", "[half]") {
  CHECK(float_to_half_bits(1.0f) == 0x3C00);
  CHECK(float_to_half_bits(-2.0f) == 0xC000);
  CHECK(float_to_half_bits(0.0f) == 0x0000);
  CHECK(float_to_half_bits(-0.0f) == 0x8000);
  CHECK(float_to_half_bits(65504.0f) == 0x7BFF);                   // largest finite
  CHECK(float_to_half_bits(65519.996f) == 0x7BFF);                 // just below the midpoint
  CHECK(float_to_half_bits(65520.0f) == 0x7C00);                   // tie, 65504 is odd -> inf
  CHECK(float_to_half_bits(1.0e6f) == 0x7C00);
  CHECK(float_to_half_bits(-1.0e6f) == 0xFC00);
  CHECK(float_to_half_bits(std::numeric_limits<float>::infinity()) == 0x7C00);
  CHECK(float_to_half_bits(-std::numeric_limits<float>::infinity()) == 0xFC00);
  CHECK(float_to_half_bits(std::ldexp(1.0f, -24)) == 0x0001);      // smallest subnormal
  CHECK(float_to_half_bits(std::ldexp(1.0f, -25)) == 0x0000);      // tie -> even zero
  CHECK(float_to_half_bits(-std::ldexp(1.0f, -25)) == 0x8000);
  CHECK(float_to_half_bits(std::nextafter(std::ldexp(1.0f, -25), 1.0f)) == 0x0001);
  CHECK(float_to_half_bits(std::ldexp(3.0f, -25)) == 0x0002);      // tie between 1 and 2 ulps
  CHECK(float_to_half_bits(std::ldexp(1023.0f, -24)) == 0x03FF);   // largest subnormal
  CHECK(float_to_half_bits(std::ldexp(2047.0f, -25)) == 0x0400);   // tie rounds up into normals
  CHECK(float_to_half_bits(std::ldexp(1.0f, -14)) == 0x0400);      // smallest normal
  CHECK(float_to_half_bits(std::numeric_limits<float>::denorm_min()) == 0x0000);
  // Ties to even, and values that round to a representable neighbour.
  CHECK(float_to_half_bits(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);
  CHECK(float_to_half_bits(1.0f + std::ldexp(3.0f, -11)) == 0x3C02);
  CHECK(float_to_half_bits(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)) == 0x3C01);
  CHECK(float_to_half_bits(1.0f + std::ldexp(1.0f, -11) - std::ldexp(1.0f, -20)) == 0x3C00);
  CHECK(float_to_half_bits(0.1f) == 0x2E66);
  CHECK(float_to_half_bits(3.14159265f) == 0x4248);

  const std::uint16_t qnan = float_to_half_bits(std::numeric_limits<float>::quiet_NaN());
  CHECK(is_half_nan(qnan));
  CHECK((qnan & 0x0200u) != 0);  // quiet bit
  // A signalling NaN whose payload sits only in the low bits must stay NaN.
  const std::uint16_t snan = float_to_half_bits(float_from_bits(0xFF80'0001u));
  CHECK(is_half_nan(snan));
  CHECK((snan & 0x8000u) != 0);

  CHECK(half_bits_to_float(0x3C00) == 1.0f);
  CHECK(half_bits_to_float(0x7BFF) == 65504.0f);
  CHECK(half_bits_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(half_bits_to_float(0x03FF) == std::ldexp(1023.0f, -24));
  CHECK(half_bits_to_float(0x7C00) == std::numeric_limits<float>::infinity());
  CHECK(half_bits_to_float(0xFC00) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(half_bits_to_float(0x7E00)));
  CHECK(std::isnan(half_bits_to_float(0x7C01)));
  CHECK(bits_of(half_bits_to_float(0x8000)) == 0x8000'0000u);
}

TEST_CASE("bf16: exact bit patterns", "[half]") {
  CHECK(float_to_bf16_bits(1.0f) == 0x3F80);
  CHECK(float_to_bf16_bits(-2.0f) == 0xC000);
  CHECK(float_to_bf16_bits(0.0f) == 0x0000);
  CHECK(float_to_bf16_bits(-0.0f) == 0x8000);
  CHECK(float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);  // tie -> even
  CHECK(float_to_bf16_bits(1.0f + std::ldexp(3.0f, -8)) == 0x3F82);  // tie -> even (up)
  CHECK(float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)) == 0x3F81);
  CHECK(float_to_bf16_bits(0.1f) == 0x3DCD);
  const float bf16_max = float_from_bits(0x7F7F'0000u);
  CHECK(float_to_bf16_bits(bf16_max) == 0x7F7F);
  CHECK(float_to_bf16_bits(std::numeric_limits<float>::max()) == 0x7F80);  // rounds past max
  CHECK(float_to_bf16_bits(float_from_bits(0x7F7F'7FFFu)) == 0x7F7F);
  CHECK(float_to_bf16_bits(float_from_bits(0x7F7F'8000u)) == 0x7F80);      // tie, odd -> inf
  CHECK(float_to_bf16_bits(-std::numeric_limits<float>::infinity()) == 0xFF80);
  CHECK(float_to_bf16_bits(float_from_bits(0x0001'0000u)) == 0x0001);      // smallest subnormal
  CHECK(float_to_bf16_bits(float_from_bits(0x0000'8000u)) == 0x0000);      // tie -> even zero
  CHECK(float_to_bf16_bits(float_from_bits(0x0000'8001u)) == 0x0001);
  CHECK(float_to_bf16_bits(std::numeric_limits<float>::denorm_min()) == 0x0000);

  CHECK(is_bf16_nan(float_to_bf16_bits(std::numeric_limits<float>::quiet_NaN())));
  // Truncating this signalling NaN would give infinity.
  const std::uint16_t snan = float_to_bf16_bits(float_from_bits(0x7F80'0001u));
  CHECK(is_bf16_nan(snan));
  CHECK((snan & 0x0040u) != 0);

  CHECK(bf16_bits_to_float(0x3F80) == 1.0f);
  CHECK(bits_of(bf16_bits_to_float(0x8000)) == 0x8000'0000u);
  CHECK(std::isnan(bf16_bits_to_float(0x7FC0)));
}

TEST_CASE("half and bf16: every 16-bit value round-trips and every midpoint ties to even",
          "[half]") {
  for (std::uint32_t i = 0; i < 0x10000u; ++i) {
    const auto h = static_cast<std::uint16_t>(i);
    const float hf = half_bits_to_float(h);
    const float bf = bf16_bits_to_float(h);
    if (is_half_nan(h)) {
      REQUIRE(std::isnan(hf));
      REQUIRE(is_half_nan(float_to_half_bits(hf)));
      REQUIRE(is_half_nan(double_to_half_bits(hf)));
    } else {
      REQUIRE(float_to_half_bits(hf) == h);
      REQUIRE(double_to_half_bits(hf) == h);
    }
    if (is_bf16_nan(h)) {
      REQUIRE(std::isnan(bf));
      REQUIRE(is_bf16_nan(float_to_bf16_bits(bf)));
      REQUIRE(is_bf16_nan(double_to_bf16_bits(bf)));
    } else {
      REQUIRE(float_to_bf16_bits(bf) == h);
      REQUIRE(double_to_bf16_bits(bf) == h);
    }
  }

  // Midpoints between consecutive positive finite values (and the top one and
  // the overflow threshold), checked for both signs and from float and double.
  for (std::uint16_t h = 0; h < 0x7C00; ++h) {
    const double lo = half_bits_to_float(h);
    const auto next = static_cast<std::uint16_t>(h + 1);
    const double hi = h == 0x7BFF ? 65536.0 : static_cast<double>(half_bits_to_float(next));
    const double mid = (lo + hi) / 2;  // exact in float and double
    const std::uint16_t even = (h & 1u) == 0 ? h : static_cast<std::uint16_t>(h + 1);
    const auto midf = static_cast<float>(mid);
    REQUIRE(static_cast<double>(midf) == mid);
    REQUIRE(float_to_half_bits(midf) == even);
    REQUIRE(float_to_half_bits(-midf) == (even | 0x8000u));
    REQUIRE(double_to_half_bits(mid) == even);
    REQUIRE(double_to_half_bits(-mid) == (even | 0x8000u));
    REQUIRE(float_to_half_bits(std::nextafter(midf, 0.0f)) == h);
    REQUIRE(float_to_half_bits(std::nextafter(midf, kInfF)) == h + 1);
    REQUIRE(double_to_half_bits(std::nextafter(mid, 0.0)) == h);
    REQUIRE(double_to_half_bits(std::nextafter(mid, kInfD)) == h + 1);
  }
  for (std::uint16_t b = 0; b < 0x7F80; ++b) {
    // In float bits the midpoint above bf16 value b is b's bits plus half an ulp.
    const float mid = float_from_bits((static_cast<std::uint32_t>(b) << 16) | 0x8000u);
    const std::uint16_t even = (b & 1u) == 0 ? b : static_cast<std::uint16_t>(b + 1);
    REQUIRE(float_to_bf16_bits(mid) == even);
    REQUIRE(float_to_bf16_bits(-mid) == (even | 0x8000u));
    REQUIRE(double_to_bf16_bits(static_cast<double>(mid)) == even);
    REQUIRE(float_to_bf16_bits(std::nextafter(mid, 0.0f)) == b);
    REQUIRE(float_to_bf16_bits(std::nextafter(mid, kInfF)) == b + 1);
    REQUIRE(double_to_bf16_bits(std::nextafter(static_cast<double>(mid), 0.0)) == b);
    REQUIRE(double_to_bf16_bits(std::nextafter(static_cast<double>(mid), kInfD)) == b + 1);
  }
}

TEST_CASE("double to half/bf16 rounds once, not through float", "[half]") {
  // Just above the half-way point between 1 and the next half; the excess is
  // far below float precision, so double->float lands exactly on the tie and
  // the second rounding goes down to 1.0.
  const double d_half = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  REQUIRE(static_cast<double>(static_cast<float>(d_half)) == 1.0 + std::ldexp(1.0, -11));
  CHECK(float_to_half_bits(static_cast<float>(d_half)) == 0x3C00);  // the naive, wrong answer
  CHECK(double_to_half_bits(d_half) == 0x3C01);

  const double d_bf16 = 1.0 + std::ldexp(1.0, -8) + std::ldexp(1.0, -40);
  CHECK(float_to_bf16_bits(static_cast<float>(d_bf16)) == 0x3F80);
  CHECK(double_to_bf16_bits(d_bf16) == 0x3F81);

  // Same in the fp16 subnormal range: 2^-25 + tiny must round up to 2^-24.
  const double d_sub = std::ldexp(1.0, -25) + std::ldexp(1.0, -60);
  CHECK(float_to_half_bits(static_cast<float>(d_sub)) == 0x0000);
  CHECK(double_to_half_bits(d_sub) == 0x0001);

  CHECK(double_to_half_bits(65520.0) == 0x7C00);
  CHECK(double_to_half_bits(std::nextafter(65520.0, 0.0)) == 0x7BFF);
  CHECK(double_to_half_bits(1e300) == 0x7C00);
  CHECK(double_to_half_bits(-1e-300) == 0x8000);
  CHECK(double_to_half_bits(std::numeric_limits<double>::denorm_min()) == 0x0000);
  CHECK(is_half_nan(double_to_half_bits(std::numeric_limits<double>::quiet_NaN())));
  CHECK(double_to_bf16_bits(1e300) == 0x7F80);
  CHECK(double_to_bf16_bits(-0.0) == 0x8000);
  CHECK(is_bf16_nan(double_to_bf16_bits(-std::numeric_limits<double>::quiet_NaN())));

  CHECK(double_to_float(1.0 + std::ldexp(1.0, -24)) == 1.0f);
  CHECK(double_to_float(1.0 + std::ldexp(1.0, -24) + std::ldexp(1.0, -50)) ==
        1.0f + std::ldexp(1.0f, -23));
  CHECK(double_to_float(1e300) == std::numeric_limits<float>::infinity());
  CHECK(bits_of(double_to_float(-1e-300)) == 0x8000'0000u);
  CHECK(double_to_float(std::ldexp(1.0, -149)) == std::numeric_limits<float>::denorm_min());
  CHECK(std::isnan(double_to_float(std::numeric_limits<double>::quiet_NaN())));
}

TEST_CASE("double and float conversion paths agree on random inputs", "[half]") {
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<std::uint32_t> any_bits;
  for (int i = 0; i < 200000; ++i) {
    const float f = float_from_bits(any_bits(rng));
    if (std::isnan(f)) continue;
    INFO("float bits " << bits_of(f));
    // float -> double is exact, so both paths round the same value once.
    REQUIRE(double_to_half_bits(f) == float_to_half_bits(f));
    REQUIRE(double_to_bf16_bits(f) == float_to_bf16_bits(f));
    REQUIRE(bits_of(double_to_float(f)) == bits_of(f));
  }
  std::uniform_real_distribution<double> uniform(-70000.0, 70000.0);
  for (int i = 0; i < 200000; ++i) {
    const double d = uniform(rng);
    INFO("double bits " << bits_of(d));
    REQUIRE(bits_of(double_to_float(d)) == bits_of(static_cast<float>(d)));
  }
}

// ---- safetensors: round trips ----------------------------------------------------------

namespace {

template <class T>
void check_round_trip(DType dtype, std::mt19937& rng, bool via_file) {
  INFO("dtype " << dr2net::io::dtype_name(dtype) << (via_file ? " via file" : " via bytes"));
  std::uniform_real_distribution<T> dist(T(-100), T(100));
  std::vector<T> matrix(3 * 5);
  for (T& v : matrix) v = dist(rng);
  matrix[0] = T(0);
  matrix[1] = -T(0);
  matrix[2] = T(1);
  const std::vector<T> scalar{dist(rng)};
  std::vector<T> cube(2 * 1 * 4);
  for (T& v : cube) v = dist(rng);

  SafetensorsWriter writer;
  writer.add("layers.0.weight", dtype, {3, 5}, matrix);
  writer.add("a_scalar", dtype, {}, scalar);
  writer.add("empty", dtype, {0, 7}, std::vector<T>{});
  writer.add("cube", dtype, {2, 1, 4}, cube.data());

  TempFile file;
  std::optional<SafetensorsReader> reader;
  if (via_file) {
    writer.write_file(file.path.string());
    reader.emplace(SafetensorsReader::from_file(file.path.string()));
  } else {
    reader.emplace(SafetensorsReader::from_bytes(writer.to_bytes()));
  }

  CHECK(reader->names() == std::vector<std::string>{"a_scalar", "cube", "empty", "layers.0.weight"});
  const auto& rec = reader->record("layers.0.weight");
  CHECK(rec.dtype == dtype);
  CHECK(rec.shape == std::vector<std::int64_t>{3, 5});
  CHECK(rec.numel() == 15);
  CHECK(rec.nbytes() == 15 * dr2net::io::dtype_size(dtype));
  CHECK(reader->record("a_scalar").shape.empty());
  CHECK(reader->read<T>("empty").empty());

  const std::vector<T> got = reader->read<T>("layers.0.weight");
  REQUIRE(got.size() == matrix.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO("element " << i);
    CHECK(bits_of(got[i]) == bits_of(stored_value(matrix[i], dtype)));
  }
  CHECK(std::signbit(got[1]));
  CHECK(reader->read<T>("a_scalar")[0] == stored_value(scalar[0], dtype));

  std::vector<T> cube_got(cube.size());
  reader->read_into("cube", {2, 1, 4}, cube_got.data());
  for (std::size_t i = 0; i < cube.size(); ++i) CHECK(cube_got[i] == stored_value(cube[i], dtype));

  // Reading as the other precision converts: via float for 16/32-bit data.
  const auto as_double = reader->read<double>("layers.0.weight");
  const auto as_float = reader->read<float>("layers.0.weight");
  for (std::size_t i = 0; i < got.size(); ++i) {
    CHECK(as_float[i] == static_cast<float>(as_double[i]));
  }
}

}  // namespace

TEST_CASE("safetensors: round trip for every dtype through bytes and files", "[safetensors]") {
  std::mt19937 rng(std::random_device{}());
  for (DType dtype : kAllDTypes) {
    for (bool via_file : {false, true}) {
      check_round_trip<float>(dtype, rng, via_file);
      check_round_trip<double>(dtype, rng, via_file);
    }
  }
}

TEST_CASE("safetensors: writing double to F16/BF16 rounds once", "[safetensors]") {
  const double d = 1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40);
  SafetensorsWriter writer;
  writer.add("h", DType::F16, {1}, &d);
  writer.add("b", DType::BF16, {1}, &d);
  const auto reader = SafetensorsReader::from_bytes(writer.to_bytes());
  CHECK(reader.read<double>("h")[0] == 1.0 + std::ldexp(1.0, -10));
  CHECK(reader.read<double>("b")[0] == 1.0);  // 2^-11 is far below half a bf16 ulp
}

TEST_CASE("safetensors: metadata round trip", "[safetensors]") {
  SafetensorsWriter writer;
  writer.set_metadata("format", "pt");
  writer.set_metadata("note", "quotes \" and \\ and unicode \xc3\xa9");
  writer.set_metadata("format", "dr2net");  // replaces
  const float x = 2.5f;
  writer.add("x", DType::F32, {}, &x);
  const auto reader = SafetensorsReader::from_bytes(writer.to_bytes());
  CHECK(reader.metadata() ==
        std::map<std::string, std::string>{{"format", "dr2net"},
                                           {"note", "quotes \" and \\ and unicode \xc3\xa9"}});
  CHECK(reader.names() == std::vector<std::string>{"x"});

  const auto no_meta = SafetensorsReader::from_bytes(SafetensorsWriter{}.to_bytes());
  CHECK(no_meta.metadata().empty());
  CHECK(no_meta.names().empty());
}

TEST_CASE("safetensors: writer layout is the documented format", "[safetensors]") {
  SafetensorsWriter writer;
  const float one = 1.0f;
  const std::vector<double> two{2.0, -2.0};
  writer.add("b", DType::F32, {1}, &one);
  writer.add("a", DType::F64, {2}, two);
  const std::vector<std::uint8_t> bytes = writer.to_bytes();
  REQUIRE(bytes.size() >= 8);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<std::size_t>(i)];
  CHECK(n % 8 == 0);
  REQUIRE(bytes.size() == 8 + n + 16 + 4);
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
  CHECK(header.find("\"a\":{\"data_offsets\":[0,16]") != std::string::npos);
  CHECK(header.find("\"b\":{\"data_offsets\":[16,20]") != std::string::npos);
  CHECK(header.find_last_not_of(' ') == header.rfind('}'));  // padded with spaces only
  // Explicit little-endian data: 2.0 = 0x4000000000000000, 1.0f = 0x3F800000.
  const std::size_t data = 8 + n;
  CHECK(std::vector<std::uint8_t>(bytes.begin() + static_cast<std::ptrdiff_t>(data),
                                  bytes.begin() + static_cast<std::ptrdiff_t>(data + 8)) ==
        std::vector<std::uint8_t>{0, 0, 0, 0, 0, 0, 0, 0x40});
  CHECK(std::vector<std::uint8_t>(bytes.end() - 4, bytes.end()) ==
        std::vector<std::uint8_t>{0, 0, 0x80, 0x3F});
}

TEST_CASE("safetensors: reads a hand-made file in the reference layout", "[safetensors]") {
  // As written by other implementations: unsorted keys, a gap, trailing bytes.
  const std::string header =
      R"({"w":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]},)"
      R"("__metadata__":{"format":"pt"},"v":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  std::vector<std::uint8_t> bytes = image(header, 16);
  const std::size_t data = 8 + header.size();
  const std::uint8_t v_bytes[] = {0x00, 0x00, 0xC0, 0xBF};  // -1.5f
  const std::uint8_t w_bytes[] = {0x80, 0x3F, 0x40, 0xC0};  // bf16 1.0, -3.0
  std::memcpy(bytes.data() + data, v_bytes, 4);
  std::memcpy(bytes.data() + data + 8, w_bytes, 4);
  const auto reader = SafetensorsReader::from_bytes(bytes);
  CHECK(reader.read<float>("v") == std::vector<float>{-1.5f});
  CHECK(reader.read<double>("w") == std::vector<double>{1.0, -3.0});
  CHECK(reader.metadata().at("format") == "pt");
  CHECK(reader.contains("v"));
  CHECK_FALSE(reader.contains("__metadata__"));
}

TEST_CASE("safetensors: dtype names", "[safetensors]") {
  for (DType dtype : kAllDTypes) CHECK(dr2net::io::parse_dtype(dr2net::io::dtype_name(dtype)) == dtype);
  CHECK(dr2net::io::dtype_size(DType::BF16) == 2);
  CHECK(dr2net::io::dtype_size(DType::F64) == 8);
  CHECK_THAT(error_of([] { (void)dr2net::io::parse_dtype("I8"); }), Contains("unknown dtype 'I8'"));
}

// ---- safetensors: lookups and shape checks -----------------------------------------------

TEST_CASE("safetensors: missing tensors and shape mismatches are named", "[safetensors]") {
  SafetensorsWriter writer;
  const std::vector<float> v(6, 1.0f);
  writer.add("present", DType::F32, {2, 3}, v);
  const auto reader = SafetensorsReader::from_bytes(writer.to_bytes());

  SECTION("reading a missing tensor names it") {
    CHECK_THAT(error_of([&] { (void)reader.read<float>("absent.weight"); }),
               Contains("missing tensor 'absent.weight'"));
    CHECK_THAT(error_of([&] { (void)reader.record("absent.bias"); }),
               Contains("missing tensor 'absent.bias'"));
  }
  SECTION("require lists every missing name in one error") {
    CHECK_NOTHROW(reader.require({"present"}));
    const std::string msg = error_of([&] { reader.require({"x.w", "present", "y.b", "z"}); });
    CHECK_THAT(msg, Contains("missing 3 tensors") && Contains("'x.w'") && Contains("'y.b'") &&
                        Contains("'z'"));
    CHECK_THAT(msg, !Contains("'present'"));
  }
  SECTION("read_into checks the shape") {
    std::vector<double> dst(6);
    CHECK_NOTHROW(reader.read_into("present", {2, 3}, dst.data()));
    CHECK_THAT(error_of([&] { reader.read_into("present", {3, 2}, dst.data()); }),
               Contains("tensor 'present'") && Contains("[2, 3]") && Contains("[3, 2]"));
  }
}

// ---- safetensors: writer misuse ---------------------------------------------------------

TEST_CASE("safetensors: writer rejects bad tensors", "[safetensors]") {
  SafetensorsWriter writer;
  const std::vector<float> v(4, 0.5f);
  writer.add("w", DType::F32, {4}, v);

  SECTION("duplicate name") {
    CHECK_THAT(error_of([&] { writer.add("w", DType::F16, {4}, v); }), Contains("duplicate tensor 'w'"));
  }
  SECTION("value count differs from the shape") {
    CHECK_THAT(error_of([&] { writer.add("u", DType::F32, {2, 3}, v); }),
               Contains("tensor 'u'") && Contains("6 elements") && Contains("4 values"));
  }
  SECTION("negative extent") {
    CHECK_THAT(error_of([&] { writer.add("n", DType::F32, {2, -1}, v.data()); }),
               Contains("tensor 'n'") && Contains("negative extent"));
  }
  SECTION("element count overflow") {
    const std::int64_t big = std::int64_t{1} << 40;
    CHECK_THAT(error_of([&] { writer.add("o", DType::F32, {big, big}, v.data()); }),
               Contains("tensor 'o'") && Contains("overflows"));
  }
  SECTION("reserved, empty and non-UTF-8 names; null values") {
    CHECK_THAT(error_of([&] { writer.add("__metadata__", DType::F32, {4}, v); }), Contains("reserved"));
    CHECK_THAT(error_of([&] { writer.add("", DType::F32, {4}, v); }), Contains("empty"));
    CHECK_THAT(error_of([&] { writer.add("bad\xff", DType::F32, {4}, v); }), Contains("tensor name"));
    CHECK_THAT(error_of([&] { writer.add("p", DType::F32, {4}, static_cast<const float*>(nullptr)); }),
               Contains("tensor 'p'") && Contains("null"));
    CHECK_THAT(error_of([&] { writer.set_metadata("k", "\xfe"); }), Contains("metadata value for key 'k'"));
  }
  // Whatever failed, the writer still holds only the good tensor.
  CHECK(SafetensorsReader::from_bytes(writer.to_bytes()).names() == std::vector<std::string>{"w"});
}

// ---- safetensors: invalid input -----------------------------------------------------------

TEST_CASE("safetensors: invalid files are rejected with a clear error", "[safetensors]") {
  const std::string ok_entry = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

  SECTION("valid baseline parses") {
    CHECK_NOTHROW(SafetensorsReader::from_bytes(image(R"({"t":)" + ok_entry + "}", 8)));
  }
  SECTION("file shorter than the length prefix") {
    CHECK_THAT(error_of([] { (void)SafetensorsReader::from_bytes({1, 2, 3, 4, 5}); }),
               Contains("truncated") && Contains("5 bytes"));
    CHECK_THAT(error_of([] { (void)SafetensorsReader::from_bytes({}); }), Contains("truncated"));
  }
  SECTION("header length beyond the file size") {
    std::vector<std::uint8_t> bytes = image("{}", 0);
    bytes[0] = 0xE8;  // 1000
    bytes[1] = 0x03;
    CHECK_THAT(error_of([&] { (void)SafetensorsReader::from_bytes(bytes); }),
               Contains("header length 1000") && Contains("exceeds"));
    bytes.assign(8, 0xFF);  // 2^64 - 1: must not allocate or wrap around
    CHECK_THAT(error_of([&] { (void)SafetensorsReader::from_bytes(bytes); }),
               Contains("header length 18446744073709551615"));
  }
  SECTION("malformed JSON") {
    CHECK_THAT(parse_error(R"({"t": {"dtype": "F32",)", 0), Contains("not valid JSON"));
    CHECK_THAT(parse_error("", 0), Contains("not valid JSON"));
    CHECK_THAT(parse_error("{} trailing", 0), Contains("not valid JSON"));
  }
  SECTION("header is not an object") {
    CHECK_THAT(parse_error("[1, 2]", 0), Contains("must be a JSON object") && Contains("array"));
  }
  SECTION("duplicate keys") {
    CHECK_THAT(parse_error(R"({"t":)" + ok_entry + R"(,"t":)" + ok_entry + "}", 8),
               Contains("'t' twice"));
  }
  SECTION("tensor entry is not an object") {
    CHECK_THAT(parse_error(R"({"w": 3})", 0), Contains("tensor 'w'") && Contains("must be an object"));
  }
  SECTION("tensor entry misses a field") {
    CHECK_THAT(parse_error(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", 8),
               Contains("tensor 'w'") && Contains("missing field 'dtype'"));
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", 8),
               Contains("tensor 'w'") && Contains("missing field 'shape'"));
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[2]}})", 8),
               Contains("tensor 'w'") && Contains("missing field 'data_offsets'"));
  }
  SECTION("tensor entry has wrong-typed fields") {
    CHECK_THAT(parse_error(R"({"w":{"dtype":32,"shape":[2],"data_offsets":[0,8]}})", 8),
               Contains("tensor 'w'") && Contains("'dtype' must be a string") && Contains("32"));
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", 8),
               Contains("tensor 'w'") && Contains("'shape' must be an array") && Contains("string"));
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":{"a":0}}})", 8),
               Contains("tensor 'w'") && Contains("'data_offsets' must be an array [begin, end]"));
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,16]}})", 16),
               Contains("tensor 'w'") && Contains("data_offsets") && Contains("3 elements"));
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})", 8),
               Contains("tensor 'w'") && Contains("shape[0]") && Contains("array"));
  }
  SECTION("unknown dtype") {
    CHECK_THAT(parse_error(R"({"w":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}})", 2),
               Contains("tensor 'w'") && Contains("unknown dtype 'I8'"));
  }
  SECTION("negative shape") {
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[2,-3],"data_offsets":[0,8]}})", 8),
               Contains("tensor 'w'") && Contains("shape[1] must be a non-negative integer") &&
                   Contains("-3"));
  }
  SECTION("non-integer shape") {
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8),
               Contains("tensor 'w'") && Contains("shape[0] must be a non-negative integer") &&
                   Contains("2.5"));
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,8]}})", 8),
               Contains("tensor 'w'") && Contains("shape[0]") && Contains("too large"));
  }
  SECTION("negative offsets") {
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", 8),
               Contains("tensor 'w'") && Contains("data_offsets[0] must be a non-negative integer"));
  }
  SECTION("non-integer offsets") {
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}})", 8),
               Contains("tensor 'w'") && Contains("data_offsets[1] must be a non-negative integer"));
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,"8"]}})", 8),
               Contains("tensor 'w'") && Contains("data_offsets[1]") && Contains("string"));
  }
  SECTION("element count overflow") {
    CHECK_THAT(
        parse_error(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", 8),
        Contains("tensor 'w'") && Contains("element count") && Contains("overflows"));
    CHECK_THAT(
        parse_error(R"({"w":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}})", 8),
        Contains("tensor 'w'") && Contains("byte size") && Contains("overflows"));
  }
  SECTION("byte size does not match the offsets") {
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}})", 12),
               Contains("tensor 'w'") && Contains("data_offsets [0, 12]") && Contains("span 12 bytes") &&
                   Contains("needs 8 bytes"));
    CHECK_THAT(parse_error(R"({"w":{"dtype":"BF16","shape":[0],"data_offsets":[0,2]}})", 2),
               Contains("tensor 'w'") && Contains("needs 0 bytes"));
  }
  SECTION("begin after end") {
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 8),
               Contains("tensor 'w'") && Contains("data_offsets [8, 4]") && Contains("begin after end"));
  }
  SECTION("offsets outside the data section") {
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", 12),
               Contains("tensor 'w'") && Contains("data_offsets [8, 16]") &&
                   Contains("outside the data section of 12 bytes"));
    // Offsets so large that begin + size would wrap around.
    CHECK_THAT(parse_error(R"({"w":{"dtype":"F32","shape":[1],)"
                           R"("data_offsets":[18446744073709551611,18446744073709551615]}})",
                           8),
               Contains("tensor 'w'") && Contains("outside the data section"));
  }
  SECTION("overlapping tensors") {
    const std::string header =
        R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
    CHECK_THAT(parse_error(header, 12),
               Contains("'a'") && Contains("'b'") && Contains("[4, 12]") && Contains("overlap"));
    // One range inside another, not adjacent in sorted order.
    const std::string nested =
        R"({"outer":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
        R"("x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},)"
        R"("y":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})";
    CHECK_THAT(parse_error(nested, 16), Contains("'outer'") && Contains("overlap"));
  }
  SECTION("gaps, trailing bytes and empty tensors are tolerated") {
    const std::string header =
        R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
        R"("b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},)"
        R"("e":{"dtype":"F64","shape":[3,0],"data_offsets":[2,2]}})";
    const auto reader = SafetensorsReader::from_bytes(image(header, 20));
    CHECK(reader.read<float>("b") == std::vector<float>{0.0f, 0.0f});
    CHECK(reader.read<double>("e").empty());
  }
  SECTION("metadata is not an object of strings") {
    CHECK_THAT(parse_error(R"({"__metadata__":{"epoch":3}})", 0),
               Contains("__metadata__ value for key 'epoch' must be a string") && Contains("3"));
    CHECK_THAT(parse_error(R"({"__metadata__":{"cfg":{"a":"b"}}})", 0),
               Contains("__metadata__ value for key 'cfg'") && Contains("object"));
    CHECK_THAT(parse_error(R"({"__metadata__":["a"]})", 0), Contains("__metadata__ must be an object"));
  }
  SECTION("deeply nested JSON does not crash") {
    const std::string deep = R"({"__metadata__":{"k":)" + std::string(100000, '[') +
                             std::string(100000, ']') + "}}";
    CHECK_THAT(parse_error(deep, 0), Contains("'k'") && Contains("array"));
  }
}

TEST_CASE("safetensors: file errors name the path", "[safetensors]") {
  TempFile file;
  const std::string path = file.path.string();
  CHECK_THAT(error_of([&] { (void)SafetensorsReader::from_file(path); }),
             Contains("cannot open") && Contains(path));
  CHECK_THAT(error_of([&] {
               (void)SafetensorsReader::from_file(std::filesystem::temp_directory_path().string());
             }),
             Contains("not a regular file"));
  {
    std::ofstream out(file.path, std::ios::binary);
    out << "abc";
  }
  CHECK_THAT(error_of([&] { (void)SafetensorsReader::from_file(path); }),
             Contains(path) && Contains("truncated"));
  const std::string bad_dir = (file.path / "sub" / "x.safetensors").string();
  CHECK_THAT(error_of([&] { SafetensorsWriter{}.write_file(bad_dir); }), Contains(bad_dir));
}

// ---- safetensors: files that never lose data, a reader that never slurps -----------------

namespace {

// A unique directory under the temp directory, removed with its content when it goes out of scope.
using dr2net::testing::TempDir;

std::vector<std::uint8_t> file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// What a child process reports back: its exit status and the text `body` returned.
struct ChildResult {
  int status = -1;
  std::string text;
};

// Runs `body` in a forked child (so limits it sets stay there) and returns what it said.
// A dr2net::Error escaping `body` is reported as "error: <message>", anything else thrown
// as "unexpected exception: <what>".
ChildResult run_in_child(const std::function<std::string()>& body) {
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    std::string text;
    try {
      text = body();
    } catch (const dr2net::Error& e) {
      text = std::string("error: ") + e.what();
    } catch (const std::exception& e) {
      text = std::string("unexpected exception: ") + e.what();
    } catch (...) {
      text = "unexpected exception";
    }
    const char* p = text.data();
    std::size_t left = text.size();
    while (left > 0) {
      const ssize_t n = ::write(fds[1], p, left);
      if (n <= 0) break;
      p += n;
      left -= static_cast<std::size_t>(n);
    }
    ::close(fds[1]);
    ::_exit(0);
  }
  ::close(fds[1]);
  ChildResult r;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n <= 0) break;
    r.text.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fds[0]);
  ::waitpid(pid, &r.status, 0);
  return r;
}

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
constexpr bool kAddressSanitizer = true;
#else
constexpr bool kAddressSanitizer = false;
#endif
#else
constexpr bool kAddressSanitizer = false;
#endif

// Limits the calling process's address space to what it maps now plus `extra` bytes, so that
// any allocation of that order fails. AddressSanitizer reserves terabytes of address space
// up front, so under it the limit is not set (the checks still run, without the bound).
void limit_address_space(std::size_t extra) {
  if (kAddressSanitizer) return;
  std::ifstream statm("/proc/self/statm");
  std::size_t pages = 0;
  statm >> pages;
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  const rlimit lim{static_cast<rlim_t>(pages * page + extra), static_cast<rlim_t>(pages * page + extra)};
  if (::setrlimit(RLIMIT_AS, &lim) != 0) throw std::runtime_error("setrlimit(RLIMIT_AS) failed");
}

// Writes the 8-byte length, `header` and `data`, then extends the file to `total` bytes
// without allocating them (a sparse file).
void write_sparse(const std::filesystem::path& path, const std::string& header, const std::vector<std::uint8_t>& data,
                  std::uint64_t claimed_header_len, std::uint64_t total) {
  std::vector<std::uint8_t> head(8);
  for (std::size_t i = 0; i < 8; ++i) head[i] = static_cast<std::uint8_t>(claimed_header_len >> (8 * i));
  {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(head.data()), 8);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
    REQUIRE(out.good());
  }
  REQUIRE(::truncate(path.c_str(), static_cast<off_t>(total)) == 0);
}

constexpr std::uint64_t kGiB = std::uint64_t{1} << 30;

}  // namespace

TEST_CASE("safetensors: a failed write leaves the previous file intact and no temporary", "[safetensors]") {
  TempDir dir;
  const auto path = (dir.path / "model.safetensors").string();
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> good_values(1000);
  for (auto& v : good_values) v = dist(rng);
  SafetensorsWriter good;
  good.set_metadata("epoch", "1");
  good.add("w", DType::F32, {10, 100}, good_values);
  good.write_file(path);
  const auto before = file_bytes(path);
  REQUIRE(before == good.to_bytes());

  // Four MiB against a 64 KiB file-size limit: write() fails with EFBIG part-way.
  SafetensorsWriter big;
  big.add("w", DType::F32, {1024, 1024}, std::vector<float>(1024 * 1024, 0.25f));
  const ChildResult child = run_in_child([&]() -> std::string {
    std::signal(SIGXFSZ, SIG_IGN);
    const rlimit lim{64 * 1024, 64 * 1024};
    if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) return "setrlimit failed";
    big.write_file(path);
    return "no error";
  });
  REQUIRE(WIFEXITED(child.status));
  INFO(child.text);
  CHECK_THAT(child.text, Contains("error: ") && Contains(path) && Contains(std::strerror(EFBIG)));

  // The old checkpoint is byte for byte what it was, and reads back bit-identical.
  CHECK(file_bytes(path) == before);
  const auto reader = SafetensorsReader::from_file(path);
  const auto got = reader.read<float>("w");
  REQUIRE(got.size() == good_values.size());
  for (std::size_t i = 0; i < got.size(); ++i) CHECK(bits_of(got[i]) == bits_of(good_values[i]));
  CHECK(reader.metadata().at("epoch") == "1");
  CHECK(dir.entries() == std::set<std::string>{"model.safetensors"});
}

TEST_CASE("safetensors: write_file replaces atomically and names bad targets", "[safetensors]") {
  TempDir dir;
  const auto path = (dir.path / "w.safetensors").string();
  SafetensorsWriter first;
  first.add("a", DType::F32, {2}, std::vector<float>{1.0f, 2.0f});
  first.write_file(path);
  REQUIRE(::chmod(path.c_str(), 0640) == 0);
  SafetensorsWriter second;
  second.add("b", DType::F64, {3}, std::vector<double>{3.0, 4.0, 5.0});
  second.write_file(path);
  CHECK(file_bytes(path) == second.to_bytes());
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0640);  // the replaced file's permissions are kept
  CHECK(dir.entries() == std::set<std::string>{"w.safetensors"});

  const auto missing_dir = (dir.path / "no" / "such" / "x.safetensors").string();
  CHECK_THAT(error_of([&] { second.write_file(missing_dir); }),
             Contains(missing_dir) && Contains("does not exist"));
  CHECK_THAT(error_of([&] { second.write_file(dir.path.string()); }), Contains(dir.path.string()));
  CHECK(file_bytes(path) == second.to_bytes());
  CHECK(dir.entries() == std::set<std::string>{"w.safetensors"});
}

TEST_CASE("safetensors: the header is checked against the file size before anything is read",
          "[safetensors]") {
  TempDir dir;
  SECTION("a header length beyond a 4 GiB file") {
    const auto path = (dir.path / "claims.safetensors").string();
    const std::uint64_t claimed = std::uint64_t{1} << 40;
    write_sparse(path, "{}", {}, claimed, 4 * kGiB);
    const ChildResult child = run_in_child([&]() -> std::string {
      limit_address_space(kGiB);
      (void)SafetensorsReader::from_file(path);
      return "no error";
    });
    REQUIRE(WIFEXITED(child.status));
    CHECK_THAT(child.text, Contains("error: ") && Contains(path) && Contains(std::to_string(claimed)) &&
                               Contains(std::to_string(4 * kGiB)));
  }
  SECTION("a header length within the file but beyond the header limit") {
    const auto path = (dir.path / "huge_header.safetensors").string();
    const std::uint64_t claimed = 2 * dr2net::io::detail::kMaxHeaderSize;
    write_sparse(path, "{", {}, claimed, kGiB);
    const ChildResult child = run_in_child([&]() -> std::string {
      limit_address_space(kGiB / 8);
      (void)SafetensorsReader::from_file(path);
      return "no error";
    });
    REQUIRE(WIFEXITED(child.status));
    CHECK_THAT(child.text, Contains("error: ") && Contains(path) && Contains(std::to_string(claimed)) &&
                               Contains("exceeds the limit"));
  }
  SECTION("a small header length beyond a small file") {
    const auto path = (dir.path / "short.safetensors").string();
    write_sparse(path, "{}", {}, 1000, 10);
    CHECK_THAT(error_of([&] { (void)SafetensorsReader::from_file(path); }),
               Contains(path) && Contains("header length 1000") && Contains("10 bytes"));
  }
  SECTION("a 10 GiB file with one small tensor opens and reads it without reading the rest") {
    const auto path = (dir.path / "sparse.safetensors").string();
    const std::string header = R"({"first":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
    std::vector<std::uint8_t> data(16);
    const float values[4] = {1.5f, -2.0f, 0.125f, 3.0f};
    std::memcpy(data.data(), values, 16);  // little-endian hosts; checked below
    write_sparse(path, header, data, header.size(), 10 * kGiB);
    const ChildResult child = run_in_child([&]() -> std::string {
      limit_address_space(kGiB);
      const auto reader = SafetensorsReader::from_file(path);
      std::string out;
      for (float v : reader.read<float>("first")) out += std::to_string(v) + " ";
      std::vector<double> into(4);
      reader.read_into("first", {2, 2}, into.data());
      for (double v : into) out += std::to_string(v) + " ";
      return out;
    });
    REQUIRE(WIFEXITED(child.status));
    if (bits_of(1.5f) == 0x3FC00000u && data[3] == 0x3F) {
      const std::string four = "1.500000 -2.000000 0.125000 3.000000 ";
      CHECK(child.text == four + four);
    }
  }
  SECTION("a data section that ends before a tensor's end names the tensor") {
    const auto path = (dir.path / "late.safetensors").string();
    const std::string header =
        R"({"early":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
        R"("late":{"dtype":"F32","shape":[4],"data_offsets":[10737418240,10737418256]}})";
    write_sparse(path, header, std::vector<std::uint8_t>(4), header.size(), 10 * kGiB);
    const ChildResult child = run_in_child([&]() -> std::string {
      limit_address_space(kGiB);
      (void)SafetensorsReader::from_file(path);
      return "no error";
    });
    REQUIRE(WIFEXITED(child.status));
    CHECK_THAT(child.text, Contains("error: ") && Contains(path) && Contains("tensor 'late'") &&
                               Contains("outside the data section"));
  }
}

namespace {

// A checkpoint image of `n` one-element F32 tensors, as a large header of many entries.
std::vector<std::uint8_t> many_entries(std::size_t n, const std::string& extra_entry = "") {
  std::string header = "{";
  for (std::size_t i = 0; i < n; ++i) {
    if (i != 0) header += ',';
    header += "\"blocks." + std::to_string(i) + ".w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" +
              std::to_string(4 * i) + "," + std::to_string(4 * i + 4) + "]}";
  }
  header += extra_entry + "}";
  return image(header, 4 * n);
}

// The shortest of `runs` opens of `bytes`, each required to find all `entries` tensors.
double min_parse_seconds(const std::vector<std::uint8_t>& bytes, std::size_t entries, int runs) {
  double best = std::numeric_limits<double>::infinity();
  for (int r = 0; r < runs; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto reader = SafetensorsReader::from_bytes(bytes);
    const auto t1 = std::chrono::steady_clock::now();
    REQUIRE(reader.names().size() == entries);
    REQUIRE(reader.contains("blocks.0.w"));
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
  }
  return best;
}

}  // namespace

TEST_CASE("safetensors: header parsing grows linearly and still rejects duplicate keys", "[safetensors]") {
  const auto small = many_entries(25'000);
  const auto large = many_entries(200'000);
  // Interleaved, best of five each: load from other processes then affects both sizes alike.
  double t_small = 1e300, t_large = 1e300;
  for (int round = 0; round < 5; ++round) {
    t_small = std::min(t_small, min_parse_seconds(small, 25'000, 1));
    t_large = std::min(t_large, min_parse_seconds(large, 200'000, 1));  // a 200,000-entry header parses
  }
  INFO("25,000 entries: " << t_small << " s; 200,000 entries: " << t_large << " s");
  // 8x the entries: about 8x the time when linear (n log n for the sorted maps; 17x was seen on
  // a loaded 2-core machine), 64x when quadratic. The bound sits between the two.
  CHECK(t_large / t_small < 32.0);

  // A duplicate anywhere, even last among 25,000 entries or inside a nested object, is named.
  CHECK_THAT(error_of([&] {
               (void)SafetensorsReader::from_bytes(
                   many_entries(25'000, R"(,"blocks.7.w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})"));
             }),
             Contains("'blocks.7.w' twice"));
  CHECK_THAT(parse_error(R"({"t":{"dtype":"F32","shape":[2],"dtype":"F16","data_offsets":[0,8]}})", 8),
             Contains("'dtype' twice"));
  CHECK_THAT(parse_error(R"({"__metadata__":{"a":"1","b":"2","a":"3"}})", 0), Contains("'a' twice"));
  // The same key in different objects is not a duplicate.
  CHECK_NOTHROW(SafetensorsReader::from_bytes(
      image(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
            R"("y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
            8)));
}

TEST_CASE("safetensors: read errors name the file", "[safetensors]") {
  TempDir dir;
  const auto path = (dir.path / "named.safetensors").string();
  SafetensorsWriter w;
  w.add("t", DType::F32, {2}, std::vector<float>{1.0f, 2.0f});
  w.write_file(path);
  const auto reader = SafetensorsReader::from_file(path);
  CHECK(reader.where() == "safetensors file '" + path + "'");
  CHECK_THAT(error_of([&] { (void)reader.read<float>("u"); }), Contains("missing tensor 'u'") && Contains(path));
  CHECK_THAT(error_of([&] { reader.require({"u", "v"}); }), Contains("missing 2 tensors") && Contains(path));
  std::vector<float> dst(3);
  CHECK_THAT(error_of([&] { reader.read_into("t", {3}, dst.data()); }),
             Contains("tensor 't'") && Contains(path) && Contains("[2]") && Contains("[3]"));
  // Copies share the open file and read the same values.
  const SafetensorsReader copy = reader;
  CHECK(copy.read<float>("t") == std::vector<float>{1.0f, 2.0f});
  // A FIFO is refused without being opened (opening it would wait for a writer).
  const auto fifo = (dir.path / "pipe.safetensors").string();
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  CHECK_THAT(error_of([&] { (void)SafetensorsReader::from_file(fifo); }),
             Contains(fifo) && Contains("not a regular file"));
}

TEST_CASE("safetensors: a moved-from reader refuses every call", "[safetensors][hardening]") {
  SafetensorsWriter w;
  w.add("t", DType::F32, {2}, std::vector<float>{1.0f, 2.0f});
  auto reader = SafetensorsReader::from_bytes(w.to_bytes());
  const SafetensorsReader moved = std::move(reader);
  CHECK(moved.read<float>("t") == std::vector<float>{1.0f, 2.0f});
  const auto refused = Contains("moved from");
  CHECK_THAT(error_of([&] { (void)reader.where(); }), refused);
  CHECK_THAT(error_of([&] { (void)reader.names(); }), refused);
  CHECK_THAT(error_of([&] { (void)reader.metadata(); }), refused);
  CHECK_THAT(error_of([&] { (void)reader.contains("t"); }), refused);
  CHECK_THAT(error_of([&] { (void)reader.record("t"); }), refused);
  CHECK_THAT(error_of([&] { reader.require({"t"}); }), refused);
  CHECK_THAT(error_of([&] { (void)reader.read<float>("t"); }), refused);
  std::vector<float> dst(2);
  CHECK_THAT(error_of([&] { reader.read_into("t", {2}, dst.data()); }), refused);
  // Assigning a live reader revives it.
  reader = moved;
  CHECK(reader.read<float>("t") == std::vector<float>{1.0f, 2.0f});
}

TEST_CASE("safetensors: write_file refuses to replace a FIFO, or a link to one", "[safetensors][hardening]") {
  // A device such as /dev/null is refused by the same check; a FIFO stands in for it here.
  TempDir dir;
  const auto fifo = (dir.path / "pipe").string();
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  const auto link = (dir.path / "link.safetensors").string();
  std::filesystem::create_symlink(fifo, link);
  SafetensorsWriter w;
  w.add("t", DType::F32, {2}, std::vector<float>{1.0f, 2.0f});
  for (const auto& target : {fifo, link}) {
    INFO(target);
    CHECK_THAT(error_of([&] { w.write_file(target); }), Contains(target) && Contains("not a regular file"));
    struct stat st {};
    REQUIRE(::stat(target.c_str(), &st) == 0);
    CHECK(S_ISFIFO(st.st_mode));  // still the FIFO, not a checkpoint renamed over it
  }
  CHECK(std::filesystem::is_symlink(link));
  CHECK(dir.entries() == std::set<std::string>{"pipe", "link.safetensors"});
}
