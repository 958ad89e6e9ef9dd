"""One MoE training step (forward + backward) of ``alltoall.MoE`` beside
DeepSpeed 0.19.8's ``deepspeed.moe.layer.MoE``, in the same job.

Every rank runs this (torchrun, mpiexec, srun, or bench/emulated_cluster.py):

    torchrun --nproc-per-node 8 bench/moe_step.py --local-size 4 --json moe-step.json
    sudo .venv/bin/python bench/emulated_cluster.py --nodes 2 --nproc-per-node 4 --rate 1gbit -- \\
        .venv/bin/python bench/moe_step.py --json moe-step-emu.json

Issue 12's acceptance set (overlap_degree 1, 2, 4 and DeepSpeed, flat and
hierarchical, training step at ACCEPTANCE_SHAPE): add ``--acceptance``.
Issue 20's (E=64, k=8, 512x512x128, dropless, uniform drawn routing,
replicate-flat, replicate-hierarchical and dedup): add ``--issue20``.

Fixed: EP = world size, fp32, capacity factor 1, FeedForward(M, F) experts:
one module, deep-copied into every layer's local experts (so all start from
the same expert weights), and the same gate weights. Set by flags: E
(``--experts``, 16), k (``--k``, 2), ``--max-nodes``, ``--dropless``, and
the routing (``--routing``): ``gate`` (the router's own top-k) or drawn
from ``--seed`` (``uniform``, or ``zipf`` with ``--zipf-exponent``), the
same drawn routing for every alltoall dispatcher in a run
(alltoall/cli/bench_routing.py; the router still gives the weights and the
losses). Swept: shapes ``SxMxF`` (tokens per rank, hidden, FFN), mode
(``train``: forward + backward; ``forward``: under no_grad), and for
alltoall the transport, the dispatcher (``--dispatchers``:
replicate-flat, replicate-hierarchical, dedup, auto; deepspeed) and
``overlap_degree``. DeepSpeed supports k <= 2 only and always routes with
its own gate (same router weights, not the drawn routing).

Bytes: for every alltoall dispatcher, the rows and bytes one rank sends to
other ranks in one dispatch (forward direction) on this run's routing, split
intra-node / inter-node, read from ``alltoall.ExpertDispatcher``'s exact
counters (a probe dispatcher in the same mode and wire formats; the
table prints the mean over ranks).

Timing: every variant of a (shape, mode) runs once per round, rounds
alternate the variants, each run is ``--steps`` steps between barriers, its
time the slowest rank's; the minimum over ``--rounds`` rounds is reported.

Exchange share: each variant also runs as a control in which every
all-to-all is replaced by a local copy of the same bytes (alltoall: the EP
Communicator is swapped for a copying stand-in; DeepSpeed: its
``_AllToAll`` is patched). ``share = 1 - control / real``; it is measured,
not read off a profiler (which on an oversubscribed host counts waiting for
a core as exchange time).

Output: a table of milliseconds, shares and ratios (against overlap 1 with
the same transport and algorithm, and against DeepSpeed), and ``--json``.
DeepSpeed is optional: without it (``DS_BUILD_OPS=0 pip install
--no-build-isolation deepspeed==0.19.8``) its rows are left out with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import alltoall
from alltoall.cli.bench_routing import DISTRIBUTIONS, DrawnRoutingGate, drawn_scores
from alltoall.launch import init_distributed
from alltoall.moe.dispatched import kept_expert_index
from alltoall.moe.experts import FeedForward
from alltoall.moe.gate import expert_capacity
from alltoall.testing.local_copy import LocalCopy

CAPACITY_FACTOR, MIN_CAPACITY = 1.0, 4
# Issue 12's benchmark shape. On 2 emulated hosts x 4 ranks with 1 Gbit/s
# links one exchange puts 16 * S * M bytes per direction on a host's link
# (8.4 MB, ~67 ms at 125 MB/s for S=1024, M=512), ~270 ms for the 4
# exchanges of a step; the experts' forward + backward is 3.2 GFLOP per
# rank. The first choice, 256x512x256, was picked by estimate and measured
# an exchange share of only 29-36%: gloo's fixed cost per call (several ms
# with 8 ranks on 2 cores) was a large part of the exchange and does not
# overlap, since it is CPU time. At 1024x512x256 quick runs (2026-12-01,
# --steps 3 --rounds 2-3) measured a share of 50-57% at N=1 (hierarchical),
# i.e. exchange and experts comparable; 128 rows per expert leave 32-row
# chunks at N=4.
ACCEPTANCE_SHAPE = "1024x512x256"
# Issue 20's benchmark: a fine-grained MoE scaled down from DeepSeek-V3 and Qwen3.
ISSUE20 = {"shape": "512x512x128", "experts": 64, "k": 8}
DISPATCHERS = ("replicate-flat", "replicate-hierarchical", "dedup", "auto", "deepspeed")
# --dispatch-dtype / --combine-dtype: the wire formats of alltoall's layer.
WIRE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
DEEPSPEED_HINT = "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8"


# Controls: the exchange replaced by a local copy of the same bytes --------------


@contextlib.contextmanager
def deepspeed_local_copy() -> Iterator[None]:
    """DeepSpeed's MoE with its all-to-all replaced by a local copy."""
    from deepspeed.moe import sharded_moe

    class _Copy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, group, x):  # type: ignore[override]
            return x.clone()

        @staticmethod
        def backward(ctx, grad):  # type: ignore[override]
            return None, grad.clone()

    saved = sharded_moe._AllToAll
    sharded_moe._AllToAll = _Copy
    try:
        yield
    finally:
        sharded_moe._AllToAll = saved


