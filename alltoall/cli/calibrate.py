"""``alltoall-bench --calibrate``: fits a cost profile on the running job.

Every rank runs this; rank 0 writes the profile. The sweep times flat
exchanges on the group shapes the plans run, each on every transport the
Communicator offers, so each link class is measured where it carries
traffic and in the company it has there:

- the world (one group of every rank): what the flat plan runs;
- the node groups, all at once: the intra-node phase of hierarchical;
- the rail groups (one rank per node, same local index), all at once: its
  inter-node phase;
- local copy passes (``gather_blocks`` reversing the blocks), on every rank
  at once: the copy rate, a second one for buffers beyond this host's share
  of the last-level cache (sysfs: cache size / (2 x ranks on the host)).

A flat exchange of b bytes per rank on a group of k ranks sends k-1
messages of b/k bytes, so each (class, group, size) is one sample of
``phase + messages * alpha + bytes / bandwidth`` (calibrate_fit), the
bandwidth being that of the protocol the message size selects: the
shared-memory transport's threshold (``ALLTOALL_SHM_SINGLE_COPY_BYTES``, as
the transport reads it) is passed to the fit. Group sizes differ between
the scopes (8, 4 and 2 for 8 ranks as 2 nodes of 4), which tells the fixed
cost of a phase from the cost per message. Across real hosts, the world's
flat exchange mixes messages inside a node with messages between nodes, so
a class the rail groups also time ("tcp", "net") is fitted from the rail
groups alone there. Times are the slowest rank's mean per call.

Then the second stage (calibrate_refine): the flat and hierarchical plans
are timed whole on the world, on every transport, and every parameter of
the profile is refitted on those times, which carry what timing each phase
alone misses (phases run back to back, reorders between them).

Sizes: 1 KiB to 4 MiB per rank, x4 steps, fewer calls at larger sizes.
Every timing is taken in rounds of ``ROUND_CALLS`` calls after a barrier,
as the bench takes its times. The sweep took 14 s on 8 ranks of this 2-core
machine and 27-29 s on the emulated clusters (the whole command about 50 s
there, with the namespaces and the 8 processes started).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

import alltoall
from alltoall.cli.bench_algorithms import BenchContext
from alltoall.cli.bench_run import SweepOptions, measure_size, round_sizes
from alltoall.cli.bench_traffic import SplitsSpec
from alltoall.cli.calibrate_fit import COPY, Fit, Sample, fit_all
from alltoall.cli.calibrate_refine import PlanSample, Refinement, refine
from alltoall.plan import Profile
from alltoall.plan import profile as profiles
from alltoall.topology import Topology
from alltoall.transport import GroupRef, new_subgroups, resolve_timeout
from alltoall.transport.shm import ShmOptions

SIZES = tuple(1024 * 4**i for i in range(7))  # 1 KiB .. 4 MiB per rank
COPY_SIZES = tuple(1024 * 2**i for i in range(15))  # 1 KiB .. 16 MiB: copies are cheap to time
# Timed calls of a whole plan per size (the final fit rests on these): more
# than the first stage's. With 8 ranks on 2 cores a mean over 30 calls of a
# small exchange still scatters by up to 50% between neighbouring sizes. Over
# emulated TCP, flat at 1 MiB has slow periods lasting seconds: 18 calls
# timed the same exchange at 17.7 and 32.0 ms in one calibration (2x4). With
# 60 calls (about 4 s more) the two timings agreed within 3% in one run, and
# still differed (13.0 and 23.6 ms, 4x2) in another: docs/performance.md.
PLAN_CALLS = {16 * 1024: 90, 256 * 1024: 30, 1024 * 1024: 60}
PLAN_CALLS_LARGER = 20
# Calls per timed round, each round after a barrier: what bench/validate_model.py's
# runs use (-n 100 -R 10), whose times the predictions are checked against.
ROUND_CALLS = 10
# Transports tried on every group, in order; "default" is what "auto" runs on.
TRANSPORTS = ("default", "shm", "c10d")


def _calls(size: int) -> tuple[int, int]:
    """(warm-up, timed) calls for a size: the same on every rank. Three
    warm-up calls at every size: the first calls of a new size fault in the
    pages of freshly allocated outputs (the allocator keeps them after
    that), which the steady state a user, or the bench, sees does not pay."""
    if size <= 16 * 1024:
        return 3, 30
    if size <= 256 * 1024:
        return 3, 10
    return 3, 6


def _plan_calls(size: int) -> int:
    """Timed calls of a whole plan at ``size`` bytes per rank: the same on every rank."""
    return next((calls for limit, calls in PLAN_CALLS.items() if size <= limit), PLAN_CALLS_LARGER)


@dataclass
class GroupRun:
    scope: str  # "world", "node" or "rail"
    transport: str
    link: str
    comm: alltoall.Communicator | None


def _scopes(topology: Topology) -> list[tuple[str, tuple[int, ...] | None]]:
    """(scope, this rank's group in it or None), the same scopes on every
    rank: the world, the node groups and the rail groups; a scope whose
    groups have one rank, or that repeats the world, is left out."""
    world = tuple(range(topology.size))
    out: list[tuple[str, tuple[int, ...] | None]] = [("world", world)]
    node = topology.ranks_of_node(topology.node)
    if 1 < len(node) < topology.size:
        out.append(("node", node))
    rail = topology.ranks_with_local_rank(topology.local_rank)
    if 1 < len(rail) < topology.size:
        out.append(("rail", rail))
    return out


def last_level_cache_bytes() -> int:
    """The largest CPU cache of this machine (sysfs), 0 when unknown."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=0)


def _copy_threshold(topology: Topology) -> int:
    """The buffer size from which a copy pass streams from memory rather
    than the last-level cache: the cache shared by the ranks of this host,
    each holding a source and a destination. 0 (one rate) when unknown."""
    on_host = topology.size if topology.emulated else (topology.ranks_per_node or topology.size)
    return last_level_cache_bytes() // (2 * on_host)


def _thresholds(runs: list[GroupRun | None], topology: Topology) -> dict[str, int]:
    """Per link class, the message size from which its transport switches to
    its large-message protocol, as the transport reads it (0: none); for
    copies, the cache threshold."""
    out: dict[str, int] = {COPY: _copy_threshold(topology)}
    for run in runs:
        if run is not None and run.link == "shm":
            out["shm"] = ShmOptions.from_env(run.comm.size).single_copy_bytes if run.comm else 0
    return out


def _communicators(scope: str, members: tuple[int, ...] | None, rank: int, timeout) -> list[GroupRun | None]:
    """Per transport of TRANSPORTS: a Communicator on ``members`` (global
    ranks), or None where this rank has no group, the transport does not
    exist or cannot run here, or it gives a link class already covered."""
    if members is None:
        return [None] * len(TRANSPORTS)
    # Only this rank's own group: calibration runs on host backends, where
    # groups are created with local synchronisation (new_subgroups).
    ref = new_subgroups(GroupRef.of(None), [list(members)], timeout, f"alltoall_calibrate_{scope.replace(' ', '_')}")
    assert ref is not None
    topo = Topology.emulate(len(members), len(members), members.index(rank))
    runs: list[GroupRun | None] = []
    seen: set[str] = set()
    for transport in TRANSPORTS:
        kwargs = {} if transport == "default" else {"transport": transport}
        try:
            comm = alltoall.Communicator(ref.group, topology=topo, timeout=timeout, **kwargs)
        except (TypeError, ValueError):  # no such transport in this build, or not on this group
            runs.append(None)
            continue
        link = comm.links("flat")[0]
        runs.append(None if link in seen else GroupRun(scope, transport, link, comm))
        seen.add(link)
    return runs


def _slowest_mean_us(call: Callable[[], object], size: int, group: dist.ProcessGroup | None) -> float:
    """The slowest rank's mean microseconds per call, after the warm-up
    calls: the statistic the bench reports, taken as the bench takes it, in
    rounds of ``ROUND_CALLS`` calls each after a barrier, so that predictions
    and the bench's times mean the same thing. (With one barrier before all
    the calls, small exchanges timed up to 1.9x faster here than in the
    bench's rounds: each round's first call absorbs the ranks' skew on
    leaving the barrier. Tried in loaded runs on one host: the median
    predicted below the bench's means; each call's slowest rank, averaged,
    far above them, as ranks reach a call at different times.)"""
    warmup, timed = _calls(size)
    for _ in range(warmup):
        call()
    seconds = 0.0
    for count in round_sizes(timed, -(-timed // ROUND_CALLS)):
        dist.barrier(group=group)
        start = time.perf_counter()
        for _ in range(count):
            call()
        seconds += time.perf_counter() - start
    slowest = torch.tensor([seconds / timed], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # over the world: every rank's time counts
    return float(slowest.item()) * 1e6


def _copy_samples(world: int) -> list[Sample]:
    """One reorder pass (the blocks of a buffer reversed) per size, on every
    rank at once, as in an exchange; up to 16 MiB, so that at least two sizes
    lie above the cache threshold (``_copy_threshold``)."""
    samples = []
    for size in COPY_SIZES:
        x = torch.zeros((world, size // world), dtype=torch.uint8)
        starts, lengths = list(reversed(range(world))), [1] * world
        t = _slowest_mean_us(lambda x=x, s=starts, n=lengths: torch.ops.alltoall.gather_blocks(x, s, n), size, None)
        samples.append(Sample("copy", 1, float(x.numel()), t))
    return samples


def _time_plans(comm: alltoall.Communicator, algorithms: tuple[str, ...], nbytes: int,
                x: torch.Tensor) -> dict[str, float]:
    """Per algorithm, the slowest rank's mean microseconds per call, timed by
    the bench's own routine (bench_run.measure_size): the algorithms'
    rounds alternate, each after a barrier, as in the runs the predictions
    are checked against."""
    warmup, _ = _calls(nbytes)
    timed = _plan_calls(nbytes)
    runners = {a: (lambda x, _send, _recv, _uniform, c=comm, a=a: c.all_to_all(x, a)) for a in algorithms}
    opts = SweepOptions([nbytes], "float", torch.float32, timed, warmup, 0, 0, -(-timed // ROUND_CALLS),
                        SplitsSpec("uniform"))
    ctx = BenchContext(comm, "calibrate", dist.get_backend(), torch.device("cpu"), 1)
    seconds = measure_size(ctx, runners, {a: (x, None) for a in algorithms}, [], [], opts)
    slowest = torch.tensor([seconds[a][0] for a in algorithms], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # over the world: every rank's time counts
    return {a: float(t) * 1e6 for a, t in zip(algorithms, slowest.tolist(), strict=True)}


def _plan_samples(topology: Topology, timeout) -> list[PlanSample]:
    """The plans "auto" chooses between, timed whole on the world: flat, and
    hierarchical where the nodes allow it, on every transport the
    Communicator offers here (each distinct set of phase links once)."""
    algorithms = ("flat", "hierarchical") if topology.uniform and topology.num_nodes > 1 else ("flat",)
    samples: list[PlanSample] = []
    seen: set[tuple[tuple[str, ...], ...]] = set()
    for transport in TRANSPORTS:
        kwargs = {} if transport == "default" else {"transport": transport}
        try:
            comm = alltoall.Communicator(None, topology=topology, timeout=timeout, **kwargs)
        except (TypeError, ValueError):  # not on this world (the same answer on every rank)
            continue
        links = tuple(tuple(comm.links(a)) for a in algorithms)
        if links in seen:
            continue
        seen.add(links)
        for nbytes in SIZES:
            elements = max(comm.size, nbytes // 4 // comm.size * comm.size)
            times = _time_plans(comm, algorithms, nbytes, torch.zeros(elements, dtype=torch.float32))
            samples += [PlanSample(algorithm, tuple(topology.node_of_rank), topology.rank, phase_links,
                                   float(elements * 4), not topology.emulated, times[algorithm])
                        for algorithm, phase_links in zip(algorithms, links, strict=True)]
        del comm
    return samples


@dataclass
class Calibration:
    profile: Profile
    fit: Fit
    samples: list[Sample]
    seconds: float
    refinement: Refinement | None = None
    plan_samples: list[PlanSample] | None = None


def calibrate(topology: Topology, timeout) -> Calibration:
    """Collective over the world: the sweep and the fit. Rank 0's result is
    the one to keep (it is in a group of every scope); only rank 0 refits
    on the whole plans, the other ranks return the first stage's profile."""
    start = time.perf_counter()
    timeout = resolve_timeout(timeout)
    rank, size = dist.get_rank(), dist.get_world_size()
    if topology.size != size or not topology.uniform:
        raise ValueError(f"calibrate runs on the whole world in nodes of equal size; this topology is "
                         f"{topology.describe()}")
    if size < 2:
        raise ValueError("calibrate needs at least two ranks")
    slots: list[GroupRun | None] = []
    for scope, members in _scopes(topology):  # the same scopes, in the same order, on every rank
        slots += _communicators(scope, members, rank, timeout)
    samples: list[Sample] = []
    tagged: list[tuple[str, str]] = []  # (link, scope) of each exchange sample
    for run in slots:  # every rank walks every slot: the timing collectives line up
        for nbytes in SIZES:
            if run is None:
                _slowest_mean_us(lambda: None, nbytes, None)
                continue
            k = run.comm.size
            elements = max(k, nbytes // 4 // k * k)
            x = torch.zeros(elements, dtype=torch.float32)
            t = _slowest_mean_us(lambda c=run.comm, x=x: c.all_to_all(x, "flat"), nbytes, None)
            samples.append(Sample(run.link, k - 1, elements * 4 * (k - 1) / k, t, elements * 4 / k))
            tagged.append((run.link, run.scope))
    # Across real hosts the world's samples mix messages inside and between
    # nodes: a class the rail groups time is fitted on theirs alone.
    if not topology.emulated and topology.num_nodes > 1:
        across = {link for link, scope in tagged if scope == "rail"}
        samples = [s for s, (link, scope) in zip(samples, tagged, strict=True)
                   if scope == "rail" or link not in across]
    samples += _copy_samples(size)
    fit = fit_all(samples, _thresholds(slots, topology))
    default = {run.scope: run.link for run in slots if run is not None and run.transport == "default"}
    intra = default.get("node") or default.get("rail")
    inter = default.get("rail") or intra
    if intra is None:
        raise ValueError("calibrate found no group of two or more ranks to time")
    for run in slots:  # release the Communicators before their groups go
        if run is not None:
            run.comm = None
    first = Profile(
        links={link: r.cost for link, r in fit.links.items() if link != COPY}, copy=fit.links[COPY].cost,
        intra_node=intra, inter_node=inter,
        name="calibrated", description=f"alltoall-bench --calibrate on {size} ranks, {topology.describe()}",
        sources=(f"alltoall {alltoall.__version__} --calibrate: flat exchanges on the world, the node groups "
                 f"and the rail groups, then the flat and hierarchical plans on the world (calibrate_refine), "
                 f"{len(SIZES)} sizes from {SIZES[0]} to {SIZES[-1]} B per rank",),
        fit={link: r.to_json() for link, r in fit.links.items()},
    )
    plan_samples = _plan_samples(topology, timeout)
    if rank != 0:
        # Rank 0's profile is the one kept (run() sends it to every host); the
        # refit's Gauss-Newton steps, on 8 ranks sharing 2 cores, took 15-20 s
        # when every rank ran them.
        return Calibration(first, fit, samples, time.perf_counter() - start, None, plan_samples)
    refinement = refine(first, plan_samples)
    profile = replace(refinement.profile, fit={**(first.fit or {}), "plans": refinement.to_json()})
    return Calibration(profile, fit, samples, time.perf_counter() - start, refinement, plan_samples)


def report_lines(cal: Calibration) -> list[str]:
    """The fit, per class, with its error: what --calibrate prints."""
    fit = cal.fit
    lines = [f"# calibrated in {cal.seconds:.1f} s: {len(cal.samples)} samples",
             f"# {'class':<8} {'phase (us)':>11} {'alpha (us)':>11} {'GB/s':>9} {'large from (B)':>15} "
             f"{'large GB/s':>11} {'samples':>8} {'max err':>8} {'mean err':>9}"]
    for link, r in fit.links.items():
        c = r.cost
        large = (f"{c.large_bytes:>15d} {c.large_gbps:>11.3f}" if c.large_gbps is not None
                 else f"{'-':>15} {'-':>11}")
        lines.append(f"# {link:<8} {c.phase_us:>11.1f} {c.alpha_us:>11.2f} {c.gbps:>9.3f} {large} {r.samples:>8d} "
                     f"{r.max_error:>7.1%} {r.mean_error:>9.1%}")
    if cal.refinement is not None and cal.plan_samples:
        r = cal.refinement
        lines.append(f"# refitted on {r.samples} exchanges of whole plans: max err {r.max_error:.1%}, mean err "
                     f"{r.mean_error:.1%}" + (f", tcp large from {r.tcp_threshold} B" if r.tcp_threshold else ""))
        for link, c in [*cal.profile.links.items(), ("copy", cal.profile.copy)]:
            large = (f"{c.large_bytes:>15d} {c.large_gbps:>11.3f}" if c.large_gbps is not None
                     else f"{'-':>15} {'-':>11}")
            lines.append(f"# {link:<8} {c.phase_us:>11.1f} {c.alpha_us:>11.2f} {c.gbps:>9.3f} {large}")
        lines.append(f"# {'plan':<13} {'links':<12} {'bytes':>10} {'measured (us)':>14} {'predicted (us)':>15}")
        for s in cal.plan_samples:
            lines.append(f"# {s.algorithm:<13} {','.join(s.links):<12} {s.bytes_per_rank:>10.0f} {s.time_us:>14.1f} "
                         f"{s.predict_us(cal.profile):>15.1f}")
    lines.append(f"# intra-node class {cal.profile.intra_node}, inter-node class {cal.profile.inter_node}, "
                 f"hash {cal.profile.hash}")
    lines.append(f"# {'class':<8} {'bytes':>10} {'messages':>9} {'message (B)':>12} {'measured (us)':>14} "
                 f"{'fitted (us)':>12}")
    for s in cal.samples:
        lines.append(f"# {s.link:<8} {s.bytes:>10.0f} {s.messages:>9d} {s.each:>12.0f} {s.time_us:>14.1f} "
                     f"{fit.predicted_us(s):>12.1f}")
    return lines


def run(topology: Topology, timeout) -> int:
    """The --calibrate mode of a rank: sweep, fit, report on rank 0, and the
    profile written on every host (by each host's first local rank: hosts
    need not share a file system), so that Communicators created after this
    returns, on any rank, load it."""
    target = profiles.output_path()
    previous = os.environ.get(profiles.PROFILE_ENV)
    os.environ[profiles.PROFILE_ENV] = "off"  # the profile being replaced must not steer the sweep
    try:
        cal = calibrate(topology, timeout)
    finally:
        if previous is None:
            del os.environ[profiles.PROFILE_ENV]
        else:
            os.environ[profiles.PROFILE_ENV] = previous
    doc = [cal.profile.to_json() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(doc, src=0)
    if dist.get_rank() == 0 or topology.local_rank == 0:
        Profile.from_json(doc[0]).save(target)
    dist.barrier()  # every host's file is in place before anyone reads it
    if dist.get_rank() == 0:
        print("\n".join(report_lines(cal)))
        print(f"# wrote profile: {target} (alltoall reads it from {profiles.PROFILE_ENV} or {profiles.default_path()})",
              flush=True)
    return 0


__all__ = ["SIZES", "Calibration", "calibrate", "report_lines", "run"]
