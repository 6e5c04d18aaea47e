// 02_vit_finetune: pretrain a small ViT on Fashion-MNIST classes 0-4, save it as a timm-named
// safetensors checkpoint, then finetune it on classes 5-9 twice from that file:
//
//   (a) standard finetuning: (alpha, beta) = (1, 0), BackpropMode::Standard. This is exactly
//       the pretrained network, trained with ordinary backprop that stores every activation.
//   (b) Dr²Net finetuning: the paper's schedule from (1, 0.1) to (0, 1), reached at 2/3 of the
//       steps, in BackpropMode::ErrorBounded: activations are reconstructed from the output,
//       with stream snapshots only where fp32 reconstruction error would exceed its stream
//       tolerance (the guard redoes a step with more snapshots if it ever does).
//   (c) Dr²Net exact: the same schedule with fixed-point streams (dr2net::FixedFp32): every
//       activation is reconstructed bit for bit, so the gradients are those of standard
//       backprop of the same network; a few side bits per element are kept where |beta| < 1.
//
// With --proximity, two more exact runs at a constant (1, 0.1) and (1, 0.01): closer to the
// pretrained network than the paper's schedule can afford, which exactness makes possible.
//
// Same seed, same data order, same optimizer (AdamW, weight decay 0.05, warmup + cosine
// learning rate, gradient clipping at 1.0) for both. At the end a table compares test
// accuracy, peak activation and total memory (each run has its own HostContext, so the
// peaks are per run) and time per step.
//
// Defaults: ViT with 7x7 patches (17 tokens), D = 64, 4 heads, MLP 128, 4 layers, batch 64;
// pretraining on all 30 000 images of classes 0-4 for 3 epochs (lr 1e-3), finetuning on
// 10 000 images of classes 5-9 for 5 epochs (780 steps, lr 1e-3), tested on the 5 000 test
// images of classes 5-9. About 2.5 minutes on a quiet 2-core CPU, 3.5 under load (Release).
//
// Data: the Debian package dataset-fashion-mnist (see --help).
//
// Data parallel: built with MPI (dr2net::mpi) and started by an MPI launcher (mpirun -np N,
// srun), every training stage runs on N ranks: each holds the whole model and images
// [r B / N, (r + 1) B / N) of every global batch of B (the same batches, in the same order, as
// one process), and dr2net::distributed::DataParallel averages the gradients over the ranks
// while the backward runs. Rank 0 prints the progress and the table and writes the checkpoint;
// the others print only errors. Without a launcher it is the one-process program above.
// Give each rank cores / N threads (OMP_NUM_THREADS, DR2NET_NUM_THREADS); docs/distributed.md.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include <dr2net/data/fashion_mnist.hpp>
#include <dr2net/distributed/communicator.hpp>
#include <dr2net/distributed/data_parallel.hpp>
#include <dr2net/dr2net.hpp>
#include <dr2net/io/paths.hpp>
#include <dr2net/optim/adamw.hpp>
#include <dr2net/optim/lr_schedule.hpp>

#ifdef DR2NET_HAVE_MPI
#include <dr2net/distributed/mpi_communicator.hpp>
#endif

#include "cli.hpp"
#include "vit_classifier.hpp"

