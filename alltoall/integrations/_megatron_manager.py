"""The flex token dispatcher's manager on ``alltoall.ExpertDispatcher``.

Imported by ``alltoall.integrations.megatron.enable()`` only, after it has
checked the installed Megatron-Core version: this module subclasses
Megatron-Core's ``_DispatchManager``, whose interface is the tested one.

Megatron-Core's ``MoEFlexTokenDispatcher`` hands its manager the routing of
the TPxEP group: ``routing_map`` and ``probs`` of shape
``[S, W, L]`` (``W = tp * ep`` ranks, ``L`` local experts), where the entry
``(s, w, l)`` says that token ``s`` goes to local expert ``l`` of group rank
``w``; each TP rank of an expert's EP rank gets the token (expert tensor
parallelism computes partial outputs that the combine sums). This manager
treats the ``W * L`` columns as experts of an ``ExpertDispatcher`` over the
TPxEP group (expert ``w * L + l`` lives on group rank ``w``, as
``ExpertDispatcher`` places them), which sends a token once per destination
rank, and once per destination node across the network.

Like DeepEP's manager, it dispatches the probabilities with the tokens and
leaves applying them to Megatron's experts: ``dispatched_probs`` are the
weights of the received rows, and the combine is a plain sum
(``combine(weighted=False)``).
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import _DispatchManager
from megatron.core.transformer.transformer_config import TransformerConfig

from alltoall.ops import Communicator
from alltoall.ops.expert_dispatcher import ExpertDispatcher

# One ExpertDispatcher per (TPxEP group, number of experts), shared by the
# model's MoE layers: each Communicator creates subgroups and a progress
# thread, which a model of 60 MoE layers must not multiply by 60. Keyed by
# the group's registered name and checked by identity, so a group destroyed
# and re-created under the same name gets a new one.
_dispatchers: dict[tuple[str, int, str, int], tuple[dist.ProcessGroup, ExpertDispatcher]] = {}
_lock = threading.Lock()


def dispatcher_for(group: dist.ProcessGroup, num_experts: int, mode: str, k: int) -> ExpertDispatcher:
    """The shared ExpertDispatcher of ``group`` (collective on first use:
    every rank of the group builds its MoE layers in the same order); ``k``
    feeds mode "auto"'s rule."""
    key = (group.group_name, num_experts, mode, k)
    with _lock:
        found = _dispatchers.get(key)
        if found is not None and found[0] is group:
            return found[1]
        dispatcher = ExpertDispatcher(Communicator(group), num_experts, mode=mode, k=k)
        _dispatchers[key] = (group, dispatcher)
        return dispatcher


def forget_dispatchers() -> None:
    """Drops the shared dispatchers (their groups' owners destroy the groups)."""
    with _lock:
        _dispatchers.clear()


