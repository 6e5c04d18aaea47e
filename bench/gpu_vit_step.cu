// GPU benchmark, written as JSON and tables:
//  1. bandwidth of the fused combine kernels as a share of a device-to-device cudaMemcpy
//     measured in the same run (target: >= 80%);
//  2. a ViT-B/16-sized stack (D 768, 12 heads, MLP 3072, 12 layers; CudaVitAttention /
//     CudaVitMlp in bf16 over fp32 streams) at 197 and 1568 tokens: training-step time and
//     peak device memory (from the context's meter) in standard and reversible mode at the
//     same batch; the largest batch each mode fits in a memory budget; and the reversible
//     peak activation bytes of 12 vs 24 layers (target: within 2%);
//  3. the adds-into path (the last GEMM of each function accumulating into the stream, which
//     needs the stream type to be the compute type): forward time of the same stack in fp32
//     (TF32 GEMMs) at 197 tokens with adding on and off, at (alpha, beta) = (0, 1) where the
//     GEMM is the only pass over the stream and at (0.5, 0.5) where one pre-combine pass
//     stays.
//
// Bandwidth counts each distinct buffer once per direction (bandwidth.hpp): the mixed-precision
// backward pass reads J^T g and f from one scratch buffer, so it moves 7 stream-sized and one
// compute-sized transfer per element, not 8 and 2.
//
// The largest batch: the meter's peak is affine in the batch (every buffer is a fixed size
// plus a multiple of B), so it is measured at B = 1 and B = 2, solved for the budget, and the
// answer checked by running that batch (stepping down while it does not fit, four tries at
// most); when no try fits it reports none (batch_search.hpp).
//
// Usage: dr2net_bench_gpu_vit_step [--json FILE] [--elements N] [--repeats R]
//          [--budget-gib G] [--batch-197 B] [--batch-1568 B] [--no-vit]

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include "dr2net/backend/cuda/cuda.cuh"
#include "dr2net/block/combine.hpp"
#include "dr2net/block/stack.hpp"
#include "dr2net/dr2net.hpp"
#include "dr2net/modules/cuda/vit.cuh"
#include "dr2net/schedule/schedules.hpp"

#include "bandwidth.hpp"
#include "batch_search.hpp"
#include "cli.hpp"

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
  std::uint64_t bytes;  // bytes read + written per call (bandwidth.hpp)
  double ms;
  double gbps() const { return dr2net_bench::gb_per_s(bytes, ms); }
};

using VitB = CudaVitLayer<__nv_bfloat16, ConstantSchedule, Bf16ComputeFp32Streams>;
using VitStack = ReversibleStack<VitB>;

constexpr std::int64_t kDim = 768, kHeads = 12, kHidden = 3072;

VitStack make_vit_b(CudaContext& ctx, int layers) {
  return VitStack(ctx, make_cuda_vit_layers<__nv_bfloat16, ConstantSchedule, Bf16ComputeFp32Streams>(
                           ctx, layers, VitLayerConfig{kDim, kHeads, kHidden, 1e-6, 0.1, 0.0, DropPathRule::Linear}, 1),
                  ConstantSchedule(0.5, 0.5));
}

//! Inputs and outputs of one training step at batch B.
struct StepBuffers {
  Shape shape;
  DeviceBuffer<float> h0, out, dout, dh0;
  StepBuffers(CudaContext& ctx, std::int64_t batch, std::int64_t tokens) : shape{batch, tokens, kDim} {
    const auto n = static_cast<std::size_t>(shape.numel());
    h0 = ctx.allocate<float>(n, MemoryCategory::Other);
    out = ctx.allocate<float>(n, MemoryCategory::Other);
    dout = ctx.allocate<float>(n, MemoryCategory::Other);
    dh0 = ctx.allocate<float>(n, MemoryCategory::Other);
    // Small deterministic values: no NaN/denormal slow paths.
    for_each_index(ctx, n, Fill<float>{h0.data(), 0.01f});
    for_each_index(ctx, n, Fill<float>{dout.data(), 0.001f});
  }
};

void step(VitStack& s, StepBuffers& b, std::int64_t k) {
  s.zero_grad();
  s.forward(b.h0.view(b.shape), b.out.view(b.shape), k);
  s.backward(b.dout.view(b.shape), b.dh0.view(b.shape));
}

