"""Megatron-Core's flex token dispatcher on our manager
(``alltoall.integrations.megatron``), against Megatron-Core's own
``MoEAlltoAllTokenDispatcher`` with the same routing, on 8 gloo ranks in
emulated nodes of 4.

Each run builds both dispatchers in the same 8 processes, after
``parallel_state.initialize_model_parallel(expert_model_parallel_size=8)``,
routes the same tokens with the same logits (Megatron's top-k, and for the
padded mode its ``apply_router_token_dropping``), runs dispatch, one linear
expert per global expert scaled by the dispatched probabilities (as
Megatron's experts apply them), combine, and a backward; outputs, tokens
per expert, and the gradients of the tokens, the router logits and the
experts must agree within fp tolerance (the order of summation differs).

Megatron-Core's alltoall dispatcher runs on CPUs only in its padded mode.
Its dropless mode copies the split sizes to the host on a CUDA side stream
and allocates the uneven all-to-all's output on ``torch.cuda.current_device()``;
the dropless reference here (``alltoall.testing.megatron_cpu.host_splits_alltoall``) does the copy's effect
(numpy arrays of the split sizes) and allocates on the CPU, and is otherwise Megatron's code.
Megatron's MoELayer (TopKRouter, SequentialMLP) runs both ways as well
(``test_moe_layer_flex_on_alltoall``).

The flex dispatcher runs unmodified, but for its ``dispatch_preprocess``,
which Megatron decorates with ``torch.compile``: the test runs it eagerly
(``torch._dynamo.config.disable``), since compiling on 8 ranks sharing 2
cores would take most of the time budget.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist

from alltoall.testing.megatron_cpu import cpu_as_current_device, eager, host_splits_alltoall
from tests.harness.pool import WorldPool

WORLD = 8
LOCAL_SIZE = 4
ENV = {"ALLTOALL_LOCAL_SIZE": str(LOCAL_SIZE)}
HIDDEN, EXPERTS, TOKENS = 8, 16, 24
LOCAL = EXPERTS // WORLD  # experts per rank at TP=1, EP=8
CAPACITY_FACTOR = 1.0
RTOL, ATOL = 1e-5, 1e-6
DEADLINE_S = 300

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                                reason="megatron-core is not installed (make install adds the [clients] extra)")


@pytest.fixture(scope="module")
def megatron_pool():
    """8 rank processes of their own, so Megatron's imports and module
    state stay out of the processes the rest of the suite runs in."""
    pool = WorldPool(WORLD)
    yield pool
    pool.close()


# In the rank processes ---------------------------------------------------------


def _config(k: int, dispatcher: str, pad: bool, tp: int = 1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=tp, num_moe_experts=EXPERTS,
                             tensor_model_parallel_size=tp, expert_model_parallel_size=WORLD // tp,
                             sequence_parallel=tp > 1, add_bias_linear=False,
                             moe_router_topk=k, moe_token_dispatcher_type=dispatcher,
                             moe_flex_dispatcher_backend="alltoall",
                             moe_expert_capacity_factor=CAPACITY_FACTOR if pad else None,
                             moe_pad_expert_input_to_capacity=pad, use_cpu_initialization=True)


def _route(logits: torch.Tensor, k: int, pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's top-k routing, differentiable in ``logits``; padded: its
    capacity rule, which fills every expert to capacity."""
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    scores = torch.softmax(logits, dim=-1)
    top = scores.topk(k, dim=-1)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top.indices, True)
    probs = torch.zeros_like(scores).scatter(1, top.indices, top.values)
    if pad:
        probs, routing_map = apply_router_token_dropping(probs, routing_map, k, CAPACITY_FACTOR, pad_to_capacity=True)
    return probs, routing_map


