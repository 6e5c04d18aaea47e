// One training step (forward + backward) of a ViT stack on the host, reversible and standard
// backprop side by side: seconds per step, their ratio, and the peak activation bytes the
// context's meter recorded for each mode.
//
//   dr2net_bench_host_vit_step [--layers 12] [--batch 8] [--tokens 197] [--dim 192] [--heads 3]
//                              [--hidden 768] [--steps 5] [--json FILE]
//
// Defaults are ViT-Tiny/16 at 224 px (fp32). The two modes run interleaved, step by step, so
// that load from other processes affects both alike; the median over steps is reported.

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "dr2net/backend/host/gemm.hpp"
#include "dr2net/dr2net.hpp"
#include "dr2net/modules/vit.hpp"

#include "cli.hpp"

namespace {

using T = float;
using Sched = dr2net::ConstantSchedule;
using Layer = dr2net::VitLayer<T, Sched>;
using Stack = dr2net::ReversibleStack<Layer>;

struct Options {
  int layers = 12;
  std::int64_t batch = 8, tokens = 197, dim = 192, heads = 3, hidden = 768;
  int steps = 5;
  std::string json;
};

// The command line; nullopt: run, otherwise the exit status (usage errors: 2, naming the flag).
std::optional<int> parse(int argc, char** argv, Options& o) {
  CLI::App app("One ViT training step on the host, reversible and standard backprop side by side (fp32).",
               "dr2net_bench_host_vit_step");
  using dr2net_cli::add_integer;
  constexpr std::int64_t kMax = 1000000000;
  add_integer(app, "--layers", o.layers, 1, 1 << 20, "layers");
  add_integer(app, "--batch", o.batch, std::int64_t{1}, kMax, "batch B");
  add_integer(app, "--tokens", o.tokens, std::int64_t{1}, kMax, "tokens N");
  add_integer(app, "--dim", o.dim, std::int64_t{1}, kMax, "model width D");
  add_integer(app, "--heads", o.heads, std::int64_t{1}, kMax, "attention heads");
  add_integer(app, "--hidden", o.hidden, std::int64_t{1}, kMax, "MLP hidden width");
  add_integer(app, "--steps", o.steps, 1, 1 << 20, "timed steps per mode");
  app.add_option("--json", o.json, "the results as JSON");
  return dr2net_cli::parse(app, argc, argv);
}

//! One mode's stack, on its own context so that its meter sees only that mode.
struct Run {
  dr2net::HostContext ctx;
  Stack stack;
  std::vector<double> seconds, forward_seconds, backward_seconds;
  Run(const Options& o, dr2net::BackpropMode mode)
      : stack(ctx,
              dr2net::make_vit_layers<T, Sched>(o.layers, dr2net::VitLayerConfig{o.dim, o.heads, o.hidden}, 2024),
              Sched(0.0, 1.0), {.mode = mode, .seed = 7}) {}

  void step(const dr2net::Shape& s, const std::vector<T>& h0, const std::vector<T>& dout, std::vector<T>& out,
            std::vector<T>& dh0, std::int64_t step) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    stack.zero_grad();
    stack.forward(dr2net::ConstView<T>(h0.data(), s), dr2net::TensorView<T>(out.data(), s), step);
    const auto t1 = clock::now();
    stack.backward(dr2net::ConstView<T>(dout.data(), s), dr2net::TensorView<T>(dh0.data(), s));
    const auto t2 = clock::now();
    seconds.push_back(std::chrono::duration<double>(t2 - t0).count());
    forward_seconds.push_back(std::chrono::duration<double>(t1 - t0).count());
    backward_seconds.push_back(std::chrono::duration<double>(t2 - t1).count());
  }
  void clear() {
    seconds.clear();
    forward_seconds.clear();
    backward_seconds.clear();
  }
  static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  }
  double median() const { return median(seconds); }
  double min() const { return *std::min_element(seconds.begin(), seconds.end()); }
  double forward() const { return median(forward_seconds); }
  double backward() const { return median(backward_seconds); }
};

