"""What the "alltoall" backend reads from the environment, and the rule that
turns the requested algorithm and a group's topology into its policy.

- ``ALLTOALL_ALGORITHM``: "auto" (default), "flat" or "hierarchical".
- ``ALLTOALL_INNER_BACKEND``: the backend the wrapper forwards to, one name
  for every device ("gloo") or per device ("cpu:gloo,cuda:nccl", the
  default). A CUDA side exists only when CUDA (and for NCCL, NCCL) is
  available.
- ``ALLTOALL_TRANSPORT``: what carries each phase (alltoall.transport).
- ``ALLTOALL_LOCAL_SIZE``: emulated nodes of that many consecutive global
  ranks.
- ``ALLTOALL_LOG=1``: each group's rank 0 prints its topology and choice once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from alltoall.ops import selection
from alltoall.topology import Topology

BACKEND_NAME = "alltoall"
ALGORITHM_ENV = "ALLTOALL_ALGORITHM"
INNER_ENV = "ALLTOALL_INNER_BACKEND"
LOG_ENV = "ALLTOALL_LOG"
ALGORITHMS = ("auto", "flat", "hierarchical")
DEVICES = ("cpu", "cuda")
DEFAULT_INNER = {"cpu": "gloo", "cuda": "nccl"}
ALWAYS = 2**63 - 1  # bytes per peer: "every size"


def resolve_algorithm() -> str:
    raw = os.environ.get(ALGORITHM_ENV) or "auto"
    if raw not in ALGORITHMS:
        raise ValueError(f"{ALGORITHM_ENV}={raw!r} is not one of {', '.join(ALGORITHMS)}")
    return raw


def _device_available(device: str, inner: str) -> bool:
    if device == "cpu":
        return True
    return torch.cuda.is_available() and (inner != "nccl" or dist.is_nccl_available())


def resolve_inner() -> dict[str, str]:
    """Device type -> inner backend name, for the devices this process can serve."""
    raw = os.environ.get(INNER_ENV, "").strip().lower()
    if not raw:
        wanted = dict(DEFAULT_INNER)
    elif ":" in raw:
        wanted = {}
        for pair in raw.split(","):
            device, _, name = pair.partition(":")
            device, name = device.strip(), name.strip()
            if device not in DEVICES or not name or device in wanted:
                raise ValueError(f"{INNER_ENV}={raw!r}: expected 'gloo' or 'cpu:gloo,cuda:nccl' "
                                 f"(devices {', '.join(DEVICES)}, each once); {pair!r} is not valid")
            wanted[device] = name
    else:
        wanted = dict.fromkeys(DEVICES, raw)
    for device, name in wanted.items():
        if name == BACKEND_NAME:
            raise ValueError(f"{INNER_ENV}={raw!r}: the alltoall backend cannot wrap itself ({device}:{name})")
        if name not in ("gloo", "nccl") and name.upper() not in dist.Backend._plugins:
            raise ValueError(f"{INNER_ENV}={raw!r}: {name!r} is neither gloo, nccl nor a registered backend")
    explicit = bool(raw)
    served = {d: n for d, n in wanted.items() if _device_available(d, n)}
    if explicit and "cuda" in wanted and "cuda" not in served and torch.cuda.is_available():
        raise ValueError(f"{INNER_ENV}={raw!r}: {wanted['cuda']} is not available for CUDA tensors in this torch")
    return served


def log_enabled() -> bool:
    return os.environ.get(LOG_ENV, "") not in ("", "0")


@dataclass(frozen=True)
class Policy:
    """When a group's exchanges take the hierarchical plan.

    Attributes:
        equal_up_to: equal splits go hierarchical up to this many bytes per
            peer; -1 never.
        uneven: uneven splits (decided on the topology alone) go hierarchical.
        reason: one line for the log.
    """

    equal_up_to: int
    uneven: bool
    reason: str

    @property
    def uses_hierarchical(self) -> bool:
        return self.equal_up_to >= 0 or self.uneven


def resolve_policy(algorithm: str, topology: Topology) -> Policy:
    """The policy of a group: "flat" always; "hierarchical" wherever the
    group's nodes are of equal size (else flat, and the log says why);
    "auto" by alltoall.ops.selection, the Communicator's rule."""
    if algorithm == "flat":
        return Policy(-1, False, f"flat ({ALGORITHM_ENV}=flat)")
    if algorithm == "hierarchical":
        if topology.uniform and topology.size > 1:
            return Policy(ALWAYS, True, f"hierarchical ({ALGORITHM_ENV}=hierarchical)")
        return Policy(-1, False, f"flat: {ALGORITHM_ENV}=hierarchical needs nodes of equal size, this group's "
                                 f"are {list(topology.node_sizes)}")
    limit = selection.hierarchical_up_to(topology)
    if limit is None:
        why = "emulated nodes" if topology.emulated else "no hierarchy of two or more equal nodes of 2+ ranks"
        return Policy(-1, False, f"auto: flat ({why})")
    uneven = selection.choose(topology, None) == "hierarchical"
    return Policy(limit, uneven, f"auto: hierarchical up to {limit} bytes per peer, flat above; uneven splits "
                                 f"{'hierarchical' if uneven else 'flat'}")
