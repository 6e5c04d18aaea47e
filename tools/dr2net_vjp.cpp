// dr2net-vjp: the vector-Jacobian product of a Dr²Net stack built from timm ViT blocks, so
// that any checkpoint can be checked against another framework.
//
//   dr2net-vjp --weights W.safetensors --input X.safetensors --alpha A --beta B
//              --mode reversible|standard|error-bounded --precision fp32|fp64
//              [--backend host|cuda] [--num-heads H] [--eps E] --out R.safetensors
//
// W: L timm blocks (blocks.{i}.norm1.weight, ... ; any of F64/F32/F16/BF16; metadata
// "num_heads"). X: "x" [B, N, D] (the stack input h0) and "dout" [B, N, D]. The stack is run
// with every module at (A, B) and L = sum(out * dout); R receives "out" (= y_N), "grad.x"
// (= dL/dh0) and "grad.<name>" for every tensor of W, in the requested precision.
// Any bad input or argument: exit status 1 (2 for usage) and one line on stderr.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "dr2net/dr2net.hpp"
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/safetensors.hpp"
#include "dr2net/modules/vit.hpp"

#if defined(DR2NET_VJP_HAVE_CUDA)
// Defined in dr2net_vjp_cuda.cu (built where dr2net::cuda exists).
int dr2net_vjp_cuda_run(const std::string& weights, const std::string& input, const std::string& out, double alpha,
                        double beta, const std::string& mode, const std::string& precision, int num_heads, double eps);
#endif

namespace {

struct Args {
  std::string weights, input, out;
  double alpha = NAN, beta = NAN;
  std::string mode = "reversible", precision = "fp32", backend = "host";
  std::optional<int> num_heads;
  double eps = 1e-6;
};

constexpr const char* kUsage =
    "usage: dr2net-vjp --weights W.safetensors --input X.safetensors --alpha A --beta B "
    "--mode reversible|standard|error-bounded --precision fp32|fp64 [--backend host|cuda] "
    "[--num-heads H] [--eps E] --out R.safetensors";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

double parse_number(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !std::isfinite(v)) throw UsageError(flag + " expects a finite number, got '" + text + "'");
  return v;
}

Args parse(int argc, char** argv) {
  Args a;
  std::map<std::string, std::string*> strings{{"--weights", &a.weights}, {"--input", &a.input}, {"--out", &a.out},
                                              {"--mode", &a.mode},       {"--precision", &a.precision},
                                              {"--backend", &a.backend}};
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("%s\n", kUsage);
      std::exit(0);
    }
    if (i + 1 >= argc) throw UsageError(flag + " needs a value");
    const std::string value = argv[++i];
    if (auto it = strings.find(flag); it != strings.end()) {
      *it->second = value;
    } else if (flag == "--alpha") {
      a.alpha = parse_number(flag, value);
    } else if (flag == "--beta") {
      a.beta = parse_number(flag, value);
    } else if (flag == "--eps") {
      a.eps = parse_number(flag, value);
      if (!(a.eps > 0)) throw UsageError("--eps must be positive");
    } else if (flag == "--num-heads") {
      const double h = parse_number(flag, value);
      if (h < 1 || h != std::floor(h) || h > 1 << 20) throw UsageError("--num-heads expects a positive integer, got '" + value + "'");
      a.num_heads = static_cast<int>(h);
    } else {
      throw UsageError("unknown argument '" + flag + "'");
    }
  }
  for (auto [flag, value] : {std::pair{"--weights", &a.weights}, {"--input", &a.input}, {"--out", &a.out}})
    if (value->empty()) throw UsageError(std::string("missing ") + flag);
  if (std::isnan(a.alpha)) throw UsageError("missing --alpha");
  if (std::isnan(a.beta)) throw UsageError("missing --beta");
  if (a.mode != "reversible" && a.mode != "standard" && a.mode != "error-bounded")
    throw UsageError("--mode must be reversible, standard or error-bounded, got '" + a.mode + "'");
  if (a.precision != "fp32" && a.precision != "fp64")
    throw UsageError("--precision must be fp32 or fp64, got '" + a.precision + "'");
  if (a.backend != "host" && a.backend != "cuda") throw UsageError("--backend must be host or cuda, got '" + a.backend + "'");
  return a;
}

