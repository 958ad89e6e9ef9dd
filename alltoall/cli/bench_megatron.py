"""The ``megatron`` row of ``alltoall-bench dispatch``: Megatron-Core's
``MoEAlltoAllTokenDispatcher`` on the same routing and capacity.

It runs on CPUs in its padded mode only (``moe_pad_expert_input_to_capacity``:
equal splits; its dropless all-to-all allocates on the current CUDA device,
see tests/backend/test_clients.py), so the row needs ``--capacity-factor``.
The routing given to it already obeys the gate's capacity rule, and its
capacity, ``ceil(S * k / E * factor)``, equals the gate's with
``min_capacity`` 0, so it drops nothing more and pads every expert to the
same capacity. Its exchanges are torch.distributed's ``all_to_all_single``
on the default group. Its bytes are not counted by any counter; the row
gives the padded exchange's: ``L * C`` rows to every other rank, each of M
values plus its probability (which Megatron-Core sends in an all-to-all of
its own).
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.distributed as dist

from alltoall.topology import Topology


def available() -> bool:
    return importlib.util.find_spec("megatron") is not None


class MegatronDispatch:
    """Megatron-Core's all-to-all token dispatcher over the whole world as EP group."""

    def __init__(self, experts: int, k: int, hidden: int, capacity_factor: float) -> None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Megatron warns at import about the missing Apex/TE
            from megatron.core import parallel_state
            from megatron.core.process_groups_config import ProcessGroupCollection
            from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
            from megatron.core.transformer.transformer_config import TransformerConfig

        world, rank = dist.get_world_size(), dist.get_rank()
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
        if not torch.cuda.is_available() and MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
            # Its constructor creates a CUDA stream for the dropless mode; the padded mode never uses it.
            MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "no CUDA: the padded mode never uses it"
        config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1, num_moe_experts=experts,
                                   moe_router_topk=k, moe_token_dispatcher_type="alltoall",
                                   moe_expert_capacity_factor=capacity_factor,
                                   moe_pad_expert_input_to_capacity=True, use_cpu_initialization=True)
        local = experts // world
        self.dispatcher = MoEAlltoAllTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), config,
                                                     ProcessGroupCollection.use_mpu_process_groups())
        self.experts, self.k, self.capacity_factor = experts, k, capacity_factor
        self.mode = "megatron"

    @staticmethod
    def dense(expert_index: torch.Tensor, weights: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[S, k]`` index (-1: dropped) and weights to Megatron's ``routing_map``
        ``[S, E]`` bool and ``probs`` ``[S, E]``."""
        tokens, choices = (expert_index >= 0).nonzero(as_tuple=True)
        experts_of = expert_index[tokens, choices]
        routing_map = torch.zeros(expert_index.shape[0], experts, dtype=torch.bool)
        routing_map[tokens, experts_of] = True
        probs = torch.zeros(expert_index.shape[0], experts, dtype=weights.dtype)
        probs = probs.index_put((tokens, experts_of), weights[tokens, choices])  # differentiable in weights
        return routing_map, probs

    def step(self, x: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Dispatch, identity experts weighted by the probabilities, combine: ``[S, M]``."""
        d = self.dispatcher
        hidden, p = d.dispatch_preprocess(x, routing_map, probs)
        hidden, p = d.token_dispatch(hidden, p)
        hidden, _, p = d.dispatch_postprocess(hidden, p)
        out = hidden * p.unsqueeze(-1).to(hidden.dtype)
        return d.combine_postprocess(d.token_combine(d.combine_preprocess(out)))

    def sent(self, tokens: int, hidden: int, element_size: int, topology: Topology) -> dict[str, int]:
        """The padded exchange's rows and bytes to other ranks, one dispatch."""
        capacity = math.ceil((tokens * self.k / self.experts) * self.capacity_factor)
        rows_per_peer = capacity * (self.experts // topology.size)
        same_node = topology.local_size - 1 if topology.uniform else len(topology.ranks_of_node(topology.node)) - 1
        other = topology.size - 1 - same_node
        return {"rows_intra": rows_per_peer * same_node, "rows_inter": rows_per_peer * other,
                "bytes_intra": rows_per_peer * same_node * (hidden * element_size + 4),
                "bytes_inter": rows_per_peer * other * (hidden * element_size + 4)}
