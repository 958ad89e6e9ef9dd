#include "ops/layout_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "kernels/layout.h"

namespace alltoall::ops {

namespace {

using MoveFn = void (*)(const at::Tensor&, at::Tensor&, const at::Tensor&);

std::vector<int64_t> output_shape(const at::Tensor& input, int64_t rows) {
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape[0] = rows;
  return shape;
}

// Checks one side of a block move and returns its total rows.
int64_t check_blocks(const char* op, const at::Tensor& input, c10::IntArrayRef starts, c10::IntArrayRef counts,
                     int64_t rows_available) {
  TORCH_CHECK_VALUE(input.dim() >= 1, op, ": input must have at least one dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(starts.size() == counts.size(), op, ": starts has ", starts.size(), " entries but counts has ",
                    counts.size());
  int64_t total = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    TORCH_CHECK_VALUE(counts[i] >= 0 && starts[i] >= 0 && starts[i] + counts[i] <= rows_available, op,
                      ": block ", i, " covers rows [", starts[i], ", ", starts[i] + counts[i],
                      ") outside the ", rows_available, " rows available");
    total += counts[i];
  }
  return total;
}

// spans[i] = (src_row, dst_row, rows); the moving side is packed
// back to back starting at row 0.
at::Tensor make_spans(c10::IntArrayRef starts, c10::IntArrayRef counts, bool starts_are_source) {
  const int64_t n = static_cast<int64_t>(counts.size());
  at::Tensor spans = at::empty({n, 3}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = spans.mutable_data_ptr<int64_t>();
  int64_t packed_row = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[3 * i] = starts_are_source ? starts[i] : packed_row;
    out[3 * i + 1] = starts_are_source ? packed_row : starts[i];
    out[3 * i + 2] = counts[i];
    packed_row += counts[i];
  }
  return spans;
}

template <MoveFn move>
at::Tensor gather_blocks_impl(const at::Tensor& input, c10::IntArrayRef starts, c10::IntArrayRef counts) {
  const int64_t rows = check_blocks("gather_blocks", input, starts, counts, input.dim() ? input.size(0) : 0);
  const at::Tensor source = input.contiguous();
  at::Tensor output = at::empty(output_shape(source, rows), source.options());
  move(source, output, make_spans(starts, counts, /*starts_are_source=*/true));
  return output;
}

template <MoveFn move>
at::Tensor scatter_blocks_impl(const at::Tensor& input, c10::IntArrayRef starts, c10::IntArrayRef counts,
                               int64_t out_rows) {
  TORCH_CHECK_VALUE(out_rows >= 0, "scatter_blocks: out_rows must be >= 0, got ", out_rows);
  const int64_t rows = check_blocks("scatter_blocks", input, starts, counts, out_rows);
  TORCH_CHECK_VALUE(rows == input.size(0), "scatter_blocks: counts sum to ", rows, " but input has ",
                    input.size(0), " rows");
  const at::Tensor source = input.contiguous();
  at::Tensor output = at::zeros(output_shape(source, out_rows), source.options());
  move(source, output, make_spans(starts, counts, /*starts_are_source=*/false));
  return output;
}

at::Tensor gather_blocks_meta(const at::Tensor& input, c10::IntArrayRef starts, c10::IntArrayRef counts) {
  const int64_t rows = check_blocks("gather_blocks", input, starts, counts, input.dim() ? input.size(0) : 0);
  return at::empty(output_shape(input, rows), input.options());
}

at::Tensor scatter_blocks_meta(const at::Tensor& input, c10::IntArrayRef starts, c10::IntArrayRef counts,
                               int64_t out_rows) {
  check_blocks("scatter_blocks", input, starts, counts, out_rows);
  return at::empty(output_shape(input, out_rows), input.options());
}

}  // namespace

at::Tensor gather_blocks(const at::Tensor& input, c10::IntArrayRef starts, c10::IntArrayRef counts) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("alltoall::gather_blocks", "")
                       .typed<at::Tensor(const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef)>();
  return op.call(input, starts, counts);
}

at::Tensor scatter_blocks(const at::Tensor& input, c10::IntArrayRef starts, c10::IntArrayRef counts,
                          int64_t out_rows) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("alltoall::scatter_blocks", "")
                       .typed<at::Tensor(const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, int64_t)>();
  return op.call(input, starts, counts, out_rows);
}

}  // namespace alltoall::ops

// Both ops build their offsets on the host and copy them to the device on
// every call, so a CUDA graph must not capture them: the tag makes inductor
// (mode="reduce-overhead") run them outside its graphs.
TORCH_LIBRARY_FRAGMENT(alltoall, m) {
  m.def("gather_blocks(Tensor input, int[] starts, int[] counts) -> Tensor", {at::Tag::cudagraph_unsafe});
  m.def("scatter_blocks(Tensor input, int[] starts, int[] counts, int out_rows) -> Tensor",
        {at::Tag::cudagraph_unsafe});
}

TORCH_LIBRARY_IMPL(alltoall, CPU, m) {
  m.impl("gather_blocks", &alltoall::ops::gather_blocks_impl<alltoall::kernels::move_blocks_cpu>);
  m.impl("scatter_blocks", &alltoall::ops::scatter_blocks_impl<alltoall::kernels::move_blocks_cpu>);
}

TORCH_LIBRARY_IMPL(alltoall, Meta, m) {
  m.impl("gather_blocks", &alltoall::ops::gather_blocks_meta);
  m.impl("scatter_blocks", &alltoall::ops::scatter_blocks_meta);
}

#ifdef ALLTOALL_WITH_CUDA
TORCH_LIBRARY_IMPL(alltoall, CUDA, m) {
  m.impl("gather_blocks", &alltoall::ops::gather_blocks_impl<alltoall::kernels::move_blocks_cuda>);
  m.impl("scatter_blocks", &alltoall::ops::scatter_blocks_impl<alltoall::kernels::move_blocks_cuda>);
}
#endif