struct StepFigure {
  std::string mode;
  std::int64_t tokens = 0, batch = 0;
  double ms = 0;
  std::size_t peak_total = 0, peak_activation = 0;
};

using VitF32 = CudaVitLayer<float, ConstantSchedule, Fp32AllowTf32>;

struct AddsIntoFigure {
  double alpha = 0, beta = 0, ms_adding = 0, ms_separate = 0;
};

//! Forward time (12 layers, fp32 with TF32 GEMMs, inference so no masks) with the functions
//! adding into the stream and with a separate combine pass, at each (alpha, beta); one stack
//! serves every point (its schedule is reassigned).
std::vector<AddsIntoFigure> adds_into_forward(CudaContext& ctx, const std::vector<Coefficients>& points,
                                              std::int64_t batch, int repeats) {
  ReversibleStack<VitF32> s(ctx, make_cuda_vit_layers<float, ConstantSchedule, Fp32AllowTf32>(
                                     ctx, 12, VitLayerConfig{kDim, kHeads, kHidden, 1e-6, 0.0, 0.0, DropPathRule::Linear}, 1),
                            ConstantSchedule());
  StepBuffers b(ctx, batch, 197);
  const auto set = [&](bool on) {
    for (int l = 0; l < s.num_layers(); ++l) {
      s.layer(l).f().set_adds_into(on);
      s.layer(l).g().set_adds_into(on);
    }
  };
  const auto run = [&] { s.predict(b.h0.view(b.shape), b.out.view(b.shape), 0); };
  std::vector<AddsIntoFigure> figures;
  for (const Coefficients& c : points) {
    s.schedule() = ConstantSchedule(c);
    AddsIntoFigure f{c.alpha, c.beta};
    set(true);
    f.ms_adding = time_ms(ctx, repeats, run);
    set(false);
    f.ms_separate = time_ms(ctx, repeats, run);
    figures.push_back(f);
  }
  s.release_workspace();
  ctx.synchronize();
  return figures;
}

//! Mean step time and the meter's peaks of one mode at one batch (workspace released after).
StepFigure measure_step(CudaContext& ctx, VitStack& s, BackpropMode mode, std::int64_t batch, std::int64_t tokens,
                        int repeats) {
  s.set_mode(mode);
  StepFigure f{std::string(mode_name(mode)), tokens, batch};
  {
    StepBuffers b(ctx, batch, tokens);
    ctx.synchronize();
    ctx.meter().reset_peaks();
    step(s, b, 0);  // warm-up; also sizes every buffer
    ctx.synchronize();
    f.peak_total = ctx.meter().peak_total();
    f.peak_activation = ctx.meter().peak_activation();
    std::int64_t k = 1;
    f.ms = time_ms(ctx, repeats, [&] { step(s, b, k++); });
  }
  s.release_workspace();
  ctx.synchronize();
  return f;
}

//! The meter's peak bytes of one step, or 0 when it runs out of device memory.
std::size_t peak_or_zero(CudaContext& ctx, VitStack& s, BackpropMode mode, std::int64_t batch, std::int64_t tokens) {
  s.set_mode(mode);
  std::size_t peak = 0;
  try {
    StepBuffers b(ctx, batch, tokens);
    ctx.meter().reset_peaks();
    step(s, b, 0);
    ctx.synchronize();
    peak = ctx.meter().peak_total();
  } catch (const dr2net::Error&) {
    peak = 0;
  }
  s.release_workspace();
  ctx.synchronize();
  return peak;
}

struct BudgetFigure {
  std::string mode;
  std::int64_t tokens = 0;
  dr2net_bench::BatchSearch search;  // search.largest_batch 0: no batch found within the budget
};

