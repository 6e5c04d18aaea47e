// dr2net-fidelity: the gradient-error landscape of a Dr²Net stack over an (alpha, beta) grid.
//
// For each grid point it runs one training step in standard mode (the reference, same
// precision policy) and one in each requested mode, and reports the relative L2 error of
// every parameter gradient and of the input gradient against that reference, whether they
// are equal to it bit for bit (and the largest absolute difference), the same errors against
// the gradients of an fp64 standard-mode step of the same model and data (what makes fp32
// and the exact fixed-point policies comparable), the reconstruction error the stack's
// monitor measured, whether the stack's default reconstruction guard would have tripped, the
// snapshots stored and the peak activation and side-bit bytes. Output: a table, optionally
// JSON (--json; never NaN: what was not measured is null) and a heatmap of the worst
// parameter-gradient error (--png).
//
// With --precision fixed-fp32 or fixed-fp64 (FixedFp32, FixedFp64: int64 fixed-point
// streams) reversible mode is exact: its gradients must equal standard mode's under the same
// policy bit for bit (`bit_identical`).

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "dr2net/dr2net.hpp"
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/safetensors.hpp"
#include "dr2net/modules/vit.hpp"
#include "dr2net/io/paths.hpp"
#include "cli.hpp"
#include "heatmap_png.hpp"

