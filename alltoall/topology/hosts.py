"""Which real host each rank runs on: the identity that decides whether a
group's members can share memory. Unlike a Topology's nodes, it is never
emulated: ranks cut into emulated nodes on one machine still share a host.
"""

from __future__ import annotations

import os
import socket
from functools import cache

import torch.distributed as dist

HOSTNAME_ENV = "ALLTOALL_HOSTNAME"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


@cache
def _boot_id() -> str:
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return "no-boot-id"


def host_identity() -> str:
    """This process's host: its host name (``ALLTOALL_HOSTNAME`` overrides it)
    and the kernel's boot id, so two machines that share a name differ."""
    return f"{os.environ.get(HOSTNAME_ENV) or socket.gethostname()}#{_boot_id()}"


def host_name(identity: str) -> str:
    """The host name part of an identity, for messages."""
    return identity.split("#", 1)[0]


def detect_hosts(group: dist.ProcessGroup | None = None) -> tuple[str, ...]:
    """The host identity of every rank of ``group``, in group order.
    Collective over the group (one all-gather)."""
    hosts: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, host_identity(), group=group)
    return tuple(str(h) for h in hosts)
