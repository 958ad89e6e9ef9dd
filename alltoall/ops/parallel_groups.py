"""ParallelGroups: the tensor-, expert- and data-parallel process groups,
created once, and the TP-coordinated all-to-all that runs on them."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from alltoall._library import _C
from alltoall.ops import validation
from alltoall.ops.communicator import Communicator
from alltoall.ops.coordinated import Chunking, GatherChunks, TakeChunks, TensorGroup, gather_layout, take_chunks
from alltoall.ops.work import Work, attach, needs_grad
from alltoall.topology import Topology, detect_hosts
from alltoall.topology.layout import KINDS, RankLayout
from alltoall.transport import GroupRef, make_transport, new_subgroups, resolve_timeout


class ParallelGroups:
    """Process groups for ``tp x ep x dp`` ranks, and the coordinated exchange.

    The constructor is collective over the world: every rank calls it once,
    in the same order relative to other group creation. It creates this
    rank's TP, EP, EDP (expert data parallel), DP, node and rail groups, in
    that order, and a Communicator on the EP group (with its own intra-node
    and inter-node subgroups, ready for the hierarchical algorithm). See
    ``RankLayout`` for the layout and docs/parallelism.md for tables.

    ``tp_rank``, ``ep_rank`` and ``dp_rank`` are the layout's coordinates.
    Blocks of the coordinated exchange go to EP ranks by ``ep_rank``, and
    ``ep_comm`` indexes its peers the same way. These equal the ranks within
    the process groups except on interleaved placements, where the layout
    keeps TP groups inside nodes and the ranks are relabelled to match.

    Args:
        tp: tensor-parallel degree L.
        ep: expert-parallel degree; default world/tp.
        topology: the world's topology; default detected (or emulated with
            ``local_size`` / ``ALLTOALL_LOCAL_SIZE``).
        order: dimensions from fastest- to slowest-varying.
        num_experts: when given, ep must divide it.
        tp_inside_node: raise instead of letting a TP group span nodes.
        timeout: bound on every blocking wait (see Communicator).
        transport: "auto", "shm" or "c10d", for the EP exchange's phases and
            the TP all-gather alike (see Communicator).
    """

    def __init__(
        self,
        tp: int = 1,
        ep: int | None = None,
        *,
        topology: Topology | None = None,
        order: str = "tp-ep-dp",
        local_size: int | None = None,
        num_experts: int | None = None,
        tp_inside_node: bool = True,
        timeout: timedelta | float | None = None,
        transport: str | None = None,
    ) -> None:
        if topology is not None and local_size is not None:
            raise ValueError(f"pass topology or local_size, not both (local_size={local_size})")
        size, rank = dist.get_world_size(), dist.get_rank()
        if topology is None:
            # Validate what needs no communication first, so a bad tp raises
            # on every rank before the detection's all-gather.
            if tp < 1 or size % tp:
                raise ValueError(f"tp={tp} must be >= 1 and divide the world size {size}")
            topology = Topology.detect(None, local_size=local_size)
        if topology.size != size or topology.rank != rank:
            raise ValueError(f"topology describes rank {topology.rank} of {topology.size}, but this is rank {rank} "
                             f"of a world of {size}")
        self.layout = RankLayout(topology, tp, ep, order, tp_inside_node, num_experts)
        self.topology = topology
        self.rank = rank
        self.timeout = resolve_timeout(timeout)
        self.tp, self.ep, self.dp = self.layout.tp, self.layout.ep, self.layout.dp
        coords = self.layout.coordinates(rank)
        self.tp_rank, self.ep_rank, self.dp_rank = coords["tp"], coords["ep"], coords["dp"]

        self._refs: dict[str, GroupRef] = {}
        world = GroupRef.of(None)
        for kind in KINDS:  # the same order on every rank
            if kind == "rail" and not topology.uniform:
                continue
            ref = new_subgroups(world, self.layout.groups(kind), self.timeout, f"alltoall_{kind}")
            assert ref is not None, f"rank {rank} is in no {kind} group"  # the layout partitions the world
            self._refs[kind] = ref

        ep_members = self.layout.group_of("ep", rank)
        ep_topology = Topology.from_node_ids([topology.node_of_rank[r] for r in ep_members],
                                             ep_members.index(rank), emulated=topology.emulated)
        # Blocks are addressed by EP coordinate, which every TP replica agrees
        # on; group order (ascending global rank) can differ from it when
        # nodes are interleaved, so the EP Communicator is relabelled.
        ep_order = [0] * self.ep
        for position, r in enumerate(ep_members):
            ep_order[self.layout.coordinates(r)["ep"]] = position
        self.ep_comm = Communicator(self.ep_group, topology=ep_topology, timeout=self.timeout, rank_order=ep_order,
                                    transport=transport)
        tp_ref = self._refs["tp"]
        tp_hosts = detect_hosts(tp_ref.group) if self.ep_comm.transport != "c10d" else ("?",) * self.tp
        self.tp_transport = make_transport(tp_ref, tp_hosts, self.ep_comm.transport, self.timeout)
        # The TP all-gather shares the EP exchange's progress thread, so a
        # coordinated exchange (EP all-to-all, then TP all-gather) keeps its
        # order on every rank, in flight or not.
        gather = _C.GroupGather(self.tp_transport, "tensor parallel", self.ep_comm.progress)
        t_of_member = tuple(self.layout.coordinates(r)["tp"] for r in tp_ref.global_ranks)
        self._tp = TensorGroup(gather, self.tp_rank, t_of_member)

    # Groups ---------------------------------------------------------------

    def group(self, kind: str) -> dist.ProcessGroup:
        """This rank's group of one kind: tp, ep, edp, dp, node or rail."""
        if kind not in self._refs:
            raise ValueError(f"no {kind!r} group here; kinds are {', '.join(self._refs)}")
        return self._refs[kind].group

    def ranks(self, kind: str) -> tuple[int, ...]:
        """Global ranks of this rank's group of one kind."""
        self.group(kind)
        return self._refs[kind].global_ranks

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.group("tp")

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.group("ep")

    @property
    def edp_group(self) -> dist.ProcessGroup:
        return self.group("edp")

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.group("dp")

    # The coordinated exchange ---------------------------------------------

    def _equal_chunking(self, rows: int, what: str) -> Chunking:
        if rows % (self.ep * self.tp):
            raise ValueError(
                f"{what}: dim 0 of the replicated input is {rows}, not divisible by ep*tp = {self.ep}*{self.tp}; "
                f"each of the {self.ep} destination blocks must split into {self.tp} equal chunks"
            )
        return Chunking((rows // self.ep,) * self.ep, self.tp)

    def synchronize(self) -> None:
        """Waits until every exchange issued so far has run (see
        ``Communicator.synchronize``)."""
        self.ep_comm.synchronize()

    def _back_async(self, y: torch.Tensor, chunking: Chunking, inner: Work,
                    inverse: Callable[[torch.Tensor], torch.Tensor]) -> Work:
        """The TP all-gather queued behind the EP exchange ``inner`` (of
        ``y``, detached), and the reassembly at ``wait()``; differentiable in
        ``y`` through ``inverse`` (slice, then the inverse EP exchange)."""
        width, starts, counts = gather_layout(chunking, self._tp)
        gathered = self._tp.gather.all_gather_after(inner.native, width)
        grad = needs_grad(y)

        def finish(out: torch.Tensor, _: list[int]) -> torch.Tensor:
            full = torch.ops.alltoall.gather_blocks(out, starts, counts)
            return attach(y, full, inverse, grad)

        return Work(gathered, finish)

    def coordinated_all_to_all(self, x: torch.Tensor, algorithm: str = "auto", *,
                               async_op: bool = False) -> torch.Tensor | Work:
        """Dispatch: the coordinated all-to-all of a TP-replicated buffer.

        Args:
            x: ``[R, *]``, identical on every rank of the TP group; block d
                (rows ``[d*R/ep, (d+1)*R/ep)``) goes to EP rank d. R must divide
                by ep*tp.
            algorithm: the EP exchange's algorithm: "auto", "flat" or
                "hierarchical".
            async_op: return a ``Work`` (alltoall.ops.work) at once; the
                exchange runs on the EP Communicator's progress thread.

        Returns:
            ``[R/tp, *]``: from every EP source s, this TP rank's chunk of the
            block s sent here (see alltoall.ops.coordinated).
        """
        x = validation.check_tensor(x, "coordinated_all_to_all")
        chunking = self._equal_chunking(x.shape[0], "coordinated_all_to_all")
        return self.ep_comm.all_to_all(TakeChunks.apply(x, chunking, self._tp), algorithm, async_op=async_op)

    def coordinated_all_to_all_back(self, y: torch.Tensor, algorithm: str = "auto", *,
                                    async_op: bool = False) -> torch.Tensor | Work:
        """Combine: the inverse of ``coordinated_all_to_all``.

        Args:
            y: ``[R/tp, *]``, laid out as ``coordinated_all_to_all`` returns.

        Returns:
            ``[R, *]``, identical on every rank of the TP group.
        """
        y = validation.check_tensor(y, "coordinated_all_to_all_back")
        chunking = self._equal_chunking(y.shape[0] * self.tp, "coordinated_all_to_all_back")
        if async_op:
            inner = self.ep_comm.all_to_all(y.detach(), algorithm, async_op=True)
            t = self.tp_rank
            return self._back_async(y, chunking, inner, lambda g: self.ep_comm.all_to_all(
                take_chunks(g, chunking, t), algorithm))
        return GatherChunks.apply(self.ep_comm.all_to_all(y, algorithm), chunking, self._tp)

    def coordinated_all_to_all_v(
        self,
        x: torch.Tensor,
        input_splits: validation.Splits,
        output_splits: validation.Splits | None = None,
        algorithm: str = "auto",
        *,
        async_op: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[int]] | Work:
        """Dispatch with uneven blocks.

        Args:
            x: ``[sum(input_splits), *]``, identical across the TP group.
            input_splits: rows for each of the ep EP ranks (identical across
                the TP group).
            output_splits: rows each EP source sends here in full (before
                chunking), when known.

        Returns:
            This TP rank's chunks, ``[sum over s of chunk_t(output_splits[s]), *]``.
            Without output_splits: ``(chunks, chunk_splits)``, the rows received
            from each EP source; pass chunk_splits to the combine.
        """
        x = validation.check_tensor(x, "coordinated_all_to_all_v")
        ins = validation.splits_to_list(input_splits, "input_splits", self.ep, x.shape[0], "coordinated_all_to_all_v")
        chunking = Chunking(tuple(ins), self.tp)
        inner_out = None
        if output_splits is not None:
            outs = validation.splits_to_list(output_splits, "output_splits", self.ep, None, "coordinated_all_to_all_v")
            inner_out = Chunking(tuple(outs), self.tp).sizes(self.tp_rank)
        sliced = TakeChunks.apply(x, chunking, self._tp)
        return self.ep_comm.all_to_all_v(sliced, chunking.sizes(self.tp_rank), inner_out, algorithm,
                                         async_op=async_op)

    def coordinated_all_to_all_back_v(
        self,
        y: torch.Tensor,
        input_splits: validation.Splits,
        output_splits: validation.Splits,
        algorithm: str = "auto",
        *,
        async_op: bool = False,
    ) -> torch.Tensor | Work:
        """Combine with uneven blocks: the inverse of ``coordinated_all_to_all_v``.

        Args:
            y: this TP rank's chunks, ``[sum(input_splits), *]``.
            input_splits: rows of y for each EP rank (the chunk_splits the
                dispatch returned).
            output_splits: the full rows per EP rank of the replicated result
                (the dispatch's input_splits), identical across the TP group.

        Returns:
            ``[sum(output_splits), *]``, identical across the TP group.
        """
        y = validation.check_tensor(y, "coordinated_all_to_all_back_v")
        outs = validation.splits_to_list(output_splits, "output_splits", self.ep, None, "coordinated_all_to_all_back_v")
        chunking = Chunking(tuple(outs), self.tp)
        sizes = chunking.sizes(self.tp_rank)
        if async_op:
            ins = validation.splits_to_list(input_splits, "input_splits", self.ep, y.shape[0],
                                            "coordinated_all_to_all_back_v")
            inner = self.ep_comm.all_to_all_v(y.detach(), ins, sizes, algorithm, async_op=True)
            t = self.tp_rank
            return self._back_async(y, chunking, inner, lambda g: self.ep_comm.all_to_all_v(
                take_chunks(g, chunking, t), sizes, ins, algorithm))
        back = self.ep_comm.all_to_all_v(y, input_splits, sizes, algorithm)
        return GatherChunks.apply(back, chunking, self._tp)

    def describe(self) -> str:
        return (f"tp={self.tp} ep={self.ep} dp={self.dp} order={self.layout.order}: rank {self.rank} is "
                f"(t={self.tp_rank}, e={self.ep_rank}, d={self.dp_rank}) on {self.topology.describe()}")
