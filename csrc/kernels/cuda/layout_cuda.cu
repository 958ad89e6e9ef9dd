#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "kernels/layout.h"
#include "kernels/layout_element.h"

namespace alltoall::kernels {

namespace {

struct alignas(16) Word16 {
  uint64_t lo, hi;
};

constexpr int kThreads = 256;

// One thread block per span, grid-strided when there are more spans than
// blocks; the element logic is the CPU's.
template <typename Word>
__global__ void move_blocks_kernel(const Word* src, Word* dst, const int64_t* packed, int64_t num_blocks,
                                   int64_t row_words) {
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    copy_span_words(src, dst, span_of_block(packed, b), row_words, threadIdx.x, blockDim.x);
  }
}

template <typename Word>
void launch(const at::Tensor& input, at::Tensor& output, const int64_t* packed, int64_t num_blocks,
            int64_t row_bytes) {
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(Word));
  const int grid = static_cast<int>(std::min<int64_t>(num_blocks, 65535));
  auto stream = at::cuda::getCurrentCUDAStream();
  move_blocks_kernel<Word><<<grid, kThreads, 0, stream>>>(static_cast<const Word*>(input.const_data_ptr()),
                                                          static_cast<Word*>(output.mutable_data_ptr()), packed,
                                                          num_blocks, row_words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void move_blocks_cuda(const at::Tensor& input, at::Tensor& output, const at::Tensor& spans) {
  const int64_t num_blocks = spans.size(0);
  const int64_t rows = input.size(0);
  const int64_t row_bytes = rows == 0 ? 0 : input.numel() * input.element_size() / rows;
  if (num_blocks == 0 || row_bytes == 0) return;
  at::Tensor device_spans = spans.to(input.device(), /*non_blocking=*/true);
  const int64_t* packed = device_spans.const_data_ptr<int64_t>();
  switch (word_bytes_for(row_bytes, reinterpret_cast<uintptr_t>(input.const_data_ptr()),
                         reinterpret_cast<uintptr_t>(output.const_data_ptr()))) {
    case 16: return launch<Word16>(input, output, packed, num_blocks, row_bytes);
    case 8: return launch<uint64_t>(input, output, packed, num_blocks, row_bytes);
    case 4: return launch<uint32_t>(input, output, packed, num_blocks, row_bytes);
    case 2: return launch<uint16_t>(input, output, packed, num_blocks, row_bytes);
    default: return launch<uint8_t>(input, output, packed, num_blocks, row_bytes);
  }
}

}  // namespace alltoall::kernels
