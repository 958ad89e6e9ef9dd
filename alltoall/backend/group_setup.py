"""What a new alltoall group learns and builds through its own store while
torch creates it: its members' hosts, its topology, and inner backends for
itself and its node subgroups. Nothing here runs a collective on any group,
so groups can be created in any order frameworks choose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist
from torch._C._distributed_c10d import _DistributedBackendOptions

from alltoall.topology import Topology, emulated_local_size, host_identity, host_name

HOST_KEY = "alltoall/host/"


@dataclass(frozen=True)
class GroupContext:
    """A group being created, as torch hands it to the backend's creator."""

    name: str
    store: dist.Store
    rank: int
    size: int
    global_ranks: tuple[int, ...]
    timeout: timedelta

    @classmethod
    def of(cls, options: _DistributedBackendOptions) -> GroupContext:
        size = options.group_size
        # The default group is created with no member list: it is every rank.
        ranks = tuple(options.global_ranks_in_group) or tuple(range(size))
        return cls(str(options.group_id), options.store, options.group_rank, size, ranks, options.timeout)

    def prefixed(self, prefix: str) -> dist.Store:
        return dist.PrefixStore(prefix, self.store)


def exchange_hosts(ctx: GroupContext) -> tuple[str, ...]:
    """Every member's host identity, in group order, through the store."""
    ctx.store.set(f"{HOST_KEY}{ctx.rank}", host_identity())
    keys = [f"{HOST_KEY}{r}" for r in range(ctx.size)]
    try:
        ctx.store.wait(keys, ctx.timeout)
    except RuntimeError as error:
        raise RuntimeError(f"alltoall backend, group '{ctx.name}' (global ranks {list(ctx.global_ranks)}): not "
                           f"every member published its host within {ctx.timeout}: {error}") from None
    return tuple(ctx.store.get(k).decode() for k in keys)


def group_topology(ctx: GroupContext, hosts: Sequence[str]) -> Topology:
    """Nodes by host name, or emulated ones of ``ALLTOALL_LOCAL_SIZE``
    consecutive global ranks, so every group of a job sees the same nodes."""
    local_size = emulated_local_size()
    if local_size is not None:
        if local_size < 1:
            raise ValueError(f"ALLTOALL_LOCAL_SIZE={local_size} must be at least 1")
        return Topology.from_node_ids([g // local_size for g in ctx.global_ranks], ctx.rank, emulated=True)
    return Topology.from_node_ids([host_name(h) for h in hosts], ctx.rank)


def create_inner(kind: str, store: dist.Store, global_ranks: Sequence[int], rank: int, ctx: GroupContext,
                 label: str) -> dist.Backend:
    """An inner backend of ``kind`` for the members ``global_ranks`` (this
    process is their ``rank``), over ``store`` (a prefix of the group's own),
    as torch would create it. Collective over those members only, through the
    store; NCCL connects lazily, at its first collective."""
    size = len(global_ranks)
    if kind == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, ctx.timeout)
    if kind == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = ctx.timeout
        options.is_high_priority_stream = False
        options.group_name = f"{ctx.name}/{label}"
        options.global_ranks_in_group = list(global_ranks)
        return dist.ProcessGroupNCCL(store, rank, size, options)
    plugin = dist.Backend._plugins[kind.upper()]
    if not plugin.extended_api:
        return plugin.creator_fn(store, rank, size, ctx.timeout)
    options = _DistributedBackendOptions()
    options.store, options.group_rank, options.group_size = store, rank, size
    options.timeout, options.group_id = ctx.timeout, f"{ctx.name}/{label}"
    options.global_ranks_in_group = list(global_ranks)
    return plugin.creator_fn(options, None)