def _drive(dispatcher, k: int, pad: bool) -> dict:
    """Dispatch, experts, combine and backward through ``dispatcher``, on
    this rank's tokens (different on every rank, TP ranks included: Megatron
    runs MoE with TP under sequence parallelism). Expert e is one linear map,
    cut into one term per TP rank (its partial output, which the combine
    sums, as expert tensor parallelism's row-parallel second layer does)."""
    from megatron.core import parallel_state

    rank = dist.get_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    tp_rank = parallel_state.get_expert_tensor_parallel_rank()
    tp = parallel_state.get_expert_tensor_parallel_world_size()
    local = dispatcher.num_local_experts
    torch.manual_seed(100 + rank)
    tokens = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    logits = torch.randn(TOKENS, EXPERTS, requires_grad=True)
    target = torch.randn(TOKENS, HIDDEN)
    torch.manual_seed(7)  # the same experts on every rank
    weights = torch.randn(EXPERTS, tp, HIDDEN, HIDDEN)[ep_rank * local:(ep_rank + 1) * local, tp_rank]
    weights = weights.clone().requires_grad_()
    probs, routing_map = _route(logits, k, pad)

    hidden, p = dispatcher.dispatch_preprocess(tokens, routing_map, probs)
    hidden, p = dispatcher.token_dispatch(hidden, p)
    manager = getattr(dispatcher, "_comm_manager", None)
    sent = dict(manager.handle.sent) if manager is not None else None  # this dispatch's rows and bytes
    hidden, tokens_per_expert, p = dispatcher.dispatch_postprocess(hidden, p)
    rows = torch.split(hidden, tokens_per_expert.tolist())
    expert_out = torch.cat([r @ weights[e] for e, r in enumerate(rows)]) * p.unsqueeze(-1).to(hidden.dtype)
    out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(expert_out)))
    (out * target).sum().backward()
    return {"out": out.detach(), "tokens_per_expert": tokens_per_expert.clone(), "tokens_grad": tokens.grad,
            "logits_grad": logits.grad, "expert_grad": weights.grad, "routing_map": routing_map,
            "sent": sent}


