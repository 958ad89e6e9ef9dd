"""Megatron-Core 0.16.1's token dispatch + combine, forward and backward: its
own ``MoEAlltoAllTokenDispatcher`` on gloo against its flex dispatcher on
our manager (``alltoall.integrations.megatron``, the deduplicating
``ExpertDispatcher``), in the same job.

Every rank runs this (torchrun, or bench/emulated_cluster.py)::

    torchrun --nproc-per-node 8 bench/megatron_dispatch.py --local-size 4
    sudo .venv/bin/python bench/emulated_cluster.py --nodes 2 --nproc-per-node 4 --rate 1gbit -- \\
        .venv/bin/python bench/megatron_dispatch.py --json megatron-dispatch-emu.json

Fixed: EP = world size (TP = 1), fp32, Megatron's top-k routing of random
logits (the same on both), dropless unless ``--padded`` (capacity factor 1,
padded to capacity). Defaults: E=64, k=8, S=512 tokens per rank, M=512.
The "expert" multiplies each row by its probability, as Megatron's experts
apply them, so the step is dispatch + combine and their backward.

Megatron's dropless alltoall dispatcher needs CUDA in two places (see
tests/backend/test_megatron_flex.py): its split sizes are copied to the host
on a CUDA side stream, and its uneven all-to-all allocates on
``torch.cuda.current_device()``. Without CUDA this script makes the split
sizes the numpy arrays that copy yields and allocates on the CPU; every
other step is Megatron's. ``--padded`` runs Megatron's code unmodified.
The flex dispatcher's ``dispatch_preprocess`` (``torch.compile`` in
Megatron) runs eagerly, like Megatron's alltoall dispatcher.

Timing: the variants alternate, each run is ``--steps`` steps between
barriers, its time the slowest rank's, the minimum over ``--rounds`` rounds
is reported with the ratio against Megatron's alltoall dispatcher. Rows sent
across nodes per step come from the routing (Megatron: one row per (token,
remote expert) each way) and from the ExpertDispatcher's counters.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import alltoall.integrations.megatron as alltoall_megatron
from alltoall.launch import init_distributed
from alltoall.testing.megatron_cpu import cpu_as_current_device, eager, host_splits_alltoall


def _config(args: argparse.Namespace, dispatcher: str):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=1,
                             num_moe_experts=args.experts, moe_router_topk=args.k,
                             moe_token_dispatcher_type=dispatcher, moe_flex_dispatcher_backend="alltoall",
                             expert_model_parallel_size=dist.get_world_size(),
                             moe_expert_capacity_factor=1.0 if args.padded else None,
                             moe_pad_expert_input_to_capacity=args.padded, use_cpu_initialization=True,
                             add_bias_linear=False)


def _routing(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    g = torch.Generator().manual_seed(args.seed + dist.get_rank())
    tokens = torch.randn(args.tokens, args.hidden, generator=g)
    scores = torch.softmax(torch.randn(args.tokens, args.experts, generator=g), dim=-1)
    top = scores.topk(args.k, dim=-1)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top.indices, True)
    probs = torch.zeros_like(scores).scatter(1, top.indices, top.values)
    if args.padded:
        probs, routing_map = apply_router_token_dropping(probs, routing_map, args.k, 1.0, pad_to_capacity=True)
    return tokens, probs, routing_map


def _step(dispatcher, tokens: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor) -> None:
    x = tokens.detach().requires_grad_()
    p_in = probs.detach().requires_grad_()
    hidden, p = dispatcher.dispatch_preprocess(x, routing_map, p_in)
    hidden, p = dispatcher.token_dispatch(hidden, p)
    hidden, _, p = dispatcher.dispatch_postprocess(hidden, p)
    out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(
        hidden * p.unsqueeze(-1))))
    out.sum().backward()


def _timed(dispatcher, data, steps: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        _step(dispatcher, *data)
    elapsed = torch.tensor([(time.perf_counter() - start) / steps], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def _rows_inter(routing_map: torch.Tensor, world: int, experts: int, local_size: int) -> dict[str, int]:
    """Rows this rank sends to other nodes per dispatch: one per (token,
    remote expert) for Megatron's alltoall, one per (token, remote node)
    when deduplicated."""
    node_of_expert = torch.arange(experts) // (experts // world) // local_size
    mine = dist.get_rank() // local_size
    remote = routing_map & (node_of_expert != mine)
    per_node = torch.zeros(routing_map.shape[0], world // local_size, dtype=torch.bool)
    token, expert = torch.nonzero(remote, as_tuple=True)
    per_node[token, node_of_expert[expert]] = True
    return {"per_expert": int(remote.sum()), "per_node": int(per_node.sum())}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank (S)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (M)")
    p.add_argument("--padded", action="store_true", help="capacity factor 1, padded to capacity (default: dropless)")
    p.add_argument("--mode", default="auto", choices=alltoall_megatron.MODES, help="the ExpertDispatcher's mode")
    p.add_argument("--local-size", type=int, default=None,
                   help="emulate nodes of this many ranks (default: ALLTOALL_LOCAL_SIZE, else host names)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--watchdog", type=float, default=900.0)
    p.add_argument("--json", help="write the results here (rank 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    faulthandler.dump_traceback_later(args.watchdog, exit=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.local_size is not None:
        os.environ["ALLTOALL_LOCAL_SIZE"] = str(args.local_size)
    init_distributed()
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher

    rank, world = dist.get_rank(), dist.get_world_size()
    if args.experts % world:
        raise SystemExit(f"E={args.experts} experts need a world size that divides it, got {world}")
    alltoall_megatron.enable(mode=args.mode)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    groups = ProcessGroupCollection.use_mpu_process_groups()
    local = args.experts // world
    indices = list(range(rank * local, (rank + 1) * local))
    with cpu_as_current_device(), eager():
        variants = {
            "megatron alltoall (gloo)": host_splits_alltoall()(local, indices, _config(args, "alltoall"), groups),
            "flex on alltoall": MoEFlexTokenDispatcher(local, indices, _config(args, "flex"), groups),
        }
        expert_dispatcher = variants["flex on alltoall"]._comm_manager.dispatcher
        data = _routing(args)
        for d in variants.values():
            for _ in range(args.warmup):
                _step(d, *data)
        before = expert_dispatcher.stats()
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.rounds):
            for name, d in variants.items():
                best[name] = min(best[name], _timed(d, data, args.steps))
        after = expert_dispatcher.stats()
    topo = expert_dispatcher.comm.topology
    steps = args.rounds * args.steps
    rows = _rows_inter(data[2], world, args.experts, topo.local_size)
    ours_inter = {key: (after[key] - before[key]) / steps for key in ("dispatch_rows_inter", "combine_rows_inter")}
    totals = torch.tensor([rows["per_expert"], rows["per_node"], ours_inter["dispatch_rows_inter"]],
                          dtype=torch.float64)
    dist.all_reduce(totals)
    if rank == 0:
        base = best["megatron alltoall (gloo)"]
        print(f"megatron_dispatch: {world} ranks on {topo.num_nodes} node(s) of {topo.local_size}, "
              f"E={args.experts} k={args.k} S={args.tokens} M={args.hidden} "
              f"{'padded' if args.padded else 'dropless'}, mode {expert_dispatcher.mode}")
        print(f"{'variant':28} {'ms/step':>9} {'speedup':>8}")
        for name, t in best.items():
            print(f"{name:28} {t * 1e3:9.2f} {base / t:8.2f}")
        print(f"rows across nodes per dispatch, all ranks: Megatron alltoall {int(totals[0])}, "
              f"one per (token, node) {int(totals[1])}, ExpertDispatcher counted {int(totals[2])}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"world": world, "nodes": topo.num_nodes, "args": vars(args), "mode": expert_dispatcher.mode,
                           "ms": {k: v * 1e3 for k, v in best.items()},
                           "speedup": base / best["flex on alltoall"],
                           "rows_inter_per_dispatch": {"megatron_alltoall": int(totals[0]),
                                                       "per_token_node": int(totals[1]),
                                                       "expert_dispatcher": int(totals[2])}}, f, indent=1)
    alltoall_megatron.disable()
    expert_dispatcher.comm.synchronize()
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
