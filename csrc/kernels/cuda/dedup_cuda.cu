#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "kernels/dedup.h"
#include "kernels/dedup_element.h"

namespace alltoall::kernels {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535;
// Fewer rows per chunk than on the CPU: chunks are the threads.
constexpr int64_t kRowChunk = 32;

int grid_for(int64_t items, int64_t per_block) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, kMaxGrid)));
}

__device__ int64_t chunk_end(int64_t c, int64_t rows) {
  return (c + 1) * kRowChunk < rows ? (c + 1) * kRowChunk : rows;
}

__global__ void tally_kernel(const int64_t* row_ptr, const int64_t* key, int64_t rows, int64_t chunks,
                             int64_t num_keys, int64_t* pair_tally, int64_t* item_tally) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < chunks; c += int64_t{gridDim.x} * blockDim.x) {
    tally_rows(row_ptr, key, c * kRowChunk, chunk_end(c, rows), pair_tally + c * num_keys,
               item_tally + c * num_keys);
  }
}

// Key d's tallies over all chunks as a block-wide prefix sum: each thread
// scans a contiguous segment of chunks from the block-scanned offset, so
// row order is kept. One block per key; pair and item tallies in turn.
__global__ void scan_kernel(int64_t* pair_tally, int64_t* item_tally, int64_t chunks, int64_t num_keys,
                            int64_t* pair_counts, int64_t* item_counts) {
  using BlockScan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename BlockScan::TempStorage scratch;
  const int64_t per_thread = (chunks + kThreads - 1) / kThreads;
  const int64_t first = threadIdx.x * per_thread;
  const int64_t begin = first < chunks ? first : chunks;
  const int64_t end = begin + per_thread < chunks ? begin + per_thread : chunks;
  for (int64_t d = blockIdx.x; d < num_keys; d += gridDim.x) {
    int64_t* tallies[2] = {pair_tally, item_tally};
    int64_t* counts[2] = {pair_counts, item_counts};
    for (int t = 0; t < 2; ++t) {
      int64_t offset = 0;
      int64_t total = 0;
      BlockScan(scratch).ExclusiveSum(sum_key(tallies[t], begin, end, num_keys, d), offset, total);
      scan_key(tallies[t], begin, end, num_keys, d, offset);
      if (threadIdx.x == 0) counts[t][d] = total;
      __syncthreads();  // scratch is reused
    }
  }
}

__global__ void bases_kernel(const int64_t* pair_counts, const int64_t* item_counts, int64_t num_keys,
                             int64_t* pair_base, int64_t* item_base) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    key_bases(pair_counts, num_keys, pair_base);
    key_bases(item_counts, num_keys, item_base);
  }
}

__global__ void assign_kernel(const int64_t* row_ptr, const int64_t* key, int64_t rows, int64_t chunks,
                              int64_t num_keys, int64_t* pair_tally, int64_t* item_tally, const int64_t* pair_base,
                              const int64_t* item_base, int64_t* item_pos, int64_t* item_pair, int64_t* pair_row) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < chunks; c += int64_t{gridDim.x} * blockDim.x) {
    assign_rows(row_ptr, key, c * kRowChunk, chunk_end(c, rows), pair_tally + c * num_keys,
                item_tally + c * num_keys, pair_base, item_base, item_pos, item_pair, pair_row);
  }
}

}  // namespace

void dedup_pairs_cuda(const at::Tensor& row_ptr, const at::Tensor& key, int64_t num_keys, PairTable& table) {
  const int64_t rows = row_ptr.numel() - 1;
  const int64_t chunks = (rows + kRowChunk - 1) / kRowChunk;
  const c10::cuda::CUDAGuard guard(key.device());
  auto stream = at::cuda::getCurrentCUDAStream(key.device().index());
  const auto options = key.options();
  at::Tensor pair_tally = at::zeros({std::max<int64_t>(chunks, 1), num_keys}, options);
  at::Tensor item_tally = at::zeros({std::max<int64_t>(chunks, 1), num_keys}, options);
  at::Tensor bases = at::empty({2, num_keys}, options);
  int64_t* pair_base = bases.mutable_data_ptr<int64_t>();
  int64_t* item_base = pair_base + num_keys;
  if (chunks > 0) {
    tally_kernel<<<grid_for(chunks, kThreads), kThreads, 0, stream>>>(
        row_ptr.const_data_ptr<int64_t>(), key.const_data_ptr<int64_t>(), rows, chunks, num_keys,
        pair_tally.mutable_data_ptr<int64_t>(), item_tally.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scan_kernel<<<grid_for(num_keys, 1), kThreads, 0, stream>>>(
      pair_tally.mutable_data_ptr<int64_t>(), item_tally.mutable_data_ptr<int64_t>(), chunks, num_keys,
      table.pair_counts.mutable_data_ptr<int64_t>(), table.item_counts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bases_kernel<<<1, 1, 0, stream>>>(table.pair_counts.const_data_ptr<int64_t>(),
                                    table.item_counts.const_data_ptr<int64_t>(), num_keys, pair_base, item_base);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks > 0) {
    assign_kernel<<<grid_for(chunks, kThreads), kThreads, 0, stream>>>(
        row_ptr.const_data_ptr<int64_t>(), key.const_data_ptr<int64_t>(), rows, chunks, num_keys,
        pair_tally.mutable_data_ptr<int64_t>(), item_tally.mutable_data_ptr<int64_t>(), pair_base, item_base,
        table.item_pos.mutable_data_ptr<int64_t>(), table.item_pair.mutable_data_ptr<int64_t>(),
        table.pair_row.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace alltoall::kernels
