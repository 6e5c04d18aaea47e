#pragma once
//! \file
//! DataParallel: data-parallel training over any Communicator. Every rank holds the whole
//! model and a shard of the global batch; after each backward the gradients are summed over
//! the ranks (and averaged), so every rank takes the optimizer step one process would take
//! on the whole batch.
//!
//! The parameters are registered in *groups*, in the order the backward finishes them: for a
//! classifier, the head (its backward runs first), the stack's layers L-1, ..., 0 (add_stack(),
//! which installs the stack's LayerBackwardHook), then the embedding. Consecutive groups are
//! packed into *buckets* of about DataParallelOptions::bucket_bytes; a bucket's all-reduce
//! starts the moment its last group is marked ready, so communication runs while the backward
//! of the layers below is still computing:
//!
//!   begin_step()
//!   head.backward(...);      dp.mark_ready(head_group);
//!   stack.backward(...);     (the hook marks layer L-1, ..., 0 as each finishes)
//!   embedding.backward(...); dp.mark_ready(embedding_group);
//!   dp.finish();             waits; every rank's gradients are now the average over ranks
//!
//! Each bucket is copied into a flat buffer before it is sent (the gradient tensors stay the
//! library's to read while the operation runs), buckets are started in one order on every
//! rank, and a group marked twice in one step, or never, is an error naming it — the two ways
//! peers' reversible backward passes broke PyTorch DDP's hooks. With GradientSync::ReduceScatter
//! (ZeRO stage 1) each rank receives only its shard of every bucket (DistributedAdamW then
//! updates that shard and all-gathers the parameters).
//!
//! Consistency across ranks: finalize() checks that every rank registered the same tensors
//! (count, elements and a hash of names and shapes) and then broadcasts rank 0's parameters
//! (or verifies that they are equal, ParameterInit::Verify). Randomness keyed by the global
//! sample index (StackOptions::sample_offset, set by add_stack from batch_shard()) makes
//! drop-path and dropout masks those of one process with the whole batch.
//!
//! Timeline: every step records, per bucket, when it was started and when it was seen
//! complete (tested at each later mark_ready() and in finish()), against the moment finish()
//! was called (the backward's end): StepTimeline::hidden_fraction() is the share of the
//! buckets' communication time that overlapped the backward. Completion is observed, not
//! signalled, so the measured fraction is a lower bound. On a device the times are the host's
//! launch and wait times.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "dr2net/block/combine.hpp"
#include "dr2net/block/stack.hpp"
#include "dr2net/core/config.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/distributed/communicator.hpp"

namespace dr2net::distributed {

//! How the gradients are combined over the ranks.
enum class GradientSync {
  AllReduce,      //!< every rank receives every averaged gradient (in the parameters' grad views)
  ReduceScatter,  //!< ZeRO stage 1: each rank receives its shard of every bucket (shard_gradients())
};

//! How finalize() makes the ranks' parameters equal.
enum class ParameterInit {
  Broadcast,  //!< copy rank 0's parameters to every rank
  Verify,     //!< check that they are bit for bit equal already; an error names the ranks that differ
};

//! Settings of a DataParallel driver.
struct DataParallelOptions {
  //! A bucket closes at the first group boundary where it holds at least this many bytes of
  //! gradients (1: one bucket per group; a huge value: one bucket for everything). Small
  //! buckets start communicating earlier, large ones pay the per-operation latency less often.
  std::size_t bucket_bytes = std::size_t{1} << 20;
  bool average = true;                           //!< divide the summed gradients by the world size
  ParameterInit init = ParameterInit::Broadcast;  //!< how finalize() makes the parameters equal
  GradientSync sync = GradientSync::AllReduce;    //!< what finish() leaves on each rank
};

//! The samples of one rank's shard of a global batch: [begin, end), and begin as the sample
//! offset of its randomness keys.
struct BatchShard {
  std::int64_t begin = 0;  //!< first sample of the global batch this rank holds
  std::int64_t end = 0;    //!< one past its last
  //! The shard's size.
  std::int64_t size() const { return end - begin; }
};

//! The deterministic sharding of a global batch of `global_batch` samples over `world` ranks:
//! rank r holds samples [r B, (r + 1) B) with B = global_batch / world. Throws dr2net::Error
//! unless world > 0, 0 <= rank < world and world divides global_batch (equal shards keep the
//! average over ranks equal to the mean over the batch).
inline BatchShard batch_shard(std::int64_t global_batch, int rank, int world) {
  DR2NET_CHECK(world > 0 && rank >= 0 && rank < world, "batch_shard: rank ", rank, " of a world of ", world);
  DR2NET_CHECK(global_batch > 0 && global_batch % world == 0, "batch_shard: a global batch of ", global_batch,
               " samples does not split into ", world, " equal shards (make it a multiple of the world size)");
  const std::int64_t b = global_batch / world;
  return {rank * b, (rank + 1) * b};
}

//! One bucket's communication in one step, in seconds since begin_step().
struct BucketTiming {
  int bucket = 0;           //!< bucket index (0 is the first to become ready)
  std::size_t bytes = 0;    //!< gradient bytes it carries
  double launched = -1;     //!< when its operation started (-1: not started)
  double completed = -1;    //!< when it was first seen complete (-1: not yet)
};

//! The communication timeline of the latest step (see the file comment).
struct StepTimeline {
  double backward_end = -1;           //!< when finish() was called, since begin_step()
  double finished = -1;               //!< when finish() returned
  std::vector<BucketTiming> buckets;  //!< one entry per bucket, in bucket order

