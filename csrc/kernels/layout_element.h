// Per-element logic of the block layout transforms, shared by the CPU loops
// and the CUDA kernels. A layout transform moves whole blocks of rows; the
// bytes of one block are copied in words of the widest type both ends allow.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace alltoall::kernels {

// Rows [src_row, src_row + rows) of the source go to rows
// [dst_row, dst_row + rows) of the destination.
struct RowSpan {
  int64_t src_row;
  int64_t dst_row;
  int64_t rows;
};

// Host-side description of a block move: element i of each array describes
// block i. `packed` holds src_row, dst_row and rows for block i at 3*i.
ALLTOALL_INLINE RowSpan span_of_block(const int64_t* packed, int64_t block) {
  return RowSpan{packed[3 * block], packed[3 * block + 1], packed[3 * block + 2]};
}

// Copies the words [begin, end) of one span that belong to `lane` out of
// `lanes`: words begin + lane, begin + lane + lanes, ... The CPU calls it
// with the whole span and one lane; on a GPU several thread blocks share a
// long span, each a range of it, and consecutive threads touch consecutive
// words.
template <typename Word>
ALLTOALL_INLINE void copy_span_range(const Word* src, Word* dst, RowSpan span, int64_t row_words, int64_t begin,
                                     int64_t end, int64_t lane, int64_t lanes) {
  const Word* from = src + span.src_row * row_words;
  Word* to = dst + span.dst_row * row_words;
  const int64_t n = span.rows * row_words;
  const int64_t last = end < n ? end : n;
  for (int64_t w = begin + lane; w < last; w += lanes) to[w] = from[w];
}

// The whole span.
template <typename Word>
ALLTOALL_INLINE void copy_span_words(const Word* src, Word* dst, RowSpan span, int64_t row_words, int64_t lane,
                                     int64_t lanes) {
  copy_span_range(src, dst, span, row_words, 0, span.rows * row_words, lane, lanes);
}

// The widest word (16, 8, 4, 2 or 1 bytes) dividing a row and both base
// addresses, so every block start stays aligned.
ALLTOALL_INLINE int word_bytes_for(int64_t row_bytes, uintptr_t src, uintptr_t dst) {
  int bytes = 16;
  while (bytes > 1 && ((row_bytes % bytes) != 0 || (src % bytes) != 0 || (dst % bytes) != 0)) bytes /= 2;
  return bytes;
}

}  // namespace alltoall::kernels
