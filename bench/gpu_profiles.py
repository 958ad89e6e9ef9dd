"""Builds the shipped GPU profiles (alltoall/plan/profiles/*.json) from
published figures, so every number in them can be traced and re-derived.

    .venv/bin/python bench/gpu_profiles.py            # rewrite the files
    .venv/bin/python bench/gpu_profiles.py --check    # exit 1 if they differ

A100 NDmv4 (../shared/reference/ANCHORS.md, "NCCL and torch.distributed",
and BASELINES.md, "Published GPU figures"): NCCL 2.17 AllToAll latency at
1 KB is 9.34 us on 1x8 GPUs and 49.75 us on 2x8; busbw at 1 GB is 254.7 and
37.8 GB/s. nccl-tests sizes are powers of two (1 KB = 1024 B, 1 GB = 2^30 B)
and busbw = size / time * (n-1)/n.

The flat plan's model, solved exactly at those four points:
  1x8: 7 nvlink messages of b/8:            T = 7 a_nv + (7/8) b / B_nv
  2x8: 7 nvlink + 8 net messages of b/16:   T = 7 a_nv + 8 a_net + (7/16) b / B_nv + (8/16) b / B_net
Two sizes per setting give alpha and bandwidth of each class.

Not in the reference files, stated as assumptions in the profile and in
docs/performance.md: the device copy pass (1000 GB/s effective, half an
A100-80GB's 2 TB/s HBM2e peak since a copy reads and writes every byte, and
5 us per pass for the kernel launch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alltoall.plan.profile import LinkCost, Profile

OUT = Path(__file__).resolve().parent.parent / "alltoall" / "plan" / "profiles"
KB, GB = 1024, 1 << 30


def _solve(t_small: float, t_large: float, b_small: float, b_large: float, messages: float,
           byte_share: float, known_small: float, known_large: float) -> LinkCost:
    """alpha, bandwidth of one class from two sizes: T(b) = known(b) + m a + share b / B."""
    slope = ((t_large - known_large) - (t_small - known_small)) / (b_large - b_small)  # us per byte of b
    us_per_byte = slope / byte_share
    alpha = ((t_small - known_small) - byte_share * b_small * us_per_byte) / messages
    return LinkCost(alpha_us=round(alpha, 4), gbps=round(1.0 / (us_per_byte * 1e3), 3))


def a100_ndmv4() -> Profile:
    n1, n2 = 8, 16
    t1_small, t1_large = 9.34, GB * (n1 - 1) / n1 / (254.7e3)  # us; 254.7 GB/s = 254.7e3 B/us
    t2_small, t2_large = 49.75, GB * (n2 - 1) / n2 / (37.8e3)
    nvlink = _solve(t1_small, t1_large, KB, GB, 7, 7 / 8, 0.0, 0.0)
    nv_small = nvlink.time_us(7, KB * 7 / 16)
    nv_large = nvlink.time_us(7, GB * 7 / 16)
    net = _solve(t2_small, t2_large, KB, GB, 8, 8 / 16, nv_small, nv_large)
    return Profile(
        name="a100-ndmv4",
        description="Azure NDm A100 v4 (8 A100 per node, NVLink within a node, InfiniBand between nodes), "
                    "NCCL 2.17; fitted exactly to NCCL AllToAll at 1 KB and 1 GB on 1x8 and 2x8 GPUs",
        links={"nvlink": nvlink, "net": net},
        copy=LinkCost(alpha_us=5.0, gbps=1000.0),
        intra_node="nvlink",
        inter_node="net",
        sources=(
            "NCCL 2.17 AllToAll on A100 NDmv4: 9.34 us at 1 KB on 1x8, 49.75 us at 1 KB on 2x8; busbw 254.7 GB/s "
            "(1x8) and 37.8 GB/s (2x8) at 1 GB (reference/ANCHORS.md 'NCCL and torch.distributed'; "
            "reference/BASELINES.md 'Published GPU figures')",
            "cross-check, not fitted: Tutel paper, 200 Gb/s InfiniBand per A100 GPU on Azure = 25 GB/s "
            "(reference/ANCHORS.md 'Published numbers'); the fitted net bandwidth is below it, as an "
            "all-to-all over IB does not reach line rate",
            "assumption, not from the references: copy pass at 1000 GB/s (half the 2 TB/s HBM2e peak of an "
            "A100-80GB, a copy reads and writes every byte) plus 5 us per pass (kernel launch)",
        ),
        fit={"method": "exact solve of the flat plan's model at the four published points "
                       "(bench/gpu_profiles.py)"},
    )


PROFILES = {"a100-ndmv4": a100_ndmv4}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = parser.parse_args(argv)
    status = 0
    for name, build in PROFILES.items():
        path = OUT / f"{name}.json"
        text = json.dumps(build().to_json(), indent=2) + "\n"
        if args.check:
            if not path.exists() or path.read_text() != text:
                print(f"{path} differs from what bench/gpu_profiles.py builds", file=sys.stderr)
                status = 1
        else:
            path.write_text(text)
            print(f"wrote {path}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
