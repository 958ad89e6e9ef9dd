#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernels/moe.h"
#include "kernels/moe_element.h"

namespace alltoall::kernels {

namespace {

// Tokens per chunk of the route scan. The slots do not depend on it: the
// priority order is the same however the tokens are cut.
constexpr int64_t kRouteChunk = 256;
// Columns one combine step accumulates at once: wide enough to vectorise,
// small enough to stay in registers and L1.
constexpr int kCombineTile = 64;

// Rows are read in routing order, which jumps across memory: start loading
// the first lines of a row this many rows ahead of its use.
constexpr int64_t kPrefetchAhead = 2;
constexpr int64_t kPrefetchLines = 8;

template <typename T>
void prefetch_row(const T* row, int64_t cols) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t n = std::min<int64_t>(kPrefetchLines, (cols * static_cast<int64_t>(sizeof(T)) + 63) / 64);
  for (int64_t line = 0; line < n; ++line) __builtin_prefetch(bytes + 64 * line);
}

template <typename T>
void prefetch_combine_sources(const T* rows, const int64_t* dest, int64_t k, int64_t cols, int64_t s, int64_t end) {
  if (s >= end) return;
  for (int64_t j = 0; j < k; ++j) {
    if (dest[s * k + j] >= 0) prefetch_row(rows + dest[s * k + j] * cols, cols);
  }
}

template <typename T>
void prefetch_dispatch_source(const T* x, const int64_t* source, int64_t k, int64_t cols, int64_t r, int64_t end) {
  if (r < end && source[r] >= 0) prefetch_row(x + (source[r] / k) * cols, cols);
}

// About this many bytes of copying per parallel task.
int64_t grain_for(int64_t row_bytes) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, row_bytes)); }

}  // namespace

void route_cpu(const at::Tensor& logits, int64_t capacity, RouteTable& table) {
  const int64_t tokens = logits.size(0);
  const int64_t experts = logits.size(1);
  const int64_t k = table.expert_index.size(1);
  const int64_t chunks = (tokens + kRouteChunk - 1) / kRouteChunk;
  const int64_t cells = k * chunks;
  int64_t* index = table.expert_index.mutable_data_ptr<int64_t>();
  int64_t* dest = table.dest_row.mutable_data_ptr<int64_t>();
  int64_t* source = table.source.mutable_data_ptr<int64_t>();
  int64_t* counts = table.counts.mutable_data_ptr<int64_t>();
  std::vector<int64_t> tally(static_cast<size_t>(cells * experts), 0);
  std::vector<int64_t> base(static_cast<size_t>(experts), 0);

  // Pass 1, per chunk: top-k of each token, then the chunk's tallies.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "moe_route_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t* rows = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t first = t * kRouteChunk;
        const int64_t last = std::min(tokens, first + kRouteChunk);
        for (int64_t s = first; s < last; ++s) {
          select_top_k<scalar_t, Acc>(rows + s * experts, experts, k, index + s * k);
        }
        for (int64_t j = 0; j < k; ++j) {
          tally_cell(index, k, j, first, last, tally.data() + cell_of(j, t, chunks) * experts);
        }
      }
    });
  });
  // Pass 2: per-expert prefix sums in priority order, then the bases.
  at::parallel_for(0, experts, 16, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) counts[e] = scan_expert(tally.data(), cells, experts, e);
  });
  expert_bases(counts, experts, capacity, base.data());
  // Pass 3, per cell: slots, then both views of the table.
  at::parallel_for(0, cells, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t j = c / chunks;
      const int64_t t = c % chunks;
      const int64_t first = t * kRouteChunk;
      const int64_t last = std::min(tokens, first + kRouteChunk);
      assign_cell(index, k, j, first, last, tally.data() + c * experts, base.data(), capacity, dest, source);
    }
  });
}

void dispatch_cpu(const at::Tensor& x, const at::Tensor& source, const at::Tensor& weights, int64_t k,
                  at::Tensor& out) {
  const int64_t rows = out.size(0);
  const int64_t cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const int64_t* src_of = source.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_dispatch_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    const scalar_t* w = weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(cols * x.element_size()), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        prefetch_dispatch_source(in, src_of, k, cols, r + kPrefetchAhead, end);
        dispatch_row<scalar_t, Acc>(in, dst, src_of, w, k, cols, r, 0, 1);
      }
    });
  });
}

void combine_cpu(const at::Tensor& rows, const at::Tensor& dest_row, const at::Tensor& weights, at::Tensor& y) {
  const int64_t tokens = y.size(0);
  const int64_t cols = y.size(1);
  const int64_t k = dest_row.size(1);
  if (tokens == 0 || cols == 0) return;
  const int64_t* dest = dest_row.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "moe_combine_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t* in = rows.const_data_ptr<scalar_t>();
    const scalar_t* w = weights.defined() ? weights.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const int64_t grain = grain_for(k * cols * rows.element_size());
    at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        if constexpr (std::is_same_v<scalar_t, Acc>) {
          prefetch_combine_sources(in, dest, k, cols, s + kPrefetchAhead, end);
          combine_row_in_place<scalar_t>(in, out, dest, w, k, cols, s, 0, 1);
        } else {
          for (int64_t m0 = 0; m0 < cols; m0 += kCombineTile) {
            combine_tile<scalar_t, Acc, kCombineTile>(in, out, dest, w, k, cols, s, m0);
          }
        }
      }
    });
  });
}

void weight_grad_cpu(const at::Tensor& tokens, const at::Tensor& rows, const at::Tensor& dest_row,
                     at::Tensor& grad) {
  const int64_t assignments = dest_row.numel();
  const int64_t k = dest_row.size(1);
  const int64_t cols = tokens.size(1);
  if (assignments == 0) return;
  const int64_t* dest = dest_row.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "moe_weight_grad_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t* t = tokens.const_data_ptr<scalar_t>();
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    scalar_t* out = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, assignments, grain_for(2 * cols * tokens.element_size()), [&](int64_t begin, int64_t end) {
      for (int64_t a = begin; a < end; ++a) {
        out[a] = static_cast<scalar_t>(weight_grad_part<scalar_t, Acc>(t, r, dest, k, cols, a, 0, 1));
      }
    });
  });
}

}  // namespace alltoall::kernels