namespace {

struct Options {
  std::string weights;
  std::optional<int> num_heads;
  int layers = 12, heads = 4, warmup = 0;
  std::int64_t dim = 64, mlp = 256, tokens = 64, batch = 2;
  std::uint64_t seed = 1;
  std::string precision = "fp32";
  std::vector<std::string> modes{"reversible", "error-bounded"};
  double tolerance = dr2net::ErrorBoundOptions{}.stream_tolerance;
  double budget = dr2net::ErrorBoundOptions{}.planning_margin;
  std::vector<double> alphas{1.0, 0.75, 0.5, 0.25, 0.0};
  std::vector<double> betas{0.1, 0.25, 0.5, 0.75, 1.0};
  int path = 0;  // > 0: the paper's path from (1, 0.1) to (0, 1) in `path` points instead of a grid
  std::string json, png;
};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string joined(const std::vector<double>& v) {
  std::string s;
  for (double x : v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%g", x);
    s += (s.empty() ? "" : ",") + std::string(buf);
  }
  return s;
}

//! The command line; nullopt: run, otherwise the exit status (usage errors: 2).
std::optional<int> parse(int argc, char** argv, Options& o) {
  CLI::App app(
      "The gradient-error landscape of a Dr2Net stack of timm ViT blocks over an (alpha, beta) grid.\n"
      "Without --weights: random pretrained-like weights of --layers/--dim/--heads/--mlp. Every stack uses the\n"
      "reconstruction guard in warn mode (silenced); each record says whether the default guard (throw above a\n"
      "relative reconstruction error of 1e-4) would have tripped.",
      "dr2net-fidelity");
  using dr2net_cli::add_integer;
  constexpr std::int64_t kMax = 1000000000;
  int num_heads = 0;
  std::string modes = "reversible,error-bounded", alphas = joined(o.alphas), betas = joined(o.betas);
  app.add_option("--weights", o.weights, "timm ViT blocks (safetensors) instead of random weights");
  add_integer(app, "--num-heads", num_heads, 1, 1 << 20, "heads of --weights (default: its num_heads metadata)")
      ->default_str("");
  add_integer(app, "--layers", o.layers, 1, 1 << 20, "random weights: layers");
  add_integer(app, "--dim", o.dim, std::int64_t{1}, kMax, "random weights: model width D");
  add_integer(app, "--heads", o.heads, 1, 1 << 20, "random weights: attention heads");
  add_integer(app, "--mlp", o.mlp, std::int64_t{1}, kMax, "random weights: MLP hidden width");
  add_integer(app, "--tokens", o.tokens, std::int64_t{1}, kMax, "tokens N of the input");
  add_integer(app, "--batch", o.batch, std::int64_t{1}, kMax, "batch B of the input");
  add_integer(app, "--seed", o.seed, std::uint64_t{0}, std::numeric_limits<std::uint64_t>::max(), "random seed");
  app.add_option("--precision", o.precision,
                 "fixed-fp32, fixed-fp64: fixed-point streams, reversible mode exact")
      ->check(CLI::IsMember({"fp32", "fp64", "fp64-streams", "fixed-fp32", "fixed-fp64"}))
      ->capture_default_str();
  app.add_option("--mode", modes,
                 "modes compared with standard mode; standard: a record for the reference itself (its error against "
                 "fp64)")
      ->check(dr2net_cli::list_of(CLI::IsMember({"reversible", "error-bounded", "standard"})))
      ->capture_default_str();
  app.add_option("--tolerance", o.tolerance,
                 "error-bounded mode's stream tolerance: the bound on the relative reconstruction error of the "
                 "streams (not of the gradients)")
      ->check(dr2net_cli::positive())
      ->capture_default_str();
  app.add_option("--budget,--planning-margin", o.budget,
                 "error-bounded mode's planning margin: the fraction of the tolerance that snapshot placement plans "
                 "for, in (0, 1]")
      ->check(dr2net_cli::finite(0.0, 1.0, /*open_low=*/true))
      ->capture_default_str();
  app.add_option("--alphas", alphas, "grid alphas")->check(dr2net_cli::list_of(dr2net_cli::finite()))->capture_default_str();
  app.add_option("--betas", betas, "grid betas")->check(dr2net_cli::list_of(dr2net_cli::finite()))->capture_default_str();
  add_integer(app, "--path", o.path, 2, 1 << 20, "the paper's path from (1, 0.1) to (0, 1) in K points instead of the grid")
      ->default_str("");
  add_integer(app, "--warmup", o.warmup, 0, 1 << 20, "error-bounded steps before the measured one");
  app.add_option("--json", o.json, "the records as JSON (never NaN: what was not measured is null)");
  app.add_option("--png", o.png, "a heatmap of the first mode's worst parameter-gradient error (grid only)");
  app.get_option("--png")->excludes("--path");
  if (auto status = dr2net_cli::parse(app, argc, argv)) return status;
  if (num_heads > 0) o.num_heads = num_heads;
  o.modes = dr2net_cli::words(modes);
  o.alphas = dr2net_cli::numbers(alphas);
  o.betas = dr2net_cli::numbers(betas);
  // No output replaces the weights, and the two outputs are different files.
  try {
    dr2net::io::require_distinct_output("--json", o.json, {{"--weights", o.weights}});
    dr2net::io::require_distinct_output("--png", o.png, {{"--weights", o.weights}, {"--json", o.json}});
  } catch (const dr2net::Error& e) {
    throw UsageError(e.detail());
  }
  // An output that cannot be written is refused now, not after the whole grid has run.
  for (const auto& [flag, path] : {std::pair<const char*, std::string>{"--json", o.json}, {"--png", o.png}}) {
    if (path.empty()) continue;
    namespace fs = std::filesystem;
    const fs::path target(path), dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
    std::error_code ec;
    DR2NET_CHECK(target.has_filename(), flag, " '", path, "': not a file name");
    DR2NET_CHECK(fs::is_directory(dir, ec), flag, " '", path, "': directory '", dir.string(), "' does not exist");
    DR2NET_CHECK(!fs::is_directory(target, ec), flag, " '", path, "': it is a directory");
  }
  return std::nullopt;
}

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Record {
  double alpha = kNaN, beta = kNaN;            // the requested point
  double grid_alpha = kNaN, grid_beta = kNaN;  // the coefficients the arithmetic used (fixed point: 2^-24 grid)
  std::string mode;
  bool exact = false;  // fixed-point streams in reversible or error-bounded mode
  bool ran = false;    // the step ran to the end (not skipped, did not throw)
  std::string error;   // the step threw (non-finite values): every measurement below is absent
  // Against standard mode under the same precision policy.
  double max_param_grad_rel_err = kNaN, input_grad_rel_err = kNaN, max_abs_grad_diff = kNaN;
  std::optional<bool> bit_identical;
  // Against standard mode in fp64 (Fp64) with the same parameters and data.
  double max_param_grad_rel_err_vs_fp64 = kNaN, input_grad_rel_err_vs_fp64 = kNaN;
  // The stack's reconstruction monitor.
  double reconstruction_max_abs_err = kNaN, reconstruction_rel_err = kNaN, worst_reconstruction_rel_err = kNaN;
  bool reconstruction_measured = false;
  std::optional<bool> guard_tripped;
  int snapshots = 0;
  std::size_t peak_activation_bytes = 0, standard_peak_activation_bytes = 0, side_bits_bytes = 0;
};

//! Relative L2 error of a against b (0 when equal, infinite when b = 0 and a differs).
template <class A, class B>
double rel_l2(const A* a, const B* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  if (num == 0) return 0;
  return den > 0 ? std::sqrt(num / den) : std::numeric_limits<double>::infinity();
}

//! Whether a equals b element for element, and the largest |a - b| (infinite when not finite).
struct Difference {
  bool identical = true;
  double max_abs = 0;
  template <class T>
  void add(const T* a, const T* b, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
      if (!(a[i] == b[i])) identical = false;
      const double d = std::abs(double(a[i]) - double(b[i]));
      max_abs = std::isfinite(d) ? std::max(max_abs, d) : std::numeric_limits<double>::infinity();
    }
  }
};