  //! Buckets started before the backward ended.
  int launched_before_backward_end() const {
    int n = 0;
    for (const auto& b : buckets) n += (b.launched >= 0 && b.launched < backward_end) ? 1 : 0;
    return n;
  }
  //! Sum over buckets of (completed - launched): the time communication was in flight.
  double communication_seconds() const {
    double s = 0;
    for (const auto& b : buckets) s += std::max(0.0, b.completed - b.launched);
    return s;
  }
  //! The share of communication_seconds() that lies before backward_end (1 when there was none).
  double hidden_fraction() const {
    double total = 0, hidden = 0;
    for (const auto& b : buckets) {
      const double d = std::max(0.0, b.completed - b.launched);
      total += d;
      hidden += std::clamp(std::min(b.completed, backward_end) - b.launched, 0.0, d);
    }
    return total > 0 ? hidden / total : 1.0;
  }
};

//! dst[i] = src[i] * scale: a reduced bucket back into a gradient (scale 1 / world size).
template <class T>
struct ScaledCopy {
  T* dst;        //!< the gradient tensor
  const T* src;  //!< its place in the bucket
  T scale;       //!< 1, or 1 / world size when averaging
  //! dst written from src (core/operands.hpp).
  using operands = OperandList<WriteOperand<&ScaledCopy::dst>, ReadOperand<&ScaledCopy::src>>;
  //! dst[i] = src[i] * scale.
  DR2NET_HD_INLINE void operator()(std::size_t i) const { dst[i] = src[i] * scale; }
};

//! A 64-bit FNV-1a hash step over `n` bytes, for the structure and parameter checksums.
inline std::uint64_t fnv1a(std::uint64_t h, const void* data, std::size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

//! FNV-1a's offset basis: the hash of nothing.
inline constexpr std::uint64_t kFnvBasis = 0xcbf29ce484222325ull;

//! The data-parallel driver (see the file comment).
//! \tparam Comm a Communicator whose memory space is the context's
//! \tparam Ctx the backend context of the parameters (HostContext, CudaContext)
//! \tparam T the parameters' and gradients' element type (float or double)
template <Communicator Comm, class Ctx, class T = float>
class DataParallel {
 public:
  using memory_space = typename Comm::memory_space;              //!< where parameters and buckets live
  using parameter_type = NamedParameter<T, memory_space>;        //!< one registered tensor
  static_assert(std::is_same_v<memory_space, typename Ctx::memory_space>,
                "DataParallel: the communicator's buffers must be in the context's memory space "
                "(MpiCommunicator with HostContext, NcclCommunicator with CudaContext)");
  static_assert(std::is_floating_point_v<T>, "DataParallel: gradients of float or double");

  //! Where a rank's shard of bucket k starts within that bucket, and its length (ReduceScatter
  //! layout; every bucket is padded to a multiple of the world size).
  struct Bucket {
    int first_group = 0;                  //!< the first group it holds
    int last_group = 0;                   //!< the last group it holds (inclusive)
    std::size_t offset = 0;               //!< its first element in the flat buffer
    std::size_t elements = 0;             //!< gradient elements it holds
    std::size_t padded = 0;               //!< elements rounded up to a multiple of the world size
    std::size_t shard_offset = 0;         //!< its shard's first element in the shard buffer
    //! Elements of each rank's shard: padded / world size.
    std::size_t shard() const { return shard_elements; }
    std::size_t shard_elements = 0;       //!< padded / world size
    std::vector<std::size_t> params;      //!< indices into parameters() in bucket order
  };

  //! A driver for `comm`'s ranks over parameters of `ctx` (both must outlive it). Nothing is
  //! communicated until finalize(). Throws dr2net::Error for bucket_bytes 0 or an enumeration
  //! value outside its range.
  DataParallel(Comm& comm, Ctx& ctx, DataParallelOptions options = {})
      : comm_(&comm), ctx_(&ctx), options_(options), alive_(std::make_shared<bool>(true)) {
    DR2NET_CHECK(options_.bucket_bytes > 0, "DataParallel: bucket_bytes must be positive");
    DR2NET_CHECK(options_.sync == GradientSync::AllReduce || options_.sync == GradientSync::ReduceScatter,
                 "DataParallel: GradientSync value ", static_cast<int>(options_.sync), " is not AllReduce or ReduceScatter");
    DR2NET_CHECK(options_.init == ParameterInit::Broadcast || options_.init == ParameterInit::Verify,
                 "DataParallel: ParameterInit value ", static_cast<int>(options_.init), " is not Broadcast or Verify");
  }
  DataParallel(const DataParallel&) = delete;
  DataParallel& operator=(const DataParallel&) = delete;
  //! Not movable: the stacks' hooks refer to it.
  DataParallel(DataParallel&&) = delete;
  DataParallel& operator=(DataParallel&&) = delete;
  //! Waits for operations still in flight (errors swallowed) and detaches from the stacks'
  //! hooks: a stack whose hook outlives the driver throws dr2net::Error when it runs.
  ~DataParallel() {
    *alive_ = false;
    for (auto& r : requests_) {
      try {
        r.wait();
      } catch (...) {  // the step failed already; a destructor must not throw
      }
    }
  }

  //! The communicator.
  Comm& communicator() { return *comm_; }
  //! The context.
  Ctx& context() { return *ctx_; }
  //! The options given to the constructor.
  const DataParallelOptions& options() const { return options_; }
  //! This rank.
  int rank() const { return comm_->rank(); }
  //! The world size.
  int world_size() const { return comm_->size(); }

  //! Registers a group of parameters whose gradients become final together; groups are
  //! registered in the order the backward finishes them. Returns the group's index for
  //! mark_ready(). Throws dr2net::Error after finalize(), for an empty group, or for a tensor
  //! whose value and gradient differ in size or are not contiguous.
  int add_group(std::string name, std::vector<parameter_type> params) {
    DR2NET_CHECK(!finalized_, "DataParallel::add_group('", name, "') after finalize()");
    DR2NET_CHECK(!params.empty(), "DataParallel::add_group('", name, "'): the group has no parameters");
    for (const auto& p : params)
      DR2NET_CHECK(p.value.size() == p.grad.size() && p.value.is_contiguous() && p.grad.is_contiguous() &&
                       p.value.size() > 0,
                   "DataParallel::add_group('", name, "'): parameter '", p.name, "' has value ", p.value.shape(),
                   " and gradient ", p.grad.shape(), "; both must be contiguous, non-empty and of one size");
    Group g;
    g.name = std::move(name);
    for (auto& p : params) {
      g.params.push_back(params_.size());
      params_.push_back(std::move(p));
    }
    groups_.push_back(std::move(g));
    return static_cast<int>(groups_.size()) - 1;
  }

  //! Registers every layer of `stack` as a group (layer L-1 first: the backward's order), named
  //! "<name> layer l" with the stack's parameter names prefixed by `prefix`, and installs the
  //! stack's LayerBackwardHook to mark each layer ready as its backward finishes (replacing any
  //! hook it had). Sets the stack's sample offset to `sample_offset` (the global index of this
  //! rank's first sample, batch_shard().begin). Returns the group of layer L-1; layer l is that
  //! plus L-1-l.
  template <class Stack>
  int add_stack(Stack& stack, std::uint64_t sample_offset, std::string name = "stack", std::string prefix = "") {
    static_assert(std::is_same_v<typename Stack::compute_type, T>,
                  "DataParallel::add_stack: the stack's compute type must be the driver's element type");
    static_assert(std::is_same_v<typename Stack::memory_space, memory_space>,
                  "DataParallel::add_stack: the stack's memory space must be the communicator's");
    const int L = stack.num_layers();
    int first = -1;
    for (int l = L - 1; l >= 0; --l) {
      std::vector<parameter_type> ps;
      stack.layer(l).for_each_parameter(prefix + "blocks." + std::to_string(l),
                                        [&](std::string_view n, TensorView<T, memory_space> v,
                                            TensorView<T, memory_space> g) { ps.push_back({std::string(n), v, g}); });
      const int g = add_group(name + " layer " + std::to_string(l), std::move(ps));
      if (first < 0) first = g;
    }
    stack.set_sample_offset(sample_offset);
    std::weak_ptr<bool> alive = alive_;
    stack.set_layer_backward_hook([this, alive, first, L](int layer) {
      const auto a = alive.lock();
      DR2NET_CHECK(a && *a, "a stack's layer-backward hook ran after its DataParallel driver was destroyed "
                            "(install another hook, or none, with set_layer_backward_hook)");
      mark_ready(first + (L - 1 - layer));
    });
    return first;
  }

  //! Ends registration: lays out the buckets, allocates their buffers (MemoryCategory::Gradients,
  //! "data-parallel gradient buckets"), checks with every rank that all registered the same
  //! tensors, and makes the parameters equal (options().init). Collective: every rank calls it.
  //! Throws dr2net::Error (on every rank) naming each rank's tensor count, elements and
  //! structure hash when they differ, for a duplicate parameter name, when nothing was
  //! registered, or (Verify) naming the ranks whose parameters differ from rank 0's.
  void finalize() {
    DR2NET_CHECK(!finalized_, "DataParallel::finalize() called twice");
    DR2NET_CHECK(!groups_.empty(), "DataParallel::finalize(): no parameters were registered");
    std::set<std::string_view> names;
    for (const auto& p : params_)
      DR2NET_CHECK(names.insert(p.name).second, "DataParallel: parameter '", p.name, "' was registered twice");
    layout_buckets();
    check_same_structure();
    const std::size_t total = buckets_.empty() ? 0 : buckets_.back().offset + buckets_.back().padded;
    flat_ = ctx_->template allocate<T>(total, MemoryCategory::Gradients, "data-parallel gradient buckets");
    for_each_index(*ctx_, total, Fill<T>{flat_.data(), T(0)});  // the padding stays zero
    if (options_.sync == GradientSync::ReduceScatter) {
      shard_ = ctx_->template allocate<T>(shard_total_, MemoryCategory::Gradients, "data-parallel gradient shard");
      for_each_index(*ctx_, shard_total_, Fill<T>{shard_.data(), T(0)});
    }
    finalized_ = true;
    if (options_.init == ParameterInit::Broadcast) broadcast_parameters();
    else verify_parameters_equal();
  }

  //! Starts a step: forgets the previous step's readiness and timeline. Throws dr2net::Error
  //! before finalize() or while the previous step's operations are unfinished (call finish()).
  void begin_step() {
    DR2NET_CHECK(finalized_, "DataParallel::begin_step() before finalize()");
    DR2NET_CHECK(!in_step_, "DataParallel::begin_step(): the previous step (", step_,
                 ") was not finished (call finish() after the backward)");
    requests_.clear();
    ready_.assign(groups_.size(), false);
    next_bucket_ = 0;
    timeline_ = StepTimeline{};
    timeline_.buckets.resize(buckets_.size());
    for (std::size_t k = 0; k < buckets_.size(); ++k) {
      timeline_.buckets[k].bucket = static_cast<int>(k);
      timeline_.buckets[k].bytes = buckets_[k].elements * sizeof(T);
    }
    t0_ = std::chrono::steady_clock::now();
    in_step_ = true;
    ++step_;
  }

  //! The gradients of `group` are final for this step: starts every bucket whose groups are
  //! now all ready (in bucket order), and advances the operations in flight. Throws
  //! dr2net::Error outside a step, for an unknown group, or for a group marked twice in one step.
  void mark_ready(int group) {
    DR2NET_CHECK(in_step_, "DataParallel::mark_ready(", group, ") outside a step (call begin_step() first)");
    DR2NET_CHECK(group >= 0 && static_cast<std::size_t>(group) < groups_.size(), "DataParallel::mark_ready(", group,
                 "): no such group (", groups_.size(), " are registered)");
    DR2NET_CHECK(!ready_[static_cast<std::size_t>(group)], "DataParallel: group '",
                 groups_[static_cast<std::size_t>(group)].name, "' was marked ready twice in step ", step_,
                 " (a backward ran twice, or a hook and a manual mark_ready() both fired)");
    ready_[static_cast<std::size_t>(group)] = true;
    while (next_bucket_ < buckets_.size() && bucket_ready(buckets_[next_bucket_])) launch(next_bucket_++);
    progress();
  }

  //! Waits for every bucket and leaves the result: with AllReduce, every parameter's gradient
  //! is the average (or sum) over ranks; with ReduceScatter, shard_gradients() holds this rank's
  //! shard of every bucket, averaged (the gradient views keep the local gradients). Throws
  //! dr2net::Error naming the groups never marked ready, or a communicator's timeout error.
  void finish() {
    DR2NET_CHECK(in_step_, "DataParallel::finish() outside a step (call begin_step() first)");
    timeline_.backward_end = seconds();
    std::string missing;
    for (std::size_t g = 0; g < groups_.size(); ++g)
      if (!ready_[g]) missing += (missing.empty() ? "'" : ", '") + groups_[g].name + "'";
    in_step_ = false;
    if (!missing.empty()) {
      wait_all();
      DR2NET_FAIL("DataParallel::finish() at step ", step_, ": no gradients were marked ready for ", missing,
                  " (call mark_ready() after their backward, or run the stack's backward)");
    }
    for (std::size_t k = 0; k < requests_.size(); ++k) {
      requests_[k].wait();
      if (timeline_.buckets[k].completed < 0) timeline_.buckets[k].completed = seconds();
    }
    const T scale = options_.average ? T(1) / static_cast<T>(world_size()) : T(1);
    for (std::size_t k = 0; k < buckets_.size(); ++k) {
      const Bucket& b = buckets_[k];
      if (options_.sync == GradientSync::AllReduce) {
        std::size_t off = b.offset;
        for (std::size_t i : b.params) {
          const auto& p = params_[i];
          for_each_index(*ctx_, p.grad.size(), ScaledCopy<T>{p.grad.data(), flat_.data() + off, scale});
          off += p.grad.size();
        }
      } else if (scale != T(1)) {
        T* s = shard_.data() + b.shard_offset;
        for_each_index(*ctx_, b.shard(), ScaledCopy<T>{s, s, scale});
      }
    }
    requests_.clear();
    timeline_.finished = seconds();
  }

  //! Seconds since the latest begin_step() (the timeline's clock).
  double elapsed() const { return seconds(); }
  //! The latest step's timeline (complete after finish()).
  const StepTimeline& timeline() const { return timeline_; }

  //! Every registered parameter, in registration order.
  const std::vector<parameter_type>& parameters() const { return params_; }
  //! The buckets (after finalize()).
  const std::vector<Bucket>& buckets() const { return buckets_; }
  //! Number of groups registered.
  int num_groups() const { return static_cast<int>(groups_.size()); }
  //! Group g's name.
  const std::string& group_name(int g) const { return groups_.at(static_cast<std::size_t>(g)).name; }

  //! ReduceScatter: this rank's averaged shard of every bucket (bucket k at
  //! buckets()[k].shard_offset), valid after finish().
  T* shard_gradients() { return shard_.data(); }
  //! Elements of shard_gradients().
  std::size_t shard_elements() const { return shard_total_; }
  //! The flat bucket buffer: bucket k at buckets()[k].offset, buckets()[k].padded elements.
  //! Between finish() and the next step's first bucket DistributedAdamW uses it to gather
  //! parameters.
  T* flat_buffer() { return flat_.data(); }

  //! Clips the reduced gradients to a global L2 norm of at most max_norm (optim::clip_grad_norm's
  //! rule, g *= max_norm / (norm + 1e-6) above it) and returns the norm before clipping. With
  //! AllReduce every rank computes it from its (identical) gradients; with ReduceScatter from the
  //! shards, summed over ranks. Host memory only. Call after finish().
  double clip_grad_norm(double max_norm) {
    static_assert(std::is_same_v<memory_space, HostSpace>, "DataParallel::clip_grad_norm: host parameters only");
    DR2NET_CHECK(std::isfinite(max_norm) && max_norm > 0, "clip_grad_norm: max_norm must be positive, got ", max_norm);
    double sum = 0;
    if (options_.sync == GradientSync::AllReduce) {
      for (const auto& p : params_)
        for (std::size_t k = 0; k < p.grad.size(); ++k) {
          const double g = static_cast<double>(p.grad.data()[k]);
          sum += g * g;
        }
    } else {
      for (std::size_t k = 0; k < shard_total_; ++k) {
        const double g = static_cast<double>(shard_.data()[k]);
        sum += g * g;
      }
      comm_->all_reduce(&sum, 1, ReduceOp::Sum).wait();
    }
    const double norm = std::sqrt(sum);
    if (!std::isfinite(norm) || norm <= max_norm) return norm;
    const auto scale = static_cast<T>(max_norm / (norm + 1e-6));
    if (options_.sync == GradientSync::AllReduce) {
      for (const auto& p : params_)
        for (std::size_t k = 0; k < p.grad.size(); ++k) p.grad.data()[k] *= scale;
    } else {
      for (std::size_t k = 0; k < shard_total_; ++k) shard_.data()[k] *= scale;
    }
    return norm;
  }

  //! A 64-bit hash of every parameter's bits, in registration order.
  std::uint64_t parameters_checksum() {
    std::uint64_t h = kFnvBasis;
    std::vector<T> host;
    for (const auto& p : params_) {
      host.resize(p.value.size());
      copy_to_host(*ctx_, host.data(), p.value.data(), host.size());
      h = fnv1a(h, host.data(), host.size() * sizeof(T));
    }
    return h;
  }

  //! Collective: throws dr2net::Error (on every rank) naming the ranks whose parameters are not
  //! bit for bit those of rank 0.
  void verify_parameters_equal() {
    std::vector<std::uint64_t> all(static_cast<std::size_t>(world_size()));
    std::uint64_t mine = parameters_checksum();
    comm_->all_gather(&mine, all.data(), 1).wait();
    std::string differ;
    for (std::size_t r = 1; r < all.size(); ++r)
      if (all[r] != all[0]) differ += (differ.empty() ? "" : ", ") + std::to_string(r);
    DR2NET_CHECK(differ.empty(), "DataParallel: the parameters of rank(s) ", differ,
                 " differ from rank 0's (ParameterInit::Verify; broadcast them instead, or seed every rank alike)");
  }

  //! Collective: copies rank 0's parameters to every rank, bucket by bucket through the flat buffer.
  void broadcast_parameters() {
    DR2NET_CHECK(finalized_, "DataParallel::broadcast_parameters() before finalize()");
    for (const Bucket& b : buckets_) {
      std::size_t off = b.offset;
      for (std::size_t i : b.params) {
        const auto& p = params_[i];
        for_each_index(*ctx_, p.value.size(), ConvertCopy<T, T>{flat_.data() + off, p.value.data()});
        off += p.value.size();
      }
      comm_->broadcast(flat_.data() + b.offset, b.elements, 0).wait();
      off = b.offset;
      for (std::size_t i : b.params) {
        const auto& p = params_[i];
        for_each_index(*ctx_, p.value.size(), ConvertCopy<T, T>{p.value.data(), flat_.data() + off});
        off += p.value.size();
      }
    }
    for_each_index(*ctx_, flat_.size(), Fill<T>{flat_.data(), T(0)});
  }

 private:
  struct Group {
    std::string name;
    std::vector<std::size_t> params;
  };

  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }

  bool bucket_ready(const Bucket& b) const {
    for (int g = b.first_group; g <= b.last_group; ++g)
      if (!ready_[static_cast<std::size_t>(g)]) return false;
    return true;
  }

  void layout_buckets() {
    const auto R = static_cast<std::size_t>(world_size());
    buckets_.clear();
    std::size_t offset = 0;
    shard_total_ = 0;
    Bucket cur;
    bool open = false;
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      if (!open) {
        cur = Bucket{};
        cur.first_group = static_cast<int>(g);
        cur.offset = offset;
        open = true;
      }
      for (std::size_t i : groups_[g].params) {
        cur.params.push_back(i);
        cur.elements += params_[i].grad.size();
      }
      cur.last_group = static_cast<int>(g);
      if (cur.elements * sizeof(T) >= options_.bucket_bytes || g + 1 == groups_.size()) {
        cur.padded = (cur.elements + R - 1) / R * R;
        cur.shard_elements = cur.padded / R;
        cur.shard_offset = shard_total_;
        shard_total_ += cur.shard_elements;
        offset += cur.padded;
        buckets_.push_back(std::move(cur));
        open = false;
      }
    }
  }

