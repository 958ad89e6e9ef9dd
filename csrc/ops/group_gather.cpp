#include "ops/group_gather.h"

#include <ATen/ops/empty.h>

#include "ops/byte_rows.h"

namespace alltoall::ops {

GroupGather::GroupGather(std::shared_ptr<transport::Transport> transport, std::string role)
    : transport_(std::move(transport)), role_(std::move(role)) {}

at::Tensor GroupGather::all_gather(const at::Tensor& input) const {
  TORCH_CHECK_VALUE(input.dim() >= 1, "all_gather: input must have at least one dimension, got a 0-d tensor");
  const at::Tensor source = input.contiguous();
  at::Tensor bytes = as_byte_rows(source);
  const int64_t rows = source.size(0) * transport_->size();
  at::Tensor gathered = at::empty({rows, bytes.size(1)}, bytes.options());
  if (transport_->size() == 1) {
    gathered.copy_(bytes);
  } else {
    transport_->all_gather(gathered, bytes, "all_gather (" + role_ + ")");
  }
  return from_byte_rows(gathered, source, rows);
}

}  // namespace alltoall::ops
