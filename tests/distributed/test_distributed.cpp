// Data parallelism in one process (no MPI needed): the stack's per-layer backward hook in
// every mode, masks keyed by the global sample index (R shards with sample offsets give the
// whole batch's gradients), the LocalCommunicator, the DataParallel driver's bookkeeping and
// errors, and DistributedAdamW against optim::AdamW bit for bit.

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "distributed/dp_model.hpp"
#include "support/tolerances.hpp"
#include "dr2net/distributed/communicator.hpp"
#include "dr2net/distributed/data_parallel.hpp"
#include "dr2net/distributed/sharded_adamw.hpp"
#include "dr2net/optim/adamw.hpp"
#if DR2NET_TEST_HAVE_IO
#include "dr2net/distributed/checkpoint.hpp"
#include "support/temp_dir.hpp"
#endif

using namespace dr2net;
using namespace dr2net::distributed;
using dr2net::testing::Batch;
using dr2net::testing::DpMode;
using dr2net::testing::TinyVit;
using dr2net::testing::TinyVitConfig;

namespace {

using LocalDP = DataParallel<LocalCommunicator, HostContext, float>;

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
  for (std::size_t i = 0; i < a.size(); ++i) w = std::max(w, testing::max_rel_diff(a[i].data(), b[i].data(), a[i].size()));
  return w;
}

// One process, the global batch in R shards with their sample offsets, gradients accumulated
// over the shards (each shard's loss weighted 1/R): the sum R ranks' average would give.
template <class P>
void shard_equivalence(DpMode mode, bool with_offsets, double& worst) {
  const TinyVitConfig c;
  const std::int64_t R = 3, B = 2;
  const Batch batch = testing::make_batch(c, R * B, 11);
  HostContext ctx;
  TinyVit<P> whole(ctx, c, mode, 5), parts(ctx, c, mode, 5);
  whole.zero_grad();
  whole.train_step(batch.images_of(0, R * B), batch.labels_of(0, R * B), 3);
  const auto ref = grads_of(whole.parameters());
  std::vector<std::vector<float>> sum;
  for (std::int64_t r = 0; r < R; ++r) {
    parts.zero_grad();
    parts.stack().set_sample_offset(with_offsets ? static_cast<std::uint64_t>(r * B) : 0);
    parts.train_step(batch.images_of(r * B, (r + 1) * B), batch.labels_of(r * B, (r + 1) * B), 3);
    const auto g = grads_of(parts.parameters());
    if (sum.empty()) sum.assign(g.size(), {});
    for (std::size_t i = 0; i < g.size(); ++i) {
      sum[i].resize(g[i].size(), 0.f);
      for (std::size_t k = 0; k < g[i].size(); ++k) sum[i][k] += g[i][k] / static_cast<float>(R);
    }
  }
  worst = worst_rel(sum, ref);
}

}  // namespace

TEST_CASE("the layer-backward hook runs once per layer, from the last, with final gradients, in every mode",
          "[distributed][hook]") {
  const TinyVitConfig c;
  const Batch batch = testing::make_batch(c, 4, 3);
  for (DpMode mode : {DpMode::Reversible, DpMode::Exact, DpMode::ErrorBounded, DpMode::Standard}) {
    for (bool fallback : {false, true}) {
      CAPTURE(testing::dp_mode_name(mode), fallback);
      HostContext ctx;
      auto run = [&](auto& model) {
        if (fallback) model.stack().set_guard({.action = GuardAction::Fallback});
        std::vector<int> order;
        std::vector<std::vector<std::vector<float>>> at_hook(static_cast<std::size_t>(c.layers));
        auto& stack = model.stack();
        stack.set_layer_backward_hook([&](int l) {
          order.push_back(l);
          std::vector<std::vector<float>> g;
          stack.layer(l).for_each_parameter("", [&](std::string_view, TensorView<float> v, TensorView<float> gr) {
            (void)v;
            g.emplace_back(gr.data(), gr.data() + gr.size());
          });
          at_hook[static_cast<std::size_t>(l)] = std::move(g);
        });
        model.zero_grad();
        model.train_step(batch.images_of(0, 4), batch.labels_of(0, 4), 0);
        REQUIRE(order == std::vector<int>{2, 1, 0});
        for (int l = 0; l < c.layers; ++l) {  // nothing changed a layer's gradients after its hook
          std::size_t i = 0;
          stack.layer(l).for_each_parameter("", [&](std::string_view, TensorView<float>, TensorView<float> gr) {
            const auto& h = at_hook[static_cast<std::size_t>(l)][i++];
            CHECK(std::equal(h.begin(), h.end(), gr.data()));
          });
        }
        stack.set_layer_backward_hook({});
        model.train_step(batch.images_of(0, 4), batch.labels_of(0, 4), 1);
        CHECK(order.size() == 3);  // removed
      };
      if (mode == DpMode::Exact) {
        TinyVit<FixedFp32> m(ctx, c, mode, 1);
        run(m);
      } else {
        TinyVit<Fp32> m(ctx, c, mode, 1);
        run(m);
      }
    }
  }
}

