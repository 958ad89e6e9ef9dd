// A transport moves rows of dim 0 between the members of one group. The
// executor only sees this interface; c10d_transport.h implements it over a
// torch.distributed ProcessGroup (gloo, NCCL, MPI, ...) and shm_transport.h over
// shared memory between processes of one host.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace alltoall::transport {

class Transport {
 public:
  virtual ~Transport() = default;

  virtual int size() const = 0;
  virtual int rank() const = 0;
  // "shm", or "c10d:<backend>" (e.g. "c10d:gloo"): what carries the bytes.
  virtual std::string kind() const = 0;

  // Rows of `input` go to peers in order, input_splits[j] rows to peer j;
  // output_splits[j] rows arrive from peer j. Empty splits mean equal
  // shares of dim 0. `what` names the step for error messages. Blocks until
  // done or throws, naming the step, the group and its ranks.
  virtual void all_to_all(at::Tensor& output, at::Tensor& input, const std::vector<int64_t>& output_splits,
                          const std::vector<int64_t>& input_splits, const std::string& what) = 0;

  // Concatenates every member's `input` along dim 0, in member order, into
  // `output` ([size * input.size(0), ...]). Same blocking and errors.
  virtual void all_gather(at::Tensor& output, at::Tensor& input, const std::string& what) = 0;

  // The group, for error messages: its name and its global ranks.
  virtual std::string describe() const = 0;

  // Tells the group's other members that this rank failed with `reason`,
  // so that they stop waiting for it (they raise, naming this rank), and
  // makes every later call raise. Safe from any thread, never throws. The
  // shared-memory transport marks its segment's abort word; c10d
  // transports do nothing here (the c10d backend's own abort(), where it
  // has one, is the Backend's: docs/multinode.md).
  virtual void abort(const std::string& reason) noexcept { (void)reason; }
};

}  // namespace alltoall::transport
