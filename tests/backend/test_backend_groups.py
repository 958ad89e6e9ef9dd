"""Groups of the alltoall backend: the default group itself, subgroups
created in rank-dependent orders (each finds its topology through its own
store, with no collective on any other group), the log, bad settings, and a
rank killed mid-exchange."""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import alltoall
from tests.harness.checks import assert_same_bytes, rank_input


def _reference(x: torch.Tensor, members: list[int], rank: int) -> torch.Tensor:
    """What all_to_all_single gives group rank ``rank`` of ``members`` when
    each member's input is rank_input(its global rank, ...)."""
    p = len(members)
    rows = x.shape[0] // p
    blocks = [rank_input(g, x.shape[0], tuple(x.shape[1:]), x.dtype, 4)[rank * rows:(rank + 1) * rows]
              for g in members]
    return torch.cat(blocks)


def _groups_in_any_order() -> list[str]:
    rank, p = dist.get_rank(), dist.get_world_size()
    assert dist.get_backend() == "alltoall"
    parity = [r for r in range(p) if r % 2 == rank % 2]
    half = [r for r in range(p) if r // (p // 2) == rank // (p // 2)]
    # Only the members of a group take part in creating it
    # (use_local_synchronization): even and odd ranks create their parity
    # groups at the same time, each set without the other, and the even ranks
    # exchange on theirs before any half group exists. A backend whose
    # creation ran a collective on the default group (or any group the
    # creator is not alone in) would hang here. torch names such a group by
    # its ranks and by how many groups the process has created so far, so
    # every member of a group must have created as many before it; both
    # orders below keep that (a member with a different count would wait on
    # another store prefix, whatever the backend).
    groups = {"parity": (dist.new_group(parity, use_local_synchronization=True), parity)}
    if rank % 2 == 0:
        x = rank_input(rank, 2 * len(parity), (3,), torch.float32, 4)
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=groups["parity"][0])
        assert_same_bytes(out, _reference(x, parity, parity.index(rank)), "parity group, before the halves")
    groups["half"] = (dist.new_group(half, use_local_synchronization=True), half)
    checked = []
    for name in ("parity", "half", "world"):
        group, members = groups.get(name, (dist.group.WORLD, list(range(p))))
        me = members.index(rank)
        x = rank_input(rank, 2 * len(members), (3,), torch.float32, 4)
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        assert_same_bytes(out, _reference(x, members, me), f"group {name}")
        calls = sum(a["calls"] for a in alltoall.backend_stats(group)["algorithms"].values())
        assert calls == (2 if name == "parity" and rank % 2 == 0 else 1), (name, calls)
        checked.append(name)
    return checked


def test_default_group_and_subgroups_created_in_any_order(worlds):
    env = {"ALLTOALL_LOCAL_SIZE": "2", "ALLTOALL_ALGORITHM": "hierarchical"}
    for checked in worlds.run(8, _groups_in_any_order, env=env, backend="alltoall"):
        assert checked == ["parity", "half", "world"]


def _logged() -> str:
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        group = dist.new_group(backend="alltoall")
    x = torch.ones(4 * dist.get_world_size())
    dist.all_to_all_single(torch.empty_like(x), x, group=group)
    return captured.getvalue()


def test_log_names_topology_and_choice_once(world_pools):
    env = {"ALLTOALL_LOG": "1", "ALLTOALL_LOCAL_SIZE": "2", "ALLTOALL_ALGORITHM": "hierarchical",
           "ALLTOALL_TRANSPORT": "auto"}
    logs = world_pools.run(4, _logged, env=env)
    assert logs[1:] == ["", "", ""], "only the group's rank 0 logs"
    assert logs[0].count("alltoall backend: group") == 1
    assert "4 ranks on 2 node(s) x 2 rank(s), emulated placement" in logs[0]
    assert "hierarchical (ALLTOALL_ALGORITHM=hierarchical)" in logs[0]
    assert "hierarchical [intra_node: shm, inter_node: shm]" in logs[0]


def _bad_setting() -> str:
    try:
        dist.new_group(backend="alltoall")
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("env,message", [
    ({"ALLTOALL_ALGORITHM": "fastest"}, "ALLTOALL_ALGORITHM='fastest' is not one of auto, flat, hierarchical"),
    ({"ALLTOALL_INNER_BACKEND": "alltoall"}, "cannot wrap itself"),
    ({"ALLTOALL_INNER_BACKEND": "cpu:gloo,gpu:nccl"}, "'gpu:nccl' is not valid"),
])
def test_bad_settings_raise_naming_the_value(world_pools, env, message):
    for text in world_pools.run(2, _bad_setting, env=env):
        assert message in text


# A rank killed mid-exchange ---------------------------------------------------

WORLD = 4
VICTIM = 2
TIMEOUT_S = 8.0


def _rank_main(rank: int, store_path: str, transport: str, results: mp.Queue) -> None:
    os.environ.update({"ALLTOALL_LOCAL_SIZE": "2", "ALLTOALL_ALGORITHM": "hierarchical",
                       "ALLTOALL_TRANSPORT": transport})
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, WORLD)
        dist.init_process_group("alltoall", store=store, rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=TIMEOUT_S))
        x = torch.ones(WORLD * 1024)
        for step in range(50):
            if rank == VICTIM and step == 10:
                with open(f"{store_path}.died", "w") as f:  # CLOCK_MONOTONIC is system-wide
                    f.write(repr(time.monotonic()))
                os._exit(9)  # dies between exchanges the others are already in
            dist.all_to_all_single(torch.empty_like(x), x)
        results.put((rank, "finished", 0.0))
    except Exception:
        results.put((rank, traceback.format_exc(), time.monotonic()))
    finally:
        # Flush the queue's feeder thread, then leave without destroy_process_group:
        # a backend waiting on a dead peer is what is tested.
        results.close()
        results.join_thread()
        os._exit(0)


@pytest.mark.parametrize("transport", ["auto", "c10d"])
def test_a_killed_rank_fails_the_others_within_the_timeout(tmp_path, transport):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "store"), transport, results))
             for r in range(WORLD)]
    for proc in procs:
        proc.start()
    try:
        reports = {}
        deadline = time.monotonic() + 120
        while len(reports) < WORLD - 1 and time.monotonic() < deadline:
            try:
                rank, text, at = results.get(timeout=1)
            except Exception:
                continue
            reports[rank] = (text, at)
    finally:
        for proc in procs:
            proc.kill()
            proc.join()
    assert sorted(reports) == [r for r in range(WORLD) if r != VICTIM], f"ranks that reported: {sorted(reports)}"
    died_at = float((tmp_path / "store.died").read_text())
    for rank, (text, at) in reports.items():
        # Bounded by the group's timeout (plus process scheduling on 2 cores).
        assert at - died_at < TIMEOUT_S + 10, f"rank {rank} failed {at - died_at:.1f} s after rank {VICTIM} died"
        assert "finished" not in text, f"rank {rank} finished although rank {VICTIM} died"
        # The error names the step and the group ("group '0'" is the default
        # group, "'0/intra_node'" its node subgroup).
        assert "group '0" in text and "phase" in text, f"rank {rank}: {text}"
