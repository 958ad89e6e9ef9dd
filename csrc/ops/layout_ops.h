// Block layout transforms as torch ops (torch.ops.alltoall.gather_blocks and
// scatter_blocks). These entry points go through the dispatcher, so the CPU
// or CUDA kernel is chosen from the input's device.
#pragma once

#include <ATen/core/Tensor.h>

namespace alltoall::ops {

// Output rows are input rows [starts[i], starts[i] + counts[i]) for i in
// order. Shape: [sum(counts), *input.shape[1:]].
at::Tensor gather_blocks(const at::Tensor& input, c10::IntArrayRef starts, c10::IntArrayRef counts);

// Consecutive input rows, counts[i] at a time, go to output rows
// [starts[i], starts[i] + counts[i]); other rows are zero.
// Shape: [out_rows, *input.shape[1:]].
at::Tensor scatter_blocks(const at::Tensor& input, c10::IntArrayRef starts, c10::IntArrayRef counts,
                          int64_t out_rows);

}  // namespace alltoall::ops
