// GPU benchmark: bandwidth of the fused combine kernels as a share of a device-to-device
// cudaMemcpy measured in the same run (target: >= 80%), written as JSON and a table.
//
// The ViT-B/16 step comparison (standard vs reversible step time and peak device memory at
// 197 and 1568 tokens, largest batch per memory budget) needs the device ViT residual
// functions (CudaVitAttention / CudaVitMlp), which are not built yet; the JSON says so in
// "vit_step" instead of inventing figures.
//
// Usage: dr2net_bench_gpu_vit_step [--json FILE] [--elements N] [--repeats R]

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "dr2net/backend/cuda/cuda.cuh"
#include "dr2net/block/combine.hpp"

using namespace dr2net;

namespace {

//! Milliseconds per call of `launch`, median-free mean over `repeats` after one warm-up.
template <class Launch>
double time_ms(CudaContext& ctx, int repeats, Launch&& launch) {
  cudaEvent_t a, b;
  DR2NET_CUDA_CHECK(cudaEventCreate(&a));
  DR2NET_CUDA_CHECK(cudaEventCreate(&b));
  launch();
  DR2NET_CUDA_CHECK(cudaEventRecord(a, ctx.stream()));
  for (int r = 0; r < repeats; ++r) launch();
  DR2NET_CUDA_CHECK(cudaEventRecord(b, ctx.stream()));
  DR2NET_CUDA_CHECK(cudaEventSynchronize(b));
  float ms = 0;
  DR2NET_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return static_cast<double>(ms) / repeats;
}

struct KernelFigure {
  std::string name;
  double bytes;  // bytes read + written per call
  double ms;
  double gbps() const { return bytes / (ms * 1e6); }
};

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  std::size_t n = std::size_t{1} << 26;
  int repeats = 20;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
    else if (!std::strcmp(argv[i], "--elements") && i + 1 < argc) n = std::strtoull(argv[++i], nullptr, 10);
    else if (!std::strcmp(argv[i], "--repeats") && i + 1 < argc) repeats = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--json FILE] [--elements N] [--repeats R]\n", argv[0]);
      return 2;
    }
  }
  try {
    CudaContext ctx;
    cudaDeviceProp prop{};
    DR2NET_CUDA_CHECK(cudaGetDeviceProperties(&prop, ctx.device()));
    auto x = ctx.allocate<float>(n, MemoryCategory::Streams), y = ctx.allocate<float>(n, MemoryCategory::Streams);
    auto gx = ctx.allocate<float>(n, MemoryCategory::Streams), gy = ctx.allocate<float>(n, MemoryCategory::Streams);
    auto f = ctx.allocate<float>(n, MemoryCategory::Scratch);
    auto fb = ctx.allocate<__nv_bfloat16>(n, MemoryCategory::Scratch);
    for (auto* p : {x.data(), y.data(), gx.data(), gy.data(), f.data()})
      DR2NET_CUDA_CHECK(cudaMemsetAsync(p, 0, n * sizeof(float), ctx.stream()));  // zeros: no NaN/denormal slow paths
    DR2NET_CUDA_CHECK(cudaMemsetAsync(fb.data(), 0, n * sizeof(__nv_bfloat16), ctx.stream()));
    const double fs = sizeof(float), bs = sizeof(__nv_bfloat16), dn = static_cast<double>(n);

    const double copy_ms = time_ms(ctx, repeats, [&] { copy_on_device(ctx, y.data(), x.data(), n); });
    const double copy_gbps = 2 * fs * dn / (copy_ms * 1e6);
    std::vector<KernelFigure> figs;
    figs.push_back({"forward fp32", 4 * fs * dn, time_ms(ctx, repeats, [&] {
                      for_each_index(ctx, n, ForwardCombine<float, float, float>{x.data(), y.data(), f.data(), 0.5f, 0.5f});
                    })});
    figs.push_back({"forward fp32/bf16", (3 * fs + bs) * dn, time_ms(ctx, repeats, [&] {
                      for_each_index(ctx, n, ForwardCombine<float, __nv_bfloat16, float>{x.data(), y.data(), fb.data(), 0.5f, 0.5f});
                    })});
    figs.push_back({"backward+inverse fp32", 8 * fs * dn, time_ms(ctx, repeats, [&] {
                      for_each_index(ctx, n, BackwardCombine<float, float, float, true>{gx.data(), gy.data(), nullptr, y.data(),
                                                                                      x.data(), f.data(), 0.5f, 0.5f});
                    })});
    figs.push_back({"backward+inverse fp32/bf16 (J^T apart)", (8 * fs + 2 * bs) * dn, time_ms(ctx, repeats, [&] {
                      for_each_index(ctx, n, BackwardCombine<float, __nv_bfloat16, float, true>{
                                                 gx.data(), gy.data(), fb.data(), y.data(), x.data(), fb.data(), 0.5f, 0.5f});
                    })});
    figs.push_back({"convert fp32->bf16", (fs + bs) * dn, time_ms(ctx, repeats, [&] {
                      for_each_index(ctx, n, ConvertCopy<float, __nv_bfloat16>{fb.data(), x.data()});
                    })});
    ctx.synchronize();

    std::printf("device %s, %zu elements, copy %.1f GB/s\n", prop.name, n, copy_gbps);
    std::printf("%-42s %10s %10s %8s\n", "kernel", "ms", "GB/s", "of copy");
    double worst_share = 1e300;
    for (const auto& k : figs) {
      const double share = k.gbps() / copy_gbps;
      worst_share = share < worst_share ? share : worst_share;
      std::printf("%-42s %10.3f %10.1f %7.1f%%\n", k.name.c_str(), k.ms, k.gbps(), 100 * share);
    }
    if (!json_path.empty()) {
      std::ofstream j(json_path);
      j << "{\n  \"device\": \"" << prop.name << "\",\n  \"elements\": " << n << ",\n  \"copy_gbps\": " << copy_gbps
        << ",\n  \"combine\": [\n";
      for (std::size_t i = 0; i < figs.size(); ++i)
        j << "    {\"kernel\": \"" << figs[i].name << "\", \"ms\": " << figs[i].ms << ", \"gbps\": " << figs[i].gbps()
          << ", \"share_of_copy\": " << figs[i].gbps() / copy_gbps << "}" << (i + 1 < figs.size() ? "," : "") << "\n";
      j << "  ],\n  \"vit_step\": null,\n  \"vit_step_note\": \"device ViT residual functions not built yet\",\n"
        << "  \"summary\": {\"copy GB/s\": " << copy_gbps << ", \"worst combine share of copy\": " << worst_share
        << ", \"combine target (>= 0.8) met\": " << (worst_share >= 0.8 ? "true" : "false") << "}\n}\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
