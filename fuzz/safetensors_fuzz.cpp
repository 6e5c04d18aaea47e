// libFuzzer target for the safetensors reader.
//
// Any input must either load or be rejected with dr2net::Error; sanitizers
// catch crashes, out-of-bounds reads, undefined behaviour and absurd
// allocations. Inputs that load must also survive a write/read round trip
// unchanged, which checks that reader and writer agree on the format.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "dr2net/core/error.hpp"
#include "dr2net/io/safetensors.hpp"

namespace {

[[noreturn]] void invariant_failed(const char* what, const std::string& name) {
  std::fprintf(stderr, "safetensors_fuzz: %s (tensor '%s')\n", what, name.c_str());
  std::abort();
}

// Equal values, with any NaN equal to any NaN (payloads may be quieted).
bool same_values(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const bool both_nan = std::isnan(a[i]) && std::isnan(b[i]);
    if (!both_nan && (a[i] != b[i] || std::signbit(a[i]) != std::signbit(b[i]))) return false;
  }
  return true;
}

void check_round_trip(const dr2net::io::SafetensorsReader& reader) {
  using dr2net::io::SafetensorsReader;
  dr2net::io::SafetensorsWriter writer;
  for (const auto& [key, value] : reader.metadata()) writer.set_metadata(key, value);
  for (const auto& name : reader.names()) {
    // The writer refuses empty names, which the format itself does not forbid.
    if (name.empty()) return;
    const auto& rec = reader.record(name);
    const std::vector<double> values = reader.read<double>(name);
    writer.add(name, rec.dtype, rec.shape, values);  // exact: values came from this dtype
  }
  const SafetensorsReader again = SafetensorsReader::from_bytes(writer.to_bytes());
  if (again.names() != reader.names()) invariant_failed("names changed in round trip", "");
  if (again.metadata() != reader.metadata()) invariant_failed("metadata changed in round trip", "");
  for (const auto& name : reader.names()) {
    if (again.record(name).shape != reader.record(name).shape ||
        again.record(name).dtype != reader.record(name).dtype) {
      invariant_failed("shape or dtype changed in round trip", name);
    }
    if (!same_values(again.read<double>(name), reader.read<double>(name))) {
      invariant_failed("values changed in round trip", name);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::uint8_t> bytes(data, data + size);
  try {
    const auto reader = dr2net::io::SafetensorsReader::from_bytes(std::move(bytes));
    for (const auto& name : reader.names()) {
      const auto& rec = reader.record(name);
      const std::vector<float> as_float = reader.read<float>(name);
      const std::vector<double> as_double = reader.read<double>(name);
      if (as_float.size() != rec.numel() || as_double.size() != rec.numel()) {
        invariant_failed("element count differs from numel()", name);
      }
      std::vector<float> into(rec.numel());
      reader.read_into(name, rec.shape, into.data());
    }
    try {
      check_round_trip(reader);
    } catch (const dr2net::Error& e) {
      // The input was valid, so writing it back must not fail.
      invariant_failed(e.what(), "");
    }
  } catch (const dr2net::Error&) {
    // Rejected input: the expected outcome for most mutations.
  }
  return 0;
}
