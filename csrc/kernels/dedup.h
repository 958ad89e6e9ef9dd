// Launchers of the deduplicating dispatch's index kernel, one per device.
// See dedup_element.h for what it computes. The ops layer checks arguments
// and allocates outputs; nothing here communicates.
#pragma once

#include <ATen/core/Tensor.h>

namespace alltoall::kernels {

struct PairTable {
  at::Tensor item_pos;     // [I]
  at::Tensor item_pair;    // [I]
  at::Tensor pair_row;     // [I]: the first P entries are used (caller fills -1)
  at::Tensor pair_counts;  // [K]
  at::Tensor item_counts;  // [K]
};

// row_ptr [R + 1], key [I] (int64, contiguous, on one device).
void dedup_pairs_cpu(const at::Tensor& row_ptr, const at::Tensor& key, int64_t num_keys, PairTable& table);
void dedup_pairs_cuda(const at::Tensor& row_ptr, const at::Tensor& key, int64_t num_keys, PairTable& table);

}  // namespace alltoall::kernels