# Variants -----------------------------------------------------------------------


@dataclass
class Variant:
    label: str
    layer: torch.nn.Module
    control: Callable[[], contextlib.AbstractContextManager] | None  # None: no local-copy control for it
    key: dict = field(default_factory=dict)  # transport, dispatcher, overlap for alltoall


def _wires(dispatcher: str, args: argparse.Namespace) -> tuple[torch.dtype | None, torch.dtype | None]:
    """The wire formats of a dispatcher spec: ``dedup@fp8/bf16`` -> (float8_e4m3fn,
    bfloat16); without ``@``, --dispatch-dtype and --combine-dtype."""
    if "@" not in dispatcher:
        return WIRE_DTYPES.get(args.dispatch_dtype), WIRE_DTYPES.get(args.combine_dtype)
    dispatch, combine = dispatcher.split("@", 1)[1].split("/")
    return WIRE_DTYPES.get(dispatch), WIRE_DTYPES.get(combine)


def _dispatcher_spec(text: str) -> str:
    """``NAME`` or ``NAME@DISPATCH/COMBINE`` with NAME in DISPATCHERS (not
    deepspeed with a wire), DISPATCH in fp32/bf16/fp8, COMBINE in fp32/bf16."""
    name, _, wire = text.partition("@")
    if name not in DISPATCHERS:
        raise argparse.ArgumentTypeError(f"dispatcher {name!r} not in {DISPATCHERS}")
    if wire:
        dispatch, _, combine = wire.partition("/")
        if name == "deepspeed" or dispatch not in ("fp32", "bf16", "fp8") or combine not in ("fp32", "bf16"):
            raise argparse.ArgumentTypeError(
                f"{text!r}: the wire suffix is @DISPATCH/COMBINE, DISPATCH of fp32, bf16, fp8 and COMBINE of "
                "fp32, bf16, on alltoall's dispatchers only, e.g. dedup@fp8/bf16")
    return text


def _mode_and_algorithm(dispatcher: str) -> tuple[str, str]:
    """``replicate-flat`` -> ("replicate", "flat"); ``dedup`` -> ("dedup", "auto");
    a wire suffix (``@fp8/bf16``) is ignored."""
    dispatcher = dispatcher.split("@", 1)[0]
    if dispatcher.startswith("replicate-"):
        return "replicate", dispatcher.split("-", 1)[1]
    return dispatcher, "auto"


