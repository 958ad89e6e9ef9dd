// The MoE token-to-expert kernels as torch ops:
//   torch.ops.alltoall.moe_route(logits, k, capacity)
//       -> (expert_index [S, k], dest_row [S, k], source [R], counts [E])
//   torch.ops.alltoall.moe_dispatch(x [S, M], source, dest_row, weights?) -> [R, M]
//   torch.ops.alltoall.moe_combine(rows [R, M], source, dest_row, weights?) -> [S, M]
//   torch.ops.alltoall.moe_weight_grad(tokens [S, M], rows [R, M], source, dest_row) -> [S, k]
// Dispatch and combine are each other's adjoint; their autograd
// (moe_autograd.cpp) is built from these four ops. source and
// dest_row must come from one moe_route call. Every output shape follows
// from the input shapes, so the Meta kernels need no data.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "kernels/moe.h"

namespace alltoall::ops {

namespace {

using RouteResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Shape of a route; returns the number of buffer rows R. Sizes are SymInts
// throughout, so the Meta kernels also trace with dynamic shapes.
c10::SymInt check_route(const at::Tensor& logits, int64_t k, int64_t capacity) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "moe_route: logits must be [tokens, experts], got shape ",
                    logits.sym_sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()), "moe_route: logits must be floating point, got ",
                    logits.scalar_type());
  const c10::SymInt experts = logits.sym_size(1);
  TORCH_CHECK_VALUE(experts >= 1, "moe_route: logits have 0 experts (shape ", logits.sym_sizes(), ")");
  TORCH_CHECK_VALUE(k >= 1 && k <= experts, "moe_route: k=", k, " must be in [1, ", experts,
                    "] (the number of experts)");
  TORCH_CHECK_VALUE(capacity >= -1, "moe_route: capacity=", capacity, " must be >= 0, or -1 for dropless");
  return capacity >= 0 ? experts * capacity : logits.sym_size(0) * k;
}

RouteResult empty_route(const at::Tensor& logits, int64_t k, const c10::SymInt& rows) {
  const auto options = logits.options().dtype(at::kLong);
  const c10::SymInt tokens = logits.sym_size(0);
  return {at::empty_symint({tokens, k}, options), at::empty_symint({tokens, k}, options),
          at::full_symint({rows}, -1, options), at::empty_symint({logits.sym_size(1)}, options)};
}

template <void (*route)(const at::Tensor&, int64_t, kernels::RouteTable&)>
RouteResult route_impl(const at::Tensor& logits, int64_t k, int64_t capacity) {
  const c10::SymInt rows = check_route(logits, k, capacity);
  RouteResult result = empty_route(logits, k, rows);
  kernels::RouteTable table{std::get<0>(result), std::get<1>(result), std::get<2>(result), std::get<3>(result)};
  route(logits.contiguous(), capacity, table);
  return result;
}

RouteResult route_meta(const at::Tensor& logits, int64_t k, int64_t capacity) {
  return empty_route(logits, k, check_route(logits, k, capacity));
}

// Values of an index tensor lie in [-1, limit). Checked on the CPU only: on
// a GPU it would cost a device-to-host sync on every call.
void check_index_range(const char* op, const char* name, const at::Tensor& index, int64_t limit) {
  if (!index.device().is_cpu() || index.numel() == 0) return;
  // A plain loop: aminmax and two item() calls cost more than the kernel at
  // the layer's small shapes (issue 21, item 3).
  const at::Tensor values = index.contiguous();
  const int64_t* data = values.const_data_ptr<int64_t>();
  int64_t low = data[0];
  int64_t high = data[0];
  for (int64_t i = 1, n = values.numel(); i < n; ++i) {
    low = std::min(low, data[i]);
    high = std::max(high, data[i]);
  }
  TORCH_CHECK_VALUE(low >= -1 && high < limit, op, ": ", name, " holds values in [", low, ", ", high,
                    "], outside [-1, ", limit, ")");
}

