"""The error each low-precision exchange introduces into an MoE layer:
alltoall.MoE with dispatch_dtype / combine_dtype against the same layer in
fp32, on one process (the rows are rounded as on the wire; nothing moves).

    python bench/moe_wire_error.py [--experts 64 --k 8 --tokens 512 --hidden 512 --ffn 128 --seeds 3]

Prints, per (dispatch, combine) pair, the max and mean over tokens of the
relative error ||y_s - y*_s|| / ||y*_s|| of the output and of the input
gradient (loss <y, G>, G standard normal), and the relative error of the
whole tensor ||y - y*|| / ||y*||. Dropless, tokens and weights from a fixed
seed; the experts are the layer's FeedForward (GELU)."""

from __future__ import annotations

import argparse

import torch

import alltoall

FP8 = torch.float8_e4m3fn
PAIRS = [(torch.bfloat16, None), (torch.bfloat16, torch.bfloat16), (FP8, None), (FP8, torch.bfloat16)]


def name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", FP8: "fp8"}[dtype]


def run(args: argparse.Namespace, dispatch: torch.dtype | None, combine: torch.dtype | None, seed: int):
    torch.manual_seed(seed)
    layer = alltoall.MoE(args.hidden, num_experts=args.experts, k=args.k, ffn_hidden_size=args.ffn,
                         drop_tokens=False, dispatch_dtype=dispatch, combine_dtype=combine)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    grad = torch.randn(args.tokens, args.hidden, generator=g)
    y, _, _ = layer(x)
    (y * grad).sum().backward()
    return y.detach(), x.grad


def errors(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    per_token = (a.double() - ref.double()).norm(dim=1) / ref.double().norm(dim=1)
    whole = (a.double() - ref.double()).norm() / ref.double().norm()
    return float(per_token.max()), float(per_token.mean()), float(whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"E={args.experts} k={args.k} S={args.tokens} M={args.hidden} F={args.ffn}, dropless, "
          f"{args.seeds} seeds; relative errors against fp32 (max and mean over tokens, whole tensor)")
    print(f"{'dispatch':>8} {'combine':>8} | {'out max':>9} {'out mean':>9} {'out all':>9} | "
          f"{'grad max':>9} {'grad mean':>9} {'grad all':>9}")
    for dispatch, combine in PAIRS:
        out, grad = [], []
        for seed in range(args.seeds):
            y_ref, dx_ref = run(args, None, None, seed)
            y, dx = run(args, dispatch, combine, seed)
            out.append(errors(y, y_ref))
            grad.append(errors(dx, dx_ref))

        def agg(rows):
            return max(r[0] for r in rows), sum(r[1] for r in rows) / len(rows), max(r[2] for r in rows)

        o, gr = agg(out), agg(grad)
        print(f"{name(dispatch):>8} {name(combine):>8} | {o[0]:9.2e} {o[1]:9.2e} {o[2]:9.2e} | "
              f"{gr[0]:9.2e} {gr[1]:9.2e} {gr[2]:9.2e}")


if __name__ == "__main__":
    main()
