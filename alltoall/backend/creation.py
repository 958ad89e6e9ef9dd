"""The creator torch.distributed calls for every "alltoall" process group
(the default group and each ``new_group``): it builds, eagerly and through
the group's own store, everything the C++ backend needs, so no call ever
creates a group.

For each device it serves (alltoall.backend.settings):

1. an inner backend over the whole group (gloo, NCCL, ...): every collective
   but all-to-all goes to it unchanged;
2. when the group's policy can use the hierarchical plan, its intra-node and
   inter-node subgroups, in that order on every rank;
3. a transport per group, chosen as the Communicator chooses (shared memory
   where every member shares a host and the tensors are in host memory, else
   the inner backend), the shared-memory segment agreed through the store;
4. the flat (and hierarchical) plans with a transport per phase.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch.distributed as dist
from torch._C._distributed_c10d import _DistributedBackendOptions

from alltoall._library import _C
from alltoall.backend.group_setup import GroupContext, create_inner, exchange_hosts, group_topology
from alltoall.backend.settings import Policy, log_enabled, resolve_algorithm, resolve_inner, resolve_policy
from alltoall.plan import make_plan
from alltoall.topology import Topology, host_name
from alltoall.transport import ShmMembers, create_shm_transport, resolve_transport, store_agreement, transport_kind

ROLES = ("world", "intra_node", "inter_node")


@dataclass
class DeviceParts:
    """What serves one device's tensors, kept for the log."""

    kind: str
    inner: dist.Backend
    helpers: list[dist.Backend] = field(default_factory=list)
    transports: dict[str, _C.Transport] = field(default_factory=dict)
    plans: dict[str, tuple[_C.ExchangePlan, list[_C.Transport]]] = field(default_factory=dict)


def role_members(topology: Topology, policy: Policy) -> dict[str, tuple[int, ...]]:
    """Group ranks of each group this rank joins: the whole group, and its
    node subgroups when the hierarchical plan may run."""
    members = {"world": tuple(range(topology.size))}
    if policy.uses_hierarchical:
        members["intra_node"] = topology.ranks_of_node(topology.node)
        members["inter_node"] = topology.ranks_with_local_rank(topology.local_rank)
    return members


def _build_device(ctx: GroupContext, device: str, kind: str, hosts: tuple[str, ...], topology: Topology,
                  policy: Policy, requested: str) -> DeviceParts:
    prefix = f"alltoall/{device}/"
    parts = DeviceParts(kind, create_inner(kind, ctx.prefixed(f"{prefix}world/"), ctx.global_ranks, ctx.rank,
                                           ctx, "world"))
    host_tensors = device == "cpu" and kind != "nccl"
    for role, ranks in role_members(topology, policy).items():
        if len(ranks) == 1:
            continue  # plans drop the phases of single-rank groups
        if role != "world" and len(ranks) == ctx.size:
            parts.transports[role] = parts.transports["world"]
            continue
        # Subgroups of one role are disjoint: their first rank names them.
        key = role if role == "world" else f"{role}/{ranks[0]}"
        name = ctx.name if role == "world" else f"{ctx.name}/{role}"
        global_ranks = tuple(ctx.global_ranks[r] for r in ranks)
        rank = ranks.index(ctx.rank)
        choice = transport_kind(name, global_ranks, [hosts[r] for r in ranks], requested, host_tensors)
        if choice == "shm":
            agree = store_agreement(ctx.store, f"{prefix}shm/{key}", ctx.timeout)
            members = ShmMembers(name, global_ranks, rank)
            parts.transports[role] = create_shm_transport(members, host_name(hosts[ranks[0]]), ctx.timeout, None,
                                                          agree)
            continue
        backend = parts.inner
        if role != "world":
            backend = create_inner(kind, ctx.prefixed(f"{prefix}{key}/"), global_ranks, rank, ctx, role)
            parts.helpers.append(backend)
        parts.transports[role] = _C.backend_transport(backend, name, list(global_ranks), ctx.timeout.total_seconds())
    for algorithm in ("flat", "hierarchical") if policy.uses_hierarchical else ("flat",):
        raw = make_plan(topology.node_of_rank, ctx.rank, algorithm)
        parts.plans[algorithm] = (raw, [parts.transports[phase.role] for phase in raw.phases])
    return parts


def describe(ctx: GroupContext, topology: Topology, policy: Policy, devices: dict[str, DeviceParts]) -> str:
    """The log line of one group."""
    shown = list(ctx.global_ranks[:16]) + (["..."] if ctx.size > 16 else [])
    lines = [f"alltoall backend: group '{ctx.name}', {ctx.size} ranks (global {shown}): {topology.describe()}; "
             f"{policy.reason}"]
    for device, parts in devices.items():
        plans = "; ".join(f"{alg} [{', '.join(f'{p.role}: {t.kind}' for p, t in zip(raw.phases, ts, strict=True))}]"
                          for alg, (raw, ts) in parts.plans.items())
        lines.append(f"  {device}: inner {parts.kind}; {plans}")
    return "\n".join(lines)


def create_backend(options: _DistributedBackendOptions, backend_options: object = None) -> _C.AlltoallBackend:
    """torch.distributed's creator of the "alltoall" backend (extended API).

    Called on every member of a new group, inside ``init_process_group`` or
    ``new_group``; ``backend_options`` (``pg_options``) is not used. Raises
    ValueError on a bad setting, naming it, before anything is created.
    """
    ctx = GroupContext.of(options)
    algorithm, requested, inner = resolve_algorithm(), resolve_transport(None), resolve_inner()
    hosts = exchange_hosts(ctx)
    topology = group_topology(ctx, hosts)
    policy = resolve_policy(algorithm, topology)
    backend = _C.AlltoallBackend(ctx.rank, ctx.size, ctx.name, ctx.timeout.total_seconds(), policy.equal_up_to,
                                 policy.uneven)
    devices: dict[str, DeviceParts] = {}
    for device, kind in inner.items():
        parts = _build_device(ctx, device, kind, hosts, topology, policy, requested)
        backend.add_device(device, parts.inner, parts.helpers, parts.plans)
        devices[device] = parts
    if log_enabled() and ctx.rank == 0:
        print(describe(ctx, topology, policy, devices), file=sys.stderr, flush=True)
    return backend