def _ours(comm: alltoall.Communicator, expert: torch.nn.Module, gate_weight: torch.Tensor, dispatcher: str,
          overlap: int, transport: str, args: argparse.Namespace, scores: torch.Tensor | None) -> Variant:
    mode, algorithm = _mode_and_algorithm(dispatcher)
    dispatch_dtype, combine_dtype = _wires(dispatcher, args)
    layer = alltoall.MoE(expert.fc1.in_features, expert, args.experts, k=args.k, capacity_factor=CAPACITY_FACTOR,
                         eval_capacity_factor=CAPACITY_FACTOR, min_capacity=MIN_CAPACITY,
                         drop_tokens=not args.dropless, ep_group=comm, algorithm=algorithm, overlap_degree=overlap,
                         max_nodes=args.max_nodes, dispatcher=mode,
                         dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype)
    with torch.no_grad():
        layer.gate.wg.weight.copy_(gate_weight)
    if scores is not None:
        layer.gate = DrawnRoutingGate(layer.gate, scores)

    @contextlib.contextmanager
    def control() -> Iterator[None]:
        real = layer.exchange.comm
        layer.exchange.comm = LocalCopy(real.size, real.rank, real.group)
        try:
            yield
        finally:
            layer.exchange.comm = real

    # The local copy stands in for the equal exchanges of the replicate path only.
    has_control = layer.dispatcher_mode == "replicate" and not args.dropless
    label = f"alltoall {transport} {dispatcher} overlap {overlap}"
    if mode == "auto":
        label = f"alltoall {transport} auto ({layer.dispatcher_mode}) overlap {overlap}"
    key = {"transport": transport, "dispatcher": dispatcher, "resolved": layer.dispatcher_mode, "overlap": overlap}
    return Variant(label, layer, control if has_control else None, key)


def _deepspeed(expert: torch.nn.Module, gate_weight: torch.Tensor, world: int, args: argparse.Namespace) -> Variant:
    import deepspeed
    import deepspeed.comm.torch  # ``deepspeed.comm.torch`` as an attribute is the torch module
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    deepspeed_torch_comm = sys.modules["deepspeed.comm.torch"]
    # On CPUs DeepSpeed's comm wrapper JIT-compiles a shared-memory
    # all-reduce op at init (minutes, behind a lock in ~/.cache shared by
    # every job). The MoE layer does not use it: its all-to-all is
    # torch.distributed's all_to_all_single either way. So skip the build.
    deepspeed_torch_comm.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
    layer = DeepSpeedMoE(hidden_size=expert.fc1.in_features, expert=expert, num_experts=args.experts, ep_size=world,
                         k=args.k, capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR,
                         min_capacity=MIN_CAPACITY, drop_tokens=not args.dropless)
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        layer.deepspeed_moe.gate.wg.weight.copy_(gate_weight)
    return Variant("deepspeed", layer, deepspeed_local_copy, {"dispatcher": "deepspeed"})


def _step(layer: torch.nn.Module, x: torch.Tensor, train: bool) -> None:
    if not train:
        with torch.no_grad():
            layer(x)
        return
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out, aux = layer(x)[:2]
    (out.square().mean() + 0.01 * aux).backward()


def traffic(tokens: int, hidden: int, ffn: int, world: int, local_size: int, experts: int = 16, k: int = 2,
            dropless: bool = False) -> dict[str, float | None]:
    """What one rank moves and computes per training step on the replicate
    path, on average.

    Capacity mode: every rank sends ``L * C`` rows of ``M`` fp32 values to
    every rank (``L = E / world`` local experts, ``C`` the capacity), so one
    exchange puts ``(world - local_size) * L * C * M * 4`` bytes per rank on
    the inter-host link. Dropless: ``S * k`` rows per rank, spread over the
    ranks by the routing (the mean share of other hosts is taken here; the
    exact bytes of this run's routing are in the table). A step has 4
    exchanges when the input needs grad (2 forward, 2 backward), 3 otherwise.
    The experts' forward + backward is ~3x the forward's ``2 * 2 * rows * M * F``
    flops for the rows a rank receives.
    """
    capacity = None if dropless else expert_capacity(tokens, experts, k, CAPACITY_FACTOR, MIN_CAPACITY)
    rows = tokens * k if capacity is None else experts * capacity
    per_exchange = rows * hidden * 4
    return {"capacity": capacity, "bytes_per_peer": per_exchange / world, "bytes_per_exchange": per_exchange,
            "inter_host_bytes_per_exchange": per_exchange * (world - local_size) / world,
            "expert_gflop_per_step": 3 * 4 * rows * hidden * ffn / 1e9}