// The mapping table's shapes against S tokens and R buffer rows.
void check_table(const char* op, const at::Tensor& source, const at::Tensor& dest_row, const c10::SymInt& tokens,
                 const at::Device& device) {
  TORCH_CHECK_VALUE(source.dim() == 1 && source.scalar_type() == at::kLong, op,
                    ": source must be a 1-d int64 tensor, got ", source.scalar_type(), " of shape ",
                    source.sym_sizes());
  TORCH_CHECK_VALUE(dest_row.dim() == 2 && dest_row.scalar_type() == at::kLong, op,
                    ": dest_row must be a 2-d int64 tensor [tokens, k], got ", dest_row.scalar_type(),
                    " of shape ", dest_row.sym_sizes());
  TORCH_CHECK_VALUE(dest_row.sym_size(0) == tokens, op, ": dest_row has ", dest_row.sym_size(0), " tokens but the tokens ",
                    "tensor has ", tokens);
  TORCH_CHECK_VALUE(source.device() == device && dest_row.device() == device, op,
                    ": source and dest_row must be on ", device, ", got ", source.device(), " and ",
                    dest_row.device());
}

void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-d [rows, hidden], got shape ", t.sym_sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
                    t.scalar_type());
}

at::Tensor check_weights(const char* op, const std::optional<at::Tensor>& weights, const at::Tensor& dest_row,
                         const at::Tensor& like) {
  if (!weights.has_value() || !weights->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(weights->sym_sizes() == dest_row.sym_sizes(), op, ": weights have shape ",
                    weights->sym_sizes(), " but dest_row has ", dest_row.sym_sizes());
  TORCH_CHECK_VALUE(weights->scalar_type() == like.scalar_type(), op, ": weights are ", weights->scalar_type(),
                    " but the rows are ", like.scalar_type(), "; cast them to the same dtype");
  TORCH_CHECK_VALUE(weights->device() == like.device(), op, ": weights are on ", weights->device(),
                    " but the rows on ", like.device());
  return weights->contiguous();
}

// Checks of dispatch (x [S, M] -> [R, M]) and of combine (rows [R, M] ->
// [S, M]); both return the weights, contiguous or undefined.
at::Tensor check_dispatch(const at::Tensor& x, const at::Tensor& source, const at::Tensor& dest_row,
                          const std::optional<at::Tensor>& weights) {
  check_rows("moe_dispatch", "x", x);
  check_table("moe_dispatch", source, dest_row, x.sym_size(0), x.device());
  if (x.device().is_cpu()) check_index_range("moe_dispatch", "source", source, dest_row.numel());
  return check_weights("moe_dispatch", weights, dest_row, x);
}

at::Tensor check_combine(const at::Tensor& rows, const at::Tensor& source, const at::Tensor& dest_row,
                         const std::optional<at::Tensor>& weights) {
  check_rows("moe_combine", "rows", rows);
  check_table("moe_combine", source, dest_row, dest_row.sym_size(0), rows.device());
  TORCH_CHECK_VALUE(rows.sym_size(0) == source.sym_size(0), "moe_combine: rows has ", rows.sym_size(0),
                    " rows but source describes ", source.sym_size(0));
  if (rows.device().is_cpu()) check_index_range("moe_combine", "dest_row", dest_row, rows.size(0));
  return check_weights("moe_combine", weights, dest_row, rows);
}

void check_weight_grad(const at::Tensor& tokens, const at::Tensor& rows, const at::Tensor& source,
                       const at::Tensor& dest_row) {
  check_rows("moe_weight_grad", "tokens", tokens);
  check_rows("moe_weight_grad", "rows", rows);
  TORCH_CHECK_VALUE(tokens.scalar_type() == rows.scalar_type() && tokens.sym_size(1) == rows.sym_size(1),
                    "moe_weight_grad: tokens (", tokens.scalar_type(), ", ", tokens.sizes(), ") and rows (",
                    rows.scalar_type(), ", ", rows.sizes(), ") must share dtype and hidden size");
  check_table("moe_weight_grad", source, dest_row, tokens.sym_size(0), tokens.device());
  TORCH_CHECK_VALUE(rows.sym_size(0) == source.sym_size(0) && rows.device() == tokens.device(),
                    "moe_weight_grad: rows (", rows.sym_sizes(), " on ", rows.device(), ") must have the ",
                    source.sym_size(0), " rows of source, on ", tokens.device());
  if (tokens.device().is_cpu()) check_index_range("moe_weight_grad", "dest_row", dest_row, rows.size(0));
}

using DispatchFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, at::Tensor&);
using CombineFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&);
using WeightGradFn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&);

