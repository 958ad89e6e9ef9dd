"""The C++ call path of Communicator.all_to_all(_v) (``_C.CallPath``): one
crossing from Python runs the checks, the algorithm choice, the exchange and
its autograd node. Differential against dist.all_to_all_single on gloo
ranks, for inputs the differential suites do not cover: non-contiguous ones,
every dtype, zero rows, gradients of leaves and non-leaves, double backward,
inference mode, two threads on two Communicators; and its ValueErrors, word
for word those of alltoall/ops/validation.py, before any communication."""

from __future__ import annotations

import math
import os
import threading

import pytest
import torch
import torch.distributed as dist

import alltoall
from alltoall.ops import validation
from alltoall.ops.communicator import Communicator
from alltoall.plan import LinkCost, Profile
from alltoall.plan import profile as profiles
from tests.harness.checks import assert_same_bytes, in_step_after_a_value_error, rank_input

# Every dtype torch can hold in a plain tensor, by bytes per element.
DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64,
          torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex32,
          torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2]


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """[rows, *] of any dtype as [rows, row_bytes] uint8 (gloo moves uint8)."""
    rows = x.contiguous().reshape(x.shape[0], math.prod(x.shape[1:]))
    if rows.shape[1] == 0:
        return torch.empty((x.shape[0], 0), dtype=torch.uint8)
    return rows.view(torch.uint8) if x.dtype != torch.bool else rows.to(torch.uint8)


def reference(x: torch.Tensor, ins: list[int] | None = None, outs: list[int] | None = None) -> torch.Tensor:
    """What dist.all_to_all_single gives, for any dtype: the exchange runs on
    the rows' bytes, which gloo carries whatever the element type."""
    src = _as_bytes(x)
    rows = x.shape[0] if outs is None else sum(outs)
    out = torch.empty((rows, src.shape[1]), dtype=torch.uint8)
    dist.all_to_all_single(out, src, outs, ins)
    if x.dtype == torch.bool:
        return out.bool().reshape(rows, *x.shape[1:])
    if src.shape[1] == 0:
        return torch.empty((rows, *x.shape[1:]), dtype=x.dtype)
    return out.view(x.dtype).reshape(rows, *x.shape[1:])


def random_input(rank: int, rows: int, trailing: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    if dtype in (torch.complex32, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64):
        # Not every kernel takes these: random bytes reinterpreted instead.
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = rank_input(rank, rows, (*trailing, itemsize), torch.uint8, seed)
        return raw.view(dtype).reshape(rows, *trailing)
    return rank_input(rank, rows, trailing, dtype, seed)


def splits_of(rank: int, p: int) -> tuple[list[int], list[int]]:
    m = [[(3 * s + 5 * d) % 4 for d in range(p)] for s in range(p)]  # zeros included
    return m[rank], [m[s][rank] for s in range(p)]


def _dtypes_layouts_and_zero_rows(local_size: int) -> int:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=local_size)
    ins, outs = splits_of(rank, p)
    checked = 0
    for dtype in DTYPES:
        for rows_per_peer, trailing in ((2, (3,)), (0, (3,)), (1, ()), (2, (2, 0))):
            x = random_input(rank, rows_per_peer * p, trailing, dtype, seed=checked)
            expected = reference(x)
            for algorithm in ("flat", "hierarchical", "auto"):
                assert_same_bytes(comm.all_to_all(x, algorithm), expected, f"{dtype} {trailing} {algorithm}")
            assert_same_bytes(alltoall.all_to_all(x), expected, f"module-level {dtype}")
            checked += 1
        x = random_input(rank, sum(ins), (2,), dtype, seed=checked)
        expected = reference(x, ins, outs)
        for algorithm in ("flat", "hierarchical"):
            assert_same_bytes(comm.all_to_all_v(x, ins, outs, algorithm), expected, f"v {dtype} {algorithm}")
            out, received = comm.all_to_all_v(x, ins, algorithm=algorithm)
            assert_same_bytes(out, expected, f"v {dtype} {algorithm}, splits exchanged")
            assert received == outs and isinstance(received, list)
        none = torch.empty((0, 2), dtype=dtype)  # every rank sends and receives nothing
        assert comm.all_to_all_v(none, [0] * p, [0] * p).shape == (0, 2)
        checked += 1
    return checked


@pytest.mark.parametrize("world,local_size", [(1, 1), (4, 2)])
def test_every_dtype_and_zero_rows(worlds, world, local_size):
    assert worlds.run(world, _dtypes_layouts_and_zero_rows, local_size) == [len(DTYPES) * 5] * world


