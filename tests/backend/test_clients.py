"""Real clients, unmodified, switched by one string: DeepSpeed's MoE layer and
Megatron-Core's all-to-all on 8 ranks in emulated nodes of 4, once on plain
gloo and once on "alltoall". Forward and backward must be bit-identical, and
the alltoall run's counters must show the hierarchical plan ran.

Each run starts the way the client is started under torchrun (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment): the pool's own
default group is destroyed and the client creates the default group itself
with the backend under test. The clients keep their groups in module
globals, so each run first forgets the previous run's (the groups were
destroyed with it)."""

from __future__ import annotations

import importlib.util
import os
import socket

import pytest
import torch
import torch.distributed as dist

import alltoall
from tests.harness.checks import assert_same_bytes

WORLD = 8
ENV = {"ALLTOALL_LOCAL_SIZE": "4", "ALLTOALL_ALGORITHM": "hierarchical"}

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (make install adds the [clients] extra)")
needs_megatron = pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                                    reason="megatron-core is not installed (make install adds the [clients] extra)")


def _launcher_env() -> dict[str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE":
            str(WORLD), **ENV}


def _as_torchrun_rank() -> int:
    """Leaves the pool's group and sets what torchrun sets for this rank."""
    rank = dist.get_rank()
    dist.destroy_process_group()
    os.environ["RANK"] = os.environ["LOCAL_RANK"] = str(rank)
    return rank


def _stats_of(group: dist.ProcessGroup) -> dict | None:
    return alltoall.backend_stats(group) if dist.get_backend(group) == "alltoall" else None


# DeepSpeed --------------------------------------------------------------------


def _forget_deepspeed_groups() -> None:
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        getattr(groups, name).clear()
    groups._WORLD_GROUP = None


def _deepspeed_moe(backend: str) -> dict:
    import deepspeed
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    rank = _as_torchrun_rank()
    _forget_deepspeed_groups()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    assert dist.get_backend() == backend
    hidden, experts = 16, 16
    torch.manual_seed(0)  # the same gate and experts on every rank
    expert = torch.nn.Sequential(torch.nn.Linear(hidden, 32), torch.nn.GELU(), torch.nn.Linear(32, hidden))
    layer = MoE(hidden, expert, num_experts=experts, ep_size=WORLD, k=1, min_capacity=4, drop_tokens=False,
                use_rts=False)
    layer.set_deepspeed_parallelism()
    torch.manual_seed(100 + rank)  # different tokens on every rank
    x = torch.randn(4, 6, hidden, requires_grad=True)
    out, aux, counts = layer(x)
    (out.square().sum() + aux).backward()
    ep_group = groups._get_expert_parallel_group(f"ep_size_{WORLD}")
    return {"out": out.detach(), "aux": aux.detach(), "counts": counts, "x_grad": x.grad,
            "grads": {n: p.grad for n, p in layer.named_parameters()}, "stats": _stats_of(ep_group),
            "world_stats": _stats_of(dist.group.WORLD)}


def _compare(reference: list[dict], ours: list[dict], keys: tuple[str, ...]) -> None:
    for rank, (a, b) in enumerate(zip(reference, ours, strict=True)):
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
@pytest.mark.skip(reason="not passing yet: on a loaded 2-core machine even the plain-gloo reference run did not "
                         "finish within 400 s (first run, 15:36); to debug before merging (issue 11)")
def test_deepspeed_moe_layer(world_pools):
    reference = world_pools.run(WORLD, _deepspeed_moe, "gloo", env=_launcher_env(), deadline_s=400)
    ours = world_pools.run(WORLD, _deepspeed_moe, "alltoall", env=_launcher_env(), deadline_s=400)
    _compare(reference, ours, ("out", "aux", "counts", "x_grad", "grads"))
    for result in ours:
        # Two exchanges forward (dispatch, combine), two backward.
        _hierarchical_ran(result["stats"], at_least=4)
        assert result["stats"]["forwarded"] > 0  # the gate's all-reduce of the capacity


# Megatron-Core ----------------------------------------------------------------
# MoEAlltoAllTokenDispatcher runs on CPUs in its padded mode
# (moe_pad_expert_input_to_capacity): equal splits, and none of the CUDA
# stream synchronisation its dropless mode needs. Its constructor still
# creates a CUDA stream for that mode and caches it in a class attribute;
# CPU-only torch cannot create one, so the test presets the attribute. Uneven
# splits go through Megatron-Core's autograd all-to-all
# (tensor_parallel.all_to_all), the call the dropless mode makes.

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
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
    from megatron.core.transformer.transformer_config import TransformerConfig

    rank = _as_torchrun_rank()
    parallel_state.destroy_model_parallel()  # the previous run's groups died with its default group
    dist.init_process_group(backend)  # as Megatron-LM's initialize does, from torchrun's environment
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
    padded_calls = _stats_of(ep_group)

    ins = [(rank + d) % 3 for d in range(WORLD)]
    outs = [(s + rank) % 3 for s in range(WORLD)]
    torch.manual_seed(200 + rank)
    rows = torch.randn(sum(ins), HIDDEN, requires_grad=True)
    received = tensor_parallel.all_to_all(ep_group, rows, outs, ins)
    (received * torch.arange(received.numel()).view_as(received)).sum().backward()
    return {"out": out.detach(), "tokens_per_expert": tokens_per_expert, "tokens_grad": tokens.grad,
            "logits_grad": logits.grad, "received": received.detach(), "rows_grad": rows.grad,
            "padded_stats": padded_calls, "stats": _stats_of(ep_group)}


@needs_megatron
@pytest.mark.skip(reason="not run yet in the pool (the dispatcher's padded mode was checked on 2 gloo ranks by "
                         "hand); to run before merging (issue 11)")
def test_megatron_core_alltoall_dispatcher(world_pools):
    reference = world_pools.run(WORLD, _megatron_moe, "gloo", env=_launcher_env(), deadline_s=400)
    ours = world_pools.run(WORLD, _megatron_moe, "alltoall", env=_launcher_env(), deadline_s=400)
    _compare(reference, ours, ("out", "tokens_per_expert", "tokens_grad", "logits_grad", "received", "rows_grad"))
    for result in ours:
        # Dispatch and combine move tokens and probabilities: 3 forward, 3 backward.
        _hierarchical_ran(result["padded_stats"], at_least=6)
        _hierarchical_ran(result["stats"], at_least=result["padded_stats"]["algorithms"]["hierarchical"]["calls"] + 2)