template <DispatchFn dispatch>
at::Tensor dispatch_impl(const at::Tensor& x, const at::Tensor& source, const at::Tensor& dest_row,
                         const std::optional<at::Tensor>& weights) {
  const at::Tensor w = check_dispatch(x, source, dest_row, weights);
  at::Tensor out = at::empty({source.size(0), x.size(1)}, x.options());
  dispatch(x.contiguous(), source.contiguous(), w, dest_row.size(1), out);
  return out;
}

template <CombineFn combine>
at::Tensor combine_impl(const at::Tensor& rows, const at::Tensor& source, const at::Tensor& dest_row,
                        const std::optional<at::Tensor>& weights) {
  const at::Tensor w = check_combine(rows, source, dest_row, weights);
  at::Tensor y = at::empty({dest_row.size(0), rows.size(1)}, rows.options());
  combine(rows.contiguous(), dest_row.contiguous(), w, y);
  return y;
}

template <WeightGradFn weight_grad>
at::Tensor weight_grad_impl(const at::Tensor& tokens, const at::Tensor& rows, const at::Tensor& source,
                            const at::Tensor& dest_row) {
  check_weight_grad(tokens, rows, source, dest_row);
  at::Tensor grad = at::empty(dest_row.sizes(), tokens.options());
  weight_grad(tokens.contiguous(), rows.contiguous(), dest_row.contiguous(), grad);
  return grad;
}

at::Tensor dispatch_meta(const at::Tensor& x, const at::Tensor& source, const at::Tensor& dest_row,
                         const std::optional<at::Tensor>& weights) {
  check_dispatch(x, source, dest_row, weights);
  return at::empty_symint({source.sym_size(0), x.sym_size(1)}, x.options());
}

at::Tensor combine_meta(const at::Tensor& rows, const at::Tensor& source, const at::Tensor& dest_row,
                        const std::optional<at::Tensor>& weights) {
  check_combine(rows, source, dest_row, weights);
  return at::empty_symint({dest_row.sym_size(0), rows.sym_size(1)}, rows.options());
}

at::Tensor weight_grad_meta(const at::Tensor& tokens, const at::Tensor& rows, const at::Tensor& source,
                            const at::Tensor& dest_row) {
  check_weight_grad(tokens, rows, source, dest_row);
  return at::empty_symint(dest_row.sym_sizes(), tokens.options());
}

}  // namespace

}  // namespace alltoall::ops

TORCH_LIBRARY_FRAGMENT(alltoall, m) {
  m.def("moe_route(Tensor logits, int k, int capacity) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_dispatch(Tensor x, Tensor source, Tensor dest_row, Tensor? weights=None) -> Tensor");
  m.def("moe_combine(Tensor rows, Tensor source, Tensor dest_row, Tensor? weights=None) -> Tensor");
  m.def("moe_weight_grad(Tensor tokens, Tensor rows, Tensor source, Tensor dest_row) -> Tensor");
}

TORCH_LIBRARY_IMPL(alltoall, CPU, m) {
  using namespace alltoall;
  m.impl("moe_route", &ops::route_impl<kernels::route_cpu>);
  m.impl("moe_dispatch", &ops::dispatch_impl<kernels::dispatch_cpu>);
  m.impl("moe_combine", &ops::combine_impl<kernels::combine_cpu>);
  m.impl("moe_weight_grad", &ops::weight_grad_impl<kernels::weight_grad_cpu>);
}

TORCH_LIBRARY_IMPL(alltoall, Meta, m) {
  using namespace alltoall;
  m.impl("moe_route", &ops::route_meta);
  m.impl("moe_dispatch", &ops::dispatch_meta);
  m.impl("moe_combine", &ops::combine_meta);
  m.impl("moe_weight_grad", &ops::weight_grad_meta);
}

#ifdef ALLTOALL_WITH_CUDA
TORCH_LIBRARY_IMPL(alltoall, CUDA, m) {
  using namespace alltoall;
  m.impl("moe_route", &ops::route_impl<kernels::route_cuda>);
  m.impl("moe_dispatch", &ops::dispatch_impl<kernels::dispatch_cuda>);
  m.impl("moe_combine", &ops::combine_impl<kernels::combine_cuda>);
  m.impl("moe_weight_grad", &ops::weight_grad_impl<kernels::weight_grad_cuda>);
}
#endif
