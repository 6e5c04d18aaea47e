// The multi-rank tests, run under mpirun by ctest (mpi_tests.cmake): `dr2net_mpi_tests <case>
// <directory>`. Every rank checks its own results and exits non-zero on a failure, so the
// launcher's status is the test's. Cases:
//   collectives       every operation of MpiCommunicator against values computed locally
//   gradients         after one step the averaged gradients on every rank equal one process's on
//                     the whole batch, in reversible, exact, error-bounded and standard modes,
//                     drop-path and dropout on, and are bit for bit equal across ranks
//   buckets           buckets start before the backward ends; gradients do not depend on bucket size
//   adamw             20 AdamW steps: parameters bit for bit equal across ranks, replicated and
//                     sharded (ZeRO-1), sharded == replicated within tolerance, state / world size
//   mismatch          ranks with different models: finalize() names every rank's parameters
//   early_exit        rank 1 leaves: rank 0's all-reduce times out with an error naming it
//   closed            a closed communicator refuses every operation; close() with one in flight
//   checkpoint_write  (2 ranks) sharded state after 3 steps, and the parameters after a 4th
//   checkpoint_load   (1 or 3 ranks) loads it, checks it, takes the 4th step and compares

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "distributed/dp_model.hpp"
#include "support/tolerances.hpp"
#include "dr2net/distributed/data_parallel.hpp"
#include "dr2net/distributed/mpi_communicator.hpp"
#include "dr2net/distributed/sharded_adamw.hpp"
#include "dr2net/optim/adamw.hpp"
#if DR2NET_TEST_HAVE_IO
#include "dr2net/distributed/checkpoint.hpp"
#include "dr2net/io/safetensors.hpp"
#endif

using namespace dr2net;
using namespace dr2net::distributed;
using dr2net::testing::Batch;
using dr2net::testing::DpMode;
using dr2net::testing::TinyVit;
using dr2net::testing::TinyVitConfig;

namespace {

using MpiDP = DataParallel<MpiCommunicator, HostContext, float>;

int g_rank = 0;
long g_passed = 0, g_failed = 0;

bool check(bool ok, const char* expr, int line, const std::string& msg = {}) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("rank %d: FAILED line %d: %s %s\n", g_rank, line, expr, msg.c_str());
    std::fflush(stdout);
  }
  return ok;
}
#define CHECK(cond, ...) check(static_cast<bool>(cond), #cond, __LINE__, ::dr2net::detail::concat("", ##__VA_ARGS__))

// The message of the dr2net::Error `fn` throws ("" when it throws none).
template <class Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.detail();
  }
  return "";
}
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

std::vector<std::vector<float>> grads_of(std::vector<NamedParameter<float>> ps) {
  std::vector<std::vector<float>> g;
  for (auto& p : ps) g.emplace_back(p.grad.data(), p.grad.data() + p.grad.size());
  return g;
}
std::vector<std::vector<float>> values_of(std::vector<NamedParameter<float>> ps) {
  std::vector<std::vector<float>> g;
  for (auto& p : ps) g.emplace_back(p.value.data(), p.value.data() + p.value.size());
  return g;
}
double worst_rel(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  double w = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    w = std::max(w, testing::max_rel_diff(a[i].data(), b[i].data(), a[i].size()));
  return w;
}
// Whether `v` (its bits) is the same on every rank.
bool same_on_every_rank(MpiCommunicator& comm, const std::vector<std::vector<float>>& v) {
  std::uint64_t h = kFnvBasis;
  for (const auto& t : v) h = fnv1a(h, t.data(), t.size() * sizeof(float));
  std::vector<std::uint64_t> all(static_cast<std::size_t>(comm.size()));
  comm.all_gather(&h, all.data(), 1).wait();
  return std::all_of(all.begin(), all.end(), [&](std::uint64_t x) { return x == all[0]; });
}

