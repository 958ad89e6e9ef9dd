"""Equal-split all-to-all: differential against dist.all_to_all_single on
gloo ranks, for every algorithm, dtype and trailing shape; autograd; bad
input raised before any communication."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

import alltoall
from tests.harness.checks import assert_same_bytes, in_step_after_a_value_error, rank_input

WORLDS = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]
TRAILING = [(), (1,), (7,), (3, 5), (2, 0)]


def reference(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    return out


def _matches_torch(local_size: int, seed: int) -> int:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    checked = 0
    for dtype in DTYPES:
        for trailing in TRAILING:
            for rows_per_peer in (0, 1, 3):
                x = rank_input(rank, rows_per_peer * p, trailing, dtype, seed)
                expected = reference(x)
                for algorithm in ("flat", "hierarchical", "auto"):
                    what = f"{algorithm} {dtype} {trailing} rows/peer={rows_per_peer}"
                    assert_same_bytes(comm.all_to_all(x, algorithm), expected, what)
                    checked += 1
                assert_same_bytes(alltoall.all_to_all(x), expected, f"module-level flat {dtype}")
                assert_same_bytes(alltoall.all_to_all(x, algorithm="hierarchical"), expected,
                                  f"module-level hierarchical {dtype}")
    return checked


@pytest.mark.parametrize("world,local_size", WORLDS)
def test_matches_all_to_all_single(worlds, world, local_size):
    checked = worlds.run(world, _matches_torch, local_size, seed=world * 10 + local_size)
    assert checked == [len(DTYPES) * len(TRAILING) * 3 * 3] * world


def _interleaved_nodes(node_ids: list[int]) -> None:
    rank = dist.get_rank()
    comm = alltoall.Communicator(topology=alltoall.Topology.from_node_ids(node_ids, rank))
    x = rank_input(rank, 2 * len(node_ids), (4,), torch.float32)
    assert_same_bytes(comm.all_to_all(x, "hierarchical"), reference(x), f"nodes {node_ids}")


@pytest.mark.parametrize("node_ids", [[0, 1, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1], [0, 1, 1, 0, 2, 3, 3, 2]],
                         ids=["cyclic4", "cyclic8", "mixed8"])
def test_hierarchical_on_interleaved_nodes(worlds, node_ids):
    worlds.run(len(node_ids), _interleaved_nodes, node_ids)


def _local_size_from_env() -> tuple[int, int]:
    comm = alltoall.Communicator()
    return comm.topology.num_nodes, comm.topology.ranks_per_node


def test_local_size_environment_variable(worlds):
    assert worlds.run(4, _local_size_from_env, env={"ALLTOALL_LOCAL_SIZE": "2"}) == [(2, 2)] * 4


def _hostname_detection() -> tuple[int, ...]:
    return alltoall.Communicator().topology.node_of_rank


def test_nodes_detected_from_host_names(worlds):
    # All ranks share this host, so they form one node.
    assert worlds.run(4, _hostname_detection) == [(0, 0, 0, 0)] * 4


def _backward(local_size: int) -> None:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    x0 = rank_input(rank, 4 * p, (3,), torch.float64, seed=1)
    weight = rank_input(rank, 4 * p, (3,), torch.float64, seed=2)
    x_ref = x0.clone().requires_grad_()
    (dist_fn.all_to_all_single(torch.empty_like(x_ref), x_ref) * weight).sum().backward()
    for algorithm in ("flat", "hierarchical"):
        x = x0.clone().requires_grad_()
        (comm.all_to_all(x, algorithm) * weight).sum().backward()
        assert torch.equal(x.grad, x_ref.grad), algorithm
    x = x0.clone().requires_grad_()
    (alltoall.all_to_all(x) * weight).sum().backward()
    assert torch.equal(x.grad, x_ref.grad), "module-level"


@pytest.mark.parametrize("world,local_size", [(2, 1), (4, 2), (8, 4), (8, 2)])
def test_backward_is_the_inverse_exchange(worlds, world, local_size):
    worlds.run(world, _backward, local_size)


def _bad_input_raises_before_communicating() -> None:
    rank = dist.get_rank()
    comm = alltoall.Communicator(local_size=2)
    uneven = alltoall.Communicator(topology=alltoall.Topology.from_node_ids([0, 0, 0, 1], rank))
    if rank == 0:
        # Only rank 0 calls: had any of these communicated, it would hang.
        cases = [
            (lambda: comm.all_to_all(torch.zeros(6, 2)), r"dim 0 of the input \(shape \(6, 2\)\) is 6, not divisible "
                                                          r"by the group size 4"),
            (lambda: comm.all_to_all(torch.tensor(1.0)), "0-d tensor"),
            (lambda: alltoall.all_to_all(torch.tensor(1.0)), "0-d tensor"),
            (lambda: uneven.all_to_all(torch.zeros(4), "hierarchical"), r"nodes hold \[3, 1\] ranks"),
            (lambda: comm.all_to_all(torch.zeros(4), "ring"), "algorithm='ring'"),
            (lambda: alltoall.all_to_all(torch.zeros(5)), "is 5, not divisible by the group size 4"),
            (lambda: alltoall.Communicator(local_size=3), "local_size=3 must be >= 1 and divide the group size 4"),
        ]
        for call, message in cases:
            with pytest.raises(ValueError, match=message):
                call()
    # The group is still in step: a real exchange on every rank works (over
    # shared memory on a rebuilt Communicator: a ValueError raised by one
    # rank alone marks its segments aborted, issue 24, so peers stop waiting).
    x = rank_input(rank, 8, (), torch.float32)
    comm = in_step_after_a_value_error(comm, lambda: alltoall.Communicator(local_size=2),
                                       lambda c: c.all_to_all(x, "hierarchical"))
    assert_same_bytes(comm.all_to_all(x, "hierarchical"), reference(x))


def test_bad_input_raises_value_error_before_communication(worlds):
    worlds.run(4, _bad_input_raises_before_communicating, deadline_s=60)


def _module_level_needs_a_communicator() -> None:
    group = dist.new_group([0, 1])
    with pytest.raises(ValueError, match=r"construct alltoall\.Communicator"):
        alltoall.all_to_all(torch.zeros(2), group=group, algorithm="hierarchical")
    # Both ranks leave together: one destroying its groups while the other
    # still connects the new group's mesh fails that connection.
    dist.barrier(group=group)


def test_module_level_hierarchical_needs_a_communicator(worlds):
    worlds.run(2, _module_level_needs_a_communicator)


def _subgroup_exchange() -> None:
    rank = dist.get_rank()
    evens, odds = dist.new_group([0, 2, 4, 6]), dist.new_group([1, 3, 5, 7])
    group = evens if rank % 2 == 0 else odds
    comm = alltoall.Communicator(group, local_size=2)
    x = rank_input(rank, 8, (3,), torch.float32)
    expected = torch.empty_like(x)
    dist.all_to_all_single(expected, x, group=group)
    for algorithm in ("flat", "hierarchical"):
        assert_same_bytes(comm.all_to_all(x, algorithm), expected, f"subgroup {algorithm}")
    assert_same_bytes(alltoall.all_to_all(x, group=group), expected, "module-level on a subgroup")


def test_runs_on_subgroups(worlds):
    worlds.run(8, _subgroup_exchange)


def _timeout_names_the_collective() -> float:
    rank = dist.get_rank()
    comm = alltoall.Communicator(timeout=2.0)
    if rank == 1:
        time.sleep(10)  # stays connected but never joins the exchange
        return 0.0
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        comm.all_to_all(torch.zeros(4))
    waited = time.monotonic() - start
    message = str(info.value)
    assert "flat all_to_all phase 1/1 (world)" in message, message
    assert "global ranks [0, 1]" in message, message
    assert "timeout 2000 ms" in message, message
    if comm.transports("flat") == ("shm",):
        assert type(info.value) is dist.DistBackendError, type(info.value)
    else:
        # Over c10d the backend's exception class is kept (review finding
        # A3): the same wait through torch's own API raises the same class.
        work = dist.all_to_all_single(torch.zeros(4), torch.zeros(4), async_op=True)
        with pytest.raises(RuntimeError) as torch_info:
            work.wait(timeout=timedelta(seconds=2))
        assert type(info.value) is type(torch_info.value), (type(info.value), type(torch_info.value))
    return waited


def test_a_missing_rank_ends_in_a_timeout_error(worlds):
    waited = worlds.run(2, _timeout_names_the_collective, deadline_s=60)[0]
    assert 1.5 < waited < 8, f"the error came after {waited:.1f} s, not after the 2 s timeout"