namespace {

namespace dist = dr2net::distributed;

using dr2net::data::LabelledImages;
using example::VitClassifier;

struct Options {
  std::string data_dir = std::string(dr2net::data::kFashionMnistDefaultDir);
  std::string checkpoint =
      (std::filesystem::temp_directory_path() / "dr2net-vit-fashion-mnist-0to4.safetensors").string();
  std::int64_t pretrain_subset = 30000;  // of the 30 000 training images of classes 0-4
  std::int64_t train_subset = 10000;     // of the 30 000 training images of classes 5-9
  int pretrain_epochs = 3;
  int finetune_epochs = 5;
  std::int64_t batch = 64;
  double finetune_lr = 1e-3;
  std::uint64_t seed = 1;
  bool skip_pretrain = false;
  bool proximity = false;
};

// Parses the command line; nullopt: run, otherwise the exit status (0 after --help, 2 after
// a usage error, which names the flag).
std::optional<int> parse(int argc, char** argv, Options& o) {
  CLI::App app("Pretrains a small ViT on Fashion-MNIST classes 0-4, saves it as a timm-named checkpoint, then "
               "finetunes it on classes 5-9 with standard backprop and with Dr2Net, side by side.",
               "02_vit_finetune");
  using dr2net_cli::add_integer;
  constexpr std::int64_t kImages = 1000000000;
  app.add_option("--data", o.data_dir, "Fashion-MNIST directory (apt-get install dataset-fashion-mnist)")
      ->capture_default_str();
  app.add_option("--out", o.checkpoint, "where the pretrained checkpoint is written and read back")->capture_default_str();
  add_integer(app, "--pretrain-subset", o.pretrain_subset, std::int64_t{1}, kImages,
              "training images of classes 0-4 used for pretraining (30000: all)");
  add_integer(app, "--train-subset", o.train_subset, std::int64_t{1}, kImages,
              "training images of classes 5-9 used for finetuning");
  add_integer(app, "--pretrain-epochs", o.pretrain_epochs, 1, 1000000, "pretraining epochs");
  add_integer(app, "--finetune-epochs", o.finetune_epochs, 1, 1000000, "finetuning epochs of every run");
  add_integer(app, "--batch", o.batch, std::int64_t{1}, std::int64_t{1} << 20, "batch size");
  app.add_option("--finetune-lr", o.finetune_lr, "peak learning rate of the finetuning runs")
      ->check(dr2net_cli::positive())
      ->capture_default_str();
  add_integer(app, "--seed", o.seed, std::uint64_t{0}, std::numeric_limits<std::uint64_t>::max(), "random seed");
  app.add_flag("--skip-pretrain", o.skip_pretrain, "finetune from an existing checkpoint at --out instead of pretraining");
  app.add_flag("--proximity", o.proximity, "also finetune exactly at a constant (1, 0.1) and (1, 0.01)");
  return dr2net_cli::parse(app, argc, argv);
}

// The data files `--out` must not be (pretraining writes the checkpoint there).
void require_checkpoint_apart_from_data(const Options& o) {
  for (std::string_view name : dr2net::data::kFashionMnistFiles)
    dr2net::io::require_distinct_output("--out", o.checkpoint,
                                        {{"--data", std::filesystem::path(o.data_dir) / name}});
}

// The checkpoint's patch embedding must fit the data: images of `set`'s size, one channel.
void require_embedding_fits(const example::ModelConfig& c, const std::string& checkpoint, const LabelledImages& set,
                            const std::string& data_dir) {
  DR2NET_CHECK(c.channels == 1 && c.image == set.height && c.image == set.width, "checkpoint '", checkpoint,
               "' embeds ", c.image, "x", c.image, " images of ", c.channels, " channel(s) in patches of ", c.patch,
               " (patch_embed.proj.weight, pos_embed), but the data in '", data_dir, "' are ", set.height, "x",
               set.width, " images of 1 channel");
}

// Fashion-MNIST's pixel mean and standard deviation (of the training set, on [0, 1]).
constexpr float kPixelMean = 0.2860f, kPixelStd = 0.3530f;

// Images `indices` of `set` as normalised floats [B, 1, H, W] and their labels.
void gather(const LabelledImages& set, std::span<const std::int64_t> indices, std::vector<float>& images,
            std::vector<std::int32_t>& labels) {
  const auto ppi = static_cast<std::size_t>(set.pixels_per_image());
  images.resize(indices.size() * ppi);
  labels.resize(indices.size());
  for (std::size_t b = 0; b < indices.size(); ++b) {
    const std::uint8_t* p = set.image(indices[b]);
    for (std::size_t k = 0; k < ppi; ++k)
      images[b * ppi + k] = (static_cast<float>(p[k]) / 255.0f - kPixelMean) / kPixelStd;
    labels[b] = set.labels[static_cast<std::size_t>(indices[b])];
  }
}

// The sum of `v` over the ranks (every rank calls it; a world of one: v).
template <class Comm, class T>
T sum_over_ranks(Comm& comm, T v) {
  comm.all_reduce(&v, 1, dist::ReduceOp::Sum).wait();
  return v;
}

// Test accuracy in percent, batch by batch (the last batch may be smaller); with several ranks
// rank r predicts batches r, r + N, ... and the counts are summed (every rank calls it).
template <class Model, class Comm>
double evaluate(Model& model, const LabelledImages& set, std::int64_t batch, std::int64_t step, Comm& comm) {
  std::vector<float> images;
  std::vector<std::int32_t> labels;
  std::vector<std::int64_t> idx;
  std::int64_t correct = 0;
  for (std::int64_t start = 0, k = 0; start < set.size(); start += batch, ++k) {
    if (k % comm.size() != comm.rank()) continue;
    idx.clear();
    for (std::int64_t i = start; i < std::min(set.size(), start + batch); ++i) idx.push_back(i);
    gather(set, idx, images, labels);
    correct += model.predict_correct(images, labels, step);
  }
  correct = sum_over_ranks(comm, correct);
  return 100.0 * static_cast<double>(correct) / static_cast<double>(set.size());
}

struct TrainConfig {
  int epochs = 1;
  std::int64_t batch = 64;
  double lr = 1e-3;
  double weight_decay = 0.05;
  double warmup_fraction = 0.1;
  double clip = 1.0;
  std::uint64_t seed = 1;
  std::int64_t window_step = -1;  // also measure peaks from this step on (-1: no second window)
};

struct TrainResult {
  std::int64_t steps = 0;
  double seconds = 0;  // wall time of the training steps
  std::size_t peak_activation = 0, peak_total = 0;        // whole training run
  std::size_t window_activation = 0, window_total = 0;    // from window_step on
  std::size_t side_bits = 0;                               // peak side-bit bytes (exact mode)
};

// One progress line per epoch, redrawn in place on a terminal and printed once otherwise.
class Progress {
 public:
  explicit Progress(const char* label) : label_(label), tty_(isatty(fileno(stdout)) != 0) {}
  void update(int epoch, int epochs, std::int64_t done, std::int64_t total, double loss, double acc,
              dr2net::Coefficients c, int snapshots, double steps_per_s, bool end) {
    if (!end && (!tty_ || done % 5 != 0)) return;
    constexpr int kWidth = 24;
    const int filled = static_cast<int>(kWidth * done / std::max<std::int64_t>(total, 1));
    std::string bar(static_cast<std::size_t>(filled), '#');
    bar.append(static_cast<std::size_t>(kWidth - filled), '.');
    std::printf("%s%-9s epoch %d/%d [%s] %3lld%%  loss %.4f  acc %5.1f%%  alpha %.2f beta %.2f  snapshots %d  %5.1f steps/s",
                tty_ ? "\r" : "", label_, epoch, epochs, bar.c_str(), static_cast<long long>(100 * done / total), loss,
                acc, c.alpha, c.beta, snapshots, steps_per_s);
    if (end) std::printf("\n");
    std::fflush(stdout);
  }

