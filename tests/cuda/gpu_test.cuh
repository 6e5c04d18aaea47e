#pragma once
//! \file
//! A tiny check harness for the GPU test executables (Catch2 is not compiled by nvcc here).
//! Each executable calls skip_without_device() first (exit 77: ctest reports "skipped"),
//! runs its cases with run_case(), and returns finish(): "N passed, N failed", non-zero on
//! any failure. A case that throws counts as one failed check and the next case runs.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "support/tolerances.hpp"

namespace dr2net::testing {

template <>
struct precision_kind_of<__nv_bfloat16> {
  static constexpr PrecisionKind value = PrecisionKind::Bf16;
};
template <>
struct precision_kind_of<__half> {
  static constexpr PrecisionKind value = PrecisionKind::Fp16;
};

struct GpuTestState {
  long passed = 0, failed = 0;
  std::string current_case;
};
inline GpuTestState& gpu_test_state() {
  static GpuTestState s;
  return s;
}

//! Exits with 77 unless a CUDA device can be used (count > 0 and a context can be made).
inline void skip_without_device() {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e == cudaSuccess && count > 0) e = cudaFree(nullptr);  // creates the primary context
  if (e != cudaSuccess || count == 0) {
    std::printf("no usable CUDA device (%s): skipping\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "device count is 0");
    std::exit(77);
  }
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) == cudaSuccess)
    std::printf("device 0: %s (sm_%d%d, %zu MiB)\n", p.name, p.major, p.minor, p.totalGlobalMem >> 20);
}

//! Records one check; prints the failure with its case, location and message.
inline bool record(bool ok, const char* expr, const char* file, int line, const std::string& msg = {}) {
  auto& s = gpu_test_state();
  if (ok) {
    ++s.passed;
  } else {
    ++s.failed;
    std::printf("FAILED [%s] %s:%d: %s %s\n", s.current_case.c_str(), file, line, expr, msg.c_str());
  }
  return ok;
}

template <class Body>
void run_case(const std::string& name, Body&& body) {
  gpu_test_state().current_case = name;
  const long before = gpu_test_state().failed;
  try {
    body();
  } catch (const std::exception& e) {
    record(false, "unexpected exception", __FILE__, __LINE__, e.what());
  }
  std::printf("%s %s\n", gpu_test_state().failed == before ? "ok  " : "FAIL", name.c_str());
}

inline int finish() {
  const auto& s = gpu_test_state();
  std::printf("%ld passed, %ld failed\n", s.passed, s.failed);
  return s.failed == 0 ? 0 : 1;
}

//! An element of any tested type in double (bf16/fp16 widen through float).
template <class T>
double to_double(T v) {
  if constexpr (std::is_floating_point_v<T>) return static_cast<double>(v);
  else return static_cast<double>(static_cast<float>(v));
}

//! Compares r to e elementwise with `tol`; scale[i] (or |e[i]|) sets each element's rtol
//! magnitude. Reports the worst element and records one check.
template <class R, class E>
bool all_close(const std::vector<R>& r, const std::vector<E>& e, Tolerance tol, const char* what, const char* file,
               int line, const std::vector<double>* scale = nullptr) {
  if (r.size() != e.size()) return record(false, what, file, line, "size mismatch");
  std::size_t bad = 0, worst = 0;
  double worst_excess = -1;
  for (std::size_t i = 0; i < r.size(); ++i) {
    const double rv = to_double(r[i]);
    const double ev = to_double(e[i]);
    const double sc = scale ? (*scale)[i] : std::abs(ev);
    if (!tol.accepts(rv, ev, sc)) {
      const double excess = std::isnan(rv) ? 1e300 : std::abs(rv - ev) - (tol.atol + tol.rtol * sc);
      if (excess > worst_excess) {
        worst_excess = excess;
        worst = i;
      }
      ++bad;
    }
  }
  if (bad == 0) return record(true, what, file, line);
  std::ostringstream os;
  os << bad << " of " << r.size() << " elements outside atol " << tol.atol << " rtol " << tol.rtol << "; worst at "
     << worst << ": got " << to_double(r[worst]) << ", want " << to_double(e[worst]);
  return record(false, what, file, line, os.str());
}

//! Fresh random values in [lo, hi) (never all zeros), from a seed printed by the case.
template <class T>
std::vector<T> random_values(std::size_t n, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(u(rng));
  return v;
}

}  // namespace dr2net::testing

#define GPU_CHECK(cond, ...) ::dr2net::testing::record(static_cast<bool>(cond), #cond, __FILE__, __LINE__, ##__VA_ARGS__)
#define GPU_CHECK_CLOSE(r, e, tol, ...) \
  ::dr2net::testing::all_close(r, e, tol, #r " ~ " #e, __FILE__, __LINE__, ##__VA_ARGS__)
