#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels/dedup.h"
#include "kernels/dedup_element.h"

namespace alltoall::kernels {

namespace {

// Rows per chunk of the scan. The slots do not depend on it.
constexpr int64_t kRowChunk = 256;

}  // namespace

void dedup_pairs_cpu(const at::Tensor& row_ptr, const at::Tensor& key, int64_t num_keys, PairTable& table) {
  const int64_t rows = row_ptr.numel() - 1;
  const int64_t chunks = (rows + kRowChunk - 1) / kRowChunk;
  const int64_t* ptr = row_ptr.const_data_ptr<int64_t>();
  const int64_t* keys = key.const_data_ptr<int64_t>();
  int64_t* pair_counts = table.pair_counts.mutable_data_ptr<int64_t>();
  int64_t* item_counts = table.item_counts.mutable_data_ptr<int64_t>();
  std::vector<int64_t> pair_tally(static_cast<size_t>(chunks * num_keys), 0);
  std::vector<int64_t> item_tally(static_cast<size_t>(chunks * num_keys), 0);
  std::vector<int64_t> pair_base(static_cast<size_t>(num_keys), 0);
  std::vector<int64_t> item_base(static_cast<size_t>(num_keys), 0);

  // Pass 1, per chunk: tallies. Pass 2, per key: prefix sums over chunks.
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      tally_rows(ptr, keys, c * kRowChunk, std::min(rows, (c + 1) * kRowChunk), pair_tally.data() + c * num_keys,
                 item_tally.data() + c * num_keys);
    }
  });
  for (int64_t d = 0; d < num_keys; ++d) {
    pair_counts[d] = scan_key(pair_tally.data(), 0, chunks, num_keys, d, 0);
    item_counts[d] = scan_key(item_tally.data(), 0, chunks, num_keys, d, 0);
  }
  key_bases(pair_counts, num_keys, pair_base.data());
  key_bases(item_counts, num_keys, item_base.data());
  // Pass 3, per chunk: the slots.
  int64_t* item_pos = table.item_pos.mutable_data_ptr<int64_t>();
  int64_t* item_pair = table.item_pair.mutable_data_ptr<int64_t>();
  int64_t* pair_row = table.pair_row.mutable_data_ptr<int64_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      assign_rows(ptr, keys, c * kRowChunk, std::min(rows, (c + 1) * kRowChunk), pair_tally.data() + c * num_keys,
                  item_tally.data() + c * num_keys, pair_base.data(), item_base.data(), item_pos, item_pair,
                  pair_row);
    }
  });
}

}  // namespace alltoall::kernels
