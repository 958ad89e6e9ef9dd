"""The deduplicating dispatch's per-call route and its row movement.

Two hops (docs/moe.md, "The expert dispatcher"):

1. over the rail (the ranks with this rank's local rank, one per node): a
   token with experts on a remote node goes once to its rail peer there,
   with the list of its experts on that node (an *item* each: expert id and
   weight);
2. inside the node: the relay (the origin for its own node's experts, the
   rail peer otherwise) sends each row once to each local rank owning one
   of its items' experts, which expands it into one row per item, grouped
   by local expert.

``DedupRoute.build`` exchanges only metadata: per hop, the item counts
(O(p) ints, inside the exchanger's count phase) and then the items (three
int64 each: expert, row within the block, weight bits). The row movement
is then pure index data plus two ``all_to_all_v`` per direction:

- ``move_rows_forward`` (dispatch, and the backward of combine): gather,
  rail exchange, gather, node exchange, gather. Copies only, so any dtype
  moves (uint8-packed low-precision rows included).
- ``reduce_rows_backward`` (combine, and the backward of dispatch): the
  adjoint, with ``index_add`` sums per hop-2 row, per (token, node) at the
  relay and per token at the origin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alltoall._library import _C
from alltoall.ops import dispatch_index

ITEM_BYTES = 24  # expert id, row within the block, weight (float64 bits)


@dataclass(frozen=True)
class Hop:
    """One hop's flat exchange: None when this rank's subgroup is itself
    alone (the hop is then a local copy), and this rank's position in it."""

    exchanger: _C.Exchanger | None
    position: int
    size: int
    name: str  # for errors: "hop 1 (inter-node rail)" ...


def named_error(error: BaseException, what: str) -> BaseException:
    """``error`` with the dispatcher's phase in front, of the same class
    when it can be built from a message (DistBackendError can)."""
    message = f"ExpertDispatcher {what}: {error}"
    try:
        return type(error)(message)
    except Exception:  # a class that takes other arguments
        return RuntimeError(message)


def exchange(hop: Hop, rows: torch.Tensor, send: list[int], recv: list[int] | None,
             what: str) -> tuple[torch.Tensor, list[int]]:
    """``all_to_all_v`` over the hop's group; the identity when the group
    is this rank alone."""
    if hop.exchanger is None:
        return rows, list(send)
    try:
        out, received = hop.exchanger.all_to_all_v(rows.contiguous(), send, recv)
    except Exception as error:  # re-raised with the phase named
        raise named_error(error, f"{what}, {hop.name}") from error
    return out, list(received)


def _block_starts(counts: list[int], device: torch.device) -> torch.Tensor:
    c = torch.tensor(counts, dtype=torch.int64, device=device)
    return torch.cumsum(c, 0) - c


def _received_rows(meta: torch.Tensor, item_counts: list[int], size: int) -> tuple[list[int], torch.Tensor]:
    """Rows each source sent (one more than its items' last row within the
    block; items come in row order) and each item's row in the received
    buffer."""
    device = meta.device
    source = torch.repeat_interleave(torch.arange(size, device=device),
                                     torch.tensor(item_counts, dtype=torch.int64, device=device))
    rows = torch.zeros(size, dtype=torch.int64, device=device)
    if meta.shape[0]:
        rows.scatter_reduce_(0, source, meta[:, 1] + 1, "amax")
    row_list = rows.tolist()
    return row_list, _block_starts(row_list, device)[source] + meta[:, 1]


def _row_ptr(item_row: torch.Tensor, num_rows: int) -> torch.Tensor:
    counts = torch.bincount(item_row, minlength=num_rows)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _pack(experts: torch.Tensor, pairs: dispatch_index.Pairs, weights: torch.Tensor,
          keys: torch.Tensor) -> torch.Tensor:
    """Items in send order as ``[I, 3]`` int64: expert, row within its
    key's block, weight (float64 bits)."""
    within = pairs.item_pair - _block_starts(pairs.pair_counts, experts.device)[keys]
    bits = weights.to(torch.float64).view(torch.int64)
    return torch.stack([experts, within, bits], dim=1)