 private:
  const char* label_;
  bool tty_;
};

// Trains `model` for tc.epochs over `set`. On several ranks each trains on its shard of every
// global batch of tc.batch and a DataParallel driver averages the gradients over the ranks as
// the backward produces them, so every rank clips and steps on the whole batch's gradients
// (identical on every rank: the clipping norm needs no further communication).
template <class Model, class Comm>
TrainResult train(Model& model, dr2net::HostContext& ctx, const LabelledImages& set, const TrainConfig& tc,
                  const char* label, Comm& comm) {
  auto params = model.parameters();
  dr2net::optim::AdamW<float> opt(ctx, params, {.lr = tc.lr, .weight_decay = tc.weight_decay});
  const std::int64_t per_epoch = set.size() / tc.batch;
  DR2NET_CHECK(per_epoch > 0, "the training set (", set.size(), " images) is smaller than one batch of ", tc.batch);
  const std::int64_t total = per_epoch * tc.epochs;
  const dr2net::optim::WarmupCosine lr({.base_lr = tc.lr,
                                        .warmup_steps = static_cast<std::int64_t>(tc.warmup_fraction * static_cast<double>(total)),
                                        .total_steps = total});
  const dist::BatchShard shard = dist::batch_shard(tc.batch, comm.rank(), comm.size());
  // One process needs no driver (its gradients are the whole batch's already).
  std::optional<dist::DataParallel<Comm, dr2net::HostContext>> dp;
  if (comm.size() > 1) {
    dp.emplace(comm, ctx);
    model.attach(*dp, static_cast<std::uint64_t>(shard.begin));
    dp->finalize();  // checks that every rank built the same model; rank 0's parameters everywhere
  }
  std::vector<float> images;
  std::vector<std::int32_t> labels;
  TrainResult result;
  Progress progress(label);
  ctx.meter().reset_peaks();  // parameters, gradients and optimizer state are in the window already
  std::int64_t step = 0;
  for (int epoch = 0; epoch < tc.epochs; ++epoch) {
    const auto order = dr2net::data::shuffled_indices(set.size(), dr2net::mix_seed(tc.seed, static_cast<std::uint64_t>(epoch)));
    double loss_sum = 0;
    std::int64_t correct = 0, seen = 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (std::int64_t s = 0; s < per_epoch; ++s, ++step) {
      if (step == tc.window_step) {
        result.peak_activation = ctx.meter().peak_activation();
        result.peak_total = ctx.meter().peak_total();
        ctx.meter().reset_peaks();
      }
      gather(set,
             std::span(order).subspan(static_cast<std::size_t>(s * tc.batch + shard.begin),
                                      static_cast<std::size_t>(shard.size())),
             images, labels);
      opt.zero_grad();
      example::StepResult r;
      if (dp) {
        dp->begin_step();
        r = model.train_step(images, labels, step, &*dp);
        dp->finish();  // every rank's gradients: the average over the ranks
      } else {
        r = model.train_step(images, labels, step);
      }
      // The whole batch's mean loss (equal shards: the mean of the ranks' means) and correct count.
      const double loss = sum_over_ranks(comm, r.loss) / static_cast<double>(comm.size());
      const std::int64_t batch_correct = sum_over_ranks(comm, r.correct);
      const double norm = dr2net::optim::clip_grad_norm(params, tc.clip);
      DR2NET_CHECK(std::isfinite(norm) && std::isfinite(loss), label, ": non-finite loss ", loss,
                   " or gradient norm ", norm, " at step ", step);
      opt.step(lr(step));
      loss_sum += loss;
      correct += batch_correct;
      seen += tc.batch;
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      progress.update(epoch + 1, tc.epochs, s + 1, per_epoch, loss_sum / static_cast<double>(s + 1),
                      100.0 * static_cast<double>(correct) / static_cast<double>(seen),
                      model.stack().coefficients(step, 0), model.stack().reconstruction().snapshots,
                      static_cast<double>(s + 1) / secs, s + 1 == per_epoch);
    }
    result.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  if (dp) model.detach();
  result.steps = total;
  result.side_bits = ctx.meter().peak(dr2net::MemoryCategory::SideBits);
  if (tc.window_step >= 0 && tc.window_step < total) {
    result.window_activation = ctx.meter().peak_activation();
    result.window_total = ctx.meter().peak_total();
    result.peak_activation = std::max(result.peak_activation, result.window_activation);
    result.peak_total = std::max(result.peak_total, result.window_total);
  } else {
    result.peak_activation = ctx.meter().peak_activation();
    result.peak_total = ctx.meter().peak_total();
  }
  return result;
}

// One finetuning run of the side-by-side table.
struct Run {
  const char* label;   // progress lines
  const char* column;  // table heading
  dr2net::AnySchedule schedule;
  dr2net::BackpropMode mode;
  bool exact = false;  // fixed-point streams (dr2net::FixedFp32)
  TrainResult result{};
  double test_accuracy = 0;
};

double mib(std::size_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

// Finetunes one model of precision P from the checkpoint and fills in r's results.
template <class P, class Comm>
void finetune(Run& r, const example::ModelConfig& fc, const dr2net::StackOptions& so,
              const dr2net::io::SafetensorsReader& file, const LabelledImages& train_set, const LabelledImages& test_set,
              const TrainConfig& tc, const Options& o, std::int64_t total, Comm& comm) {
  dr2net::HostContext ctx;  // one per run: its meter's peaks are this run's alone
  VitClassifier<P> model(ctx, fc, r.schedule, so, o.seed);
  model.load_backbone(file);
  model.head().reset_classifier(fc.classes, dr2net::mix_seed(o.seed, 77));
  r.result = train(model, ctx, train_set, tc, r.label, comm);
  r.test_accuracy = evaluate(model, test_set, o.batch, total, comm);
}

// Runs `write` on rank 0 alone and makes every rank agree on the outcome (collective): rank 0
// rethrows its error, the others throw one naming rank 0, so that no rank goes on to read a
// file that was never written.
template <class Comm, class Write>
void on_rank_zero(Comm& comm, const char* what, Write&& write) {
  std::exception_ptr error;
  std::int32_t failed = 0;
  if (comm.rank() == 0) {
    try {
      write();
    } catch (...) {
      error = std::current_exception();
      failed = 1;
    }
  }
  comm.broadcast(&failed, 1, 0).wait();
  if (error) std::rethrow_exception(error);
  DR2NET_CHECK(failed == 0, "rank 0 could not ", what, " (its error says why)");
}

template <class Comm>
int run(const Options& o, Comm& comm) {
  const auto wall0 = std::chrono::steady_clock::now();
  DR2NET_CHECK(o.batch % comm.size() == 0, "--batch ", o.batch, " does not split into ", comm.size(),
               " equal shards, one per rank: make it a multiple of the number of ranks");
  // A file that is not there at all gets the installation hint; anything else wrong with the
  // files (a directory in a file's place, a damaged file) is load_fashion_mnist's to report.
  if (const auto missing = dr2net::data::missing_fashion_mnist_files(o.data_dir);
      !missing.empty() && !std::filesystem::exists(missing.front())) {
    std::fprintf(stderr,
                 "Fashion-MNIST not found (%s is missing): apt-get install dataset-fashion-mnist, or pass --data DIR\n",
                 missing.front().c_str());
    return 1;
  }
  const auto fmnist = dr2net::data::load_fashion_mnist(o.data_dir);
  const auto pre_train =
      dr2net::data::deterministic_subset(dr2net::data::select_classes(fmnist.train, 0, 4), o.pretrain_subset, o.seed);
  const auto pre_test = dr2net::data::select_classes(fmnist.test, 0, 4);
  const auto fine_train =
      dr2net::data::deterministic_subset(dr2net::data::select_classes(fmnist.train, 5, 9), o.train_subset, o.seed + 1);
  const auto fine_test = dr2net::data::select_classes(fmnist.test, 5, 9);

  example::ModelConfig mc;
  mc.image = fmnist.train.height;
  DR2NET_CHECK(fmnist.train.height == fmnist.train.width && fmnist.train.height % mc.patch == 0, "Fashion-MNIST in '",
               o.data_dir, "' (", dr2net::data::kFashionMnistFiles[0], "): images are ", fmnist.train.height, "x",
               fmnist.train.width, "; this example's ViT needs square images whose side is a multiple of its patch ",
               mc.patch);
  // Checked before anything runs: a test set without images would report an accuracy of NaN,
  // and a training set smaller than one batch would fail only once its stage began.
  struct UsedSet {
    const char* what;
    const LabelledImages* set;
    std::size_t file;  // index into kFashionMnistFiles
    bool trained;
  };
  for (const UsedSet& u : {UsedSet{"training images of classes 0-4", &pre_train, 0, true},
                           UsedSet{"test images of classes 0-4", &pre_test, 2, false},
                           UsedSet{"training images of classes 5-9", &fine_train, 0, true},
                           UsedSet{"test images of classes 5-9", &fine_test, 2, false}}) {
    if (o.skip_pretrain && (u.set == &pre_train || u.set == &pre_test)) continue;
    DR2NET_CHECK(u.set->size() > 0, "Fashion-MNIST in '", o.data_dir, "' (", dr2net::data::kFashionMnistFiles[u.file],
                 ") holds no ", u.what);
    DR2NET_CHECK(!u.trained || u.set->size() >= o.batch, "--batch ", o.batch, " is larger than the ", u.set->size(), " ",
                 u.what, " in '", o.data_dir, "'");
  }
  std::printf("dr2net 02_vit_finetune: ViT %lldx%lld images, patch %lld (%lld tokens), D = %lld, %lld heads, MLP %lld, "
              "%d layers; host GEMM: %s\n",
              static_cast<long long>(mc.image), static_cast<long long>(mc.image), static_cast<long long>(mc.patch),
              static_cast<long long>((mc.image / mc.patch) * (mc.image / mc.patch) + 1), static_cast<long long>(mc.dim),
              static_cast<long long>(mc.heads), static_cast<long long>(mc.hidden), mc.layers,
              std::string(dr2net::host_gemm_backend()).c_str());
  if (comm.size() > 1)
    std::printf("data parallel: %d ranks, each training on %lld images of every batch of %lld "
                "(memory figures are rank 0's, times are per global step)\n",
                comm.size(), static_cast<long long>(o.batch / comm.size()), static_cast<long long>(o.batch));

  // ---- stage 1: pretraining on classes 0-4, standard backprop at (1, 0) ----
  if (o.skip_pretrain) {
    std::printf("\nstage 1 skipped (--skip-pretrain): using %s\n", o.checkpoint.c_str());
  } else {
    std::printf("\nstage 1: pretraining on classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat), %lld images\n",
                static_cast<long long>(pre_train.size()));
    dr2net::HostContext ctx;
    VitClassifier<> model(ctx, mc, dr2net::AnySchedule(dr2net::ConstantSchedule(1.0, 0.0)),
                        {.mode = dr2net::BackpropMode::Standard, .seed = o.seed}, o.seed);
    train(model, ctx, pre_train, {.epochs = o.pretrain_epochs, .batch = o.batch, .lr = 1e-3, .seed = o.seed}, "pretrain",
          comm);
    std::printf("pretrained test accuracy on classes 0-4: %.2f %%\n", evaluate(model, pre_test, o.batch, 0, comm));
    on_rank_zero(comm, "write the pretrained checkpoint", [&] { model.save(o.checkpoint); });
    std::printf("saved %s\n", o.checkpoint.c_str());
  }

  // ---- stage 2: finetuning on classes 5-9 from the checkpoint, twice ----
  const auto file = dr2net::io::SafetensorsReader::from_file(o.checkpoint);
  example::ModelConfig fc = example::infer_model_config(file);
  require_embedding_fits(fc, o.checkpoint, fmnist.train, o.data_dir);
  fc.classes = 5;  // classes 5-9 relabelled 0-4, a new head
  const std::int64_t per_epoch = fine_train.size() / o.batch;
  const std::int64_t total = per_epoch * o.finetune_epochs;
  const std::int64_t transition = std::max<std::int64_t>(1, 2 * total / 3);  // (0, 1) reached here
  const std::int64_t eta = std::max<std::int64_t>(1, transition / 10);       // 10 equal changes
  std::printf("\nstage 2: finetuning on classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) from %s,\n"
              "         %lld images, %d epochs = %lld steps of %lld; Dr2Net reaches (0, 1) at step %lld\n",
              o.checkpoint.c_str(), static_cast<long long>(fine_train.size()), o.finetune_epochs,
              static_cast<long long>(total), static_cast<long long>(o.batch), static_cast<long long>(transition));

  std::vector<Run> runs;
  const dr2net::AnySchedule paper(dr2net::PaperSchedule({{1.0, 0.1}, {0.0, 1.0}, eta, transition}));
  runs.push_back({"standard", "standard, (1, 0)", dr2net::AnySchedule(dr2net::ConstantSchedule(1.0, 0.0)),
                  dr2net::BackpropMode::Standard});
  runs.push_back({"Dr2Net", "Dr2Net, error-bounded", paper, dr2net::BackpropMode::ErrorBounded});
  runs.push_back({"exact", "Dr2Net, exact", paper, dr2net::BackpropMode::Reversible, true});
  if (o.proximity) {
    runs.push_back({"(1,0.1)", "exact, (1, 0.1)", dr2net::AnySchedule(dr2net::ConstantSchedule(1.0, 0.1)),
                    dr2net::BackpropMode::Reversible, true});
    runs.push_back({"(1,0.01)", "exact, (1, 0.01)", dr2net::AnySchedule(dr2net::ConstantSchedule(1.0, 0.01)),
                    dr2net::BackpropMode::Reversible, true});
  }
  for (Run& r : runs) {
    const TrainConfig tc{.epochs = o.finetune_epochs, .batch = o.batch, .lr = o.finetune_lr, .seed = o.seed + 1,
                         .window_step = transition};
    // Error-bounded mode redoes a step with more snapshots should its reconstruction ever
    // exceed the guard; exact mode needs no guard (a mismatch is always an error).
    const dr2net::StackOptions so{.mode = r.mode, .seed = o.seed, .guard = {.action = dr2net::GuardAction::Fallback}};
    if (r.exact) finetune<dr2net::FixedFp32>(r, fc, so, file, fine_train, fine_test, tc, o, total, comm);
    else finetune<dr2net::Fp32>(r, fc, so, file, fine_train, fine_test, tc, o, total, comm);
  }

  std::printf("\nfinetuning on classes 5-9: %lld steps of %lld images, test set %lld images\n",
              static_cast<long long>(total), static_cast<long long>(o.batch), static_cast<long long>(fine_test.size()));
  const auto fmt = [](const char* f, double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, f, v);
    return std::string(buf);
  };
  const auto row = [&](const char* what, auto cell) {
    std::printf("%-30s", what);
    for (const Run& r : runs) std::printf(" %22s", cell(r).c_str());
    std::printf("\n");
  };
  row("", [](const Run& r) { return std::string(r.column); });
  row("test accuracy, classes 5-9", [&](const Run& r) { return fmt("%.2f %%", r.test_accuracy); });
  row("peak activation memory", [&](const Run& r) { return fmt("%.2f MiB", mib(r.result.peak_activation)); });
  row("  of which side bits", [&](const Run& r) { return fmt("%.2f MiB", mib(r.result.side_bits)); });
  row("  from (0, 1) on (last third)", [&](const Run& r) { return fmt("%.2f MiB", mib(r.result.window_activation)); });
  row("peak total memory", [&](const Run& r) { return fmt("%.2f MiB", mib(r.result.peak_total)); });
  row("time per step", [&](const Run& r) {
    return fmt("%.1f ms", 1e3 * r.result.seconds / static_cast<double>(r.result.steps));
  });
  const Run& a = runs[0];
  for (std::size_t k = 1; k < runs.size(); ++k)
    std::printf("%s - standard: %+.2f percentage points of accuracy; peak activation memory x%.2f\n", runs[k].column,
                runs[k].test_accuracy - a.test_accuracy,
                static_cast<double>(runs[k].result.peak_activation) / static_cast<double>(a.result.peak_activation));
  std::printf("total wall time %.0f s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - wall0).count());
  return 0;
}

// "02_vit_finetune", and on several ranks "02_vit_finetune (rank 1 of 2)": the errors' prefix.
template <class Comm>
std::string program_name(const Comm& comm) {
  std::string name = "02_vit_finetune";
  if (comm.size() > 1) name += " (rank " + std::to_string(comm.rank()) + " of " + std::to_string(comm.size()) + ")";
  return name;
}

// The program on the ranks of `comm`; the other ranks than 0 print errors alone.
template <class Comm>
int main_on(int argc, char** argv, Comm& comm) {
  if (comm.rank() != 0 && std::freopen("/dev/null", "w", stdout) == nullptr) std::fclose(stdout);
  const std::string name = program_name(comm);
  Options o;
  if (const auto status = parse(argc, argv, o)) return *status;
  try {
    if (!o.skip_pretrain) require_checkpoint_apart_from_data(o);
  } catch (const dr2net::Error& e) {
    std::fprintf(stderr, "%s: %s (see --help)\n", name.c_str(), e.detail().c_str());
    return 2;
  }
  try {
    return run(o, comm);
  } catch (const dr2net::Error& e) {
    std::fprintf(stderr, "%s: %s\n", name.c_str(), e.detail().c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name.c_str(), e.what());
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
#ifdef DR2NET_HAVE_MPI
  // Started by an MPI launcher: one rank of its world (DR2NET_COMM_TIMEOUT bounds every wait).
  if (dist::launched_by_mpi()) {
    try {
      dist::MpiEnvironment mpi(&argc, &argv);
      dist::MpiCommunicator comm(dist::comm_options_from_environment());
      return main_on(argc, argv, comm);
    } catch (const dr2net::Error& e) {
      std::fprintf(stderr, "02_vit_finetune: %s\n", e.detail().c_str());
      return 1;
    }
  }
#endif
  dist::LocalCommunicator comm;
  return main_on(argc, argv, comm);
}
