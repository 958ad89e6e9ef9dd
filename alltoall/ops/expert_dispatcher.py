"""ExpertDispatcher: tokens to the ranks of their experts and back, in the
manner of DeepEP's dispatch and combine, on any torch.distributed backend.

Modes (docs/moe.md, "The expert dispatcher"):

- "dedup": a token crosses the network once per destination node (to its
  rail peer there) and reaches each destination rank once; the owner
  expands it to its experts. The combine is the mirror image, with the
  weighted sums taken per destination rank, per (token, node) at the relay
  and per token at the origin (alltoall.ops.dedup_route).
- "replicate": one row per assignment, expert-major, over the
  Communicator's all-to-all-v (flat or hierarchical).
- "auto": decided on every rank from the topology and k, with no
  communication: ``choose_mode``.

Global expert e lives on EP coordinate ``e // L`` (``L = E / ep``), which is
group rank ``rank_order[e // L]`` on a relabelled Communicator (the EP
Communicator of ParallelGroups).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from alltoall.ops import consistency, wire
from alltoall.ops.communicator import Communicator
from alltoall.ops.coordinated import Chunking, GatherChunks, TakeChunks
from alltoall.ops.dedup_route import ITEM_BYTES, CombineRows, DedupRoute, DispatchRows, Hop, ReceivedWeights
from alltoall.ops.dispatch_index import keep_by_capacity
from alltoall.ops.parallel_groups import ParallelGroups
from alltoall.ops.replicate_route import ReplicateRoute
from alltoall.topology import Topology

MODES = ("auto", "dedup", "replicate")
COUNTERS = ("rows_intra", "rows_inter", "bytes_intra", "bytes_inter")
DIRECTIONS = ("dispatch", "combine", "dispatch_backward", "combine_backward")


# "auto" picks dedup only where it at least halves the rows that cross the
# network. Measured on emulated 2 x 4 at 1 Gbit/s (docs/moe.md, "auto"):
# k = 2 saves 1.33x the rows and dedup's extra hop made the step 0.82x
# replicate's speed; k = 8 saves 4x and made it 1.54x.
DEDUP_MIN_SAVING = 2.0


def inter_node_rows(num_nodes: int, num_experts: int, k: int, max_nodes: int | None = None) -> tuple[float, float]:
    """Expected rows a token sends to other nodes, as ``(replicate, dedup)``,
    for k distinct experts drawn uniformly from ``num_experts`` spread evenly
    over ``num_nodes`` nodes (``max_nodes``: at most that many nodes per
    token, drawn uniformly). Replicate sends one row per remote expert,
    dedup one per remote node hit."""
    k = min(k, num_experts)
    remote = (num_nodes - 1) / num_nodes
    per_node = num_experts // num_nodes
    # P(a given node holds none of the token's k experts): choose all k from the others.
    miss = 1.0
    for i in range(k):
        miss *= max(num_experts - per_node - i, 0) / (num_experts - i)
    dedup = (num_nodes - 1) * (1.0 - miss)
    if max_nodes is not None:
        dedup = min(dedup, max_nodes * remote)
    return k * remote, dedup


def choose_mode(topology: Topology, k: int, num_experts: int, max_nodes: int | None = None) -> str:
    """"auto"'s rule, the same on every rank, with no communication:
    "dedup" when the nodes are of equal size, there is more than one, and
    replicate would send at least ``DEDUP_MIN_SAVING`` times dedup's
    inter-node rows (``inter_node_rows``); "replicate" otherwise. Below that
    saving dedup's second hop and index building cost more CPU than the
    network time it saves; with k = 1 both send the same rows; on one node
    only shared-memory copies would shrink; unequal nodes have no rails."""
    if not topology.uniform or topology.num_nodes == 1 or k <= 1:
        return "replicate"
    replicate, dedup = inter_node_rows(topology.num_nodes, num_experts, k, max_nodes)
    return "dedup" if replicate >= DEDUP_MIN_SAVING * dedup else "replicate"


@dataclass(frozen=True)
class DispatchHandle:
    """What ``combine`` needs from a ``dispatch``.

    Attributes:
        counts: ``[L]`` int64 on x's device: received rows per local expert.
        counts_list: the same, as ints.
        weights: ``[R]``, the weight of each received row (differentiable in
            the dispatch's ``weights``).
        sent: this call's rows and bytes sent by this rank to other ranks:
            "rows_intra", "rows_inter", "bytes_intra", "bytes_inter" (bytes
            include the metadata that travels with the rows).
        combine_sent: the same for the combine of these rows (rows; bytes
            at the dispatch's row width and dtype).
    """

    counts: torch.Tensor
    counts_list: list[int]
    weights: torch.Tensor
    sent: dict[str, int]
    combine_sent: dict[str, int]
    mode: str
    route: DedupRoute | ReplicateRoute = field(repr=False)
    tokens: int = 0
    tp_chunking: Chunking | None = field(default=None, repr=False)


class ExpertDispatcher:
    """Dispatch and combine of tokens for expert parallelism.

    Construction is collective only with ``check`` (one small all-gather);
    it creates no group. Every rank of the EP group must call ``dispatch``
    and ``combine`` in the same order.

    Args:
        comm: the EP group's Communicator, or a ParallelGroups (its EP
            Communicator; with tp = L > 1 each TP rank dispatches 1/L of the
            replicated tokens and the combine ends with an all-gather over TP).
        num_experts: E, divisible by the EP size.
        mode: "auto", "dedup" or "replicate" (module docstring).
        algorithm: replicate's exchange: "auto", "flat" or "hierarchical".
        k: the expected experts per token, for "auto" (default 2).
        max_nodes: the most nodes a token's experts span (node-limited
            routing), for "auto"; None: no limit.
        dispatch_dtype: the tokens' wire format on the way to the experts:
            None (x's dtype), torch.bfloat16 or torch.float8_e4m3fn (per
            token and 128-channel block scales packed with each row;
            alltoall.ops.wire). Encoded once at the origin, decoded to x's
            dtype by the expert's rank: relays copy the encoded bytes.
        combine_dtype: the experts' rows on the way back: None or
            torch.bfloat16. Each hop carries partial sums in it; every sum
            runs in the rows' dtype. Gradients travel in combine_dtype both
            ways (None: the input's dtype), never FP8; the rounding is
            straight-through in the backward.
        check: verify collectively that every rank passes the same E (at
            construction) and the same k and M (at every dispatch); default
            ``ALLTOALL_CHECK``.
    """

    def __init__(self, comm: Communicator | ParallelGroups, num_experts: int, *, mode: str = "auto",
                 algorithm: str = "auto", k: int = 2, max_nodes: int | None = None,
                 dispatch_dtype: torch.dtype | None = None, combine_dtype: torch.dtype | None = None,
                 check: bool | None = None) -> None:
        self.groups = comm if isinstance(comm, ParallelGroups) else None
        self.comm: Communicator = comm.ep_comm if isinstance(comm, ParallelGroups) else comm
        if not isinstance(self.comm, Communicator):
            raise ValueError(f"comm must be a Communicator or ParallelGroups, got {type(comm).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
        p = self.comm.size
        if not isinstance(num_experts, int) or num_experts < 1 or num_experts % p:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {p}")
        wire.check_wire_dtype(dispatch_dtype, "ExpertDispatcher", "dispatch_dtype")
        wire.check_wire_dtype(combine_dtype, "ExpertDispatcher", "combine_dtype", allowed=(torch.bfloat16,))
        self.dispatch_dtype = dispatch_dtype
        self.combine_dtype = combine_dtype
        topo = self.comm.topology
        if mode == "dedup" and not topo.uniform:
            raise ValueError(f"mode='dedup' needs nodes of equal size; the topology is {topo.describe()} "
                             f"(node sizes {list(topo.node_sizes)}); use mode='replicate' or 'auto'")
        self.comm.resolve(algorithm)  # a ValueError now rather than at the first dispatch
        self.algorithm = algorithm
        self.num_experts = num_experts
        self.num_local_experts = num_experts // p
        self.mode = choose_mode(topo, k, num_experts, max_nodes) if mode == "auto" else mode
        self.check = check
        self.order = self.comm.rank_order
        self.coordinate = self.order.index(self.comm.rank) if self.order is not None else self.comm.rank
        self.tp = self.groups.tp if self.groups is not None else 1
        self._stats = {f"{d}_{c}": 0 for d in DIRECTIONS for c in ("calls", *COUNTERS)}
        if consistency.enabled(check):
            self._agree({"num_experts": num_experts, "mode": self.mode}, "ExpertDispatcher")
        if self.mode == "dedup":
            self._setup_dedup()

    # Set-up -----------------------------------------------------------------

    def _owner(self, e: int) -> int:
        c = e // self.num_local_experts
        return self.order[c] if self.order is not None else c

    def _setup_dedup(self) -> None:
        topo, comm = self.comm.topology, self.comm
        rail = comm.sub_exchanger("inter_node")
        node = comm.sub_exchanger("intra_node")
        # Rail peers are addressed by their position in the rail subgroup
        # (ascending global rank), which need not follow node ids.
        rail_members = topo.ranks_with_local_rank(topo.local_rank)
        global_of = comm.group_ref.global_ranks
        if rail is not None:
            position = {g: i for i, g in enumerate(rail[1].global_ranks)}
            rail_pos = {topo.node_of_rank[r]: position[global_of[r]] for r in rail_members}
        else:
            rail_pos = {topo.node: 0}
        node_members = topo.ranks_of_node(topo.node)
        self.hops = (
            Hop(rail[0] if rail else None, rail_pos[topo.node], len(rail_members), "hop 1 (inter-node rail)"),
            Hop(node[0] if node else None, topo.local_rank, len(node_members), "hop 2 (intra-node)"),
        )
        owners = [self._owner(e) for e in range(self.num_experts)]
        rail_key = [-1 if topo.node_of_rank[r] == topo.node else rail_pos[topo.node_of_rank[r]] for r in owners]
        node_key = [topo.local_rank_of(r) for r in owners]
        self._tables = (torch.tensor(rail_key, dtype=torch.int64), torch.tensor(node_key, dtype=torch.int64))
        self._tables_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _agree(self, record: dict, what: str) -> None:
        """Raises the same ValueError on every rank when the ranks' records differ."""
        self.comm.synchronize()
        records: list[dict | None] = [None] * self.comm.size
        dist.all_gather_object(records, record, group=self.comm.group)
        differ = [f"rank {r}: {rec}" for r, rec in enumerate(records) if rec != records[0]]
        if differ:
            raise ValueError(f"{what}: the {self.comm.size} ranks disagree (check=True): rank 0: {records[0]}; "
                             + "; ".join(differ))

    # Validation -------------------------------------------------------------

    def _validate(self, x: torch.Tensor, expert_index: torch.Tensor, weights: torch.Tensor,
                  capacity: int | None) -> None:
        for name, t in (("x", x), ("expert_index", expert_index), ("weights", weights)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"ExpertDispatcher.dispatch: {name} must be a tensor, got {type(t).__name__}")
        if x.dim() != 2:
            raise ValueError(f"ExpertDispatcher.dispatch: x must be [tokens, hidden], got shape {tuple(x.shape)}")
        if expert_index.dim() != 2 or expert_index.dtype != torch.int64:
            raise ValueError(f"ExpertDispatcher.dispatch: expert_index must be a 2-d int64 tensor [tokens, k], got "
                             f"{expert_index.dtype} of shape {tuple(expert_index.shape)}")
        if expert_index.shape[0] != x.shape[0] or expert_index.shape[1] < 1:
            raise ValueError(f"ExpertDispatcher.dispatch: expert_index has shape {tuple(expert_index.shape)} but x "
                             f"has {x.shape[0]} tokens (and k must be >= 1)")
        if weights.shape != expert_index.shape or not weights.dtype.is_floating_point:
            raise ValueError(f"ExpertDispatcher.dispatch: weights ({weights.dtype}, shape {tuple(weights.shape)}) "
                             f"must be floating point of expert_index's shape {tuple(expert_index.shape)}")
        if x.device != expert_index.device or x.device != weights.device:
            raise ValueError(f"ExpertDispatcher.dispatch: x ({x.device}), expert_index ({expert_index.device}) and "
                             f"weights ({weights.device}) must be on one device")
        if capacity is not None and (not isinstance(capacity, int) or capacity < 0):
            raise ValueError(f"ExpertDispatcher.dispatch: capacity={capacity!r} must be an int >= 0 or None")
        if expert_index.numel():
            lo, hi = int(expert_index.min()), int(expert_index.max())
            if lo < -1 or hi >= self.num_experts:
                raise ValueError(f"ExpertDispatcher.dispatch: expert_index holds values in [{lo}, {hi}], outside "
                                 f"[-1, {self.num_experts}) (num_experts={self.num_experts}; -1 = no assignment)")

    # Counters -----------------------------------------------------------------

    def _count(self, direction: str, sent: dict[str, int]) -> None:
        self._stats[f"{direction}_calls"] += 1
        for key in COUNTERS:
            self._stats[f"{direction}_{key}"] += sent[key]

    def stats(self) -> dict[str, int]:
        """Cumulative counters of this dispatcher: for each direction
        ("dispatch", "combine", "dispatch_backward", "combine_backward") the
        calls and the rows and bytes sent to other ranks, intra- and
        inter-node, and their totals ("rows_intra" ...)."""
        out = dict(self._stats)
        for key in COUNTERS:
            out[key] = sum(self._stats[f"{d}_{key}"] for d in DIRECTIONS)
        return out

    # Dispatch and combine ----------------------------------------------------

    def dispatch(self, x: torch.Tensor, expert_index: torch.Tensor, weights: torch.Tensor,
                 capacity: int | None = None, *, check: bool | None = None) -> tuple[torch.Tensor, DispatchHandle]:
        """Sends every token to the ranks of its experts.

        Args:
            x: ``[S, M]`` tokens (with tp > 1: identical on the TP group).
            expert_index: ``[S, k]`` int64 global expert ids, -1 for none.
            weights: ``[S, k]`` floating combine weights.
            capacity: rows per expert from this rank's tokens, by the gate's
                priority rule (alltoall.moe.dispatch.route); None: dropless.
            check: also verify collectively that every rank passes the same
                k, M and dtype (default: the constructor's, else ``ALLTOALL_CHECK``).

        Returns:
            ``recv_x`` ``[R, M]``: the rows of every local expert, grouped by
            local expert (``handle.counts`` each), and the handle.
        """
        self._validate(x, expert_index, weights, capacity)
        if consistency.enabled(check if check is not None else self.check):
            self._agree({"k": expert_index.shape[1], "hidden": tuple(x.shape[1:]), "dtype": str(x.dtype)},
                        "ExpertDispatcher.dispatch")
        tokens = x.shape[0]
        chunking = None
        # The capacity applies to the TP group's whole batch, as the gate's does.
        kept = keep_by_capacity(expert_index, self.num_experts, capacity)
        if self.tp > 1:
            assert self.groups is not None
            chunking = Chunking((tokens,), self.tp)
            lo, hi = chunking.bounds(0, self.groups.tp_rank)
            x = TakeChunks.apply(x, chunking, self.groups._tp)
            weights = TakeChunks.apply(weights, chunking, self.groups._tp)
            kept = kept[lo:hi]
        # Bytes of a row on the wire each way (alltoall.ops.wire.row_bytes).
        row_bytes = (wire.row_bytes(x.shape[1], x.dtype, self.dispatch_dtype),
                     wire.row_bytes(x.shape[1], x.dtype, self.combine_dtype))
        if self.mode == "dedup":
            recv, handle = self._dispatch_dedup(x, kept, weights, row_bytes)
        else:
            recv, handle = self._dispatch_replicate(x, kept, weights, row_bytes)
        self._count("dispatch", handle.sent)
        return recv, DispatchHandle(handle.counts, handle.counts_list, handle.weights, handle.sent,
                                    handle.combine_sent, self.mode, handle.route, tokens, chunking)

    def _dispatch_dedup(self, x, kept, weights, row_bytes):
        device = x.device
        if device not in self._tables_on:
            self._tables_on[device] = tuple(t.to(device) for t in self._tables)
        rail_key, node_key = self._tables_on[device]
        route = DedupRoute.build(self.hops, kept, weights, rail_key, node_key,
                                 self.coordinate * self.num_local_experts, self.num_local_experts)
        if self.dispatch_dtype is None and self.combine_dtype is None:
            recv = DispatchRows.apply(x, route, self._count)
        else:
            def gradient_back(g: torch.Tensor) -> torch.Tensor:
                self._count("dispatch_backward", route.traffic(self._combine_row_bytes(g), False))
                return route.reduce_rows_backward(g, "dispatch backward", wire_dtype=self.combine_dtype)

            recv = wire.low_precision(route.move_rows_forward, gradient_back, x, self.dispatch_dtype)
        w = ReceivedWeights.apply(weights, route)
        sent = route.traffic(row_bytes[0], True, items=True)
        back = route.traffic(row_bytes[1], False)
        return recv, DispatchHandle(route.counts, route.counts_list, w, sent, back, "dedup", route)

    def _dispatch_replicate(self, x, kept, weights, row_bytes):
        algorithm = self.comm.resolve(self.algorithm)
        route = ReplicateRoute.build(self.comm, algorithm, kept, self.num_experts, self.order)
        w_bytes = weights.element_size()
        if algorithm == "hierarchical" and self.comm.size > 1:
            before = self.comm.exchanger(algorithm).traffic()
            recv, w = route.dispatch(x, weights, self.dispatch_dtype, self.combine_dtype)
            sent = self._phase_traffic(algorithm, before, row_bytes[0] + w_bytes)
        else:
            recv, w = route.dispatch(x, weights, self.dispatch_dtype, self.combine_dtype)
            sent = route.traffic(row_bytes[0] + w_bytes, self.comm.topology.node_of_rank, self.order, True)
        back = route.traffic(row_bytes[1], self.comm.topology.node_of_rank, self.order, False)
        if algorithm == "hierarchical":
            back = {key: -1 for key in COUNTERS}  # known only once the combine ran (see stats())
        return recv, DispatchHandle(route.counts, route.counts_list, w, sent, back, "replicate", route)

    def _combine_row_bytes(self, t: torch.Tensor) -> int:
        return wire.row_bytes(t.shape[1], t.dtype, self.combine_dtype)

    def _phase_traffic(self, algorithm: str, before, row_bytes: int) -> dict[str, int]:
        ex = self.comm.exchanger(algorithm)
        out = dict.fromkeys(COUNTERS, 0)
        for phase, (_, b0), (_, b1) in zip(ex.plan.phases, before, ex.traffic(), strict=True):
            where = "inter" if str(phase.role) == "inter_node" else "intra"
            out[f"bytes_{where}"] += b1 - b0
            out[f"rows_{where}"] += (b1 - b0) // row_bytes
        return out

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle, *, weighted: bool = True) -> torch.Tensor:
        """The experts' rows back to their tokens.

        Args:
            expert_out: ``[R, M]`` in ``recv_x``'s order.
            handle: the dispatch's handle.
            weighted: multiply each row by its weight (False: plain sum).

        Returns:
            ``[S, M]``: ``sum_j weights[s, j] * expert_out[row of (s, j)]``,
            zeros for a token whose assignments were all dropped (with tp > 1:
            every token, identical on the TP group).
        """
        if not isinstance(expert_out, torch.Tensor) or expert_out.dim() != 2 or \
                expert_out.shape[0] != handle.weights.shape[0]:
            shape = tuple(expert_out.shape) if isinstance(expert_out, torch.Tensor) else type(expert_out).__name__
            raise ValueError(f"ExpertDispatcher.combine: expert_out must be [{handle.weights.shape[0]}, hidden] "
                             f"(the rows dispatch returned), got {shape}")
        y = expert_out * handle.weights.to(expert_out.dtype)[:, None] if weighted else expert_out
        row_bytes = self._combine_row_bytes(expert_out)
        route = handle.route
        if isinstance(route, DedupRoute):
            out = self._combine_dedup(y, route)
            self._count("combine", route.traffic(row_bytes, False))
        else:
            algorithm = route.algorithm
            if algorithm == "hierarchical" and self.comm.size > 1:
                before = self.comm.exchanger(algorithm).traffic()
                out = route.combine(y, self.combine_dtype)
                self._count("combine", self._phase_traffic(algorithm, before, row_bytes))
            else:
                out = route.combine(y, self.combine_dtype)
                self._count("combine", route.traffic(row_bytes, self.comm.topology.node_of_rank, self.order,
                                                     False))
        if handle.tp_chunking is not None:
            assert self.groups is not None
            out = GatherChunks.apply(out, handle.tp_chunking, self.groups._tp)
        return out

    def _combine_dedup(self, y: torch.Tensor, route: DedupRoute) -> torch.Tensor:
        if self.combine_dtype is None:
            return CombineRows.apply(y, route, self._count)

        def gradient_forth(g: torch.Tensor) -> torch.Tensor:
            self._count("combine_backward", route.traffic(self._combine_row_bytes(g), True))
            return wire.carried(lambda t: route.move_rows_forward(t, "combine backward"), g, self.combine_dtype)

        # The hops round their partial sums themselves (wire_dtype below),
        # so low_precision only adds the straight-through backward.
        return wire.low_precision(lambda t: route.reduce_rows_backward(t, wire_dtype=self.combine_dtype),
                                  gradient_forth, y, None)


__all__ = ["DEDUP_MIN_SAVING", "ITEM_BYTES", "DispatchHandle", "ExpertDispatcher", "choose_mode", "inter_node_rows"]