@dataclass
class DedupRoute:
    """Where this call's rows go, as index data (see the module docstring).

    ``tokens``: S; ``rows``: R received rows (``counts`` per local expert);
    ``weights``: ``[R]`` float64, the weight of each received row.
    """

    hops: tuple[Hop, Hop]
    tokens: int
    k: int
    g1: torch.Tensor  # [P1] token of each hop-1 row sent
    g2: torch.Tensor  # [P2] relay row (token, then hop-1 received row) of each hop-2 row sent
    g3: torch.Tensor  # [R] hop-2 received row of each expanded row
    rows1: tuple[list[int], list[int]]  # hop-1 rows sent / received per rail position
    rows2: tuple[list[int], list[int]]
    items1: tuple[list[int], list[int]]
    items2: tuple[list[int], list[int]]
    assign1: torch.Tensor  # [I1] assignment (s * k + j) of each hop-1 item sent
    own_local: torch.Tensor  # [I0] assignments of this rank's tokens to its own node
    order2: torch.Tensor  # [I2] relay item of each hop-2 item sent
    order3: torch.Tensor  # [R] hop-2 received item of each expanded row
    counts: torch.Tensor
    counts_list: list[int]
    weights: torch.Tensor
    received1: int = 0
    sent: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, hops: tuple[Hop, Hop], expert_index: torch.Tensor, weights: torch.Tensor,
              rail_key: torch.Tensor, node_key: torch.Tensor, first_expert: int, num_local: int) -> DedupRoute:
        """Runs the two metadata exchanges. ``expert_index`` ``[S, k]`` with
        -1 for no assignment; ``rail_key[e]``: the rail position of expert
        e's node (-1 for this rank's node); ``node_key[e]``: its owner's
        position inside its node."""
        rail, node = hops
        tokens, k = expert_index.shape
        device = expert_index.device
        items = expert_index.reshape(-1)
        w = weights.detach().reshape(-1)
        valid = items >= 0
        safe = items.clamp(min=0)
        key1 = torch.where(valid, rail_key[safe], -1)

        # Hop 1: to the rail peer on each remote node.
        p1 = dispatch_index.pairs(torch.arange(tokens + 1, device=device) * k, key1, rail.size)
        meta1 = _pack(items[p1.item_order], p1, w[p1.item_order], key1[p1.item_order])
        recv_meta1, recv_items1 = exchange(rail, meta1, p1.item_counts, None, "dispatch metadata")
        rows1_in, relay_row1 = _received_rows(recv_meta1, recv_items1, rail.size)
        received1 = sum(rows1_in)

        # Hop 2, at the relay: own tokens for this node, then what arrived.
        own_local = (valid & (key1 < 0)).nonzero().squeeze(1)
        rel_expert = torch.cat([items[own_local], recv_meta1[:, 0]])
        rel_weight = torch.cat([w[own_local].to(torch.float64), recv_meta1[:, 2].view(torch.float64)])
        rel_row = torch.cat([own_local // k, tokens + relay_row1])
        p2 = dispatch_index.pairs(_row_ptr(rel_row, tokens + received1), node_key[rel_expert], node.size)
        meta2 = _pack(rel_expert[p2.item_order], p2, rel_weight[p2.item_order], node_key[rel_expert[p2.item_order]])
        recv_meta2, recv_items2 = exchange(node, meta2, p2.item_counts, None, "dispatch metadata")
        rows2_in, row2 = _received_rows(recv_meta2, recv_items2, node.size)

        # Expansion: one row per item, grouped by local expert.
        local_expert = recv_meta2[:, 0] - first_expert
        if local_expert.numel() and not bool(((local_expert >= 0) & (local_expert < num_local)).all()):
            raise RuntimeError("ExpertDispatcher: received an item for an expert this rank does not own "
                               "(ranks disagree on the number of experts or the placement?)")
        order3 = torch.sort(local_expert, stable=True).indices
        counts = torch.bincount(local_expert, minlength=num_local)
        route = cls(
            hops=hops, tokens=tokens, k=k, g1=p1.pair_row, g2=p2.pair_row, g3=row2[order3],
            rows1=(p1.pair_counts, rows1_in), rows2=(p2.pair_counts, rows2_in),
            items1=(p1.item_counts, recv_items1), items2=(p2.item_counts, recv_items2),
            assign1=p1.item_order, own_local=own_local, order2=p2.item_order, order3=order3,
            counts=counts, counts_list=counts.tolist(), weights=recv_meta2[order3, 2].view(torch.float64),
            received1=received1,
        )
        return route

    # Counters ---------------------------------------------------------------

    def traffic(self, row_bytes: int, forward: bool, items: bool = False) -> dict[str, int]:
        """Rows and bytes this rank sends to other ranks in one direction:
        forward (dispatch, and the backward of combine) or back (combine,
        and the backward of dispatch); with ``items``, the bytes include the
        dispatch's items."""
        node = self.hops[1]
        rows1 = self.rows1[0 if forward else 1]
        rows2 = self.rows2[0 if forward else 1]
        inter = sum(rows1)
        intra = sum(rows2) - (rows2[node.position] if node.exchanger is not None else sum(rows2))
        out = {"rows_intra": intra, "rows_inter": inter, "bytes_intra": intra * row_bytes,
               "bytes_inter": inter * row_bytes}
        if items:
            items2 = self.items2[0]
            out["bytes_inter"] += sum(self.items1[0]) * ITEM_BYTES
            out["bytes_intra"] += (sum(items2) - (items2[node.position] if node.exchanger is not None
                                                  else sum(items2))) * ITEM_BYTES
        return out

    # Row movement ---------------------------------------------------------

    def move_rows_forward(self, rows: torch.Tensor, what: str = "dispatch") -> torch.Tensor:
        """``[S, *]`` token rows -> ``[R, *]``, one per received item, grouped
        by local expert. Copies only: any dtype."""
        rail, node = self.hops
        h1, _ = exchange(rail, rows.index_select(0, self.g1), self.rows1[0], self.rows1[1], what)
        relay = torch.cat([rows, h1]) if h1.shape[0] else rows
        h2, _ = exchange(node, relay.index_select(0, self.g2), self.rows2[0], self.rows2[1], what)
        return h2.index_select(0, self.g3)

    def reduce_rows_backward(self, rows: torch.Tensor, what: str = "combine") -> torch.Tensor:
        """The adjoint of ``move_rows_forward``: ``[R, *]`` -> ``[S, *]``, each
        token's sum of the rows of its items. Sums per hop-2 row here, per
        (token, node) at the relay, and per token at the origin."""
        rail, node = self.hops
        tail = rows.shape[1:]
        h2 = rows.new_zeros((sum(self.rows2[1]), *tail)).index_add_(0, self.g3, rows)
        back2, _ = exchange(node, h2, self.rows2[1], self.rows2[0], what)
        relay = rows.new_zeros((self.tokens + self.received1, *tail)).index_add_(0, self.g2, back2)
        back1, _ = exchange(rail, relay[self.tokens:], self.rows1[1], self.rows1[0], what)
        out = relay[:self.tokens]
        return out.index_add_(0, self.g1, back1) if back1.shape[0] else out

    def reduce_items_backward(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of the received weights ``[R]`` back to ``[S, k]``
        (each item travelled alone, so this is a permutation back)."""
        rail, node = self.hops
        col = grad.reshape(-1, 1)
        recv2 = torch.empty_like(col)
        recv2[self.order3] = col
        sent2, _ = exchange(node, recv2, self.items2[1], self.items2[0], "dispatch weights backward")
        relay = col.new_zeros((self.own_local.numel() + sum(self.items1[1]), 1))
        relay[self.order2] = sent2
        own = self.own_local.numel()
        sent1, _ = exchange(rail, relay[own:], self.items1[1], self.items1[0], "dispatch weights backward")
        out = col.new_zeros((self.tokens * self.k, 1))
        out[self.own_local] = relay[:own]
        out[self.assign1] = sent1
        return out.view(self.tokens, self.k)


# Autograd --------------------------------------------------------------------


def _row_bytes(t: torch.Tensor) -> int:
    width = 1
    for n in t.shape[1:]:
        width *= n
    return width * t.element_size()


class DispatchRows(torch.autograd.Function):
    """Forward: ``move_rows_forward``. Backward: ``reduce_rows_backward``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, route: DedupRoute, stats) -> torch.Tensor:  # type: ignore[override]
        ctx.route, ctx.stats = route, stats
        return route.move_rows_forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.stats("dispatch_backward", ctx.route.traffic(_row_bytes(grad), False))
        return ctx.route.reduce_rows_backward(grad.contiguous(), "dispatch backward"), None, None


class CombineRows(torch.autograd.Function):
    """Forward: ``reduce_rows_backward``. Backward: ``move_rows_forward``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, route: DedupRoute, stats) -> torch.Tensor:  # type: ignore[override]
        ctx.route, ctx.stats = route, stats
        return route.reduce_rows_backward(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.stats("combine_backward", ctx.route.traffic(_row_bytes(grad), True))
        return ctx.route.move_rows_forward(grad.contiguous(), "combine backward"), None, None


class ReceivedWeights(torch.autograd.Function):
    """The weights ``[S, k]`` -> ``[R]`` at the experts' ranks. The values
    travelled with the items in ``DedupRoute.build``; the backward sends the
    gradient of each back the same way."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, route: DedupRoute) -> torch.Tensor:  # type: ignore[override]
        ctx.route = route
        return route.weights.to(weights.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.route.reduce_items_backward(grad.contiguous()), None
