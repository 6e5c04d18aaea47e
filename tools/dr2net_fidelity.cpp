// dr2net-fidelity: the gradient-error landscape of a Dr²Net stack over an (alpha, beta) grid.
//
// For each grid point it runs one training step in standard mode (the reference, same
// precision) and one in each requested mode, and reports the relative L2 error of every
// parameter gradient and of the input gradient, the reconstruction error, the snapshots
// stored and the peak activation bytes. Output: a table, optionally JSON (--json) and a
// heatmap of the worst parameter-gradient error (--png).

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "dr2net/dr2net.hpp"
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/safetensors.hpp"
#include "dr2net/modules/vit.hpp"
#include "heatmap_png.hpp"

namespace {

constexpr const char* kUsage =
    "usage: dr2net-fidelity [--weights W.safetensors [--num-heads H]]\n"
    "                       [--layers L --dim D --heads H --mlp M]   (random pretrained-like weights)\n"
    "                       [--tokens N --batch B --seed S]\n"
    "                       [--precision fp32|fp64|fp64-streams] [--mode reversible,error-bounded]\n"
    "                       [--tolerance T] [--budget F] [--alphas a,b,..] [--betas a,b,..] [--path K]\n"
    "                       [--warmup W] [--json FILE] [--png FILE]";

struct Options {
  std::string weights;
  std::optional<int> num_heads;
  int layers = 12, heads = 4, warmup = 0;
  std::int64_t dim = 64, mlp = 256, tokens = 64, batch = 2;
  std::uint64_t seed = 1;
  std::string precision = "fp32";
  std::vector<std::string> modes{"reversible", "error-bounded"};
  double tolerance = 1e-5;
  double budget = dr2net::ErrorBoundOptions{}.planning_margin;
  std::vector<double> alphas{1.0, 0.75, 0.5, 0.25, 0.0};
  std::vector<double> betas{0.1, 0.25, 0.5, 0.75, 1.0};
  int path = 0;  // > 0: the paper's path from (1, 0.1) to (0, 1) in `path` points instead of a grid
  std::string json, png;
};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double number(const std::string& flag, const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end || !std::isfinite(v)) throw UsageError(flag + " expects a number, got '" + s + "'");
  return v;
}
std::int64_t positive(const std::string& flag, const std::string& s) {
  const double v = number(flag, s);
  if (v < 1 || v != std::floor(v) || v > 1e9) throw UsageError(flag + " expects a positive integer, got '" + s + "'");
  return static_cast<std::int64_t>(v);
}
std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}
std::vector<double> numbers(const std::string& flag, const std::string& s) {
  std::vector<double> v;
  for (const auto& item : split(s)) v.push_back(number(flag, item));
  if (v.empty()) throw UsageError(flag + " needs at least one value");
  return v;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "--help" || f == "-h") {
      std::printf("%s\n", kUsage);
      std::exit(0);
    }
    if (i + 1 >= argc) throw UsageError(f + " needs a value");
    const std::string v = argv[++i];
    if (f == "--weights") o.weights = v;
    else if (f == "--num-heads") o.num_heads = static_cast<int>(positive(f, v));
    else if (f == "--layers") o.layers = static_cast<int>(positive(f, v));
    else if (f == "--dim") o.dim = positive(f, v);
    else if (f == "--heads") o.heads = static_cast<int>(positive(f, v));
    else if (f == "--mlp") o.mlp = positive(f, v);
    else if (f == "--tokens") o.tokens = positive(f, v);
    else if (f == "--batch") o.batch = positive(f, v);
    else if (f == "--seed") o.seed = static_cast<std::uint64_t>(positive(f, v));
    else if (f == "--warmup") o.warmup = static_cast<int>(number(f, v));
    else if (f == "--precision") o.precision = v;
    else if (f == "--mode") o.modes = split(v);
    else if (f == "--tolerance") o.tolerance = number(f, v);
    else if (f == "--budget") o.budget = number(f, v);
    else if (f == "--alphas") o.alphas = numbers(f, v);
    else if (f == "--betas") o.betas = numbers(f, v);
    else if (f == "--path") o.path = static_cast<int>(positive(f, v));
    else if (f == "--json") o.json = v;
    else if (f == "--png") o.png = v;
    else throw UsageError("unknown argument '" + f + "'");
  }
  if (o.precision != "fp32" && o.precision != "fp64" && o.precision != "fp64-streams")
    throw UsageError("--precision must be fp32, fp64 or fp64-streams, got '" + o.precision + "'");
  for (const auto& m : o.modes)
    if (m != "reversible" && m != "error-bounded") throw UsageError("--mode takes reversible and/or error-bounded, got '" + m + "'");
  if (!(o.tolerance > 0)) throw UsageError("--tolerance must be positive");
  if (o.warmup < 0) throw UsageError("--warmup must be >= 0");
  if (o.path == 1) throw UsageError("--path needs at least 2 points");
  return o;
}

