"""Real clients, unmodified, switched by one string: DeepSpeed's MoE layer and
Megatron-Core's all-to-all on 8 ranks in emulated nodes of 4, once on plain
gloo and once on "alltoall". Forward and backward must be bit-identical, and
the alltoall run's counters must show the hierarchical plan ran.

To keep CI cheap, one job of the 8 pool ranks does both runs: the reference
on the pool's own gloo default group, then the switched run started the way
torchrun starts a client (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
environment): the gloo group is destroyed and the client creates the
default group itself with "alltoall". The clients keep their groups in
module globals, so the second run first forgets the first run's (they were
destroyed with it). Every client wait is bounded by CLIENT_TIMEOUT."""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import alltoall
from tests.harness.checks import assert_same_bytes
from tests.harness.pool import WorldPool

WORLD = 8
ENV = {"ALLTOALL_LOCAL_SIZE": "4", "ALLTOALL_ALGORITHM": "hierarchical"}
# The clients' own default is 30 minutes; a broken run must fail sooner.
CLIENT_TIMEOUT = timedelta(seconds=120)
# Both runs, and the first import of the client on 8 ranks sharing 2 cores.
DEADLINE_S = 420

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (make install adds the [clients] extra)")
needs_megatron = pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                                    reason="megatron-core is not installed (make install adds the [clients] extra)")


@pytest.fixture(scope="module")
def client_pool():
    """8 rank processes of their own, for both clients, closed after them: the
    clients' imports (and DeepSpeed's accelerator set-up) stay out of the
    processes the rest of the suite runs in."""
    pool = WorldPool(WORLD)
    yield pool
    pool.close()


def _launcher_env() -> dict[str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE":
            str(WORLD), **ENV}


def _as_torchrun_rank() -> int:
    """Leaves the current default group and sets what torchrun sets for this rank."""
    rank = dist.get_rank()
    dist.destroy_process_group()
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    return rank


def _stats_of(group: dist.ProcessGroup) -> dict | None:
    return alltoall.backend_stats(group) if dist.get_backend(group) == "alltoall" else None


def _both(run: Callable[[str], dict]) -> tuple[dict, dict]:
    """``run`` on the pool's gloo default group, then on an "alltoall"
    default group the client creates from torchrun's environment."""
    assert dist.get_backend() == "gloo"
    reference = run("gloo")
    _as_torchrun_rank()
    try:
        ours = run("alltoall")
    finally:
        # The pool restores only the variables it set; later tests must not
        # see a launcher.
        for key in ("RANK", "LOCAL_RANK"):
            os.environ.pop(key, None)
    return reference, ours


# DeepSpeed --------------------------------------------------------------------


def _forget_deepspeed_groups() -> None:
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()
    groups._WORLD_GROUP = None


