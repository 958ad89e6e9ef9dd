"""Helpers for the expert dispatcher's tests: routings (random and
adversarial), the plain-loop capacity rule, a dense single-process
reference with per-expert linear maps, and the expected counters."""

from __future__ import annotations

import torch

import alltoall

HIDDEN = 5


def routing(kind: str, tokens: int, k: int, num_experts: int, owner_node: list[int], my_node: int,
            generator: torch.Generator) -> torch.Tensor:
    """``[tokens, k]`` int64 expert ids, distinct per token.

    kinds: "random"; "one_expert" (every token to the same experts, 0..k-1);
    "one_remote_node" (all of a token's experts on one other node, when it
    has enough experts); "local" (only experts of this rank's node);
    "dropped" (random, with some assignments already -1)."""
    out = torch.empty((tokens, k), dtype=torch.int64)
    nodes = sorted(set(owner_node))
    for s in range(tokens):
        if kind == "one_expert":
            choice = list(range(k))
        else:
            if kind == "one_remote_node":
                remote = [n for n in nodes if n != my_node] or nodes
                node = remote[int(torch.randint(len(remote), (1,), generator=generator))]
                pool = [e for e in range(num_experts) if owner_node[e] == node]
            elif kind == "local":
                pool = [e for e in range(num_experts) if owner_node[e] == my_node]
            else:
                pool = list(range(num_experts))
            if len(pool) < k:
                pool = pool + [e for e in range(num_experts) if e not in pool]
            perm = torch.randperm(len(pool), generator=generator)[:k]
            choice = [pool[int(i)] for i in perm]
        out[s] = torch.tensor(choice)
    if kind == "dropped" and out.numel():
        out[torch.rand(out.shape, generator=generator) < 0.3] = -1
    return out


def reference_keep(expert_index: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """The gate's capacity rule by walking the priority order (choice, then token)."""
    kept = expert_index.clone()
    if capacity is None:
        return kept
    used: dict[int, int] = {}
    for j in range(expert_index.shape[1]):
        for s in range(expert_index.shape[0]):
            e = int(expert_index[s, j])
            if e < 0:
                continue
            used[e] = used.get(e, 0) + 1
            if used[e] > capacity:
                kept[s, j] = -1
    return kept


def dense(x: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[s, j] * x[s] @ maps[e_j]`` over kept choices."""
    out = x.new_zeros(x.shape)
    for s in range(x.shape[0]):
        for j in range(kept.shape[1]):
            e = int(kept[s, j])
            if e >= 0:
                out[s] = out[s] + weights[s, j] * (x[s] @ maps[e])
    return out


def run_experts(recv: torch.Tensor, counts: list[int], maps: list[torch.Tensor]) -> torch.Tensor:
    """Local expert i's linear map on its block of rows."""
    parts = torch.split(recv, counts)
    if not parts:
        return recv
    return torch.cat([part @ m for part, m in zip(parts, maps, strict=True)])


def expected_inter_rows(kept: torch.Tensor, owner_node: list[int], my_node: int, mode: str) -> int:
    """dedup: distinct (token, remote node) pairs; replicate: remote assignments."""
    pairs, assignments = set(), 0
    for s in range(kept.shape[0]):
        for e in kept[s].tolist():
            if e >= 0 and owner_node[e] != my_node:
                pairs.add((s, owner_node[e]))
                assignments += 1
    return len(pairs) if mode == "dedup" else assignments


def step(dispatcher: alltoall.ExpertDispatcher, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
         maps: list[torch.Tensor], capacity: int | None, probe: torch.Tensor):
    """One forward and backward; returns (out, handle, x.grad, weights.grad, map grads)."""
    x = x.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    maps = [m.clone().requires_grad_() for m in maps]
    recv, handle = dispatcher.dispatch(x, index, weights, capacity)
    out = dispatcher.combine(run_experts(recv, handle.counts_list, maps), handle)
    (out * probe).sum().backward()
    grads = [m.grad if m.grad is not None else torch.zeros_like(m) for m in maps]
    return out.detach(), handle, x.grad, weights.grad, grads
