#include "backend/completed_work.h"

#include <ATen/core/ivalue.h>
#include <ATen/core/jit_type.h>

namespace alltoall::backend {

CompletedWork::CompletedWork(int rank, c10d::OpType op, std::vector<at::Tensor> outputs, std::exception_ptr error)
    : Work(rank, op), outputs_(std::move(outputs)) {
  future_ = c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()));
  if (error) {
    future_->setError(error);
  } else {
    future_->markCompleted(c10::IValue(outputs_));
  }
  finish(error);
}

}  // namespace alltoall::backend
