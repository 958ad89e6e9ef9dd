"""The naive reference of the coordinated exchange: an all-to-all over the EP
group of the TP-replicated input, cut into this TP rank's chunks."""

from __future__ import annotations

import torch
import torch.distributed as dist

import alltoall
from alltoall.ops.coordinated import Chunking
from tests.harness.checks import assert_same_bytes, rank_input


def naive(x: torch.Tensor, groups: alltoall.ParallelGroups, ins: list[int] | None = None,
          outs: list[int] | None = None) -> torch.Tensor:
    """all_to_all_single over the EP group, with blocks addressed by EP
    coordinate: reordered into group order before, and back after."""
    ep = groups.ep
    ins = ins if ins is not None else [x.shape[0] // ep] * ep
    outs = outs if outs is not None else [x.shape[0] // ep] * ep
    members = list(groups.ranks("ep"))
    coord = [groups.layout.coordinates(r)["ep"] for r in members]  # group position -> coordinate
    blocks = list(torch.split(x, ins))
    send = torch.cat([blocks[coord[g]] for g in range(ep)])
    out = x.new_empty((sum(outs), *x.shape[1:]))
    dist.all_to_all_single(out, send, [outs[coord[g]] for g in range(ep)], [ins[coord[g]] for g in range(ep)],
                           group=groups.ep_group)
    received = dict(zip(coord, torch.split(out, [outs[coord[g]] for g in range(ep)]), strict=True))
    return torch.cat([received[e] for e in range(ep)])


def chunks_of(full: torch.Tensor, block_rows: list[int], tp: int, t: int) -> torch.Tensor:
    """TP rank t's chunk of every block of ``full``."""
    chunking = Chunking(tuple(block_rows), tp)
    return torch.ops.alltoall.gather_blocks(full, chunking.chunk_starts(t), chunking.sizes(t))


def replica_key(groups: alltoall.ParallelGroups, salt: int) -> int:
    """The same on every rank of a TP group: what makes inputs replicated."""
    return salt * 1000 + groups.dp_rank * 100 + groups.ep_rank


def check_equal(groups: alltoall.ParallelGroups, algorithms: tuple[str, ...], device: torch.device) -> int:
    """Dispatch, round trip and combine against the naive reference."""
    t, tp, ep = groups.tp_rank, groups.tp, groups.ep
    rows = ep * tp * 3
    x = rank_input(replica_key(groups, 1), rows, (5,), torch.float32).to(device)
    expected = chunks_of(naive(x, groups), [rows // ep] * ep, tp, t)
    full_y = rank_input(replica_key(groups, 2), rows, (5,), torch.float32).to(device)
    y = chunks_of(full_y, [rows // ep] * ep, tp, t)
    for algorithm in algorithms:
        out = groups.coordinated_all_to_all(x, algorithm)
        assert_same_bytes(out, expected, f"dispatch {algorithm}")
        assert_same_bytes(groups.coordinated_all_to_all_back(out, algorithm), x, f"round trip {algorithm}")
        assert_same_bytes(groups.coordinated_all_to_all_back(y, algorithm), naive(full_y, groups),
                          f"combine {algorithm}")
    return 3 * len(algorithms)


def check_uneven(groups: alltoall.ParallelGroups, algorithms: tuple[str, ...], device: torch.device) -> int:
    """Uneven blocks (a zero-sized one included), with and without known output splits."""
    t, tp, ep = groups.tp_rank, groups.tp, groups.ep
    g = torch.Generator().manual_seed(7 + groups.dp_rank)  # one split matrix per EP group
    matrix = torch.randint(0, 7, (ep, ep), generator=g).tolist()
    matrix[0][ep - 1] = 0
    ins, outs = matrix[groups.ep_rank], [matrix[s][groups.ep_rank] for s in range(ep)]
    x = rank_input(replica_key(groups, 3), sum(ins), (3,), torch.float32).to(device)
    expected = chunks_of(naive(x, groups, ins, outs), outs, tp, t)
    for algorithm in algorithms:
        out = groups.coordinated_all_to_all_v(x, ins, outs, algorithm)
        assert_same_bytes(out, expected, f"dispatch-v {algorithm}")
        out2, chunk_splits = groups.coordinated_all_to_all_v(x, ins, algorithm=algorithm)
        assert_same_bytes(out2, expected, f"dispatch-v counts exchanged {algorithm}")
        assert chunk_splits == Chunking(tuple(outs), tp).sizes(t)
        back = groups.coordinated_all_to_all_back_v(out, chunk_splits, ins, algorithm)
        assert_same_bytes(back, x, f"round trip v {algorithm}")
    return 3 * len(algorithms)
