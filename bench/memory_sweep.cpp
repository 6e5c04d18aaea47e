// dr2net_bench_memory_sweep: peak activation and total memory of one training step of a ViT
// stack in standard, reversible and error-bounded mode, across depth and token count, with
// the reversible/standard step-time ratio measured in the same run, and the reversible peak
// compared with the analytic minimum
//   parameters + gradients + optimizer state (AdamW: 2 x parameters) + 4 stream tensors
//   + one residual function's saved internals (the largest).
//
//   dr2net_bench_memory_sweep [--dim 192] [--heads 3] [--hidden 768] [--batch 2]
//                             [--depths 6,12,24,48] [--tokens-list 65,197,401] [--depth-tokens 197]
//                             [--tokens-depth 12] [--json FILE]

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/modules/vit.hpp"

#include "cli.hpp"

namespace {

struct Options {
  std::int64_t dim = 192, heads = 3, hidden = 768, batch = 2;
  std::vector<std::int64_t> depths{6, 12, 24, 48};
  std::vector<std::int64_t> tokens_list{65, 197, 401};
  std::int64_t depth_tokens = 197, tokens_depth = 12;
  std::string json;
};

// The command line; nullopt: run, otherwise the exit status (usage errors: 2, naming the flag).
std::optional<int> parse(int argc, char** argv, Options& o) {
  CLI::App app("Peak activation and total memory of one ViT training step in standard, reversible and "
               "error-bounded mode across depth and token count.",
               "dr2net_bench_memory_sweep");
  using dr2net_cli::add_integer;
  constexpr std::int64_t kMax = 1000000000;
  const auto list = [](const std::vector<std::int64_t>& v) {
    std::string s;
    for (auto x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
    return s;
  };
  std::string depths = list(o.depths), tokens = list(o.tokens_list);
  add_integer(app, "--dim", o.dim, std::int64_t{1}, kMax, "model width D");
  add_integer(app, "--heads", o.heads, std::int64_t{1}, kMax, "attention heads");
  add_integer(app, "--hidden", o.hidden, std::int64_t{1}, kMax, "MLP hidden width");
  add_integer(app, "--batch", o.batch, std::int64_t{1}, kMax, "batch B");
  app.add_option("--depths", depths, "depths of the depth sweep")
      ->check(dr2net_cli::list_of(dr2net_cli::integer<std::int64_t>(1, 1 << 20)))
      ->capture_default_str();
  app.add_option("--tokens-list", tokens, "token counts of the token sweep")
      ->check(dr2net_cli::list_of(dr2net_cli::integer<std::int64_t>(1, kMax)))
      ->capture_default_str();
  add_integer(app, "--depth-tokens", o.depth_tokens, std::int64_t{1}, kMax, "tokens of the depth sweep");
  add_integer(app, "--tokens-depth", o.tokens_depth, std::int64_t{1}, std::int64_t{1} << 20, "depth of the token sweep");
  app.add_option("--json", o.json, "the results as JSON");
  if (auto status = dr2net_cli::parse(app, argc, argv)) return status;
  o.depths = dr2net_cli::integers<std::int64_t>(depths);
  o.tokens_list = dr2net_cli::integers<std::int64_t>(tokens);
  return std::nullopt;
}

struct Point {
  std::int64_t layers, tokens;
  std::string mode;
  double alpha, beta;
  std::size_t peak_activation, peak_total, analytic_min_total, snapshots;
  double seconds;
};

using Layer = dr2net::VitLayer<float, dr2net::ConstantSchedule>;

// One measured training step in `mode` at (alpha, beta), in a fresh context.
Point measure(const Options& o, std::int64_t L, std::int64_t N, dr2net::BackpropMode mode, double alpha, double beta) {
  using namespace dr2net;
  HostContext ctx;
  ReversibleStack<Layer> stack(ctx, make_vit_layers<float, ConstantSchedule>(static_cast<int>(L), o.dim, o.heads, o.hidden),
                               ConstantSchedule(alpha, beta), {.mode = mode});
  std::size_t param_bytes = 0;
  for (auto& p : stack.parameters()) param_bytes += p.value.size() * sizeof(float);
  // AdamW's two moments, held as a trainer would hold them, so the total is a training total.
  auto optimizer_state = ctx.allocate<float>(2 * param_bytes / sizeof(float), MemoryCategory::Other);

  const Shape shape{o.batch, N, o.dim};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> h0(n), out(n), dout(n), dh0(n);
  for (auto& v : h0) v = normal(rng);
  for (auto& v : dout) v = normal(rng);
  auto step = [&] {
    stack.zero_grad();
    stack.forward(ConstView<float>(h0.data(), shape), TensorView<float>(out.data(), shape), 0);
    stack.backward(ConstView<float>(dout.data(), shape), TensorView<float>(dh0.data(), shape));
  };
  step();  // warm-up: buffers sized, caches warm
  ctx.meter().reset_peaks();
  std::vector<double> times;
  for (int k = 0; k < 3; ++k) {  // the median of three steps
    const auto t0 = std::chrono::steady_clock::now();
    step();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  const double seconds = times[1];

  std::size_t largest_saved = 0;
  for (int l = 0; l < stack.num_layers(); ++l)
    largest_saved = std::max({largest_saved, stack.layer(l).saved_elements_f(shape, l), stack.layer(l).saved_elements_g(shape, l)});
  const std::size_t analytic = 4 * param_bytes + 4 * n * sizeof(float) + largest_saved * sizeof(float);
  return {L, N, std::string(mode_name(mode)), alpha, beta, ctx.meter().peak_activation(), ctx.meter().peak_total(),
          analytic, stack.snapshot_boundaries().size(), seconds};
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (const auto status = parse(argc, argv, o)) return *status;
  std::vector<Point> points;
  auto sweep = [&](std::int64_t L, std::int64_t N, const char* axis) {
    // Standard and reversible at (0, 1); error-bounded at the paper's starting point (1, 0.1),
    // its most expensive point.
    const Point s = measure(o, L, N, dr2net::BackpropMode::Standard, 0.0, 1.0);
    const Point r = measure(o, L, N, dr2net::BackpropMode::Reversible, 0.0, 1.0);
    const Point e = measure(o, L, N, dr2net::BackpropMode::ErrorBounded, 1.0, 0.1);
    for (const Point* p : {&s, &r, &e}) {
      points.push_back(*p);
      std::printf("%-6s L=%3lld N=%4lld %-14s act %9.2f MiB  total %9.2f MiB  analytic-min %9.2f MiB  %6.3f s  snapshots %zu\n",
                  axis, static_cast<long long>(p->layers), static_cast<long long>(p->tokens), p->mode.c_str(),
                  double(p->peak_activation) / 1048576.0, double(p->peak_total) / 1048576.0,
                  double(p->analytic_min_total) / 1048576.0, p->seconds, p->snapshots);
    }
    std::printf("%-6s L=%3lld N=%4lld reversible/standard: activation %.3f, total %.3f, time %.3f; reversible total / analytic minimum %.3f\n",
                axis, static_cast<long long>(L), static_cast<long long>(N), double(r.peak_activation) / double(s.peak_activation),
                double(r.peak_total) / double(s.peak_total), r.seconds / s.seconds,
                double(r.peak_total) / double(r.analytic_min_total));
  };
  for (auto L : o.depths) sweep(L, o.depth_tokens, "depth");
  for (auto N : o.tokens_list) sweep(o.tokens_depth, N, "tokens");

  if (!o.json.empty()) {
    std::ofstream f(o.json);
    f << "{\n  \"config\": {\"dim\": " << o.dim << ", \"heads\": " << o.heads << ", \"hidden\": " << o.hidden
      << ", \"batch\": " << o.batch << ", \"precision\": \"fp32\", \"backend\": \"host\", \"gemm\": \""
      << dr2net::host_gemm_backend() << "\"},\n  \"points\": [\n";
    for (std::size_t i = 0; i < points.size(); ++i) {
      const auto& p = points[i];
      f << "    {\"layers\": " << p.layers << ", \"tokens\": " << p.tokens << ", \"mode\": \"" << p.mode
        << "\", \"alpha\": " << p.alpha << ", \"beta\": " << p.beta << ", \"peak_activation_bytes\": " << p.peak_activation
        << ", \"peak_total_bytes\": " << p.peak_total << ", \"analytic_min_total_bytes\": " << p.analytic_min_total
        << ", \"snapshots\": " << p.snapshots << ", \"step_seconds\": " << p.seconds << "}"
        << (i + 1 < points.size() ? "," : "") << "\n";
    }
    f << "  ]\n}\n";
  }
  return 0;
}
