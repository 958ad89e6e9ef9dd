"""``alltoall-bench --calibrate``: fits a cost profile on the running job.

Every rank runs this; rank 0 writes the profile. The sweep times flat
exchanges on the groups the plans use, each on every transport the
Communicator offers, so each link class is measured where it carries
traffic:

- the node group (this rank's node): the intra-node class(es);
- the rail group (one rank per node, same local index): the inter-node class;
- local copy passes (``gather_blocks`` reversing the blocks): the copy rate.

A flat exchange of b bytes per rank on a group of k ranks sends k-1
messages and b(k-1)/k bytes, so each (class, size) is one sample of
``messages * alpha + bytes / bandwidth`` (calibrate_fit). A class measured
both inside a node and across real hosts (gloo's "tcp": loopback and
network) is fitted from the cross-host samples, the ones its inter-node
phases see. Times are the slowest rank's mean per call.

Sizes: 1 KiB to 4 MiB per rank, x4 steps, fewer calls at larger sizes, so
the whole sweep stays well under a minute on 8 ranks of a 2-core machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

import alltoall
from alltoall.cli.calibrate_fit import FitResult, Sample, fit_all
from alltoall.ops import selection
from alltoall.plan import LinkCost, Profile
from alltoall.plan import profile as profiles
from alltoall.topology import Topology
from alltoall.transport import new_subgroup, resolve_timeout

SIZES = tuple(1024 * 4**i for i in range(7))  # 1 KiB .. 4 MiB per rank
# Transports tried on every group, in order; "default" is what "auto" runs on.
TRANSPORTS = ("default", "shm", "c10d")


def _calls(size: int) -> tuple[int, int]:
    """(warm-up, timed) calls for a size: the same on every rank."""
    if size <= 16 * 1024:
        return 3, 30
    if size <= 256 * 1024:
        return 2, 10
    return 1, 4


@dataclass
class GroupRun:
    scope: str  # "node" or "rail"
    transport: str
    link: str
    comm: alltoall.Communicator


def _communicators(scope: str, members: tuple[int, ...], index: int, timeout) -> list[GroupRun]:
    """A flat-ready Communicator on ``members`` (global ranks) for each
    transport this build offers; duplicates of a link class are dropped."""
    ref = new_subgroup(list(members), timeout, f"alltoall_calibrate_{scope}")
    topo = Topology.emulate(len(members), len(members), index)
    runs: list[GroupRun] = []
    seen: set[str] = set()
    for transport in TRANSPORTS:
        kwargs = {} if transport == "default" else {"transport": transport}
        try:
            comm = alltoall.Communicator(ref.group, topology=topo, timeout=timeout, **kwargs)
        except TypeError:  # a Communicator without transports (before issue 10)
            continue
        except ValueError:  # this transport cannot run on this group
            continue
        link = selection.phase_links(comm, "flat", len(comm.exchanger("flat").plan.phases))[0]
        if link in seen and transport != "default":
            continue
        seen.add(link)
        runs.append(GroupRun(scope, transport, link, comm))
    return runs


def _slowest_mean_us(call: Callable[[], object], size: int, group: dist.ProcessGroup) -> float:
    warmup, timed = _calls(size)
    for _ in range(warmup):
        call()
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(timed):
        call()
    seconds = torch.tensor([(time.perf_counter() - start) / timed], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # over the world: every rank's time counts
    return float(seconds.item()) * 1e6


def _copy_samples(world: int) -> list[Sample]:
    """One reorder pass (the blocks of a buffer reversed) per size, on every
    rank at once, as in an exchange."""
    samples = []
    for size in SIZES:
        x = torch.zeros((world, size // world), dtype=torch.uint8)
        starts, lengths = list(reversed(range(world))), [1] * world
        t = _slowest_mean_us(lambda x=x, s=starts, n=lengths: torch.ops.alltoall.gather_blocks(x, s, n), size, None)
        samples.append(Sample("copy", 1, float(x.numel()), t))
    return samples


@dataclass
class Calibration:
    profile: Profile
    fits: dict[str, FitResult]
    samples: list[Sample]
    seconds: float


def calibrate(topology: Topology, timeout) -> Calibration:
    """Collective over the world: the sweep and the fit (every rank gets the result)."""
    start = time.perf_counter()
    timeout = resolve_timeout(timeout)
    rank, size = dist.get_rank(), dist.get_world_size()
    if topology.size != size:
        raise ValueError(f"calibrate runs on the world; the topology has {topology.size} of {size} ranks")
    scopes: list[tuple[str, tuple[int, ...]]] = [("node", topology.ranks_of_node(topology.node))]
    if topology.uniform and topology.num_nodes > 1:
        scopes.append(("rail", topology.ranks_with_local_rank(topology.local_rank)))
    runs: list[GroupRun] = []
    for scope, members in scopes:  # same order on every rank
        if len(members) > 1:
            runs += _communicators(scope, members, members.index(rank), timeout)
    # Every rank times the same (scope, transport) list, in the same order.
    samples: list[Sample] = []
    scoped: dict[str, set[str]] = {}
    for run in runs:
        k = run.comm.size
        for nbytes in SIZES:
            elements = max(k, nbytes // 4 // k * k)
            x = torch.zeros(elements, dtype=torch.float32)
            t = _slowest_mean_us(lambda c=run.comm, x=x: c.all_to_all(x, "flat"), nbytes, None)
            samples.append(Sample(run.link, k - 1, elements * 4 * (k - 1) / k, t))
            scoped.setdefault(run.link, set()).add(run.scope)
        run.comm = None  # type: ignore[assignment]  # release before the groups go
    real_hosts = not topology.emulated and topology.num_nodes > 1
    if real_hosts:
        tagged = [(run.link, run.scope) for run in runs for _ in SIZES]
        samples = [s for s, (link, scope) in zip(samples, tagged, strict=True)
                   if not (scope == "node" and "rail" in scoped[link])]
    samples += _copy_samples(size)
    fits = fit_all(samples)
    by_scope = {(run.scope, run.transport): run.link for run in runs}
    intra = by_scope.get(("node", "default")) or by_scope.get(("rail", "default"))
    inter = by_scope.get(("rail", "default")) or intra
    if intra is None:
        raise ValueError("calibrate needs at least two ranks")
    links = {link: fit.cost for link, fit in fits.items() if link != "copy"}
    profile = Profile(
        links=links, copy=fits["copy"].cost, intra_node=intra, inter_node=inter,
        name="calibrated", description=f"alltoall-bench --calibrate on {size} ranks, {topology.describe()}",
        sources=(f"alltoall {alltoall.__version__} --calibrate: flat exchanges on the node and rail groups, "
                 f"{len(SIZES)} sizes from {SIZES[0]} to {SIZES[-1]} B per rank",),
        fit={link: fit.to_json() for link, fit in fits.items()},
    )
    return Calibration(profile, fits, samples, time.perf_counter() - start)


def report_lines(cal: Calibration) -> list[str]:
    """The fit, per class, with its error: what --calibrate prints."""
    lines = [f"# calibrated in {cal.seconds:.1f} s: {len(cal.samples)} samples",
             f"# {'class':<8} {'alpha (us)':>11} {'bandwidth (GB/s)':>17} {'samples':>8} "
             f"{'max err':>8} {'mean err':>9}"]
    for link, fit in cal.fits.items():
        lines.append(f"# {link:<8} {fit.cost.alpha_us:>11.2f} {fit.cost.gbps:>17.3f} {fit.samples:>8d} "
                     f"{fit.max_error:>7.1%} {fit.mean_error:>9.1%}")
    lines.append(f"# intra-node class {cal.profile.intra_node}, inter-node class {cal.profile.inter_node}, "
                 f"hash {cal.profile.hash}")
    lines.append(f"# {'class':<8} {'size (B)':>10} {'messages':>9} {'measured (us)':>14} {'fitted (us)':>12}")
    for s in cal.samples:
        cost = cal.fits[s.link].cost
        lines.append(f"# {s.link:<8} {s.bytes:>10.0f} {s.messages:>9d} {s.time_us:>14.1f} "
                     f"{cost.time_us(s.messages, s.bytes):>12.1f}")
    return lines


def run(topology: Topology, timeout) -> int:
    """The --calibrate mode of a rank: sweep, fit, rank 0 writes and reports."""
    target = profiles.output_path()
    os.environ[profiles.PROFILE_ENV] = "off"  # the profile being replaced must not steer the sweep
    cal = calibrate(topology, timeout)
    if dist.get_rank() == 0:
        cal.profile.save(target)
        print("\n".join(report_lines(cal)))
        print(f"# wrote profile: {target} (alltoall reads it from {profiles.PROFILE_ENV} or {profiles.default_path()})",
              flush=True)
    return 0


__all__ = ["SIZES", "Calibration", "LinkCost", "calibrate", "report_lines", "run"]