TEST_CASE("masks keyed by the global sample: R shards with sample offsets give the whole batch's gradients",
          "[distributed][randomness]") {
  for (DpMode mode : {DpMode::Reversible, DpMode::Exact, DpMode::ErrorBounded, DpMode::Standard}) {
    CAPTURE(testing::dp_mode_name(mode));
    double with = 0, without = 0;
    if (mode == DpMode::Exact) {
      shard_equivalence<FixedFp32>(mode, true, with);
      shard_equivalence<FixedFp32>(mode, false, without);
    } else {
      shard_equivalence<Fp32>(mode, true, with);
      shard_equivalence<Fp32>(mode, false, without);
    }
    CAPTURE(with, without);
    // fp32 rounding of differently shaped GEMMs and sums: the function tolerance of fp32
    CHECK(with < dr2net::testing::tolerances(dr2net::testing::PrecisionKind::Fp32).function.rtol);
    CHECK(without > 1e-2);   // without offsets the shards redraw the first samples' masks
  }
}

TEST_CASE("drop masks with a sample offset are the whole batch's masks of those samples", "[distributed][randomness]") {
  HostContext ctx;
  for (std::uint64_t offset : {std::uint64_t{0}, std::uint64_t{3}, std::uint64_t{250}, std::uint64_t{1000}}) {
    const ModuleCall<HostContext> whole{ctx, 5, 7, 99, true, 0};
    const ModuleCall<HostContext> part{ctx, 5, 7, 99, true, offset};
    const std::uint64_t E = 13;
    const auto w = make_drop_scale<double>(whole, 0.4, 0.3, RandomPurpose::OutputDropout, E);
    const auto p = make_drop_scale<double>(part, 0.4, 0.3, RandomPurpose::OutputDropout, E);
    for (std::uint64_t i = 0; i < 300 * E; i += 7) REQUIRE(p(i) == w(offset * E + i));
    double f8[8], g8[8];
    p.factors<8>(5, f8);
    for (int j = 0; j < 8; ++j) g8[j] = w(offset * E + 5 + static_cast<std::uint64_t>(j));
    CHECK(std::equal(f8, f8 + 8, g8));
  }
}

TEST_CASE("LocalCommunicator: a world of one, and no use after close", "[distributed][comm]") {
  LocalCommunicator comm;
  static_assert(Communicator<LocalCommunicator>);
  CHECK(comm.rank() == 0);
  CHECK(comm.size() == 1);
  std::vector<double> a{1.5, -2.0, 3.25}, b(3, 0.0);
  comm.all_reduce(a.data(), a.size(), ReduceOp::Average).wait();
  CHECK(a == std::vector<double>{1.5, -2.0, 3.25});
  comm.reduce_scatter(a.data(), b.data(), 3, ReduceOp::Sum).wait();
  CHECK(b == a);
  comm.all_gather(a.data(), a.data(), 3).wait();
  comm.broadcast(a.data(), 3, 0).wait();
  comm.barrier();
  std::int64_t k = 4;
  CHECK_THROWS_WITH(comm.all_reduce(&k, 1, ReduceOp::Average), Catch::Contains("floating-point"));
  CHECK_THROWS_WITH(comm.broadcast(a.data(), 3, 1), Catch::Contains("rank 1"));
  comm.close();
  CHECK(comm.closed());
  CHECK_THROWS_WITH(comm.all_reduce(a.data(), 3, ReduceOp::Sum),
                    Catch::Contains("all_reduce (sum) of 24 bytes (3 double)") && Catch::Contains("after close()"));
  CHECK_THROWS_WITH(comm.barrier(), Catch::Contains("barrier") && Catch::Contains("after close()"));
}

