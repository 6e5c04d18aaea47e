// One training step (forward + backward) of a ViT stack on the host, reversible and standard
// backprop side by side: seconds per step, their ratio, and the peak activation bytes the
// context's meter recorded for each mode.
//
//   dr2net_bench_host_vit_step [--layers 12] [--batch 8] [--tokens 197] [--dim 192] [--heads 3]
//                              [--hidden 768] [--steps 5] [--json FILE]
//                              [--mode standard,reversible,error-bounded] [--alpha 0] [--beta 1]
//                              [--eb-alpha 1] [--eb-beta 0.1] [--dump FILE] [--threads 0]
//
// Defaults are ViT-Tiny/16 at 224 px (fp32), standard and reversible mode at (alpha, beta) =
// (0, 1); error-bounded mode, when asked for, runs at the paper's starting point (1, 0.1). The
// modes run interleaved, step by step, so that load from other processes affects them alike;
// the median over steps is reported. Threads come from --threads, else from the environment
// (DR2NET_NUM_THREADS, else OMP_NUM_THREADS: the host context reads them), so the same
// variables pin both sides of a comparison with another library
// (scripts/bench-vs-pytorch). --dump writes the first mode's untimed step (weights under timm's
// names, h0, dout, out, dh0 and every parameter gradient) as a safetensors file, so that another
// implementation of the same blocks can check it computes the same function.

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
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
  int threads = 0;  // host threads of every context (0: DR2NET_NUM_THREADS, OMP_NUM_THREADS, the cores)
  std::string json;
  std::string modes = "standard,reversible";
  double alpha = 0.0, beta = 1.0;       // standard and reversible mode
  double eb_alpha = 1.0, eb_beta = 0.1;  // error-bounded mode
  std::string dump;
};

//! One mode of the run and the coefficients it runs at.
struct ModeSpec {
  std::string name;  // "standard", "reversible" or "error-bounded"
  dr2net::BackpropMode mode;
  double alpha, beta;
};

std::vector<ModeSpec> mode_specs(const Options& o) {
  std::vector<ModeSpec> specs;
  for (const std::string& w : dr2net_cli::words(o.modes)) {
    if (w == "standard") specs.push_back({w, dr2net::BackpropMode::Standard, o.alpha, o.beta});
    else if (w == "reversible") specs.push_back({w, dr2net::BackpropMode::Reversible, o.alpha, o.beta});
    else specs.push_back({w, dr2net::BackpropMode::ErrorBounded, o.eb_alpha, o.eb_beta});
  }
  return specs;
}

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
  add_integer(app, "--threads", o.threads, 0, dr2net::kMaxHostThreads, "host threads (0: from the environment)");
  app.add_option("--json", o.json, "the results as JSON");
  app.add_option("--mode", o.modes, "the modes to run, interleaved step by step")
      ->check(dr2net_cli::list_of(CLI::IsMember({"standard", "reversible", "error-bounded"})))
      ->capture_default_str();
  app.add_option("--alpha", o.alpha, "alpha of standard and reversible mode")
      ->check(dr2net_cli::finite())
      ->capture_default_str();
  app.add_option("--beta", o.beta, "beta of standard and reversible mode")
      ->check(dr2net_cli::finite())
      ->capture_default_str();
  app.add_option("--eb-alpha", o.eb_alpha, "alpha of error-bounded mode")
      ->check(dr2net_cli::finite())
      ->capture_default_str();
  app.add_option("--eb-beta", o.eb_beta, "beta of error-bounded mode")
      ->check(dr2net_cli::finite())
      ->capture_default_str();
  app.add_option("--dump", o.dump, "the first mode's untimed step (weights, inputs, outputs, gradients) as safetensors");
  if (auto status = dr2net_cli::parse(app, argc, argv)) return status;
  const auto words = dr2net_cli::words(o.modes);
  for (std::size_t i = 0; i < words.size(); ++i)
    for (std::size_t j = 0; j < i; ++j)
      if (words[i] == words[j]) {
        std::cerr << "dr2net_bench_host_vit_step: --mode names '" << words[i] << "' twice (see --help)\n";
        return 2;
      }
  return std::nullopt;
}

