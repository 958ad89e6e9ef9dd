// All-gather along dim 0 inside one group (the tensor-parallel group of the
// coordinated exchange), over the same transports as the exchanges.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "ops/progress_thread.h"
#include "transport/transport.h"

namespace alltoall::ops {

class GroupGather {
 public:
  // `progress` (may be null): the FIFO it shares with the exchanges it
  // composes with (ParallelGroups passes its EP Communicator's), so a
  // coordinated exchange keeps its order on every rank.
  GroupGather(std::shared_ptr<transport::Transport> transport, std::string role,
              std::shared_ptr<ProgressThread> progress = nullptr);
  GroupGather(GroupGather&&) = default;
  ~GroupGather();

  // [n, *] on each of the group's p members -> [p * n, *], member order.
  // Every member must pass the same n.
  at::Tensor all_gather(const at::Tensor& input) const;

  // Queued after `prior` (an exchange on the same progress thread): its
  // output, padded with zero rows to `rows` rows, all-gathered. Fails with
  // prior's error if prior failed.
  std::shared_ptr<Work> all_gather_after(std::shared_ptr<Work> prior, int64_t rows) const;

  int size() const { return transport_->size(); }
  int rank() const { return transport_->rank(); }

 private:
  at::Tensor run_all_gather(const at::Tensor& input) const;

  std::shared_ptr<transport::Transport> transport_;
  std::string role_;
  std::shared_ptr<ProgressThread> progress_;
};

}  // namespace alltoall::ops
