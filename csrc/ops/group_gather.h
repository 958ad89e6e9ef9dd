// All-gather along dim 0 inside one group (the tensor-parallel group of the
// coordinated exchange), over the same transports as the exchanges.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "transport/transport.h"

namespace alltoall::ops {

class GroupGather {
 public:
  GroupGather(std::shared_ptr<transport::Transport> transport, std::string role);

  // [n, *] on each of the group's p members -> [p * n, *], member order.
  // Every member must pass the same n.
  at::Tensor all_gather(const at::Tensor& input) const;

  int size() const { return transport_->size(); }
  int rank() const { return transport_->rank(); }

 private:
  std::shared_ptr<transport::Transport> transport_;
  std::string role_;
};

}  // namespace alltoall::ops
