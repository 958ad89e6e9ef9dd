#include "ops/group_gather.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "ops/byte_rows.h"

namespace alltoall::ops {

GroupGather::GroupGather(std::shared_ptr<transport::Transport> transport, std::string role,
                         std::shared_ptr<ProgressThread> progress)
    : transport_(std::move(transport)), role_(std::move(role)), progress_(std::move(progress)) {}

GroupGather::~GroupGather() {
  if (progress_) progress_->synchronize();
}

at::Tensor GroupGather::all_gather(const at::Tensor& input) const {
  TORCH_CHECK_VALUE(input.dim() >= 1, "all_gather: input must have at least one dimension, got a 0-d tensor");
  if (!progress_) return run_all_gather(input);
  return progress_->run([&] { return ExchangeResult{run_all_gather(input), {}}; }, "alltoall::all_gather (" + role_ + ")")
      .output;
}

std::shared_ptr<Work> GroupGather::all_gather_after(std::shared_ptr<Work> prior, int64_t rows) const {
  TORCH_CHECK_VALUE(progress_ != nullptr, "all_gather_after: this GroupGather has no progress thread");
  TORCH_CHECK_VALUE(prior != nullptr, "all_gather_after: no prior work");
  return progress_->submit(
      [this, prior, rows] {
        at::Tensor y = prior->wait().output;  // done: it was queued first
        TORCH_CHECK_VALUE(y.dim() >= 1 && y.size(0) <= rows, "all_gather_after: ", y.size(0),
                          " rows do not fit the padded width ", rows);
        if (y.size(0) < rows) {
          auto shape = y.sizes().vec();
          shape[0] = rows - y.size(0);
          y = at::cat({y, at::zeros(shape, y.options())});
        }
        return ExchangeResult{run_all_gather(y), {}};
      },
      "alltoall::all_gather (" + role_ + ")");
}

at::Tensor GroupGather::run_all_gather(const at::Tensor& input) const {
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
