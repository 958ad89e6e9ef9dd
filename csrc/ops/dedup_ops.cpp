// The deduplicating dispatch's index kernel as a torch op:
//   torch.ops.alltoall.dedup_pairs(row_ptr [R + 1], item_key [I], num_keys)
//       -> (item_pos [I], item_pair [I], pair_row [I], pair_counts [K], item_counts [K])
// (csrc/kernels/dedup_element.h). pair_row's first sum(pair_counts) entries
// are the pairs, the rest -1, so every output shape follows from the input
// shapes and the Meta kernel needs no data.
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <tuple>

#include "kernels/dedup.h"

namespace alltoall::ops {

namespace {

using PairsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_pairs(const at::Tensor& row_ptr, const at::Tensor& key, int64_t num_keys) {
  TORCH_CHECK_VALUE(row_ptr.dim() == 1 && row_ptr.scalar_type() == at::kLong && row_ptr.sym_numel() >= 1,
                    "dedup_pairs: row_ptr must be a 1-d int64 tensor of rows + 1 entries, got ",
                    row_ptr.scalar_type(), " of shape ", row_ptr.sym_sizes());
  TORCH_CHECK_VALUE(key.dim() == 1 && key.scalar_type() == at::kLong,
                    "dedup_pairs: item_key must be a 1-d int64 tensor, got ", key.scalar_type(), " of shape ",
                    key.sym_sizes());
  TORCH_CHECK_VALUE(row_ptr.device() == key.device(), "dedup_pairs: row_ptr is on ", row_ptr.device(),
                    " but item_key on ", key.device());
  TORCH_CHECK_VALUE(num_keys >= 1, "dedup_pairs: num_keys=", num_keys, " must be >= 1");
  // Values are checked on the CPU only: on a GPU it would cost a sync.
  if (!key.device().is_cpu()) return;
  const int64_t rows = row_ptr.numel() - 1;
  const int64_t* ptr = row_ptr.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(ptr[0] == 0 && ptr[rows] == key.numel(), "dedup_pairs: row_ptr must run from 0 to the ",
                    key.numel(), " items, got ", ptr[0], " .. ", ptr[rows]);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(ptr[r] <= ptr[r + 1], "dedup_pairs: row_ptr decreases at row ", r, " (", ptr[r], " > ",
                      ptr[r + 1], ")");
  }
  if (key.numel() == 0) return;
  auto [lo, hi] = at::aminmax(key);
  TORCH_CHECK_VALUE(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < num_keys, "dedup_pairs: item_key holds values in [",
                    lo.item<int64_t>(), ", ", hi.item<int64_t>(), "], outside [-1, ", num_keys, ")");
}

PairsResult empty_pairs(const at::Tensor& key, int64_t num_keys) {
  const auto options = key.options();
  const c10::SymInt items = key.sym_size(0);
  return {at::full_symint({items}, -1, options), at::full_symint({items}, -1, options),
          at::full_symint({items}, -1, options), at::empty({num_keys}, options), at::empty({num_keys}, options)};
}

template <void (*pairs)(const at::Tensor&, const at::Tensor&, int64_t, kernels::PairTable&)>
PairsResult pairs_impl(const at::Tensor& row_ptr, const at::Tensor& key, int64_t num_keys) {
  const at::Tensor ptr = row_ptr.contiguous();
  const at::Tensor keys = key.contiguous();
  check_pairs(ptr, keys, num_keys);
  PairsResult result = empty_pairs(keys, num_keys);
  kernels::PairTable table{std::get<0>(result), std::get<1>(result), std::get<2>(result), std::get<3>(result),
                           std::get<4>(result)};
  pairs(ptr, keys, num_keys, table);
  return result;
}

PairsResult pairs_meta(const at::Tensor& row_ptr, const at::Tensor& key, int64_t num_keys) {
  check_pairs(row_ptr, key, num_keys);
  return empty_pairs(key, num_keys);
}

}  // namespace

}  // namespace alltoall::ops

TORCH_LIBRARY_FRAGMENT(alltoall, m) {
  m.def("dedup_pairs(Tensor row_ptr, Tensor item_key, int num_keys) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(alltoall, CPU, m) {
  m.impl("dedup_pairs", &alltoall::ops::pairs_impl<alltoall::kernels::dedup_pairs_cpu>);
}

TORCH_LIBRARY_IMPL(alltoall, Meta, m) { m.impl("dedup_pairs", &alltoall::ops::pairs_meta); }

#ifdef ALLTOALL_WITH_CUDA
TORCH_LIBRARY_IMPL(alltoall, CUDA, m) {
  m.impl("dedup_pairs", &alltoall::ops::pairs_impl<alltoall::kernels::dedup_pairs_cuda>);
}
#endif
