// The Work the alltoall backend returns for an exchange it ran in the
// calling thread: already complete, holding either the outputs or the
// error, which wait() rethrows as an inner backend's Work would.
#pragma once

#include <torch/csrc/distributed/c10d/Work.hpp>

#include <exception>
#include <vector>

namespace alltoall::backend {

class CompletedWork final : public c10d::Work {
 public:
  CompletedWork(int rank, c10d::OpType op, std::vector<at::Tensor> outputs, std::exception_ptr error);

  std::vector<at::Tensor> result() override { return outputs_; }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }

 private:
  std::vector<at::Tensor> outputs_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

}  // namespace alltoall::backend
