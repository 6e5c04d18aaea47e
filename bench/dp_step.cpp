// Data-parallel training step of a small ViT stack on the host: forward, backward from a fixed
// output gradient with the gradients all-reduced bucket by bucket while the backward runs
// (dr2net::distributed::DataParallel and the stack's per-layer hook), then an AdamW step, in
// standard and reversible mode, at whatever world size the launcher gives.
//
//   mpirun -np 2 dr2net_bench_dp_step [--layers 4] [--global-batch 16] [--tokens 65] [--dim 192]
//       [--heads 3] [--hidden 768] [--steps 8] [--bucket-kib 1024] [--threads 1]
//       [--mode standard,reversible] [--comm auto] [--json FILE]
//
// Every rank trains on global-batch / world-size samples of the same global batch, so runs at
// different world sizes do the same work per step. The modes run interleaved, step by step;
// the median over the timed steps is reported (rank 0's clock: finish() holds every rank to
// the slowest, so the ranks' step times agree). The overlap of communication with the backward
// comes from the driver's per-bucket timeline: for each bucket, when its all-reduce was started
// and when it was first seen complete, against the backward's end; the hidden fraction is the
// share of the buckets' in-flight time that lies before the backward's end (completion is
// observed at the next layer's hook, so it is a lower bound). After the timed steps the ranks'
// parameters are checked to be bit for bit equal.
//
// --comm: auto (MPI under an MPI launcher, else a world of one), mpi, local; nccl is the hook
// for device runs with the NCCL communicator, which this benchmark does not drive yet (a device
// model and CudaContext are needed), so it is refused with a message saying so.

#include <algorithm>
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
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "dr2net/distributed/communicator.hpp"
#include "dr2net/distributed/data_parallel.hpp"
#include "dr2net/dr2net.hpp"
#include "dr2net/modules/vit.hpp"
#include "dr2net/optim/adamw.hpp"
#ifdef DR2NET_HAVE_MPI
#include "dr2net/distributed/mpi_communicator.hpp"
#endif

#include "cli.hpp"

