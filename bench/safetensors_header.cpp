// Time to open a safetensors checkpoint whose header holds many tensor entries: the header
// parse (JSON syntax, duplicate-key check, DOM), the validation of every entry and the
// overlap check. Linear growth is the property (see docs/benchmarks.md); the test suite
// checks it too, with a loose bound.
//
//   dr2net_bench_safetensors_header [--entries 10000,50000,200000] [--repeats 3]
//
// JSON on stdout (one object: entries, header bytes, best and median seconds, microseconds
// per entry); a human-readable table on stderr. Figures, not a test: the exit status says
// only whether it ran (2 for a bad command line).

#include <CLI/CLI.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "dr2net/core/error.hpp"
#include "dr2net/io/safetensors.hpp"

namespace {

// `text` as an integer in [lo, hi], decimal digits only; nothing otherwise.
std::optional<std::int64_t> strict_integer(const std::string& text, std::int64_t lo, std::int64_t hi) {
  std::int64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v, 10);
  if (text.empty() || ec != std::errc{} || end != text.data() + text.size() || v < lo || v > hi) return std::nullopt;
  return v;
}

// A checkpoint of `n` one-element F32 tensors named like a model's ("blocks.i.w"), header
// built by hand (not by the writer) so the benchmark times the reader alone.
std::vector<std::uint8_t> checkpoint_image(std::int64_t n) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  for (std::int64_t i = 0; i < n; ++i) {
    header += ",\"blocks." + std::to_string(i) + ".w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[" +
              std::to_string(4 * i) + "," + std::to_string(4 * i + 4) + "]}";
  }
  header += "}";
  const auto data = static_cast<std::size_t>(4 * n);
  std::vector<std::uint8_t> out(8 + header.size() + data, 0);
  const std::uint64_t len = header.size();
  for (std::size_t i = 0; i < 8; ++i) out[i] = static_cast<std::uint8_t>(len >> (8 * i));
  std::copy(header.begin(), header.end(), out.begin() + 8);
  return out;
}

struct Row {
  std::int64_t entries = 0;
  std::size_t header_bytes = 0;
  double best = 0, median = 0;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("Time to open a safetensors checkpoint with a header of many tensor entries");
  std::string entries_text = "10000,50000,200000";
  std::string repeats_text = "3";
  app.add_option("--entries", entries_text, "comma-separated entry counts, each 1..10000000")->take_last();
  app.add_option("--repeats", repeats_text, "timed opens per count, 1..100 (best and median reported)")->take_last();
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "dr2net_bench_safetensors_header: %s (see --help)\n", e.what());
    return 2;
  }
  std::vector<std::int64_t> counts;
  {
    std::stringstream ss(entries_text);
    std::string item;
    while (std::getline(ss, item, ',')) {
      const auto v = strict_integer(item, 1, 10'000'000);
      if (!v) {
        std::fprintf(stderr, "dr2net_bench_safetensors_header: --entries: '%s' is not an integer in 1..10000000\n",
                     item.c_str());
        return 2;
      }
      counts.push_back(*v);
    }
    if (counts.empty() || entries_text.back() == ',') {
      std::fprintf(stderr, "dr2net_bench_safetensors_header: --entries: expected a list like 10000,50000\n");
      return 2;
    }
  }
  const auto repeats = strict_integer(repeats_text, 1, 100);
  if (!repeats) {
    std::fprintf(stderr, "dr2net_bench_safetensors_header: --repeats: '%s' is not an integer in 1..100\n",
                 repeats_text.c_str());
    return 2;
  }

  std::vector<Row> rows;
  try {
    for (const std::int64_t n : counts) {
      const auto bytes = checkpoint_image(n);
      std::vector<double> times;
      for (std::int64_t r = 0; r < *repeats; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        const auto reader = dr2net::io::SafetensorsReader::from_bytes(bytes);
        const auto t1 = std::chrono::steady_clock::now();
        if (reader.names().size() != static_cast<std::size_t>(n)) DR2NET_FAIL("wrong entry count read back");
        times.push_back(std::chrono::duration<double>(t1 - t0).count());
      }
      std::sort(times.begin(), times.end());
      rows.push_back({n, bytes.size() - 8 - static_cast<std::size_t>(4 * n), times.front(), times[times.size() / 2]});
      std::fprintf(stderr, "  %lld entries done\n", static_cast<long long>(n));
    }
  } catch (const dr2net::Error& e) {
    std::fprintf(stderr, "dr2net_bench_safetensors_header: %s\n", e.what());
    return 1;
  }

  std::fprintf(stderr, "\n| entries | header bytes | best s | median s | us per entry (best) |\n");
  std::fprintf(stderr, "|---:|---:|---:|---:|---:|\n");
  for (const Row& r : rows) {
    std::fprintf(stderr, "| %lld | %zu | %.4f | %.4f | %.3f |\n", static_cast<long long>(r.entries), r.header_bytes,
                 r.best, r.median, 1e6 * r.best / static_cast<double>(r.entries));
  }
  std::printf("{\"benchmark\": \"safetensors_header\", \"repeats\": %lld, \"results\": [",
              static_cast<long long>(*repeats));
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    std::printf("%s{\"entries\": %lld, \"header_bytes\": %zu, \"best_s\": %.6g, \"median_s\": %.6g, "
                "\"us_per_entry\": %.6g}",
                i == 0 ? "" : ", ", static_cast<long long>(r.entries), r.header_bytes, r.best, r.median,
                1e6 * r.best / static_cast<double>(r.entries));
  }
  std::printf("]}\n");
  return 0;
}
