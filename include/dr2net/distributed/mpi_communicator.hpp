#pragma once
//! \file
//! MpiCommunicator: the Communicator concept over MPI's non-blocking collectives on host
//! buffers (MPI_Ibcast, MPI_Iallreduce, MPI_Ireduce_scatter_block, MPI_Iallgather,
//! MPI_Ibarrier), and MpiEnvironment, which initialises and finalises MPI once per process.
//!
//! Needs MPI: link dr2net::mpi (cmake/dr2net_mpi.cmake), which defines DR2NET_HAVE_MPI. Only
//! MPI's C API is used (OMPI_SKIP_MPICXX / MPICH_SKIP_MPICXX keep the deprecated C++ bindings
//! out). A request's wait() polls MPI_Test against the communicator's deadline, so a peer that
//! exited or never arrives is an error naming the operation, rank and bytes instead of a hang;
//! every communicator works on its own duplicate of the group (MPI_Comm_idup) with
//! MPI_ERRORS_RETURN, so an MPI failure is a dr2net::Error too, never an abort.
//!
//! MPI's non-blocking collectives make progress inside MPI calls: a rank that computes
//! between a collective's start and its wait() advances it only when it calls test() (the
//! data-parallel driver does so at every layer of the backward).

#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1  //!< OpenMPI: leave out the deprecated C++ bindings (no libmpi_cxx)
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1  //!< MPICH: leave out the deprecated C++ bindings
#endif
#include <mpi.h>

#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

#include "dr2net/core/error.hpp"
#include "dr2net/distributed/communicator.hpp"

namespace dr2net::distributed {

//! Whether this process was started by an MPI launcher (mpirun/mpiexec of OpenMPI or MPICH,
//! Slurm's srun with PMI or PMIx): one of OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_RANK or
//! MPI_LOCALNRANKS is set. Without one a program runs as a world of one (LocalCommunicator)
//! and need not initialise MPI at all.
inline bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"})
    if (const char* s = std::getenv(v); s != nullptr && *s != '\0') return true;
  return false;
}

namespace detail {

//! MPI's message for error code `rc`.
inline std::string mpi_error_string(int rc) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(rc);
  return std::string(text, static_cast<std::size_t>(len));
}

//! The MPI datatype of a CommElement.
template <CommElement T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, std::int32_t>) return MPI_INT32_T;
  else if constexpr (std::is_same_v<T, std::int64_t>) return MPI_INT64_T;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return MPI_UINT64_T;
  else return MPI_UNSIGNED_CHAR;
}

//! What a communicator and its requests share (requests keep it alive and see close() and a
//! timeout of any of them).
struct MpiState {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0, size = 1;
  CommOptions options;
  bool closed = false;
  bool failed = false;  // an operation timed out: the ranks are no longer in step
  long pending = 0;     // operations started and not yet completed
};

//! "MPI communicator (rank 1 of 2)"
inline std::string where(const MpiState& s) {
  return "MPI communicator (rank " + std::to_string(s.rank) + " of " + std::to_string(s.size) + ")";
}

}  // namespace detail

//! Initialises MPI (MPI_Init_thread, MPI_THREAD_FUNNELED: only the thread that initialised MPI
//! calls it) unless it was initialised already, and finalises it on destruction if it
//! initialised it. One per process, created before any MpiCommunicator and destroyed after
//! the last. Not copyable or movable.
class MpiEnvironment {
 public:
  //! Initialises MPI with the program's arguments (or none). Throws dr2net::Error when MPI
  //! cannot be initialised or was finalised already.
  explicit MpiEnvironment(int* argc = nullptr, char*** argv = nullptr) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    DR2NET_CHECK(!finalized, "MpiEnvironment: MPI was finalised already and cannot be initialised again");
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      int provided = 0;
      const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
      DR2NET_CHECK(rc == MPI_SUCCESS, "MpiEnvironment: MPI_Init_thread failed: ", detail::mpi_error_string(rc));
      owner_ = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }
  MpiEnvironment(const MpiEnvironment&) = delete;
  MpiEnvironment& operator=(const MpiEnvironment&) = delete;
  //! MPI_Finalize, if this object initialised MPI. MPI_Finalize waits for every rank in
  //! OpenMPI, so a rank that leaves early is held here until the others finish (and report
  //! their timeouts).
  ~MpiEnvironment() {
    if (!owner_) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }

  //! This process's rank in MPI_COMM_WORLD.
  int world_rank() const { return rank_; }
  //! The number of processes in MPI_COMM_WORLD.
  int world_size() const { return size_; }

 private:
  bool owner_ = false;
  int rank_ = 0, size_ = 1;
};