void collectives() {
  MpiCommunicator comm;
  const int R = comm.size(), r = comm.rank();
  const std::size_t n = 37;
  // broadcast from the last rank, of floats and of bytes
  std::vector<float> b(n);
  for (std::size_t i = 0; i < n; ++i) b[i] = r == R - 1 ? 0.25f * static_cast<float>(i) : -1.0f;
  comm.broadcast(b.data(), n, R - 1).wait();
  for (std::size_t i = 0; i < n; ++i) CHECK(b[i] == 0.25f * static_cast<float>(i), "element ", i);
  unsigned char id[16];
  for (int i = 0; i < 16; ++i) id[i] = static_cast<unsigned char>(r == 0 ? 200 + i : 0);
  comm.broadcast(id, 16, 0).wait();
  CHECK(id[15] == 215);
  // all-reduce: sum of doubles and int64, average of floats (integer-valued: exact)
  std::vector<double> d(n);
  std::vector<std::int64_t> k(n);
  std::vector<float> f(n);
  for (std::size_t i = 0; i < n; ++i) {
    d[i] = (r + 1) * 0.5 * static_cast<double>(i);
    k[i] = (r + 1) * static_cast<std::int64_t>(i) - 7;
    f[i] = static_cast<float>((r + 1) * static_cast<int>(i));
  }
  auto rd = comm.all_reduce(d.data(), n, ReduceOp::Sum);
  auto rk = comm.all_reduce(k.data(), n, ReduceOp::Sum);
  auto rf = comm.all_reduce(f.data(), n, ReduceOp::Average);
  (void)rd.test();  // test() on a request in flight advances it
  rf.wait();  // out of order
  rk.wait();
  rd.wait();
  const int tri = R * (R + 1) / 2;
  for (std::size_t i = 0; i < n; ++i) {
    CHECK(d[i] == tri * 0.5 * static_cast<double>(i), "double sum at ", i);
    CHECK(k[i] == tri * static_cast<std::int64_t>(i) - 7 * R, "int64 sum at ", i);
    CHECK(f[i] == static_cast<float>(tri * static_cast<int>(i)) / static_cast<float>(R), "float average at ", i);
  }
  // reduce-scatter: recv[i] = sum over ranks q of send_q[r n + i], send_q[j] = q + j
  std::vector<float> send(n * static_cast<std::size_t>(R)), recv(n, -1.0f);
  for (std::size_t j = 0; j < send.size(); ++j) send[j] = static_cast<float>(r) + static_cast<float>(j);
  comm.reduce_scatter(send.data(), recv.data(), n, ReduceOp::Sum).wait();
  for (std::size_t i = 0; i < n; ++i)
    CHECK(recv[i] == static_cast<float>(R * (R - 1) / 2) + static_cast<float>(R) * static_cast<float>(r * n + i));
  // all-gather, out of place and in place
  std::vector<double> mine(n), all(n * static_cast<std::size_t>(R), -1.0);
  for (std::size_t i = 0; i < n; ++i) mine[i] = 1000.0 * r + static_cast<double>(i);
  comm.all_gather(mine.data(), all.data(), n).wait();
  for (int q = 0; q < R; ++q)
    for (std::size_t i = 0; i < n; ++i) CHECK(all[static_cast<std::size_t>(q) * n + i] == 1000.0 * q + static_cast<double>(i));
  std::vector<double> inplace(n * static_cast<std::size_t>(R), -1.0);
  std::copy(mine.begin(), mine.end(), inplace.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(r) * n));
  comm.all_gather(inplace.data() + static_cast<std::size_t>(r) * n, inplace.data(), n).wait();
  CHECK(inplace == all);
  comm.barrier();
  // mistakes are errors naming the operation
  CHECK(contains(error_of([&] { comm.broadcast(b.data(), n, R); }), "is not a rank"));
  CHECK(contains(error_of([&] { comm.all_reduce(k.data(), n, ReduceOp::Average); }), "floating-point"));
  CHECK(contains(error_of([&] { comm.all_gather(all.data() + 1, all.data(), n); }), "overlaps"));
  CHECK(contains(error_of([&] { comm.reduce_scatter(send.data(), send.data(), n, ReduceOp::Sum); }), "overlap"));
  comm.barrier();
}