  // Every rank registered the same tensors: count, elements, groups and a hash of names and shapes.
  void check_same_structure() {
    std::uint64_t h = kFnvBasis, elements = 0;
    for (const auto& p : params_) {
      h = fnv1a(h, p.name.data(), p.name.size());
      for (int d = 0; d < p.value.shape().rank(); ++d) {
        const std::int64_t e = p.value.shape()[d];
        h = fnv1a(h, &e, sizeof e);
      }
      elements += p.value.size();
    }
    constexpr std::size_t kFields = 5;
    const std::uint64_t mine[kFields] = {params_.size(), elements, groups_.size(), buckets_.size(), h};
    std::vector<std::uint64_t> all(kFields * static_cast<std::size_t>(world_size()));
    comm_->all_gather(mine, all.data(), kFields).wait();
    bool same = true;
    for (std::size_t r = 1; r < static_cast<std::size_t>(world_size()); ++r)
      for (std::size_t f = 0; f < kFields; ++f) same = same && all[r * kFields + f] == all[f];
    if (same) return;
    std::string ranks;
    for (std::size_t r = 0; r < static_cast<std::size_t>(world_size()); ++r) {
      const std::uint64_t* s = all.data() + r * kFields;
      char hash[17];
      std::snprintf(hash, sizeof hash, "%016llx", static_cast<unsigned long long>(s[4]));
      ranks += "; rank " + std::to_string(r) + ": " + std::to_string(s[0]) + " tensors (" + std::to_string(s[1]) +
               " elements) in " + std::to_string(s[2]) + " groups, names and shapes hash " + hash;
    }
    DR2NET_FAIL("DataParallel::finalize() on rank ", rank(), " of ", world_size(),
                ": the ranks registered different parameters (every rank must build the same model)", ranks);
  }