//! Gradients of one step: every parameter's, in the stack's order, and the input's.
template <class T, class V>
struct Gradients {
  std::vector<std::vector<T>> params;
  std::vector<V> input;
};

template <class Stack, class V>
Gradients<typename Stack::compute_type, V> gradients_of(Stack& stack, const std::vector<V>& dh0) {
  Gradients<typename Stack::compute_type, V> g;
  for (auto& p : stack.parameters()) g.params.emplace_back(p.grad.data(), p.grad.data() + p.grad.size());
  g.input = dh0;
  return g;
}

//! (worst parameter-gradient error, input-gradient error) of `got` against `ref`.
template <class T, class V, class U, class W>
std::pair<double, double> errors(const Gradients<T, V>& got, const Gradients<U, W>& ref) {
  double worst = 0;
  for (std::size_t k = 0; k < got.params.size(); ++k)
    worst = std::max(worst, rel_l2(got.params[k].data(), ref.params[k].data(), got.params[k].size()));
  return {worst, rel_l2(got.input.data(), ref.input.data(), got.input.size())};
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
  using V = policy_value_t<P>;  // h0, out, dout, dh0 (the compute type for fixed-point streams)
  using Layer = VitLayer<T, ConstantSchedule, P>;
  using Stack = ReversibleStack<Layer>;
  using Ref = ReversibleStack<VitLayer<double, ConstantSchedule, Fp64>>;
  constexpr bool is_fp64 = std::is_same_v<typename P::stream_type, double> && std::is_same_v<T, double>;

  std::optional<io::SafetensorsReader> file;
  io::TimmVitConfig cfg{o.layers, o.dim, o.heads, o.mlp};
  if (!o.weights.empty()) {
    file = io::SafetensorsReader::from_file(o.weights);
    cfg = io::infer_timm_vit_config(*file, o.num_heads);
  }
  // The input, output and their gradients, in V and in fp64: refused by size before anything
  // is built (a vector beyond memory would throw a bare std::bad_alloc, or be killed when filled).
  const std::int64_t elements = checked::product({o.batch, o.tokens, cfg.dim}, "--batch x --tokens x D (the input)");
  const auto n = static_cast<std::size_t>(elements);
  const std::size_t input_bytes = checked::bytes(elements, 4 * (sizeof(V) + sizeof(double)),
                                                 "--batch x --tokens x D (the inputs, outputs and their gradients)");
  const std::size_t physical = dr2net::detail::physical_memory_bytes();
  DR2NET_CHECK(physical == 0 || input_bytes <= physical, "--batch ", o.batch, " x --tokens ", o.tokens,
               " x D ", cfg.dim, ": the inputs, outputs and their gradients need ", input_bytes, " bytes (",
               MemoryMeter::human_bytes(input_bytes), "), more than the machine's ",
               MemoryMeter::human_bytes(physical), " of physical memory");
  // The fidelity tool measures error landscapes: the guard warns (silently) instead of
  // throwing, and each record says whether the default guard would have tripped.
  const ReconstructionGuard default_guard{};
  HostContext ctx;
  Stack stack(ctx, make_vit_layers<T, ConstantSchedule, P>(cfg.num_layers, cfg.dim, cfg.num_heads, cfg.hidden),
              ConstantSchedule(0.0, 1.0),
              {.mode = BackpropMode::Standard,
               .error_bound = {.stream_tolerance = o.tolerance, .planning_margin = o.budget},
               .guard = {.action = GuardAction::Warn, .warn = [](std::string_view) {}}});
  if (file) io::load_parameters(stack, *file);
  else pretrained_like(stack, o.seed);

  // The fp64 reference: the same parameters (as the stack holds them) in an fp64 stack, in a
  // context of its own so that it does not enter the measured peaks.
  HostContext ref_ctx;
  std::optional<Ref> ref64;
  if constexpr (!is_fp64) {
    ref64.emplace(ref_ctx, make_vit_layers<double, ConstantSchedule, Fp64>(cfg.num_layers, cfg.dim, cfg.num_heads, cfg.hidden),
                  ConstantSchedule(0.0, 1.0), StackOptions{.mode = BackpropMode::Standard});
    const auto src = stack.parameters();
    const auto dst = ref64->parameters();
    for (std::size_t k = 0; k < src.size(); ++k) {
      DR2NET_CHECK(src[k].name == dst[k].name && src[k].value.size() == dst[k].value.size(),
                   "fp64 reference: parameter ", dst[k].name, " does not match ", src[k].name);
      for (std::size_t i = 0; i < src[k].value.size(); ++i) dst[k].value.data()[i] = double(src[k].value.data()[i]);
    }
  }

  const Shape shape{o.batch, o.tokens, cfg.dim};
  std::mt19937_64 rng(o.seed + 1);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<V> h0(n), dout(n), out(n), dh0(n);
  for (auto& v : h0) v = static_cast<V>(normal(rng));
  for (auto& v : dout) v = static_cast<V>(normal(rng));
  std::vector<double> h0_64(h0.begin(), h0.end()), dout_64(dout.begin(), dout.end()), out_64(n), dh0_64(n);

  auto step = [&](std::int64_t s) {
    stack.zero_grad();
    stack.forward(ConstView<V>(h0.data(), shape), TensorView<V>(out.data(), shape), s);
    stack.backward(ConstView<V>(dout.data(), shape), TensorView<V>(dh0.data(), shape), ConstView<V>(h0.data(), shape));
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
    Record base;
    base.alpha = alpha;
    base.beta = beta;
    const Coefficients used = stack.coefficients(0, 0);
    base.grid_alpha = used.alpha;
    base.grid_beta = used.beta;

    // The references: standard mode under P, and standard mode in fp64.
    Gradients<T, V> ref;
    Gradients<double, double> ref_64;
    try {
      base.standard_peak_activation_bytes = measured_step(BackpropMode::Standard);
      ref = gradients_of(stack, dh0);
      if constexpr (is_fp64) {
        ref_64 = ref;
      } else {
        // The same model: the coefficients the stack's arithmetic uses (for fixed-point
        // streams the 2^-24 grid's, which differ from the requested ones by up to 2^-25).
        ref64->schedule() = ConstantSchedule(used.alpha, used.beta);
        ref64->zero_grad();
        ref64->forward(ConstView<double>(h0_64.data(), shape), TensorView<double>(out_64.data(), shape), 0);
        ref64->backward(ConstView<double>(dout_64.data(), shape), TensorView<double>(dh0_64.data(), shape));
        ref_64 = gradients_of(*ref64, dh0_64);
      }
    } catch (const Error& e) {
      for (const auto& m : o.modes) {
        Record r = base;
        r.mode = m;
        r.error = "standard-mode reference: " + e.detail();
        records.push_back(r);
      }
      continue;
    }

    for (const auto& m : o.modes) {
      Record r = base;
      r.mode = m;
      if (m == "standard") {  // the reference run itself
        r.peak_activation_bytes = r.standard_peak_activation_bytes;
        r.max_param_grad_rel_err = r.input_grad_rel_err = r.max_abs_grad_diff = 0;
        r.bit_identical = true;
        r.ran = true;
        std::tie(r.max_param_grad_rel_err_vs_fp64, r.input_grad_rel_err_vs_fp64) = errors(ref, ref_64);
        r.guard_tripped = false;  // standard mode reconstructs nothing
        records.push_back(r);
        continue;
      }
      const bool bounded = m == "error-bounded";
      if (!bounded && std::abs(used.beta) < stack.options().min_abs_beta) {  // not reversible: no record values
        records.push_back(r);
        continue;
      }
      r.exact = Stack::exact;
      try {
        if (bounded) {
          stack.set_error_bound(stack.options().error_bound);  // a fresh controller per point
          stack.set_mode(BackpropMode::ErrorBounded);
          for (int w = 0; w < o.warmup; ++w) step(0);
        }
        r.peak_activation_bytes = measured_step(bounded ? BackpropMode::ErrorBounded : BackpropMode::Reversible);
      } catch (const Error& e) {
        r.error = e.detail();
        records.push_back(r);
        continue;
      }
      r.ran = true;
      r.side_bits_bytes = ctx.meter().peak(MemoryCategory::SideBits);
      const auto got = gradients_of(stack, dh0);
      std::tie(r.max_param_grad_rel_err, r.input_grad_rel_err) = errors(got, ref);
      std::tie(r.max_param_grad_rel_err_vs_fp64, r.input_grad_rel_err_vs_fp64) = errors(got, ref_64);
      Difference diff;
      for (std::size_t k = 0; k < got.params.size(); ++k)
        diff.add(got.params[k].data(), ref.params[k].data(), got.params[k].size());
      diff.add(got.input.data(), ref.input.data(), n);
      r.bit_identical = diff.identical;
      r.max_abs_grad_diff = diff.max_abs;

      const auto& rep = stack.reconstruction();
      r.reconstruction_measured = rep.measured || rep.measured_boundaries > 0;
      if (rep.measured) {
        r.reconstruction_max_abs_err = rep.max_abs_error;
        r.reconstruction_rel_err = rep.relative_error;
      }
      r.worst_reconstruction_rel_err = rep.worst_relative_error();
      // As the stack's guard decides: exact mode never trips it (a mismatch there is an
      // error of its own), a backward that measured nothing neither; otherwise it trips when
      // the worst measured relative error is not <= the limit (NaN and Inf included).
      r.guard_tripped = !rep.exact && r.reconstruction_measured &&
                        !(r.worst_reconstruction_rel_err <= default_guard.max_relative_error);
      r.snapshots = rep.snapshots;
      records.push_back(r);
    }
  }
  return records;
}