template <class P>
void gradients_in(DpMode mode, MpiCommunicator& comm) {
  const TinyVitConfig c;
  const std::int64_t B = 2, G = B * comm.size();
  const BatchShard shard = batch_shard(G, comm.rank(), comm.size());
  const Batch batch = testing::make_batch(c, G, 21);
  HostContext ctx;
  TinyVit<P> model(ctx, c, mode, 3), whole(ctx, c, mode, 3);
  MpiDP dp(comm, ctx, {.bucket_bytes = 1500});
  model.attach(dp, static_cast<std::uint64_t>(shard.begin));
  dp.finalize();
  model.zero_grad();
  dp.begin_step();
  model.train_step(batch.images_of(shard.begin, shard.end), batch.labels_of(shard.begin, shard.end), 4, &dp);
  dp.finish();
  whole.zero_grad();
  whole.train_step(batch.images_of(0, G), batch.labels_of(0, G), 4);
  const auto got = grads_of(model.parameters());
  const double w = worst_rel(got, grads_of(whole.parameters()));
  if (comm.rank() == 0)
    std::printf("%-14s %d ranks: worst relative gradient difference to one process on the whole batch %.3g\n",
                testing::dp_mode_name(mode), comm.size(), w);
  // fp32 sums over differently shaped GEMMs and over ranks: the function tolerance of fp32.
  CHECK(w < testing::tolerances(testing::PrecisionKind::Fp32).function.rtol, testing::dp_mode_name(mode), ": ", w);
  CHECK(same_on_every_rank(comm, got), testing::dp_mode_name(mode));
}

void gradients() {
  MpiCommunicator comm;
  gradients_in<Fp32>(DpMode::Reversible, comm);
  gradients_in<FixedFp32>(DpMode::Exact, comm);
  gradients_in<Fp32>(DpMode::ErrorBounded, comm);
  gradients_in<Fp32>(DpMode::Standard, comm);
}

void buckets() {
  MpiCommunicator comm;
  const TinyVitConfig c;
  const std::int64_t G = 2 * comm.size();
  const BatchShard shard = batch_shard(G, comm.rank(), comm.size());
  const Batch batch = testing::make_batch(c, G, 5);
  std::vector<std::vector<float>> first;
  for (std::size_t bytes : {std::size_t{1}, std::size_t{3000}, std::size_t{1} << 30}) {
    HostContext ctx;
    TinyVit<Fp32> model(ctx, c, DpMode::Reversible, 8);
    MpiDP dp(comm, ctx, {.bucket_bytes = bytes});
    model.attach(dp, static_cast<std::uint64_t>(shard.begin));
    dp.finalize();
    model.zero_grad();
    dp.begin_step();
    double stack_end = -1;
    model.train_step(batch.images_of(shard.begin, shard.end), batch.labels_of(shard.begin, shard.end), 0, &dp,
                     &stack_end);
    dp.finish();
    const StepTimeline& t = dp.timeline();
    CHECK(t.launched_before_backward_end() == static_cast<int>(dp.buckets().size()));
    if (bytes == 1) {
      CHECK(dp.buckets().size() == static_cast<std::size_t>(c.layers + 2));
      // head and every layer went out while the stack's backward was still running
      for (std::size_t k = 0; k + 1 < t.buckets.size(); ++k) {
        CHECK(t.buckets[k].launched >= 0 && t.buckets[k].launched <= stack_end, "bucket ", k);
        CHECK(t.buckets[k].launched <= t.buckets[k + 1].launched, "bucket ", k);
      }
      if (comm.rank() == 0)
        std::printf("%d ranks, one bucket per group: %d of %zu buckets started before the backward ended, "
                    "%.0f%% of their communication time hidden\n",
                    comm.size(), t.launched_before_backward_end(), t.buckets.size(), 100 * t.hidden_fraction());
    }
    const auto g = grads_of(model.parameters());
    if (first.empty()) {
      first = g;
    } else {
      const double w = worst_rel(g, first);
      // Two ranks: a + b in any order is one rounding, so bucketing cannot change a bit.
      if (comm.size() == 2) CHECK(w == 0.0, "bucket bytes ", bytes, ": ", w);
      else CHECK(w < 1e-6, "bucket bytes ", bytes, ": ", w);
    }
  }
}