//! One mode's stack, on its own context so that its meter sees only that mode.
struct Run {
  dr2net::HostContext ctx;
  Stack stack;
  std::vector<double> seconds, forward_seconds, backward_seconds;
  Run(const Options& o, dr2net::BackpropMode mode, double alpha = 0.0, double beta = 1.0)
      : ctx({.threads = o.threads}),
        stack(ctx,
              dr2net::make_vit_layers<T, Sched>(o.layers, dr2net::VitLayerConfig{o.dim, o.heads, o.hidden}, 2024),
              Sched(alpha, beta), {.mode = mode, .seed = 7}) {}

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

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

std::string mode_json(Run& r, const ModeSpec& m) {
  std::string steps;
  for (const double s : r.seconds) steps += (steps.empty() ? "" : ", ") + number(s);
  return "{\"seconds_per_step\": " + std::to_string(r.median()) + ", \"min_seconds\": " + std::to_string(r.min()) +
         ", \"forward_seconds\": " + std::to_string(r.forward()) + ", \"backward_seconds\": " +
         std::to_string(r.backward()) + ", \"peak_activation_bytes\": " +
         std::to_string(r.ctx.meter().peak_activation()) + ", \"alpha\": " + number(m.alpha) +
         ", \"beta\": " + number(m.beta) + ", \"snapshots\": " + std::to_string(r.stack.snapshot_boundaries().size()) +
         ", \"step_seconds\": [" + steps + "]}";
}

// An integral double (below 2^53) written exactly.
std::string integer_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f", v);
  return buf;
}

// `text` as a JSON string (control characters dropped).
std::string json_string(const std::string& text) {
  std::string s = "\"";
  for (const char c : text)
    if (c == '"' || c == '\\') s += std::string("\\") + c;
    else if (static_cast<unsigned char>(c) >= 0x20) s += c;
  return s + "\"";
}

// A JSON string of an environment variable's value, or null when it is not set.
std::string env_json(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string("null") : json_string(v);
}

// The GEMM work of one forward through the stack, 2 flops per multiply-add: per layer the qkv,
// proj, fc1 and fc2 projections of B*N tokens and the two attention products (Q K^T and P V,
// B*H*N*N*head_dim each).
double forward_gemm_flops(const Options& o) {
  const double m = static_cast<double>(o.batch) * static_cast<double>(o.tokens), d = static_cast<double>(o.dim),
               n = static_cast<double>(o.tokens), h = static_cast<double>(o.hidden);
  const double per_layer = 2 * m * (3 * d * d + d * d + 2 * d * h) + 4 * m * n * d;
  return per_layer * o.layers;
}

