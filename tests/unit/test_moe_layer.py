"""The MoE layer on one process (no torch.distributed) against the dense
reference with the same weights: outputs, aux loss, counts and gradients."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from alltoall.moe import MoE, TopKGate, router_z_loss
from alltoall.moe.experts import FeedForward, LocalExperts, seeded_feed_forwards
from tests.harness.moe_checks import grads_of, reference_like

CASES = list(itertools.product([True, False], [1, 2, 4], [False, True]))


@pytest.mark.parametrize("drop_tokens,k,use_residual", CASES)
def test_layer_matches_dense_reference(drop_tokens, k, use_residual):
    torch.manual_seed(k)
    layer = MoE(6, num_experts=4, k=k, ffn_hidden_size=10, drop_tokens=drop_tokens, min_capacity=1,
                use_residual=use_residual, router_z_loss_coef=0.01).double()
    x0 = torch.randn(3, 7, 6, dtype=torch.float64)  # 21 tokens, leading dims flattened
    probe = torch.randn(3, 7, 6, dtype=torch.float64)
    reference = reference_like(layer, list(layer.experts.experts), 21)

    x = x0.clone().requires_grad_()
    out, aux, counts = layer(x)
    ((out * probe).sum() + 0.3 * aux).backward()
    xr = x0.reshape(21, 6).clone().requires_grad_()
    out_ref, aux_ref, counts_ref = reference(xr)
    ((out_ref * probe.reshape(21, 6)).sum() + 0.3 * aux_ref).backward()

    torch.testing.assert_close(out, out_ref.reshape(3, 7, 6))
    torch.testing.assert_close(aux, aux_ref)
    assert torch.equal(counts, counts_ref)
    torch.testing.assert_close(x.grad.reshape(21, 6), xr.grad)
    ours, ref = grads_of(layer), grads_of(reference)
    torch.testing.assert_close(ours.pop("gate.wg.weight"), ref.pop("gate_weight"))
    for name, grad in ours.items():
        torch.testing.assert_close(grad, ref[name.replace("experts.experts.", "experts.")], msg=name)
    if drop_tokens and k == 1:
        assert (counts > layer.capacity(21)).any(), "the case should drop tokens"


def test_float32_layer_matches_reference_within_tolerance():
    torch.manual_seed(0)
    layer = MoE(16, num_experts=8, k=2, ffn_hidden_size=32, capacity_factor=1.0, min_capacity=1)
    x = torch.randn(50, 16)
    out, aux, _ = layer(x)
    out_ref, aux_ref, _ = reference_like(layer, list(layer.experts.experts), 50)(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, aux_ref)


def test_eval_mode_uses_the_eval_capacity_factor():
    layer = MoE(4, num_experts=4, k=1, ffn_hidden_size=8, capacity_factor=1.0, eval_capacity_factor=2.0,
                min_capacity=0)
    assert layer.capacity(16) == 4
    layer.eval()
    assert layer.capacity(16) == 8
    layer.drop_tokens = False
    assert layer.capacity(16) is None


def test_dropped_tokens_get_zero_output():
    torch.manual_seed(0)
    layer = MoE(4, num_experts=2, k=1, ffn_hidden_size=8, min_capacity=0, capacity_factor=0.5)
    with torch.no_grad():
        layer.gate.wg.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[5.0, 0, 0, 0]] * 4)  # all four pick expert 0; capacity ceil(4 * 0.5 / 2) = 1
    out, _, counts = layer(x)
    assert counts.tolist() == [4, 0]
    assert out[0].abs().sum() > 0 and torch.equal(out[1:], torch.zeros(3, 4))


def test_user_expert_is_replicated_with_its_weights():
    expert = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4))
    layer = MoE(4, expert, num_experts=3, k=2, use_residual=True)
    for copy_ in [*layer.experts.experts, layer.mlp]:
        assert copy_ is not expert
        for a, b in zip(copy_.parameters(), expert.parameters(), strict=True):
            assert torch.equal(a, b)
    out, _, _ = layer(torch.randn(5, 4))
    assert out.shape == (5, 4)


def test_seeded_experts_do_not_depend_on_the_layout():
    torch.manual_seed(3)
    layer = MoE(4, num_experts=4, ffn_hidden_size=6)
    after = torch.rand(3)
    torch.manual_seed(3)
    again = MoE(4, num_experts=4, ffn_hidden_size=6)
    assert torch.equal(torch.rand(3), after), "the global RNG advanced differently"
    for a, b in zip(layer.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    first, second = layer.experts.experts[0], layer.experts.experts[1]
    assert isinstance(first, FeedForward) and not torch.equal(first.fc1.weight, second.fc1.weight)
    # Expert e's weights depend only on the drawn seed and e: rebuild expert 2 alone.
    torch.manual_seed(3)
    TopKGate(4, 4)  # the layer draws its gate first, then the seed
    seed = int(torch.randint(0, 2**62, (1,)))
    alone = seeded_feed_forwards(4, 6, seed, [2])[0]
    for a, b in zip(alone.parameters(), layer.experts.experts[2].parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_arguments_raise_value_errors():
    cases = [
        (lambda: MoE(4, num_experts=2), "exactly one of expert="),
        (lambda: MoE(4, nn.Linear(4, 4), num_experts=2, ffn_hidden_size=8), "exactly one of expert="),
        (lambda: MoE(4, num_experts=2, k=3, ffn_hidden_size=8), r"k=3 must be in \[1, num_experts=2\]"),
        (lambda: MoE(4, num_experts=2, ffn_hidden_size=8, capacity_factor=0), "capacity_factor=0"),
        (lambda: MoE(4, num_experts=2, ffn_hidden_size=8, eval_capacity_factor=-1), "eval_capacity_factor=-1"),
        (lambda: MoE(4, num_experts=2, ffn_hidden_size=8, min_capacity=-2), "min_capacity=-2"),
        (lambda: MoE(4, num_experts=2, ffn_hidden_size=8)(torch.randn(3, 5)), "does not end in hidden_size=4"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match=r"groups must be an alltoall\.ParallelGroups, got object"):
        MoE(4, num_experts=2, ffn_hidden_size=8, groups=object())


@pytest.mark.gpu
@pytest.mark.parametrize("drop_tokens", [True, False], ids=["drop", "dropless"])
def test_layer_on_cuda_matches_the_cpu(drop_tokens):
    torch.manual_seed(3)
    cpu_layer = MoE(32, num_experts=6, k=2, ffn_hidden_size=48, drop_tokens=drop_tokens, capacity_factor=1.0,
                    min_capacity=1).double()  # float64: no near-tie can route differently
    gpu_layer = copy.deepcopy(cpu_layer).cuda()
    x0 = torch.randn(4, 50, 32, dtype=torch.float64)
    probe = torch.randn(4, 50, 32, dtype=torch.float64)
    results = []
    for layer, device in ((cpu_layer, "cpu"), (gpu_layer, "cuda")):
        x = x0.to(device).requires_grad_()
        out, aux, counts = layer(x)
        ((out * probe.to(device)).sum() + 0.5 * aux).backward()
        results.append((out.detach().cpu(), aux.detach().cpu(), counts.cpu(), x.grad.cpu(),
                        {n: p.grad.cpu() for n, p in layer.named_parameters()}))
    (out_c, aux_c, counts_c, gx_c, grads_c), (out_g, aux_g, counts_g, gx_g, grads_g) = results
    assert torch.equal(counts_c, counts_g)  # same routing, so the same drops
    tol = {"atol": 1e-9, "rtol": 1e-9}
    torch.testing.assert_close(out_g, out_c, **tol)
    torch.testing.assert_close(aux_g, aux_c, **tol)
    torch.testing.assert_close(gx_g, gx_c, **tol)
    for name, grad in grads_c.items():
        torch.testing.assert_close(grads_g[name], grad, **tol, msg=name)


def _loop_and_batched(experts, dtype, blocks=4, rows=6):
    """The per-expert loop and the batched path on the same rows: outputs
    and every gradient, from two copies of the experts."""
    loop = LocalExperts(experts, 0).to(dtype)
    batched = copy.deepcopy(loop)
    x0 = torch.randn(blocks * rows, 8, dtype=dtype)
    grad = torch.randn(blocks * rows, 8, dtype=dtype)
    results = []
    for module, run in ((loop, lambda m, x: m(x, [rows] * blocks)),
                        (batched, lambda m, x: m.forward_blocks(x.view(blocks, rows, 8)).reshape(-1, 8))):
        x = x0.clone().requires_grad_()
        out = run(module, x)
        out.backward(grad)
        results.append((out, x.grad, [p.grad for p in module.parameters()]))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_experts_match_the_per_expert_loop(dtype):
    torch.manual_seed(3)
    (out, gx, gp), (out_b, gx_b, gp_b) = _loop_and_batched(seeded_feed_forwards(8, 5, 1, range(4)), dtype)
    torch.testing.assert_close(out_b, out, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    torch.testing.assert_close(gx_b, gx, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    for a, b in zip(gp_b, gp, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
        assert a.is_contiguous()


def test_batched_experts_fall_back_to_the_loop_for_other_experts_and_hooks():
    torch.manual_seed(4)
    other = [nn.Sequential(nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 8)) for _ in range(4)]
    hooked = seeded_feed_forwards(8, 5, 2, range(4))
    calls = []
    hooked[2].fc1.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    for experts in (other, hooked):
        (out, gx, gp), (out_b, gx_b, gp_b) = _loop_and_batched(experts, torch.float64)
        torch.testing.assert_close(out_b, out, rtol=0, atol=0)
        torch.testing.assert_close(gx_b, gx, rtol=0, atol=0)
        for a, b in zip(gp_b, gp, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert calls == [torch.Size([6, 5])] * 2  # the hook ran on both paths: the loop was taken


def test_z_loss_is_computed_on_access_with_the_same_value_and_gradient():
    torch.manual_seed(5)
    gate = TopKGate(6, 4, 2).double()
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    out = gate(x, None)
    want = router_z_loss(gate.logits(x))
    torch.testing.assert_close(out.z_loss, want, rtol=0, atol=0)
    assert out.aux_loss is out.balance_loss
    (grad,) = torch.autograd.grad(out.z_loss, x)
    (want_grad,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(grad, want_grad)
