"""``alltoall-bench dispatch``: the expert dispatcher's dispatch + combine,
forward and backward, per mode, on routing drawn from a seed.

  alltoall-bench dispatch --nprocs 8 --local-size 4 -S 128,512 -M 512 -k 8 -E 64
  torchrun --nproc-per-node 8 -m alltoall.bench dispatch -S 512 -M 512 -k 8 -E 64 --max-nodes 1 --json d.json

Each rank draws its S tokens' k experts (alltoall/cli/bench_routing.py:
uniform, or Zipf-skewed; ``--max-nodes`` applies node-limited routing to the
draw), the same routing for every mode. A mode's step is
``combine(dispatch(x, expert_index, weights))`` with identity experts;
``fwd`` times it under no_grad, ``fwd+bwd`` with the backward of a sum
(gradients of x and the weights). Times are means over ``-n`` iterations
after ``-w`` warm-ups, the slowest rank's; modes alternate over ``-R``
rounds. ``wrong`` counts output elements off ``sum_j w[s, j] x[s]`` (over
the kept assignments), summed over ranks. The byte columns are the exact
counters of one dispatch (forward direction): bytes one rank sends to other
ranks inside its node and to other nodes, the mean over ranks.

Modes: replicate-flat, replicate-hierarchical, dedup, auto (ExpertDispatcher
modes; hierarchical and dedup need nodes of equal size), and megatron:
Megatron-Core's MoEAlltoAllTokenDispatcher on the same routing and capacity
(alltoall/cli/bench_megatron.py; padded mode only, so with
``--capacity-factor``; its bytes are the padded exchange's, computed). With
``--capacity-factor``, the gate's capacity rule drops assignments before the
dispatch (the layer's drop mode); without it, dropless.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

import alltoall
from alltoall.cli.bench_launch import launched_by_self, self_launch
from alltoall.cli.bench_megatron import MegatronDispatch, available
from alltoall.cli.bench_routing import DISTRIBUTIONS, drawn_scores
from alltoall.launch import init_distributed
from alltoall.moe.dispatch import route
from alltoall.moe.gate import expert_capacity
from alltoall.moe.node_limited import expert_nodes, limit_logits
from alltoall.ops import wire

WIRE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}

MODES = ("replicate-flat", "replicate-hierarchical", "dedup", "auto", "megatron")
DEFAULT_MODES = MODES[:4]
EXIT_WRONG = 3


@dataclass
class Row:
    tokens: int
    mode: str
    resolved: str
    fwd_us: float
    fwdbwd_us: float
    bytes_intra: float
    bytes_inter: float
    rows_intra: float
    rows_inter: float
    wrong: int


def _modes(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in MODES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown {bad or 'empty list'}; choose from {', '.join(MODES)}")
    return list(dict.fromkeys(names))


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: need integers >= 0")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alltoall-bench dispatch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-S", "--tokens", type=_ints, default=[128, 512], help="tokens per rank, comma-separated sweep")
    p.add_argument("-M", "--hidden", type=int, default=512, help="token width (default 512)")
    p.add_argument("-k", type=int, default=8, help="experts per token (default 8)")
    p.add_argument("-E", "--experts", type=int, default=64, help="experts in total, divisible by the world size")
    p.add_argument("--max-nodes", type=int, default=None, help="node-limited routing: at most this many nodes a token")
    p.add_argument("--routing", choices=DISTRIBUTIONS, default="uniform")
    p.add_argument("--zipf-exponent", type=float, default=1.2)
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="drop by the gate's capacity rule with this factor (default: dropless)")
    p.add_argument("--modes", type=_modes, default=list(DEFAULT_MODES),
                   help=f"comma-separated, of {', '.join(MODES)} (default the first four; megatron: Megatron-Core's "
                        "MoEAlltoAllTokenDispatcher, padded, needs --capacity-factor)")
    p.add_argument("-n", "--iters", type=int, default=10)
    p.add_argument("-w", "--warmup_iters", type=int, default=2)
    p.add_argument("-R", "--rounds", type=int, default=1, help="alternate the modes over this many rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dispatch-dtype", choices=sorted(WIRE_DTYPES), default=None,
                   help="the dispatchers' dispatch wire format (default: the input's, fp32)")
    p.add_argument("--combine-dtype", choices=["bf16"], default=None,
                   help="the dispatchers' combine wire format (default: the input's, fp32)")
    p.add_argument("--local-size", type=int, default=None, help="emulate nodes of this many consecutive ranks")
    p.add_argument("--nprocs", type=int, default=None, help="not under a launcher: start this many local ranks")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--csv", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png", help="time and inter-node bytes against S (needs matplotlib)")
    p.add_argument("--table", metavar="FILE", help="also write the printed table to FILE")
    return p


def main(argv: list[str]) -> int:
    """``argv`` without the leading "dispatch"."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.k <= args.experts:
        parser.error(f"-k {args.k} must be in [1, -E {args.experts}]")
    from alltoall.launch import detect_launcher

    if detect_launcher() is None:
        if args.nprocs is None:
            parser.error("not under a launcher: pass --nprocs N, or run under torchrun, mpiexec or srun")
        return self_launch(["dispatch", *argv], args.nprocs, ok_codes=(0, EXIT_WRONG))
    if args.nprocs is not None and not launched_by_self():
        parser.error("--nprocs starts local ranks itself; under a launcher the launcher sets the world size")
    init_distributed()
    try:
        return _run(parser, args, argv)
    finally:
        dist.destroy_process_group()