  void launch(std::size_t k) {
    const Bucket& b = buckets_[k];
    std::size_t off = b.offset;
    for (std::size_t i : b.params) {
      const auto& p = params_[i];
      for_each_index(*ctx_, p.grad.size(), ConvertCopy<T, T>{flat_.data() + off, p.grad.data()});
      off += p.grad.size();
    }
    if (options_.sync == GradientSync::AllReduce)
      requests_.push_back(comm_->all_reduce(flat_.data() + b.offset, b.elements, ReduceOp::Sum));
    else
      requests_.push_back(
          comm_->reduce_scatter(flat_.data() + b.offset, shard_.data() + b.shard_offset, b.shard(), ReduceOp::Sum));
    timeline_.buckets[k].launched = seconds();
  }

  // One test() of every operation in flight: advances MPI's progress and timestamps completions.
  void progress() {
    for (std::size_t k = 0; k < requests_.size(); ++k)
      if (timeline_.buckets[k].completed < 0 && requests_[k].test()) timeline_.buckets[k].completed = seconds();
  }

  void wait_all() noexcept {
    for (auto& r : requests_) {
      try {
        r.wait();
      } catch (...) {  // the step fails with the caller's error
      }
    }
    requests_.clear();
  }

  Comm* comm_;
  Ctx* ctx_;
  DataParallelOptions options_;
  std::shared_ptr<bool> alive_;
  std::vector<parameter_type> params_;
  std::vector<Group> groups_;
  std::vector<Bucket> buckets_;
  std::size_t shard_total_ = 0;
  decltype(std::declval<Ctx&>().template allocate<T>(std::size_t{}, MemoryCategory::Other)) flat_, shard_;
  std::vector<typename Comm::request_type> requests_;
  std::vector<bool> ready_;
  std::size_t next_bucket_ = 0;
  bool finalized_ = false, in_step_ = false;
  std::int64_t step_ = 0;
  StepTimeline timeline_;
  std::chrono::steady_clock::time_point t0_{};
};

}  // namespace dr2net::distributed
