#pragma once
//! \file
//! The Communicator concept: what data-parallel training needs from a transport (MPI between
//! processes on host buffers, NCCL between GPUs on device buffers), and LocalCommunicator, the
//! world of one process that needs neither.
//!
//! A communicator belongs to one rank of a group of size() ranks. Every collective is
//! asynchronous: it starts the operation and returns a request; request.wait() returns once
//! this rank's part is complete (its output buffer holds the result), request.test() asks
//! without blocking. Every rank must start the same collectives in the same order with the
//! same element counts (MPI's and NCCL's own rule). A buffer belongs to the operation from its
//! start until its request completes.
//!
//! Nothing hangs: a request that does not complete within the communicator's timeout (a peer
//! that exited, crashed or never called the collective) throws dr2net::Error naming the
//! operation, the rank, the world size and the bytes, and the communicator refuses every later
//! call. A closed communicator refuses every call too.
//!
//! Operations (T: float, double, std::int32_t, std::int64_t, std::uint64_t, unsigned char):
//!
//!   broadcast(p, n, root)           p[0, n) of rank `root` to every rank
//!   all_reduce(p, n, op)            p[i] = sum over ranks of p[i] (ReduceOp::Average: / size())
//!   reduce_scatter(send, recv, n, op)  recv[i] = sum over ranks of send[rank() * n + i];
//!                                   send holds size() * n elements, recv n (no overlap)
//!   all_gather(send, recv, n)       recv[r * n + i] = send[i] of rank r; recv holds size() * n;
//!                                   in place when send == recv + rank() * n
//!   barrier()                       returns once every rank has called it (within the timeout)

#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>

#include "dr2net/core/error.hpp"
#include "dr2net/core/tensor.hpp"

namespace dr2net::distributed {

//! How all_reduce and reduce_scatter combine the ranks' values.
enum class ReduceOp {
  Sum,      //!< the sum over ranks
  Average,  //!< the sum over ranks divided by size() (floating-point elements only)
};

//! The name of a ReduceOp for messages ("sum", "average"; "unknown" outside the enumeration).
inline constexpr const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Average: return "average";
  }
  return "unknown";
}

//! Element types every communicator moves: the floating-point gradients and parameters, the
//! integers of metadata, and bytes.
template <class T>
concept CommElement = std::same_as<T, float> || std::same_as<T, double> || std::same_as<T, std::int32_t> ||
                      std::same_as<T, std::int64_t> || std::same_as<T, std::uint64_t> ||
                      std::same_as<T, unsigned char>;

//! The name of a CommElement type for messages ("float", "int64", ...).
template <CommElement T>
constexpr const char* comm_element_name() {
  if constexpr (std::same_as<T, float>) return "float";
  else if constexpr (std::same_as<T, double>) return "double";
  else if constexpr (std::same_as<T, std::int32_t>) return "int32";
  else if constexpr (std::same_as<T, std::int64_t>) return "int64";
  else if constexpr (std::same_as<T, std::uint64_t>) return "uint64";
  else return "byte";
}

//! Settings of a communicator.
struct CommOptions {
  //! How long a collective (and the communicator's construction) may take before it is an
  //! error: long enough for the slowest rank's compute between two collectives, short enough
  //! that a dead peer is reported. The environment's DR2NET_COMM_TIMEOUT (seconds) overrides
  //! the default of comm_options_from_environment().
  std::chrono::duration<double> timeout = std::chrono::seconds(300);
};

