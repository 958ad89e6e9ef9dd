// Per-element logic of the MoE token-to-expert kernels, shared by the CPU
// loops and the CUDA kernels.
//
// The mapping table is dense and has two views of the same assignment set.
// Assignment a = s * k + j is token s's j-th choice (best first):
//   dest_row[a]  the buffer row it occupies, or -1 when dropped;
//   source[r]    the assignment in buffer row r, or -1 for a padding row.
// Dispatch and combine are then plain row gathers over one view or the
// other; no one-hot [S, E, C] tensor and no atomics are needed, and every
// output element is written by exactly one thread.
//
// Slots are given in priority order (choice j, then token s): every first
// choice is placed before any second choice, and within a choice earlier
// tokens come first. Capacity drops the assignments with slot >= capacity.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace alltoall::kernels {

// Writes the k best experts of one token into idx[0..k), best first. The
// larger logit wins; equal logits go to the lower expert index, so the
// choice never depends on the order of evaluation.
template <typename T, typename Acc>
ALLTOALL_INLINE void select_top_k(const T* logits, int64_t num_experts, int64_t k, int64_t* idx) {
  int64_t filled = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const Acc v = static_cast<Acc>(logits[e]);
    if (filled == k && !(v > static_cast<Acc>(logits[idx[k - 1]]))) continue;
    // Strictly greater moves ahead, so an equal earlier (lower) index stays first.
    int64_t p = filled < k ? filled : k - 1;
    while (p > 0 && v > static_cast<Acc>(logits[idx[p - 1]])) {
      idx[p] = idx[p - 1];
      --p;
    }
    idx[p] = e;
    if (filled < k) ++filled;
  }
}

// The tokens are cut into chunks; a cell is one (choice j, chunk t) pair and
// holds one counter per expert: tally[(j * chunks + t) * E + e].
ALLTOALL_INLINE int64_t cell_of(int64_t j, int64_t chunk, int64_t chunks) { return j * chunks + chunk; }

// Counts how many of the tokens [begin, end) have expert e as choice j.
ALLTOALL_INLINE void tally_cell(const int64_t* expert_index, int64_t k, int64_t j, int64_t begin, int64_t end,
                                int64_t* tally) {
  for (int64_t s = begin; s < end; ++s) tally[expert_index[s * k + j]] += 1;
}

// The prefix sum of expert e's counters runs in priority order (cell 0, 1,
// ...). These two pieces let it run over segments of cells: the CPU scans
// all cells as one segment; a GPU thread block gives each thread a segment,
// sums them, scans the sums across the block and then rescans each segment
// from its offset.

// The sum of expert e's counters in cells [begin, end).
ALLTOALL_INLINE int64_t sum_cells(const int64_t* tally, int64_t begin, int64_t end, int64_t num_experts, int64_t e) {
  int64_t total = 0;
  for (int64_t c = begin; c < end; ++c) total += tally[c * num_experts + e];
  return total;
}

// Replaces expert e's counters in cells [begin, end) by their exclusive
// prefix sums starting at `running`, and returns the running sum after them.
ALLTOALL_INLINE int64_t scan_cells(int64_t* tally, int64_t begin, int64_t end, int64_t num_experts, int64_t e,
                                   int64_t running) {
  for (int64_t c = begin; c < end; ++c) {
    const int64_t count = tally[c * num_experts + e];
    tally[c * num_experts + e] = running;
    running += count;
  }
  return running;
}

// All of expert e's counters; returns the expert's total.
ALLTOALL_INLINE int64_t scan_expert(int64_t* tally, int64_t num_cells, int64_t num_experts, int64_t e) {
  return scan_cells(tally, 0, num_cells, num_experts, e, 0);
}

// First buffer row of each expert: e * capacity for the padded [E, C] layout
// (capacity >= 0); the running sum of the counts for the compact, dropless
// layout (capacity < 0).
ALLTOALL_INLINE void expert_bases(const int64_t* counts, int64_t num_experts, int64_t capacity, int64_t* base) {
  int64_t running = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    base[e] = capacity >= 0 ? e * capacity : running;
    running += counts[e];
  }
}

// Gives the choice-j assignments of tokens [begin, end) their slots. `cursor`
// is this cell's row of the scanned tally: the first free slot of each expert.
ALLTOALL_INLINE void assign_cell(const int64_t* expert_index, int64_t k, int64_t j, int64_t begin, int64_t end,
                                 int64_t* cursor, const int64_t* base, int64_t capacity, int64_t* dest_row,
                                 int64_t* source) {
  for (int64_t s = begin; s < end; ++s) {
    const int64_t a = s * k + j;
    const int64_t e = expert_index[a];
    const int64_t slot = cursor[e]++;
    if (capacity >= 0 && slot >= capacity) {
      dest_row[a] = -1;
      continue;
    }
    const int64_t r = base[e] + slot;
    dest_row[a] = r;
    source[r] = a;
  }
}

