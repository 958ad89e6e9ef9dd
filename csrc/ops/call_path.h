// What a Communicator does on every call, below Python: the argument checks,
// the algorithm choice and the exchange with its autograd node. The Python
// binding (bindings/call_path_bindings.cpp) adds what needs Python objects:
// type checks, reading splits from sequences, the cost model's callback.
//
// The error messages are those of alltoall/ops/validation.py, word for word:
// callers and tests match on them, whichever side raised.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "ops/exchanger.h"

namespace alltoall::ops {

enum class Algorithm : int8_t { kAuto, kFlat, kHierarchical };

const char* algorithm_name(Algorithm algorithm);

// Python's repr of a shape tuple: "(6, 2)", "(5,)".
std::string shape_repr(c10::IntArrayRef shape);

class CallPath {
 public:
  // The cost model's pick for an equal split of this many bytes per peer
  // (flat or hierarchical); empty without a profile.
  using Model = std::function<Algorithm(int64_t bytes_per_peer)>;

  struct Options {
    int64_t group_size = 1;
    // Ranks per node; the hierarchical plan needs them equal.
    std::vector<int64_t> node_sizes;
    // The fixed rule (alltoall.ops.selection): equal splits of at most this
    // many bytes per peer go hierarchical, and uneven ones always do; never
    // when unset (no hierarchy of real nodes).
    std::optional<int64_t> hierarchical_up_to;
    Model model;
  };

  // hierarchical may be null (a Communicator with the flat plan only).
  CallPath(Options options, std::shared_ptr<const Exchanger> flat, std::shared_ptr<const Exchanger> hierarchical);

  int64_t group_size() const { return options_.group_size; }

  // validation.check_divisible; x has at least one dimension.
  void check_divisible(const at::Tensor& x, const char* op) const;
  // validation.splits_to_list's count checks; rows < 0 skips the sum check.
  void check_splits(const std::vector<int64_t>& splits, const char* name, int64_t rows, const char* op) const;

  // The concrete algorithm (flat or hierarchical) of a request: "auto" is
  // resolved by the model (equal splits: bytes_per_peer given) or the fixed
  // rule. Raises ValueError where the algorithm cannot run on this topology.
  Algorithm resolve(Algorithm algorithm, std::optional<int64_t> bytes_per_peer) const;
  // The exchanger of a resolved algorithm; ValueError, naming the request,
  // when this Communicator lacks its plan.
  const std::shared_ptr<const Exchanger>& exchanger(Algorithm resolved, Algorithm requested) const;

 private:
  Algorithm choose_equal(int64_t bytes_per_peer) const;

  Options options_;
  bool uniform_;
  std::shared_ptr<const Exchanger> flat_;
  std::shared_ptr<const Exchanger> hierarchical_;
  // The model's pick per size, as selection.ModelSelector remembers them:
  // a training loop repeats a few sizes. The model is never called with
  // the mutex held (it may take the GIL, which another caller may hold
  // while it waits for the mutex).
  static constexpr size_t kMemoSizes = 4096;
  mutable std::mutex memo_mutex_;
  mutable std::unordered_map<int64_t, Algorithm> memo_;
};

}  // namespace alltoall::ops