def _without_deepspeed_shm_op() -> None:
    """On CPUs, DeepSpeed's init_distributed JIT-compiles its shared-memory
    all-reduce op (deepspeed_shm_comm, an inference fast path the MoE layer
    does not use): one rank compiles into ~/.cache/torch_extensions while the
    others wait on a file lock with no time limit. On 8 ranks sharing 2
    loaded cores that compile outlasted the test's deadline, and the rank
    killed mid-compile left the lock behind, so every later run waited
    forever. DeepSpeed asks its table of compatible ops first (built once per
    process and kept, so an edit persists); marking the op unavailable there
    makes it fall back to torch.distributed, as on a platform that cannot
    build it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _deepspeed_moe(backend: str) -> dict:
    import deepspeed
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    _without_deepspeed_shm_op()
    _forget_deepspeed_groups()
    # On the gloo run the default group exists and DeepSpeed adopts it; on the
    # alltoall run DeepSpeed creates it, as under torchrun.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=CLIENT_TIMEOUT)
    assert dist.get_backend() == backend
    rank = dist.get_rank()
    hidden, experts = 8, 8
    torch.manual_seed(0)  # the same gate and experts on every rank
    expert = torch.nn.Sequential(torch.nn.Linear(hidden, 16), torch.nn.GELU(), torch.nn.Linear(16, hidden))
    layer = MoE(hidden, expert, num_experts=experts, ep_size=WORLD, k=1, min_capacity=4, drop_tokens=False,
                use_rts=False)
    layer.set_deepspeed_parallelism()
    torch.manual_seed(100 + rank)  # different tokens on every rank
    x = torch.randn(2, 6, hidden, requires_grad=True)
    out, aux, counts = layer(x)
    (out.square().sum() + aux).backward()
    ep_group = groups._get_expert_parallel_group(f"ep_size_{WORLD}")
    return {"out": out.detach(), "aux": aux.detach(), "counts": counts, "x_grad": x.grad,
            "grads": {n: p.grad for n, p in layer.named_parameters()}, "stats": _stats_of(ep_group)}


def _deepspeed_both() -> tuple[dict, dict]:
    return _both(_deepspeed_moe)


def _compare(results: list[tuple[dict, dict]], keys: tuple[str, ...]) -> None:
    for rank, (a, b) in enumerate(results):
        for key in keys:
            if isinstance(a[key], dict):
                assert a[key].keys() == b[key].keys()
                for name in a[key]:
                    assert_same_bytes(b[key][name], a[key][name], f"rank {rank} {key} {name}")
            else:
                assert_same_bytes(b[key], a[key], f"rank {rank} {key}")


def _hierarchical_ran(stats: dict, at_least: int) -> None:
    hierarchical = stats["algorithms"]["hierarchical"]
    assert hierarchical["calls"] >= at_least, stats
    assert [p["role"] for p in hierarchical["phases"]] == ["intra_node", "inter_node"]
    assert all(p["calls"] == hierarchical["calls"] and p["bytes"] > 0 for p in hierarchical["phases"])
    assert stats["algorithms"]["flat"]["calls"] == 0


@needs_deepspeed
def test_deepspeed_moe_layer(client_pool):
    results = client_pool.run(_deepspeed_both, env=_launcher_env(), deadline_s=DEADLINE_S)
    _compare(results, ("out", "aux", "counts", "x_grad", "grads"))
    for reference, ours in results:
        assert reference["stats"] is None  # the reference ran on plain gloo
        # Two exchanges forward (dispatch, combine), two backward.
        _hierarchical_ran(ours["stats"], at_least=4)
        assert ours["stats"]["forwarded"] > 0  # the gate's all-reduce of the capacity, on the EP group


# Megatron-Core ----------------------------------------------------------------
# MoEAlltoAllTokenDispatcher runs on CPUs in its padded mode
# (moe_pad_expert_input_to_capacity): equal splits, and none of the CUDA
# stream synchronisation its dropless mode needs. Its constructor still
# creates a CUDA stream for that mode and caches it in a class attribute;
# CPU-only torch cannot create one, so the test presets the attribute. The
# uneven all-to-all the dropless mode makes (tensor_parallel.all_to_all)
# cannot run on CPUs: Megatron-Core 0.16.1 allocates its output on
# torch.cuda.current_device(). Uneven splits are checked against gloo in
# test_backend_exchange.py instead.

HIDDEN, EXPERTS, TOKENS, TOPK = 8, 16, 12, 2


def _routing(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, and a top-2 routing of them, as a router hands them over."""
    torch.manual_seed(100 + rank)
    tokens = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    logits = torch.randn(TOKENS, EXPERTS, requires_grad=True)
    top = torch.softmax(logits, dim=-1).topk(TOPK, dim=-1)
    routing_map = torch.zeros(TOKENS, EXPERTS, dtype=torch.bool).scatter(1, top.indices, True)
    probs = torch.zeros(TOKENS, EXPERTS).scatter(1, top.indices, top.values)
    return tokens, logits, routing_map, probs


def _megatron_moe(backend: str) -> dict:
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.destroy_model_parallel()  # the previous run's groups died with its default group
    if not dist.is_initialized():
        # As Megatron-LM's initialize does, from torchrun's environment.
        dist.init_process_group(backend, timeout=CLIENT_TIMEOUT)
    assert dist.get_backend() == backend
    rank = dist.get_rank()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=WORLD)
    ep_group = parallel_state.get_expert_model_parallel_group()
    if not torch.cuda.is_available() and MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is None:
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "no CUDA: the padded mode never uses it"
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, num_moe_experts=EXPERTS,
                               moe_router_topk=TOPK, moe_token_dispatcher_type="alltoall",
                               moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True,
                               use_cpu_initialization=True)
    local = EXPERTS // WORLD
    dispatcher = MoEAlltoAllTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), config,
                                            ProcessGroupCollection.use_mpu_process_groups())
    tokens, logits, routing_map, probs = _routing(rank)
    hidden, p = dispatcher.dispatch_preprocess(tokens, routing_map, probs)
    hidden, p = dispatcher.token_dispatch(hidden, p)
    hidden, tokens_per_expert, p = dispatcher.dispatch_postprocess(hidden, p)
    torch.manual_seed(7)
    expert_weight = torch.randn(HIDDEN, HIDDEN)  # one linear "expert", the same on every rank
    expert_out = (hidden @ expert_weight) * p.unsqueeze(-1)
    out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(expert_out)))
    out.square().sum().backward()
    return {"out": out.detach(), "tokens_per_expert": tokens_per_expert, "tokens_grad": tokens.grad,
            "logits_grad": logits.grad, "stats": _stats_of(ep_group)}


def _megatron_both() -> tuple[dict, dict]:
    return _both(_megatron_moe)


@needs_megatron
def test_megatron_core_alltoall_dispatcher(client_pool):
    results = client_pool.run(_megatron_both, env=_launcher_env(), deadline_s=DEADLINE_S)
    _compare(results, ("out", "tokens_per_expert", "tokens_grad", "logits_grad"))
    for reference, result in results:
        assert reference["stats"] is None
        # Dispatch and combine move tokens and probabilities: 3 forward, 3 backward.
        _hierarchical_ran(result["stats"], at_least=6)
