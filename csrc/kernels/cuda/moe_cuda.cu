#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>

#include "kernels/moe.h"
#include "kernels/moe_element.h"

namespace alltoall::kernels {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535;
// Fewer tokens per cell than on the CPU: cells are the route's threads.
constexpr int64_t kRouteChunk = 32;

int grid_for(int64_t items, int64_t per_block) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, kMaxGrid)));
}

// The route: one thread per token for top-k, one per cell for tallies and
// slots, one thread block per expert for the scan. The logic is
// moe_element.h's.
template <typename T, typename Acc>
__global__ void top_k_kernel(const T* logits, int64_t tokens, int64_t experts, int64_t k, int64_t* index) {
  for (int64_t s = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; s < tokens; s += int64_t{gridDim.x} * blockDim.x) {
    select_top_k<T, Acc>(logits + s * experts, experts, k, index + s * k);
  }
}

__global__ void tally_kernel(const int64_t* index, int64_t tokens, int64_t k, int64_t chunks, int64_t experts,
                             int64_t* tally) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < k * chunks; c += int64_t{gridDim.x} * blockDim.x) {
    const int64_t first = (c % chunks) * kRouteChunk;
    const int64_t last = first + kRouteChunk < tokens ? first + kRouteChunk : tokens;
    tally_cell(index, k, c / chunks, first, last, tally + c * experts);
  }
}

// Expert e's counters over all cells, as a parallel prefix sum: each thread
// takes a contiguous segment of cells, the block scans the segments' sums,
// and each thread rescans its segment from its offset. Priority order is
// kept: segment t precedes segment t + 1.
__global__ void scan_kernel(int64_t* tally, int64_t cells, int64_t experts, int64_t* counts) {
  using BlockScan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename BlockScan::TempStorage scratch;
  const int64_t per_thread = (cells + kThreads - 1) / kThreads;
  const int64_t first = threadIdx.x * per_thread;
  const int64_t begin = first < cells ? first : cells;
  const int64_t end = begin + per_thread < cells ? begin + per_thread : cells;
  for (int64_t e = blockIdx.x; e < experts; e += gridDim.x) {
    int64_t offset = 0;
    int64_t total = 0;
    BlockScan(scratch).ExclusiveSum(sum_cells(tally, begin, end, experts, e), offset, total);
    scan_cells(tally, begin, end, experts, e, offset);
    if (threadIdx.x == 0) counts[e] = total;
    __syncthreads();  // scratch is reused by the next expert
  }
}

__global__ void bases_kernel(const int64_t* counts, int64_t experts, int64_t capacity, int64_t* base) {
  if (blockIdx.x == 0 && threadIdx.x == 0) expert_bases(counts, experts, capacity, base);
}

__global__ void assign_kernel(const int64_t* index, int64_t tokens, int64_t k, int64_t chunks, int64_t experts,
                              int64_t* tally, const int64_t* base, int64_t capacity, int64_t* dest, int64_t* source) {
  for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < k * chunks; c += int64_t{gridDim.x} * blockDim.x) {
    const int64_t first = (c % chunks) * kRouteChunk;
    const int64_t last = first + kRouteChunk < tokens ? first + kRouteChunk : tokens;
    assign_cell(index, k, c / chunks, first, last, tally + c * experts, base, capacity, dest, source);
  }
}

// One thread block per row (or token, or assignment); its threads take
// interleaved columns, so neighbouring threads touch neighbouring words.
template <typename T, typename Acc>
__global__ void dispatch_kernel(const T* x, T* out, const int64_t* source, const T* weights, int64_t k,
                                int64_t cols, int64_t rows) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    dispatch_row<T, Acc>(x, out, source, weights, k, cols, r, threadIdx.x, blockDim.x);
  }
}

template <typename T, typename Acc>
__global__ void combine_kernel(const T* rows, T* y, const int64_t* dest, const T* weights, int64_t k, int64_t cols,
                               int64_t tokens) {
  for (int64_t s = blockIdx.x; s < tokens; s += gridDim.x) {
    for (int64_t m = threadIdx.x; m < cols; m += blockDim.x) combine_tile<T, Acc, 1>(rows, y, dest, weights, k, cols, s, m);
  }
}

