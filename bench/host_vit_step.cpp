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
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "dr2net/backend/host/gemm.hpp"
#include "dr2net/dr2net.hpp"
#include "dr2net/modules/vit.hpp"

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

[[noreturn]] void usage(const char* argv0, const std::string& problem) {
  std::cerr << "error: " << problem << "\n"
            << "usage: " << argv0
            << " [--layers L] [--batch B] [--tokens N] [--dim D] [--heads H] [--hidden M] [--steps S] [--json FILE]\n";
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (i + 1 >= argc) usage(argv[0], "missing value after " + std::string(a));
    const std::string v = argv[++i];
    auto number = [&](std::int64_t lo) {
      try {
        std::size_t used = 0;
        const long long n = std::stoll(v, &used);
        if (used != v.size() || n < lo) throw std::invalid_argument(v);
        return static_cast<std::int64_t>(n);
      } catch (const std::exception&) {
        usage(argv[0], std::string(a) + " needs an integer >= " + std::to_string(lo) + ", got '" + v + "'");
      }
    };
    if (a == "--layers") o.layers = static_cast<int>(number(1));
    else if (a == "--batch") o.batch = number(1);
    else if (a == "--tokens") o.tokens = number(1);
    else if (a == "--dim") o.dim = number(1);
    else if (a == "--heads") o.heads = number(1);
    else if (a == "--hidden") o.hidden = number(1);
    else if (a == "--steps") o.steps = static_cast<int>(number(1));
    else if (a == "--json") o.json = v;
    else usage(argv[0], "unknown option " + std::string(a));
  }
  return o;
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
  const Options o = parse(argc, argv);
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