// Calls body(m) for m = 0, lanes, 2 * lanes, ... below n. A single lane (the
// CPU) takes a unit-stride loop the compiler can vectorise; CUDA threads
// take interleaved columns.
template <typename Body>
ALLTOALL_INLINE void for_columns(int64_t n, int64_t lanes, Body body) {
  if (lanes == 1) {
    for (int64_t m = 0; m < n; ++m) body(m);
  } else {
    for (int64_t m = 0; m < n; m += lanes) body(m);
  }
}

// dst[m] = src[m] for the columns of this lane. One lane on the host is a
// plain memcpy, which uses the widest vector unit the CPU has (the extension
// itself is compiled for baseline x86-64).
template <typename T>
ALLTOALL_INLINE void copy_columns(T* dst, const T* src, int64_t n, int64_t lanes) {
#ifndef __CUDA_ARCH__
  if (lanes == 1) {
    if (n > 0) std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
    return;
  }
#endif
  for_columns(n, lanes, [&](int64_t m) { dst[m] = src[m]; });
}

// Buffer row r, columns lane, lane + lanes, ...: the row of the token its
// assignment came from, scaled by that assignment's weight when weights are
// given, or zeros for a padding row.
template <typename T, typename Acc>
ALLTOALL_INLINE void dispatch_row(const T* x, T* out, const int64_t* source, const T* weights, int64_t k,
                                  int64_t cols, int64_t r, int64_t lane, int64_t lanes) {
  T* dst = out + r * cols + lane;
  const int64_t a = source[r];
  const int64_t n = cols - lane;
  if (a < 0) {
    for_columns(n, lanes, [&](int64_t m) { dst[m] = static_cast<T>(0); });
    return;
  }
  const T* src = x + (a / k) * cols + lane;
  if (weights == nullptr) {
    copy_columns(dst, src, n, lanes);
    return;
  }
  const Acc w = static_cast<Acc>(weights[a]);
  for_columns(n, lanes, [&](int64_t m) { dst[m] = static_cast<T>(w * static_cast<Acc>(src[m])); });
}

// Columns [m0, m0 + Tile) of token s's output: the sum over its kept
// choices of weight times buffer row, accumulated in Acc. The CPU takes wide
// tiles, so the inner loop vectorises; a CUDA thread takes a tile of one.
template <typename T, typename Acc, int Tile>
ALLTOALL_INLINE void combine_tile(const T* rows, T* y, const int64_t* dest_row, const T* weights, int64_t k,
                                  int64_t cols, int64_t s, int64_t m0) {
  const int64_t n = cols - m0 < Tile ? cols - m0 : Tile;
  Acc acc[Tile];
  for (int64_t i = 0; i < n; ++i) acc[i] = static_cast<Acc>(0);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t a = s * k + j;
    const int64_t d = dest_row[a];
    if (d < 0) continue;
    const Acc w = weights == nullptr ? static_cast<Acc>(1) : static_cast<Acc>(weights[a]);
    const T* row = rows + d * cols + m0;
    for (int64_t i = 0; i < n; ++i) acc[i] += w * static_cast<Acc>(row[i]);
  }
  T* out = y + s * cols + m0;
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(acc[i]);
}

// Token s's whole output row, for element types that are their own
// accumulator (float, double): the first kept choice is written scaled, the
// others are added in place while the row sits in L1; zeros when every
// choice was dropped. Same sum, in the same order, as combine_tile.
template <typename T>
ALLTOALL_INLINE void combine_row_in_place(const T* rows, T* y, const int64_t* dest_row, const T* weights, int64_t k,
                                          int64_t cols, int64_t s, int64_t lane, int64_t lanes) {
  T* out = y + s * cols + lane;
  const int64_t n = cols - lane;
  bool written = false;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t a = s * k + j;
    const int64_t d = dest_row[a];
    if (d < 0) continue;
    const T w = weights == nullptr ? static_cast<T>(1) : weights[a];
    const T* row = rows + d * cols + lane;
    if (written) {
      for_columns(n, lanes, [&](int64_t m) { out[m] += w * row[m]; });
    } else {
      for_columns(n, lanes, [&](int64_t m) { out[m] = w * row[m]; });
      written = true;
    }
  }
  if (!written) for_columns(n, lanes, [&](int64_t m) { out[m] = static_cast<T>(0); });
}

// Part of the dot product of token row s and the buffer row of assignment
// a = s * k + j: the gradient of a combine weight. Zero when dropped. The
// CUDA kernel sums the lanes' parts.
template <typename T, typename Acc>
ALLTOALL_INLINE Acc weight_grad_part(const T* tokens, const T* rows, const int64_t* dest_row, int64_t k,
                                     int64_t cols, int64_t a, int64_t lane, int64_t lanes) {
  const int64_t d = dest_row[a];
  Acc acc = static_cast<Acc>(0);
  if (d < 0) return acc;
  const T* t = tokens + (a / k) * cols + lane;
  const T* r = rows + d * cols + lane;
  for_columns(cols - lane, lanes, [&](int64_t m) { acc += static_cast<Acc>(t[m]) * static_cast<Acc>(r[m]); });
  return acc;
}

}  // namespace alltoall::kernels