def _non_contiguous() -> None:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=2)
    ins, outs = splits_of(rank, p)
    wide = rank_input(rank, 2 * p, (6,), torch.float32)
    tall = rank_input(rank, 5, (2 * p,), torch.float64)
    repeated = rank_input(rank, 1, (3,), torch.float32).expand(2 * p, 3)  # stride 0 along dim 0
    for x in (wide[:, ::2], wide[:, :3], tall.t(), wide.t().contiguous().t(), repeated):
        assert not x.is_contiguous()
        for algorithm in ("flat", "hierarchical"):
            assert_same_bytes(comm.all_to_all(x, algorithm), reference(x.contiguous()), f"{tuple(x.stride())}")
    x = rank_input(rank, sum(ins), (4,), torch.float32)[:, 1:3]
    assert not x.is_contiguous()
    assert_same_bytes(comm.all_to_all_v(x, ins, outs), reference(x.contiguous(), ins, outs))
    # A non-contiguous gradient on the way back.
    leaf = rank_input(rank, 2 * p, (3,), torch.float64).requires_grad_()
    weight = rank_input(rank, 3, (2 * p,), torch.float64)
    (comm.all_to_all(leaf).t() * weight).sum().backward()
    assert_same_bytes(leaf.grad, reference(weight.t().contiguous()))


def test_non_contiguous_inputs(worlds):
    worlds.run(4, _non_contiguous)


def _gradients() -> None:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=2)
    ins, outs = splits_of(rank, p)
    for algorithm in ("flat", "hierarchical"):
        # Equal splits: the backward is the same exchange.
        weight = rank_input(rank, 2 * p, (3,), torch.float64, seed=1)
        leaf = rank_input(rank, 2 * p, (3,), torch.float64).requires_grad_()
        out = comm.all_to_all(leaf, algorithm)
        assert out.requires_grad and out.grad_fn is not None
        (out * weight).sum().backward()
        assert_same_bytes(leaf.grad, reference(weight), f"leaf {algorithm}")
        base = rank_input(rank, 2 * p, (3,), torch.float64).requires_grad_()
        (comm.all_to_all(base * 2, algorithm) * weight).sum().backward()  # a non-leaf input
        assert_same_bytes(base.grad, reference(weight) * 2, f"non-leaf {algorithm}")
        # Uneven: the backward swaps the splits.
        weight = rank_input(rank, sum(outs), (3,), torch.float64, seed=2)
        leaf = rank_input(rank, sum(ins), (3,), torch.float64).requires_grad_()
        (comm.all_to_all_v(leaf, ins, outs, algorithm) * weight).sum().backward()
        assert_same_bytes(leaf.grad, reference(weight, outs, ins), f"v leaf {algorithm}")
        base = rank_input(rank, sum(ins), (3,), torch.float64).requires_grad_()
        out, received = comm.all_to_all_v(base * 3, ins, algorithm=algorithm)
        assert received == outs
        (out * weight).sum().backward()
        assert_same_bytes(base.grad, reference(weight, outs, ins) * 3, f"v non-leaf {algorithm}")
    # No gradient without grad mode, and none for inputs that do not need one.
    leaf = rank_input(rank, 2 * p, (3,), torch.float64).requires_grad_()
    with torch.no_grad():
        assert not comm.all_to_all(leaf).requires_grad
    assert not comm.all_to_all(leaf.detach()).requires_grad


def test_requires_grad_on_leaf_and_non_leaf(worlds):
    worlds.run(4, _gradients)


def _double_backward() -> None:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=2)
    ins, outs = splits_of(rank, p)
    # The exchange is linear: its backward is an exchange, differentiable in
    # the incoming gradient, whose own gradient is the forward exchange.
    x = rank_input(rank, 2 * p, (3,), torch.float64).requires_grad_()
    g = rank_input(rank, 2 * p, (3,), torch.float64, seed=1).requires_grad_()
    w = rank_input(rank, 2 * p, (3,), torch.float64, seed=2)
    (gx,) = torch.autograd.grad(comm.all_to_all(x, "hierarchical"), x, g, create_graph=True)
    assert gx.requires_grad
    assert_same_bytes(gx, reference(g.detach()))
    (gx * w).sum().backward()
    assert_same_bytes(g.grad, reference(w))
    x = rank_input(rank, sum(ins), (3,), torch.float64).requires_grad_()
    g = rank_input(rank, sum(outs), (3,), torch.float64, seed=1).requires_grad_()
    w = rank_input(rank, sum(ins), (3,), torch.float64, seed=2)
    (gx,) = torch.autograd.grad(comm.all_to_all_v(x, ins, outs), x, g, create_graph=True)
    assert_same_bytes(gx, reference(g.detach(), outs, ins))
    (gx * w).sum().backward()
    assert_same_bytes(g.grad, reference(w, ins, outs))


