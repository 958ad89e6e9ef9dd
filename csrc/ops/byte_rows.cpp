#include "ops/byte_rows.h"

#include <ATen/ops/empty.h>

namespace alltoall::ops {

at::Tensor as_byte_rows(const at::Tensor& x) {
  const int64_t rows = x.size(0);
  int64_t row_elems = 1;
  for (int64_t d = 1; d < x.dim(); ++d) row_elems *= x.size(d);
  at::Tensor rows_view = x.view({rows, row_elems});
  if (rows_view.scalar_type() == at::kByte) return rows_view;
  // view(dtype) cannot reinterpret an empty row; nothing moves anyway.
  if (row_elems == 0) return at::empty({rows, 0}, x.options().dtype(at::kByte));
  return rows_view.view(at::kByte);
}

at::Tensor from_byte_rows(const at::Tensor& bytes, const at::Tensor& like, int64_t rows) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  shape[0] = rows;
  if (bytes.size(1) == 0) return at::empty(shape, like.options());
  return bytes.view(like.scalar_type()).view(shape);
}

}  // namespace alltoall::ops
