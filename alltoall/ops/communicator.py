"""Communicator: all-to-all over one process group, with every algorithm's
subgroups created once, up front."""

from __future__ import annotations

import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from alltoall._library import _C
from alltoall.ops import autograd, consistency, selection, traceable, validation, wire
from alltoall.ops.work import Work
from alltoall.plan import Profile, make_plan
from alltoall.topology import Topology, detect_hosts
from alltoall.transport import (
    GroupRef,
    abort_transports,
    handles_host_tensors,
    link_class,
    make_transport,
    new_subgroups,
    resolve_timeout,
    resolve_transport,
)

# The newest live Communicator of each group, so the module-level functions
# can run algorithms that need subgroups without creating any inside a call.
# Weak, so a dropped Communicator is forgotten. Keyed by the group object's
# id (a live Communicator holds its group, so the id cannot be reused while
# the entry matters): cheaper per call than reading the group's name.
_by_group: dict[int, weakref.ref[Communicator]] = {}


def registered(group: dist.ProcessGroup) -> Communicator | None:
    ref = _by_group.get(id(group))
    comm = ref() if ref is not None else None
    return comm if comm is not None and comm.group is group else None


class Communicator:
    """All-to-all collectives over ``group`` (default: the world).

    The constructor is collective: every rank of the group calls it, in the
    same order relative to other group creation. It detects the topology and
    creates the intra-node and inter-node subgroups, so no call ever creates
    a group.

    Args:
        group: the process group; None means the default group.
        local_size: emulate nodes of this many consecutive ranks on one host
            (also read from ``ALLTOALL_LOCAL_SIZE``). Default: detect nodes by
            host name.
        topology: an explicit topology, identical on every rank; excludes
            ``local_size``.
        timeout: the bound on every blocking wait (timedelta or seconds);
            default ``ALLTOALL_TIMEOUT`` seconds, else 10 minutes.
        rank_order: relabel the group's ranks, identically on every rank:
            block i of an input goes to group rank ``rank_order[i]`` and block
            i of an output comes from it (splits are in this order too). The
            relabelling is folded into the plans' reorders. Default: group
            order. A relabelled Communicator is not used by the module-level
            functions, which must match ``all_to_all_single``.
        transport: what carries each phase: "auto" (shared memory for a
            phase whose group runs on one host, c10d otherwise), "shm" (every
            phase in shared memory; ValueError if a phase's group spans
            hosts) or "c10d" (the group's torch.distributed backend). Default
            ``ALLTOALL_TRANSPORT``, else "auto". CUDA tensors always use c10d.

    Cost profile: the constructor loads ``ALLTOALL_PROFILE`` (a file or a
    shipped profile's name; "off" for none) or the file ``alltoall-bench
    --calibrate`` writes, and checks that every rank loaded the same one
    (ValueError on every rank otherwise). With one, ``algorithm="auto"``
    takes the algorithm with the lowest predicted time for each call's size
    (``predict``); without, the fixed rule of ``alltoall.ops.selection``.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        local_size: int | None = None,
        topology: Topology | None = None,
        timeout: timedelta | float | None = None,
        rank_order: list[int] | None = None,
        transport: str | None = None,
    ) -> None:
        self.transport = resolve_transport(transport)
        self.group_ref = GroupRef.of(group)
        self.group = self.group_ref.group
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.timeout = resolve_timeout(timeout)
        if topology is not None and local_size is not None:
            raise ValueError(f"pass topology or local_size, not both (local_size={local_size})")
        if topology is None:
            topology = Topology.detect(self.group, local_size=local_size)
        if topology.size != self.size or topology.rank != self.rank:
            raise ValueError(
                f"topology describes rank {topology.rank} of {topology.size} but this is rank "
                f"{self.rank} of a group of {self.size}"
            )
        self.topology = topology
        if rank_order is not None and sorted(rank_order) != list(range(self.size)):
            raise ValueError(f"rank_order={list(rank_order)} is not a permutation of the group's {self.size} ranks")
        self.rank_order = None if rank_order is None or list(rank_order) == list(range(self.size)) else list(rank_order)
        self._groups = {"world": self.group_ref, **self._create_node_groups()}
        self.progress = _C.ProgressThread(f"communicator on group '{self.group_ref.name}'")
        # The real host of every rank (never emulated): it decides where
        # shared memory can carry a phase, and a phase's link class (gloo
        # or NCCL inside one host or across hosts), on every transport.
        self.hosts = detect_hosts(self.group)
        self._transports = self._create_transports()
        self._exchangers = {"flat": self._exchanger_for("flat")}
        if topology.uniform:
            self._exchangers["hierarchical"] = self._exchanger_for("hierarchical")
        self._keys = {name: traceable.register(ex) for name, ex in self._exchangers.items()}
        self.profile, self._selector = self._create_selector()
        self._call = self._create_call_path()
        if self.rank_order is None:
            _by_group[id(self.group)] = weakref.ref(self)

    # Set-up -------------------------------------------------------------------

    def _global(self, group_ranks: tuple[int, ...]) -> list[int]:
        return [self.group_ref.global_ranks[r] for r in group_ranks]

    def _create_node_groups(self) -> dict[str, GroupRef]:
        """Intra-node then inter-node, on every rank in that order. A subgroup
        equal to the whole group reuses it; one of a single rank is not
        needed, since plans drop phases that move nothing. Each kind is a
        partition of the group, passed whole to ``new_subgroups`` so it can
        split the group's communicator on a bound device."""
        topo = self.topology
        if not topo.uniform:
            return {}
        groups: dict[str, GroupRef] = {}
        partitions = {
            "intra_node": [topo.ranks_of_node(node) for node in range(topo.num_nodes)],
            "inter_node": [topo.ranks_with_local_rank(local) for local in range(topo.ranks_per_node or 0)],
        }
        for role, parts in partitions.items():
            if len(parts) == 1:
                groups[role] = self.group_ref
                continue
            ref = new_subgroups(self.group_ref, [self._global(p) for p in parts if len(p) > 1], self.timeout,
                                f"alltoall_{role}")
            if ref is not None:
                groups[role] = ref
        return groups

    def _hosts_of(self, ref: GroupRef) -> list[str]:
        position = {g: r for r, g in enumerate(self.group_ref.global_ranks)}
        return [self.hosts[position[g]] for g in ref.global_ranks]

    def _create_transports(self) -> dict[str, _C.Transport]:
        """One transport per group, in the order the groups were created, on
        every rank: creating a shared-memory segment is collective over its
        group.

        Where a group may use shared memory, every rank learns after each
        group whether any rank's set-up failed, and then all raise: the
        members of a group whose segment could not be made (a /dev/shm with
        room for some groups' segments but not all) raise at once, and the
        others would otherwise wait for them in the next group's set-up until
        the timeout."""
        agree = self.transport != "c10d" and handles_host_tensors(self.group)
        transports = {}
        for role, ref in self._groups.items():
            failure = None
            try:
                transports[role] = make_transport(ref, self._hosts_of(ref), self.transport, self.timeout)
            except dist.DistBackendError as error:
                if not agree:
                    raise
                failure = error
            if agree:
                failures: list[str | None] = [None] * self.size
                dist.all_gather_object(failures, None if failure is None else str(failure), group=self.group)
                if failure is not None:
                    raise failure
                failed = [r for r, f in enumerate(failures) if f is not None]
                if failed:
                    ranks = [self.group_ref.global_ranks[r] for r in failed]
                    raise dist.DistBackendError(
                        f"alltoall: the Communicator on group '{self.group_ref.name}' could not be set up: the "
                        f"{role} group's set-up failed on group rank(s) {failed} (global rank(s) {ranks}): "
                        f"{failures[failed[0]]}")
        return transports

    def _create_selector(self) -> tuple[Profile | None, selection.ModelSelector | None]:
        """Collective: every rank's profile hash must agree (ValueError on
        every rank otherwise); with a profile, "auto" chooses by the model
        among the algorithms that differ here."""
        links = {name: self.links(name) for name in self._exchangers}
        profile, links_by_rank = selection.agree_on_profile(self.group, self.group_ref.name,
                                                            self.group_ref.global_ranks, links)
        if profile is None:
            return None, None
        candidates = tuple(name for name, ex in self._exchangers.items()
                           if name == "flat" or len(ex.plan.phases) > 1)
        selector = selection.ModelSelector(profile, self.topology, links_by_rank, candidates, self.rank_order)
        return profile, selector

    def _create_call_path(self) -> _C.CallPath:
        """The per-call path in C++: argument checks, the algorithm choice
        (the fixed rule's bound is read here, once; the model's picks are
        remembered per size), the exchange and its autograd node."""
        return _C.CallPath(self.size, list(self.topology.node_sizes), selection.hierarchical_up_to(self.topology),
                           self._exchangers["flat"], self._exchangers.get("hierarchical"), self._selector)

    def _exchanger_for(self, algorithm: str) -> _C.Exchanger:
        raw = make_plan(self.topology.node_of_rank, self.rank, algorithm, rank_order=self.rank_order)
        return _C.Exchanger(raw, [self._transports[phase.role] for phase in raw.phases], self.progress)

    def transports(self, algorithm: str) -> tuple[str, ...]:
        """What carries each phase of ``algorithm`` on this rank: "shm" or
        "c10d:<backend>" (for "auto", at the size ``resolve`` picks)."""
        phases = self.exchanger(algorithm).plan.phases
        return tuple(self._transports[phase.role].kind for phase in phases)

    def links(self, algorithm: str) -> tuple[str, ...]:
        """The link class of each phase of ``algorithm``: "shm", "tcp",
        "nvlink" or "net" (see alltoall.transport.link_class)."""
        phases = self.exchanger(algorithm).plan.phases
        return tuple(link_class(self._transports[p.role], self._hosts_of(self._groups[p.role])) for p in phases)

    # Algorithms -------------------------------------------------------------

    def resolve(self, algorithm: str, bytes_per_peer: int | None = None) -> str:
        """The concrete algorithm for a request; raises ValueError when it
        cannot run on this topology."""
        validation.check_algorithm(algorithm, self.topology)
        if algorithm == "auto":
            if self._selector is not None and bytes_per_peer is not None:
                return self._selector.choose(bytes_per_peer)
            return selection.choose(self.topology, bytes_per_peer)
        return algorithm

    def predict(self, bytes_per_rank: float) -> dict[str, float]:
        """Predicted microseconds of an equal-split exchange of
        ``bytes_per_rank`` bytes, for every algorithm "auto" picks among
        here: the slowest rank's, under ``self.profile`` (alltoall.plan.model).
        Raises ValueError when no profile was loaded."""
        if self._selector is None:
            raise ValueError(f"no cost profile on group '{self.group_ref.name}': set ALLTOALL_PROFILE or run "
                             "alltoall-bench --calibrate")
        return self._selector.predict_us(bytes_per_rank)

    def exchanger(self, algorithm: str) -> _C.Exchanger:
        """The executor of a concrete algorithm ('flat' or 'hierarchical')."""
        return self._exchangers[self.resolve(algorithm)]

    @classmethod
    def flat_only(cls, group: dist.ProcessGroup | None = None) -> Communicator:
        """A Communicator for the flat algorithm alone: no topology detection,
        no subgroups, so building it communicates nothing. The module-level
        functions use it when no full Communicator exists for the group."""
        comm = cls.__new__(cls)
        comm.group_ref = GroupRef.of(group)
        comm.group = comm.group_ref.group
        comm.size = dist.get_world_size(comm.group)
        comm.rank = dist.get_rank(comm.group)
        comm.timeout = resolve_timeout(None)
        comm.rank_order = None
        comm.transport = "c10d"
        comm.topology = Topology.emulate(comm.size, comm.size, comm.rank)
        comm._groups = {"world": comm.group_ref}
        comm.progress = _C.ProgressThread(f"communicator on group '{comm.group_ref.name}'")
        comm.hosts = ("?",) * comm.size
        comm._transports = comm._create_transports()
        comm._exchangers = {"flat": comm._exchanger_for("flat")}
        comm._keys = {"flat": traceable.register(comm._exchangers["flat"])}
        comm.profile, comm._selector = None, None
        comm._call = comm._create_call_path()
        return comm

    # Collectives ------------------------------------------------------------

    def synchronize(self) -> None:
        """Waits until every exchange issued so far (``async_op=True``
        included) has run. Collectives issued directly on the same process
        group with torch.distributed from another path must come after
        this: over c10d they would otherwise race the queued exchanges for
        the group's order."""
        self.progress.synchronize()

    def _resolve_for(self, algorithm: str, bytes_per_peer: int | None) -> str:
        resolved = self.resolve(algorithm, bytes_per_peer)
        if resolved not in self._exchangers:
            raise ValueError(f"algorithm={algorithm!r} is not available on this Communicator (it has "
                             f"{', '.join(sorted(self._exchangers))}); construct alltoall.Communicator(group)")
        return resolved

    def _tell_peers(self, name: str, error: ValueError) -> None:
        """Only this rank raises on its bad input: mark its shared-memory
        groups failed so the peers raise at once, naming it and the error,
        instead of waiting out the timeout."""
        abort_transports(self._transports.values(), f"{name}: ValueError: {error}")

    def _agree(self, name: str, x: torch.Tensor, validate, check: bool | None) -> consistency.Validated:
        if not consistency.enabled(check):
            try:
                return validate()
            except ValueError as error:
                self._tell_peers(name, error)
                raise
        # The check's collectives go through torch.distributed on this
        # group: let the queued exchanges finish first, so they keep order.
        self.progress.synchronize()
        return consistency.agree(name, self.group, x, validate, self.rank_order)

    def all_to_all(self, x: torch.Tensor, algorithm: str = "auto", *, check: bool | None = None,
                   async_op: bool = False, wire_dtype: torch.dtype | None = None) -> torch.Tensor | Work:
        """Equal-split all-to-all, identical to ``dist.all_to_all_single``.

        Args:
            x: ``[p * n, *]``; rows ``[d*n, (d+1)*n)`` go to group rank d.
            algorithm: "auto", "flat" or "hierarchical".
            check: verify first, collectively, that all ranks pass the same
                dtype, trailing shape and dim 0 (default: ``ALLTOALL_CHECK``).
            async_op: queue the exchange on this Communicator's progress
                thread and return a ``Work`` at once; its ``wait()`` returns
                the tensor below (see alltoall.ops.work).
            wire_dtype: carry the rows in a low-precision format and return
                x's dtype: None (x's own), torch.bfloat16 or
                torch.float8_e4m3fn (per token and 128-channel block scales,
                packed with the rows; see alltoall.ops.wire and docs/api.md
                for the rounding error). The backward carries the gradient
                in bfloat16 for a bfloat16 wire, in x's dtype for FP8.
                Not with async_op.

        Returns:
            ``[p * n, *]``, rows ``[s*n, (s+1)*n)`` from group rank s. Autograd
            flows through; the backward is the same exchange. Under
            torch.compile the call is the traceable op
            ``torch.ops.alltoall.exchange_equal`` (check is then not run;
            async_op is not supported there).
        """
        if wire_dtype is not None:
            self._check_wire(x, wire_dtype, async_op, "all_to_all")
            move = lambda t: self.all_to_all(t, algorithm, check=check)  # noqa: E731
            return wire.low_precision(move, move, x, wire_dtype, _grad_wire_dtype(wire_dtype))
        if not async_op and not torch.compiler.is_compiling():
            try:
                out = self._call.all_to_all(x, algorithm, check)
            except ValueError as error:
                self._tell_peers("all_to_all", error)
                raise
            if out is not None:  # None: check=True's agreement comes first
                return out
        return self._all_to_all_slow(x, algorithm, check, async_op)

    def _all_to_all_slow(self, x: torch.Tensor, algorithm: str, check: bool | None,
                         async_op: bool) -> torch.Tensor | Work:
        """all_to_all under torch.compile, with check=True or async_op=True."""
        if torch.compiler.is_compiling():
            if async_op:
                raise ValueError("all_to_all(async_op=True) cannot be compiled; call it outside torch.compile")
            validation.check_tensor(x, "all_to_all")
            validation.check_divisible(x, self.size, "all_to_all")
            bytes_per_peer = x.numel() * x.element_size() // self.size
            return traceable.exchange_equal(x, self._keys[self._resolve_for(algorithm, bytes_per_peer)])

        def validate() -> consistency.Validated:
            return consistency.Validated(self._call.validate(x, algorithm))

        plan = self._agree("all_to_all", x, validate, check)
        if async_op:
            return autograd.all_to_all_async(x, self._exchangers[plan.algorithm])
        return self._call.all_to_all(x, plan.algorithm, False)

    def all_to_all_v(
        self,
        x: torch.Tensor,
        input_splits: validation.Splits,
        output_splits: validation.Splits | None = None,
        algorithm: str = "auto",
        *,
        check: bool | None = None,
        async_op: bool = False,
        wire_dtype: torch.dtype | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[int]] | Work:
        """Uneven all-to-all, identical to ``dist.all_to_all_single(out, x,
        output_splits, input_splits)``.

        Args:
            x: ``[sum(input_splits), *]``; ``input_splits[d]`` rows go to rank d.
            input_splits: rows per destination: ints, or a 1-d int tensor on
                any device.
            output_splits: rows per source, when known. When None the counts
                are exchanged with the data, phase by phase.
            algorithm: "auto", "flat" or "hierarchical". "auto" decides on the
                topology alone, so every rank agrees.
            check: verify first, collectively, that every rank's
                input_splits[d] equals what rank d expects, and that dtypes and
                trailing shapes agree (default: ``ALLTOALL_CHECK``).
            async_op: return a ``Work`` whose ``wait()`` gives what is below.
            wire_dtype: as for ``all_to_all``.

        Returns:
            ``[sum(output_splits), *]`` when output_splits is given; otherwise
            ``(output, output_splits)``.
        """
        if wire_dtype is not None:
            self._check_wire(x, wire_dtype, async_op, "all_to_all_v")
            received: list[list[int]] = []

            def forward(t: torch.Tensor) -> torch.Tensor:
                out = self.all_to_all_v(t, input_splits, output_splits, algorithm, check=check)
                if output_splits is not None:
                    return out
                received.append(out[1])
                return out[0]

            def backward(g: torch.Tensor) -> torch.Tensor:
                splits = output_splits if output_splits is not None else received[0]
                return self.all_to_all_v(g, splits, input_splits, algorithm, check=check)

            out = wire.low_precision(forward, backward, x, wire_dtype, _grad_wire_dtype(wire_dtype))
            return out if output_splits is not None else (out, received[0])

        if not async_op:
            try:
                result = self._call.all_to_all_v(x, input_splits, output_splits, algorithm, check)
            except ValueError as error:
                self._tell_peers("all_to_all_v", error)
                raise
            if result is not None:  # None: check=True's agreement comes first
                return result

        def validate() -> consistency.Validated:
            return consistency.Validated(*self._call.validate_v(x, input_splits, output_splits, algorithm))

        plan = self._agree("all_to_all_v", x, validate, check)
        if async_op:
            return autograd.all_to_all_v_async(x, self._exchangers[plan.algorithm], plan.input_splits,
                                               plan.output_splits, with_splits=output_splits is None)
        return self._call.all_to_all_v(x, plan.input_splits, plan.output_splits, plan.algorithm, False)

    def abort(self, reason: str = "Communicator.abort() was called") -> None:
        """Marks this Communicator's shared-memory groups failed on this rank:
        their other members raise within about 0.2 s, naming this rank and
        ``reason``, and every later call on either side raises at once.
        Phases over c10d are not affected (gloo offers no abort; NCCL's is
        the process group's own ``abort``). Safe while an exchange runs."""
        abort_transports(self._transports.values(), reason)

    def _check_wire(self, x: torch.Tensor, wire_dtype: object, async_op: bool, op: str) -> None:
        try:
            wire.check_wire_dtype(wire_dtype, op)
            validation.check_tensor(x, op)
            wire.check_input(x, wire_dtype, op)  # type: ignore[arg-type]
            if async_op:
                raise ValueError(f"{op}: wire_dtype={wire_dtype} cannot be combined with async_op=True")
        except ValueError as error:
            self._tell_peers(op, error)
            raise

    # Sub-exchangers (the expert dispatcher's hops) ---------------------------

    def sub_exchanger(self, role: str) -> tuple[_C.Exchanger, GroupRef] | None:
        """A flat all-to-all over one of the subgroups this Communicator
        already has: ``"intra_node"`` (this rank's node) or ``"inter_node"``
        (this rank's rail: the ranks with its local rank, one per node).

        It reuses the subgroup's transport and this Communicator's progress
        thread, so its calls keep issue order with every other exchange
        here; building it communicates nothing. Peers are addressed by
        their position in the subgroup (``GroupRef.global_ranks`` order).
        Returns None when the subgroup would hold this rank alone (one rank
        per node, or one node), and raises ValueError on a topology with
        nodes of unequal sizes, which has no such subgroups.
        """
        if role not in ("intra_node", "inter_node"):
            raise ValueError(f"role={role!r}: expected 'intra_node' or 'inter_node'")
        if not self.topology.uniform:
            raise ValueError(f"no {role} subgroup on a topology with nodes of unequal sizes "
                             f"({self.topology.describe()})")
        cache = self.__dict__.setdefault("_sub_exchangers", {})
        if role not in cache:
            topo = self.topology
            members = topo.ranks_of_node(topo.node) if role == "intra_node" else topo.ranks_with_local_rank(
                topo.local_rank)
            # A subgroup equal to the whole group is the group itself (a
            # flat-only Communicator has no node subgroups at all).
            key = role if role in self._groups else "world"
            ref = self._groups[key]
            if len(members) == 1:
                cache[role] = None
            else:
                assert len(ref.global_ranks) == len(members), (role, ref.global_ranks, members)
                position = ref.global_ranks.index(self.group_ref.global_ranks[self.rank])
                raw = make_plan([0] * len(ref.global_ranks), position, "flat")
                cache[role] = (_C.Exchanger(raw, [self._transports[key]], self.progress), ref)
        return cache[role]


def _grad_wire_dtype(wire_dtype: torch.dtype) -> torch.dtype | None:
    """The gradient's wire format: bfloat16 stays bfloat16; FP8 gradients
    travel in the input's dtype (they would need their own scaling)."""
    return torch.bfloat16 if wire_dtype == torch.bfloat16 else None
