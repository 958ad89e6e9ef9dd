// Every collective but all-to-all: handed unchanged to the inner backend of
// the tensors' device, whose Work the caller gets back.
#include "backend/alltoall_backend.h"

namespace alltoall::backend {

namespace {

std::vector<at::Tensor> firsts(const std::vector<std::vector<at::Tensor>>& lists) {
  std::vector<at::Tensor> out;
  for (const auto& list : lists) {
    if (!list.empty()) return {list.front()};
  }
  return out;
}

}  // namespace

c10::intrusive_ptr<c10d::Work> AlltoallBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                          const c10d::BroadcastOptions& opts) {
  return inner_for(tensors, "broadcast").broadcast(tensors, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                          const c10d::AllreduceOptions& opts) {
  return inner_for(tensors, "allreduce").allreduce(tensors, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                                 const c10d::AllreduceOptions& opts) {
  return inner_for(tensors, "allreduce_sparse").allreduce_sparse(tensors, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                                    const c10d::AllreduceCoalescedOptions& opts) {
  return inner_for(tensors, "allreduce_coalesced").allreduce_coalesced(tensors, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::reduce(std::vector<at::Tensor>& tensors,
                                                       const c10d::ReduceOptions& opts) {
  return inner_for(tensors, "reduce").reduce(tensors, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                                          std::vector<at::Tensor>& inputs,
                                                          const c10d::AllgatherOptions& opts) {
  return inner_for(inputs, "allgather").allgather(outputs, inputs, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                                const c10d::AllgatherOptions& opts) {
  return inner_for({input}, "_allgather_base")._allgather_base(output, input, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                                                    std::vector<at::Tensor>& inputs,
                                                                    const c10d::AllgatherOptions& opts) {
  return inner_for(inputs, "allgather_coalesced").allgather_coalesced(outputs, inputs, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                                std::vector<at::Tensor>& inputs,
                                                                                const c10d::AllgatherOptions& opts) {
  return inner_for(inputs, "allgather_into_tensor_coalesced").allgather_into_tensor_coalesced(outputs, inputs, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::gather(std::vector<std::vector<at::Tensor>>& outputs,
                                                       std::vector<at::Tensor>& inputs,
                                                       const c10d::GatherOptions& opts) {
  return inner_for(inputs, "gather").gather(outputs, inputs, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::scatter(std::vector<at::Tensor>& outputs,
                                                        std::vector<std::vector<at::Tensor>>& inputs,
                                                        const c10d::ScatterOptions& opts) {
  return inner_for(outputs, "scatter").scatter(outputs, inputs, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::reduce_scatter(std::vector<at::Tensor>& outputs,
                                                               std::vector<std::vector<at::Tensor>>& inputs,
                                                               const c10d::ReduceScatterOptions& opts) {
  return inner_for(outputs.empty() ? firsts(inputs) : outputs, "reduce_scatter").reduce_scatter(outputs, inputs, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                                     const c10d::ReduceScatterOptions& opts) {
  return inner_for({input}, "_reduce_scatter_base")._reduce_scatter_base(output, input, opts);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs, const c10d::ReduceScatterOptions& opts) {
  return inner_for(inputs, "reduce_scatter_tensor_coalesced").reduce_scatter_tensor_coalesced(outputs, inputs, opts);
}

void AlltoallBackend::monitoredBarrier(const c10d::BarrierOptions& opts, bool wait_all_ranks) {
  forwarded_.fetch_add(1, std::memory_order_relaxed);
  first_inner("monitored_barrier").monitoredBarrier(opts, wait_all_ranks);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::send(std::vector<at::Tensor>& tensors, int dst_rank, int tag) {
  return inner_for(tensors, "send").send(tensors, dst_rank, tag);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::recv(std::vector<at::Tensor>& tensors, int src_rank, int tag) {
  return inner_for(tensors, "recv").recv(tensors, src_rank, tag);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::recvAnysource(std::vector<at::Tensor>& tensors, int tag) {
  return inner_for(tensors, "recv_anysource").recvAnysource(tensors, tag);
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::barrier(const c10d::BarrierOptions& opts) {
  forwarded_.fetch_add(1, std::memory_order_relaxed);
  if (opts.device && sides_.count(opts.device->type())) return sides_.at(opts.device->type()).inner->barrier(opts);
  return first_inner("barrier").barrier(opts);
}

// Group-wide settings ------------------------------------------------------

c10::intrusive_ptr<c10d::Backend::Options> AlltoallBackend::getBackendOptions() {
  auto options = c10::make_intrusive<Options>("alltoall", timeout_);
  options->group_name = pg_uid_.empty() ? group_name_ : pg_uid_;
  return options;
}

void AlltoallBackend::setGroupUid(const std::string& pg_uid) {
  c10d::Backend::setGroupUid(pg_uid);
  for (auto& [_, side] : sides_) side.inner->setGroupUid(pg_uid);
}

void AlltoallBackend::setTimeout(std::chrono::milliseconds timeout) {
  // The inner backends' timeout; exchanges keep the group's creation timeout.
  for (auto& [_, side] : sides_) side.inner->setTimeout(timeout);
}

void AlltoallBackend::abort_transports(const std::string& reason) {
  // Shared-memory peers stop waiting for this rank (they raise, naming it);
  // gloo offers no abort, NCCL's comes through inner->abort() below.
  for (auto& [_, side] : sides_) {
    for (auto& [_, exchanger] : side.exchangers) {
      for (const auto& transport : exchanger->transports()) transport->abort(reason);
    }
  }
}

void AlltoallBackend::abort() {
  abort_transports("the process group's backend was aborted on this rank (abort())");
  for (auto& [_, side] : sides_) {
    side.inner->abort();
    for (auto& helper : side.helpers) helper->abort();
  }
}

void AlltoallBackend::shutdown() {
  abort_transports("the process group's backend was shut down on this rank (shutdown())");
  for (auto& [_, side] : sides_) {
    side.inner->shutdown();
    for (auto& helper : side.helpers) helper->shutdown();
  }
}

void AlltoallBackend::eagerConnectSingleDevice(at::Device device) {
  auto it = sides_.find(device.type());
  if (it != sides_.end()) it->second.inner->eagerConnectSingleDevice(device);
}

c10d::ErrorType AlltoallBackend::getError() {
  auto it = sides_.find(c10::kCUDA);
  return (it != sides_.end() ? it->second : side_for(c10::kCPU, "getError")).inner->getError();
}

void AlltoallBackend::setSequenceNumberForGroup() { first_inner("set_sequence_number").setSequenceNumberForGroup(); }

uint64_t AlltoallBackend::getSequenceNumberForGroup() {
  return first_inner("get_sequence_number").getSequenceNumberForGroup();
}

}  // namespace alltoall::backend
