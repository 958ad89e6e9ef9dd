// Tensors as rows of bytes: the transports and layout kernels move any
// dtype bit for bit by viewing dim 0 as rows of raw bytes.
#pragma once

#include <ATen/core/Tensor.h>

namespace alltoall::ops {

// A contiguous tensor of at least one dimension as [rows, row_bytes] uint8.
at::Tensor as_byte_rows(const at::Tensor& x);

// The inverse: `bytes` ([rows, row_bytes]) as `like`'s dtype and trailing shape.
at::Tensor from_byte_rows(const at::Tensor& bytes, const at::Tensor& like, int64_t rows);

}  // namespace alltoall::ops
