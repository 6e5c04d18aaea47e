// dr2net-vjp --backend cuda: the same vector-Jacobian product as the host path of
// dr2net_vjp.cpp, with the stack on the device (CudaVitAttention / CudaVitMlp). The weights
// are loaded into a host stack by the usual checkpoint code, copied to the device layers, and
// the device gradients copied back into the host stack for writing, so the output file has
// exactly the host path's names, dtypes and metadata.
// Compiled only where dr2net::cuda exists; dr2net_vjp.cpp calls dr2net_vjp_cuda_run() when
// DR2NET_VJP_HAVE_CUDA is defined.

#include "dr2net/modules/cuda/types.cuh"  // first: see its diagnostic note

#include <string>
#include <type_traits>
#include <vector>

#include "dr2net/backend/cuda/cuda.cuh"
#include "dr2net/dr2net.hpp"
#include "dr2net/io/checkpoint.hpp"
#include "dr2net/io/safetensors.hpp"
#include "dr2net/modules/cuda/vit.cuh"
#include "dr2net/modules/vit.hpp"

namespace {

template <class T>
int run_on_device(const std::string& weights_path, const std::string& input_path, const std::string& out_path,
                  double alpha, double beta, const std::string& mode, const std::string& precision,
                  int num_heads, double eps) {
  using namespace dr2net;
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
  std::vector<T> x(n), dout(n);
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
  using DevLayer = CudaVitLayer<T, ConstantSchedule>;
  ReversibleStack<DevLayer> dev(ctx, cuda_vit_layers_from<T, ConstantSchedule>(ctx, host_layers),
                                ConstantSchedule(alpha, beta));
  dev.set_mode(mode == "standard" ? BackpropMode::Standard
               : mode == "error-bounded" ? BackpropMode::ErrorBounded
                                         : BackpropMode::Reversible);
  auto dx_in = to_device(ctx, x), dd = to_device(ctx, dout);
  auto dout_buf = ctx.allocate<T>(n, MemoryCategory::Other), dgrad = ctx.allocate<T>(n, MemoryCategory::Other);
  dev.zero_grad();
  dev.forward(ConstView<T>(dx_in.data(), shape), dout_buf.view(shape), 0);
  dev.backward(ConstView<T>(dd.data(), shape), dgrad.view(shape), ConstView<T>(dx_in.data(), shape));
  const std::vector<T> out = to_host(ctx, dout_buf.data(), n), dx = to_host(ctx, dgrad.data(), n);

  // Gradients back into a host stack with the same names, for the writer.
  ReversibleStack<HostLayer> names(hctx, std::move(host_layers), ConstantSchedule(alpha, beta));
  const auto hp = names.parameters();
  std::size_t i = 0;
  dev.for_each_parameter([&](std::string_view name, TensorView<T>, TensorView<T> g) {
    DR2NET_CHECK(i < hp.size() && hp[i].name == name, "device parameter ", name, " has no host counterpart");
    copy_to_host(ctx, hp[i].grad.data(), g.data(), g.size());
    ++i;
  });

  const auto dtype = std::is_same_v<T, double> ? io::DType::F64 : io::DType::F32;
  io::SafetensorsWriter w;
  w.set_metadata("alpha", std::to_string(alpha));
  w.set_metadata("beta", std::to_string(beta));
  w.set_metadata("mode", mode);
  w.set_metadata("precision", precision);
  w.set_metadata("num_heads", std::to_string(cfg.num_heads));
  w.set_metadata("backend", "cuda");
  if (mode != "standard")
    w.set_metadata("reconstruction_relative_error", std::to_string(dev.reconstruction().relative_error));
  w.add("out", dtype, xr.shape, out.data());
  w.add("grad.x", dtype, xr.shape, dx.data());
  io::save_parameters(names, w, dtype, "grad.", /*gradients=*/true);
  w.write_file(out_path);
  return 0;
}

}  // namespace

//! The device path of dr2net-vjp; arguments already validated by its parser. Throws
//! dr2net::Error on bad input or a CUDA failure (no device included).
int dr2net_vjp_cuda_run(const std::string& weights, const std::string& input, const std::string& out, double alpha,
                        double beta, const std::string& mode, const std::string& precision, int num_heads, double eps) {
  return precision == "fp64" ? run_on_device<double>(weights, input, out, alpha, beta, mode, precision, num_heads, eps)
                             : run_on_device<float>(weights, input, out, alpha, beta, mode, precision, num_heads, eps);
}
