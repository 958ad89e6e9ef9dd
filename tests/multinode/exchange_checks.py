"""Differential checks of every exchange against ``dist.all_to_all_single``,
run inside one rank of a launched job (torchrun, mpiexec, srun).

Each check raises AssertionError naming the case on a mismatch and returns
how many comparisons it made, so the test can tell that they all ran.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

import alltoall
from alltoall.moe import MoE
from tests.harness.checks import assert_same_bytes, rank_input
from tests.harness.coordinated_reference import check_equal, check_uneven
from tests.harness.moe_checks import HIDDEN, check_against_reference

DTYPES = [torch.float32, torch.bfloat16, torch.int64]
TRAILING = [(), (5,)]
ROWS_PER_PEER = [0, 1, 3]
ALGORITHMS = ["flat", "hierarchical", "auto"]
V_SEEDS = [1, 2, 3]
LARGE_BYTES_PER_RANK = 1 << 20


def reference(x: torch.Tensor, input_splits: list[int] | None = None, output_splits: list[int] | None = None,
              group: dist.ProcessGroup | None = None) -> torch.Tensor:
    rows = x.shape[0] if output_splits is None else sum(output_splits)
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    return out


def equal_splits(comm: alltoall.Communicator, device: torch.device, seed: int) -> int:
    """Equal splits: every algorithm, dtype, trailing shape and size, and the module-level functions."""
    rank, p = comm.rank, comm.size
    checked = 0
    for dtype in DTYPES:
        for trailing in TRAILING:
            for rows in ROWS_PER_PEER:
                x = rank_input(rank, rows * p, trailing, dtype, seed).to(device)
                expected = reference(x)
                for algorithm in ALGORITHMS:
                    assert_same_bytes(comm.all_to_all(x, algorithm), expected,
                                      f"{algorithm} {dtype} {trailing} rows/peer={rows}")
                for algorithm in ("flat", "hierarchical"):
                    assert_same_bytes(alltoall.all_to_all(x, algorithm=algorithm), expected,
                                      f"module-level {algorithm} {dtype} {trailing} rows/peer={rows}")
                checked += len(ALGORITHMS) + 2
    return checked


def large(comm: alltoall.Communicator, device: torch.device, seed: int) -> int:
    """One MiB per rank, enough to fill the rate-limited links for a while."""
    p = comm.size
    cols = 256
    rows = max(1, LARGE_BYTES_PER_RANK // (4 * cols * p)) * p
    x = rank_input(comm.rank, rows, (cols,), torch.float32, seed).to(device)
    expected = reference(x)
    for algorithm in ("flat", "hierarchical"):
        assert_same_bytes(comm.all_to_all(x, algorithm), expected, f"{algorithm} {tuple(x.shape)}")
    return 2


def split_matrix(p: int, seed: int) -> list[list[int]]:
    """``m[s][d]`` rows from rank s to rank d, with zeros; the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, 5, (p, p), generator=g)
    m[torch.rand((p, p), generator=g) < 0.25] = 0
    return m.tolist()


def uneven_splits(comm: alltoall.Communicator, device: torch.device, seed: int) -> int:
    """all_to_all_v with and without known output splits, every algorithm, module level too."""
    rank, p = comm.rank, comm.size
    checked = 0
    for v_seed in V_SEEDS:
        m = split_matrix(p, seed * 100 + v_seed)
        ins = m[rank]
        outs = [m[s][rank] for s in range(p)]
        x = rank_input(rank, sum(ins), (3,), torch.float32, seed + v_seed).to(device)
        expected = reference(x, ins, outs)
        for algorithm in ALGORITHMS:
            what = f"v {algorithm} splits seed {v_seed}"
            assert_same_bytes(comm.all_to_all_v(x, ins, outs, algorithm), expected, what)
            out, received = comm.all_to_all_v(x, torch.tensor(ins, device=device), algorithm=algorithm)
            assert received == outs, f"{what}: received splits {received} != {outs}"
            assert_same_bytes(out, expected, f"{what}, output splits exchanged")
            checked += 2
        for algorithm in ("flat", "hierarchical"):
            assert_same_bytes(alltoall.all_to_all_v(x, ins, outs, algorithm=algorithm), expected,
                              f"module-level v {algorithm} seed {v_seed}")
            checked += 1
    return checked


