"""MoE: the reference Mixture-of-Experts layer, with DeepSpeed's arguments."""

from __future__ import annotations

import copy
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from alltoall.moe.dispatch import combine, dispatch
from alltoall.moe.dispatched import DispatchedExperts, check_dispatcher
from alltoall.moe.exchange import ExpertExchange
from alltoall.moe.experts import FeedForward, LocalExperts, replicas, seeded_feed_forwards
from alltoall.moe.gate import TopKGate, expert_capacity
from alltoall.moe.node_limited import expert_nodes
from alltoall.moe.pipeline import check_overlap_degree
from alltoall.ops import Communicator, ExpertDispatcher, ParallelGroups


class MoE(nn.Module):
    """A Mixture-of-Experts layer with expert parallelism over alltoall.

    Each token picks its k best experts; its rows are scattered expert-major
    (dispatch), exchanged with the ranks that own those experts, passed
    through them, exchanged back and summed with the gate weights (combine).

    Args:
        hidden_size: M, the token width.
        expert: the module replicated into every local expert (deep copies,
            all with its weights). Alternatively pass ``ffn_hidden_size``.
        num_experts: E in total, divisible by the expert-parallel size.
        k: experts per token.
        capacity_factor: training capacity factor (``drop_tokens=True``); see
            ``expert_capacity`` for the rule.
        eval_capacity_factor: the same in eval mode.
        min_capacity: the least capacity per expert.
        drop_tokens: True: fixed capacity, drops, padded buffers and the equal
            all-to-all. All ranks of the EP group must then pass the same
            number of tokens. False: dropless, exact counts and the all-to-all-v.
        use_residual: PR-MoE: add a dense MLP (a copy of ``expert``) whose
            output is mixed with the MoE's by a learned per-token softmax over
            two coefficients.
        ffn_hidden_size: build FeedForward(M, F) experts instead of copying
            ``expert``; expert e is initialised from ``seed + e`` with the seed
            drawn from the global RNG, so it starts the same for any EP size.
        groups: a ``ParallelGroups`` (TP x EP x DP). Its EP group carries the
            experts; with tp > 1 the tokens must be replicated across each TP
            group and the rows travel by the coordinated all-to-all, each TP
            rank running the experts on 1/tp of the rows. Expert gradients are
            then summed over the TP group in the backward, so every TP rank
            holds the full gradient. Excludes ``ep_group``.
        ep_group: the expert-parallel group: a ProcessGroup, a prebuilt
            ``Communicator`` (e.g. with ``local_size=`` for emulated nodes), or
            None for the default group (a single process when torch.distributed
            is not initialised).
        algorithm: "auto", "flat" or "hierarchical" for every exchange.
        normalize_weights, router_z_loss_coef: see ``TopKGate``.
        max_nodes: node-limited routing (DeepSeek-V3): each token's k experts
            lie on at most this many nodes of the EP group (the
            Communicator's topology nodes; emulated nodes count). None, or at
            least the number of nodes: plain top-k. See ``TopKGate``.
        dispatcher: how rows reach the experts. "replicate": the expert-major
            exchange, one row per (token, expert), flat or hierarchical by
            ``algorithm``, with the overlap pipeline. "dedup": through
            ``alltoall.ExpertDispatcher``, a token crossing the network once
            per destination node and reaching each destination rank once.
            "auto" (default): the ExpertDispatcher's rule, from the topology
            and k, identical on every rank; when it picks replicate, the
            replicate path above runs. One process: no exchange at all.
        timeout: bound on every exchange's waits (the Communicator's default if None).
        overlap_degree: N >= 1. Above 1 the rows go through the experts in N
            chunks (along capacity, or by counts when dropless): chunk i+1's
            exchange runs while the experts compute chunk i, and chunk i's
            return exchange while they compute chunk i+1; the backward is
            pipelined the same way. Results equal N = 1's (exactly for
            experts that compute each row on its own). See docs/moe.md.
        dispatch_dtype: the wire format of the tokens on their way to the
            experts: None (their dtype), torch.bfloat16 or
            torch.float8_e4m3fn (per token and 128-channel block scales).
        combine_dtype: the experts' outputs on their way back: None or
            torch.bfloat16. Gradients travel in combine_dtype (None: the
            input's dtype), never in FP8; the rounding is straight-through.
            See docs/moe.md ("Low-precision exchanges").
        check_tokens: with ``drop_tokens=True``, all-reduce the local token
            counts before each exchange and raise ValueError on every rank when
            they differ. Without it such a mismatch fails inside the exchange:
            gloo aborts the process; NCCL's watchdog aborts the communicator
            when its own timeout passes, and may end the process
            (``TORCH_NCCL_ASYNC_ERROR_HANDLING``); see docs/multinode.md.

    Construction is collective over the EP group when it builds the
    Communicator (every rank, same order).

    ``forward(x)`` takes ``[*, M]`` and returns ``(output [*, M], aux_loss,
    expert_counts [E])``: ``aux_loss`` is this rank's load-balancing loss (plus
    the z-loss term), ``expert_counts`` the local assignments per expert
    before dropping (int64, detached).
    """

    def __init__(
        self,
        hidden_size: int,
        expert: nn.Module | None = None,
        num_experts: int = 1,
        *,
        k: int = 1,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        use_residual: bool = False,
        ffn_hidden_size: int | None = None,
        groups: ParallelGroups | None = None,
        ep_group: dist.ProcessGroup | Communicator | None = None,
        algorithm: str = "auto",
        normalize_weights: bool | None = None,
        router_z_loss_coef: float = 0.0,
        timeout: timedelta | float | None = None,
        check_tokens: bool = False,
        overlap_degree: int = 1,
        max_nodes: int | None = None,
        dispatcher: str = "auto",
        dispatch_dtype: torch.dtype | None = None,
        combine_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if (expert is None) == (ffn_hidden_size is None):
            raise ValueError("pass exactly one of expert= (a module to replicate) and ffn_hidden_size=")
        if groups is not None and not isinstance(groups, ParallelGroups):
            raise ValueError(f"groups must be an alltoall.ParallelGroups, got {type(groups).__name__}")
        if groups is not None and ep_group is not None:
            raise ValueError("pass groups= (a ParallelGroups) or ep_group=, not both")
        for name, factor in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if not factor > 0:
                raise ValueError(f"{name}={factor} must be > 0")
        if min_capacity < 0:
            raise ValueError(f"min_capacity={min_capacity} must be >= 0")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.k = k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.drop_tokens = drop_tokens
        self.use_residual = use_residual
        self.check_tokens = check_tokens

        comm = None if groups is not None else _ep_communicator(ep_group, timeout)
        ep_comm = groups.ep_comm if groups is not None else comm
        node_map = expert_nodes(ep_comm, num_experts) if max_nodes is not None else None
        self.gate = TopKGate(hidden_size, num_experts, k, normalize_weights=normalize_weights,
                             z_loss_coef=router_z_loss_coef, max_nodes=max_nodes, expert_node=node_map)
        self.exchange = ExpertExchange(comm, num_experts, algorithm, groups, overlap_degree,
                                       dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype)
        self.dispatched = _dispatched(check_dispatcher(dispatcher), groups if groups is not None else comm,
                                      num_experts, k, max_nodes, algorithm, self.exchange.overlap_degree,
                                      dispatch_dtype, combine_dtype)
        local = self.exchange.num_local
        first = self.exchange.rank * local
        # Drawn on every rank whatever the EP size, so the global RNG stays in step.
        seed = int(torch.randint(0, 2**62, (1,)))
        if expert is None:
            assert ffn_hidden_size is not None
            made = seeded_feed_forwards(hidden_size, ffn_hidden_size, seed, range(first, first + local))
        else:
            made = replicas(expert, local)
        self.experts = LocalExperts(made, first)
        if groups is not None and groups.tp > 1:
            # Each TP rank ran the experts on its 1/tp of the rows.
            tp_group = groups.tp_group
            for p in self.experts.parameters():
                p.register_hook(lambda grad, group=tp_group: _summed_over(grad, group))
        if use_residual:
            self.mlp = copy.deepcopy(expert) if expert is not None else FeedForward(hidden_size, ffn_hidden_size)
            self.coefficient = nn.Linear(hidden_size, 2)

    @property
    def overlap_degree(self) -> int:
        return self.exchange.overlap_degree

    @overlap_degree.setter
    def overlap_degree(self, value: int) -> None:
        self.exchange.overlap_degree = check_overlap_degree(value)
        if self.dispatched is not None:
            self.dispatched.overlap_degree = self.exchange.overlap_degree

    @property
    def dispatcher_mode(self) -> str:
        """The dispatcher that runs: "dedup" or "replicate" (the same on every rank)."""
        return "replicate" if self.dispatched is None else self.dispatched.mode

    @property
    def ep_size(self) -> int:
        return self.exchange.ep

    @property
    def num_local_experts(self) -> int:
        return self.exchange.num_local

    def capacity(self, tokens: int) -> int | None:
        """Rows per expert for ``tokens`` local tokens in the current mode; None when dropless."""
        if not self.drop_tokens:
            return None
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return expert_capacity(tokens, self.num_experts, self.k, factor, self.min_capacity)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE: input of shape {tuple(x.shape)} does not end in hidden_size={self.hidden_size}")
        # A 2-d input is used as it is: a reshape would add a view and its
        # autograd node each way for nothing.
        tokens = x if x.dim() == 2 else x.reshape(-1, self.hidden_size)
        if self.drop_tokens and self.check_tokens:
            self.exchange.check_equal_tokens(tokens.shape[0], tokens.device)
        gate = self.gate(tokens, self.capacity(tokens.shape[0]))
        if self.dispatched is not None:
            out = self.dispatched.run(tokens, gate, self.experts)
        else:
            step = self.exchange.step(gate.routing, self.experts)
            rows = dispatch(tokens, step.routing)
            rows = step.run(rows)
            out = combine(rows, step.routing, gate.weights.to(rows.dtype))
        if self.use_residual:
            mix = torch.softmax(self.coefficient(tokens), dim=-1)
            out = out * mix[:, 0:1] + self.mlp(tokens) * mix[:, 1:]
        return (out if x.dim() == 2 else out.reshape(x.shape)), gate.aux_loss, gate.counts


def _summed_over(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    total = grad.clone()
    dist.all_reduce(total, group=group)
    return total


def _dispatched(mode: str, comm: ParallelGroups | Communicator | None, num_experts: int, k: int,
                max_nodes: int | None, algorithm: str, overlap_degree: int, dispatch_dtype: torch.dtype | None,
                combine_dtype: torch.dtype | None) -> DispatchedExperts | None:
    """The ExpertDispatcher path, or None for the replicate path (also when
    "auto" resolves to replicate, and on one process, where nothing moves)."""
    if mode == "replicate" or comm is None:
        return None
    dispatcher = ExpertDispatcher(comm, num_experts, mode=mode, algorithm=algorithm, k=k, max_nodes=max_nodes,
                                  dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype)
    return DispatchedExperts(dispatcher, overlap_degree) if dispatcher.mode == "dedup" else None


def _ep_communicator(ep_group: dist.ProcessGroup | Communicator | None,
                     timeout: timedelta | float | None) -> Communicator | None:
    if isinstance(ep_group, Communicator):
        return ep_group
    if ep_group is None and not dist.is_initialized():
        return None
    return Communicator(ep_group, timeout=timeout)
