// Launchers of the MoE token-to-expert kernels, one per device. See
// moe_element.h for the mapping table they build and use. The ops layer
// checks arguments and allocates outputs; nothing here communicates.
#pragma once

#include <ATen/core/Tensor.h>

namespace alltoall::kernels {

// The dense token-to-expert mapping table, for S tokens, E experts and k
// choices per token; all int64 on the logits' device.
struct RouteTable {
  at::Tensor expert_index;  // [S, k]: token s's j-th choice, best first
  at::Tensor dest_row;      // [S, k]: its buffer row, -1 when dropped
  at::Tensor source;        // [R]: assignment s * k + j in each row, -1 for padding (caller fills -1)
  at::Tensor counts;        // [E]: assignments per expert before dropping
};

// Top-k, prefix sum and scatter over logits [S, E] (contiguous). capacity
// >= 0 is the padded layout (R = E * capacity), capacity < 0 the compact
// dropless one (R = S * k).
void route_cpu(const at::Tensor& logits, int64_t capacity, RouteTable& table);
void route_cuda(const at::Tensor& logits, int64_t capacity, RouteTable& table);

// out [R, M] = rows of x [S, M] by `source`, times `weights` [S, k] when
// defined; zeros for padding rows. All contiguous, weights of x's dtype.
void dispatch_cpu(const at::Tensor& x, const at::Tensor& source, const at::Tensor& weights, int64_t k,
                  at::Tensor& out);
void dispatch_cuda(const at::Tensor& x, const at::Tensor& source, const at::Tensor& weights, int64_t k,
                   at::Tensor& out);

// y [S, M] = sum over kept j of weights[s, j] (1 when undefined) times
// rows[dest_row[s, j]].
void combine_cpu(const at::Tensor& rows, const at::Tensor& dest_row, const at::Tensor& weights, at::Tensor& y);
void combine_cuda(const at::Tensor& rows, const at::Tensor& dest_row, const at::Tensor& weights, at::Tensor& y);

// grad [S, k] = dot(tokens[s], rows[dest_row[s, j]]), 0 when dropped.
void weight_grad_cpu(const at::Tensor& tokens, const at::Tensor& rows, const at::Tensor& dest_row,
                     at::Tensor& grad);
void weight_grad_cuda(const at::Tensor& tokens, const at::Tensor& rows, const at::Tensor& dest_row,
                      at::Tensor& grad);

}  // namespace alltoall::kernels
