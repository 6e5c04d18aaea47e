#pragma once
//! \file
//! Training checkpoints of a data-parallel run, written by rank 0 and loadable at any world
//! size: the parameters under their registered names, both AdamW moments of each as
//! `optimizer.exp_avg.<name>` and `optimizer.exp_avg_sq.<name>` (PyTorch's state names), and
//! the step count in the metadata (`optimizer.step`). A sharded optimizer's moments are
//! gathered bucket by bucket first, so the file holds the whole state whatever the world size
//! that wrote it; loading takes each rank's part (all of it, or its shard) from the file
//! under the loading run's own layout. Needs dr2net::io (safetensors).

#include <cstdint>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "dr2net/core/error.hpp"
#include "dr2net/distributed/sharded_adamw.hpp"
#include "dr2net/io/safetensors.hpp"

namespace dr2net::distributed {

//! The checkpoint names of parameter `name`'s first and second AdamW moments.
inline std::string exp_avg_name(const std::string& name) { return "optimizer.exp_avg." + name; }
//! See exp_avg_name().
inline std::string exp_avg_sq_name(const std::string& name) { return "optimizer.exp_avg_sq." + name; }

//! Collective: writes the parameters and optimizer state of `opt`'s driver to `path` from rank
//! 0 (atomically, io::SafetensorsWriter::write_file), with `metadata` added to the file's.
//! Every rank returns once the file is complete, or throws dr2net::Error when rank 0 could not
//! write it (rank 0 with the reason, the others naming rank 0).
template <Communicator Comm, class T>
void save_training_state(const std::string& path, DistributedAdamW<Comm, T>& opt,
                         const std::map<std::string, std::string>& metadata = {}) {
  auto& dp = opt.driver();
  auto& comm = dp.communicator();
  const auto& params = dp.parameters();
  const bool root = comm.rank() == 0;
  // The full moments of every parameter, on rank 0 (all ranks take part in the gathers).
  std::vector<std::vector<T>> m(root ? params.size() : 0), v(root ? params.size() : 0);
  if (!opt.sharded()) {
    if (root)
      for (const auto& s : opt.segments()) {
        m[s.param].assign(opt.first_moments() + s.state, opt.first_moments() + s.state + s.count);
        v[s.param].assign(opt.second_moments() + s.state, opt.second_moments() + s.state + s.count);
      }
  } else {
    std::vector<T> gm, gv;
    for (const auto& b : dp.buckets()) {
      gm.assign(b.padded, T(0));
      gv.assign(b.padded, T(0));
      auto rm = comm.all_gather(opt.first_moments() + b.shard_offset, gm.data(), b.shard());
      auto rv = comm.all_gather(opt.second_moments() + b.shard_offset, gv.data(), b.shard());
      rm.wait();
      rv.wait();
      if (!root) continue;
      std::size_t off = 0;
      for (std::size_t i : b.params) {
        const std::size_t n = params[i].value.size();
        m[i].assign(gm.begin() + static_cast<std::ptrdiff_t>(off), gm.begin() + static_cast<std::ptrdiff_t>(off + n));
        v[i].assign(gv.begin() + static_cast<std::ptrdiff_t>(off), gv.begin() + static_cast<std::ptrdiff_t>(off + n));
        off += n;
      }
    }
  }
  std::int32_t status = 0;
  std::string reason;
  if (root) {
    try {
      constexpr io::DType dtype = std::is_same_v<T, double> ? io::DType::F64 : io::DType::F32;
      io::SafetensorsWriter w;
      for (std::size_t i = 0; i < params.size(); ++i) {
        const auto& p = params[i];
        std::vector<std::int64_t> shape;
        for (int d = 0; d < p.value.shape().rank(); ++d) shape.push_back(p.value.shape()[d]);
        w.add(p.name, dtype, shape, p.value.data());
        w.add(exp_avg_name(p.name), dtype, shape, m[i].data());
        w.add(exp_avg_sq_name(p.name), dtype, shape, v[i].data());
      }
      for (const auto& [k, val] : metadata) w.set_metadata(k, val);
      w.set_metadata("optimizer.step", std::to_string(opt.steps_taken()));
      w.set_metadata("optimizer.world_size", std::to_string(comm.size()));
      w.set_metadata("optimizer.sharded", opt.sharded() ? "true" : "false");
      w.write_file(path);
    } catch (const Error& e) {
      status = 1;
      reason = e.detail();
    }
  }
  comm.broadcast(&status, 1, 0).wait();
  DR2NET_CHECK(status == 0, "save_training_state('", path, "'): ",
               root ? reason : "rank 0 could not write the checkpoint (its error says why)");
}

//! Loads parameters and optimizer state written by save_training_state() at any world size
//! into `opt`'s driver and `opt` (this rank's part of the moments under its own layout), and
//! the step count. Every rank reads `path` (a file system all ranks see). Checks every tensor's
//! presence and shape before changing anything; throws dr2net::Error naming the file and the
//! missing or mismatched tensors. Not collective.
template <Communicator Comm, class T>
void load_training_state(const std::string& path, DistributedAdamW<Comm, T>& opt) {
  auto& dp = opt.driver();
  const auto& params = dp.parameters();
  const auto file = io::SafetensorsReader::from_file(path);
  std::vector<std::string> names;
  for (const auto& p : params) {
    names.push_back(p.name);
    names.push_back(exp_avg_name(p.name));
    names.push_back(exp_avg_sq_name(p.name));
  }
  file.require(names);
  std::vector<std::vector<std::int64_t>> shapes;
  std::string mismatches;
  for (const auto& p : params) {
    std::vector<std::int64_t> shape;
    for (int d = 0; d < p.value.shape().rank(); ++d) shape.push_back(p.value.shape()[d]);
    for (const std::string& n : {p.name, exp_avg_name(p.name), exp_avg_sq_name(p.name)})
      if (file.record(n).shape != shape)
        mismatches += (mismatches.empty() ? "" : "; ") + ("tensor '" + n + "' has shape " +
                                                          io::format_shape(file.record(n).shape) + ", expected " +
                                                          io::format_shape(shape));
    shapes.push_back(std::move(shape));
  }
  DR2NET_CHECK(mismatches.empty(), "load_training_state: ", file.where(),
               " does not match the model (nothing was loaded): ", mismatches);
  const auto it = file.metadata().find("optimizer.step");
  DR2NET_CHECK(it != file.metadata().end(), "load_training_state: ", file.where(),
               " has no 'optimizer.step' in its metadata (not written by save_training_state)");
  char* end = nullptr;
  const long long step = std::strtoll(it->second.c_str(), &end, 10);
  DR2NET_CHECK(end != it->second.c_str() && *end == '\0' && step >= 0, "load_training_state: ", file.where(),
               ": 'optimizer.step' is '", it->second, "', not a step count");
  for (std::size_t i = 0; i < params.size(); ++i) file.read_into(params[i].name, shapes[i], params[i].value.data());
  for (const auto& s : opt.segments()) {
    const auto& name = params[s.param].name;
    const auto mv = file.read<T>(exp_avg_name(name));
    const auto vv = file.read<T>(exp_avg_sq_name(name));
    std::copy(mv.begin() + static_cast<std::ptrdiff_t>(s.begin),
              mv.begin() + static_cast<std::ptrdiff_t>(s.begin + s.count), opt.first_moments() + s.state);
    std::copy(vv.begin() + static_cast<std::ptrdiff_t>(s.begin),
              vv.begin() + static_cast<std::ptrdiff_t>(s.begin + s.count), opt.second_moments() + s.state);
  }
  opt.set_steps_taken(step);
}

}  // namespace dr2net::distributed
