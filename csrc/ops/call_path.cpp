#include "ops/call_path.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <sstream>

namespace alltoall::ops {

const char* algorithm_name(Algorithm algorithm) {
  switch (algorithm) {
    case Algorithm::kAuto:
      return "auto";
    case Algorithm::kFlat:
      return "flat";
    case Algorithm::kHierarchical:
      return "hierarchical";
  }
  return "?";
}

std::string shape_repr(c10::IntArrayRef shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

namespace {

std::string list_repr(const std::vector<int64_t>& values) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  out << "]";
  return out.str();
}

}  // namespace

CallPath::CallPath(Options options, std::shared_ptr<const Exchanger> flat,
                   std::shared_ptr<const Exchanger> hierarchical)
    : options_(std::move(options)), flat_(std::move(flat)), hierarchical_(std::move(hierarchical)) {
  TORCH_CHECK_VALUE(flat_ != nullptr, "CallPath: the flat exchanger is required");
  TORCH_CHECK_VALUE(options_.group_size >= 1, "CallPath: group_size=", options_.group_size, " must be >= 1");
  const auto& sizes = options_.node_sizes;
  uniform_ = sizes.empty() || std::all_of(sizes.begin(), sizes.end(), [&](int64_t n) { return n == sizes[0]; });
}

void CallPath::check_divisible(const at::Tensor& x, const char* op) const {
  if (x.size(0) % options_.group_size == 0) return;
  TORCH_CHECK_VALUE(false, op, ": dim 0 of the input (shape ", shape_repr(x.sizes()), ") is ", x.size(0),
                    ", not divisible by the group size ", options_.group_size);
}

void CallPath::check_splits(const std::vector<int64_t>& splits, const char* name, int64_t rows,
                            const char* op) const {
  TORCH_CHECK_VALUE(static_cast<int64_t>(splits.size()) == options_.group_size, op, ": ", name, " has ",
                    splits.size(), " entries but the group has ", options_.group_size, " ranks");
  int64_t sum = 0;
  for (size_t i = 0; i < splits.size(); ++i) {
    TORCH_CHECK_VALUE(splits[i] >= 0, op, ": ", name, "[", i, "] = ", splits[i], " is negative");
    sum += splits[i];
  }
  TORCH_CHECK_VALUE(rows < 0 || sum == rows, op, ": ", name, " sum to ", sum, " but dim 0 of the input is ", rows);
}

Algorithm CallPath::choose_equal(int64_t bytes_per_peer) const {
  if (!options_.model) {
    const auto& limit = options_.hierarchical_up_to;
    return limit && bytes_per_peer <= *limit ? Algorithm::kHierarchical : Algorithm::kFlat;
  }
  {
    std::lock_guard<std::mutex> lock(memo_mutex_);
    const auto found = memo_.find(bytes_per_peer);
    if (found != memo_.end()) return found->second;
  }
  const Algorithm best = options_.model(bytes_per_peer);
  std::lock_guard<std::mutex> lock(memo_mutex_);
  if (memo_.size() < kMemoSizes) memo_.emplace(bytes_per_peer, best);
  return best;
}

Algorithm CallPath::resolve(Algorithm algorithm, std::optional<int64_t> bytes_per_peer) const {
  TORCH_CHECK_VALUE(algorithm != Algorithm::kHierarchical || uniform_,
                    "algorithm='hierarchical' needs nodes of equal size, but this group's nodes hold ",
                    list_repr(options_.node_sizes), " ranks; use 'flat'");
  if (algorithm != Algorithm::kAuto) return algorithm;
  if (bytes_per_peer) return choose_equal(*bytes_per_peer);
  return options_.hierarchical_up_to ? Algorithm::kHierarchical : Algorithm::kFlat;
}

const std::shared_ptr<const Exchanger>& CallPath::exchanger(Algorithm resolved, Algorithm requested) const {
  if (resolved == Algorithm::kFlat) return flat_;
  TORCH_CHECK_VALUE(hierarchical_ != nullptr, "algorithm='", algorithm_name(requested),
                    "' is not available on this Communicator (it has flat); construct alltoall.Communicator(group)");
  return hierarchical_;
}

}  // namespace alltoall::ops
