"""torch.compile traces the equal-split exchange and the MoE layer in one
graph (fullgraph=True), through torch.ops.alltoall.exchange_equal, and gives
what eager mode gives, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import alltoall
from tests.harness.checks import rank_input


def _exchange(backend: str, algorithm: str) -> None:
    comm = alltoall.Communicator(local_size=2)

    def f(x: torch.Tensor) -> torch.Tensor:
        return comm.all_to_all(x * 2, algorithm).sin()

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    x = rank_input(dist.get_rank(), 8, (3,), torch.float32).requires_grad_()
    y = compiled(x)
    y.sum().backward()
    x_eager = x.detach().clone().requires_grad_()
    y_eager = f(x_eager)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(x.grad, x_eager.grad)


@pytest.mark.parametrize("backend,algorithm", [("aot_eager", "flat"), ("aot_eager", "hierarchical"),
                                               ("inductor", "hierarchical")])
def test_exchange_compiles_in_one_graph(worlds, backend, algorithm):
    worlds.run(4, _exchange, backend, algorithm, deadline_s=300)


def _moe_layer() -> None:
    comm = alltoall.Communicator(local_size=2)
    torch.manual_seed(0)
    layer = alltoall.MoE(8, num_experts=8, k=2, ffn_hidden_size=16, ep_group=comm, algorithm="hierarchical")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = rank_input(dist.get_rank(), 12, (8,), torch.float32).requires_grad_()
    out, aux, counts = compiled(x)
    (out.sum() + aux).backward()
    grad = x.grad.clone()
    x.grad = None
    out_eager, aux_eager, counts_eager = layer(x)
    (out_eager.sum() + aux_eager).backward()
    torch.testing.assert_close(out, out_eager)
    torch.testing.assert_close(aux, aux_eager)
    assert torch.equal(counts, counts_eager)
    torch.testing.assert_close(grad, x.grad)


def test_moe_layer_with_capacity_compiles_in_one_graph(worlds):
    worlds.run(4, _moe_layer, deadline_s=300)
