#include <ATen/Parallel.h>

#include "kernels/layout.h"
#include "kernels/layout_element.h"

namespace alltoall::kernels {

namespace {

template <typename Word>
void move_words(const at::Tensor& input, at::Tensor& output, const int64_t* packed, int64_t num_blocks,
                int64_t row_bytes) {
  const auto* src = static_cast<const Word*>(input.const_data_ptr());
  auto* dst = static_cast<Word*>(output.mutable_data_ptr());
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(Word));
  // Small blocks are cheap: let a thread take several, so the grain is
  // about 64 KiB of copying.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, num_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) copy_span_words(src, dst, span_of_block(packed, b), row_words, 0, 1);
  });
}

}  // namespace

void move_blocks_cpu(const at::Tensor& input, at::Tensor& output, const at::Tensor& spans) {
  const int64_t num_blocks = spans.size(0);
  const int64_t rows = input.size(0);
  const int64_t row_bytes = rows == 0 ? 0 : input.numel() * input.element_size() / rows;
  if (num_blocks == 0 || row_bytes == 0) return;
  const int64_t* packed = spans.const_data_ptr<int64_t>();
  switch (word_bytes_for(row_bytes, reinterpret_cast<uintptr_t>(input.const_data_ptr()),
                         reinterpret_cast<uintptr_t>(output.const_data_ptr()))) {
    case 16:
    case 8: return move_words<uint64_t>(input, output, packed, num_blocks, row_bytes);
    case 4: return move_words<uint32_t>(input, output, packed, num_blocks, row_bytes);
    case 2: return move_words<uint16_t>(input, output, packed, num_blocks, row_bytes);
    default: return move_words<uint8_t>(input, output, packed, num_blocks, row_bytes);
  }
}

}  // namespace alltoall::kernels
