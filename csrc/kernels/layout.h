// Launchers of the block layout transforms, one per device. The ops layer
// registers them; nothing here knows about communication.
#pragma once

#include <ATen/core/Tensor.h>

namespace alltoall::kernels {

// `spans` is a host int64 tensor [num_blocks, 3] of (src_row, dst_row, rows);
// the rows of `input` (any dtype, dim 0 as rows) are copied into `output`,
// which has the same row size.
void move_blocks_cpu(const at::Tensor& input, at::Tensor& output, const at::Tensor& spans);
void move_blocks_cuda(const at::Tensor& input, at::Tensor& output, const at::Tensor& spans);

}  // namespace alltoall::kernels