namespace {

namespace dist = dr2net::distributed;
using T = float;
using Sched = dr2net::ConstantSchedule;
using Layer = dr2net::VitLayer<T, Sched>;
using Stack = dr2net::ReversibleStack<Layer>;

struct Options {
  int layers = 4;
  std::int64_t global_batch = 16, tokens = 65, dim = 192, heads = 3, hidden = 768;
  int steps = 8;
  std::int64_t bucket_kib = 1024;
  int threads = 1;  // host threads per rank (0: DR2NET_NUM_THREADS, OMP_NUM_THREADS, the cores)
  std::string modes = "standard,reversible";
  std::string comm = "auto";
  std::string json;
};

std::optional<int> parse(int argc, char** argv, Options& o) {
  CLI::App app("Data-parallel ViT training step on the host: step time and all-reduce overlap with the backward.",
               "dr2net_bench_dp_step");
  using dr2net_cli::add_integer;
  constexpr std::int64_t kMax = 1000000000;
  add_integer(app, "--layers", o.layers, 1, 1 << 20, "layers");
  add_integer(app, "--global-batch", o.global_batch, std::int64_t{1}, kMax,
              "samples per step over all ranks (a multiple of the world size)");
  add_integer(app, "--tokens", o.tokens, std::int64_t{1}, kMax, "tokens N");
  add_integer(app, "--dim", o.dim, std::int64_t{1}, kMax, "model width D");
  add_integer(app, "--heads", o.heads, std::int64_t{1}, kMax, "attention heads");
  add_integer(app, "--hidden", o.hidden, std::int64_t{1}, kMax, "MLP hidden width");
  add_integer(app, "--steps", o.steps, 1, 1 << 20, "timed steps per mode");
  add_integer(app, "--bucket-kib", o.bucket_kib, std::int64_t{1}, std::int64_t{1} << 30,
              "gradient bucket size in KiB (DataParallelOptions::bucket_bytes)");
  add_integer(app, "--threads", o.threads, 0, dr2net::kMaxHostThreads, "host threads per rank (0: from the environment)");
  app.add_option("--mode", o.modes, "the modes to run, interleaved step by step")
      ->check(dr2net_cli::list_of(CLI::IsMember({"standard", "reversible"})))
      ->capture_default_str();
  app.add_option("--comm", o.comm, "transport: auto (MPI under a launcher, else one process), mpi, local, nccl")
      ->check(CLI::IsMember({"auto", "mpi", "local", "nccl"}))
      ->capture_default_str();
  app.add_option("--json", o.json, "the results, with every timed step's bucket timeline, as JSON (rank 0 writes it)");
  if (auto status = dr2net_cli::parse(app, argc, argv)) return status;
  const auto words = dr2net_cli::words(o.modes);
  for (std::size_t i = 0; i < words.size(); ++i)
    for (std::size_t j = 0; j < i; ++j)
      if (words[i] == words[j]) {
        std::cerr << "dr2net_bench_dp_step: --mode names '" << words[i] << "' twice (see --help)\n";
        return 2;
      }
  return std::nullopt;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

// What one timed step measured, in seconds since the driver's begin_step().
struct StepRecord {
  double forward_end = 0, backward_end = 0, finished = 0, optimizer_end = 0;
  dist::StepTimeline timeline;
};

// One mode: its own context (own meter), stack, optimizer and driver on the shared communicator.
template <class Comm>
struct Run {
  std::string name;
  dr2net::HostContext ctx;
  Stack stack;
  std::vector<dr2net::NamedParameter<T>> params;
  dr2net::optim::AdamW<T> opt;
  dist::DataParallel<Comm, dr2net::HostContext> dp;
  std::vector<StepRecord> steps;

  Run(const Options& o, const std::string& mode, Comm& comm, std::uint64_t sample_offset)
      : name(mode), ctx({.threads = o.threads}),
        stack(ctx, dr2net::make_vit_layers<T, Sched>(o.layers, dr2net::VitLayerConfig{o.dim, o.heads, o.hidden}, 2024),
              Sched(0.0, 1.0),
              {.mode = mode == "standard" ? dr2net::BackpropMode::Standard : dr2net::BackpropMode::Reversible,
               .seed = 7}),
        params(stack.parameters()), opt(ctx, params, {.lr = 1e-4, .weight_decay = 0.05}),
        dp(comm, ctx, {.bucket_bytes = static_cast<std::size_t>(o.bucket_kib) * 1024}) {
    dp.add_stack(stack, sample_offset);
    dp.finalize();
  }

  void step(const dr2net::Shape& s, const std::vector<T>& h0, const std::vector<T>& dout, std::vector<T>& out,
            std::vector<T>& dh0, std::int64_t k, bool timed) {
    opt.zero_grad();
    dp.begin_step();
    StepRecord r;
    stack.forward(dr2net::ConstView<T>(h0.data(), s), dr2net::TensorView<T>(out.data(), s), k);
    r.forward_end = dp.elapsed();
    stack.backward(dr2net::ConstView<T>(dout.data(), s), dr2net::TensorView<T>(dh0.data(), s));
    dp.finish();
    r.timeline = dp.timeline();
    r.backward_end = r.timeline.backward_end;
    r.finished = r.timeline.finished;
    opt.step(1e-4);
    r.optimizer_end = dp.elapsed();
    if (timed) steps.push_back(std::move(r));
  }

  template <class F>
  double med(F f) const {
    std::vector<double> v;
    for (const auto& r : steps) v.push_back(f(r));
    return median(v);
  }
  double step_seconds() const { return med([](const StepRecord& r) { return r.optimizer_end; }); }
  double forward_seconds() const { return med([](const StepRecord& r) { return r.forward_end; }); }
  double backward_seconds() const { return med([](const StepRecord& r) { return r.backward_end - r.forward_end; }); }
  double wait_seconds() const { return med([](const StepRecord& r) { return r.finished - r.backward_end; }); }
  double optimizer_seconds() const { return med([](const StepRecord& r) { return r.optimizer_end - r.finished; }); }
  double communication_seconds() const {
    return med([](const StepRecord& r) { return r.timeline.communication_seconds(); });
  }
  // The hidden share of all timed steps' communication together.
  double hidden_fraction() const {
    double total = 0, hidden = 0;
    for (const auto& r : steps) {
      const double c = r.timeline.communication_seconds();
      total += c;
      hidden += c * r.timeline.hidden_fraction();
    }
    return total > 0 ? hidden / total : 1.0;
  }
};

template <class Comm>
std::string mode_json(const Run<Comm>& r) {
  std::ostringstream f;
  f << "{\"seconds_per_step\": " << number(r.step_seconds()) << ", \"forward_seconds\": " << number(r.forward_seconds())
    << ", \"backward_seconds\": " << number(r.backward_seconds()) << ", \"wait_after_backward_seconds\": "
    << number(r.wait_seconds()) << ", \"optimizer_seconds\": " << number(r.optimizer_seconds())
    << ", \"communication_seconds\": " << number(r.communication_seconds())
    << ", \"hidden_fraction\": " << number(r.hidden_fraction())
    << ", \"peak_activation_bytes\": " << r.ctx.meter().peak_activation()
    << ", \"peak_total_bytes\": " << r.ctx.meter().peak_total() << ",\n      \"steps\": [";
  for (std::size_t k = 0; k < r.steps.size(); ++k) {
    const StepRecord& s = r.steps[k];
    f << (k ? ",\n        " : "\n        ") << "{\"forward_end\": " << number(s.forward_end)
      << ", \"backward_end\": " << number(s.backward_end) << ", \"finished\": " << number(s.finished)
      << ", \"optimizer_end\": " << number(s.optimizer_end)
      << ", \"hidden_fraction\": " << number(s.timeline.hidden_fraction()) << ", \"buckets\": [";
    for (std::size_t b = 0; b < s.timeline.buckets.size(); ++b) {
      const auto& t = s.timeline.buckets[b];
      f << (b ? ", " : "") << "{\"bytes\": " << t.bytes << ", \"launched\": " << number(t.launched)
        << ", \"completed\": " << number(t.completed) << "}";
    }
    f << "]}";
  }
  f << "]}";
  return f.str();
}

template <class Comm>
int bench(const Options& o, Comm& comm, const char* transport) {
  const int world = comm.size(), rank = comm.rank();
  const dist::BatchShard shard = dist::batch_shard(o.global_batch, rank, world);
  // The same global batch on every rank; each takes its shard.
  const dr2net::Shape global{o.global_batch, o.tokens, o.dim}, local{shard.size(), o.tokens, o.dim};
  const auto per_sample = static_cast<std::size_t>(o.tokens * o.dim);
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<T> gh0(static_cast<std::size_t>(global.numel())), gdout(gh0.size());
  for (auto& v : gh0) v = static_cast<T>(u(rng));
  for (auto& v : gdout) v = static_cast<T>(u(rng));
  const auto first = static_cast<std::ptrdiff_t>(static_cast<std::size_t>(shard.begin) * per_sample);
  const auto count = static_cast<std::ptrdiff_t>(static_cast<std::size_t>(shard.size()) * per_sample);
  const std::vector<T> h0(gh0.begin() + first, gh0.begin() + first + count);
  const std::vector<T> dout(gdout.begin() + first, gdout.begin() + first + count);
  std::vector<T> out(h0.size()), dh0(h0.size());

  std::vector<std::unique_ptr<Run<Comm>>> runs;
  for (const std::string& m : dr2net_cli::words(o.modes))
    runs.push_back(std::make_unique<Run<Comm>>(o, m, comm, static_cast<std::uint64_t>(shard.begin)));
  for (auto& r : runs) r->step(local, h0, dout, out, dh0, 0, false);  // first touch of every buffer
  for (int s = 1; s <= o.steps; ++s)
    for (auto& r : runs) r->step(local, h0, dout, out, dh0, s, true);
  for (auto& r : runs) r->dp.verify_parameters_equal();  // the ranks trained in step

  std::size_t parameters = 0;
  for (const auto& p : runs[0]->params) parameters += p.value.size();
  const auto& buckets = runs[0]->dp.buckets();
  if (rank == 0) {
    std::printf("data-parallel ViT training step: %d layers, tokens %lld, dim %lld, heads %lld, hidden %lld, fp32; "
                "%zu parameters\n",
                o.layers, static_cast<long long>(o.tokens), static_cast<long long>(o.dim),
                static_cast<long long>(o.heads), static_cast<long long>(o.hidden), parameters);
    std::printf("%s, %d rank(s) x %d host thread(s); global batch %lld = %d x %lld; %zu gradient buckets of up to "
                "%lld KiB; host GEMM: %s; %d timed steps per mode (median, rank 0)\n",
                transport, world, runs[0]->ctx.threads(), static_cast<long long>(o.global_batch), world,
                static_cast<long long>(shard.size()), buckets.size(), static_cast<long long>(o.bucket_kib),
                std::string(dr2net::host_gemm_backend()).c_str(), o.steps);
    std::printf("%-11s %9s %10s %11s %9s %12s %9s %8s\n", "mode", "s/step", "forward s", "backward s", "wait s",
                "optimizer s", "comm s", "hidden");
    for (const auto& r : runs)
      std::printf("%-11s %9.4f %10.4f %11.4f %9.4f %12.4f %9.4f %7.1f%%\n", r->name.c_str(), r->step_seconds(),
                  r->forward_seconds(), r->backward_seconds(), r->wait_seconds(), r->optimizer_seconds(),
                  r->communication_seconds(), 100.0 * r->hidden_fraction());
  }
  if (rank == 0 && !o.json.empty()) {
    std::ofstream f(o.json);
    if (!f) throw std::runtime_error("cannot write " + o.json);
    f << "{\n  \"benchmark\": \"dp_step\",\n  \"comm\": \"" << transport << "\",\n  \"world_size\": " << world
      << ", \"threads_per_rank\": " << runs[0]->ctx.threads() << ",\n  \"gemm\": \"" << dr2net::host_gemm_backend()
      << "\", \"precision\": \"fp32\",\n  \"layers\": " << o.layers << ", \"global_batch\": " << o.global_batch
      << ", \"local_batch\": " << shard.size() << ", \"tokens\": " << o.tokens << ", \"dim\": " << o.dim
      << ", \"heads\": " << o.heads << ", \"hidden\": " << o.hidden << ", \"parameters\": " << parameters
      << ",\n  \"timed_steps\": " << o.steps << ", \"bucket_bytes_limit\": " << o.bucket_kib * 1024
      << ",\n  \"bucket_bytes\": [";
    for (std::size_t b = 0; b < buckets.size(); ++b) f << (b ? ", " : "") << buckets[b].elements * sizeof(T);
    f << "],\n  \"modes\": {";
    for (std::size_t k = 0; k < runs.size(); ++k)
      f << (k ? ",\n" : "\n") << "    \"" << runs[k]->name << "\": " << mode_json(*runs[k]);
    f << "\n  }\n}\n";
    if (!f) throw std::runtime_error("error writing " + o.json);
  }
  return 0;
}

// Runs the benchmark; errors name the rank when there are several.
template <class Comm>
int guarded(const Options& o, Comm& comm, const char* transport) {
  try {
    return bench(o, comm, transport);
  } catch (const std::exception& e) {
    if (comm.size() > 1) std::cerr << "dr2net_bench_dp_step (rank " << comm.rank() << " of " << comm.size() << "): ";
    else std::cerr << "dr2net_bench_dp_step: ";
    std::cerr << e.what() << "\n";
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (const auto status = parse(argc, argv, o)) return *status;
  if (o.comm == "nccl") {
    std::cerr << "dr2net_bench_dp_step: --comm nccl is not supported yet: this benchmark trains host stacks over "
                 "MPI; device runs need the NCCL communicator with a CudaContext model (docs/distributed.md)\n";
    return 2;
  }
#ifdef DR2NET_HAVE_MPI
  const bool mpi = o.comm == "mpi" || (o.comm == "auto" && dist::launched_by_mpi());
  if (mpi) {
    try {
      dist::MpiEnvironment env(&argc, &argv);
      dist::MpiCommunicator comm(dist::comm_options_from_environment());
      return guarded(o, comm, "MPI");
    } catch (const std::exception& e) {
      std::cerr << "dr2net_bench_dp_step: " << e.what() << "\n";
      return 1;
    }
  }
#else
  if (o.comm == "mpi") {
    std::cerr << "dr2net_bench_dp_step: --comm mpi: this build has no MPI (dr2net::mpi)\n";
    return 2;
  }
#endif
  try {
    dist::LocalCommunicator comm(dist::comm_options_from_environment());
    return guarded(o, comm, "one process");
  } catch (const std::exception& e) {
    std::cerr << "dr2net_bench_dp_step: " << e.what() << "\n";
    return 1;
  }
}
