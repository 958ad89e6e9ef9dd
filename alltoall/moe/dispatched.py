"""The layer's path through ``alltoall.ExpertDispatcher`` (issue 20): gate,
dispatch, the local experts on the rows that arrive, combine.

The gate has already applied the capacity rule (``drop_tokens=True``): its
dropped assignments go to the dispatcher as expert -1, so the dispatcher
runs dropless on what is kept and the same assignments drop as on the
replicate path. The combine applies the gate's weights, so the weights'
gradient comes from the dispatcher's autograd.

``overlap_degree`` N > 1 cuts the tokens into N contiguous chunks and runs
dispatch, experts and combine once per chunk, one after the other: the
result equals N = 1 (exactly for experts that compute each row on its own),
but nothing overlaps yet, since the dispatcher's calls are synchronous.
Every rank issues the same N dispatches (a chunk may hold no tokens).
"""

from __future__ import annotations

import itertools

import torch

from alltoall.moe.exchange import experts_event
from alltoall.moe.experts import LocalExperts
from alltoall.moe.gate import GateOutput
from alltoall.ops import ExpertDispatcher

DISPATCHERS = ("auto", "dedup", "replicate")


def check_dispatcher(value: str) -> str:
    if value not in DISPATCHERS:
        raise ValueError(f"dispatcher={value!r} is not one of {DISPATCHERS}")
    return value


def kept_expert_index(gate: GateOutput) -> torch.Tensor:
    """``[S, k]`` the gate's experts with every dropped assignment as -1."""
    routing = gate.routing
    return routing.expert_index.masked_fill(routing.dest_row < 0, -1)


class DispatchedExperts:
    """Runs tokens through the experts of every EP rank with an ExpertDispatcher.

    Args:
        dispatcher: an ``alltoall.ExpertDispatcher`` over the layer's EP group
            (or its ParallelGroups), with ``num_local_experts`` equal to the
            layer's.
        overlap_degree: N >= 1 token chunks (see the module's docstring).
    """

    def __init__(self, dispatcher: ExpertDispatcher, overlap_degree: int = 1) -> None:
        self.dispatcher = dispatcher
        self.overlap_degree = overlap_degree

    @property
    def mode(self) -> str:
        return self.dispatcher.mode

    def run(self, tokens: torch.Tensor, gate: GateOutput, experts: LocalExperts) -> torch.Tensor:
        """``tokens [S, M]`` -> ``[S, M]``: each token's weighted sum of its
        kept experts' outputs."""
        index = kept_expert_index(gate)
        weights = gate.weights.to(tokens.dtype)
        chunks = self.overlap_degree
        if chunks == 1:
            return self._one(tokens, index, weights, experts)
        size = tokens.shape[0]
        bounds = [size * i // chunks for i in range(chunks + 1)]
        outs = [self._one(tokens[a:b], index[a:b], weights[a:b], experts) for a, b in itertools.pairwise(bounds)]
        return torch.cat(outs)

    def _one(self, tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
             experts: LocalExperts) -> torch.Tensor:
        rows, handle = self.dispatcher.dispatch(tokens, index, weights)
        with experts_event():
            out = experts(rows, handle.counts_list)
        return self.dispatcher.combine(out, handle)
