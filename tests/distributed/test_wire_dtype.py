"""Communicator.all_to_all(_v) with wire_dtype: the result is the exact
exchange of decode(encode(x)), the gradient is the straight-through one, the
executor moves exactly the encoded bytes, and bad arguments raise a
ValueError naming the value before any communication."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import alltoall
from alltoall.ops import wire
from tests.harness.checks import assert_same_bytes, in_step_after_a_value_error

WORLDS = [(2, 1), (4, 2)]
FP8 = torch.float8_e4m3fn
WIRES = [torch.bfloat16, FP8]


def exchange(x: torch.Tensor, ins: list[int] | None = None, outs: list[int] | None = None) -> torch.Tensor:
    out = torch.empty((sum(outs) if outs is not None else x.shape[0], *x.shape[1:]), dtype=x.dtype)
    dist.all_to_all_single(out, x, outs, ins)
    return out


def rank_tensor(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * dist.get_rank() + seed)
    # Rows of different magnitudes, so their blocks get different scales.
    scale = torch.logspace(-3, 3, max(rows, 1))[:rows].unsqueeze(1)
    return (torch.randn(rows, cols, generator=g) * scale).to(dtype)


def _matches_round_trip(local_size: int) -> int:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    checked = 0
    for seed, (dtype, cols) in enumerate([(torch.float32, 130), (torch.float32, 1), (torch.bfloat16, 256),
                                          (torch.float16, 127), (torch.float64, 129)]):
        x = rank_tensor(3 * p, cols, dtype, seed)
        ins = [(rank + d) % 3 for d in range(p)]
        outs = [(s + rank) % 3 for s in range(p)]
        xv = rank_tensor(sum(ins), cols, dtype, seed + 50)
        for wire_dtype in WIRES:
            expected = exchange(wire.round_trip(x, wire_dtype))
            expected_v = exchange(wire.round_trip(xv, wire_dtype), ins, outs)
            for algorithm in ("flat", "hierarchical"):
                what = f"{dtype} cols={cols} {wire_dtype} {algorithm}"
                out = comm.all_to_all(x, algorithm, wire_dtype=wire_dtype)
                assert out.dtype == dtype
                assert_same_bytes(out, expected, what)
                assert_same_bytes(comm.all_to_all_v(xv, ins, outs, algorithm, wire_dtype=wire_dtype), expected_v,
                                  what + " (v)")
                got, received = comm.all_to_all_v(xv, ins, None, algorithm, wire_dtype=wire_dtype)
                assert_same_bytes(got, expected_v, what + " (v, splits exchanged)")
                assert received == outs
                checked += 1
    # A 3-d input: the last dim is the channels, every other dim indexes tokens.
    x3 = rank_tensor(2 * p * 3, 200, torch.float32, 99).view(2 * p, 3, 200)
    assert_same_bytes(comm.all_to_all(x3, wire_dtype=FP8), exchange(wire.round_trip(x3, FP8)), "3-d")
    return checked


@pytest.mark.parametrize("world,local_size", WORLDS)
def test_result_is_the_exchange_of_the_round_trip(worlds, world, local_size):
    assert worlds.run(world, _matches_round_trip, local_size) == [5 * 2 * 2] * world


def _gradients(local_size: int) -> None:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    ins = [(rank + 2 * d) % 3 for d in range(p)]
    outs = [(s + 2 * rank) % 3 for s in range(p)]
    for wire_dtype in WIRES:
        # The backward carries the gradient in bfloat16 for a bfloat16 wire
        # and in x's dtype for FP8; the rounding itself counts as identity.
        grad_wire = torch.bfloat16 if wire_dtype == torch.bfloat16 else None
        x = rank_tensor(2 * p, 300, torch.float32, 7).requires_grad_()
        weight = rank_tensor(2 * p, 300, torch.float32, 8)
        (comm.all_to_all(x, wire_dtype=wire_dtype) * weight).sum().backward()
        assert_same_bytes(x.grad, exchange(wire.round_trip(weight, grad_wire)), f"all_to_all grad, {wire_dtype}")

        xv = rank_tensor(sum(ins), 300, torch.float32, 9).requires_grad_()
        wv = rank_tensor(sum(outs), 300, torch.float32, 10)
        for given in (outs, None):
            xv.grad = None
            out = comm.all_to_all_v(xv, ins, given, wire_dtype=wire_dtype)
            out = out if given is not None else out[0]
            (out * wv).sum().backward()
            assert_same_bytes(xv.grad, exchange(wire.round_trip(wv, grad_wire), outs, ins),
                              f"all_to_all_v grad, {wire_dtype}, splits given={given is not None}")


@pytest.mark.parametrize("world,local_size", WORLDS)
def test_gradients_are_straight_through(worlds, world, local_size):
    worlds.run(world, _gradients, local_size)


def _sent(comm: alltoall.Communicator) -> int:
    """Payload bytes this rank has sent to other ranks (the executors' counters)."""
    return sum(b for ex in comm._exchangers.values() for _, b in ex.traffic())


def _bytes_on_the_wire() -> None:
    p = dist.get_world_size()
    comm = alltoall.Communicator()
    rows, cols = 4 * p, 512
    x = rank_tensor(rows, cols, torch.float32, 3)
    fp32 = rows * cols * 4
    seen: list[int] = []

    def record(call) -> None:
        before = _sent(comm)
        call()
        seen.append(_sent(comm) - before)

    record(lambda: comm.all_to_all(x))
    record(lambda: comm.all_to_all(x, wire_dtype=torch.bfloat16))
    record(lambda: comm.all_to_all(x, wire_dtype=FP8))
    record(lambda: comm.all_to_all_v(x, [4] * p, [4] * p, wire_dtype=FP8))
    # Equal splits: (p - 1) / p of the buffer goes to other ranks. FP8: one
    # byte per value plus 4 bytes per 128 values (4 scales of 4 bytes for
    # 512 channels): 1/4 + 1/128 of the fp32 bytes.
    others = [total * (p - 1) // p for total in (fp32, fp32 // 2, fp32 // 4 + fp32 // 128, fp32 // 4 + fp32 // 128)]
    assert seen == others
    assert wire.row_bytes(cols, torch.float32, FP8) * rows == fp32 // 4 + fp32 // 128
    # M = 129: two blocks, 129 + 8 bytes per row.
    seen.clear()
    record(lambda: comm.all_to_all(rank_tensor(rows, 129, torch.float32, 4), wire_dtype=FP8))
    assert seen == [rows * (129 + 8) * (p - 1) // p]


def test_exact_bytes(worlds):
    worlds.run(2, _bytes_on_the_wire)


def _bad_arguments() -> None:
    comm = alltoall.Communicator()
    x = torch.randn(4, 3)
    cases = [
        (lambda: comm.all_to_all(x, wire_dtype=torch.float16), r"all_to_all: wire_dtype=float16 is not supported"),
        (lambda: comm.all_to_all_v(x, [2, 2], wire_dtype=torch.float8_e5m2),
         r"all_to_all_v: wire_dtype=float8_e5m2 is not supported"),
        (lambda: comm.all_to_all(x, wire_dtype="fp8"), r"wire_dtype='fp8' is not supported"),
        (lambda: comm.all_to_all(torch.ones(4, 3, dtype=torch.int64), wire_dtype=torch.bfloat16),
         r"wire_dtype=bfloat16 needs a float16, bfloat16, float32 or float64 input, got int64"),
        (lambda: comm.all_to_all_v(torch.ones(4, 3, dtype=torch.int32), [2, 2], wire_dtype=FP8),
         r"wire_dtype=float8_e4m3fn needs .* got int32"),
        (lambda: comm.all_to_all(x, wire_dtype=FP8, async_op=True), r"cannot be combined with async_op=True"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    comm = in_step_after_a_value_error(comm, alltoall.Communicator, lambda c: c.all_to_all(x, wire_dtype=FP8))
    # Nothing was sent by the failing calls: the group still pairs up.
    assert_same_bytes(comm.all_to_all(x, wire_dtype=FP8), exchange(wire.round_trip(x, FP8)), "after errors")


def test_bad_arguments_raise_before_communicating(worlds):
    worlds.run(2, _bad_arguments)