//! The request of one MpiCommunicator operation: movable, not copyable. wait() and test()
//! throw dr2net::Error when the operation failed or (wait()) did not complete within the
//! communicator's timeout, measured from the operation's start. Destroying a request that is
//! still in flight waits for it (errors are swallowed there: call wait() to see them).
class MpiRequest {
 public:
  //! A completed request of nothing.
  MpiRequest() = default;
  //! Takes over `o`'s operation; `o` is then complete and empty.
  MpiRequest(MpiRequest&& o) noexcept { swap(o); }
  //! Waits for this request's own operation (see the destructor), then takes over `o`'s.
  MpiRequest& operator=(MpiRequest&& o) noexcept {
    MpiRequest tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  MpiRequest(const MpiRequest&) = delete;
  MpiRequest& operator=(const MpiRequest&) = delete;
  //! Waits for an operation still in flight, unless its communicator failed (then the
  //! operation is abandoned: the ranks are out of step and MPI cannot cancel a collective).
  ~MpiRequest() {
    if (!active()) return;
    try {
      wait();
    } catch (...) {  // reported by an explicit wait(); a destructor must not throw
    }
  }

  //! Returns once the operation is complete on this rank (its output holds the result).
  void wait() {
    if (!active()) return;
    if (state_->failed) {  // another operation timed out: this one cannot complete either
      const std::string what = info_.describe();
      const int rank = state_->rank, size = state_->size;
      state_.reset();
      DR2NET_FAIL("MPI ", what, " on rank ", rank, " of ", size,
                  " abandoned: an earlier operation of its communicator timed out");
    }
    const bool done = detail::poll_until([&] { return test(); }, start_, state_->options.timeout);
    if (done) return;
    state_->failed = true;
    const std::string what = info_.describe();
    const int rank = state_->rank, size = state_->size;
    const auto timeout = state_->options.timeout;
    state_.reset();  // abandoned
    DR2NET_FAIL("MPI ", what, " on rank ", rank, " of ", size, " did not complete within ",
                detail::seconds_text(timeout),
                ": a peer exited, crashed or never called it (every rank must call the same collectives in the "
                "same order with the same sizes); the communicator refuses further operations");
  }

  //! Whether the operation is complete (one MPI_Test, which also advances it).
  bool test() {
    if (!active()) return true;
    int flag = 0;
    const int rc = MPI_Test(&request_, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) {
      state_->failed = true;
      const std::string msg = "MPI " + info_.describe() + " on rank " + std::to_string(state_->rank) + " of " +
                              std::to_string(state_->size) + " failed: " + detail::mpi_error_string(rc);
      state_.reset();
      DR2NET_FAIL(msg);
    }
    if (!flag) return false;
    if (finish_) finish_(result_, count_, state_->size);
    --state_->pending;
    state_.reset();
    return true;
  }

  //! What the operation is ("all_reduce (sum) of 4096 bytes (1024 float)").
  const CommOpInfo& info() const { return info_; }

 private:
  friend class MpiCommunicator;
  using Finish = void (*)(void*, std::size_t, int);

  bool active() const { return state_ != nullptr; }
  void swap(MpiRequest& o) noexcept {
    std::swap(state_, o.state_);
    std::swap(request_, o.request_);
    std::swap(info_, o.info_);
    std::swap(start_, o.start_);
    std::swap(finish_, o.finish_);
    std::swap(result_, o.result_);
    std::swap(count_, o.count_);
  }

  std::shared_ptr<detail::MpiState> state_;  // null: complete (or abandoned)
  MPI_Request request_ = MPI_REQUEST_NULL;
  CommOpInfo info_;
  std::chrono::steady_clock::time_point start_{};
  Finish finish_ = nullptr;  // ReduceOp::Average: divides the result by the world size
  void* result_ = nullptr;
  std::size_t count_ = 0;
};

//! The Communicator concept over MPI on host buffers (see the file comment). Movable, not
//! copyable; requests stay valid when their communicator is moved.
class MpiCommunicator {
 public:
  using memory_space = HostSpace;    //!< buffers are host memory
  using request_type = MpiRequest;   //!< what every operation returns