struct Record {
  double alpha, beta;
  std::string mode;
  double max_param_grad_rel_err, input_grad_rel_err, reconstruction_max_abs_err, reconstruction_rel_err;
  int snapshots;
  std::size_t peak_activation_bytes, standard_peak_activation_bytes;
};

template <class T>
double rel_l2(const T* a, const T* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  if (num == 0) return 0;
  return den > 0 ? std::sqrt(num / den) : std::numeric_limits<double>::infinity();
}

//! Pretrained-like random weights: linear weights N(0, 1/fan_in), LayerNorm weights near 1,
//! small biases. (timm's initialisation, std 0.02, makes the residual functions nearly zero,
//! which would flatter reconstruction.)
template <class Stack>
void pretrained_like(Stack& stack, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n(0.0, 1.0);
  stack.for_each_parameter([&](std::string_view name, auto value, auto) {
    const bool norm = name.find("norm") != std::string_view::npos;
    const bool weight = name.find("weight") != std::string_view::npos;
    const double fan_in = value.shape().rank() == 2 ? double(value.shape()[1]) : 1.0;
    for (std::size_t i = 0; i < value.size(); ++i) {
      using V = std::remove_reference_t<decltype(value.data()[0])>;
      double v = 0.02 * n(rng);
      if (norm && weight) v = 1.0 + 0.1 * n(rng);
      else if (weight) v = n(rng) / std::sqrt(fan_in);
      value.data()[i] = static_cast<V>(v);
    }
  });
}

