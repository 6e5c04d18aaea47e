// dr2net-vjp --backend cuda: the same vector-Jacobian product as the host path of
// dr2net_vjp.cpp, with the stack on the device (CudaVitAttention / CudaVitMlp). The weights
// are loaded into a host stack by the usual checkpoint code, copied to the device layers, and
// the device gradients copied back into the host stack for writing, so the output file has
// exactly the host path's names, dtypes and metadata (written by dr2net_vjp::metadata, defined
// in dr2net_vjp.cpp). Every precision of the host path works here too: the device stack is
// the same ReversibleStack template over CudaContext, fixed-point streams included.
// Compiled only where dr2net::cuda exists; dr2net_vjp.cpp calls dr2net_vjp_cuda_run() when
// DR2NET_VJP_HAVE_CUDA is defined.

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "dr2net/backend/cuda/cuda.cuh"
#include "dr2net/dr2net.hpp"
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/safetensors.hpp"
#include "dr2net/modules/cuda/vit.cuh"
#include "dr2net/modules/vit.hpp"

#include "vjp_metadata.hpp"

namespace {

template <class P>
int run_on_device(const std::string& weights_path, const std::string& input_path, const std::string& out_path,
                  double alpha, double beta, const std::string& mode, const std::string& precision,
                  int num_heads, double eps) {
  using namespace dr2net;
  using T = typename P::compute_type;  // parameters and their gradients
  using V = policy_value_t<P>;         // h0, out, dout, dh0: the compute type for fixed-point streams
  static_assert(std::is_same_v<T, V>, "dr2net-vjp writes one dtype: the stack's value and compute types must agree");
  const auto weights = io::SafetensorsReader::from_file(weights_path);
  const auto input = io::SafetensorsReader::from_file(input_path);
  // num_heads <= 0: from the file's metadata (no std::optional here: GCC 12 reports a false
  // maybe-uninitialized through it under nvcc's host pass).
  const auto cfg = num_heads > 0 ? io::infer_timm_vit_config(weights, num_heads) : io::infer_timm_vit_config(weights);

  input.require({"x", "dout"});
  const auto& xr = input.record("x");
  DR2NET_CHECK(xr.shape.size() == 3 && xr.shape[2] == cfg.dim, "input x has shape ", io::format_shape(xr.shape),
               ", expected [B, N, ", cfg.dim, "]");
  DR2NET_CHECK(xr.shape[0] > 0 && xr.shape[1] > 0, "input x has shape ", io::format_shape(xr.shape),
               ": B and N must be positive");
  const Shape shape{xr.shape[0], xr.shape[1], xr.shape[2]};
  const auto n = static_cast<std::size_t>(shape.numel());
  std::vector<V> x(n), dout(n);
  input.read_into("x", xr.shape, x.data());
  input.read_into("dout", xr.shape, dout.data());

  // Host stack: loads (and later writes) the tensors by name.
  HostContext hctx;
  using HostLayer = VitLayer<T, ConstantSchedule>;
  ReversibleStack<HostLayer> host(hctx, make_vit_layers<T, ConstantSchedule>(cfg.num_layers, cfg.dim, cfg.num_heads, cfg.hidden, eps),
                                  ConstantSchedule(alpha, beta));
  io::load_parameters(host, weights);
  std::vector<HostLayer> host_layers;
  for (int i = 0; i < host.num_layers(); ++i) host_layers.push_back(std::move(host.layer(i)));

  CudaContext ctx;
  using DevLayer = CudaVitLayer<T, ConstantSchedule, P>;
  using DevStack = ReversibleStack<DevLayer>;
  // The default StackOptions keep the default guard (GuardAction::Throw).
  DevStack dev(ctx, cuda_vit_layers_from<T, ConstantSchedule, P>(ctx, host_layers), ConstantSchedule(alpha, beta));
  dev.set_mode(mode == "standard" ? BackpropMode::Standard
               : mode == "error-bounded" ? BackpropMode::ErrorBounded
                                         : BackpropMode::Reversible);
  auto dx_in = to_device(ctx, x), dd = to_device(ctx, dout);
  auto dout_buf = ctx.allocate<V>(n, MemoryCategory::Other), dgrad = ctx.allocate<V>(n, MemoryCategory::Other);
  dev.zero_grad();
  dev.forward(ConstDeviceView<V>(dx_in.data(), shape), dout_buf.view(shape), 0);
  dev.backward(ConstDeviceView<V>(dd.data(), shape), dgrad.view(shape), ConstDeviceView<V>(dx_in.data(), shape));
  const std::vector<V> out = to_host(ctx, dout_buf.data(), n), dx = to_host(ctx, dgrad.data(), n);

  // Gradients back into a host stack with the same names, for the writer.
  ReversibleStack<HostLayer> names(hctx, std::move(host_layers), ConstantSchedule(alpha, beta));
  const auto hp = names.parameters();
  std::size_t i = 0;
  dev.for_each_parameter([&](std::string_view name, DeviceView<T>, DeviceView<T> g) {
    DR2NET_CHECK(i < hp.size() && hp[i].name == name, "device parameter ", name, " has no host counterpart");
    copy_to_host(ctx, hp[i].grad.data(), g.data(), g.size());
    ++i;
  });

  dr2net_vjp::RunInfo info;
  info.mode = mode;
  info.precision = precision;
  info.backend = "cuda";
  info.num_heads = cfg.num_heads;
  info.requested = {alpha, beta};
  info.used = dev.coefficients(0, 0);
  if constexpr (DevStack::exact) info.stream_frac_bits = DevStack::stream_type::frac_bits;
  info.report = dev.reconstruction();
  info.side_bits_bytes = ctx.meter().peak(MemoryCategory::SideBits);

  const auto dtype = std::is_same_v<V, double> ? io::DType::F64 : io::DType::F32;
  io::SafetensorsWriter w;
  for (const auto& [key, value] : dr2net_vjp::metadata(info)) w.set_metadata(key, value);
  w.add("out", dtype, xr.shape, out.data());
  w.add("grad.x", dtype, xr.shape, dx.data());
  io::save_parameters(names, w, dtype, "grad.", /*gradients=*/true);
  w.write_file(out_path);
  return 0;
}

}  // namespace

//! The device path of dr2net-vjp; arguments already validated by its parser. Throws
//! dr2net::Error on bad input, a guard trip, a non-finite value or a CUDA failure (no device
//! included).
int dr2net_vjp_cuda_run(const std::string& weights, const std::string& input, const std::string& out, double alpha,
                        double beta, const std::string& mode, const std::string& precision, int num_heads, double eps) {
  using namespace dr2net;
  if (precision == "fp64") return run_on_device<Fp64>(weights, input, out, alpha, beta, mode, precision, num_heads, eps);
  if (precision == "fixed-fp32")
    return run_on_device<FixedFp32>(weights, input, out, alpha, beta, mode, precision, num_heads, eps);
  if (precision == "fixed-fp64")
    return run_on_device<FixedFp64>(weights, input, out, alpha, beta, mode, precision, num_heads, eps);
  DR2NET_CHECK(precision == "fp32", "--backend cuda: unknown precision '", precision, "'");
  return run_on_device<Fp32>(weights, input, out, alpha, beta, mode, precision, num_heads, eps);
}