//! CommOptions with the timeout of DR2NET_COMM_TIMEOUT (seconds, a positive number) when set,
//! else `defaults`. Throws dr2net::Error naming the variable for a value that is not positive.
inline CommOptions comm_options_from_environment(CommOptions defaults = {}) {
  if (const char* v = std::getenv("DR2NET_COMM_TIMEOUT"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    const double s = std::strtod(v, &end);
    DR2NET_CHECK(end != v && *end == '\0' && s > 0 && s < 1e9, "DR2NET_COMM_TIMEOUT='", v,
                 "' is not a positive number of seconds");
    defaults.timeout = std::chrono::duration<double>(s);
  }
  return defaults;
}

//! What one operation was, for the errors of its request: "all_reduce (sum) of 4096 bytes
//! (1024 float)".
struct CommOpInfo {
  const char* op = "";           //!< broadcast, all_reduce, reduce_scatter, all_gather, barrier
  const char* detail = "";       //!< the reduction ("sum", "average") or "" for none
  const char* element = "";      //!< the element type's name
  std::size_t elements = 0;      //!< elements this rank sends or receives (the larger)
  std::size_t bytes = 0;         //!< elements times the element size
  int root = -1;                 //!< broadcast's root, else -1

  //! "all_reduce (sum) of 4096 bytes (1024 float)", "barrier", "broadcast from rank 0 of ...".
  std::string describe() const {
    std::string s = op;
    if (*detail != '\0') s += std::string(" (") + detail + ")";
    if (root >= 0) s += " from rank " + std::to_string(root);
    if (bytes > 0 || elements > 0)
      s += " of " + std::to_string(bytes) + " bytes (" + std::to_string(elements) + " " + element + ")";
    return s;
  }
};

//! The CommOpInfo of an operation on `n` elements of T.
template <CommElement T>
CommOpInfo make_op_info(const char* op, std::size_t n, const char* detail = "", int root = -1) {
  return CommOpInfo{op, detail, comm_element_name<T>(), n, n * sizeof(T), root};
}

//! A request of an operation that completed when it started (LocalCommunicator's).
class CompletedRequest {
 public:
  //! Returns at once: the operation is complete.
  void wait() {}
  //! Always true.
  bool test() { return true; }
};

//! The transport concept (see the file comment): rank, size, timeout, barrier, closing, and
//! the four collectives on buffers of C::memory_space, each returning a C::request_type with
//! wait() and test().
template <class C>
concept Communicator = requires(C& c, const C& cc, float* p, const float* q, std::size_t n,
                                typename C::request_type& r) {
  typename C::memory_space;
  typename C::request_type;
  { cc.rank() } -> std::convertible_to<int>;
  { cc.size() } -> std::convertible_to<int>;
  { cc.options() } -> std::convertible_to<const CommOptions&>;
  { cc.closed() } -> std::convertible_to<bool>;
  c.barrier();
  c.close();
  { c.broadcast(p, n, 0) } -> std::same_as<typename C::request_type>;
  { c.all_reduce(p, n, ReduceOp::Sum) } -> std::same_as<typename C::request_type>;
  { c.reduce_scatter(q, p, n, ReduceOp::Sum) } -> std::same_as<typename C::request_type>;
  { c.all_gather(q, p, n) } -> std::same_as<typename C::request_type>;
  r.wait();
  { r.test() } -> std::convertible_to<bool>;
};

namespace detail {

//! Whether [a, a + an) and [b, b + bn) of T overlap.
template <class T>
bool overlaps(const T* a, std::size_t an, const T* b, std::size_t bn) {
  const auto pa = reinterpret_cast<std::uintptr_t>(a), pb = reinterpret_cast<std::uintptr_t>(b);
  return an > 0 && bn > 0 && pa < pb + bn * sizeof(T) && pb < pa + an * sizeof(T);
}

//! The checks every communicator makes before an operation: not closed, not broken by an
//! earlier timeout, a valid reduction, and pointers for a non-empty count.
template <class T>
void check_operation(const char* transport, bool closed, bool failed, int rank, int size, const CommOpInfo& info,
                     const void* a, const void* b, ReduceOp op) {
  DR2NET_CHECK(!closed, transport, " communicator (rank ", rank, " of ", size, "): ", info.describe(),
               " called after close()");
  DR2NET_CHECK(!failed, transport, " communicator (rank ", rank, " of ", size, "): ", info.describe(),
               " refused: an earlier operation timed out, so the ranks are no longer in step");
  DR2NET_CHECK(op == ReduceOp::Sum || op == ReduceOp::Average, transport, " ", info.describe(), " on rank ", rank,
               ": ReduceOp value ", static_cast<int>(op), " is not Sum or Average");
  DR2NET_CHECK(op != ReduceOp::Average || std::is_floating_point_v<T>, transport, " ", info.describe(), " on rank ",
               rank, ": ReduceOp::Average needs floating-point elements");
  DR2NET_CHECK(info.elements == 0 || (a != nullptr && b != nullptr), transport, " ", info.describe(), " on rank ",
               rank, ": a null buffer");
}

//! Polls `done()` until it returns true or `timeout` has passed since `start`; true when done.
//! Yields the processor between polls, and sleeps briefly once the wait is long (so that
//! oversubscribed ranks leave the cores to the ones still computing).
template <class Done>
bool poll_until(Done&& done, std::chrono::steady_clock::time_point start, std::chrono::duration<double> timeout) {
  using clock = std::chrono::steady_clock;
  for (long spins = 0;; ++spins) {
    if (done()) return true;
    const auto elapsed = clock::now() - start;
    if (elapsed > timeout) return false;
    if (elapsed > std::chrono::milliseconds(2)) std::this_thread::sleep_for(std::chrono::microseconds(50));
    else std::this_thread::yield();
  }
}

//! "3.5 s"
inline std::string seconds_text(std::chrono::duration<double> d) {
  std::string s = std::to_string(d.count());
  while (s.size() > 1 && s.back() == '0') s.pop_back();
  if (!s.empty() && s.back() == '.') s.pop_back();
  return s + " s";
}

}  // namespace detail

//! The world of one process: rank 0 of 1, on host buffers, every operation complete when it
//! returns. What a program runs on without a launcher (and a build without MPI), so that one
//! training loop serves one process and many.
class LocalCommunicator {
 public:
  using memory_space = HostSpace;              //!< buffers are host memory
  using request_type = CompletedRequest;       //!< every request is complete

  //! A world of one; `options` is kept for options() (nothing here can time out).
  explicit LocalCommunicator(CommOptions options = {}) : options_(options) {}

  //! Always 0.
  int rank() const { return 0; }
  //! Always 1.
  int size() const { return 1; }
  //! The options given to the constructor.
  const CommOptions& options() const { return options_; }
  //! Whether close() was called.
  bool closed() const { return closed_; }
  //! After close() every call but rank(), size(), options() and closed() throws dr2net::Error.
  void close() { closed_ = true; }

  //! Returns at once (throws dr2net::Error after close()).
  void barrier() { check<unsigned char>(make_op_info<unsigned char>("barrier", 0), nullptr, nullptr); }
  //! Nothing to send; throws dr2net::Error unless root == 0.
  template <CommElement T>
  request_type broadcast(T* p, std::size_t n, int root) {
    check<T>(make_op_info<T>("broadcast", n, "", root), p, p);
    DR2NET_CHECK(root == 0, "local communicator: broadcast from rank ", root, ", but the world is rank 0 alone");
    return {};
  }
  //! p unchanged (the sum and the average over one rank).
  template <CommElement T>
  request_type all_reduce(T* p, std::size_t n, ReduceOp op) {
    check<T>(make_op_info<T>("all_reduce", n, reduce_op_name(op)), p, p, op);
    return {};
  }
  //! recv = send (n elements).
  template <CommElement T>
  request_type reduce_scatter(const T* send, T* recv, std::size_t n, ReduceOp op) {
    check<T>(make_op_info<T>("reduce_scatter", n, reduce_op_name(op)), send, recv, op);
    DR2NET_CHECK(!detail::overlaps(send, n, recv, n), "local communicator: reduce_scatter's buffers overlap");
    if (n > 0) std::memcpy(recv, send, n * sizeof(T));
    return {};
  }
  //! recv = send (n elements; nothing to do in place).
  template <CommElement T>
  request_type all_gather(const T* send, T* recv, std::size_t n) {
    check<T>(make_op_info<T>("all_gather", n), send, recv);
    if (n > 0 && send != recv) std::memmove(recv, send, n * sizeof(T));
    return {};
  }

 private:
  template <class T>
  void check(const CommOpInfo& info, const void* a, const void* b, ReduceOp op = ReduceOp::Sum) const {
    detail::check_operation<T>("local", closed_, false, 0, 1, info, a, b, op);
  }

  CommOptions options_;
  bool closed_ = false;
};

static_assert(Communicator<LocalCommunicator>, "LocalCommunicator models Communicator");

}  // namespace dr2net::distributed
