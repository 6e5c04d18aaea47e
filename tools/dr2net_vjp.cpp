// dr2net-vjp: the vector-Jacobian product of a Dr²Net stack built from timm ViT blocks, so
// that any checkpoint can be checked against another framework.
//
//   dr2net-vjp --weights W.safetensors --input X.safetensors --alpha A --beta B
//              --mode reversible|standard|error-bounded
//              --precision fp32|fp64|fixed-fp32|fixed-fp64
//              [--backend host|cuda] [--num-heads H] [--eps E] --out R.safetensors
//
// W: L timm blocks (blocks.{i}.norm1.weight, ... ; any of F64/F32/F16/BF16; metadata
// "num_heads"). X: "x" [B, N, D] (the stack input h0) and "dout" [B, N, D]. The stack is run
// with every module at (A, B) and L = sum(out * dout); R receives "out" (= y_N), "grad.x"
// (= dL/dh0) and "grad.<name>" for every tensor of W, in the compute type (F32 for fp32 and
// fixed-fp32, F64 for fp64 and fixed-fp64).
//
// fixed-fp32 / fixed-fp64 are the exact precision policies (FixedFp32, FixedFp64: int64
// fixed-point streams, fp32/fp64 functions): --mode reversible is then exact and gives the
// gradients of --mode standard bit for bit; the coefficients are those of the 2^-24 grid.
// The stack keeps the library's default reconstruction guard: a floating-point reversible or
// error-bounded backward whose measured reconstruction error exceeds 1e-4 is an error.
//
// Swin: when the weights' metadata says arch = swin (timm Swin stage names layers.{s}.*,
// metadata window_size, num_heads and depths; io/swin.hpp), the tool runs the stages
// (modules/swin.hpp: a reversible stack per stage, a patch merging at the start of every stage
// s >= 1): X holds "x" [B, H, W, C] (the tokens entering stage 0, NHWC) and "dout"
// [B, H_S, W_S, C_S] (the gradient of the last stage's output); R receives "out" of that shape,
// "grad.x" [B, H, W, C] and "grad.<name>" for every tensor. The same (A, B) for every module of
// every stage; LayerNorm eps 1e-5 (timm's Swin) unless --eps is given; windows and shifts by
// timm 0.9's rule for the map of x. A map that is not a multiple of a block's window, or odd
// where a merge needs an even one, is refused (exit 1). Host backend only; --num-heads does
// not apply (the heads per stage are the metadata's).
//
// Any bad input or argument, a guard trip, or a non-finite value: exit status 1 (2 for
// usage: an unknown, repeated or malformed flag, or an --out that is the same file as
// --weights or --input), one line on stderr, and no output file.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/paths.hpp"
#include "dr2net/io/safetensors.hpp"
#include "dr2net/io/swin.hpp"
#include "dr2net/modules/swin.hpp"
#include "dr2net/modules/vit.hpp"

#include "cli.hpp"
#include "vjp_metadata.hpp"

#if defined(DR2NET_VJP_HAVE_CUDA)
// Defined in dr2net_vjp_cuda.cu (built where dr2net::cuda exists).
int dr2net_vjp_cuda_run(const std::string& weights, const std::string& input, const std::string& out, double alpha,
                        double beta, const std::string& mode, const std::string& precision, int num_heads, double eps);
#endif

