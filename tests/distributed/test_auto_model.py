"""algorithm="auto" with a cost profile: the same profile on every rank or a
clear error on every rank; the same choice on every rank at every size, and
the choice is the model's fastest."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import alltoall
from alltoall.plan import LinkCost, Profile
from alltoall.plan import profile as profiles
from tests.harness.checks import assert_same_bytes, rank_input

# Latency-heavy links: hierarchical's fewer messages win small exchanges,
# flat's fewer bytes win large ones, so the sweep crosses over. Shared memory
# and TCP cost the same, so the picks do not depend on the transport.
SLOW = LinkCost(100.0, 0.1)
SLOW_LINKS = Profile(links={"shm": SLOW, "loopback": SLOW, "tcp": SLOW}, copy=LinkCost(1.0, 10.0),
                     intra_node="tcp", inter_node="tcp", name="slow-links")
SIZES_PER_PEER = [4 * 2**i for i in range(18)]  # 4 B .. 512 KiB per peer


def _with_profile(path_of_rank: dict[int, str], body):
    """Runs body() with ALLTOALL_PROFILE set per rank, restored after."""
    saved = os.environ.get(profiles.PROFILE_ENV)
    os.environ[profiles.PROFILE_ENV] = path_of_rank[dist.get_rank()]
    try:
        return body()
    finally:
        if saved is None:
            os.environ.pop(profiles.PROFILE_ENV, None)
        else:
            os.environ[profiles.PROFILE_ENV] = saved


def _mismatch(paths: dict[int, str]) -> str:
    def body() -> str:
        try:
            alltoall.Communicator(local_size=2)
        except ValueError as error:
            return str(error)
        return "no error"

    return _with_profile(paths, body)


@pytest.fixture
def profile_files(tmp_path):
    same, other, broken = tmp_path / "same.json", tmp_path / "other.json", tmp_path / "broken.json"
    SLOW_LINKS.save(same)
    Profile(links={"shm": SLOW, "loopback": SLOW, "tcp": LinkCost(101.0, 0.1)}, copy=LinkCost(1.0, 10.0),
            intra_node="tcp", inter_node="tcp", name="slow-links").save(other)  # same name, other alpha
    broken.write_text("{not json")
    return {"same": str(same), "other": str(other), "broken": str(broken)}


@pytest.mark.parametrize("odd_one", ["other", "off", "broken"])
def test_profile_mismatch_is_an_error_on_every_rank(worlds, profile_files, odd_one):
    paths = {0: profile_files["same"], 1: profile_files["same"], 2: profile_files["same"],
             3: profile_files.get(odd_one, odd_one)}
    messages = worlds.run(4, _mismatch, paths)
    for rank, message in enumerate(messages):
        assert "every rank must load the same cost profile" in message, (rank, message)
        assert "ranks [0, 1, 2] have profile 'slow-links' (hash " in message, message
        expected = {"other": "ranks [3] have profile 'slow-links'", "off": "ranks [3] have no profile",
                    "broken": "ranks [3] have an unreadable profile"}[odd_one]
        assert expected in message, message
    assert len(set(messages)) == 1  # every rank says the same


def _choices(path: str, node_ids: list[int] | None) -> tuple[list[str], list[str], int]:
    def body():
        rank = dist.get_rank()
        if node_ids is None:
            comm = alltoall.Communicator(local_size=4)
        else:
            comm = alltoall.Communicator(topology=alltoall.Topology.from_node_ids(node_ids, rank))
        assert comm.profile is not None and comm.profile.hash == SLOW_LINKS.hash
        picks = [comm.resolve("auto", s) for s in SIZES_PER_PEER]
        fastest = []
        for s in SIZES_PER_PEER:
            predicted = comm.predict(s * comm.size)
            fastest.append(min(predicted, key=predicted.__getitem__))
        checked = 0
        for s in (SIZES_PER_PEER[0], SIZES_PER_PEER[-1]):  # both sides of the crossover run right
            x = rank_input(rank, s // 4 * comm.size, (), torch.float32)
            expected = torch.empty_like(x)
            dist.all_to_all_single(expected, x)
            assert_same_bytes(comm.all_to_all(x, "auto"), expected, f"auto at {s} B per peer")
            checked += 1
        return picks, fastest, checked

    return _with_profile(dict.fromkeys(range(8), path), body)


@pytest.mark.parametrize("node_ids", [None, [0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 0, 1, 0, 1]],
                         ids=["emulated-2x4", "hosts-2x4", "interleaved-4x2"])
def test_auto_choice_is_the_same_on_every_rank(worlds, profile_files, node_ids):
    results = worlds.run(8, _choices, profile_files["same"], node_ids)
    picks, fastest, _ = results[0]
    assert all(r[0] == picks for r in results), [r[0] for r in results]
    assert picks == fastest  # auto takes the lowest predicted time
    assert picks[0] == "hierarchical" and picks[-1] == "flat", picks  # the sweep crosses over
    assert all(r[2] == 2 for r in results)


def _without_profile() -> tuple[list[str], list[str]]:
    comm = alltoall.Communicator(topology=alltoall.Topology.from_node_ids([0, 0, 1, 1], dist.get_rank()))
    assert comm.profile is None
    with pytest.raises(ValueError, match="no cost profile"):
        comm.predict(1024)
    from alltoall.ops import selection

    return ([comm.resolve("auto", s) for s in SIZES_PER_PEER],
            [selection.choose(comm.topology, s) for s in SIZES_PER_PEER])


def test_without_a_profile_the_fixed_rule_stays(worlds):
    for picks, rule in worlds.run(4, _without_profile):
        assert picks == rule and "hierarchical" in picks and "flat" in picks


def _compiled_auto(path: str) -> list[str]:
    def body() -> list[str]:
        comm = alltoall.Communicator(local_size=2)

        def f(x: torch.Tensor) -> torch.Tensor:
            return comm.all_to_all(x * 2, "auto").sin()

        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
        picks = []
        for rows in (1, 4096):  # both sides of the crossover
            x = rank_input(dist.get_rank(), rows * comm.size, (), torch.float32)
            torch.testing.assert_close(compiled(x), f(x))
            picks.append(comm.resolve("auto", rows * 4))
        return picks

    return _with_profile(dict.fromkeys(range(4), path), body)


def test_auto_with_a_profile_compiles_in_one_graph(worlds, profile_files):
    results = worlds.run(4, _compiled_auto, profile_files["same"], deadline_s=300)
    assert all(r == ["hierarchical", "flat"] for r in results), results