  //! A communicator over a duplicate of `group` (default MPI_COMM_WORLD). The duplication is
  //! collective: it waits for every rank of `group` within options.timeout, else throws
  //! dr2net::Error naming this rank. Needs an MpiEnvironment (or MPI initialised otherwise).
  explicit MpiCommunicator(CommOptions options = {}, MPI_Comm group = MPI_COMM_WORLD)
      : state_(std::make_shared<detail::MpiState>()) {
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    DR2NET_CHECK(initialized && !finalized, "MpiCommunicator: MPI is not initialised (create an MpiEnvironment first)");
    DR2NET_CHECK(options.timeout.count() > 0, "MpiCommunicator: the timeout must be positive, got ",
                 options.timeout.count(), " s");
    state_->options = options;
    MPI_Comm_rank(group, &state_->rank);
    MPI_Comm_size(group, &state_->size);
    MPI_Request req = MPI_REQUEST_NULL;
    check(MPI_Comm_idup(group, &state_->comm, &req), "MPI_Comm_idup");
    const auto start = std::chrono::steady_clock::now();
    int rc = MPI_SUCCESS;
    const bool done = detail::poll_until(
        [&] {
          int flag = 0;
          rc = MPI_Test(&req, &flag, MPI_STATUS_IGNORE);
          return rc != MPI_SUCCESS || flag != 0;
        },
        start, options.timeout);
    DR2NET_CHECK(done, detail::where(*state_), ": creating the communicator (MPI_Comm_idup) did not complete within ",
                 detail::seconds_text(options.timeout), ": a peer exited or never arrived");
    check(rc, "MPI_Comm_idup");
    MPI_Comm_set_errhandler(state_->comm, MPI_ERRORS_RETURN);
  }
  //! Takes over `o`'s group; `o` then refuses every call (it is closed).
  MpiCommunicator(MpiCommunicator&& o) noexcept : state_(std::move(o.state_)) {
    o.state_ = moved_state();
  }
  //! Closes this communicator (as close(), errors swallowed), then takes over `o`'s group.
  MpiCommunicator& operator=(MpiCommunicator&& o) noexcept {
    if (this != &o) {
      release();
      state_ = std::move(o.state_);
      o.state_ = moved_state();
    }
    return *this;
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  //! Frees the duplicate group (MPI_Comm_free) unless an operation timed out.
  ~MpiCommunicator() { release(); }

  //! This process's rank in the group.
  int rank() const { return state_->rank; }
  //! The number of ranks.
  int size() const { return state_->size; }
  //! The options given to the constructor.
  const CommOptions& options() const { return state_->options; }
  //! Whether close() was called (or the communicator was moved from).
  bool closed() const { return state_->closed; }
  //! Whether an operation timed out or failed: then every later operation is refused.
  bool failed() const { return state_->failed; }
  //! The MPI communicator operations run on (this object's duplicate of the group).
  MPI_Comm native() const { return state_->comm; }

  //! Ends the communicator: frees its group and refuses every later operation with
  //! dr2net::Error. Throws dr2net::Error, changing nothing, while operations of it are still in
  //! flight (wait for them first), unless an operation timed out (then it is closed anyway).
  void close() {
    if (state_->closed) return;
    DR2NET_CHECK(state_->pending == 0 || state_->failed, detail::where(*state_), ": close() with ", state_->pending,
                 " operation(s) still in flight; wait for their requests first");
    release();
  }

  //! MPI_Ibarrier, waited for within the timeout.
  void barrier() {
    const CommOpInfo info = make_op_info<unsigned char>("barrier", 0);
    detail::check_operation<unsigned char>("MPI", state_->closed, state_->failed, rank(), size(), info, nullptr,
                                           nullptr, ReduceOp::Sum);
    MpiRequest r = start(info);
    check(MPI_Ibarrier(state_->comm, &r.request_), r);
    r.wait();
  }

  //! p[0, n) of rank `root` to every rank (MPI_Ibcast). Throws dr2net::Error for a root
  //! outside [0, size()) or a count above INT_MAX.
  template <CommElement T>
  MpiRequest broadcast(T* p, std::size_t n, int root) {
    const CommOpInfo info = make_op_info<T>("broadcast", n, "", root);
    prepare<T>(info, p, p, ReduceOp::Sum, n);
    DR2NET_CHECK(root >= 0 && root < size(), "MPI ", info.describe(), " on rank ", rank(), ": root ", root,
                 " is not a rank of the ", size(), " ranks");
    MpiRequest r = start(info);
    check(MPI_Ibcast(p, static_cast<int>(n), detail::mpi_type<T>(), root, state_->comm, &r.request_), r);
    return r;
  }

  //! p = the sum (or average) of every rank's p, in place (MPI_Iallreduce with MPI_IN_PLACE;
  //! the average divides the sum by size() when the request completes).
  template <CommElement T>
  MpiRequest all_reduce(T* p, std::size_t n, ReduceOp op) {
    const CommOpInfo info = make_op_info<T>("all_reduce", n, reduce_op_name(op));
    prepare<T>(info, p, p, op, n);
    MpiRequest r = start(info);
    if (op == ReduceOp::Average) set_average<T>(r, p, n);
    check(MPI_Iallreduce(MPI_IN_PLACE, p, static_cast<int>(n), detail::mpi_type<T>(), MPI_SUM, state_->comm,
                         &r.request_),
          r);
    return r;
  }

  //! recv[0, n) = the sum (or average) over ranks of send[rank() * n, (rank() + 1) * n)
  //! (MPI_Ireduce_scatter_block). send holds size() * n elements and must not overlap recv.
  template <CommElement T>
  MpiRequest reduce_scatter(const T* send, T* recv, std::size_t n, ReduceOp op) {
    const CommOpInfo info = make_op_info<T>("reduce_scatter", n * static_cast<std::size_t>(size()),
                                            reduce_op_name(op));
    prepare<T>(info, send, recv, op, n * static_cast<std::size_t>(size()));
    DR2NET_CHECK(!detail::overlaps(send, n * static_cast<std::size_t>(size()), recv, n), "MPI ", info.describe(),
                 " on rank ", rank(), ": the send and receive buffers overlap");
    MpiRequest r = start(info);
    if (op == ReduceOp::Average) set_average<T>(r, recv, n);
    check(MPI_Ireduce_scatter_block(send, recv, static_cast<int>(n), detail::mpi_type<T>(), MPI_SUM, state_->comm,
                                    &r.request_),
          r);
    return r;
  }

  //! recv[r * n, (r + 1) * n) = send[0, n) of rank r (MPI_Iallgather); in place when send ==
  //! recv + rank() * n, otherwise the buffers must not overlap.
  template <CommElement T>
  MpiRequest all_gather(const T* send, T* recv, std::size_t n) {
    const std::size_t total = n * static_cast<std::size_t>(size());
    const CommOpInfo info = make_op_info<T>("all_gather", total);
    prepare<T>(info, send, recv, ReduceOp::Sum, total);
    const bool in_place = send == recv + static_cast<std::size_t>(rank()) * n;
    DR2NET_CHECK(in_place || !detail::overlaps(send, n, recv, total), "MPI ", info.describe(), " on rank ", rank(),
                 ": the send buffer overlaps the receive buffer without being this rank's own part of it");
    MpiRequest r = start(info);
    const MPI_Datatype t = detail::mpi_type<T>();
    if (in_place)
      check(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, recv, static_cast<int>(n), t, state_->comm, &r.request_),
            r);
    else
      check(MPI_Iallgather(send, static_cast<int>(n), t, recv, static_cast<int>(n), t, state_->comm, &r.request_),
            r);
    return r;
  }

