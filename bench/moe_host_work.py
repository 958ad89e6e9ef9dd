"""The MoE layer's host work per training step, on one process (issue 21, item 3).

Runs ``alltoall.MoE`` as EP rank 0 of ``--ep`` ranks would, with every
exchange replaced by a local copy (as bench/moe_step.py's local-copy
control does), at moe_step's defaults (S=64, M=64, F=64, E=16, k=2,
capacity factor 1, FeedForward experts, an input that needs grad), and
prints per step:

- the CPU time (``time.thread_time``, best of ``--repeats`` runs of ``--steps``
  steps): with 8 ranks on 2 cores every microsecond of it costs about 4 of wall time;
- the torch ops dispatched (forward and backward), by name;
- the Python function calls and the C functions called from Python.

No torch.distributed and no lock needed (CPU time, one process):

    PYTHONPATH=. python bench/moe_host_work.py
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import alltoall
from alltoall.moe.experts import FeedForward, LocalExperts, replicas
from alltoall.testing.local_copy import LocalCopy


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def build(args: argparse.Namespace) -> tuple[alltoall.MoE, torch.Tensor]:
    s, m, f = (int(v) for v in args.shape.split("x"))
    torch.manual_seed(0)
    expert = FeedForward(m, f)
    layer = alltoall.MoE(m, expert, args.experts, k=args.k, capacity_factor=1.0, eval_capacity_factor=1.0,
                         min_capacity=4, overlap_degree=args.overlap)
    exchange = layer.exchange  # one process: no Communicator; stand in for rank 0 of --ep
    exchange.comm, exchange.ep, exchange.num_local = LocalCopy(args.ep), args.ep, args.experts // args.ep
    layer.experts = LocalExperts(replicas(expert, exchange.num_local), 0)
    return layer, torch.randn(s, m, requires_grad=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="64x64x64", help="SxMxF")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--ep", type=int, default=8, help="the EP size rank 0 stands in for")
    p.add_argument("--overlap", type=int, default=1)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ops", action="store_true", help="list the ops by name")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    layer, x = build(args)

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out, aux = layer(x)[:2]
        (out.square().mean() + 0.01 * aux).backward()

    for _ in range(50):
        step()
    best = float("inf")
    for _ in range(args.repeats):
        start = time.thread_time()
        for _ in range(args.steps):
            step()
        best = min(best, (time.thread_time() - start) / args.steps)

    with _OpLog() as log:
        step()
    calls: collections.Counter[str] = collections.Counter()

    def profile(frame, event, arg) -> None:
        if event in ("call", "c_call"):
            calls[event] += 1

    sys.setprofile(profile)
    step()
    sys.setprofile(None)
    print(f"alltoall from {alltoall.__file__}")
    print(f"CPU per step: {best * 1e6:.1f} us (best of {args.repeats} x {args.steps} steps)")
    print(f"torch ops per step: {sum(log.ops.values())}")
    print(f"Python calls per step: {calls['call']}; C functions called from Python: {calls['c_call']}")
    if args.ops:
        for name, count in log.ops.most_common():
            print(f"  {count:4d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
