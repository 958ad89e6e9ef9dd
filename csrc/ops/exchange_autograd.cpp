#include "ops/exchange_autograd.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

namespace alltoall::ops {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The context stores only IValues; a capsule carries the exchanger.
struct ExchangerCapsule : torch::CustomClassHolder {
  explicit ExchangerCapsule(std::shared_ptr<const Exchanger> held) : exchanger(std::move(held)) {}
  std::shared_ptr<const Exchanger> exchanger;
};

constexpr const char* kExchanger = "exchanger";

void save_exchanger(AutogradContext* ctx, const std::shared_ptr<const Exchanger>& exchanger) {
  ctx->saved_data[kExchanger] = c10::IValue::make_capsule(c10::make_intrusive<ExchangerCapsule>(exchanger));
}

std::shared_ptr<const Exchanger> saved_exchanger(AutogradContext* ctx) {
  const auto capsule = ctx->saved_data.at(kExchanger).toCapsule();
  return static_cast<const ExchangerCapsule*>(capsule.get())->exchanger;
}

struct AllToAllFunction : torch::autograd::Function<AllToAllFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const std::shared_ptr<const Exchanger>& exchanger) {
    save_exchanger(ctx, exchanger);
    return exchanger->all_to_all(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {all_to_all_autograd(saved_exchanger(ctx), grads[0]), at::Tensor()};
  }
};

struct AllToAllVFunction : torch::autograd::Function<AllToAllVFunction> {
  // `received` (not a tensor, so not an output of the node) gets the rows
  // received from each peer.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::shared_ptr<const Exchanger>& exchanger,
                            const std::vector<int64_t>& input_splits,
                            const std::optional<std::vector<int64_t>>& output_splits,
                            std::vector<int64_t>* received) {
    auto [out, splits] = exchanger->all_to_all_v(x, input_splits, output_splits);
    save_exchanger(ctx, exchanger);
    ctx->saved_data["input_splits"] = input_splits;
    ctx->saved_data["output_splits"] = splits;
    *received = std::move(splits);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The gradient of row r of the output goes back to where row r came
    // from: the exchange with the splits swapped.
    const auto forward_in = ctx->saved_data.at("input_splits").toIntVector();
    const auto forward_out = ctx->saved_data.at("output_splits").toIntVector();
    auto grad_in = all_to_all_v_autograd(saved_exchanger(ctx), grads[0], forward_out, forward_in).first;
    return {std::move(grad_in), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

bool records_grad(const at::Tensor& x) { return at::GradMode::is_enabled() && x.requires_grad(); }

}  // namespace

at::Tensor all_to_all_autograd(const std::shared_ptr<const Exchanger>& exchanger, const at::Tensor& x) {
  if (!records_grad(x)) return exchanger->all_to_all(x);
  return AllToAllFunction::apply(x, exchanger);
}

std::pair<at::Tensor, std::vector<int64_t>> all_to_all_v_autograd(
    const std::shared_ptr<const Exchanger>& exchanger, const at::Tensor& x, const std::vector<int64_t>& input_splits,
    const std::optional<std::vector<int64_t>>& output_splits) {
  if (!records_grad(x)) return exchanger->all_to_all_v(x, input_splits, output_splits);
  std::vector<int64_t> received;
  at::Tensor out = AllToAllVFunction::apply(x, exchanger, input_splits, output_splits, &received);
  return {std::move(out), std::move(received)};
}

}  // namespace alltoall::ops