TEST_CASE("DataParallel in a world of one: buckets, timeline, unchanged gradients, and its errors",
          "[distributed][driver]") {
  const TinyVitConfig c;
  const Batch batch = testing::make_batch(c, 4, 8);
  HostContext ctx;
  LocalCommunicator comm;
  for (std::size_t bucket_bytes : {std::size_t{1}, std::size_t{4096}, std::size_t{1} << 30}) {
    CAPTURE(bucket_bytes);
    TinyVit<Fp32> model(ctx, c, DpMode::Reversible, 2), plain(ctx, c, DpMode::Reversible, 2);
    LocalDP dp(comm, ctx, {.bucket_bytes = bucket_bytes});
    model.attach(dp, 0);
    CHECK(dp.num_groups() == 2 + c.layers);
    dp.finalize();
    if (bucket_bytes == 1) CHECK(dp.buckets().size() == static_cast<std::size_t>(2 + c.layers));
    if (bucket_bytes == (std::size_t{1} << 30)) CHECK(dp.buckets().size() == 1);
    model.zero_grad();
    plain.zero_grad();
    dp.begin_step();
    double stack_end = -1;
    model.train_step(batch.images_of(0, 4), batch.labels_of(0, 4), 0, &dp, &stack_end);
    dp.finish();
    plain.train_step(batch.images_of(0, 4), batch.labels_of(0, 4), 0);
    CHECK(worst_rel(grads_of(model.parameters()), grads_of(plain.parameters())) == 0.0);  // averaged over 1
    const StepTimeline& t = dp.timeline();
    CHECK(t.launched_before_backward_end() == static_cast<int>(dp.buckets().size()));
    if (bucket_bytes == 1) {  // head and every layer went out before the stack's backward returned
      for (std::size_t k = 0; k + 1 < t.buckets.size(); ++k) {
        CHECK(t.buckets[k].launched <= stack_end);
        CHECK(t.buckets[k].launched <= t.buckets[k + 1].launched);
      }
    }
    CHECK(t.hidden_fraction() >= 0.0);
    CHECK(t.hidden_fraction() <= 1.0);
  }

  SECTION("a group marked twice, a group never marked, use outside a step") {
    TinyVit<Fp32> model(ctx, c, DpMode::Standard, 2);
    LocalDP dp(comm, ctx);
    model.attach(dp, 0);
    CHECK_THROWS_WITH(dp.begin_step(), Catch::Contains("before finalize()"));
    dp.finalize();
    CHECK_THROWS_WITH(dp.mark_ready(0), Catch::Contains("outside a step"));
    dp.begin_step();
    dp.mark_ready(0);
    CHECK_THROWS_WITH(dp.mark_ready(0), Catch::Contains("group 'head' was marked ready twice in step 1"));
    CHECK_THROWS_WITH(dp.finish(), Catch::Contains("no gradients were marked ready for 'stack layer 2'") &&
                                       Catch::Contains("'embedding'"));
    dp.begin_step();  // finish() ended the failed step
    CHECK_THROWS_WITH(dp.mark_ready(99), Catch::Contains("no such group"));
  }
  SECTION("registration errors") {
    TinyVit<Fp32> model(ctx, c, DpMode::Standard, 2);
    LocalDP dp(comm, ctx);
    CHECK_THROWS_WITH(dp.finalize(), Catch::Contains("no parameters were registered"));
    CHECK_THROWS_WITH(dp.add_group("empty", {}), Catch::Contains("no parameters"));
    model.attach(dp, 0);
    dp.add_group("again", model.parameters());
    CHECK_THROWS_WITH(dp.finalize(), Catch::Contains("was registered twice"));
    CHECK_THROWS_WITH(LocalDP(comm, ctx, {.bucket_bytes = 0}), Catch::Contains("bucket_bytes"));
  }
  SECTION("a stack whose driver is gone says so") {
    TinyVit<Fp32> model(ctx, c, DpMode::Reversible, 2);
    {
      LocalDP dp(comm, ctx);
      model.attach(dp, 0);
      dp.finalize();
    }
    CHECK_THROWS_WITH(model.train_step(batch.images_of(0, 4), batch.labels_of(0, 4), 0),
                      Catch::Contains("after its DataParallel driver was destroyed"));
  }
  SECTION("batch shards") {
    CHECK(batch_shard(12, 2, 3).begin == 8);
    CHECK(batch_shard(12, 2, 3).end == 12);
    CHECK_THROWS_WITH(batch_shard(10, 0, 3), Catch::Contains("does not split into 3 equal shards"));
    CHECK_THROWS_WITH(batch_shard(10, 3, 3), Catch::Contains("rank 3 of a world of 3"));
  }
}

