// Bytes a pass moves through device memory, for the bandwidth figures of the GPU benchmark.
//
// A pass is described by its operands (buffer, element size, read and/or written). Each
// distinct buffer counts once per direction, however many operands name it: a buffer read
// through two operands (J^T g and f of the mixed-precision backward pass, which share one
// compute-typed scratch buffer) crosses the bus once, and a buffer updated in place counts
// one read and one write. A null buffer is an absent operand and counts nothing. Exact
// integer arithmetic; GB/s (10^9 bytes per second) is the only floating-point step.

#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

namespace dr2net_bench {

//! One operand of a pass: `element_bytes` per element of `buffer`, read and/or written.
struct Operand {
  const void* buffer;
  std::uint64_t element_bytes;
  bool read;
  bool written;
};

//! Operand helpers: read-only, write-only, and updated in place (read, then written).
inline Operand reads(const void* p, std::uint64_t bytes) { return {p, bytes, true, false}; }
inline Operand writes(const void* p, std::uint64_t bytes) { return {p, bytes, false, true}; }
inline Operand updates(const void* p, std::uint64_t bytes) { return {p, bytes, true, true}; }

//! Bytes per element the pass moves (see the file comment). Two operands naming one buffer
//! with different element sizes are a mistake in the description and throw.
inline std::uint64_t bytes_per_element(std::initializer_list<Operand> ops) {
  struct Seen {
    const void* buffer;
    std::uint64_t element_bytes;
    bool read, written;
  };
  std::vector<Seen> seen;
  for (const Operand& o : ops) {
    if (o.buffer == nullptr) continue;
    bool merged = false;
    for (Seen& s : seen) {
      if (s.buffer != o.buffer) continue;
      if (s.element_bytes != o.element_bytes)
        throw std::invalid_argument("bandwidth: one buffer described with element sizes " +
                                    std::to_string(s.element_bytes) + " and " + std::to_string(o.element_bytes));
      s.read = s.read || o.read;
      s.written = s.written || o.written;
      merged = true;
    }
    if (!merged) seen.push_back({o.buffer, o.element_bytes, o.read, o.written});
  }
  std::uint64_t total = 0;
  for (const Seen& s : seen) total += s.element_bytes * ((s.read ? 1u : 0u) + (s.written ? 1u : 0u));
  return total;
}

//! Bytes a pass over `elements` elements moves.
inline std::uint64_t bytes_moved(std::initializer_list<Operand> ops, std::uint64_t elements) {
  return bytes_per_element(ops) * elements;
}

//! 10^9 bytes per second for `bytes` moved in `ms` milliseconds.
inline double gb_per_s(std::uint64_t bytes, double ms) { return static_cast<double>(bytes) / (ms * 1e6); }

}  // namespace dr2net_bench
