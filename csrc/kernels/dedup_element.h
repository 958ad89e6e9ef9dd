// Per-element logic of the deduplicating dispatch's index kernel
// (torch.ops.alltoall.dedup_pairs), shared by the CPU loops and the CUDA
// kernels.
//
// Items (assignments) are grouped by row: row r owns items
// [row_ptr[r], row_ptr[r + 1]), and item i has a destination key key[i]
// (-1: it does not travel). A row is sent once to each key among its items
// (a pair). Pairs are laid out in (key, row) order and items in
// (key, row, item) order, so each key's items follow its rows:
//   item_pos[i]   the item's place in the item send buffer, -1 if key < 0;
//   item_pair[i]  the pair (send row) that carries it, -1 if key < 0;
//   pair_row[p]   the row pair p sends.
// Rows are cut into chunks; a chunk's tallies count its pairs and items per
// key, a per-key prefix sum over the chunks (in row order) gives each chunk
// its first slot per key, and the chunk then fills its slots in order. No
// atomics: every output element is written by exactly one thread, so the
// result does not depend on the thread count or the device.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace alltoall::kernels {

// Whether item i is the first of its row (which starts at item `begin`)
// with its key. Rows hold at most k items, so the quadratic scan is short.
ALLTOALL_INLINE bool first_of_key(const int64_t* key, int64_t begin, int64_t i) {
  const int64_t k = key[i];
  if (k < 0) return false;
  for (int64_t q = begin; q < i; ++q) {
    if (key[q] == k) return false;
  }
  return true;
}

// Pairs and items per key of rows [begin, end), added to the chunk's tallies.
ALLTOALL_INLINE void tally_rows(const int64_t* row_ptr, const int64_t* key, int64_t begin, int64_t end,
                                int64_t* pair_tally, int64_t* item_tally) {
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t i = row_ptr[r]; i < row_ptr[r + 1]; ++i) {
      if (key[i] < 0) continue;
      item_tally[key[i]] += 1;
      if (first_of_key(key, row_ptr[r], i)) pair_tally[key[i]] += 1;
    }
  }
}

// Replaces key d's tallies in chunks [begin, end) by their exclusive prefix
// sums from `running`; returns the running sum after them. (A GPU block
// gives each thread a segment of chunks and scans the segments' sums.)
ALLTOALL_INLINE int64_t scan_key(int64_t* tally, int64_t begin, int64_t end, int64_t num_keys, int64_t d,
                                 int64_t running) {
  for (int64_t c = begin; c < end; ++c) {
    const int64_t count = tally[c * num_keys + d];
    tally[c * num_keys + d] = running;
    running += count;
  }
  return running;
}

// The sum of key d's tallies in chunks [begin, end).
ALLTOALL_INLINE int64_t sum_key(const int64_t* tally, int64_t begin, int64_t end, int64_t num_keys, int64_t d) {
  int64_t total = 0;
  for (int64_t c = begin; c < end; ++c) total += tally[c * num_keys + d];
  return total;
}

// First slot of every key: the running sums of the per-key totals.
ALLTOALL_INLINE void key_bases(const int64_t* counts, int64_t num_keys, int64_t* base) {
  int64_t running = 0;
  for (int64_t d = 0; d < num_keys; ++d) {
    base[d] = running;
    running += counts[d];
  }
}

// Fills the slots of rows [begin, end). The cursors are this chunk's rows
// of the scanned tallies (its first free slot per key, from the key's base).
ALLTOALL_INLINE void assign_rows(const int64_t* row_ptr, const int64_t* key, int64_t begin, int64_t end,
                                 int64_t* pair_cursor, int64_t* item_cursor, const int64_t* pair_base,
                                 const int64_t* item_base, int64_t* item_pos, int64_t* item_pair,
                                 int64_t* pair_row) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t first = row_ptr[r];
    for (int64_t i = first; i < row_ptr[r + 1]; ++i) {
      const int64_t d = key[i];
      if (d < 0) {
        item_pos[i] = -1;
        item_pair[i] = -1;
        continue;
      }
      item_pos[i] = item_base[d] + item_cursor[d]++;
      int64_t q = first;
      while (q < i && key[q] != d) ++q;
      if (q < i) {
        item_pair[i] = item_pair[q];  // the row already goes to d
      } else {
        const int64_t p = pair_base[d] + pair_cursor[d]++;
        pair_row[p] = r;
        item_pair[i] = p;
      }
    }
  }
}

}  // namespace alltoall::kernels