nlohmann::json num(double v) { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); }
nlohmann::json flag(const std::optional<bool>& b) { return b ? nlohmann::json(*b) : nlohmann::json(nullptr); }

std::string cell(double v, const char* format = "%.3e") {
  if (std::isnan(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}
std::string cell(const std::optional<bool>& b) { return b ? (*b ? "yes" : "no") : "-"; }

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o;
    if (const auto status = parse(argc, argv, o)) return *status;
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
    else if (o.precision == "fixed-fp32") records = run<dr2net::FixedFp32>(o, points);
    else if (o.precision == "fixed-fp64") records = run<dr2net::FixedFp64>(o, points);
    else records = run<dr2net::Fp32>(o, points);

    const double guard_limit = dr2net::ReconstructionGuard{}.max_relative_error;
    std::printf("%6s %6s %-21s %10s %10s %10s %10s %10s %5s %5s %9s %9s %9s %9s\n", "alpha", "beta", "mode",
                "param_err", "input_err", "param_f64", "input_f64", "recon_rel", "guard", "bitid", "snapshots",
                "act_MiB", "std_MiB", "side_KiB");
    nlohmann::json j = nlohmann::json::array();
    for (const auto& r : records) {
      std::printf("%6.3f %6.3f %-21s %10s %10s %10s %10s %10s %5s %5s %9d %9s %9s %9s%s%s\n", r.alpha, r.beta,
                  (r.exact ? r.mode + " (exact)" : r.mode).c_str(), cell(r.max_param_grad_rel_err).c_str(),
                  cell(r.input_grad_rel_err).c_str(), cell(r.max_param_grad_rel_err_vs_fp64).c_str(),
                  cell(r.input_grad_rel_err_vs_fp64).c_str(), cell(r.worst_reconstruction_rel_err).c_str(),
                  r.guard_tripped ? (*r.guard_tripped ? "trip" : "ok") : "-", cell(r.bit_identical).c_str(),
                  r.snapshots, cell(r.ran ? double(r.peak_activation_bytes) / 1048576.0 : kNaN, "%.3f").c_str(),
                  cell(double(r.standard_peak_activation_bytes) / 1048576.0, "%.3f").c_str(),
                  cell(r.ran ? double(r.side_bits_bytes) / 1024.0 : kNaN, "%.1f").c_str(), r.error.empty() ? "" : "  failed: ",
                  r.error.c_str());
      nlohmann::json rec{{"alpha", r.alpha},
                         {"beta", r.beta},
                         {"coefficient_alpha", num(r.grid_alpha)},
                         {"coefficient_beta", num(r.grid_beta)},
                         {"mode", r.mode},
                         {"precision", o.precision},
                         {"exact", r.exact},
                         {"max_param_grad_rel_err", num(r.max_param_grad_rel_err)},
                         {"input_grad_rel_err", num(r.input_grad_rel_err)},
                         {"bit_identical", flag(r.bit_identical)},
                         {"max_abs_grad_diff", num(r.max_abs_grad_diff)},
                         {"max_param_grad_rel_err_vs_fp64", num(r.max_param_grad_rel_err_vs_fp64)},
                         {"input_grad_rel_err_vs_fp64", num(r.input_grad_rel_err_vs_fp64)},
                         {"reconstruction_measured", r.reconstruction_measured},
                         {"reconstruction_max_abs_err", num(r.reconstruction_max_abs_err)},
                         {"reconstruction_rel_err", num(r.reconstruction_rel_err)},
                         {"worst_reconstruction_rel_err", num(r.worst_reconstruction_rel_err)},
                         {"guard_tripped", flag(r.guard_tripped)},
                         {"guard_max_relative_error", guard_limit},
                         {"snapshots", r.snapshots},
                         {"peak_activation_bytes", r.peak_activation_bytes},
                         {"standard_peak_activation_bytes", r.standard_peak_activation_bytes},
                         {"side_bits_bytes", r.side_bits_bytes},
                         {"tolerance", o.tolerance},
                         {"stream_tolerance", o.tolerance},
                         {"planning_margin", o.budget}};
      if (!r.error.empty()) rec["error"] = r.error;
      j.push_back(std::move(rec));
    }
    if (!o.json.empty()) {
      std::ofstream f(o.json);
      DR2NET_CHECK(f.good(), "--json: cannot write '", o.json, "': ", std::strerror(errno));
      f << j.dump(1) << "\n";
      f.close();  // a full disk shows only when the buffer is flushed
      DR2NET_CHECK(!f.fail(), "--json: error writing '", o.json, "': ", std::strerror(errno));
    }
    if (!o.png.empty()) {
      // One heatmap: the first requested mode's worst parameter-gradient error.
      std::vector<std::vector<double>> grid(alphas.size(), std::vector<double>(betas.size(), NAN));
      for (const auto& r : records) {
        if (r.mode != o.modes.front()) continue;
        const auto i = std::find(alphas.begin(), alphas.end(), r.alpha) - alphas.begin();
        const auto k = std::find(betas.begin(), betas.end(), r.beta) - betas.begin();
        grid[static_cast<std::size_t>(i)][static_cast<std::size_t>(k)] = r.max_param_grad_rel_err;
      }
      const double lo = o.precision == "fp64" || o.precision == "fixed-fp64" ? 1e-16 : 1e-8;
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
