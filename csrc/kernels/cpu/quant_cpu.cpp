#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "kernels/quant.h"
#include "kernels/quant_element.h"

namespace alltoall::kernels {

namespace {

// About this many input values per parallel task: small rows are batched so
// a task is worth its scheduling.
constexpr int64_t kValuesPerTask = 1 << 15;

int64_t grain_for(int64_t cols) { return std::max<int64_t>(1, kValuesPerTask / std::max<int64_t>(1, cols)); }

}  // namespace

void quantize_fp8_cpu(const at::Tensor& x, at::Tensor& packed) {
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  if (rows == 0 || cols == 0) return;
  const int64_t blocks = quant_blocks(cols);
  const int64_t row_bytes = packed_row_bytes(cols);
  uint8_t* out = packed.mutable_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_fp8_cpu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t b = 0; b < blocks; ++b) quantize_block(in + r * cols, out + r * row_bytes, cols, b);
      }
    });
  });
}

void dequantize_fp8_cpu(const at::Tensor& packed, at::Tensor& out) {
  const int64_t rows = out.size(0);
  const int64_t cols = out.size(1);
  if (rows == 0 || cols == 0) return;
  const int64_t blocks = quant_blocks(cols);
  const int64_t row_bytes = packed_row_bytes(cols);
  const uint8_t* in = packed.const_data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dequantize_fp8_cpu", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t b = 0; b < blocks; ++b) dequantize_block_values(in + r * row_bytes, dst + r * cols, cols, b, 0, 1);
      }
    });
  });
}

}  // namespace alltoall::kernels
