"""Node-limited routing (DeepSeek-V3): every token picks its k experts among
the experts of at most N nodes, which bounds the copies of a token that
cross the network.

The rule, per token:

1. a node's score is the sum of the ``m`` highest affinities among its
   experts, with ``m = max(1, k // N)`` (``min(m, experts on the node)`` for a
   node with fewer experts);
2. the N best nodes are kept; equal scores go to the lower node id;
3. the token's top-k is taken among the experts of those nodes only, with
   the gate's usual rule (larger logit first, the lower expert among equals).

The affinities are the gate's softmax probabilities. When N does not divide
k, ``m`` is the floor ``k // N``, as Megatron-Core's ``group_limited_topk``
takes ``topk // group_topk``; for k < N, where that floor is 0 (Megatron-Core
would then sum nothing and pick its groups arbitrarily), ``m`` is 1: a node
counts with its best expert. With ``N >= number of nodes`` nothing is masked
and the routing is plain top-k, bit for bit.

The nodes of the experts come as a pure map ``expert_node[e]`` (node ids
0 .. n-1); ``expert_nodes`` builds it from a Communicator: global expert e
lives on EP rank ``e // L``, and its node is that rank's topology node.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alltoall.ops import Communicator


def check_node_map(expert_node: Sequence[int] | torch.Tensor, num_experts: int, k: int,
                   max_nodes: int | None) -> torch.Tensor:
    """``expert_node`` as an int64 tensor ``[E]``, checked against E, k and N.

    Raises ValueError when the map has the wrong length, when its node ids
    are not 0 .. n-1 with every node used, when ``max_nodes < 1``, or when N
    nodes may hold fewer than k experts (the N smallest nodes hold < k)."""
    nodes = torch.as_tensor(expert_node, dtype=torch.int64).reshape(-1).cpu()
    if nodes.numel() != num_experts:
        raise ValueError(f"expert_node has {nodes.numel()} entries, expected one per expert "
                         f"(num_experts={num_experts})")
    if max_nodes is not None and max_nodes < 1:
        raise ValueError(f"max_nodes={max_nodes} must be >= 1")
    count = int(nodes.max()) + 1 if nodes.numel() else 0
    if nodes.numel() and (int(nodes.min()) < 0 or set(nodes.tolist()) != set(range(count))):
        raise ValueError(f"expert_node must use node ids 0..n-1, each at least once; got {sorted(set(nodes.tolist()))}")
    if max_nodes is not None and max_nodes < count:
        smallest = sorted(torch.bincount(nodes, minlength=count).tolist())[:max_nodes]
        if sum(smallest) < k:
            raise ValueError(f"max_nodes={max_nodes}: the {max_nodes} smallest nodes hold {sum(smallest)} experts, "
                             f"fewer than k={k}")
    return nodes


def node_scores(probs: torch.Tensor, expert_node: torch.Tensor, k: int, max_nodes: int) -> torch.Tensor:
    """``[S, E]`` affinities to ``[S, n]`` node scores: per node, the sum of
    its ``max(1, k // max_nodes)`` highest affinities (fewer if the node has
    fewer experts), largest first."""
    per_node = max(1, k // max_nodes)
    count = int(expert_node.max()) + 1
    scores = []
    for node in range(count):
        members = (expert_node == node).nonzero().squeeze(1).to(probs.device)
        top = probs.index_select(1, members).topk(min(per_node, members.numel()), dim=1).values
        scores.append(top.sum(dim=1))
    return torch.stack(scores, dim=1)


def allowed_experts(probs: torch.Tensor, expert_node: torch.Tensor, k: int,
                    max_nodes: int | None) -> torch.Tensor | None:
    """``[S, E]`` bool: the experts on each token's ``max_nodes`` best nodes;
    None when nothing is excluded (no limit, or ``max_nodes`` >= the nodes)."""
    count = int(expert_node.max()) + 1
    if max_nodes is None or max_nodes >= count:
        return None
    scores = node_scores(probs, expert_node, k, max_nodes)
    # A stable descending sort keeps the lower node first among equal scores.
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :max_nodes]
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, best, True)
    return chosen.index_select(1, expert_node.to(probs.device))


def limit_logits(logits: torch.Tensor, probs: torch.Tensor, expert_node: torch.Tensor | None, k: int,
                 max_nodes: int | None) -> torch.Tensor:
    """``logits`` with the experts outside each token's ``max_nodes`` best
    nodes set to -inf, for the top-k; ``logits`` itself when nothing is
    excluded. Not differentiable (used only to choose)."""
    if expert_node is None:
        return logits
    allowed = allowed_experts(probs.detach(), expert_node, k, max_nodes)
    if allowed is None:
        return logits
    return logits.detach().masked_fill(~allowed, float("-inf"))


def expert_nodes(comm: Communicator | None, num_experts: int) -> list[int]:
    """The node of every global expert: expert e lives on EP rank ``e // L``
    (``L = E / ep``); EP rank i is the Communicator's group rank
    ``rank_order[i]`` (the identity unless relabelled), on topology node
    ``node_of_rank`` of it. One node for ``comm`` None (a single process)."""
    if comm is None:
        return [0] * num_experts
    size = comm.size
    if num_experts % size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {size}")
    local = num_experts // size
    order = comm.rank_order or list(range(size))
    return [comm.topology.node_of_rank[order[e // local]] for e in range(num_experts)]
