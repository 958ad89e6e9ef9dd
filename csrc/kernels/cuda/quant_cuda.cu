#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "kernels/quant.h"
#include "kernels/quant_element.h"

namespace alltoall::kernels {

namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int64_t kMaxGrid = 65535;

// One warp per (row, block of 128 channels): lane l takes channels l, l + 32,
// ... of the block, so neighbouring lanes touch neighbouring values. Every
// lane of a warp walks the same units, so the shuffles see the whole warp.
int grid_for(int64_t units) {
  const int64_t warps_per_block = kThreads / kWarp;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((units + warps_per_block - 1) / warps_per_block,
                                                                  kMaxGrid)));
}

template <typename T>
__global__ void quantize_kernel(const T* x, uint8_t* packed, int64_t rows, int64_t cols) {
  const int64_t blocks = quant_blocks(cols);
  const int64_t row_bytes = packed_row_bytes(cols);
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / kWarp);
  for (int64_t u = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp; u < rows * blocks; u += warps) {
    const int64_t r = u / blocks;
    const int64_t b = u % blocks;
    const int64_t first = b * kQuantBlock;
    const int64_t n = cols - first < kQuantBlock ? cols - first : kQuantBlock;
    uint32_t amax = block_amax_part(x + r * cols + first, n, lane, kWarp);
    // An integer max of the |x| bits: the order of the tree does not
    // matter, and every lane ends with the block's amax.
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      amax = max_bits(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    }
    const float scale = block_scale(amax);
    if (lane == 0) store_scale(packed + r * row_bytes, cols, b, scale);
    quantize_block_values(x + r * cols, packed + r * row_bytes, cols, b, scale, lane, kWarp);
  }
}

template <typename T>
__global__ void dequantize_kernel(const uint8_t* packed, T* out, int64_t rows, int64_t cols) {
  const int64_t blocks = quant_blocks(cols);
  const int64_t row_bytes = packed_row_bytes(cols);
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / kWarp);
  for (int64_t u = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / kWarp; u < rows * blocks; u += warps) {
    const int64_t r = u / blocks;
    dequantize_block_values(packed + r * row_bytes, out + r * cols, cols, u % blocks, lane, kWarp);
  }
}

}  // namespace

void quantize_fp8_cuda(const at::Tensor& x, at::Tensor& packed) {
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  if (rows == 0 || cols == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream(x.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_fp8_cuda", [&] {
    quantize_kernel<scalar_t><<<grid_for(rows * quant_blocks(cols)), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), packed.mutable_data_ptr<uint8_t>(), rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dequantize_fp8_cuda(const at::Tensor& packed, at::Tensor& out) {
  const int64_t rows = out.size(0);
  const int64_t cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = at::cuda::getCurrentCUDAStream(out.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_fp8_cuda", [&] {
    dequantize_kernel<scalar_t><<<grid_for(rows * quant_blocks(cols)), kThreads, 0, stream>>>(
        packed.const_data_ptr<uint8_t>(), out.mutable_data_ptr<scalar_t>(), rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace alltoall::kernels