def _routing(args: argparse.Namespace, comm: alltoall.Communicator, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``expert_index [S, k]`` (dropped: -1) and ``weights [S, k]``."""
    scores = drawn_scores(tokens, args.experts, args.routing, args.zipf_exponent, args.seed, comm.rank)
    nodes = torch.tensor(expert_nodes(comm, args.experts)) if args.max_nodes is not None else None
    probs = torch.softmax(scores, dim=1)
    capacity = None
    if args.capacity_factor is not None:
        capacity = expert_capacity(tokens, args.experts, args.k, args.capacity_factor, 0)
    routing = route(limit_logits(scores, probs, nodes, args.k, args.max_nodes), args.k, capacity)
    weights = probs.gather(1, routing.expert_index).float()
    weights = weights / weights.sum(dim=1, keepdim=True)
    return routing.expert_index.masked_fill(routing.dest_row < 0, -1), weights


def _call(d, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
    """combine(dispatch(x)) with identity experts, and the dispatch's counters."""
    if isinstance(d, MegatronDispatch):
        return d.step(x, *d.dense(index, weights, d.experts)), None
    recv, handle = d.dispatch(x, index, weights)
    return d.combine(recv, handle), handle.sent


def _forward(d, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
    with torch.no_grad():
        _call(d, x, index, weights)


def _train(d, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
    xg = x.detach().requires_grad_()
    wg = weights.detach().requires_grad_()
    _call(d, xg, index, wg)[0].sum().backward()


def _timed(iters: int, step, *args) -> float:
    """Microseconds per ``step(*args)``, the slowest rank's mean."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        step(*args)
    elapsed = torch.tensor([(time.perf_counter() - start) / max(iters, 1)], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed) * 1e6


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    torch.set_num_threads(1)
    comm = alltoall.Communicator(local_size=args.local_size)
    world = comm.size
    if args.experts % world:
        parser.error(f"-E {args.experts} is not divisible by the world size {world}")
    modes = list(args.modes)
    skipped: list[str] = []
    notes: list[str] = []
    if not comm.topology.uniform:
        skipped = [m for m in modes if m in ("replicate-hierarchical", "dedup")]
        modes = [m for m in modes if m not in skipped]
        if skipped:
            notes.append(f"{skipped} skipped: nodes of unequal size")
    if "megatron" in modes and (args.capacity_factor is None or not available()):
        skipped.append("megatron")
        modes.remove("megatron")
        why = "needs --capacity-factor (padded mode)" if available() else "Megatron-Core is not installed"
        notes.append(f"megatron skipped: {why}")
    dispatchers: dict = {}
    for m in modes:  # the same order on every rank
        if m == "megatron":
            dispatchers[m] = MegatronDispatch(args.experts, args.k, args.hidden, args.capacity_factor)
            continue
        mode, algorithm = ("replicate", m.split("-", 1)[1]) if m.startswith("replicate-") else (m, "auto")
        dispatchers[m] = alltoall.ExpertDispatcher(comm, args.experts, mode=mode, algorithm=algorithm, k=args.k,
                                                   dispatch_dtype=WIRE_DTYPES.get(args.dispatch_dtype),
                                                   combine_dtype=WIRE_DTYPES.get(args.combine_dtype))
    rows: list[Row] = []
    for tokens in args.tokens:
        index, weights = _routing(args, comm, tokens)
        x = torch.randn(tokens, args.hidden, generator=torch.Generator().manual_seed(args.seed + 7 + comm.rank))
        kept = (index >= 0).to(x.dtype)
        # The dispatch wire rounds each token once, at its origin; a bf16
        # combine rounds each row and partial sum (at most 3 roundings of
        # 2^-8 on the dedup path): 2^-6 bounds it.
        dispatched = x if args.dispatch_dtype is None else wire.round_trip(x, WIRE_DTYPES[args.dispatch_dtype])
        expected = dispatched * (weights.to(x.dtype) * kept).sum(dim=1, keepdim=True)
        tolerance = 1e-4 if args.combine_dtype is None else 2.0**-6
        results = {}
        for m, d in dispatchers.items():
            with torch.no_grad():
                out, counted = _call(d, x, index, weights)
            if counted is None:  # Megatron-Core: the padded exchange's bytes, computed
                counted = d.sent(tokens, args.hidden, x.element_size(), comm.topology)
            reference = expected if not isinstance(d, MegatronDispatch) else x * (weights * kept).sum(1, keepdim=True)
            limit = tolerance if not isinstance(d, MegatronDispatch) else 1e-4
            wrong = int(((out - reference).abs() > limit * (1 + reference.abs())).sum())
            sent = torch.tensor([float(counted[c]) for c in ("bytes_intra", "bytes_inter", "rows_intra",
                                                                 "rows_inter")], dtype=torch.float64)
            dist.all_reduce(sent)
            totals = torch.tensor([wrong], dtype=torch.int64)
            dist.all_reduce(totals)
            results[m] = {"sent": (sent / world).tolist(), "wrong": int(totals), "fwd": float("inf"),
                          "fwdbwd": float("inf"), "resolved": d.mode}

        for d in dispatchers.values():
            for _ in range(args.warmup_iters):
                _forward(d, x, index, weights)
                _train(d, x, index, weights)
        per_round = max(1, args.iters // max(args.rounds, 1))
        for _ in range(args.rounds):
            for m, d in dispatchers.items():
                fwd = _timed(per_round, _forward, d, x, index, weights)
                both = _timed(per_round, _train, d, x, index, weights)
                results[m]["fwd"], results[m]["fwdbwd"] = min(results[m]["fwd"], fwd), min(results[m]["fwdbwd"], both)
        for m, r in results.items():
            bi, be, ri, re_ = r["sent"]
            rows.append(Row(tokens, m, r["resolved"], r["fwd"], r["fwdbwd"], bi, be, ri, re_, r["wrong"]))
    comm.synchronize()
    wrong = sum(r.wrong for r in rows)
    if comm.rank == 0:
        _report(args, argv, comm, rows, skipped, notes)
    return EXIT_WRONG if wrong else 0


def header_lines(args: argparse.Namespace, comm: alltoall.Communicator, notes: list[str]) -> list[str]:
    routing = args.routing if args.routing == "uniform" else f"zipf {args.zipf_exponent}"
    drop = "dropless" if args.capacity_factor is None else f"capacity factor {args.capacity_factor}"
    lines = [f"# alltoall-bench dispatch: {comm.size} ranks, {comm.topology.describe()}, transport {comm.transport}",
             f"# M={args.hidden} k={args.k} E={args.experts} max_nodes={args.max_nodes} routing {routing} "
             f"seed {args.seed}, {drop}, fp32 tokens, wire dispatch {args.dispatch_dtype or 'fp32'} / combine "
             f"{args.combine_dtype or 'fp32'} (megatron: fp32), identity experts",
             "# time: mean over iterations, slowest rank; bytes: one dispatch (forward), sent by one rank to other "
             "ranks, mean over ranks"]
    lines += [f"# {note}" for note in notes]
    lines.append(f"# {'S':>8} {'mode':>24} {'resolved':>10} {'fwd(us)':>12} {'fwd+bwd(us)':>12} "
                 f"{'B intra':>12} {'B inter':>12} {'wrong':>6}")
    return lines


def table_lines(rows: list[Row]) -> list[str]:
    return [f"  {r.tokens:>8} {r.mode:>24} {r.resolved:>10} {r.fwd_us:>12.1f} {r.fwdbwd_us:>12.1f} "
            f"{r.bytes_intra:>12.0f} {r.bytes_inter:>12.0f} {r.wrong:>6}" for r in rows]


def parse_table(text: str) -> list[dict]:
    """The rows of a printed table (for tests and scripts)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 8 and not line.startswith("#") and parts[0].isdigit():
            out.append({"tokens": int(parts[0]), "mode": parts[1], "resolved": parts[2], "fwd_us": float(parts[3]),
                        "fwdbwd_us": float(parts[4]), "bytes_intra": float(parts[5]),
                        "bytes_inter": float(parts[6]), "wrong": int(parts[7])})
    return out


def _report(args: argparse.Namespace, argv: list[str], comm: alltoall.Communicator, rows: list[Row],
            skipped: list[str], notes: list[str]) -> None:
    lines = [*header_lines(args, comm, notes), *table_lines(rows)]
    wrong = sum(r.wrong for r in rows)
    lines.append(f"# Wrong elements: {wrong} {'OK' if not wrong else 'FAILED'}")
    text = "\n".join(lines) + "\n"
    print(text, end="", flush=True)
    meta = {"argv": ["alltoall-bench", "dispatch", *argv], "world_size": comm.size,
            "topology": comm.topology.describe(), "transport": comm.transport, "hidden": args.hidden, "k": args.k,
            "experts": args.experts, "max_nodes": args.max_nodes, "routing": args.routing,
            "zipf_exponent": args.zipf_exponent, "capacity_factor": args.capacity_factor, "seed": args.seed,
            "iters": args.iters, "warmup": args.warmup_iters, "rounds": args.rounds, "skipped": skipped}
    for path in (args.json, args.csv, args.plot, args.table):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else ["tokens"])
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    if args.plot:
        write_plot(rows, meta, args.plot)
    for what, path in (("table", args.table), ("JSON", args.json), ("CSV", args.csv), ("plot", args.plot)):
        if path:
            print(f"# wrote {what}: {path}")


def write_plot(rows: list[Row], meta: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'alltoall[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, bytes_ax) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for mode in dict.fromkeys(r.mode for r in rows):
        mine = [r for r in rows if r.mode == mode]
        sizes = [r.tokens for r in mine]
        time_ax.plot(sizes, [r.fwdbwd_us for r in mine], marker="o", label=f"{mode} fwd+bwd")
        time_ax.plot(sizes, [r.fwd_us for r in mine], marker="x", linestyle="--", label=f"{mode} fwd")
        bytes_ax.plot(sizes, [r.bytes_inter for r in mine], marker="o", label=f"{mode} inter-node")
        bytes_ax.plot(sizes, [r.bytes_intra for r in mine], marker="x", linestyle="--", label=f"{mode} intra-node")
    for ax, ylabel in ((time_ax, "time per call (us, slowest rank)"), (bytes_ax, "bytes per rank, one dispatch")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank S")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"alltoall-bench dispatch: {meta['topology']}, M={meta['hidden']} k={meta['k']} "
                 f"E={meta['experts']} max_nodes={meta['max_nodes']} routing {meta['routing']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