template <class P>
std::vector<Record> run(const Options& o, std::vector<std::pair<double, double>> points) {
  using namespace dr2net;
  using T = typename P::compute_type;
  using S = typename P::stream_type;
  using Layer = VitLayer<T, ConstantSchedule, P>;

  std::optional<io::SafetensorsReader> file;
  io::TimmVitConfig cfg{o.layers, o.dim, o.heads, o.mlp};
  if (!o.weights.empty()) {
    file = io::SafetensorsReader::from_file(o.weights);
    cfg = io::infer_timm_vit_config(*file, o.num_heads);
  }
  HostContext ctx;
  ReversibleStack<Layer> stack(ctx, make_vit_layers<T, ConstantSchedule, P>(cfg.num_layers, cfg.dim, cfg.num_heads, cfg.hidden),
                               ConstantSchedule(0.0, 1.0),
                               {.mode = BackpropMode::Standard,
                                .error_bound = {.stream_tolerance = o.tolerance, .planning_margin = o.budget},
                                .guard = {.action = GuardAction::Warn, .warn = [](std::string_view) {}}});
  if (file) io::load_parameters(stack, *file);
  else pretrained_like(stack, o.seed);

  const Shape shape{o.batch, o.tokens, cfg.dim};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::mt19937_64 rng(o.seed + 1);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<S> h0(n), dout(n), out(n), dh0(n), ref_dh0(n);
  for (auto& v : h0) v = static_cast<S>(normal(rng));
  for (auto& v : dout) v = static_cast<S>(normal(rng));

  auto step = [&](std::int64_t s) {
    stack.zero_grad();
    stack.forward(ConstView<S>(h0.data(), shape), TensorView<S>(out.data(), shape), s);
    stack.backward(ConstView<S>(dout.data(), shape), TensorView<S>(dh0.data(), shape), ConstView<S>(h0.data(), shape));
  };
  auto measured_step = [&](BackpropMode mode) {
    stack.set_mode(mode);
    stack.release_workspace();
    ctx.meter().reset_peaks();
    step(0);
    return ctx.meter().peak_activation();
  };

  std::vector<Record> records;
  for (const auto& [alpha, beta] : points) {
    stack.schedule() = ConstantSchedule(alpha, beta);
    const std::size_t std_peak = measured_step(BackpropMode::Standard);
    ref_dh0 = dh0;
    std::vector<std::vector<T>> ref;
    for (auto& p : stack.parameters()) ref.emplace_back(p.grad.data(), p.grad.data() + p.grad.size());

    for (const auto& m : o.modes) {
      const bool bounded = m == "error-bounded";
      if (!bounded && std::abs(beta) < stack.options().min_abs_beta) {
        records.push_back({alpha, beta, m, NAN, NAN, NAN, NAN, 0, 0, std_peak});
        continue;
      }
      if (bounded) {
        stack.set_error_bound(stack.options().error_bound);  // a fresh controller per point
        stack.set_mode(BackpropMode::ErrorBounded);
        for (int w = 0; w < o.warmup; ++w) step(0);
      }
      const std::size_t peak = measured_step(bounded ? BackpropMode::ErrorBounded : BackpropMode::Reversible);
      double worst = 0;
      std::size_t k = 0;
      for (auto& p : stack.parameters()) {
        worst = std::max(worst, rel_l2(p.grad.data(), ref[k].data(), p.grad.size()));
        ++k;
      }
      const auto& rep = stack.reconstruction();
      records.push_back({alpha, beta, m, worst, rel_l2(dh0.data(), ref_dh0.data(), n),
                         rep.input_compared ? rep.max_abs_error : NAN, rep.input_compared ? rep.relative_error : NAN,
                         rep.snapshots, peak, std_peak});
    }
  }
  return records;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    std::vector<std::pair<double, double>> points;
    std::vector<double> alphas = o.alphas, betas = o.betas;
    if (o.path > 0) {
      for (int k = 0; k < o.path; ++k) {
        const double t = double(k) / double(o.path - 1);
        points.emplace_back(1.0 - t, 0.1 + 0.9 * t);
      }
    } else {
      for (double a : alphas)
        for (double b : betas) points.emplace_back(a, b);
    }
    std::vector<Record> records;
    if (o.precision == "fp64") records = run<dr2net::Fp64>(o, points);
    else if (o.precision == "fp64-streams") records = run<dr2net::Fp64StreamsFp32Compute>(o, points);
    else records = run<dr2net::Fp32>(o, points);

    std::printf("%6s %6s %-14s %12s %12s %12s %9s %12s %12s\n", "alpha", "beta", "mode", "param_err", "input_err",
                "recon_rel", "snapshots", "act_MiB", "std_act_MiB");
    nlohmann::json j = nlohmann::json::array();
    for (const auto& r : records) {
      std::printf("%6.3f %6.3f %-14s %12.3e %12.3e %12.3e %9d %12.3f %12.3f\n", r.alpha, r.beta, r.mode.c_str(),
                  r.max_param_grad_rel_err, r.input_grad_rel_err, r.reconstruction_rel_err, r.snapshots,
                  double(r.peak_activation_bytes) / 1048576.0, double(r.standard_peak_activation_bytes) / 1048576.0);
      auto num = [](double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
      j.push_back({{"alpha", r.alpha},
                   {"beta", r.beta},
                   {"mode", r.mode},
                   {"precision", o.precision},
                   {"max_param_grad_rel_err", num(r.max_param_grad_rel_err)},
                   {"input_grad_rel_err", num(r.input_grad_rel_err)},
                   {"reconstruction_max_abs_err", num(r.reconstruction_max_abs_err)},
                   {"reconstruction_rel_err", num(r.reconstruction_rel_err)},
                   {"snapshots", r.snapshots},
                   {"peak_activation_bytes", r.peak_activation_bytes},
                   {"standard_peak_activation_bytes", r.standard_peak_activation_bytes},
                   {"tolerance", o.tolerance}});
    }
    if (!o.json.empty()) {
      std::ofstream f(o.json);
      if (!f) throw dr2net::Error("cannot write '" + o.json + "'", __FILE__, __LINE__);
      f << j.dump(1) << "\n";
    }
    if (!o.png.empty()) {
      if (o.path > 0) throw UsageError("--png draws a grid; use --alphas/--betas instead of --path");
      // One heatmap: the first requested mode's worst parameter-gradient error.
      std::vector<std::vector<double>> grid(alphas.size(), std::vector<double>(betas.size(), NAN));
      for (const auto& r : records) {
        if (r.mode != o.modes.front()) continue;
        const auto i = std::find(alphas.begin(), alphas.end(), r.alpha) - alphas.begin();
        const auto k = std::find(betas.begin(), betas.end(), r.beta) - betas.begin();
        grid[static_cast<std::size_t>(i)][static_cast<std::size_t>(k)] = r.max_param_grad_rel_err;
      }
      const double lo = o.precision == "fp64" ? 1e-16 : 1e-8;
      dr2net::tools::write_heatmap(o.png, alphas, betas, grid, lo, 1.0);
    }
    return 0;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "dr2net-fidelity: %s (see --help)\n", e.what());
    return 2;
  } catch (const dr2net::Error& e) {
    std::fprintf(stderr, "dr2net-fidelity: %s\n", e.detail().c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dr2net-fidelity: %s\n", e.what());
    return 1;
  }
}