def _expected_rows_inter(routing_map: torch.Tensor, tp: int, tp_ep_rank: int) -> int:
    """Rows this rank sends across the network when each token crosses once
    per remote node that holds one of its experts. Expert e's EP rank has tp
    ranks (TPxEP group ranks ep * tp + t), each of which gets the token;
    nodes are LOCAL_SIZE consecutive TPxEP group ranks."""
    local = EXPERTS // (WORLD // tp)
    nodes = WORLD // LOCAL_SIZE
    per_node = torch.zeros(TOKENS, nodes, dtype=torch.bool)
    token, expert = torch.nonzero(routing_map, as_tuple=True)
    for t in range(tp):
        per_node[token, (expert // local * tp + t) // LOCAL_SIZE] = True
    per_node[:, tp_ep_rank // LOCAL_SIZE] = False
    return int(per_node.sum())


def _compare_run(k: int, pad: bool, tp: int = 1) -> dict:
    """At k = 8 through "auto" (its rule picks dedup there); at k = 2, where
    "auto" picks replicate, with mode "dedup" named."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher, MoEFlexTokenDispatcher

    import alltoall.integrations.megatron as alltoall_megatron

    alltoall_megatron.enable(mode="auto" if k == 8 else "dedup")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=WORLD // tp)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    num_local = EXPERTS // (WORLD // tp)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    local = list(range(ep_rank * num_local, (ep_rank + 1) * num_local))
    tp_ep_rank = dist.get_rank(groups.tp_ep)
    reference_type = MoEAlltoAllTokenDispatcher if pad else host_splits_alltoall()
    try:
        with cpu_as_current_device():
            reference = _drive(reference_type(num_local, local, _config(k, "alltoall", pad, tp), groups), k, pad)
        flex = MoEFlexTokenDispatcher(num_local, local, _config(k, "flex", pad, tp), groups)
        expert_dispatcher = flex._comm_manager.dispatcher
        before = expert_dispatcher.stats()
        with eager():
            ours = _drive(flex, k, pad)
        after = expert_dispatcher.stats()
    finally:
        alltoall_megatron.disable()
        parallel_state.destroy_model_parallel()
    return {"reference": reference, "ours": ours, "mode": expert_dispatcher.mode,
            "stats_delta": {key: after[key] - before.get(key, 0) for key in after},
            "expected_rows_inter": _expected_rows_inter(ours["routing_map"], tp, tp_ep_rank),
            "manager": type(flex._comm_manager).__name__}


# The tests ---------------------------------------------------------------------


# TP=2 x EP=4 only padded: the dropless reference's all-gather over TP has
# uneven sizes, which gloo's allgather refuses.
RUNS = [(2, 1, False), (8, 1, False), (2, 1, True), (8, 1, True), (8, 2, True)]


@pytest.mark.parametrize(("k", "tp", "pad"), RUNS,
                         ids=[f"k{k}-{'tp2xep4' if tp > 1 else 'ep8'}-{'padded' if pad else 'dropless'}"
                              for k, tp, pad in RUNS])
def test_flex_on_alltoall_matches_megatron_alltoall(megatron_pool, k, tp, pad):
    results = megatron_pool.run(_compare_run, k, pad, tp, env=ENV, deadline_s=DEADLINE_S)
    for rank, result in enumerate(results):
        assert result["manager"] == "AlltoallDispatchManager"
        reference, ours = result["reference"], result["ours"]
        assert torch.equal(ours["routing_map"], reference["routing_map"]), f"rank {rank}: routing differs"
        assert torch.equal(ours["tokens_per_expert"], reference["tokens_per_expert"]), f"rank {rank}"
        if pad:  # every local expert gets capacity rows from each of the 8 ranks
            capacity = -(-TOKENS * k // EXPERTS)
            assert ours["tokens_per_expert"].tolist() == [capacity * WORLD] * (EXPERTS // (WORLD // tp))
        for key in ("out", "tokens_grad", "logits_grad", "expert_grad"):
            torch.testing.assert_close(ours[key], reference[key], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, key=key, rank=rank: f"rank {rank} {key}: {m}")
        # The dedup path ran: one row per (token, remote node) crossed the network.
        assert result["mode"] == "dedup"
        sent = ours["sent"]
        assert sent["rows_inter"] == result["expected_rows_inter"], (rank, sent)
        assert result["stats_delta"]["rows_inter"] >= sent["rows_inter"] > 0, (rank, result["stats_delta"])


def _other_backends() -> dict:
    """What Megatron's own constructor does for every other backend, with
    the integration enabled and after it is disabled."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher

    import alltoall.integrations.megatron as alltoall_megatron

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=WORLD)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    rank = dist.get_rank()
    local = list(range(rank * LOCAL, (rank + 1) * LOCAL))

    def build(backend: str) -> str:
        config = _config(2, "flex", False)
        config.moe_flex_dispatcher_backend = backend
        try:
            MoEFlexTokenDispatcher(LOCAL, local, config, groups)
        except (ImportError, ValueError) as e:
            return f"{type(e).__name__}: {e}"
        return "built"

    backends = ("deepep", "hybridep", "alltoall", "nccl")
    original = MoEFlexTokenDispatcher.__init__
    try:
        before = {b: build(b) for b in backends}
        alltoall_megatron.enable()
        alltoall_megatron.enable()  # a second call changes nothing
        wrapped = MoEFlexTokenDispatcher.__init__
        enabled = {b: build(b) for b in backends}
        alltoall_megatron.disable()
        restored = MoEFlexTokenDispatcher.__init__ is original
        after = {b: build(b) for b in backends}
    finally:
        alltoall_megatron.disable()
        parallel_state.destroy_model_parallel()
    return {"before": before, "enabled": enabled, "after": after, "restored": restored,
            "wrapped_once": getattr(wrapped, "__wrapped__", None) is original}


def test_other_backends_unchanged(megatron_pool):
    for result in megatron_pool.run(_other_backends, env=ENV, deadline_s=DEADLINE_S):
        before, enabled, after = result["before"], result["enabled"], result["after"]
        # Without DeepEP or HybridEP installed, Megatron's constructor refuses
        # them; with the integration enabled it still does, word for word.
        assert before["deepep"].startswith("ImportError: DeepEP is not installed"), before
        assert before["hybridep"].startswith("ImportError: HybridEP is not installed"), before
        assert before["alltoall"].startswith("ValueError: Invalid backend: alltoall"), before
        assert {b: enabled[b] for b in ("deepep", "hybridep", "nccl")} == {
            b: before[b] for b in ("deepep", "hybridep", "nccl")}
        assert enabled["alltoall"] == "built"
        assert result["wrapped_once"] and result["restored"]
        assert after == before


def test_untested_version_refused(monkeypatch):
    import alltoall.integrations.megatron as alltoall_megatron

    monkeypatch.setattr(alltoall_megatron, "installed_version", lambda: "0.17.0")
    with pytest.raises(RuntimeError, match=r"megatron-core 0\.17\.0 is not a tested version \(0\.16\.1\)"):
        alltoall_megatron.enable()
    assert not alltoall_megatron.enabled()
    monkeypatch.setattr(alltoall_megatron, "installed_version", lambda: None)
    with pytest.raises(RuntimeError, match="megatron-core is not installed"):
        alltoall_megatron.enable()
    with pytest.raises(ValueError, match="mode='fast'"):
        alltoall_megatron.enable(mode="fast")
    assert not alltoall_megatron.enabled()


def _changed_interface() -> str:
    """enable() on a Megatron-Core whose manager interface lost a method."""
    from megatron.core.transformer.moe import token_dispatcher

    import alltoall.integrations.megatron as alltoall_megatron

    saved = token_dispatcher._DispatchManager
    token_dispatcher._DispatchManager = type("_DispatchManager", (), {})
    try:
        alltoall_megatron.enable()
    except RuntimeError as e:
        return str(e)
    finally:
        token_dispatcher._DispatchManager = saved
        alltoall_megatron.disable()
    return "enabled"


def test_changed_interface_refused(megatron_pool):
    message = megatron_pool.run(_changed_interface, env=ENV, deadline_s=DEADLINE_S)[0]
    assert message.startswith("megatron-core 0.16.1: the flex token dispatcher's interface differs"), message
    assert "combine" in message and "setup_metadata" in message


# Megatron's MoE layer ------------------------------------------------------------


def _moe_layer(dispatcher: str, k: int, pad: bool):
    """Megatron's MoELayer (TopKRouter, SequentialMLP of local MLPs), built
    from the same seed, so both layers start from the same weights."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.moe_layer import MoELayer

    config = _config(k, dispatcher, pad)
    config.ffn_hidden_size = config.moe_ffn_hidden_size = 16
    spec = get_moe_module_spec(use_te=False, num_experts=EXPERTS, moe_grouped_gemm=False)
    torch.manual_seed(3)
    layer = MoELayer(config, spec.submodules, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    if dispatcher == "alltoall" and not pad:  # the dropless reference's host split sizes (module docstring)
        layer.token_dispatcher.__class__ = host_splits_alltoall()
    return layer


def _moe_layer_run(k: int, pad: bool) -> dict:
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_utils

    import alltoall.integrations.megatron as alltoall_megatron

    # Megatron-Core 0.16.1's router_gating_linear reads te_general_gemm, a
    # name its module defines only when Transformer Engine is installed.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    alltoall_megatron.enable(mode="auto" if k == 8 else "dedup")  # as in _compare_run
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=WORLD)
    results = {}
    try:
        for dispatcher in ("alltoall", "flex"):
            layer = _moe_layer(dispatcher, k, pad)
            torch.manual_seed(100 + dist.get_rank())
            x = torch.randn(TOKENS, 1, HIDDEN, requires_grad=True)  # [sequence, batch, hidden]
            with cpu_as_current_device(), eager():
                out, _ = layer(x)
                (out * torch.randn_like(out)).sum().backward()
            results[dispatcher] = {"out": out.detach(), "x_grad": x.grad,
                                   "grads": {n: p.grad for n, p in layer.named_parameters()},
                                   "manager": type(getattr(layer.token_dispatcher, "_comm_manager", None)).__name__}
            if dispatcher == "flex":
                results[dispatcher]["mode"] = layer.token_dispatcher._comm_manager.dispatcher.mode
    finally:
        alltoall_megatron.disable()
        parallel_state.destroy_model_parallel()
    return results


@pytest.mark.parametrize(("k", "pad"), [(2, False), (8, True)], ids=["k2-dropless", "k8-padded"])
def test_moe_layer_flex_on_alltoall(megatron_pool, k, pad):
    for rank, result in enumerate(megatron_pool.run(_moe_layer_run, k, pad, env=ENV, deadline_s=DEADLINE_S)):
        reference, ours = result["alltoall"], result["flex"]
        assert ours["manager"] == "AlltoallDispatchManager"
        assert ours["mode"] == "dedup"
        assert ours["grads"].keys() == reference["grads"].keys()
        assert any(".local_experts." in name for name in ours["grads"]) and "router.weight" in ours["grads"]
        pairs = [("out", ours["out"], reference["out"]), ("x_grad", ours["x_grad"], reference["x_grad"])]
        pairs += [(name, ours["grads"][name], reference["grads"][name]) for name in reference["grads"]]
        for what, actual, expected in pairs:
            torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, what=what, rank=rank: f"rank {rank} {what}: {m}")