def _timed(layer: torch.nn.Module, x: torch.Tensor, train: bool, steps: int) -> float:
    """Seconds per step, the slowest rank's."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        _step(layer, x, train)
    elapsed = torch.tensor([(time.perf_counter() - start) / steps], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def run_case(variants: list[Variant], x: torch.Tensor, train: bool, args: argparse.Namespace) -> dict[str, dict]:
    """Minimum over rounds of every variant, real and control, alternating."""
    best: dict[str, dict[str, float | None]] = {
        v.label: {"real": float("inf"), "control": float("inf") if v.control else None} for v in variants}
    for v in variants:  # warm-up, both ways
        for _ in range(args.warmup):
            _step(v.layer, x, train)
            if v.control:
                with v.control():
                    _step(v.layer, x, train)
    for _ in range(args.rounds):
        for v in variants:
            best[v.label]["real"] = min(best[v.label]["real"], _timed(v.layer, x, train, args.steps))
            if v.control:
                with v.control():
                    best[v.label]["control"] = min(best[v.label]["control"], _timed(v.layer, x, train, args.steps))
    return best


def sent_per_dispatch(comm: alltoall.Communicator, dispatcher: str, layer: alltoall.MoE,
                      x: torch.Tensor) -> dict[str, float]:
    """Rows and bytes this rank sends to other ranks in one dispatch of
    ``x`` with ``layer``'s routing, from a probe ExpertDispatcher's exact
    counters (intra- and inter-node), averaged over the ranks. Collective.
    """
    mode, algorithm = _mode_and_algorithm(dispatcher)
    # The layer's wire formats, so the bytes are the ones its links carry.
    probe = alltoall.ExpertDispatcher(comm, layer.num_experts, mode=mode, algorithm=algorithm, k=layer.k,
                                      dispatch_dtype=layer.exchange.dispatch_dtype,
                                      combine_dtype=layer.exchange.combine_dtype)
    with torch.no_grad():
        gate = layer.gate(x.detach(), layer.capacity(x.shape[0]))
        _, handle = probe.dispatch(x.detach(), kept_expert_index(gate), gate.weights.to(x.dtype))
    names = ("rows_intra", "rows_inter", "bytes_intra", "bytes_inter")
    values = torch.tensor([float(handle.sent[n]) for n in names], dtype=torch.float64)
    dist.all_reduce(values)
    return {"mode": probe.mode, **{n: float(v) / dist.get_world_size() for n, v in zip(names, values, strict=True)}}


# Report -------------------------------------------------------------------------


def summarize(case: dict, variants: list[Variant]) -> list[dict]:
    rows = []
    times = case["times"]
    deepspeed = times.get("deepspeed", {}).get("real")
    for v in variants:
        t = times[v.label]
        control = t["control"]
        row = {"variant": v.label, **v.key, "ms": t["real"] * 1e3,
               "control_ms": None if control is None else control * 1e3,
               "exchange_share": None if control is None else max(0.0, 1.0 - control / t["real"]),
               "sent": case["sent"].get(v.key.get("dispatcher", ""))}
        if "transport" in v.key:
            base = v.label.rsplit(" overlap ", 1)[0] + " overlap 1"
            if base in times:
                row["speedup_vs_overlap_1"] = times[base]["real"] / t["real"]
            replicate = [times[f"alltoall {v.key['transport']} replicate-{a} overlap 1"]["real"]
                         for a in ("flat", "hierarchical")
                         if f"alltoall {v.key['transport']} replicate-{a} overlap 1" in times]
            if replicate:
                row["speedup_vs_best_replicate"] = min(replicate) / t["real"]
            full_width = v.label.replace(v.key["dispatcher"], v.key["dispatcher"].split("@", 1)[0], 1)
            if "@" in v.key["dispatcher"] and full_width in times:
                row["speedup_vs_fp32_wire"] = times[full_width]["real"] / t["real"]
        if deepspeed is not None:
            row["speedup_vs_deepspeed"] = deepspeed / t["real"]
        rows.append(row)
    return rows


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "-"


def table(results: list[dict]) -> str:
    lines = []
    for case in results:
        t = case["traffic"]
        routing = case["routing"]
        lines.append(f"\nS={case['tokens']} M={case['hidden']} F={case['ffn']} {case['mode']} "
                     f"(E={case['experts']}, k={case['k']}, EP={case['world']}, fp32, "
                     f"{'dropless' if case['dropless'] else f'capacity factor {CAPACITY_FACTOR}'}, "
                     f"max_nodes {case['max_nodes']}, routing {routing}, "
                     f"input grad {'on' if case['input_grad'] else 'off'})")
        lines.append(f"replicate, per rank and exchange (mean): {t['bytes_per_exchange'] / 1e6:.3f} MB, "
                     f"{t['inter_host_bytes_per_exchange'] / 1e6:.3f} MB of it to other hosts; "
                     f"experts {t['expert_gflop_per_step']:.3f} GFLOP per step")
        lines.append("MB intra / inter: sent by one rank to other ranks in one dispatch (forward), exact counters, "
                     "mean over ranks")
        lines.append(f"{'variant':<46} {'ms':>9} {'control ms':>11} {'exchange':>9} {'vs N=1':>7} {'vs rep':>7} "
                     f"{'vs fp32':>7} {'vs DS':>7} {'MB intra':>9} {'MB inter':>9}")
        for row in case["rows"]:
            control = "-" if row["control_ms"] is None else f"{row['control_ms']:.3f}"
            share = "-" if row["exchange_share"] is None else f"{row['exchange_share'] * 100:.1f}%"
            sent = row["sent"]
            intra = "-" if sent is None else f"{sent['bytes_intra'] / 1e6:.3f}"
            inter = "-" if sent is None else f"{sent['bytes_inter'] / 1e6:.3f}"
            lines.append(f"{row['variant']:<46} {row['ms']:9.3f} {control:>11} {share:>9} "
                         f"{_ratio(row, 'speedup_vs_overlap_1'):>7} {_ratio(row, 'speedup_vs_best_replicate'):>7} "
                         f"{_ratio(row, 'speedup_vs_fp32_wire'):>7} {_ratio(row, 'speedup_vs_deepspeed'):>7} "
                         f"{intra:>9} {inter:>9}")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        s, m, f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not SxMxF, e.g. 64x64x64") from None
    return s, m, f


def _csv(kind: type, choices: tuple[str, ...] | None = None) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v]
        if choices is not None:
            bad = [v for v in values if v not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"{bad} not in {choices}")
        return values
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=lambda t: [_shape(s) for s in t.split(",")], default=None,
                   help="SxMxF,... (default 64x64x64,64x512x512; with --acceptance/--issue20 their shape)")
    p.add_argument("--modes", type=_csv(str, ("train", "forward")), default=["train", "forward"])
    p.add_argument("--transports", type=_csv(str, ("auto", "shm", "c10d")), default=["auto", "c10d"])
    p.add_argument("--algorithms", type=_csv(str, ("flat", "hierarchical")), default=["flat", "hierarchical"],
                   help="without --dispatchers: replicate-<algorithm> for each, and deepspeed")
    p.add_argument("--dispatchers", type=_csv(_dispatcher_spec), default=None,
                   help=f"comma-separated, of {', '.join(DISPATCHERS)} (deepspeed: k <= 2 only), each of "
                        "alltoall's optionally with its wire formats as @DISPATCH/COMBINE (e.g. dedup@fp8/bf16; "
                        "default --dispatch-dtype/--combine-dtype), so the formats alternate in one run")
    p.add_argument("--overlap", type=_csv(int), default=[1, 2, 4])
    p.add_argument("--experts", type=int, default=16, help="E, divisible by the world size")
    p.add_argument("--k", type=int, default=2, help="experts per token")
    p.add_argument("--max-nodes", type=int, default=None, help="node-limited routing: at most this many nodes a token")
    p.add_argument("--dropless", action="store_true", help="drop_tokens=False (default: capacity factor 1)")
    p.add_argument("--routing", choices=("gate", *DISTRIBUTIONS), default="gate",
                   help="gate: the router's own choice; uniform/zipf: drawn from --seed, the same for every dispatcher")
    p.add_argument("--zipf-exponent", type=float, default=1.2, help="skew of --routing zipf")
    p.add_argument("--no-deepspeed", action="store_true", help="leave DeepSpeed out")
    p.add_argument("--no-input-grad", action="store_true",
                   help="train with an input that needs no grad (the model's first layer; no backward return exchange)")
    p.add_argument("--acceptance", action="store_true",
                   help=f"issue 12's set: --shapes {ACCEPTANCE_SHAPE} (unless given) --modes train --transports auto "
                        "--algorithms flat,hierarchical --overlap 1,2,4, DeepSpeed beside")
    p.add_argument("--issue20", action="store_true",
                   help=f"issue 20's set: --shapes {ISSUE20['shape']} --experts {ISSUE20['experts']} "
                        f"--k {ISSUE20['k']} --dropless --routing uniform --modes train --transports auto --overlap 1 "
                        "--dispatchers replicate-flat,replicate-hierarchical,dedup (flags given explicitly win)")
    p.add_argument("--local-size", type=int, default=None,
                   help="emulate nodes of this many ranks on one host (for 'hierarchical'); default: detect hosts")
    p.add_argument("--steps", type=int, default=10, help="steps per timed run")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--watchdog", type=float, default=3600.0,
                   help="print every thread's stack and exit if a rank runs longer than this many seconds")
    p.add_argument("--dispatch-dtype", choices=["bf16", "fp8"], help="alltoall's dispatch wire (with --overlap 1)")
    p.add_argument("--combine-dtype", choices=["bf16"], help="alltoall's combine wire format (with --overlap 1)")
    p.add_argument("--json", help="write the results here (rank 0)")
    p.add_argument("--table", help="write the table here too (rank 0)")
    args = p.parse_args(argv)
    if args.issue20:
        given = set(argv if argv is not None else sys.argv[1:])
        defaults = {"--shapes": ("shapes", [_shape(ISSUE20["shape"])]), "--experts": ("experts", ISSUE20["experts"]),
                    "--k": ("k", ISSUE20["k"]), "--routing": ("routing", "uniform"), "--modes": ("modes", ["train"]),
                    "--transports": ("transports", ["auto"]), "--overlap": ("overlap", [1]),
                    "--dispatchers": ("dispatchers", ["replicate-flat", "replicate-hierarchical", "dedup"])}
        for flag, (name, value) in defaults.items():
            if not any(g == flag or g.startswith(flag + "=") for g in given):
                setattr(args, name, value)
        args.dropless = True
    if args.acceptance:
        args.shapes = args.shapes or [_shape(ACCEPTANCE_SHAPE)]
        args.modes, args.transports = ["train"], ["auto"]
        args.algorithms, args.overlap = ["flat", "hierarchical"], [1, 2, 4]
    if args.dispatchers is None:
        args.dispatchers = [f"replicate-{a}" for a in args.algorithms] + ([] if args.no_deepspeed else ["deepspeed"])
    args.shapes = args.shapes or [(64, 64, 64), (64, 512, 512)]
    if not 1 <= args.k <= args.experts:
        p.error(f"--k {args.k} must be in [1, --experts {args.experts}]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    faulthandler.dump_traceback_later(args.watchdog, exit=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.experts % world:
        raise SystemExit(f"E={args.experts} experts need a world size that divides it, got {world}")
    notes = []
    want_deepspeed = "deepspeed" in args.dispatchers and not args.no_deepspeed
    have_deepspeed = want_deepspeed and importlib.util.find_spec("deepspeed") is not None
    if want_deepspeed and not have_deepspeed:
        notes.append(f"DeepSpeed is not installed, so its rows are left out ({DEEPSPEED_HINT})")
    if have_deepspeed and args.k > 2:
        notes.append(f"DeepSpeed supports k <= 2 only, so its row is left out at k={args.k}")
        have_deepspeed = False
    if have_deepspeed and args.routing != "gate":
        notes.append("DeepSpeed routes with its own top-k gate (same router weights), not the drawn routing")
    comms = {t: alltoall.Communicator(local_size=args.local_size, transport=t) for t in args.transports}
    any_comm = comms[args.transports[0]]
    ours = [d for d in args.dispatchers if d != "deepspeed"]
    if not any_comm.topology.uniform:
        dropped = [d for d in ours if d.split("@", 1)[0] in ("replicate-hierarchical", "dedup")]
        if dropped:
            notes.append(f"{dropped} left out: they need nodes of equal size ({any_comm.topology.describe()})")
        ours = [d for d in ours if d not in dropped]
    header = {"world": world, "nodes": any_comm.topology.num_nodes, "torch": torch.__version__,
              "transports": {t: {a: list(c.transports(a)) for a in ("flat", "hierarchical")
                                 if a == "flat" or c.topology.uniform} for t, c in comms.items()}}
    results = []
    for tokens, hidden, ffn in args.shapes:
        for mode in args.modes:
            torch.manual_seed(args.seed)  # the same modules on every rank
            expert = FeedForward(hidden, ffn)
            gate_weight = torch.randn(args.experts, hidden) / hidden ** 0.5
            scores = None if args.routing == "gate" else drawn_scores(tokens, args.experts, args.routing,
                                                                       args.zipf_exponent, args.seed, rank)
            variants = [_ours(comms[t], expert, gate_weight, d, n, t, args, scores)
                        for t in args.transports for d in ours for n in args.overlap]
            if have_deepspeed:
                variants.append(_deepspeed(expert, gate_weight, world, args))
            x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(args.seed + 1 + rank))
            sent = {}
            for d in ours:  # every variant of a dispatcher has the same routing, hence the same bytes
                first = next(v for v in variants if v.key.get("dispatcher") == d)
                sent[d] = sent_per_dispatch(any_comm, d, first.layer, x)
            # A layer inside a model: its input needs grad, so the backward
            # exchanges the input's gradient too (--no-input-grad: the first layer).
            x.requires_grad_(mode == "train" and not args.no_input_grad)
            times = run_case(variants, x, mode == "train", args)
            routing = args.routing if args.routing != "zipf" else f"zipf {args.zipf_exponent}"
            case = {"tokens": tokens, "hidden": hidden, "ffn": ffn, "mode": mode, "world": world, "times": times,
                    "experts": args.experts, "k": args.k, "dropless": args.dropless, "max_nodes": args.max_nodes,
                    "routing": f"{routing} seed {args.seed}" if args.routing != "gate" else routing,
                    "input_grad": x.requires_grad, "sent": sent,
                    "traffic": traffic(tokens, hidden, ffn, world, any_comm.topology.local_size, args.experts,
                                       args.k, args.dropless)}
            case["rows"] = summarize(case, variants)
            results.append(case)
    if rank == 0:
        text = table(results)
        lines = [f"moe_step: {world} ranks on {header['nodes']} node(s); phase transports {header['transports']}",
                 *notes, text]
        print("\n".join(lines))
        if args.table:
            with open(args.table, "w") as f:
                f.write("\n".join(lines) + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"header": header, "notes": notes, "args": {k: v for k, v in vars(args).items()},
                           "results": results}, f, indent=1)
    for comm in comms.values():
        comm.synchronize()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