namespace dr2net_vjp {

namespace {

std::string full(double v) {
  if (!std::isfinite(v)) return "not finite";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace

std::map<std::string, std::string> metadata(const RunInfo& r) {
  std::map<std::string, std::string> m;
  const bool fixed = r.stream_frac_bits > 0;
  m["mode"] = r.mode;
  m["precision"] = r.precision;
  m["backend"] = r.backend;
  if (r.arch == "swin") {
    m["arch"] = "swin";
    m["num_heads"] = r.swin_num_heads;
    m["window_size"] = r.swin_window_size;
    m["depths"] = r.swin_depths;
  } else {
    m["num_heads"] = std::to_string(r.num_heads);
  }
  m["alpha"] = full(r.used.alpha);
  m["beta"] = full(r.used.beta);
  if (fixed) {
    // alpha and beta above are the grid values the fixed-point arithmetic uses.
    m["coefficient_grid"] = "2^-" + std::to_string(dr2net::fixed::kCoefficientBits);
    m["requested_alpha"] = full(r.requested.alpha);
    m["requested_beta"] = full(r.requested.beta);
    m["stream"] = "int64 fixed point, grid 2^-" + std::to_string(r.stream_frac_bits);
    m["side_bits_bytes"] = std::to_string(r.side_bits_bytes);
  }
  const auto& rep = r.report;
  if (r.mode == "standard") m["reconstruction"] = "none (standard mode stores the activations)";
  else if (rep.exact) m["reconstruction"] = "exact";
  else m["reconstruction"] = rep.measured || rep.measured_boundaries > 0 ? "measured" : "not measured";
  if (rep.measured) {
    m["reconstruction_relative_error"] = full(rep.relative_error);
    m["reconstruction_max_abs_error"] = full(rep.max_abs_error);
  } else {
    m["reconstruction_relative_error"] = "not measured";
  }
  if (r.mode == "error-bounded") {
    m["snapshots"] = std::to_string(rep.snapshots);
    if (rep.measured_boundaries > 0) m["max_boundary_relative_error"] = full(rep.max_boundary_relative_error);
  }
  return m;
}

}  // namespace dr2net_vjp

namespace {

struct Args {
  std::string weights, input, out;
  double alpha = 0, beta = 0;
  std::string mode = "reversible", precision = "fp32", backend = "host";
  int num_heads = 0;  // 0: from the weights file's metadata
  double eps = 1e-6;
  bool eps_given = false;  // Swin's default is 1e-5
};

//! Error messages go out as one line on stderr, whatever they hold.
void print_error(const std::string& message) {
  std::string line = message;
  for (char& c : line)
    if (c == '\n' || c == '\r') c = ' ';
  std::fprintf(stderr, "dr2net-vjp: %s\n", line.c_str());
}

//! The command line (see the file comment); nullopt: run, otherwise the exit status.
std::optional<int> parse(int argc, char** argv, Args& a) {
  CLI::App app("The vector-Jacobian product of a Dr2Net stack of timm ViT blocks (L = sum(out * dout)).\n"
               "fixed-fp32/fixed-fp64: fixed-point streams, reversible mode exact (equal to standard bit for bit);\n"
               "tensors in and out are F32 for fp32/fixed-fp32 and F64 for fp64/fixed-fp64.",
               "dr2net-vjp");
  app.add_option("--weights", a.weights, "timm ViT blocks (safetensors, metadata num_heads)")->required();
  app.add_option("--input", a.input, "\"x\" [B, N, D] (the stack input h0) and \"dout\" [B, N, D]")->required();
  app.add_option("--out", a.out, "the results: out, grad.x, grad.<name> (never one of the inputs)")->required();
  app.add_option("--alpha", a.alpha, "every module's alpha")->required()->check(dr2net_cli::finite());
  app.add_option("--beta", a.beta, "every module's beta")->required()->check(dr2net_cli::finite());
  app.add_option("--mode", a.mode, "backprop mode")
      ->check(CLI::IsMember({"reversible", "standard", "error-bounded"}))
      ->capture_default_str();
  app.add_option("--precision", a.precision, "precision policy")
      ->check(CLI::IsMember({"fp32", "fp64", "fixed-fp32", "fixed-fp64"}))
      ->capture_default_str();
  app.add_option("--backend", a.backend, "where the stack runs")->check(CLI::IsMember({"host", "cuda"}))->capture_default_str();
  dr2net_cli::add_integer(app, "--num-heads", a.num_heads, 1, 1 << 20,
                          "attention heads (default: the weights file's num_heads metadata)")
      ->default_str("");
  CLI::Option* eps = app.add_option("--eps", a.eps, "LayerNorm epsilon (Swin checkpoints: 1e-5 unless given)")
                         ->check(dr2net_cli::positive())
                         ->capture_default_str();
  if (auto status = dr2net_cli::parse(app, argc, argv)) return status;
  a.eps_given = eps->count() > 0;
  // The results never replace an input (./w vs w, symbolic and hard links included).
  try {
    dr2net::io::require_distinct_output("--out", a.out, {{"--weights", a.weights}, {"--input", a.input}});
  } catch (const dr2net::Error& e) {
    print_error(e.detail() + " (see --help)");
    return 2;
  }
  return std::nullopt;
}

template <class P>
int run(const Args& a) {
  using namespace dr2net;
  using T = typename P::compute_type;  // parameters and their gradients
  using V = policy_value_t<P>;         // h0, out, dout, dh0: the compute type for fixed-point streams
  static_assert(std::is_same_v<T, V>, "dr2net-vjp writes one dtype: the stack's value and compute types must agree");
  using Layer = VitLayer<T, ConstantSchedule, P>;
  using Stack = ReversibleStack<Layer>;
  const auto weights = io::SafetensorsReader::from_file(a.weights);
  const auto input = io::SafetensorsReader::from_file(a.input);
  const auto cfg = a.num_heads > 0 ? io::infer_timm_vit_config(weights, a.num_heads) : io::infer_timm_vit_config(weights);

  input.require({"x", "dout"});
  const auto& xr = input.record("x");
  DR2NET_CHECK(xr.shape.size() == 3 && xr.shape[2] == cfg.dim, "input x has shape ", io::format_shape(xr.shape),
               ", expected [B, N, ", cfg.dim, "]");
  DR2NET_CHECK(xr.shape[0] > 0 && xr.shape[1] > 0, "input x has shape ", io::format_shape(xr.shape),
               ": B and N must be positive");
  const Shape shape{xr.shape[0], xr.shape[1], xr.shape[2]};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::vector<V> x(n), dout(n), out(n), dx(n);
  input.read_into("x", xr.shape, x.data());
  input.read_into("dout", xr.shape, dout.data());

  HostContext ctx;
  // The default StackOptions keep the default guard (GuardAction::Throw).
  Stack stack(ctx, make_vit_layers<T, ConstantSchedule, P>(cfg.num_layers, cfg.dim, cfg.num_heads, cfg.hidden, a.eps),
              ConstantSchedule(a.alpha, a.beta));
  io::load_parameters(stack, weights);
  stack.set_mode(a.mode == "standard" ? BackpropMode::Standard
                 : a.mode == "error-bounded" ? BackpropMode::ErrorBounded
                                             : BackpropMode::Reversible);
  stack.zero_grad();
  stack.forward(ConstView<V>(x.data(), shape), TensorView<V>(out.data(), shape), 0);
  stack.backward(ConstView<V>(dout.data(), shape), TensorView<V>(dx.data(), shape), ConstView<V>(x.data(), shape));

  dr2net_vjp::RunInfo info;
  info.mode = a.mode;
  info.precision = a.precision;
  info.backend = "host";
  info.num_heads = cfg.num_heads;
  info.requested = {a.alpha, a.beta};
  info.used = stack.coefficients(0, 0);
  if constexpr (Stack::exact) info.stream_frac_bits = Stack::stream_type::frac_bits;
  info.report = stack.reconstruction();
  info.side_bits_bytes = ctx.meter().peak(MemoryCategory::SideBits);

  const auto dtype = std::is_same_v<V, double> ? io::DType::F64 : io::DType::F32;
  io::SafetensorsWriter w;
  for (const auto& [key, value] : dr2net_vjp::metadata(info)) w.set_metadata(key, value);
  w.add("out", dtype, xr.shape, out.data());
  w.add("grad.x", dtype, xr.shape, dx.data());
  io::save_parameters(stack, w, dtype, "grad.", /*gradients=*/true);
  w.write_file(a.out);
  return 0;
}

//! The worst of the reconstruction reports of a Swin backbone's stacks (its even parts):
//! measured (or exact) only when every stack was, the largest errors, the snapshots and
//! measured boundaries of all.
template <class Net>
dr2net::ReconstructionReport combined_report(Net& net) {
  std::vector<dr2net::ReconstructionReport> all;
  const auto add = [&]<std::size_t I>(std::integral_constant<std::size_t, I>) {
    if constexpr (I % 2 == 0) all.push_back(net.template part<I>().reconstruction());  // odd parts: merges
  };
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    (add(std::integral_constant<std::size_t, I>{}), ...);
  }(std::make_index_sequence<Net::num_parts>{});
  dr2net::ReconstructionReport r = all.front();
  for (std::size_t k = 1; k < all.size(); ++k) {
    const dr2net::ReconstructionReport& s = all[k];
    r.measured = r.measured && s.measured;
    r.exact = r.exact && s.exact;
    r.input_compared = r.input_compared && s.input_compared;
    r.relative_error = std::max(r.relative_error, s.relative_error);
    r.max_abs_error = std::max(r.max_abs_error, s.max_abs_error);
    r.snapshots += s.snapshots;
    if (s.measured_boundaries > 0)
      r.max_boundary_relative_error = r.measured_boundaries > 0
                                          ? std::max(r.max_boundary_relative_error, s.max_boundary_relative_error)
                                          : s.max_boundary_relative_error;
    r.measured_boundaries += s.measured_boundaries;
  }
  if (!r.measured) r.relative_error = r.max_abs_error = std::numeric_limits<double>::quiet_NaN();
  return r;
}

template <int S, class P>
int run_swin_stages(const Args& a, const dr2net::io::SafetensorsReader& weights,
                    const dr2net::io::SafetensorsReader& input, const dr2net::SwinConfig& cfg) {
  using namespace dr2net;
  using T = typename P::compute_type;
  using V = policy_value_t<P>;
  static_assert(std::is_same_v<T, V>, "dr2net-vjp writes one dtype: the stack's value and compute types must agree");
  const auto& xs = input.record("x").shape;
  const std::int64_t B = xs[0];
  const Shape in = swin_input_shape(cfg, B), os = swin_output_shape(cfg, B);
  const SwinStageLayout last = swin_stage_layouts(cfg).back();
  const std::vector<std::int64_t> dout_shape{B, last.grid[1], last.grid[2], last.dim};
  const auto& ds = input.record("dout").shape;
  DR2NET_CHECK(ds == dout_shape, "input dout has shape ", io::format_shape(ds), ", expected ",
               io::format_shape(dout_shape), " (the output of the last stage for x of shape ", io::format_shape(xs),
               ")");
  const auto n = static_cast<std::size_t>(in.numel()), no = static_cast<std::size_t>(os.numel());
  std::vector<V> x(n), dx(n), dout(no), out(no);
  input.read_into("x", xs, x.data());
  input.read_into("dout", ds, dout.data());

  HostContext ctx;
  // The default StackOptions keep the default guard (GuardAction::Throw) in every stage.
  auto net = make_swin_stages<S, T, ConstantSchedule, P>(ctx, cfg, B, ConstantSchedule(a.alpha, a.beta));
  io::load_timm_swin(net, weights, cfg);
  net.set_mode(a.mode == "standard" ? BackpropMode::Standard
               : a.mode == "error-bounded" ? BackpropMode::ErrorBounded
                                           : BackpropMode::Reversible);
  net.zero_grad();
  net.forward(ConstView<V>(x.data(), in), TensorView<V>(out.data(), os), 0);
  net.backward(ConstView<V>(dout.data(), os), TensorView<V>(dx.data(), in), ConstView<V>(x.data(), in));

  dr2net_vjp::RunInfo info;
  info.mode = a.mode;
  info.precision = a.precision;
  info.backend = "host";
  info.arch = "swin";
  const auto meta = io::timm_swin_metadata(cfg);
  info.swin_num_heads = meta.at("num_heads");
  info.swin_window_size = meta.at("window_size");
  info.swin_depths = meta.at("depths");
  info.requested = {a.alpha, a.beta};
  info.used = net.template part<0>().coefficients(0, 0);
  using Stack = typename std::remove_cvref_t<decltype(net)>::template part_type<0>;
  if constexpr (Stack::exact) info.stream_frac_bits = Stack::stream_type::frac_bits;
  info.report = combined_report(net);
  info.side_bits_bytes = ctx.meter().peak(MemoryCategory::SideBits);

  const auto dtype = std::is_same_v<V, double> ? io::DType::F64 : io::DType::F32;
  io::SafetensorsWriter w;
  for (const auto& [key, value] : dr2net_vjp::metadata(info)) w.set_metadata(key, value);
  w.add("out", dtype, dout_shape, out.data());
  w.add("grad.x", dtype, xs, dx.data());
  io::save_parameters(net, w, dtype, "grad.", /*gradients=*/true);
  w.write_file(a.out);
  return 0;
}

//! The Swin path (see the file comment): the map of x checked against the checkpoint's
//! windows and merges, the stages built for it and loaded, then run as run() runs a ViT stack.
template <class P>
int run_swin(const Args& a, const dr2net::io::SafetensorsReader& weights) {
  using namespace dr2net;
  const auto input = io::SafetensorsReader::from_file(a.input);
  input.require({"x", "dout"});
  const auto& xs = input.record("x").shape;
  const io::TimmSwinMetadata meta = io::read_timm_swin_metadata(weights);
  DR2NET_CHECK(meta.window_size[0] == 1, "the weights' window_size is 3-D (Video Swin); dr2net-vjp takes 2-D Swin "
               "checkpoints (x [B, H, W, C])");
  const std::string width = "layers.0.blocks.0.norm1.weight";
  const std::int64_t C = weights.contains(width) && weights.record(width).shape.size() == 1
                             ? weights.record(width).shape[0]
                             : -1;
  DR2NET_CHECK(xs.size() == 4 && xs[0] > 0 && xs[1] > 0 && xs[2] > 0 && (C < 0 || xs[3] == C), "input x has shape ",
               io::format_shape(xs), ", expected [B, H, W, ", (C < 0 ? std::string("C") : std::to_string(C)),
               "] (the tokens entering stage 0, NHWC)");
  SwinConfig cfg;
  cfg.embed_dim = xs[3];
  cfg.depths = meta.depths;
  cfg.num_heads = meta.num_heads;
  cfg.window_size = meta.window_size;
  cfg.eps = a.eps_given ? a.eps : 1e-5;
  // The stages without the map first (a map every window tiles: window x 2^(S-1) per axis),
  // so that what remains is the map's own fault.
  const auto stages = static_cast<std::int64_t>(cfg.depths.size());
  DR2NET_CHECK(stages <= 4, "the weights describe ", stages, " stages (depths '", weights.metadata().at("depths"),
               "'); dr2net-vjp runs Swin backbones of 1 to 4 stages");
  cfg.grid = {1, meta.window_size[1] << (stages - 1), meta.window_size[2] << (stages - 1)};
  try {
    validate_swin_config(cfg);
  } catch (const Error& e) {
    DR2NET_FAIL("timm Swin stages in ", weights.where(), ": ", e.detail());
  }
  cfg.grid = {1, xs[1], xs[2]};
  try {
    validate_swin_config(cfg);
  } catch (const Error& e) {
    DR2NET_FAIL("input x of shape ", io::format_shape(xs), ": its ", xs[1], "x", xs[2], " map does not fit the ",
                "checkpoint's stages (window_size ", weights.metadata().at("window_size"), ", depths ",
                weights.metadata().at("depths"), "): ", e.detail());
  }
  cfg = io::infer_timm_swin_config(weights, cfg.grid, cfg.eps);
  switch (stages) {
    case 1: return run_swin_stages<1, P>(a, weights, input, cfg);
    case 2: return run_swin_stages<2, P>(a, weights, input, cfg);
    case 3: return run_swin_stages<3, P>(a, weights, input, cfg);
    default: return run_swin_stages<4, P>(a, weights, input, cfg);
  }
}

//! Whether the weights' metadata names a Swin checkpoint (arch = swin).
bool is_swin(const dr2net::io::SafetensorsReader& weights) {
  const auto it = weights.metadata().find("arch");
  return it != weights.metadata().end() && it->second == "swin";
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args a;
    if (const auto status = parse(argc, argv, a)) return *status;
    const auto weights = dr2net::io::SafetensorsReader::from_file(a.weights);
    if (is_swin(weights)) {
      if (a.backend == "cuda") {
        std::fprintf(stderr, "dr2net-vjp: --backend cuda: Swin checkpoints (arch = swin) run on the host only\n");
        return 1;
      }
      if (a.num_heads > 0) {
        std::fprintf(stderr, "dr2net-vjp: --num-heads applies to ViT checkpoints; a Swin checkpoint's heads per "
                             "stage are its num_heads metadata\n");
        return 1;
      }
      if (a.precision == "fp64") return run_swin<dr2net::Fp64>(a, weights);
      if (a.precision == "fixed-fp32") return run_swin<dr2net::FixedFp32>(a, weights);
      if (a.precision == "fixed-fp64") return run_swin<dr2net::FixedFp64>(a, weights);
      return run_swin<dr2net::Fp32>(a, weights);
    }
    if (a.backend == "cuda") {
#if defined(DR2NET_VJP_HAVE_CUDA)
      return dr2net_vjp_cuda_run(a.weights, a.input, a.out, a.alpha, a.beta, a.mode, a.precision,
                                 a.num_heads, a.eps);
#else
      std::fprintf(stderr, "dr2net-vjp: --backend cuda: this build of dr2net has no CUDA backend\n");
      return 1;
#endif
    }
    if (a.precision == "fp64") return run<dr2net::Fp64>(a);
    if (a.precision == "fixed-fp32") return run<dr2net::FixedFp32>(a);
    if (a.precision == "fixed-fp64") return run<dr2net::FixedFp64>(a);
    return run<dr2net::Fp32>(a);
  } catch (const dr2net::Error& e) {
    print_error(e.detail());
    return 1;
  } catch (const std::exception& e) {
    print_error(e.what());
    return 1;
  }
}