template <typename T, typename Acc>
__global__ void weight_grad_kernel(const T* tokens, const T* rows, const int64_t* dest, int64_t k, int64_t cols,
                                   int64_t assignments, T* grad) {
  __shared__ Acc parts[kThreads];
  for (int64_t a = blockIdx.x; a < assignments; a += gridDim.x) {
    parts[threadIdx.x] = weight_grad_part<T, Acc>(tokens, rows, dest, k, cols, a, threadIdx.x, blockDim.x);
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
      if (threadIdx.x < stride) parts[threadIdx.x] += parts[threadIdx.x + stride];
      __syncthreads();
    }
    if (threadIdx.x == 0) grad[a] = static_cast<T>(parts[0]);
    __syncthreads();
  }
}

}  // namespace

void route_cuda(const at::Tensor& logits, int64_t capacity, RouteTable& table) {
  const int64_t tokens = logits.size(0);
  const int64_t experts = logits.size(1);
  const int64_t k = table.expert_index.size(1);
  const int64_t chunks = (tokens + kRouteChunk - 1) / kRouteChunk;
  const int64_t cells = k * chunks;
  const c10::cuda::CUDAGuard guard(logits.device());
  auto stream = at::cuda::getCurrentCUDAStream(logits.device().index());
  const auto options = logits.options().dtype(at::kLong);
  at::Tensor tally = at::zeros({std::max<int64_t>(cells, 1), experts}, options);
  at::Tensor base = at::empty({experts}, options);
  int64_t* index = table.expert_index.mutable_data_ptr<int64_t>();
  int64_t* counts = table.counts.mutable_data_ptr<int64_t>();
  if (tokens > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_route_cuda", [&] {
      using Acc = at::opmath_type<scalar_t>;
      top_k_kernel<scalar_t, Acc><<<grid_for(tokens, kThreads), kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), tokens, experts, k, index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    tally_kernel<<<grid_for(cells, kThreads), kThreads, 0, stream>>>(index, tokens, k, chunks, experts,
                                                                     tally.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scan_kernel<<<grid_for(experts, 1), kThreads, 0, stream>>>(tally.mutable_data_ptr<int64_t>(), cells,
                                                                    experts, counts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bases_kernel<<<1, 1, 0, stream>>>(counts, experts, capacity, base.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (tokens > 0) {
    assign_kernel<<<grid_for(cells, kThreads), kThreads, 0, stream>>>(
        index, tokens, k, chunks, experts, tally.mutable_data_ptr<int64_t>(), base.const_data_ptr<int64_t>(),
        capacity, table.dest_row.mutable_data_ptr<int64_t>(), table.source.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void dispatch_cuda(const at::Tensor& x, const at::Tensor& source, const at::Tensor& weights, int64_t k,
                   at::Tensor& out) {
  const int64_t rows = out.size(0);
  const int64_t cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = at::cuda::getCurrentCUDAStream(x.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_dispatch_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    dispatch_kernel<scalar_t, Acc><<<grid_for(rows, 1), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), source.const_data_ptr<int64_t>(),
        weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr, k, cols, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void combine_cuda(const at::Tensor& rows, const at::Tensor& dest_row, const at::Tensor& weights, at::Tensor& y) {
  const int64_t tokens = y.size(0);
  const int64_t cols = y.size(1);
  if (tokens == 0 || cols == 0) return;
  const c10::cuda::CUDAGuard guard(rows.device());
  auto stream = at::cuda::getCurrentCUDAStream(rows.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "moe_combine_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    combine_kernel<scalar_t, Acc><<<grid_for(tokens, 1), kThreads, 0, stream>>>(
        rows.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), dest_row.const_data_ptr<int64_t>(),
        weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr, dest_row.size(1), cols, tokens);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void weight_grad_cuda(const at::Tensor& tokens, const at::Tensor& rows, const at::Tensor& dest_row,
                      at::Tensor& grad) {
  const int64_t assignments = dest_row.numel();
  if (assignments == 0) return;
  const c10::cuda::CUDAGuard guard(tokens.device());
  auto stream = at::cuda::getCurrentCUDAStream(tokens.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "moe_weight_grad_cuda", [&] {
    using Acc = at::opmath_type<scalar_t>;
    weight_grad_kernel<scalar_t, Acc><<<grid_for(assignments, 1), kThreads, 0, stream>>>(
        tokens.const_data_ptr<scalar_t>(), rows.const_data_ptr<scalar_t>(), dest_row.const_data_ptr<int64_t>(),
        dest_row.size(1), tokens.size(1), assignments, grad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace alltoall::kernels