def test_double_backward(worlds):
    worlds.run(4, _double_backward)


def _inference_mode() -> None:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=2)
    ins, outs = splits_of(rank, p)
    plain = rank_input(rank, 2 * p, (3,), torch.float32)
    v = rank_input(rank, sum(ins), (2,), torch.float32)
    expected, expected_v = reference(plain), reference(v, ins, outs)
    leaf = plain.clone().requires_grad_()
    with torch.inference_mode():
        x = plain.clone()
        assert x.is_inference()
        out = comm.all_to_all(x)
        assert out.is_inference() and not out.requires_grad
        assert_same_bytes(out, expected)
        out = comm.all_to_all(leaf)  # a normal tensor that requires grad
        assert not out.requires_grad
        assert_same_bytes(out, expected)
        assert_same_bytes(comm.all_to_all_v(v.clone(), ins, outs), expected_v)


def test_inference_mode(worlds):
    worlds.run(4, _inference_mode)


def _two_threads() -> int:
    rank, p = dist.get_rank(), dist.get_world_size()
    other = dist.new_group(list(range(p)))
    comms = [alltoall.Communicator(local_size=2), alltoall.Communicator(other, local_size=2)]
    ins, outs = splits_of(rank, p)
    calls = 40
    inputs = [[rank_input(rank, 2 * p, (3,), torch.float32, seed=100 * t + i) for i in range(calls)] for t in range(2)]
    expected = [[reference(x) for x in row] for row in inputs]
    vin = [rank_input(rank, sum(ins), (2,), torch.float64, seed=t) for t in range(2)]
    vexpected = [reference(x, ins, outs) for x in vin]
    failures: list[BaseException] = []
    done = [0, 0]

    def body(t: int) -> None:
        try:
            comm = comms[t]
            for i, x in enumerate(inputs[t]):
                algorithm = ("flat", "hierarchical", "auto")[i % 3]
                if i % 4 == 3:
                    leaf = x.clone().requires_grad_()
                    out = comm.all_to_all(leaf, algorithm)
                    out.sum().backward()
                    assert_same_bytes(leaf.grad, torch.ones_like(x), f"thread {t} call {i} grad")
                else:
                    out = comm.all_to_all(x, algorithm)
                assert_same_bytes(out, expected[t][i], f"thread {t} call {i}")
                assert_same_bytes(comm.all_to_all_v(vin[t], ins, outs, algorithm), vexpected[t], f"thread {t} v {i}")
                done[t] += 1
        except BaseException as error:  # re-raised on the main thread
            failures.append(error)

    threads = [threading.Thread(target=body, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck"
    if failures:
        raise failures[0]
    return sum(done)


def test_two_threads_on_two_communicators(worlds):
    assert worlds.run(4, _two_threads, deadline_s=180) == [80] * 4


def _message(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


def _bad_input_messages() -> int:
    rank, p = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(local_size=2)
    uneven = alltoall.Communicator(topology=alltoall.Topology.from_node_ids([0, 0, 0, 1], rank))
    flat_only = Communicator.flat_only()
    checked = 0
    if rank == 0:
        # Only rank 0 calls: had any of these communicated, it would hang.
        # Each pair: (the C++ path's call, validation.py's own check).
        x = torch.zeros(8, 2)
        sv = validation.splits_to_list
        cases = [
            (lambda: comm.all_to_all([1, 2]), lambda: validation.check_tensor([1, 2], "all_to_all")),
            (lambda: comm.all_to_all(torch.tensor(1.0)),
             lambda: validation.check_tensor(torch.tensor(1.0), "all_to_all")),
            (lambda: comm.all_to_all(torch.zeros(6, 2)), lambda: validation.check_divisible(torch.zeros(6, 2), p,
                                                                                          "all_to_all")),
            (lambda: comm.all_to_all(torch.zeros(5)), lambda: validation.check_divisible(torch.zeros(5), p,
                                                                                       "all_to_all")),
            (lambda: comm.all_to_all(x, "ring"), lambda: validation.check_algorithm("ring")),
            (lambda: comm.all_to_all(x, None), lambda: validation.check_algorithm(None)),
            (lambda: uneven.all_to_all(x, "hierarchical"),
             lambda: validation.check_algorithm("hierarchical", uneven.topology)),
            (lambda: uneven.all_to_all_v(x, [2] * p, None, "hierarchical"),
             lambda: validation.check_algorithm("hierarchical", uneven.topology)),
            (lambda: flat_only.all_to_all(x, "hierarchical"), lambda: flat_only._resolve_for("hierarchical", 8)),
            (lambda: comm.all_to_all_v("x", [2] * p), lambda: validation.check_tensor("x", "all_to_all_v")),
            (lambda: comm.all_to_all_v(torch.tensor(2.0), [2] * p),
             lambda: validation.check_tensor(torch.tensor(2.0), "all_to_all_v")),
        ]
        bad_inputs = [[2] * (p - 1), [3, -1, 3, 3], [2, 2, 2, 1], torch.tensor([2.0] * p),
                      torch.ones(2, 2, dtype=torch.int64), torch.ones(p, dtype=torch.bool), None, 7, [None] * p]
        for splits in bad_inputs:
            cases.append((lambda s=splits: comm.all_to_all_v(x, s),
                          lambda s=splits: sv(s, "input_splits", p, 8, "all_to_all_v")))
        bad_outputs = [[2] * (p - 1), [3, -1, 3, 3], torch.tensor([2.0] * p), torch.ones(2, 2, dtype=torch.int64),
                       torch.ones(p, dtype=torch.bool), 7, [None] * p]
        for splits in bad_outputs:
            cases.append((lambda s=splits: comm.all_to_all_v(x, [2] * p, s),
                          lambda s=splits: sv(s, "output_splits", p, None, "all_to_all_v")))
        for call, python in cases:
            assert _message(call) == _message(python)
            checked += 1
        # The async and check=False entries check the same way.
        assert "not divisible" in _message(lambda: comm.all_to_all(torch.zeros(6), async_op=True))
        assert "is negative" in _message(lambda: comm.all_to_all_v(x, [3, -1, 3, 3], async_op=True))
        # Splits that are fine: tensors of any integer dtype, tuples, other iterables.
        y = rank_input(rank, 8, (2,), torch.float32)
        assert comm._call.validate_v(y, torch.tensor([2] * p, dtype=torch.int32), (2,) * p, "auto")[1:] == \
            ([2] * p, [2] * p)
        assert comm._call.validate_v(y, iter([2] * p), range(2, 2 + p), "flat") == ("flat", [2] * p, [2, 3, 4, 5])
    y = rank_input(rank, 2 * p, (2,), torch.float32)
    comm = in_step_after_a_value_error(comm, lambda: alltoall.Communicator(local_size=2),
                                       lambda c: c.all_to_all(y, "hierarchical"))
    assert_same_bytes(comm.all_to_all(y, "hierarchical"), reference(y))
    return checked


def test_bad_input_raises_the_same_value_errors_before_communication(worlds):
    checked = worlds.run(4, _bad_input_messages, deadline_s=120)
    assert checked[0] == 11 + 9 + 7 and checked[1:] == [0, 0, 0]


# Latency-heavy links, so the model's picks cross over within the sweep.
SLOW = LinkCost(100.0, 0.1)
SLOW_LINKS = Profile(links={"shm": SLOW, "loopback": SLOW, "tcp": SLOW}, copy=LinkCost(1.0, 10.0),
                     intra_node="tcp", inter_node="tcp", name="slow-links")


def _choices_agree(node_ids: list[int], profile_path: str | None) -> list[str]:
    saved = os.environ.get(profiles.PROFILE_ENV)
    os.environ[profiles.PROFILE_ENV] = profile_path or "off"
    try:
        comm = alltoall.Communicator(topology=alltoall.Topology.from_node_ids(node_ids, dist.get_rank()))
    finally:
        os.environ[profiles.PROFILE_ENV] = saved if saved is not None else "off"
    assert (comm.profile is None) == (profile_path is None)
    sizes = [4 * 2**i for i in range(20)] + [None]
    picks = [comm._call.resolve("auto", s) for s in sizes]
    assert picks == [comm.resolve("auto", s) for s in sizes]
    assert picks == [comm._call.resolve("auto", s) for s in sizes]  # remembered, the same
    assert comm._call.resolve("flat", 4) == "flat"
    return picks


@pytest.mark.parametrize("with_profile", [False, True], ids=["fixed-rule", "model"])
def test_auto_picks_what_python_picks(worlds, tmp_path, with_profile):
    path = None
    if with_profile:
        path = str(tmp_path / "slow.json")
        SLOW_LINKS.save(path)
    picks = worlds.run(4, _choices_agree, [0, 0, 1, 1], path)
    assert "flat" in picks[0] and "hierarchical" in picks[0], picks[0]
