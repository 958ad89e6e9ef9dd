"""Megatron-Core's flex token dispatcher on alltoall's deduplicating dispatcher.

One call before the model is built::

    import alltoall.integrations.megatron as alltoall_megatron
    alltoall_megatron.enable()
    config = TransformerConfig(..., moe_token_dispatcher_type="flex",
                               moe_flex_dispatcher_backend="alltoall")

after which Megatron-Core's ``MoEFlexTokenDispatcher`` built with
``moe_flex_dispatcher_backend="alltoall"`` runs on ``AlltoallDispatchManager``
(``alltoall.integrations._megatron_manager``): DeepEP's role, on any
torch.distributed backend and device. Every other backend ("deepep",
"hybridep") goes through Megatron's own constructor, unchanged.

``enable`` refuses (RuntimeError naming the version) a Megatron-Core version
other than the tested ones, before changing anything: the manager subclasses
a private Megatron-Core class (``_DispatchManager``) and re-creates the part
of ``MoEFlexTokenDispatcher.__init__`` that selects it, both of which
Megatron-Core may change in any release. ``disable`` restores Megatron's
constructor.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from typing import Any

BACKEND = "alltoall"
# The Megatron-Core versions this integration was run against
# (tests/backend/test_megatron_flex.py).
TESTED_VERSIONS = ("0.16.1",)
MODES = ("auto", "dedup", "replicate")

# The interface the manager relies on, checked by enable() as well as the version.
_MANAGER_METHODS = {"setup_metadata", "dispatch", "combine", "get_permuted_hidden_states_by_experts",
                    "get_restored_hidden_states_by_experts"}
_FLEX_INIT_PARAMS = ["self", "num_local_experts", "local_expert_indices", "config", "pg_collection"]

_state: dict[str, Any] = {"original_init": None, "mode": "auto"}


def installed_version() -> str | None:
    """The installed megatron-core's version, or None when it is not installed."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_interface(version: str) -> None:
    """RuntimeError naming ``version`` unless the flex dispatcher's manager
    interface is the one this module was written against."""
    try:
        from megatron.core.transformer.moe import token_dispatcher as td
    except ImportError as e:
        raise RuntimeError(f"megatron-core {version}: cannot import its token dispatchers ({e})") from e
    missing = []
    manager = getattr(td, "_DispatchManager", None)
    if manager is None:
        missing.append("_DispatchManager")
    else:
        missing += sorted(_MANAGER_METHODS - set(getattr(manager, "__abstractmethods__", ())))
    flex = getattr(td, "MoEFlexTokenDispatcher", None)
    if flex is None:
        missing.append("MoEFlexTokenDispatcher")
    else:
        init = _state["original_init"] or flex.__init__
        if list(inspect.signature(init).parameters) != _FLEX_INIT_PARAMS:
            missing.append(f"MoEFlexTokenDispatcher.__init__{_FLEX_INIT_PARAMS[1:]}")
    if missing:
        raise RuntimeError(f"megatron-core {version}: the flex token dispatcher's interface differs from the "
                           f"tested one ({', '.join(TESTED_VERSIONS)}): missing {', '.join(missing)}")


def enable(mode: str = "auto") -> None:
    """Adds ``moe_flex_dispatcher_backend="alltoall"`` to Megatron-Core's flex
    token dispatcher. Call it once per process, before the model is built;
    calling it again only changes ``mode``.

    Args:
        mode: the ``ExpertDispatcher`` mode of the manager: ``"auto"`` (its
            rule, from the topology and k), ``"dedup"`` (one row per token and
            destination rank, one per destination node across the network;
            ValueError at model build on non-uniform nodes) or
            ``"replicate"`` (one row per token and expert).

    Raises:
        ValueError: ``mode`` is not one of the above.
        RuntimeError: megatron-core is not installed, or its version is not a
            tested one, or its flex dispatcher's interface differs. Nothing
            is changed then.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {MODES}")
    version = installed_version()
    if version is None:
        raise RuntimeError("megatron-core is not installed (pip install 'alltoall[clients]' installs "
                           f"the tested version {TESTED_VERSIONS[-1]})")
    if version not in TESTED_VERSIONS:
        raise RuntimeError(f"megatron-core {version} is not a tested version ({', '.join(TESTED_VERSIONS)}): "
                           "the flex dispatcher's manager interface is private to Megatron-Core and this "
                           f"integration re-creates part of it; install megatron-core=={TESTED_VERSIONS[-1]}")
    _check_interface(version)
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher

    _state["mode"] = mode
    if _state["original_init"] is None:
        _state["original_init"] = MoEFlexTokenDispatcher.__init__
        MoEFlexTokenDispatcher.__init__ = _wrap_init(_state["original_init"])


def enabled() -> bool:
    """Whether ``enable`` has added the backend (and ``disable`` not removed it)."""
    return _state["original_init"] is not None


def disable() -> None:
    """Restores Megatron-Core's own ``MoEFlexTokenDispatcher.__init__`` and
    drops the shared dispatchers. Dispatchers already built keep working."""
    if _state["original_init"] is None:
        return
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher

    from alltoall.integrations._megatron_manager import forget_dispatchers

    MoEFlexTokenDispatcher.__init__ = _state["original_init"]
    _state["original_init"] = None
    forget_dispatchers()


def _wrap_init(original):
    """MoEFlexTokenDispatcher.__init__ that builds our manager for
    ``moe_flex_dispatcher_backend == "alltoall"`` and leaves every other
    backend to Megatron's constructor."""
    from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

    from alltoall.integrations._megatron_manager import AlltoallDispatchManager

    @functools.wraps(original)
    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None):
        if getattr(config, "moe_flex_dispatcher_backend", None) != BACKEND:
            return original(self, num_local_experts, local_expert_indices, config, pg_collection)
        # What MoEFlexTokenDispatcher.__init__ of 0.16.1 does, with our
        # manager in place of DeepEP's, built with DeepEP's arguments.
        MoETokenDispatcher.__init__(self, config=config, pg_collection=pg_collection)
        self.num_local_experts = num_local_experts
        self.local_expert_indices = local_expert_indices
        if self.tp_size * self.ep_size <= 1:
            raise ValueError(f"the flex token dispatcher needs TPxEP > 1 (tp={self.tp_size}, ep={self.ep_size})")
        self._comm_manager = AlltoallDispatchManager(
            group=self.tp_ep_group,
            num_local_experts=self.num_local_experts,
            router_topk=self.tp_size * self.config.moe_router_topk,
            num_experts=self.tp_size * self.config.num_moe_experts,
            config=self.config,
            mode=_state["mode"],
        )
        self.cudagraph_attrs = ["_comm_manager.token_probs", "_comm_manager.token_indices"]

    __init__._alltoall_wrapped = True
    return __init__
