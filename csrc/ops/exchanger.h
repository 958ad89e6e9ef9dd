// Runs an ExchangePlan: the layout transforms between phases and one
// transport call per phase. The same executor serves every algorithm, equal
// and uneven splits, forward and backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ops/progress_thread.h"
#include "plan/exchange_plan.h"
#include "transport/transport.h"

namespace alltoall::ops {

// What one phase of an Exchanger has carried since it was built: data calls
// (count exchanges excluded) and the payload bytes this rank sent to other
// ranks (its block to itself excluded).
struct PhaseTraffic {
  uint64_t calls = 0;
  uint64_t bytes = 0;
};

class Exchanger {
 public:
  // transports[i] carries phase i of `plan`; its size and rank must match
  // the phase's group. `progress` (may be null) is the owner's FIFO: with
  // it every call, synchronous or not, runs in issue order with the owner's
  // other calls, and the *_async calls are available.
  Exchanger(plan::ExchangePlan plan, std::vector<std::shared_ptr<transport::Transport>> transports,
            std::shared_ptr<ProgressThread> progress = nullptr);
  Exchanger(Exchanger&&) = default;
  // Waits for the owner's queued work, which may point at this exchanger.
  ~Exchanger();

  // Equal splits: dim 0 of `input` holds num_blocks equal blocks, block d for
  // group rank d. Returns what all_to_all_single returns: block s from rank s.
  at::Tensor all_to_all(const at::Tensor& input) const;

  // The same into `output` (the input's dtype and shape). The last phase
  // receives straight into it when it is contiguous, does not overlap the
  // input and no reorder follows; otherwise the result is copied in.
  void all_to_all_into(const at::Tensor& input, at::Tensor& output) const;

  // Uneven splits in rows of dim 0. When output_splits is not given, the
  // counts are exchanged with the data. Returns the output and its splits.
  std::pair<at::Tensor, std::vector<int64_t>> all_to_all_v(
      const at::Tensor& input, const std::vector<int64_t>& input_splits,
      const std::optional<std::vector<int64_t>>& output_splits) const;

  // The same into `output` ([sum(output_splits), *], the input's dtype and
  // trailing shape), under the same conditions as all_to_all_into.
  void all_to_all_v_into(const at::Tensor& input, const std::vector<int64_t>& input_splits,
                         const std::vector<int64_t>& output_splits, at::Tensor& output) const;

  // The same exchanges, queued on the progress thread. The input must not
  // be modified until the work completes.
  std::shared_ptr<Work> all_to_all_async(const at::Tensor& input) const;
  std::shared_ptr<Work> all_to_all_v_async(const at::Tensor& input, const std::vector<int64_t>& input_splits,
                                           const std::optional<std::vector<int64_t>>& output_splits) const;

  const plan::ExchangePlan& plan() const { return plan_; }
  const std::vector<std::shared_ptr<transport::Transport>>& transports() const { return transports_; }
  const std::shared_ptr<ProgressThread>& progress() const { return progress_; }
  std::vector<PhaseTraffic> traffic() const;

 private:
  struct Counter {
    std::atomic<uint64_t> calls{0};
    std::atomic<uint64_t> bytes{0};
  };

  // The exchanges themselves, on whatever thread calls them.
  at::Tensor run_all_to_all(const at::Tensor& input) const;
  std::pair<at::Tensor, std::vector<int64_t>> run_all_to_all_v(
      const at::Tensor& input, const std::vector<int64_t>& input_splits,
      const std::optional<std::vector<int64_t>>& output_splits) const;
  // Runs `task` in issue order with the owner's other calls (inline when
  // there is no progress thread).
  ExchangeResult in_order(const std::function<ExchangeResult()>& task, const std::string& label) const;
  void check_equal(const at::Tensor& input) const;
  void check_uneven(const at::Tensor& input, const std::vector<int64_t>& input_splits,
                    const std::optional<std::vector<int64_t>>& output_splits) const;
  ProgressThread& require_progress(const char* what) const;
  std::string label(const char* what) const;
  const std::string& label_equal() const { return labels_[0]; }
  const std::string& label_uneven() const { return labels_[1]; }

  std::string step_name(size_t phase, const char* what) const;
  // Both variants; `out` is the destination's byte rows, or undefined.
  at::Tensor run_equal(const at::Tensor& source, const at::Tensor& out) const;
  std::pair<at::Tensor, std::vector<int64_t>> run_v(const at::Tensor& source, const std::vector<int64_t>& input_splits,
                                                    const std::optional<std::vector<int64_t>>& output_splits,
                                                    const at::Tensor& out) const;
  void count(size_t phase, int64_t bytes_to_others) const;
  // Runs phase `phase`'s transport call; when it throws, marks every other
  // group of the plan failed (abort_others) before rethrowing.
  void move(size_t phase, at::Tensor& received, at::Tensor& sent, const std::vector<int64_t>& recv,
            const std::vector<int64_t>& send, const std::string& step) const;
  void abort_others(size_t failed, const char* what) const noexcept;

  plan::ExchangePlan plan_;
  std::vector<std::shared_ptr<transport::Transport>> transports_;
  std::unique_ptr<Counter[]> counters_;
  std::shared_ptr<ProgressThread> progress_;
  // "alltoall::all_to_all (flat)" and "alltoall::all_to_all_v (flat)", built
  // once: the profiler label of every call.
  std::string labels_[2];
  // Per phase, the step names its errors give: "all_to_all", "count
  // exchange", "all_to_all_v" (built once, not on every call).
  std::vector<std::array<std::string, 3>> steps_;
};

}  // namespace alltoall::ops