template <class T>
int run(const Args& a) {
  using namespace dr2net;
  const auto weights = io::SafetensorsReader::from_file(a.weights);
  const auto input = io::SafetensorsReader::from_file(a.input);
  const auto cfg = io::infer_timm_vit_config(weights, a.num_heads);

  input.require({"x", "dout"});
  const auto& xr = input.record("x");
  DR2NET_CHECK(xr.shape.size() == 3 && xr.shape[2] == cfg.dim, "input x has shape ", io::format_shape(xr.shape),
               ", expected [B, N, ", cfg.dim, "]");
  DR2NET_CHECK(xr.shape[0] > 0 && xr.shape[1] > 0, "input x has shape ", io::format_shape(xr.shape),
               ": B and N must be positive");
  const Shape shape{xr.shape[0], xr.shape[1], xr.shape[2]};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::vector<T> x(n), dout(n), out(n), dx(n);
  input.read_into("x", xr.shape, x.data());
  input.read_into("dout", xr.shape, dout.data());

  HostContext ctx;
  using Layer = VitLayer<T, ConstantSchedule>;
  ReversibleStack<Layer> stack(ctx, make_vit_layers<T, ConstantSchedule>(cfg.num_layers, cfg.dim, cfg.num_heads, cfg.hidden, a.eps),
                               ConstantSchedule(a.alpha, a.beta));
  io::load_parameters(stack, weights);
  stack.set_mode(a.mode == "standard" ? BackpropMode::Standard
                 : a.mode == "error-bounded" ? BackpropMode::ErrorBounded
                                             : BackpropMode::Reversible);
  stack.zero_grad();
  stack.forward(ConstView<T>(x.data(), shape), TensorView<T>(out.data(), shape), 0);
  stack.backward(ConstView<T>(dout.data(), shape), TensorView<T>(dx.data(), shape), ConstView<T>(x.data(), shape));

  const auto dtype = std::is_same_v<T, double> ? io::DType::F64 : io::DType::F32;
  io::SafetensorsWriter w;
  w.set_metadata("alpha", std::to_string(a.alpha));
  w.set_metadata("beta", std::to_string(a.beta));
  w.set_metadata("mode", a.mode);
  w.set_metadata("precision", a.precision);
  w.set_metadata("num_heads", std::to_string(cfg.num_heads));
  if (a.mode != "standard")
    w.set_metadata("reconstruction_relative_error", std::to_string(stack.reconstruction().relative_error));
  w.add("out", dtype, xr.shape, out.data());
  w.add("grad.x", dtype, xr.shape, dx.data());
  io::save_parameters(stack, w, dtype, "grad.", /*gradients=*/true);
  w.write_file(a.out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args a = parse(argc, argv);
    if (a.backend == "cuda") {
#if defined(DR2NET_VJP_HAVE_CUDA)
      return dr2net_vjp_cuda_run(a.weights, a.input, a.out, a.alpha, a.beta, a.mode, a.precision,
                                 a.num_heads.value_or(0), a.eps);
#else
      std::fprintf(stderr, "dr2net-vjp: --backend cuda: this build of dr2net has no CUDA backend\n");
      return 1;
#endif
    }
    return a.precision == "fp64" ? run<double>(a) : run<float>(a);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "dr2net-vjp: %s (see --help)\n", e.what());
    return 2;
  } catch (const dr2net::Error& e) {
    std::fprintf(stderr, "dr2net-vjp: %s\n", e.detail().c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dr2net-vjp: %s\n", e.what());
    return 1;
  }
}
