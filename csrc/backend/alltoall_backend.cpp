#include "backend/alltoall_backend.h"

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>

#include <limits>
#include <numeric>
#include <ostream>
#include <sstream>

#include "backend/completed_work.h"

namespace alltoall::backend {

namespace {

using Sizes = std::vector<int64_t>;

int64_t total(const Sizes& sizes) { return std::accumulate(sizes.begin(), sizes.end(), int64_t{0}); }

std::string device_name(c10::DeviceType device) { return c10::DeviceTypeName(device, /*lower_case=*/true); }

// A tensor's bytes as a 1-d uint8 tensor (a view when it is contiguous).
at::Tensor flat_bytes(const at::Tensor& t) {
  const at::Tensor flat = t.contiguous().reshape({-1});
  if (flat.numel() == 0) return at::empty({0}, t.options().dtype(at::kByte));
  return flat.scalar_type() == at::kByte ? flat : flat.view(at::kByte);
}

// The context of an error message: "<backend>: <op>". Streamed only when a
// check fails, because TORCH_CHECK formats its message lazily: building it
// on every call cost about 0.6 us of each small exchange.
struct Where {
  const AlltoallBackend& backend;
  const char* op;
};

std::ostream& operator<<(std::ostream& out, const Where& where) {
  return out << where.backend.describe() << ": " << where.op;
}

// Split sizes as alltoall_base defines them: empty means equal shares of dim 0.
Sizes splits_or_equal(const Sizes& splits, int64_t rows, int size, const char* name, const Where& where) {
  if (!splits.empty()) {
    TORCH_CHECK_VALUE(static_cast<int>(splits.size()) == size, where, ": ", name, " has ", splits.size(),
                      " entries but the group has ", size, " ranks");
    TORCH_CHECK_VALUE(total(splits) == rows, where, ": ", name, " sum to ", total(splits), " but dim 0 is ", rows);
    return splits;
  }
  TORCH_CHECK_VALUE(rows % size == 0, where, ": ", name, " is empty (equal shares) but dim 0 (", rows,
                    ") is not divisible by the group size ", size);
  return Sizes(size, rows / size);
}

}  // namespace

AlltoallBackend::AlltoallBackend(int rank, int size, std::string group_name, std::chrono::milliseconds timeout,
                                 Policy policy)
    : c10d::Backend(rank, size), group_name_(std::move(group_name)), timeout_(timeout), policy_(policy) {
  init();
}

void AlltoallBackend::add_device(c10::DeviceType device, c10::intrusive_ptr<c10d::Backend> inner,
                                 std::vector<c10::intrusive_ptr<c10d::Backend>> helpers,
                                 std::map<std::string, std::unique_ptr<ops::Exchanger>> exchangers) {
  TORCH_CHECK_VALUE(inner, "alltoall backend of group '", group_name_, "': no inner backend for ",
                    device_name(device));
  TORCH_CHECK_VALUE(inner->getSize() == size_ && inner->getRank() == rank_, "alltoall backend of group '",
                    group_name_, "': the inner ", inner->getBackendName(), " backend is rank ", inner->getRank(),
                    " of ", inner->getSize(), ", this group rank ", rank_, " of ", size_);
  TORCH_CHECK_VALUE(exchangers.count("flat"), "alltoall backend of group '", group_name_,
                    "': the flat exchanger is required");
  DeviceSide side;
  side.inner = std::move(inner);
  side.helpers = std::move(helpers);
  for (auto& [name, exchanger] : exchangers) {
    TORCH_CHECK_VALUE(exchanger && exchanger->plan().num_blocks == size_, "alltoall backend of group '", group_name_,
                      "': the ", name, " exchanger does not plan for ", size_, " ranks");
    side.counters[name] = std::make_unique<Counter>();
  }
  side.exchangers = std::move(exchangers);
  side.mutex = std::make_unique<std::mutex>();
  sides_[device] = std::move(side);
}

std::string AlltoallBackend::describe() const {
  std::ostringstream out;
  out << "alltoall backend of group '" << (pg_uid_.empty() ? group_name_ : pg_uid_) << "' (rank " << rank_ << " of "
      << size_ << ")";
  return out.str();
}

// Dispatch -------------------------------------------------------------------

AlltoallBackend::DeviceSide& AlltoallBackend::side_for(c10::DeviceType device, const char* op) {
  auto it = sides_.find(device);
  if (it == sides_.end()) {
    std::string have;
    for (const auto& [d, _] : sides_) have += (have.empty() ? "" : ", ") + device_name(d);
    TORCH_CHECK(false, describe(), ": ", op, " on ", device_name(device), " tensors, but this backend serves ",
                have.empty() ? "no device" : have, " (see ALLTOALL_INNER_BACKEND)");
  }
  return it->second;
}

AlltoallBackend::DeviceSide& AlltoallBackend::side_for(const std::vector<at::Tensor>& tensors, const char* op) {
  if (tensors.empty()) return side_for(sides_.count(c10::kCPU) ? c10::kCPU : sides_.begin()->first, op);
  return side_for(tensors.front().device().type(), op);
}

c10d::Backend& AlltoallBackend::inner_for(const std::vector<at::Tensor>& tensors, const char* op) {
  forwarded_.fetch_add(1, std::memory_order_relaxed);
  return *side_for(tensors, op).inner;
}

c10d::Backend& AlltoallBackend::first_inner(const char* op) {
  TORCH_CHECK(!sides_.empty(), describe(), ": ", op, " before any inner backend was added");
  return *(sides_.count(c10::kCPU) ? sides_.at(c10::kCPU) : sides_.begin()->second).inner;
}

const std::string& AlltoallBackend::algorithm_for(const DeviceSide& side, bool equal, int64_t bytes_per_peer) const {
  static const std::string flat = "flat", hierarchical = "hierarchical";
  if (!side.exchangers.count(hierarchical)) return flat;
  const bool take = equal ? policy_.equal_hierarchical_up_to >= 0 && bytes_per_peer <= policy_.equal_hierarchical_up_to
                          : policy_.uneven_hierarchical;
  return take ? hierarchical : flat;
}

template <typename Exchange>
c10::intrusive_ptr<c10d::Work> AlltoallBackend::run(DeviceSide& side, const std::string& algorithm, c10d::OpType op,
                                                    int64_t bytes, std::vector<at::Tensor> outputs,
                                                    Exchange&& exchange) {
  std::exception_ptr error;
  {
    std::lock_guard<std::mutex> lock(*side.mutex);
    try {
      exchange(*side.exchangers.at(algorithm));
    } catch (...) {
      // Reported by wait(), as an inner backend's Work reports its failures.
      error = std::current_exception();
    }
  }
  Counter& counter = *side.counters.at(algorithm);
  counter.calls.fetch_add(1, std::memory_order_relaxed);
  counter.bytes.fetch_add(static_cast<uint64_t>(bytes), std::memory_order_relaxed);
  return c10::make_intrusive<CompletedWork>(rank_, op, std::move(outputs), error);
}

// All-to-all ---------------------------------------------------------------

c10::intrusive_ptr<c10d::Work> AlltoallBackend::alltoall_base(at::Tensor& output, at::Tensor& input,
                                                              std::vector<int64_t>& output_splits,
                                                              std::vector<int64_t>& input_splits,
                                                              const c10d::AllToAllOptions& /*opts*/) {
  // Argument errors are raised here, before any communication, like gloo's.
  const Where where{*this, "all_to_all_single"};
  DeviceSide& side = side_for(input.device().type(), "all_to_all_single");
  TORCH_CHECK_VALUE(input.dim() >= 1 && output.dim() >= 1, where, ": input and output need at least one dimension");
  TORCH_CHECK_VALUE(output.scalar_type() == input.scalar_type() && output.device() == input.device(), where,
                    ": output is ", output.scalar_type(), " on ", output.device(), " but input is ",
                    input.scalar_type(), " on ", input.device());
  TORCH_CHECK_VALUE(output.sizes().slice(1) == input.sizes().slice(1), where, ": output rows have shape ",
                    output.sizes().slice(1), " but input rows have shape ", input.sizes().slice(1));
  const int64_t bytes = static_cast<int64_t>(input.nbytes());
  if (input_splits.empty() && output_splits.empty()) {
    TORCH_CHECK_VALUE(input.size(0) % size_ == 0, where, ": dim 0 of the input (", input.size(0),
                      ") is not divisible by the group size ", size_);
    TORCH_CHECK_VALUE(output.size(0) == input.size(0), where, ": equal splits need dim 0 of the output (",
                      output.size(0), ") equal to the input's (", input.size(0), ")");
    const std::string& algorithm = algorithm_for(side, /*equal=*/true, bytes / size_);
    return run(side, algorithm, c10d::OpType::ALLTOALL_BASE, bytes, {output},
               [&](const ops::Exchanger& ex) { ex.all_to_all_into(input, output); });
  }
  const Sizes ins = splits_or_equal(input_splits, input.size(0), size_, "input_split_sizes", where);
  const Sizes outs = splits_or_equal(output_splits, output.size(0), size_, "output_split_sizes", where);
  for (int r = 0; r < size_; ++r) {
    TORCH_CHECK_VALUE(ins[r] >= 0 && outs[r] >= 0, where, ": negative split size for rank ", r);
  }
  const std::string& algorithm = algorithm_for(side, /*equal=*/false, 0);
  return run(side, algorithm, c10d::OpType::ALLTOALL_BASE, bytes, {output},
             [&](const ops::Exchanger& ex) { ex.all_to_all_v_into(input, ins, outs, output); });
}

c10::intrusive_ptr<c10d::Work> AlltoallBackend::alltoall(std::vector<at::Tensor>& outputs,
                                                         std::vector<at::Tensor>& inputs,
                                                         const c10d::AllToAllOptions& /*opts*/) {
  // Tensor lists travel as bytes: tensor j of the input is block j of one
  // uneven exchange, and block s of the result fills output tensor s.
  const Where where{*this, "all_to_all"};
  TORCH_CHECK_VALUE(static_cast<int>(inputs.size()) == size_ && static_cast<int>(outputs.size()) == size_, where,
                    ": ", inputs.size(), " input and ", outputs.size(), " output tensors for a group of ", size_);
  DeviceSide& side = side_for(inputs, "all_to_all");
  const c10::Device device = inputs.front().device();
  Sizes ins(size_), outs(size_);
  std::vector<at::Tensor> pieces(size_);
  for (int r = 0; r < size_; ++r) {
    TORCH_CHECK_VALUE(inputs[r].device() == device && outputs[r].device() == device, where,
                      ": every tensor must be on ", device, "; tensor ", r, " is not");
    pieces[r] = flat_bytes(inputs[r]);
    ins[r] = pieces[r].numel();
    outs[r] = static_cast<int64_t>(outputs[r].nbytes());
  }
  const at::Tensor packed = at::cat(pieces);
  at::Tensor received = at::empty({total(outs)}, packed.options());
  const std::string& algorithm = algorithm_for(side, /*equal=*/false, 0);
  return run(side, algorithm, c10d::OpType::ALLTOALL, total(ins), outputs, [&](const ops::Exchanger& ex) {
    ex.all_to_all_v_into(packed, ins, outs, received);
    int64_t offset = 0;
    for (int s = 0; s < size_; ++s) {
      if (outs[s] > 0) {
        at::Tensor target = outputs[s].is_contiguous() ? outputs[s] : at::empty_like(outputs[s]).contiguous();
        flat_bytes(target).copy_(received.narrow(0, offset, outs[s]));
        if (!target.is_same(outputs[s])) outputs[s].copy_(target);
      }
      offset += outs[s];
    }
  });
}

// Observability --------------------------------------------------------------

BackendStats AlltoallBackend::stats() const {
  BackendStats out;
  for (const auto& [device, side] : sides_) {
    for (const auto& [name, exchanger] : side.exchangers) {
      AlgorithmStats& alg = out.algorithms[name];
      alg.calls.calls += side.counters.at(name)->calls.load(std::memory_order_relaxed);
      alg.calls.bytes += side.counters.at(name)->bytes.load(std::memory_order_relaxed);
      const auto traffic = exchanger->traffic();
      const auto& phases = exchanger->plan().phases;
      for (size_t i = 0; i < phases.size(); ++i) {
        const std::string kind = exchanger->transports()[i]->kind();
        alg.phases.push_back(
            {device_name(device), plan::to_string(phases[i].role), kind, Traffic{traffic[i].calls, traffic[i].bytes}});
        out.transports[kind].calls += traffic[i].calls;
        out.transports[kind].bytes += traffic[i].bytes;
      }
    }
  }
  out.forwarded = forwarded_.load(std::memory_order_relaxed);
  return out;
}

}  // namespace alltoall::backend
