"""The algorithms alltoall-bench can time, as a registry: one entry each.

An entry says why it cannot run here (or None), and builds an ``Exchange``:
a function that sends ``x`` (1-d, ``sum(send)`` elements, ``send[d]`` of
them to rank d) and returns the ``sum(recv)`` received elements in source
order. Our algorithms go through the public API only; ``torch`` and ``mpi``
are the baselines users compare with.

To add an algorithm, add one ``Algorithm`` to ``REGISTRY``.

Our algorithms run once per transport of ``--transports``: the default
transport's runs keep the plain name ("flat"), the others get it as a suffix
("flat-c10d"), so one table shows the transports side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

import alltoall
from alltoall.cli import bench_check

Exchange = Callable[[torch.Tensor, list[int], list[int], bool], torch.Tensor]
# (seed, traffic matrix, dtype) -> (this rank's input, what it must receive),
# for algorithms whose input is not the default one (see bench_check).
Workload = Callable[["BenchContext", int, list[list[int]], torch.dtype], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BenchContext:
    """What an algorithm may use; built once, identically on every rank."""

    comm: alltoall.Communicator
    launcher: str
    backend: str
    device: torch.device
    tp: int
    uniform_splits: bool = True
    # One Communicator per transport of --transports, the first is ``comm``.
    comms: dict[str, alltoall.Communicator] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.comm.size

    @property
    def rank(self) -> int:
        return self.comm.rank


@dataclass(frozen=True)
class Algorithm:
    """One registry entry.

    Attributes:
        name: the ``--algorithms`` name.
        description: what is called, for the table header.
        unavailable: the reason it cannot run in this context, or None.
        build: makes the exchange; may be collective (every rank calls it).
        workload: its own input and expected output, when they are not the
            default hashed per-rank buffers.
        per_transport: runs once per transport (ours); the context's
            ``comm`` is then that transport's Communicator.
        isolated: timed in a phase of its own, all rounds back to back after
            its own barrier, never interleaved with the others (see
            ``barrier``).
        barrier: what lines the ranks up before its timed calls, when the
            process group's barrier would not (MPI's own).
        transports: what carries each phase, for the header and the JSON.
    """

    name: str
    description: str
    unavailable: Callable[[BenchContext], str | None]
    build: Callable[[BenchContext], Exchange]
    workload: Workload | None = None
    per_transport: bool = False
    isolated: bool = False
    barrier: Callable[[], None] | None = None
    transports: Callable[[BenchContext], str] | None = None


# Our algorithms, through the public Communicator API --------------------------


def _communicator_exchange(algorithm: str) -> Callable[[BenchContext], Exchange]:
    def build(ctx: BenchContext) -> Exchange:
        comm = ctx.comm

        def exchange(x: torch.Tensor, send: list[int], recv: list[int], uniform: bool) -> torch.Tensor:
            if uniform:
                return comm.all_to_all(x, algorithm)
            return comm.all_to_all_v(x, send, recv, algorithm)

        return exchange

    return build


def _always(_ctx: BenchContext) -> str | None:
    return None


def _hierarchical_unavailable(ctx: BenchContext) -> str | None:
    topo = ctx.comm.topology
    if not topo.uniform:
        return f"needs nodes of equal size; this topology has nodes of {list(topo.node_sizes)} ranks"
    return None


# Parallelism-coordinated all-to-all -------------------------------------------
# Its input is replicated across each TP group (what the TP all-reduce leaves),
# so each TP group hashes one buffer; ``size`` is that buffer's bytes per
# rank. Each rank sends 1/tp of it (its chunk of every destination block) to
# the ranks that share its TP rank: the dispatch of DeepSpeed-MoE section 5.3.


def _coordinated_layout(ctx: BenchContext) -> alltoall.RankLayout:
    return alltoall.RankLayout(ctx.comm.topology, tp=ctx.tp)


def _coordinated_unavailable(ctx: BenchContext) -> str | None:
    if not ctx.uniform_splits:
        return "times uniform splits only (its blocks are cut into tp equal chunks)"
    try:
        _coordinated_layout(ctx)
    except ValueError as error:
        return str(error)
    return None


def _coordinated_build(ctx: BenchContext) -> Exchange:
    groups = alltoall.ParallelGroups(tp=ctx.tp, topology=ctx.comm.topology, timeout=ctx.comm.timeout,
                                     transport=ctx.comm.transport)

    def exchange(x: torch.Tensor, send: list[int], recv: list[int], uniform: bool) -> torch.Tensor:
        return groups.coordinated_all_to_all(x)

    return exchange


def _coordinated_workload(ctx: BenchContext, seed: int, matrix: list[list[int]],
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _coordinated_layout(ctx)
    coords = layout.coordinates(ctx.rank)
    replica = coords["ep"] + layout.ep * coords["dp"]  # one buffer per TP group
    total = sum(matrix[ctx.rank])
    x = bench_check.make_input(seed, bench_check.REPLICA_SOURCE + replica, total, dtype, ctx.device)
    expected = bench_check.expected_coordinated(seed, coords["ep"], coords["tp"], coords["dp"], layout.ep,
                                                layout.tp, total, dtype, ctx.device)
    return x, expected

# Baselines --------------------------------------------------------------------


def _torch_build(ctx: BenchContext) -> Exchange:
    group = ctx.comm.group

    def exchange(x: torch.Tensor, send: list[int], recv: list[int], uniform: bool) -> torch.Tensor:
        # Allocated per call, as a user of all_to_all_single (and our API) does.
        if uniform:
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x, group=group)
        else:
            out = x.new_empty(sum(recv))
            dist.all_to_all_single(out, x, recv, send, group=group)
        return out

    return exchange


def _mpi_world():
    from mpi4py import MPI

    return MPI


def _mpi_unavailable(ctx: BenchContext) -> str | None:
    if ctx.launcher != "mpi":
        return f"runs only under mpiexec with mpi4py (this run was launched by {ctx.launcher})"
    if ctx.device.type != "cpu":
        return f"mpi4py moves host buffers; this run's tensors are on {ctx.device}"
    try:
        mpi = _mpi_world()
    except ImportError as error:
        return f"mpi4py cannot be imported: {error}"
    if mpi.COMM_WORLD.Get_size() != ctx.world_size:
        return f"MPI_COMM_WORLD has {mpi.COMM_WORLD.Get_size()} ranks, torch.distributed {ctx.world_size}"
    return None


def _mpi_barrier() -> None:
    _mpi_world().COMM_WORLD.Barrier()


def _mpi_build(_ctx: BenchContext) -> Exchange:
    mpi = _mpi_world()
    world = mpi.COMM_WORLD

    def displacements(counts: list[int]) -> list[int]:
        out, at = [], 0
        for c in counts:
            out.append(at)
            at += c
        return out

    def exchange(x: torch.Tensor, send: list[int], recv: list[int], uniform: bool) -> torch.Tensor:
        # Bytes, so every dtype (bfloat16 included) moves bit for bit.
        size = x.element_size()
        out = x.new_empty(sum(recv))
        sbuf, rbuf = x.view(torch.uint8).numpy(), out.view(torch.uint8).numpy()
        if uniform:
            world.Alltoall([sbuf, mpi.BYTE], [rbuf, mpi.BYTE])
        else:
            sc, rc = [c * size for c in send], [c * size for c in recv]
            world.Alltoallv([sbuf, (sc, displacements(sc)), mpi.BYTE], [rbuf, (rc, displacements(rc)), mpi.BYTE])
        return out

    return exchange


def _phases_of(algorithm: str) -> Callable[[BenchContext], str]:
    def phases(ctx: BenchContext) -> str:
        return "phases over " + ", ".join(ctx.comm.transports(algorithm))

    return phases


def _auto_phases(ctx: BenchContext) -> str:
    return "; ".join(f"{a} phases over " + ", ".join(ctx.comm.transports(a)) for a in ("flat", "hierarchical")
                     if a == "flat" or ctx.comm.topology.uniform)


def _coordinated_phases(ctx: BenchContext) -> str:
    kinds = ", ".join(ctx.comm.transports("auto"))
    return f"EP phases over {kinds}, TP all-gather like the EP phases"


def _torch_phases(ctx: BenchContext) -> str:
    return f"over the process group's backend ({ctx.backend})"


REGISTRY: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("flat", 'Communicator.all_to_all / all_to_all_v, algorithm="flat"',
                  _always, _communicator_exchange("flat"), per_transport=True, transports=_phases_of("flat")),
        Algorithm("hierarchical", 'Communicator.all_to_all / all_to_all_v, algorithm="hierarchical"',
                  _hierarchical_unavailable, _communicator_exchange("hierarchical"), per_transport=True,
                  transports=_phases_of("hierarchical")),
        Algorithm("auto", 'Communicator.all_to_all / all_to_all_v, algorithm="auto" (its picks follow the tables)',
                  _always, _communicator_exchange("auto"), per_transport=True, transports=_auto_phases),
        Algorithm("coordinated", "ParallelGroups.coordinated_all_to_all: TP-replicated input, 1/tp per rank over EP",
                  _coordinated_unavailable, _coordinated_build, _coordinated_workload, per_transport=True,
                  transports=_coordinated_phases),
        Algorithm("torch", "torch.distributed.all_to_all_single (baseline; through our plans under --backend "
                  "alltoall)", _always, _torch_build, transports=_torch_phases),
        Algorithm("mpi", "mpi4py Comm.Alltoall / Alltoallv on host bytes, timed in a phase of its own",
                  _mpi_unavailable, _mpi_build, isolated=True, barrier=_mpi_barrier),
    )
}


# "auto" runs one of the others; "all" leaves it out (its picks are listed anyway).
NOT_IN_ALL = ("auto",)


def base_name(runner: str) -> str:
    """The registry name of a runner: "flat-c10d" -> "flat"."""
    return runner.split("-", 1)[0]


def parse_algorithms(text: str) -> list[str]:
    """Names from a comma-separated list, or 'all' (every one but "auto"), in
    the order given."""
    if text == "all":
        return [name for name in REGISTRY if name not in NOT_IN_ALL]
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown or not names:
        raise ValueError(f"--algorithms {text!r}: unknown {unknown or 'empty list'}; "
                         f"choose from {', '.join(REGISTRY)} or 'all'")
    return list(dict.fromkeys(names))


def runner_contexts(names: list[str], ctx: BenchContext) -> dict[str, BenchContext]:
    """Every runner's name and its context: ours once per transport in
    ``ctx.comms`` (the first keeps the plain name), the baselines once."""
    out: dict[str, BenchContext] = {}
    transports = list(ctx.comms) or [ctx.comm.transport]
    for name in names:
        if not REGISTRY[name].per_transport:
            out[name] = ctx
            continue
        for i, transport in enumerate(transports):
            comm = ctx.comms.get(transport, ctx.comm)
            out[name if i == 0 else f"{name}-{transport}"] = replace(ctx, comm=comm)
    return out


def describe(runner: str, ctx: BenchContext) -> str:
    """The runner's description with what carries its phases."""
    entry = REGISTRY[base_name(runner)]
    return entry.description + (f"; {entry.transports(ctx)}" if entry.transports else "")


def prepare(names: list[str], ctx: BenchContext) -> tuple[dict[str, Exchange], dict[str, str], dict[str, str]]:
    """The exchanges that run, the reasons for the others, and descriptions.

    Collective: the ranks agree (an all-reduce) on which algorithms every
    one of them can run, so no rank enters a collective the others skip.
    """
    contexts = runner_contexts(names, ctx)
    runner_names = list(contexts)
    reasons = {name: REGISTRY[base_name(name)].unavailable(contexts[name]) for name in runner_names}
    ok = torch.tensor([0 if reasons[n] else 1 for n in runner_names], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=ctx.comm.group)
    skipped: dict[str, str] = {}
    runners: dict[str, Exchange] = {}
    descriptions: dict[str, str] = {}
    for name, everywhere in zip(runner_names, ok.tolist(), strict=True):
        if reasons[name]:
            skipped[name] = reasons[name]  # type: ignore[assignment]
        elif not everywhere:
            skipped[name] = "unavailable on some ranks"
        else:
            runners[name] = REGISTRY[base_name(name)].build(contexts[name])
            descriptions[name] = describe(name, contexts[name])
    return runners, skipped, descriptions