def backward(comm: alltoall.Communicator, device: torch.device, seed: int) -> int:
    """The gradient of ``sum(all_to_all(x) * w)`` is ``all_to_all(w)``: an
    equal-split exchange is its own inverse."""
    p = comm.size
    x0 = rank_input(comm.rank, 2 * p, (3,), torch.float64, seed).to(device)
    weight = rank_input(comm.rank, 2 * p, (3,), torch.float64, seed + 1).to(device)
    expected = reference(weight)
    for algorithm in ("flat", "hierarchical"):
        x = x0.clone().requires_grad_()
        (comm.all_to_all(x, algorithm) * weight).sum().backward()
        assert_same_bytes(x.grad, expected, f"backward {algorithm}")
    return 2


def subgroups(comm: alltoall.Communicator, device: torch.device, seed: int) -> int:
    """Communicators on the even and the odd ranks: subgroups that span hosts,
    with their own topology and node subgroups."""
    rank, p = dist.get_rank(), dist.get_world_size()
    if p < 4:
        return 0
    groups = [dist.new_group(list(range(parity, p, 2))) for parity in (0, 1)]  # every rank enters both
    group = groups[rank % 2]
    sub = alltoall.Communicator(group, timeout=comm.timeout)
    x = rank_input(rank, 2 * sub.size, (4,), torch.float32, seed).to(device)
    expected = reference(x, group=group)
    algorithms = ["flat", "hierarchical"] if sub.topology.uniform else ["flat"]
    for algorithm in algorithms:
        assert_same_bytes(sub.all_to_all(x, algorithm), expected, f"subgroup {algorithm}")
    return len(algorithms)


def coordinated(comm: alltoall.Communicator, device: torch.device, seed: int) -> int:
    """ParallelGroups on the detected hosts (TP groups inside hosts, EP
    groups across them) and the coordinated exchange against the naive one."""
    if dist.get_world_size() < 4 or comm.topology.ranks_per_node is None or comm.topology.ranks_per_node % 2:
        return 0
    groups = alltoall.ParallelGroups(tp=2, topology=comm.topology, timeout=comm.timeout)
    for ranks in groups.layout.groups("tp"):
        assert len({comm.topology.node_of_rank[r] for r in ranks}) == 1, f"TP group {ranks} spans hosts"
    algorithms = ("flat", "hierarchical")
    return check_equal(groups, algorithms, device) + check_uneven(groups, algorithms, device)


def moe(comm: alltoall.Communicator, device: torch.device, seed: int) -> int:
    """The MoE layer across hosts against the dense single-process reference:
    expert parallelism over the world (flat and hierarchical, drop and
    dropless), then tp 2 x ep with the coordinated exchange."""
    if device.type != "cpu":
        return 0  # the reference check runs on the CPU
    p = dist.get_world_size()
    checked = 0
    for drop, algorithm in itertools.product([True, False], ["flat", "hierarchical"]):
        torch.manual_seed(seed + 10 * drop)
        layer = MoE(HIDDEN, num_experts=p, k=2, ffn_hidden_size=8, drop_tokens=drop, min_capacity=1,
                    use_residual=True, ep_group=comm, algorithm=algorithm).double()
        tokens = [6] * p if drop else [1 + 2 * (r % 3) for r in range(p)]
        check_against_reference(layer, None, tokens, seed=seed + checked)
        checked += 1
    if p >= 4 and comm.topology.ranks_per_node is not None and comm.topology.ranks_per_node % 2 == 0:
        groups = alltoall.ParallelGroups(tp=2, topology=comm.topology, timeout=comm.timeout)
        torch.manual_seed(seed + 99)
        layer = MoE(HIDDEN, num_experts=groups.ep, k=2, ffn_hidden_size=8, drop_tokens=False, groups=groups,
                    algorithm="hierarchical").double()
        tokens = [2 + 3 * e for e in range(groups.ep)]
        check_against_reference(layer, groups.ep_group, tokens, seed=seed + 50, me=groups.ep_rank)
        checked += 1
    return checked


CHECKS = {
    "equal": equal_splits,
    "large": large,
    "v": uneven_splits,
    "backward": backward,
    "subgroups": subgroups,
    "coordinated": coordinated,
    "moe": moe,
}
