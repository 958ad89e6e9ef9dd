// The "alltoall" torch.distributed backend: a c10d::Backend that wraps the
// backend a group would otherwise use (gloo for CPU tensors, NCCL for CUDA
// tensors). Every collective goes to that inner backend unchanged, except
// all-to-all (alltoall_base, equal and uneven, and alltoall on tensor lists),
// which runs the group's exchange plans through an Exchanger.
//
// Python (alltoall/backend/) builds everything at group creation: topology,
// inner backends, transports and plans. This class only dispatches, so no
// call ever creates a group or communicates outside its own group.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ops/exchanger.h"

namespace alltoall::backend {

// When an exchange takes the hierarchical plan. The rule is
// alltoall.ops.selection's; Python resolves it once per group into this.
struct Policy {
  // Equal splits go hierarchical up to this many bytes per peer; -1: never.
  int64_t equal_hierarchical_up_to = -1;
  // Uneven splits differ by rank, so they are decided on the topology alone.
  bool uneven_hierarchical = false;
};

struct Traffic {
  uint64_t calls = 0;
  uint64_t bytes = 0;
};

struct PhaseStats {
  std::string device;     // "cpu", "cuda"
  std::string role;       // "world", "intra_node", "inter_node"
  std::string transport;  // "shm", "c10d:gloo", ...
  Traffic traffic;
};

struct AlgorithmStats {
  Traffic calls;  // exchanges run and their input bytes
  std::vector<PhaseStats> phases;
};

struct BackendStats {
  std::map<std::string, AlgorithmStats> algorithms;
  std::map<std::string, Traffic> transports;  // summed over phases, by kind
  uint64_t forwarded = 0;                     // collectives handed to the inner backend
};

class AlltoallBackend final : public c10d::Backend {
 public:
  AlltoallBackend(int rank, int size, std::string group_name, std::chrono::milliseconds timeout, Policy policy);

  // What serves tensors of `device`: `inner` runs every other collective,
  // `helpers` are the subgroups' inner backends (kept alive, aborted with
  // it), `exchangers` maps "flat" (required) and "hierarchical" to plans.
  void add_device(c10::DeviceType device, c10::intrusive_ptr<c10d::Backend> inner,
                  std::vector<c10::intrusive_ptr<c10d::Backend>> helpers,
                  std::map<std::string, std::unique_ptr<ops::Exchanger>> exchangers);

  BackendStats stats() const;
  const Policy& policy() const { return policy_; }
  std::string describe() const;

  const std::string getBackendName() const override { return "alltoall"; }
  c10::intrusive_ptr<Options> getBackendOptions() override;
  void setGroupUid(const std::string& pg_uid) override;
  void setTimeout(std::chrono::milliseconds timeout) override;
  void abort() override;
  void shutdown() override;
  void eagerConnectSingleDevice(at::Device device) override;
  c10d::ErrorType getError() override;
  void setSequenceNumberForGroup() override;
  uint64_t getSequenceNumberForGroup() override;

  // Ours.
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& output_splits, std::vector<int64_t>& input_splits,
                                               const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override;

  // Forwarded unchanged to the inner backend of the tensors' device.
  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                  const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                     const c10d::AllreduceCoalescedOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors, const c10d::ReduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                                     std::vector<at::Tensor>& inputs,
                                                     const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs, const c10d::GatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::ReduceScatterOptions& opts) override;
  void monitoredBarrier(const c10d::BarrierOptions& opts, bool wait_all_ranks) override;
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dst_rank, int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int src_rank, int tag) override;
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>& tensors, int tag) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;

 private:
  struct Counter {
    std::atomic<uint64_t> calls{0};
    std::atomic<uint64_t> bytes{0};
  };

  struct DeviceSide {
    c10::intrusive_ptr<c10d::Backend> inner;
    std::vector<c10::intrusive_ptr<c10d::Backend>> helpers;
    std::map<std::string, std::unique_ptr<ops::Exchanger>> exchangers;
    std::map<std::string, std::unique_ptr<Counter>> counters;
    // Exchanges of one group run one at a time: transports are not
    // re-entrant, and every rank must issue them in the same order.
    std::unique_ptr<std::mutex> mutex;
  };

  // Marks every transport of every plan aborted by this rank (abort/shutdown).
  void abort_transports(const std::string& reason);
  DeviceSide& side_for(c10::DeviceType device, const char* op);
  DeviceSide& side_for(const std::vector<at::Tensor>& tensors, const char* op);
  c10d::Backend& inner_for(const std::vector<at::Tensor>& tensors, const char* op);
  c10d::Backend& first_inner(const char* op);
  const std::string& algorithm_for(const DeviceSide& side, bool equal, int64_t bytes_per_peer) const;
  // Runs `exchange` with `algorithm`'s exchanger under the side's lock,
  // counts it, and wraps the outcome in a completed Work.
  template <typename Exchange>
  c10::intrusive_ptr<c10d::Work> run(DeviceSide& side, const std::string& algorithm, c10d::OpType op,
                                     int64_t bytes, std::vector<at::Tensor> outputs, Exchange&& exchange);

  std::string group_name_;
  std::chrono::milliseconds timeout_;
  Policy policy_;
  std::map<c10::DeviceType, DeviceSide> sides_;
  std::atomic<uint64_t> forwarded_{0};
};

}  // namespace alltoall::backend