void adamw() {
  MpiCommunicator comm_a, comm_b;
  const TinyVitConfig c;
  const int R = comm_a.size();
  const std::int64_t G = 2 * R;
  const BatchShard shard = batch_shard(G, comm_a.rank(), R);
  HostContext ctx_a, ctx_b, ctx_ref;
  TinyVit<Fp32> rep(ctx_a, c, DpMode::Reversible, 6), shd(ctx_b, c, DpMode::Reversible, 6),
      ref(ctx_ref, c, DpMode::Reversible, 6);
  MpiDP dp_rep(comm_a, ctx_a, {.bucket_bytes = 4000});
  MpiDP dp_shd(comm_b, ctx_b, {.bucket_bytes = 4000, .sync = GradientSync::ReduceScatter});
  rep.attach(dp_rep, static_cast<std::uint64_t>(shard.begin));
  shd.attach(dp_shd, static_cast<std::uint64_t>(shard.begin));
  dp_rep.finalize();
  dp_shd.finalize();
  const optim::AdamWOptions o{.lr = 2e-3, .weight_decay = 0.05};
  const std::size_t other0 = ctx_b.meter().current(MemoryCategory::Other);
  DistributedAdamW<MpiCommunicator> opt_rep(dp_rep, o), opt_shd(dp_shd, o);
  const std::size_t metered = ctx_b.meter().current(MemoryCategory::Other) - other0;
  optim::AdamW<float> opt_ref(ctx_ref, ref.parameters(), o);
  CHECK(!opt_rep.sharded() && opt_shd.sharded());
  // ZeRO-1: each rank holds 1 / R of the state (plus < R elements of padding per bucket)
  const std::size_t pad = 2 * dp_shd.buckets().size() * static_cast<std::size_t>(R) * sizeof(float);
  CHECK(opt_shd.state_bytes() * static_cast<std::size_t>(R) >= opt_rep.state_bytes());
  CHECK(opt_shd.state_bytes() * static_cast<std::size_t>(R) <= opt_rep.state_bytes() + pad * static_cast<std::size_t>(R));
  CHECK(metered >= opt_shd.state_bytes() && metered < opt_shd.state_bytes() + 512, "metered ", metered);
  if (comm_a.rank() == 0)
    std::printf("%d ranks: AdamW state per rank %zu bytes replicated, %zu sharded (meter: %zu)\n", R,
                opt_rep.state_bytes(), opt_shd.state_bytes(), metered);
  for (int step = 0; step < 20; ++step) {
    const Batch batch = testing::make_batch(c, G, 500 + static_cast<std::uint64_t>(step));
    const auto images = batch.images_of(shard.begin, shard.end);
    const auto labels = batch.labels_of(shard.begin, shard.end);
    opt_rep.zero_grad();
    dp_rep.begin_step();
    rep.train_step(images, labels, step, &dp_rep);
    dp_rep.finish();
    opt_rep.step(o.lr, 1.0);
    opt_shd.zero_grad();
    dp_shd.begin_step();
    shd.train_step(images, labels, step, &dp_shd);
    dp_shd.finish();
    opt_shd.step(o.lr, 1.0);
    ref.zero_grad();
    ref.train_step(batch.images_of(0, G), batch.labels_of(0, G), step);
    optim::clip_grad_norm(ref.parameters(), 1.0);
    opt_ref.step(o.lr);
  }
  CHECK(same_on_every_rank(comm_a, values_of(rep.parameters())));
  CHECK(same_on_every_rank(comm_b, values_of(shd.parameters())));
  CHECK(error_of([&] { dp_rep.verify_parameters_equal(); }).empty());
  CHECK(error_of([&] { dp_shd.verify_parameters_equal(); }).empty());
  const double sharded = worst_rel(values_of(shd.parameters()), values_of(rep.parameters()));
  const double single = worst_rel(values_of(rep.parameters()), values_of(ref.parameters()));
  if (comm_a.rank() == 0)
    std::printf("%d ranks, 20 AdamW steps: sharded vs replicated %.3g, replicated vs one process %.3g "
                "(worst relative parameter difference)\n",
                R, sharded, single);
  CHECK(sharded < 1e-5, sharded);
  // Against one process on the whole batch the gradients differ by rounding, and AdamW divides
  // every element's gradient by its own running scale, so an element whose gradient is rounding
  // noise can move by up to lr a step: the bound is the steps' lr-sized updates, not fp32's
  // epsilon (measured: 1.6e-4 to 4.5e-4 at 2 and 3 ranks).
  CHECK(single < 0.25 * 20 * o.lr, single);
}

void mismatch() {
  MpiCommunicator comm(CommOptions{std::chrono::seconds(20)});
  TinyVitConfig c;
  if (comm.rank() == 1) c.layers = 2;  // one layer fewer
  HostContext ctx;
  TinyVit<Fp32> model(ctx, c, DpMode::Reversible, 1);
  MpiDP dp(comm, ctx);
  model.attach(dp, 0);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string e = error_of([&] { dp.finalize(); });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(contains(e, "the ranks registered different parameters"), e);
  CHECK(contains(e, "rank 0: 44 tensors") && contains(e, "rank 1: 32 tensors") && contains(e, "in 4 groups"), e);
  CHECK(s < 10.0, s, " s");
  if (comm.rank() == 0) std::printf("rank 0's error: %s\n", e.c_str());
}