// One step's tensors as a safetensors file (8-byte little-endian header length, a JSON header
// padded with spaces to a multiple of 8, then the F32 data): the stack's parameters under their
// names, their gradients under "grad." + name, and input.h0, input.dout, output.out, output.dh0.
void write_dump(const std::string& path, Run& r, const ModeSpec& m, const Options& o, const dr2net::Shape& s,
                const std::vector<T>& h0, const std::vector<T>& dout, const std::vector<T>& out,
                const std::vector<T>& dh0) {
  struct Entry {
    std::string name;
    std::vector<std::int64_t> shape;
    const T* data;
    std::size_t n;
  };
  std::vector<Entry> entries;
  const std::vector<std::int64_t> io_shape{s[0], s[1], s[2]};
  entries.push_back({"input.h0", io_shape, h0.data(), h0.size()});
  entries.push_back({"input.dout", io_shape, dout.data(), dout.size()});
  entries.push_back({"output.out", io_shape, out.data(), out.size()});
  entries.push_back({"output.dh0", io_shape, dh0.data(), dh0.size()});
  for (const auto& p : r.stack.parameters()) {
    std::vector<std::int64_t> shape;
    for (int i = 0; i < p.value.shape().rank(); ++i) shape.push_back(p.value.shape()[i]);
    entries.push_back({p.name, shape, p.value.data(), p.value.size()});
    entries.push_back({"grad." + p.name, shape, p.grad.data(), p.grad.size()});
  }
  std::string header = "{\"__metadata__\": {\"mode\": \"" + m.name + "\", \"alpha\": \"" + number(m.alpha) +
                       "\", \"beta\": \"" + number(m.beta) + "\", \"layers\": \"" + std::to_string(o.layers) +
                       "\", \"dim\": \"" + std::to_string(o.dim) + "\", \"heads\": \"" + std::to_string(o.heads) +
                       "\", \"hidden\": \"" + std::to_string(o.hidden) + "\", \"eps\": \"1e-06\"}";
  std::size_t offset = 0;
  for (const Entry& e : entries) {
    header += ", \"" + e.name + "\": {\"dtype\": \"F32\", \"shape\": [";
    for (std::size_t i = 0; i < e.shape.size(); ++i) header += (i ? ", " : "") + std::to_string(e.shape[i]);
    header += "], \"data_offsets\": [" + std::to_string(offset) + ", " + std::to_string(offset + e.n * sizeof(T)) + "]}";
    offset += e.n * sizeof(T);
  }
  header += "}";
  while (header.size() % 8 != 0) header += ' ';
  std::ofstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("--dump: cannot write " + path);
  std::array<unsigned char, 8> len{};
  for (int i = 0; i < 8; ++i) len[static_cast<std::size_t>(i)] = static_cast<unsigned char>(header.size() >> (8 * i));
  f.write(reinterpret_cast<const char*>(len.data()), 8);
  f << header;
  static_assert(sizeof(T) == 4, "the dump writes F32");
  for (const Entry& e : entries) f.write(reinterpret_cast<const char*>(e.data), static_cast<std::streamsize>(e.n * sizeof(T)));
  if (!f) throw std::runtime_error("--dump: error writing " + path);
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

    // Each mode on its own context (so that its meter sees only that mode), interleaved.
    const std::vector<ModeSpec> specs = mode_specs(o);
    std::vector<std::unique_ptr<Run>> runs;
    for (const ModeSpec& m : specs) runs.push_back(std::make_unique<Run>(o, m.mode, m.alpha, m.beta));
    // One untimed step each: first-touch of every buffer and of BLAS's own workspace.
    for (std::size_t k = 0; k < runs.size(); ++k) {
      runs[k]->step(shape, h0, dout, out, dh0, 0);
      if (k == 0 && !o.dump.empty()) write_dump(o.dump, *runs[0], specs[0], o, shape, h0, dout, out, dh0);
    }
    for (auto& r : runs) r->clear();
    for (int s = 1; s <= o.steps; ++s)
      for (auto& r : runs) r->step(shape, h0, dout, out, dh0, s);

    const auto find = [&](const std::string& name) -> Run* {
      for (std::size_t k = 0; k < specs.size(); ++k)
        if (specs[k].name == name) return runs[k].get();
      return nullptr;
    };
    Run* const standard = find("standard");
    Run* const reversible = find("reversible");
    Run* const error_bounded = find("error-bounded");
    std::size_t parameters = 0;
    for (const auto& p : runs[0]->stack.parameters()) parameters += p.value.size();
    const double mib = 1024.0 * 1024.0;
    std::printf("ViT host training step: %d layers, batch %lld, tokens %lld, dim %lld, heads %lld, hidden %lld, fp32\n",
                o.layers, static_cast<long long>(o.batch), static_cast<long long>(o.tokens),
                static_cast<long long>(o.dim), static_cast<long long>(o.heads), static_cast<long long>(o.hidden));
    std::printf("host GEMM: %s; vector math: %s; %d host threads; %d timed steps per mode (median, min); %zu parameters\n",
                std::string(dr2net::host_gemm_backend()).c_str(), std::string(dr2net::host_vector_math()).c_str(),
                runs[0]->ctx.threads(), o.steps, parameters);
    std::printf("%-13s %-13s %9s %9s %10s %11s %24s\n", "mode", "(alpha, beta)", "s/step", "min s", "forward s",
                "backward s", "peak activation bytes");
    for (std::size_t k = 0; k < runs.size(); ++k) {
      const Run& r = *runs[k];
      const std::size_t m = r.ctx.meter().peak_activation();
      const std::string ab = "(" + number(specs[k].alpha) + ", " + number(specs[k].beta) + ")";
      std::printf("%-13s %-13s %9.3f %9.3f %10.3f %11.3f %13zu (%6.1f MiB)\n", specs[k].name.c_str(), ab.c_str(),
                  r.median(), r.min(), r.forward(), r.backward(), m, static_cast<double>(m) / mib);
    }
    const auto activation = [](const Run* r) { return static_cast<double>(r->ctx.meter().peak_activation()); };
    if (standard != nullptr && reversible != nullptr)
      std::printf("reversible / standard: time %.3f, peak activation memory %.3f\n",
                  reversible->median() / standard->median(), activation(reversible) / activation(standard));
    if (standard != nullptr && error_bounded != nullptr)
      std::printf("error-bounded / standard: time %.3f, peak activation memory %.3f\n",
                  error_bounded->median() / standard->median(), activation(error_bounded) / activation(standard));

    if (!o.json.empty()) {
      std::ofstream f(o.json);
      if (!f) throw std::runtime_error("cannot write " + o.json);
      f << "{\n"
        << "  \"benchmark\": \"host_vit_step\",\n"
        << "  \"gemm\": \"" << dr2net::host_gemm_backend() << "\",\n"
        << "  \"vector_math\": \"" << dr2net::host_vector_math() << "\",\n"
        << "  \"precision\": \"fp32\",\n"
        << "  \"layers\": " << o.layers << ", \"batch\": " << o.batch << ", \"tokens\": " << o.tokens
        << ", \"dim\": " << o.dim << ", \"heads\": " << o.heads << ", \"hidden\": " << o.hidden
        << ", \"timed_steps\": " << o.steps << ", \"threads\": " << runs[0]->ctx.threads() << ",\n"
        << "  \"parameters\": " << parameters << ", \"forward_gemm_flops\": " << integer_text(forward_gemm_flops(o)) << ",\n"
        << "  \"environment\": {\"DR2NET_NUM_THREADS\": " << env_json("DR2NET_NUM_THREADS")
        << ", \"OMP_NUM_THREADS\": " << env_json("OMP_NUM_THREADS") << ", \"OPENBLAS_NUM_THREADS\": "
        << env_json("OPENBLAS_NUM_THREADS") << ", \"OMP_WAIT_POLICY\": " << env_json("OMP_WAIT_POLICY") << "},\n";
      f << "  \"modes\": [";
      for (std::size_t k = 0; k < specs.size(); ++k) f << (k ? ", " : "") << "\"" << specs[k].name << "\"";
      f << "],\n";
      for (std::size_t k = 0; k < specs.size(); ++k) {
        std::string key = specs[k].name;
        std::replace(key.begin(), key.end(), '-', '_');
        f << "  \"" << key << "\": " << mode_json(*runs[k], specs[k]) << ",\n";
      }
      if (standard != nullptr && error_bounded != nullptr)
        f << "  \"error_bounded_time_ratio\": " << error_bounded->median() / standard->median() << ",\n";
      if (standard != nullptr && reversible != nullptr)
        f << "  \"time_ratio\": " << reversible->median() / standard->median() << ",\n"
          << "  \"activation_ratio\": " << activation(reversible) / activation(standard) << ",\n";
      f << "  \"dump\": " << (o.dump.empty() ? std::string("null") : json_string(o.dump)) << "\n"
        << "}\n";
      if (!f) throw std::runtime_error("error writing " + o.json);
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
