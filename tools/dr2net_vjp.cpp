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
// Any bad input or argument, a guard trip, or a non-finite value: exit status 1 (2 for
// usage: an unknown, repeated or malformed flag, or an --out that is the same file as
// --weights or --input), one line on stderr, and no output file.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/paths.hpp"
#include "dr2net/io/safetensors.hpp"
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
  m["num_heads"] = std::to_string(r.num_heads);
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
  app.add_option("--eps", a.eps, "LayerNorm epsilon")->check(dr2net_cli::positive())->capture_default_str();
  if (auto status = dr2net_cli::parse(app, argc, argv)) return status;
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

}  // namespace

int main(int argc, char** argv) {
  try {
    Args a;
    if (const auto status = parse(argc, argv, a)) return *status;
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
