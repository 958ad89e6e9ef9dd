"""A small MoE transformer block trained with expert parallelism.

The task is synthetic: each target token is the input token three positions
back, which a causal attention layer followed by the MoE feed-forward learns
in a few hundred steps. Every rank trains on its own batches; the experts
are spread over the ranks (num_experts / world per rank).

Run (CPU, gloo):

    torchrun --nproc-per-node 4 examples/moe_transformer.py

Options: ``--experts 8 --k 2 --dropless --algorithm hierarchical
--local-size 2 --steps 200``. ``--local-size 2`` emulates nodes of two
ranks, so "hierarchical" runs its two phases on one host.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch import nn

import alltoall
from alltoall.launch import init_distributed
from alltoall.moe import MoE

VOCAB, SEQ, LAG = 32, 24, 3


class Block(nn.Module):
    """Embedding, one causal self-attention layer and an MoE feed-forward, each
    pre-norm with a residual connection, then a linear head. ``[B, T] -> [B, T, V]``."""

    def __init__(self, width: int, heads: int, moe: MoE) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(SEQ, width) * 0.02)
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.moe = moe
        self.head = nn.Linear(width, VOCAB)
        self.register_buffer("causal", torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(tokens) + self.position
        q = self.norm1(h)
        h = h + self.attention(q, q, q, attn_mask=self.causal, need_weights=False)[0]
        out, aux, _ = self.moe(self.norm2(h))
        return self.head(h + out), aux


def batch(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (size, SEQ), generator=generator)
    target = torch.roll(tokens, LAG, dims=1)
    target[:, :LAG] = -100  # nothing to copy yet
    return tokens, target


def average_gradients(model: Block, world: int) -> None:
    """Replicated parameters: mean over ranks. Experts: each owner already
    holds the sum of every rank's contribution, so only the 1/world of the mean."""
    expert_params = {id(p) for p in model.moe.experts.parameters()}
    for p in model.parameters():
        if p.grad is None:
            continue
        if id(p) not in expert_params:
            dist.all_reduce(p.grad)
        p.grad /= world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank and step")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--dropless", action="store_true", help="drop_tokens=False (all-to-all-v)")
    parser.add_argument("--algorithm", default="auto", choices=["auto", "flat", "hierarchical"])
    parser.add_argument("--local-size", type=int, default=None, help="emulate nodes of this many ranks")
    parser.add_argument("--aux-coef", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    info = init_distributed()
    rank, world = info.rank, info.world_size
    torch.set_num_threads(1)
    comm = alltoall.Communicator(local_size=args.local_size)
    torch.manual_seed(args.seed)  # the same replicated weights on every rank
    moe = MoE(args.width, num_experts=args.experts, k=args.k, ffn_hidden_size=2 * args.width,
              capacity_factor=1.25, drop_tokens=not args.dropless, use_residual=True, ep_group=comm,
              algorithm=args.algorithm)
    model = Block(args.width, 4, moe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(args.seed * 1000 + rank)
    if rank == 0:
        print(f"world {world}, {moe.num_local_experts} of {args.experts} experts per rank, k={args.k}, "
              f"{'dropless' if args.dropless else 'capacity factor 1.25'}, algorithm {args.algorithm}, "
              f"nodes {comm.topology.num_nodes} x {comm.topology.ranks_per_node}", flush=True)

    start = time.monotonic()
    for step in range(1, args.steps + 1):
        tokens, target = batch(data, args.batch)
        logits, aux = model(tokens)
        task = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        (task + args.aux_coef * aux).backward()
        average_gradients(model, world)
        optimizer.step()
        if step % 25 == 0 or step == 1:
            report = torch.stack([task.detach(), aux.detach()])
            dist.all_reduce(report)
            report /= world
            if rank == 0:
                print(f"step {step:4d}  loss {report[0]:.4f}  aux {report[1]:.4f}  "
                      f"{time.monotonic() - start:.1f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