TEST_CASE("DistributedAdamW in a world of one equals optim::AdamW bit for bit, replicated and sharded",
          "[distributed][adamw]") {
  const TinyVitConfig c;
  HostContext ctx;
  LocalCommunicator comm;
  for (GradientSync sync : {GradientSync::AllReduce, GradientSync::ReduceScatter}) {
    CAPTURE(static_cast<int>(sync));
    TinyVit<Fp32> model(ctx, c, DpMode::Reversible, 4), plain(ctx, c, DpMode::Reversible, 4);
    LocalDP dp(comm, ctx, {.bucket_bytes = 2048, .sync = sync});
    model.attach(dp, 0);
    dp.finalize();
    const std::size_t other0 = ctx.meter().current(MemoryCategory::Other);
    DistributedAdamW<LocalCommunicator> opt(dp, {.lr = 3e-3, .weight_decay = 0.05});
    const std::size_t state = ctx.meter().current(MemoryCategory::Other) - other0;
    optim::AdamW<float> ref(ctx, plain.parameters(), {.lr = 3e-3, .weight_decay = 0.05});
    std::size_t elements = 0;
    for (const auto& p : model.parameters()) elements += p.value.size();
    CHECK(opt.sharded() == (sync == GradientSync::ReduceScatter));
    CHECK(opt.state_bytes() == 2 * elements * sizeof(float));  // world of one: nothing to split
    CHECK(state >= opt.state_bytes());
    for (int step = 0; step < 5; ++step) {
      const Batch batch = testing::make_batch(c, 4, 100 + static_cast<std::uint64_t>(step));
      opt.zero_grad();
      dp.begin_step();
      model.train_step(batch.images_of(0, 4), batch.labels_of(0, 4), step, &dp);
      dp.finish();
      const double n1 = opt.step(3e-3, 0.5);
      plain.zero_grad();
      plain.train_step(batch.images_of(0, 4), batch.labels_of(0, 4), step);
      const double n2 = optim::clip_grad_norm(plain.parameters(), 0.5);
      ref.step(3e-3);
      CHECK(n1 == Approx(n2).epsilon(1e-12));  // one norm, summed in another order
    }
    CHECK(values_of(model.parameters()) == values_of(plain.parameters()));
    CHECK(opt.steps_taken() == 5);
  }
}

#if DR2NET_TEST_HAVE_IO
TEST_CASE("a training-state checkpoint round trip in a world of one", "[distributed][checkpoint]") {
  const TinyVitConfig c;
  HostContext ctx;
  LocalCommunicator comm;
  dr2net::testing::TempDir dir;
  const std::string path = dir.file("state.safetensors");
  TinyVit<Fp32> a(ctx, c, DpMode::Reversible, 4), b(ctx, c, DpMode::Reversible, 9);
  LocalDP dpa(comm, ctx, {.sync = GradientSync::ReduceScatter}), dpb(comm, ctx);
  a.attach(dpa, 0);
  b.attach(dpb, 0);
  dpa.finalize();
  dpb.finalize();
  DistributedAdamW<LocalCommunicator> oa(dpa), ob(dpb);
  for (int step = 0; step < 2; ++step) {
    const Batch batch = testing::make_batch(c, 4, 7 + static_cast<std::uint64_t>(step));
    oa.zero_grad();
    dpa.begin_step();
    a.train_step(batch.images_of(0, 4), batch.labels_of(0, 4), step, &dpa);
    dpa.finish();
    oa.step(1e-3);
  }
  save_training_state(path, oa, {{"note", "test"}});
  load_training_state(path, ob);
  CHECK(ob.steps_taken() == 2);
  CHECK(values_of(a.parameters()) == values_of(b.parameters()));
  CHECK(std::equal(oa.first_moments(), oa.first_moments() + oa.state_elements(), ob.first_moments()));
  CHECK(std::equal(oa.second_moments(), oa.second_moments() + oa.state_elements(), ob.second_moments()));
  TinyVitConfig other = c;
  other.layers = 2;
  TinyVit<Fp32> small(ctx, other, DpMode::Reversible, 4);
  LocalDP dps(comm, ctx);
  small.attach(dps, 0);
  dps.finalize();
  DistributedAdamW<LocalCommunicator> os(dps);
  TinyVitConfig wide = c;
  wide.hidden = 48;
  TinyVit<Fp32> w(ctx, wide, DpMode::Reversible, 4);
  LocalDP dpw(comm, ctx);
  w.attach(dpw, 0);
  dpw.finalize();
  DistributedAdamW<LocalCommunicator> ow(dpw);
  CHECK_THROWS_WITH(load_training_state(path, ow), Catch::Contains("does not match the model (nothing was loaded)") &&
                                                       Catch::Contains("blocks.0.mlp.fc1.weight"));
  CHECK_NOTHROW(load_training_state(path, os));  // a file with more tensors than the model needs
}
#endif
