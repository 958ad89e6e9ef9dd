#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "kernels/layout.h"
#include "kernels/layout_element.h"

namespace alltoall::kernels {

namespace {

struct alignas(16) Word16 {
  uint64_t lo, hi;
};

constexpr int kThreads = 256;
// Words one thread block copies of a span: 8 per thread, 32 KiB of 16-byte
// words. A long span is cut into such ranges, so an 8-rank reorder of large
// blocks spreads over the whole GPU instead of 8 thread blocks.
constexpr int64_t kWordsPerBlock = int64_t{kThreads} * 8;
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGridY = 65535;

// blockIdx.x walks the spans, blockIdx.y the ranges of one span; both
// grid-strided. The element logic is the CPU's.
template <typename Word>
__global__ void move_blocks_kernel(const Word* src, Word* dst, const int64_t* packed, int64_t num_blocks,
                                   int64_t row_words) {
  for (int64_t b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const RowSpan span = span_of_block(packed, b);
    const int64_t n = span.rows * row_words;
    for (int64_t begin = blockIdx.y * kWordsPerBlock; begin < n; begin += int64_t{gridDim.y} * kWordsPerBlock) {
      copy_span_range(src, dst, span, row_words, begin, begin + kWordsPerBlock, threadIdx.x, blockDim.x);
    }
  }
}

template <typename Word>
void launch(const at::Tensor& input, at::Tensor& output, const int64_t* packed, int64_t num_blocks,
            int64_t row_bytes, int64_t max_rows) {
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(Word));
  const int64_t ranges = (max_rows * row_words + kWordsPerBlock - 1) / kWordsPerBlock;
  const dim3 grid(static_cast<unsigned>(std::min(num_blocks, kMaxGridX)),
                  static_cast<unsigned>(std::clamp<int64_t>(ranges, 1, kMaxGridY)));
  auto stream = at::cuda::getCurrentCUDAStream(input.device().index());
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
  // The input's device and its current stream, whatever device is current.
  const c10::cuda::CUDAGuard guard(input.device());
  // The longest span sizes the grid's second dimension; spans are on the host.
  const int64_t* host = spans.const_data_ptr<int64_t>();
  int64_t max_rows = 0;
  for (int64_t b = 0; b < num_blocks; ++b) max_rows = std::max(max_rows, host[3 * b + 2]);
  if (max_rows == 0) return;
  at::Tensor device_spans = spans.to(input.device(), /*non_blocking=*/true);
  const int64_t* packed = device_spans.const_data_ptr<int64_t>();
  switch (word_bytes_for(row_bytes, reinterpret_cast<uintptr_t>(input.const_data_ptr()),
                         reinterpret_cast<uintptr_t>(output.const_data_ptr()))) {
    case 16: return launch<Word16>(input, output, packed, num_blocks, row_bytes, max_rows);
    case 8: return launch<uint64_t>(input, output, packed, num_blocks, row_bytes, max_rows);
    case 4: return launch<uint32_t>(input, output, packed, num_blocks, row_bytes, max_rows);
    case 2: return launch<uint16_t>(input, output, packed, num_blocks, row_bytes, max_rows);
    default: return launch<uint8_t>(input, output, packed, num_blocks, row_bytes, max_rows);
  }
}

}  // namespace alltoall::kernels
