"""A timeline of one MoE training step per rank, from torch.profiler traces:
the experts' chunks (the calling thread) and the exchanges (the
Communicator's progress thread, or inline on the caller when nothing else
is in flight), for each overlap degree asked for. It shows the schedule; it
is not a timing claim.

    torchrun --nproc-per-node 4 bench/moe_timeline.py --overlap 1,4 --out docs/img/moe-overlap-timeline.png

Every rank profiles one step after a warm-up and exports its trace; rank 0
gathers the events and draws one panel per overlap degree, two lanes per
rank. ``--traces DIR`` keeps the raw Chrome traces.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

import alltoall
from alltoall.launch import init_distributed

STEP = "moe_step"


def _events(trace_path: str) -> list[tuple[str, float, float, int]]:
    """(name, start us, duration us, lane) of our events, relative to the
    step; lane 0 is the thread that ran the step, 1 the progress thread."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    step = next(e for e in events if e.get("name") == STEP and e.get("ph") == "X")
    ours = []
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and (name.startswith("alltoall::") or name.startswith("alltoall.moe.experts")):
            lane = 0 if e["tid"] == step["tid"] else 1  # the caller's thread, or the progress thread
            ours.append((name, float(e["ts"]) - float(step["ts"]), float(e["dur"]), lane))
    return ours


def _profile_step(layer: alltoall.MoE, x: torch.Tensor, trace_path: str) -> list:
    for _ in range(3):  # warm-up
        out, aux, _ = layer(x)
        (out.square().mean() + 0.01 * aux).backward()
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(STEP):
            out, aux, _ = layer(x)
            (out.square().mean() + 0.01 * aux).backward()
            layer.exchange.comm.synchronize()
    prof.export_chrome_trace(trace_path)
    return _events(trace_path)


def _plot(per_degree: dict[int, list[list]], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    degrees = sorted(per_degree)
    ranks = len(per_degree[degrees[0]])
    fig, axes = plt.subplots(len(degrees), 1, figsize=(11, 1.1 + 0.55 * 2 * ranks * len(degrees)), squeeze=False)
    colors = {"experts forward": "tab:green", "experts backward": "tab:olive", "exchange": "tab:blue",
              "all_gather": "tab:purple"}
    for ax, degree in zip(axes[:, 0], degrees, strict=True):
        end = 0.0
        for rank, events in enumerate(per_degree[degree]):
            for name, start, dur, thread in events:
                if name.startswith("alltoall.moe.experts"):
                    kind = "experts backward" if "backward" in name else "experts forward"
                    lane = 2 * rank
                else:
                    kind = "all_gather" if "all_gather" in name else "exchange"
                    lane = 2 * rank + thread
                ax.broken_barh([(start / 1e3, dur / 1e3)], (lane + 0.1, 0.8), color=colors[kind])
                end = max(end, (start + dur) / 1e3)
        ax.set_yticks([2 * r + 0.5 for r in range(ranks)] + [2 * r + 1.5 for r in range(ranks)])
        ax.set_yticklabels([f"rank {r} caller" for r in range(ranks)] + [f"rank {r} progress" for r in range(ranks)],
                           fontsize=7)
        ax.set_xlim(0, end * 1.02)
        ax.invert_yaxis()
        ax.set_title(f"overlap_degree={degree}", fontsize=9)
        ax.set_xlabel("ms since the step began")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc="upper right", fontsize=8, ncol=4)
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overlap", default="1,4")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--transport", default="auto")
    p.add_argument("--algorithm", default="flat")
    p.add_argument("--out", default="moe-overlap-timeline.png")
    p.add_argument("--traces", help="keep every rank's Chrome trace in this directory")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    comm = alltoall.Communicator(transport=args.transport)
    folder = args.traces or tempfile.mkdtemp(prefix="moe-timeline-")
    os.makedirs(folder, exist_ok=True)
    per_degree = {}
    for degree in (int(v) for v in args.overlap.split(",")):
        torch.manual_seed(0)
        layer = alltoall.MoE(args.hidden, num_experts=args.experts, k=2, ffn_hidden_size=args.ffn, ep_group=comm,
                             algorithm=args.algorithm, overlap_degree=degree)
        x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank))
        events = _profile_step(layer, x, os.path.join(folder, f"overlap{degree}-rank{rank}.json"))
        gathered: list = [None] * world
        dist.all_gather_object(gathered, events)
        per_degree[degree] = gathered
    if rank == 0:
        title = (f"MoE step, {world} ranks, S={args.tokens} M={args.hidden} F={args.ffn} E={args.experts} k=2, "
                 f"{args.transport}/{args.algorithm}")
        _plot(per_degree, args.out, title)
        print(f"wrote {args.out}; traces in {folder}")
    comm.synchronize()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
