// Autograd of the MoE dispatch and combine ops (moe_ops.cpp), in C++.
//
// Dispatch (x [S, M] -> [R, M]) and combine (rows [R, M] -> [S, M]) over the
// same mapping table are each other's adjoint, so the backward of one is the
// other, and the gate-weight gradient is a row-wise dot product
// (moe_weight_grad). These nodes were Python (torch.library.register_autograd);
// at the layer's small shapes their Python forward and backward cost more
// host time than the kernels themselves (issue 21, item 3), so they live
// here: one C++ node per op, no Python on the way in or back.
//
// Every backward is written with the ops themselves, called through the
// dispatcher, so it is differentiable again (double backward) and traceable
// (AOTAutograd sees the same ops, with their Meta kernels).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>

namespace alltoall::ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;
using TableOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptionalTensor&);
using WeightGradOp = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);

c10::TypedOperatorHandle<TableOp> dispatch_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("alltoall::moe_dispatch", "").typed<TableOp>();
  return op;
}

c10::TypedOperatorHandle<TableOp> combine_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("alltoall::moe_combine", "").typed<TableOp>();
  return op;
}

c10::TypedOperatorHandle<WeightGradOp> weight_grad_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("alltoall::moe_weight_grad", "").typed<WeightGradOp>();
  return op;
}

bool has(const OptionalTensor& t) { return t.has_value() && t->defined(); }

bool any_requires_grad(const at::Tensor& a, const OptionalTensor& b) {
  return at::GradMode::is_enabled() && (a.requires_grad() || (has(b) && b->requires_grad()));
}

// The edge index of the weights: the optional weights come after the three
// tensors x/rows, source and dest_row.
constexpr size_t kWeightsEdge = 3;

// values [*, M] moved by the table, with optional weights. Saved: the values
// only when the weights need a gradient (their gradient reads them).
template <bool kDispatch>
struct TableFunction : public torch::autograd::Function<TableFunction<kDispatch>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& values, const at::Tensor& source,
                            const at::Tensor& dest_row, const OptionalTensor& weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool weighted = has(weights);
    const bool weight_grad = weighted && weights->requires_grad();
    ctx->save_for_backward({weight_grad ? values : at::Tensor(), source, dest_row,
                            weighted ? *weights : at::Tensor()});
    return (kDispatch ? dispatch_op() : combine_op()).call(values, source, dest_row, weights);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& values = saved[0];
    const at::Tensor& source = saved[1];
    const at::Tensor& dest_row = saved[2];
    const bool weighted = saved[3].defined();
    const OptionalTensor weights = weighted ? OptionalTensor(saved[3]) : std::nullopt;
    const at::Tensor& grad = grads[0];
    at::Tensor grad_values;
    at::Tensor grad_weights;
    if (ctx->needs_input_grad(0)) {
      // The adjoint: dispatch's gradient is a combine, combine's a dispatch.
      grad_values = (kDispatch ? combine_op() : dispatch_op()).call(grad, source, dest_row, weights);
    }
    if (weighted && ctx->needs_input_grad(kWeightsEdge)) {
      // g[s, j] = <token side, row side>: dispatch's tokens are its input,
      // combine's are the incoming gradient.
      grad_weights = kDispatch ? weight_grad_op().call(values, grad, source, dest_row)
                               : weight_grad_op().call(grad, values, source, dest_row);
    }
    return {grad_values, at::Tensor(), at::Tensor(), grad_weights};
  }
};

// g [S, k] = <tokens[s], rows[dest_row[s, j]]>, bilinear: each side's
// gradient is a combine or a dispatch weighted by the incoming gradient.
struct WeightGradFunction : public torch::autograd::Function<WeightGradFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& tokens, const at::Tensor& rows,
                            const at::Tensor& source, const at::Tensor& dest_row) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({tokens, rows, source, dest_row});
    return weight_grad_op().call(tokens, rows, source, dest_row);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_tokens;
    at::Tensor grad_rows;
    if (ctx->needs_input_grad(0)) grad_tokens = combine_op().call(saved[1], saved[2], saved[3], grad);
    if (ctx->needs_input_grad(1)) grad_rows = dispatch_op().call(saved[0], saved[2], saved[3], grad);
    return {grad_tokens, grad_rows, at::Tensor(), at::Tensor()};
  }
};

// The Autograd kernels. Without anything to differentiate (no_grad, or no
// input that needs a gradient) they go straight to the device kernel and
// build no node.
template <bool kDispatch>
at::Tensor table_autograd(const at::Tensor& values, const at::Tensor& source, const at::Tensor& dest_row,
                          const OptionalTensor& weights) {
  if (!any_requires_grad(values, weights)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return (kDispatch ? dispatch_op() : combine_op()).call(values, source, dest_row, weights);
  }
  return TableFunction<kDispatch>::apply(values, source, dest_row, weights);
}

at::Tensor weight_grad_autograd(const at::Tensor& tokens, const at::Tensor& rows, const at::Tensor& source,
                                const at::Tensor& dest_row) {
  if (!any_requires_grad(tokens, rows)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return weight_grad_op().call(tokens, rows, source, dest_row);
  }
  return WeightGradFunction::apply(tokens, rows, source, dest_row);
}

}  // namespace

}  // namespace alltoall::ops

TORCH_LIBRARY_IMPL(alltoall, Autograd, m) {
  using namespace alltoall;
  m.impl("moe_dispatch", &ops::table_autograd<true>);
  m.impl("moe_combine", &ops::table_autograd<false>);
  m.impl("moe_weight_grad", &ops::weight_grad_autograd);
}