void early_exit() {
  MpiCommunicator comm(CommOptions{std::chrono::seconds(3)});
  const TinyVitConfig c;
  HostContext ctx;
  TinyVit<Fp32> model(ctx, c, DpMode::Reversible, 1);
  MpiDP dp(comm, ctx, {.bucket_bytes = 1});
  model.attach(dp, 0);
  dp.finalize();
  if (comm.rank() == 1) {
    std::printf("rank 1: leaving before the first step\n");
    return;  // MPI_Finalize follows (it waits for rank 0)
  }
  const Batch batch = testing::make_batch(c, 2, 1);
  model.zero_grad();
  const auto t0 = std::chrono::steady_clock::now();
  dp.begin_step();
  model.train_step(batch.images_of(0, 2), batch.labels_of(0, 2), 0, &dp);
  const std::string e = error_of([&] { dp.finish(); });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("rank 0's error after %.1f s: %s\n", s, e.c_str());
  CHECK(contains(e, "MPI all_reduce (sum) of ") && contains(e, " bytes (") && contains(e, "float)"), e);
  CHECK(contains(e, "on rank 0 of 2 did not complete within 3 s"), e);
  CHECK(s >= 2.5 && s < 15, s, " s");
  CHECK(comm.failed());
  float x = 1;
  CHECK(contains(error_of([&] { comm.all_reduce(&x, 1, ReduceOp::Sum); }), "an earlier operation timed out"));
}

void closed() {
  MpiCommunicator comm(CommOptions{std::chrono::seconds(20)});
  MpiCommunicator other(CommOptions{std::chrono::seconds(20)});
  float x[3] = {1, 2, 3};
  auto pending = other.all_reduce(x, 3, ReduceOp::Sum);
  CHECK(contains(error_of([&] { other.close(); }), "still in flight"));
  pending.wait();
  other.close();
  CHECK(other.closed());
  comm.close();
  CHECK(contains(error_of([&] { comm.all_reduce(x, 3, ReduceOp::Sum); }),
                 "all_reduce (sum) of 12 bytes (3 float) called after close()"));
  CHECK(contains(error_of([&] { comm.barrier(); }), "after close()"));
  CHECK(contains(error_of([&] { comm.broadcast(x, 3, 0); }), "after close()"));
  HostContext ctx;
  const TinyVitConfig c;
  TinyVit<Fp32> model(ctx, c, DpMode::Reversible, 1);
  MpiDP dp(comm, ctx);
  model.attach(dp, 0);
  CHECK(contains(error_of([&] { dp.finalize(); }), "all_gather"), "the driver's first collective names itself");
  MpiCommunicator moved(std::move(other));
  CHECK(moved.closed());
}

#if DR2NET_TEST_HAVE_IO
const std::int64_t kCheckpointBatch = 6;  // splits over 1, 2 and 3 ranks

// Trains `steps` steps from step `first` with the sharded or replicated optimizer.
void train_steps(MpiCommunicator& comm, TinyVit<Fp32>& model, MpiDP& dp, DistributedAdamW<MpiCommunicator>& opt,
                 int first, int steps) {
  const TinyVitConfig c;
  const BatchShard shard = batch_shard(kCheckpointBatch, comm.rank(), comm.size());
  for (int step = first; step < first + steps; ++step) {
    const Batch batch = testing::make_batch(c, kCheckpointBatch, 900 + static_cast<std::uint64_t>(step));
    opt.zero_grad();
    dp.begin_step();
    model.train_step(batch.images_of(shard.begin, shard.end), batch.labels_of(shard.begin, shard.end), step, &dp);
    dp.finish();
    opt.step(1e-3, 1.0);
  }
}

void checkpoint_write(const std::string& dir) {
  MpiCommunicator comm;
  const TinyVitConfig c;
  const BatchShard shard = batch_shard(kCheckpointBatch, comm.rank(), comm.size());
  HostContext ctx;
  TinyVit<Fp32> model(ctx, c, DpMode::Reversible, 12);
  MpiDP dp(comm, ctx, {.bucket_bytes = 3000, .sync = GradientSync::ReduceScatter});
  model.attach(dp, static_cast<std::uint64_t>(shard.begin));
  dp.finalize();
  DistributedAdamW<MpiCommunicator> opt(dp);
  train_steps(comm, model, dp, opt, 0, 3);
  save_training_state(dir + "/state.safetensors", opt, {{"written_by", "mpi_checkpoint_write"}});
  train_steps(comm, model, dp, opt, 3, 1);
  save_training_state(dir + "/after.safetensors", opt);
  CHECK(contains(error_of([&] { save_training_state(dir + "/no/such/dir/x.safetensors", opt); }),
                 comm.rank() == 0 ? "no/such/dir" : "rank 0 could not write"));
}