def routing_to_indices(routing_map: torch.Tensor, probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's multi-hot routing as the dispatcher's top-k lists.

    Args:
        routing_map: ``[S, E]`` bool, True where token s goes to expert e.
        probs: ``[S, E]`` float, the routing probabilities.
        k: columns of the result; at least the most True entries of a row.

    Returns:
        ``expert_index`` ``[S, k]`` int64 (each row's experts in ascending
        order, then -1) and ``weights`` ``[S, k]`` (``probs`` at those experts,
        0 at -1; differentiable in ``probs``).
    """
    # A stable sort of "not routed" puts each row's routed experts first, in
    # expert order: the order Megatron's own permute visits them.
    order = torch.argsort((~routing_map).to(torch.int8), dim=1, stable=True)[:, :k]
    routed = routing_map.gather(1, order)
    expert_index = order.masked_fill(~routed, -1)
    weights = probs.gather(1, order).masked_fill(~routed, 0)
    return expert_index, weights


class AlltoallDispatchManager(_DispatchManager):
    """``moe_flex_dispatcher_backend="alltoall"``: the flex dispatcher's
    manager on a deduplicating ``ExpertDispatcher`` over the TPxEP group.

    Args:
        group: the TPxEP group (``pg_collection.tp_ep``), as DeepEP's manager
            gets it: group rank ``w = ep_rank * tp + tp_rank`` holds virtual
            experts ``w * L ... w * L + L - 1``.
        num_local_experts: ``L``, experts on this rank.
        router_topk: ``tp * moe_router_topk``: the routed entries of a row of
            the TPxEP routing map.
        num_experts: ``tp * num_moe_experts`` (``W * L``).
        config: the layer's TransformerConfig. Drop and pad follow
            Megatron's router: with ``moe_expert_capacity_factor`` the router
            has already removed the dropped assignments from ``routing_map``;
            with ``moe_pad_expert_input_to_capacity`` its routing map holds
            exactly ``capacity`` tokens per expert (padding tokens have
            probability 0), so every local expert receives
            ``capacity * W`` rows, as from HybridEP's manager.
        mode: the ExpertDispatcher's mode, as ``enable(mode=...)`` set it.
    """

    def __init__(self, group: dist.ProcessGroup, num_local_experts: int, router_topk: int, num_experts: int,
                 config: TransformerConfig, mode: str = "dedup") -> None:
        if getattr(config, "moe_router_padding_for_quantization", False):
            raise ValueError("moe_flex_dispatcher_backend='alltoall' does not support "
                             "moe_router_padding_for_quantization=True (FP8/FP4 padding of the routing map)")
        if num_experts != dist.get_world_size(group) * num_local_experts:
            raise ValueError(f"num_experts={num_experts} must be the TPxEP group's {dist.get_world_size(group)} "
                             f"ranks * num_local_experts={num_local_experts}")
        self.group = group
        self.num_local_experts = num_local_experts
        self.router_topk = router_topk
        self.num_experts = num_experts
        self.config = config
        self.router_dtype = config.moe_router_dtype
        self.drop_and_pad = bool(config.moe_pad_expert_input_to_capacity)
        if self.drop_and_pad and config.moe_expert_capacity_factor is None:
            raise ValueError("moe_pad_expert_input_to_capacity=True needs moe_expert_capacity_factor")
        self.dispatcher = dispatcher_for(group, num_experts, mode, router_topk)
        # Per-step metadata, set by setup_metadata and dispatch.
        self.token_indices: torch.Tensor | None = None
        self.token_probs: torch.Tensor | None = None
        self.dispatched_probs: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None
        self.handle = None

    def setup_metadata(self, routing_map: torch.Tensor, probs: torch.Tensor) -> None:
        """``routing_map`` and ``probs``: ``[S, W, L]`` (or ``[S, W * L]``)."""
        num_tokens = routing_map.shape[0]
        routing_map = routing_map.reshape(num_tokens, self.num_experts).bool()
        probs = probs.reshape(num_tokens, self.num_experts)
        k = self.router_topk
        if self.drop_and_pad and num_tokens > 0:
            # Padding to capacity routes a token to any number of experts.
            k = max(1, int(routing_map.sum(dim=1).max()))
        # As DeepEP's manager: the probabilities travel as float32.
        self.token_indices, self.token_probs = routing_to_indices(routing_map, probs.float(), k)

    def dispatch(self, hidden_states: torch.Tensor, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> torch.Tensor:
        """``hidden_states`` ``[S, H]`` -> ``[R, H]``: the rows of every local
        expert, grouped by local expert. The exchange runs in the calling
        thread; ``async_finish`` and ``allocate_on_comm_stream`` (DeepEP's
        CUDA stream options) are accepted and have no effect."""
        if self.token_indices is None:
            raise RuntimeError("dispatch before setup_metadata: the flex dispatcher's dispatch_preprocess sets it")
        recv, handle = self.dispatcher.dispatch(hidden_states, self.token_indices, self.token_probs)
        self.handle = handle
        self.dispatched_probs = handle.weights
        # On the host, as DeepEP's manager returns it: Megatron's experts
        # split by it (tolist) and grouped GEMMs take it on the CPU.
        self.tokens_per_expert = torch.tensor(handle.counts_list, dtype=torch.long)
        return recv

    def get_number_of_tokens_per_expert(self) -> torch.Tensor:
        """``[L]`` int64 on the host: the rows of each local expert."""
        return self.tokens_per_expert

    def get_permuted_hidden_states_by_experts(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dispatch already grouped the rows by local expert: returns them
        and their probabilities ``[R]``."""
        probs = self.dispatched_probs
        if self.router_dtype == "fp64":
            probs = probs.to(torch.float64)
        return hidden_states, probs

    def get_restored_hidden_states_by_experts(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The combine takes the rows in the dispatch's order: unchanged."""
        return hidden_states

    def combine(self, hidden_states: torch.Tensor, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> torch.Tensor:
        """``[R, H]`` expert outputs (Megatron's experts applied the
        probabilities) -> ``[S, H]``, their plain sum per token."""
        if self.handle is None:
            raise RuntimeError("combine without a dispatch: each dispatch is combined once")
        out = self.dispatcher.combine(hidden_states, self.handle, weighted=False)
        self.handle = None
        return out