std::string mode_json(const Run& r) {
  return "{\"seconds_per_step\": " + std::to_string(r.median()) + ", \"min_seconds\": " + std::to_string(r.min()) +
         ", \"forward_seconds\": " + std::to_string(r.forward()) + ", \"backward_seconds\": " +
         std::to_string(r.backward()) + ", \"peak_activation_bytes\": " +
         std::to_string(r.ctx.meter().peak_activation()) + "}";
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (const auto status = parse(argc, argv, o)) return *status;
  try {
    const dr2net::Shape shape{o.batch, o.tokens, o.dim};
    const auto n = static_cast<std::size_t>(shape.numel());
    std::mt19937_64 rng(1);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    std::vector<T> h0(n), dout(n), out(n), dh0(n);
    for (auto& v : h0) v = static_cast<T>(u(rng));
    for (auto& v : dout) v = static_cast<T>(u(rng));

    Run standard(o, dr2net::BackpropMode::Standard), reversible(o, dr2net::BackpropMode::Reversible);
    // One untimed step each: first-touch of every buffer and of BLAS's own workspace.
    standard.step(shape, h0, dout, out, dh0, 0);
    reversible.step(shape, h0, dout, out, dh0, 0);
    standard.clear();
    reversible.clear();
    for (int s = 1; s <= o.steps; ++s) {
      standard.step(shape, h0, dout, out, dh0, s);
      reversible.step(shape, h0, dout, out, dh0, s);
    }

    const double ts = standard.median(), tr = reversible.median();
    const std::size_t ms = standard.ctx.meter().peak_activation(), mr = reversible.ctx.meter().peak_activation();
    const double mib = 1024.0 * 1024.0;
    std::printf("ViT host training step: %d layers, batch %lld, tokens %lld, dim %lld, heads %lld, hidden %lld, fp32\n",
                o.layers, static_cast<long long>(o.batch), static_cast<long long>(o.tokens),
                static_cast<long long>(o.dim), static_cast<long long>(o.heads), static_cast<long long>(o.hidden));
    std::printf("host GEMM: %s; %d timed steps per mode (median, min)\n", std::string(dr2net::host_gemm_backend()).c_str(),
                o.steps);
    std::printf("%-11s %9s %9s %10s %11s %24s\n", "mode", "s/step", "min s", "forward s", "backward s",
                "peak activation bytes");
    for (const Run* r : {&standard, &reversible}) {
      const std::size_t m = r->ctx.meter().peak_activation();
      std::printf("%-11s %9.3f %9.3f %10.3f %11.3f %13zu (%6.1f MiB)\n", r == &standard ? "standard" : "reversible",
                  r->median(), r->min(), r->forward(), r->backward(), m, static_cast<double>(m) / mib);
    }
    std::printf("reversible / standard: time %.3f, peak activation memory %.3f\n", tr / ts,
                static_cast<double>(mr) / static_cast<double>(ms));

    if (!o.json.empty()) {
      std::ofstream f(o.json);
      if (!f) throw std::runtime_error("cannot write " + o.json);
      f << "{\n"
        << "  \"benchmark\": \"host_vit_step\",\n"
        << "  \"gemm\": \"" << dr2net::host_gemm_backend() << "\",\n"
        << "  \"precision\": \"fp32\",\n"
        << "  \"layers\": " << o.layers << ", \"batch\": " << o.batch << ", \"tokens\": " << o.tokens
        << ", \"dim\": " << o.dim << ", \"heads\": " << o.heads << ", \"hidden\": " << o.hidden
        << ", \"timed_steps\": " << o.steps << ",\n"
        << "  \"standard\": " << mode_json(standard) << ",\n"
        << "  \"reversible\": " << mode_json(reversible) << ",\n"
        << "  \"time_ratio\": " << tr / ts << ",\n"
        << "  \"activation_ratio\": " << static_cast<double>(mr) / static_cast<double>(ms) << "\n"
        << "}\n";
      if (!f) throw std::runtime_error("error writing " + o.json);
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