void checkpoint_load(const std::string& dir) {
  MpiCommunicator comm;
  const TinyVitConfig c;
  const BatchShard shard = batch_shard(kCheckpointBatch, comm.rank(), comm.size());
  HostContext ctx;
  TinyVit<Fp32> model(ctx, c, DpMode::Reversible, 12);  // the writer's seed: the same drop-path masks
  const GradientSync sync = comm.size() > 1 ? GradientSync::ReduceScatter : GradientSync::AllReduce;
  MpiDP dp(comm, ctx, {.bucket_bytes = 5000, .sync = sync});
  model.attach(dp, static_cast<std::uint64_t>(shard.begin));
  dp.finalize();
  DistributedAdamW<MpiCommunicator> opt(dp);
  for (const auto& p : dp.parameters()) std::fill(p.value.data(), p.value.data() + p.value.size(), 0.5f);
  load_training_state(dir + "/state.safetensors", opt);
  const auto file = io::SafetensorsReader::from_file(dir + "/state.safetensors");
  CHECK(opt.steps_taken() == 3);
  CHECK(file.metadata().at("optimizer.world_size") == "2");
  for (const auto& p : dp.parameters()) {
    const auto v = file.read<float>(p.name);
    CHECK(std::equal(v.begin(), v.end(), p.value.data()), p.name);
  }
  for (const auto& s : opt.segments()) {
    const auto& name = dp.parameters()[s.param].name;
    const auto m = file.read<float>(exp_avg_name(name));
    CHECK(std::equal(opt.first_moments() + s.state, opt.first_moments() + s.state + s.count,
                     m.begin() + static_cast<std::ptrdiff_t>(s.begin)),
          name);
  }
  train_steps(comm, model, dp, opt, 3, 1);
  const auto after = io::SafetensorsReader::from_file(dir + "/after.safetensors");
  double worst = 0;
  for (const auto& p : dp.parameters()) {
    const auto v = after.read<float>(p.name);
    worst = std::max(worst, testing::max_rel_diff(p.value.data(), v.data(), v.size()));
  }
  if (comm.rank() == 0)
    std::printf("written at 2 ranks, loaded at %d: the next step's parameters differ from the 2-rank run's by %.3g "
                "(relative)\n",
                comm.size(), worst);
  // One AdamW step from the same state: gradients that differ by rounding (other shards) move
  // elements whose gradient is rounding noise by up to lr (see adamw()); measured 1e-5 to 5e-5.
  CHECK(worst < 0.25 * 1e-3, worst);
  CHECK(same_on_every_rank(comm, values_of(model.parameters())));
}
#endif

}  // namespace

int main(int argc, char** argv) {
  MpiEnvironment env(&argc, &argv);
  g_rank = env.world_rank();
  const std::string which = argc > 1 ? argv[1] : "";
  const std::string dir = argc > 2 ? argv[2] : ".";
  try {
    if (which == "collectives") collectives();
    else if (which == "gradients") gradients();
    else if (which == "buckets") buckets();
    else if (which == "adamw") adamw();
    else if (which == "mismatch") mismatch();
    else if (which == "early_exit") early_exit();
    else if (which == "closed") closed();
#if DR2NET_TEST_HAVE_IO
    else if (which == "checkpoint_write") checkpoint_write(dir);
    else if (which == "checkpoint_load") checkpoint_load(dir);
#endif
    else {
      std::fprintf(stderr, "usage: dr2net_mpi_tests <case> [directory]; unknown case '%s'\n", which.c_str());
      return 2;
    }
  } catch (const std::exception& e) {
    std::printf("rank %d: FAILED with an unexpected error: %s\n", g_rank, e.what());
    ++g_failed;
  }
  std::printf("rank %d of %d, %s: %ld passed, %ld failed\n", g_rank, env.world_size(), which.c_str(), g_passed,
              g_failed);
  std::fflush(stdout);
  return g_failed == 0 ? 0 : 1;
}
