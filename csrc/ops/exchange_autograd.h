// The exchanges with their autograd nodes in C++: the backward of an
// all-to-all is the inverse exchange (the same one for equal splits, the one
// with input and output splits swapped for uneven ones). The backward is
// itself differentiable, so double backward works: the exchange is linear.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "ops/exchanger.h"

namespace alltoall::ops {

// exchanger->all_to_all(x), recorded for autograd when grad mode is on and
// x requires grad. The node keeps the exchanger alive until it is freed.
at::Tensor all_to_all_autograd(const std::shared_ptr<const Exchanger>& exchanger, const at::Tensor& x);

// exchanger->all_to_all_v(x, ...), likewise. Returns the output and the rows
// received from each peer.
std::pair<at::Tensor, std::vector<int64_t>> all_to_all_v_autograd(
    const std::shared_ptr<const Exchanger>& exchanger, const at::Tensor& x, const std::vector<int64_t>& input_splits,
    const std::optional<std::vector<int64_t>>& output_splits);

}  // namespace alltoall::ops
