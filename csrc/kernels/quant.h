// Launchers of the FP8 wire-format kernels, one per device. See
// quant_element.h for the format and its rule; the ops layer
// (csrc/ops/quant_ops.cpp) checks arguments and allocates outputs.
#pragma once

#include <ATen/core/Tensor.h>

namespace alltoall::kernels {

// x [N, M] floating, contiguous -> packed [N, M + 4 * ceil(M / 128)] uint8.
void quantize_fp8_cpu(const at::Tensor& x, at::Tensor& packed);
void quantize_fp8_cuda(const at::Tensor& x, at::Tensor& packed);

// packed [N, M + 4 * ceil(M / 128)] uint8, contiguous -> out [N, M] of out's
// floating dtype.
void dequantize_fp8_cpu(const at::Tensor& packed, at::Tensor& out);
void dequantize_fp8_cuda(const at::Tensor& packed, at::Tensor& out);

}  // namespace alltoall::kernels