//! Largest batch whose metered peak stays within `budget` bytes (see the file comment).
BudgetFigure largest_batch(CudaContext& ctx, VitStack& s, BackpropMode mode, std::int64_t tokens, std::size_t budget) {
  BudgetFigure f{std::string(mode_name(mode)), tokens};
  f.search = dr2net_bench::largest_fitting_batch(
      [&](std::int64_t batch) { return peak_or_zero(ctx, s, mode, batch, tokens); }, budget);
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  std::size_t n = std::size_t{1} << 26;
  int repeats = 20;
  double budget_gib = 40;
  std::int64_t batch_197 = 64, batch_1568 = 8;
  bool vit = true;
  {
    CLI::App app("GPU benchmark: combine-kernel bandwidth vs a device copy, and a ViT-B/16-sized stack's step "
                 "time and memory in standard and reversible mode.",
                 "dr2net_bench_gpu_vit_step");
    using dr2net_cli::add_integer;
    app.add_option("--json", json_path, "the results as JSON");
    add_integer(app, "--elements", n, std::size_t{1}, std::size_t{1} << 34, "elements per stream of the bandwidth test");
    add_integer(app, "--repeats", repeats, 1, 1 << 20, "timed repeats");
    app.add_option("--budget-gib", budget_gib, "memory budget of the largest-batch search, GiB")
        ->check(dr2net_cli::positive())
        ->capture_default_str();
    add_integer(app, "--batch-197", batch_197, std::int64_t{1}, std::int64_t{1} << 20, "batch at 197 tokens");
    add_integer(app, "--batch-1568", batch_1568, std::int64_t{1}, std::int64_t{1} << 20, "batch at 1568 tokens");
    bool no_vit = false;
    app.add_flag("--no-vit", no_vit, "the bandwidth test only");
    if (const auto status = dr2net_cli::parse(app, argc, argv)) return *status;
    vit = !no_vit;
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
    using dr2net_bench::bytes_moved, dr2net_bench::reads, dr2net_bench::writes, dr2net_bench::updates;
    constexpr std::uint64_t fs = sizeof(float), bs = sizeof(__nv_bfloat16);
    const std::uint64_t un = n;

    const double copy_ms = time_ms(ctx, repeats, [&] { copy_on_device(ctx, y.data(), x.data(), n); });
    const double copy_gbps = dr2net_bench::gb_per_s(bytes_moved({writes(y.data(), fs), reads(x.data(), fs)}, un), copy_ms);
    // Each figure's operands are the functor's own pointers, so a shared buffer counts once.
    std::vector<KernelFigure> figs;
    {
      const ForwardCombine<float, float, float> k{x.data(), y.data(), f.data(), 0.5f, 0.5f};
      figs.push_back({"forward fp32", bytes_moved({updates(k.x, fs), reads(k.y, fs), reads(k.f, fs)}, un),
                      time_ms(ctx, repeats, [&] { for_each_index(ctx, n, k); })});
    }
    {
      const ForwardCombine<float, __nv_bfloat16, float> k{x.data(), y.data(), fb.data(), 0.5f, 0.5f};
      figs.push_back({"forward fp32/bf16", bytes_moved({updates(k.x, fs), reads(k.y, fs), reads(k.f, bs)}, un),
                      time_ms(ctx, repeats, [&] { for_each_index(ctx, n, k); })});
    }
    {
      const BackwardCombine<float, float, float, true> k{gx.data(), gy.data(), nullptr, y.data(),
                                                         x.data(),  f.data(),  0.5f,    0.5f};
      figs.push_back({"backward+inverse fp32",
                      bytes_moved({updates(k.gx, fs), updates(k.gy, fs), reads(k.jt, fs), updates(k.y, fs),
                                   reads(k.x, fs), reads(k.f, fs)},
                                  un),
                      time_ms(ctx, repeats, [&] { for_each_index(ctx, n, k); })});
    }
    {
      // jt and f are the same scratch buffer: read once.
      const BackwardCombine<float, __nv_bfloat16, float, true> k{gx.data(), gy.data(), fb.data(), y.data(),
                                                                 x.data(),  fb.data(), 0.5f,      0.5f};
      figs.push_back({"backward+inverse fp32/bf16 (J^T apart)",
                      bytes_moved({updates(k.gx, fs), updates(k.gy, fs), reads(k.jt, bs), updates(k.y, fs),
                                   reads(k.x, fs), reads(k.f, bs)},
                                  un),
                      time_ms(ctx, repeats, [&] { for_each_index(ctx, n, k); })});
    }
    {
      const ConvertCopy<float, __nv_bfloat16> k{fb.data(), x.data()};
      figs.push_back({"convert fp32->bf16", bytes_moved({writes(k.dst, bs), reads(k.src, fs)}, un),
                      time_ms(ctx, repeats, [&] { for_each_index(ctx, n, k); })});
    }
    ctx.synchronize();

    std::printf("device %s, %zu elements, copy %.1f GB/s\n", prop.name, n, copy_gbps);
    std::printf("%-42s %10s %10s %8s\n", "kernel", "ms", "GB/s", "of copy");
    double worst_share = 1e300;
    for (const auto& k : figs) {
      const double share = k.gbps() / copy_gbps;
      worst_share = share < worst_share ? share : worst_share;
      std::printf("%-42s %10.3f %10.1f %7.1f%%\n", k.name.c_str(), k.ms, k.gbps(), 100 * share);
    }
    // Free the combine benchmark's buffers before the ViT part.
    for (auto* b : {&x, &y, &gx, &gy, &f}) b->reset();
    fb.reset();
    ctx.synchronize();

    std::vector<StepFigure> steps;
    std::vector<BudgetFigure> budgets;
    std::size_t peak12 = 0, peak24 = 0;
    std::vector<AddsIntoFigure> adds;
    const auto budget = static_cast<std::size_t>(budget_gib * 1073741824.0);
    if (vit) {
      const int vit_repeats = repeats < 5 ? repeats : 5;
      {
        VitStack s = make_vit_b(ctx, 12);
        for (const auto& [tokens, batch] : {std::pair<std::int64_t, std::int64_t>{197, batch_197}, {1568, batch_1568}}) {
          for (BackpropMode m : {BackpropMode::Standard, BackpropMode::Reversible})
            steps.push_back(measure_step(ctx, s, m, batch, tokens, vit_repeats));
          for (BackpropMode m : {BackpropMode::Standard, BackpropMode::Reversible})
            budgets.push_back(largest_batch(ctx, s, m, tokens, budget));
        }
        peak12 = measure_step(ctx, s, BackpropMode::Reversible, 8, 197, 1).peak_activation;
      }
      {
        VitStack s = make_vit_b(ctx, 24);
        peak24 = measure_step(ctx, s, BackpropMode::Reversible, 8, 197, 1).peak_activation;
      }
      std::printf("\nViT-B/16 stack, bf16 compute over fp32 streams (12 layers)\n");
      std::printf("%-11s %7s %6s %10s %14s %16s\n", "mode", "tokens", "batch", "step ms", "peak MiB", "peak act. MiB");
      for (const auto& st : steps)
        std::printf("%-11s %7lld %6lld %10.2f %14.1f %16.1f\n", st.mode.c_str(), static_cast<long long>(st.tokens),
                    static_cast<long long>(st.batch), st.ms, st.peak_total / 1048576.0, st.peak_activation / 1048576.0);
      std::printf("largest batch within %.1f GiB (metered peak):\n", budget_gib);
      for (const auto& b : budgets) {
        if (b.search.found())
          std::printf("  %-11s tokens %5lld: %lld\n", b.mode.c_str(), static_cast<long long>(b.tokens),
                      static_cast<long long>(b.search.largest_batch));
        else
          std::printf("  %-11s tokens %5lld: none found (estimate %lld, %d tries over budget or out of memory)\n",
                      b.mode.c_str(), static_cast<long long>(b.tokens), static_cast<long long>(b.search.estimate),
                      b.search.tries);
      }
      std::printf("reversible peak activation, 197 tokens, batch 8: 12 layers %zu B, 24 layers %zu B (ratio %.4f)\n",
                  peak12, peak24, static_cast<double>(peak24) / static_cast<double>(peak12));
      adds = adds_into_forward(ctx, {Coefficients{0.0, 1.0}, Coefficients{0.5, 0.5}}, batch_197, vit_repeats);
      std::printf("\nadds-into, fp32 (TF32 GEMMs), 12 layers, 197 tokens x %lld, forward only:\n",
                  static_cast<long long>(batch_197));
      for (const auto& a : adds)
        std::printf("  (alpha, beta) = (%.1f, %.1f): adding %.2f ms, separate combine %.2f ms (ratio %.3f)\n", a.alpha,
                    a.beta, a.ms_adding, a.ms_separate, a.ms_adding / a.ms_separate);
    }

    if (!json_path.empty()) {
      std::ofstream j(json_path);
      j << "{\n  \"device\": \"" << prop.name << "\",\n  \"elements\": " << n << ",\n  \"copy_gbps\": " << copy_gbps
        << ",\n  \"combine\": [\n";
      for (std::size_t i = 0; i < figs.size(); ++i)
        j << "    {\"kernel\": \"" << figs[i].name << "\", \"ms\": " << figs[i].ms << ", \"gbps\": " << figs[i].gbps()
          << ", \"share_of_copy\": " << figs[i].gbps() / copy_gbps << "}" << (i + 1 < figs.size() ? "," : "") << "\n";
      j << "  ],\n";
      if (vit) {
        j << "  \"vit_step\": {\n    \"model\": {\"dim\": " << kDim << ", \"heads\": " << kHeads << ", \"hidden\": " << kHidden
          << ", \"layers\": 12, \"precision\": \"bf16 compute, fp32 streams\"},\n    \"steps\": [\n";
        for (std::size_t i = 0; i < steps.size(); ++i)
          j << "      {\"mode\": \"" << steps[i].mode << "\", \"tokens\": " << steps[i].tokens << ", \"batch\": "
            << steps[i].batch << ", \"step_ms\": " << steps[i].ms << ", \"peak_bytes\": " << steps[i].peak_total
            << ", \"peak_activation_bytes\": " << steps[i].peak_activation << "}" << (i + 1 < steps.size() ? "," : "")
            << "\n";
        j << "    ],\n    \"budget_bytes\": " << budget << ",\n    \"largest_batch\": [\n";
        for (std::size_t i = 0; i < budgets.size(); ++i)
          j << "      {\"mode\": \"" << budgets[i].mode << "\", \"tokens\": " << budgets[i].tokens
            << ", \"largest_batch\": " << budgets[i].search.largest_batch << ", \"found\": "
            << (budgets[i].search.found() ? "true" : "false") << ", \"estimate\": " << budgets[i].search.estimate
            << ", \"bytes_per_sample\": " << budgets[i].search.bytes_per_sample << ", \"fixed_bytes\": "
            << budgets[i].search.fixed_bytes << "}"
            << (i + 1 < budgets.size() ? "," : "") << "\n";
        j << "    ],\n    \"reversible_peak_activation_bytes\": {\"layers_12\": " << peak12 << ", \"layers_24\": "
          << peak24 << "},\n    \"adds_into_forward\": [\n";
        for (std::size_t i = 0; i < adds.size(); ++i)
          j << "      {\"alpha\": " << adds[i].alpha << ", \"beta\": " << adds[i].beta << ", \"tokens\": 197, \"batch\": "
            << batch_197 << ", \"precision\": \"fp32, TF32 GEMMs\", \"ms_adding\": " << adds[i].ms_adding
            << ", \"ms_separate_combine\": " << adds[i].ms_separate << "}" << (i + 1 < adds.size() ? "," : "") << "\n";
        j << "    ]\n  },\n";
      } else {
        j << "  \"vit_step\": null,\n";
      }
      j << "  \"summary\": {\"copy GB/s\": " << copy_gbps << ", \"worst combine share of copy\": " << worst_share
        << ", \"combine target (>= 0.8) met\": " << (worst_share >= 0.8 ? "true" : "false");
      if (vit) {
        auto find = [&](const char* mode, std::int64_t tokens) -> const StepFigure* {
          for (const auto& st : steps)
            if (st.mode == mode && st.tokens == tokens) return &st;
          return nullptr;
        };
        for (std::int64_t t : {std::int64_t{197}, std::int64_t{1568}}) {
          const StepFigure *sd = find("standard", t), *rv = find("reversible", t);
          if (sd && rv)
            j << ", \"" << t << " tokens: reversible/standard peak\": "
              << static_cast<double>(rv->peak_total) / static_cast<double>(sd->peak_total) << ", \"" << t
              << " tokens: reversible/standard step time\": " << rv->ms / sd->ms << ", \"" << t
              << " tokens: step time target (<= 1.4) met\": " << (rv->ms / sd->ms <= 1.4 ? "true" : "false");
        }
        const double depth_ratio = static_cast<double>(peak24) / static_cast<double>(peak12);
        j << ", \"reversible peak activation 24/12 layers\": " << depth_ratio
          << ", \"depth target (within 2%) met\": " << (depth_ratio >= 0.98 && depth_ratio <= 1.02 ? "true" : "false");
        for (const auto& a : adds)
          j << ", \"adds-into/separate forward at (" << a.alpha << ", " << a.beta << ")\": " << a.ms_adding / a.ms_separate;
      }
      j << "}\n}\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