 private:
  static std::shared_ptr<detail::MpiState> moved_state() {
    auto s = std::make_shared<detail::MpiState>();
    s->closed = true;
    return s;
  }

  void release() noexcept {
    if (!state_ || state_->closed) return;
    state_->closed = true;
    int finalized = 0;
    MPI_Finalized(&finalized);
    // A timed-out collective may still reference the group: leave it to the process's end.
    if (!state_->failed && !finalized && state_->comm != MPI_COMM_NULL) MPI_Comm_free(&state_->comm);
  }

  template <class T>
  void prepare(const CommOpInfo& info, const void* a, const void* b, ReduceOp op, std::size_t elements) const {
    detail::check_operation<T>("MPI", state_->closed, state_->failed, rank(), size(), info, a, b, op);
    DR2NET_CHECK(elements <= static_cast<std::size_t>(INT_MAX), "MPI ", info.describe(), " on rank ", rank(),
                 ": more than INT_MAX elements in one operation (split it)");
  }

  MpiRequest start(const CommOpInfo& info) {
    MpiRequest r;
    r.state_ = state_;
    r.info_ = info;
    r.start_ = std::chrono::steady_clock::now();
    ++state_->pending;
    return r;
  }

  template <class T>
  static void set_average(MpiRequest& r, T* p, std::size_t n) {
    if constexpr (std::is_floating_point_v<T>) {
      r.result_ = p;
      r.count_ = n;
      r.finish_ = [](void* q, std::size_t count, int size) {
        T* v = static_cast<T*>(q);
        for (std::size_t i = 0; i < count; ++i) v[i] /= static_cast<T>(size);
      };
    }
  }

  // An MPI call that did not even start: the request never became active.
  void check(int rc, MpiRequest& r) {
    if (rc == MPI_SUCCESS) return;
    --state_->pending;
    r.state_.reset();
    DR2NET_FAIL("MPI ", r.info_.describe(), " on rank ", rank(), " of ", size(),
                " could not start: ", detail::mpi_error_string(rc));
  }
  void check(int rc, const char* call) const {
    DR2NET_CHECK(rc == MPI_SUCCESS, detail::where(*state_), ": ", call, " failed: ", detail::mpi_error_string(rc));
  }

  std::shared_ptr<detail::MpiState> state_;
};

static_assert(Communicator<MpiCommunicator>, "MpiCommunicator models Communicator");

}  // namespace dr2net::distributed
