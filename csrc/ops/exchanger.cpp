#include "ops/exchanger.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/tensor.h>

#include <numeric>

#include "ops/byte_rows.h"
#include "ops/layout_ops.h"

namespace alltoall::ops {

namespace {

using Sizes = std::vector<int64_t>;

Sizes permuted(const Sizes& values, const std::vector<int64_t>& perm) {
  Sizes out(perm.size());
  for (size_t i = 0; i < perm.size(); ++i) out[i] = values[perm[i]];
  return out;
}

// Reorders variable-size blocks: new block i is old block perm[i].
at::Tensor reorder_blocks(const at::Tensor& buffer, const Sizes& sizes, const std::vector<int64_t>& perm) {
  Sizes offsets(sizes.size());
  std::exclusive_scan(sizes.begin(), sizes.end(), offsets.begin(), int64_t{0});
  return gather_blocks(buffer, permuted(offsets, perm), permuted(sizes, perm));
}

Sizes sum_per_peer(const Sizes& block_sizes, int blocks_per_peer) {
  Sizes out(block_sizes.size() / blocks_per_peer, 0);
  for (size_t b = 0; b < block_sizes.size(); ++b) out[b / blocks_per_peer] += block_sizes[b];
  return out;
}

int64_t total(const Sizes& sizes) { return std::accumulate(sizes.begin(), sizes.end(), int64_t{0}); }

// The destination's dtype and shape must be those of the result.
void check_output(const char* what, const at::Tensor& output, const at::Tensor& input, int64_t rows) {
  TORCH_CHECK_VALUE(output.scalar_type() == input.scalar_type(), what, ": the output is ", output.scalar_type(),
                    " but the input is ", input.scalar_type());
  TORCH_CHECK_VALUE(output.device() == input.device(), what, ": the output is on ", output.device(),
                    " but the input is on ", input.device());
  std::vector<int64_t> expected(input.sizes().begin(), input.sizes().end());
  expected[0] = rows;
  TORCH_CHECK_VALUE(output.sizes().vec() == expected, what, ": the output has shape ", output.sizes(),
                    ", expected ", c10::IntArrayRef(expected));
}

void check_splits(const char* name, const Sizes& splits, int world_size) {
  TORCH_CHECK_VALUE(static_cast<int>(splits.size()) == world_size, name, " has ", splits.size(),
                    " entries but the group has ", world_size, " ranks");
  for (size_t i = 0; i < splits.size(); ++i) {
    TORCH_CHECK_VALUE(splits[i] >= 0, name, "[", i, "] = ", splits[i], " is negative");
  }
}

}  // namespace

Exchanger::Exchanger(plan::ExchangePlan plan, std::vector<std::shared_ptr<transport::Transport>> transports,
                     std::shared_ptr<ProgressThread> progress)
    : plan_(std::move(plan)), transports_(std::move(transports)), progress_(std::move(progress)) {
  TORCH_CHECK_VALUE(transports_.size() == plan_.phases.size(), "the plan has ", plan_.phases.size(),
                    " phases but ", transports_.size(), " transports were given");
  for (size_t i = 0; i < transports_.size(); ++i) {
    const auto& phase = plan_.phases[i];
    TORCH_CHECK_VALUE(phase.collective == plan::Collective::kAllToAll, "the Exchanger runs all-to-all phases; phase ",
                      i, " of this ", plan::to_string(plan_.algorithm),
                      " plan is an all-gather (coordinated exchanges run through ParallelGroups)");
    TORCH_CHECK_VALUE(transports_[i] != nullptr, "transport for phase ", i, " is missing");
    TORCH_CHECK_VALUE(transports_[i]->size() == static_cast<int>(phase.group_ranks.size()) &&
                          transports_[i]->rank() == phase.index_in_group,
                      "phase ", i, " (", plan::to_string(phase.role), ") expects a group of ",
                      phase.group_ranks.size(), " ranks with this rank at ", phase.index_in_group, ", but ",
                      transports_[i]->describe(), " does not match");
  }
  counters_ = std::make_unique<Counter[]>(transports_.size());
  labels_[0] = label("all_to_all");
  labels_[1] = label("all_to_all_v");
  for (size_t i = 0; i < transports_.size(); ++i) {
    steps_.push_back({step_name(i, "all_to_all"), step_name(i, "count exchange"), step_name(i, "all_to_all_v")});
  }
}

std::string Exchanger::step_name(size_t phase, const char* what) const {
  return plan::to_string(plan_.algorithm) + " " + what + " phase " + std::to_string(phase + 1) + "/" +
         std::to_string(plan_.phases.size()) + " (" + plan::to_string(plan_.phases[phase].role) + ")";
}

Exchanger::~Exchanger() {
  if (progress_) progress_->synchronize();
}

void Exchanger::count(size_t phase, int64_t bytes_to_others) const {
  counters_[phase].calls.fetch_add(1, std::memory_order_relaxed);
  counters_[phase].bytes.fetch_add(static_cast<uint64_t>(bytes_to_others), std::memory_order_relaxed);
}

std::vector<PhaseTraffic> Exchanger::traffic() const {
  std::vector<PhaseTraffic> out(transports_.size());
  for (size_t i = 0; i < out.size(); ++i) {
    out[i].calls = counters_[i].calls.load(std::memory_order_relaxed);
    out[i].bytes = counters_[i].bytes.load(std::memory_order_relaxed);
  }
  return out;
}

ProgressThread& Exchanger::require_progress(const char* what) const {
  TORCH_CHECK_VALUE(progress_ != nullptr, what, ": this Exchanger was built without a progress thread, so it "
                    "cannot run asynchronous exchanges (alltoall.Communicator gives its exchangers one)");
  return *progress_;
}

ExchangeResult Exchanger::in_order(const std::function<ExchangeResult()>& task, const std::string& label) const {
  if (!progress_) return task();
  return progress_->run(task, label);
}

std::string Exchanger::label(const char* what) const {
  return std::string("alltoall::") + what + " (" + plan::to_string(plan_.algorithm) + ")";
}

void Exchanger::check_equal(const at::Tensor& input) const {
  TORCH_CHECK_VALUE(input.dim() >= 1, "all_to_all: input must have at least one dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(input.size(0) % plan_.num_blocks == 0, "all_to_all: dim 0 of the input (", input.size(0),
                    ") is not divisible by the group size ", plan_.num_blocks);
}

void Exchanger::check_uneven(const at::Tensor& input, const std::vector<int64_t>& input_splits,
                             const std::optional<std::vector<int64_t>>& output_splits) const {
  TORCH_CHECK_VALUE(input.dim() >= 1, "all_to_all_v: input must have at least one dimension, got a 0-d tensor");
  check_splits("input_splits", input_splits, plan_.num_blocks);
  TORCH_CHECK_VALUE(total(input_splits) == input.size(0), "all_to_all_v: input_splits sum to ", total(input_splits),
                    " but dim 0 of the input is ", input.size(0));
  if (output_splits) check_splits("output_splits", *output_splits, plan_.num_blocks);
}

void Exchanger::move(size_t phase, at::Tensor& received, at::Tensor& sent, const std::vector<int64_t>& recv,
                     const std::vector<int64_t>& send, const std::string& step) const {
  try {
    transports_[phase]->all_to_all(received, sent, recv, send, step);
  } catch (const std::exception& error) {
    abort_others(phase, error.what());
    throw;
  }
}

void Exchanger::abort_others(size_t failed, const char* what) const noexcept {
  // This rank leaves the plan at a failed phase, so the members of its
  // other groups would wait for it until their timeout: mark those groups
  // failed (shared memory; c10d transports ignore it) so they raise at once,
  // naming this rank and the cause. The failed phase's own group is left
  // alone: its members see the cause themselves, and should name it, not us.
  // When the phase failed because a peer aborted, pass on that peer's own
  // report (the root cause), not the whole chain of step names around it:
  // the abort slot is short, and the root cause is what the far ranks need.
  std::string cause(what);
  static const std::string kAborted = "the shared-memory segment was aborted: ";
  if (const auto at = cause.rfind(kAborted); at != std::string::npos) cause = cause.substr(at + kAborted.size());
  const std::string reason = "its " + plan::to_string(plan_.algorithm) + " exchange failed in phase " +
                             std::to_string(failed + 1) + ": " + cause.substr(0, 300);
  for (size_t j = 0; j < transports_.size(); ++j) {
    if (transports_[j] != transports_[failed]) transports_[j]->abort(reason);
  }
}

at::Tensor Exchanger::run_equal(const at::Tensor& source, const at::Tensor& out) const {
  at::Tensor buffer = as_byte_rows(source);
  const Sizes sizes(plan_.num_blocks, source.size(0) / plan_.num_blocks);
  const bool into_out = out.defined() && plan_.post_permutation.empty();
  for (size_t i = 0; i < plan_.phases.size(); ++i) {
    const auto& phase = plan_.phases[i];
    if (!phase.pre_permutation.empty()) buffer = reorder_blocks(buffer, sizes, phase.pre_permutation);
    const bool last = i + 1 == plan_.phases.size();
    at::Tensor received = last && into_out ? out : at::empty_like(buffer);
    move(i, received, buffer, {}, {}, steps_[i][0]);
    count(i, buffer.numel() - buffer.numel() / transports_[i]->size());
    buffer = std::move(received);
  }
  if (!plan_.post_permutation.empty()) buffer = reorder_blocks(buffer, sizes, plan_.post_permutation);
  return buffer;
}

std::pair<at::Tensor, std::vector<int64_t>> Exchanger::run_v(const at::Tensor& source, const Sizes& input_splits,
                                                             const std::optional<Sizes>& output_splits,
                                                             const at::Tensor& out) const {
  at::Tensor buffer = as_byte_rows(source);
  Sizes sizes = input_splits;
  const bool into_out = out.defined() && plan_.post_permutation.empty();
  for (size_t i = 0; i < plan_.phases.size(); ++i) {
    const auto& phase = plan_.phases[i];
    if (!phase.pre_permutation.empty()) {
      buffer = reorder_blocks(buffer, sizes, phase.pre_permutation);
      sizes = permuted(sizes, phase.pre_permutation);
    }
    Sizes received_sizes;
    const bool last = i + 1 == plan_.phases.size();
    if (last && output_splits) {
      // Final block s is received block post[s]: invert that to get what
      // this phase receives, without exchanging counts.
      received_sizes.assign(sizes.size(), 0);
      for (size_t s = 0; s < output_splits->size(); ++s) {
        const size_t b = plan_.post_permutation.empty() ? s : static_cast<size_t>(plan_.post_permutation[s]);
        received_sizes[b] = (*output_splits)[s];
      }
    } else {
      // Counts travel one phase ahead of the data they describe: each peer
      // gets the sizes of the blocks it is about to receive, O(p) per rank.
      at::Tensor counts = at::tensor(sizes, source.options().dtype(at::kLong));
      at::Tensor counts_in = at::empty_like(counts);
      move(i, counts_in, counts, {}, {}, steps_[i][1]);
      counts_in = counts_in.cpu();
      const int64_t* c = counts_in.const_data_ptr<int64_t>();
      received_sizes.assign(c, c + counts_in.numel());
    }
    const Sizes send = sum_per_peer(sizes, phase.blocks_per_peer);
    const Sizes recv = sum_per_peer(received_sizes, phase.blocks_per_peer);
    at::Tensor received = last && into_out ? out : at::empty({total(recv), buffer.size(1)}, buffer.options());
    move(i, received, buffer, recv, send, steps_[i][2]);
    count(i, (total(send) - send[phase.index_in_group]) * buffer.size(1));
    buffer = std::move(received);
    sizes = std::move(received_sizes);
  }
  if (!plan_.post_permutation.empty()) {
    buffer = reorder_blocks(buffer, sizes, plan_.post_permutation);
    sizes = permuted(sizes, plan_.post_permutation);
  }
  if (plan_.phases.empty() && output_splits) {
    TORCH_CHECK_VALUE(*output_splits == sizes, "all_to_all_v: output_splits [", (*output_splits)[0],
                      "] do not match input_splits [", sizes[0], "] in a group of one rank");
  }
  return {std::move(buffer), std::move(sizes)};
}

namespace {

// Receiving straight into `output` needs its bytes in row order and apart
// from the input's (in-place calls must not overwrite what is still sent).
bool can_receive_into(const at::Tensor& output, const at::Tensor& source) {
  return output.is_contiguous() && !output.is_alias_of(source);
}

void finish_into(at::Tensor& output, const at::Tensor& out_bytes, const at::Tensor& result, const at::Tensor& source,
                 int64_t rows) {
  if (out_bytes.defined()) {
    if (!result.is_same(out_bytes) && result.numel() > 0) out_bytes.copy_(result);
  } else {
    output.copy_(from_byte_rows(result, source, rows));
  }
}

}  // namespace

at::Tensor Exchanger::run_all_to_all(const at::Tensor& input) const {
  // Every tensor made here is internal or the new output: none needs
  // autograd's or view tracking's dispatch (a few hundred ns per op), and the
  // output is then not a view of the byte buffer it was received into.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor source = input.contiguous();
  at::Tensor buffer = run_equal(source, at::Tensor());
  if (plan_.phases.empty()) buffer = buffer.clone();  // a group of one still returns a new tensor
  return from_byte_rows(buffer, source, input.size(0));
}

std::pair<at::Tensor, std::vector<int64_t>> Exchanger::run_all_to_all_v(
    const at::Tensor& input, const std::vector<int64_t>& input_splits,
    const std::optional<std::vector<int64_t>>& output_splits) const {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in run_all_to_all
  const at::Tensor source = input.contiguous();
  auto [buffer, sizes] = run_v(source, input_splits, output_splits, at::Tensor());
  if (plan_.phases.empty()) buffer = buffer.clone();
  const int64_t rows = total(sizes);
  return {from_byte_rows(buffer, source, rows), sizes};
}

at::Tensor Exchanger::all_to_all(const at::Tensor& input) const {
  check_equal(input);
  return in_order([&] { return ExchangeResult{run_all_to_all(input), {}}; }, label_equal()).output;
}

void Exchanger::all_to_all_into(const at::Tensor& input, at::Tensor& output) const {
  check_equal(input);
  check_output("all_to_all", output, input, input.size(0));
  in_order(
      [&] {
        const at::Tensor source = input.contiguous();
        const at::Tensor out_bytes = can_receive_into(output, source) ? as_byte_rows(output) : at::Tensor();
        finish_into(output, out_bytes, run_equal(source, out_bytes), source, input.size(0));
        return ExchangeResult{};
      },
      label_equal());
}

std::pair<at::Tensor, std::vector<int64_t>> Exchanger::all_to_all_v(
    const at::Tensor& input, const std::vector<int64_t>& input_splits,
    const std::optional<std::vector<int64_t>>& output_splits) const {
  check_uneven(input, input_splits, output_splits);
  auto result = in_order(
      [&] {
        auto [out, splits] = run_all_to_all_v(input, input_splits, output_splits);
        return ExchangeResult{std::move(out), std::move(splits)};
      },
      label_uneven());
  return {std::move(result.output), std::move(result.splits)};
}

void Exchanger::all_to_all_v_into(const at::Tensor& input, const std::vector<int64_t>& input_splits,
                                  const std::vector<int64_t>& output_splits, at::Tensor& output) const {
  check_uneven(input, input_splits, output_splits);
  check_output("all_to_all_v", output, input, total(output_splits));
  in_order(
      [&] {
        const at::Tensor source = input.contiguous();
        const at::Tensor out_bytes = can_receive_into(output, source) ? as_byte_rows(output) : at::Tensor();
        auto result = run_v(source, input_splits, output_splits, out_bytes);
        finish_into(output, out_bytes, result.first, source, total(output_splits));
        return ExchangeResult{};
      },
      label_uneven());
}

std::shared_ptr<Work> Exchanger::all_to_all_async(const at::Tensor& input) const {
  check_equal(input);
  ProgressThread& progress = require_progress("all_to_all(async_op=True)");
  // The task holds the input; the owner's destructor drains the queue
  // before this exchanger goes away, so `this` outlives the task.
  return progress.submit([this, input] { return ExchangeResult{run_all_to_all(input), {}}; }, label_equal());
}

std::shared_ptr<Work> Exchanger::all_to_all_v_async(const at::Tensor& input, const std::vector<int64_t>& input_splits,
                                                    const std::optional<std::vector<int64_t>>& output_splits) const {
  check_uneven(input, input_splits, output_splits);
  ProgressThread& progress = require_progress("all_to_all_v(async_op=True)");
  return progress.submit(
      [this, input, input_splits, output_splits] {
        auto [out, splits] = run_all_to_all_v(input, input_splits, output_splits);
        return ExchangeResult{std::move(out), std::move(splits)};
      },
      label_uneven());
}

}  // namespace alltoall::ops
