"""alltoall-model: predicted all-to-all time per algorithm against size and
GPU count, from a cost profile (alltoall.plan.model). Nothing is run.

  alltoall-model                                     # shipped a100-ndmv4, 8..4096 GPUs
  alltoall-model --profile ~/.cache/alltoall/profile.json --gpus 8,16,32 -b 1K -e 4M -f 4
  alltoall-model --tp 2,8 --plot scale.png --json scale.json

Sizes are bytes per rank (the send buffer; for coordinated, the buffer
replicated across each TP group). Nodes hold --ranks-per-node consecutive
ranks; TP groups are consecutive ranks inside a node. "coordinated" is the
dispatch all-to-all over the EP group plus the TP all-gather that rebuilds
the replicated output (DeepSpeed-MoE section 5.3), with its chunk copies.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import alltoall
from alltoall.cli.bench_traffic import format_size, parse_size
from alltoall.plan import Profile, plan
from alltoall.plan import profile as profiles

DEFAULT_PROFILE = "a100-ndmv4"


@dataclass(frozen=True)
class Column:
    algorithm: str
    tp: int

    @property
    def name(self) -> str:
        return self.algorithm if self.algorithm != "coordinated" else f"coord tp{self.tp}"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
    return values


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alltoall-model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=None,
                   help=f"a profile file or a shipped name ({', '.join(profiles.shipped_names())}); default "
                        f"{profiles.PROFILE_ENV} when set, else {DEFAULT_PROFILE}")
    p.add_argument("--gpus", type=_int_list, default=[8 * 2**i for i in range(10)],
                   help="GPU (rank) counts, comma-separated (default 8,16,...,4096)")
    p.add_argument("--ranks-per-node", "-G", type=int, default=8, help="ranks per node (default 8)")
    p.add_argument("--tp", type=_int_list, default=[8], help="TP degrees for coordinated (default 8)")
    p.add_argument("-b", "--minbytes", type=_size, default=parse_size("1K"), help="smallest size per rank")
    p.add_argument("-e", "--maxbytes", type=_size, default=parse_size("16M"), help="largest size per rank")
    p.add_argument("-f", "--stepfactor", type=int, default=16, help="size step factor (default 16)")
    p.add_argument("--plot", metavar="FILE.png", help="time against GPU count, one panel per size")
    p.add_argument("--json", metavar="FILE", help="every prediction as JSON")
    return p


def predictions(profile: Profile, gpus: list[int], g: int, tps: list[int],
                sizes: list[int]) -> tuple[list[Column], dict[tuple[int, int], dict[str, float]]]:
    """(columns, {(gpus, size): {column name: us}}); a column that cannot
    run at a GPU count (tp not dividing it) is absent there."""
    columns = [Column("flat", 1), Column("hierarchical", 1)] + [Column("coordinated", t) for t in tps]
    out: dict[tuple[int, int], dict[str, float]] = {}
    for p in gpus:
        plans = {}
        for col in columns:
            if p % g or p % col.tp or (col.algorithm == "coordinated" and col.tp > g):
                continue
            plans[col.name] = plan(p, g, col.algorithm, col.tp)
        for size in sizes:
            out[(p, size)] = {name: summary.predict(size, profile).time_us for name, summary in plans.items()}
    return columns, out


def table_lines(profile: Profile, columns: list[Column], table: dict, gpus: list[int], sizes: list[int]) -> list[str]:
    names = [c.name for c in columns]
    lines = [f"# alltoall-model: alltoall {alltoall.__version__}, profile {profile.name} (hash {profile.hash})",
             f"# {profile.description}" if profile.description else "#",
             "# predicted us per call (max over ranks); best = lowest; x flat = flat's time / best's"]
    for size in sizes:
        lines += ["#", f"# size {format_size(size)} per rank ({size} B)",
                  f"#{'GPUs':>7}" + "".join(f"  {n:>13}" for n in names) + f"  {'best':>13}  {'x flat':>7}"]
        for p in gpus:
            row = table[(p, size)]
            cells = "".join(f"  {row[n]:>13.1f}" if n in row else f"  {'-':>13}" for n in names)
            best = min(row, key=row.__getitem__) if row else "-"
            ratio = row["flat"] / row[best] if row and "flat" in row else float("nan")
            lines.append(f" {p:>7}{cells}  {best:>13}  {ratio:>6.2f}x")
    return lines


def write_plot(path: str, profile: Profile, columns: list[Column], table: dict, gpus: list[int],
               sizes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(sizes)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4), constrained_layout=True, squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for col in columns:
            xs = [p for p in gpus if col.name in table[(p, size)]]
            ax.plot(xs, [table[(p, size)][col.name] for p in xs], marker="o", markersize=3, label=col.name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{format_size(size)} per rank")
        ax.set_xlabel("GPUs")
        ax.set_ylabel("predicted time (us)")
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"alltoall-model: profile {profile.name}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot and not _have_matplotlib():
        print("alltoall-model: --plot needs matplotlib, which is not installed: pip install 'alltoall[bench]'",
              file=sys.stderr)
        return 2
    try:
        profile = profiles.load(args.profile) if args.profile else (profiles.active() or profiles.load(DEFAULT_PROFILE))
    except ValueError as error:
        print(f"alltoall-model: {error}", file=sys.stderr)
        return 2
    if args.minbytes > args.maxbytes or args.stepfactor < 2:
        print(f"alltoall-model: need -b <= -e and -f >= 2 (got {args.minbytes}, {args.maxbytes}, {args.stepfactor})",
              file=sys.stderr)
        return 2
    sizes, size = [], args.minbytes
    while size <= args.maxbytes:
        sizes.append(size)
        size *= args.stepfactor
    try:
        columns, table = predictions(profile, args.gpus, args.ranks_per_node, args.tp, sizes)
    except ValueError as error:
        print(f"alltoall-model: {error}", file=sys.stderr)
        return 2
    print("\n".join(table_lines(profile, columns, table, args.gpus, sizes)))
    if args.json:
        doc = {"profile": profile.to_json(), "ranks_per_node": args.ranks_per_node,
               "predictions": [{"gpus": p, "size_bytes": s, "algorithm": name, "predicted_us": us}
                               for (p, s), row in table.items() for name, us in row.items()]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"# wrote JSON: {args.json}")
    if args.plot:
        write_plot(args.plot, profile, columns, table, args.gpus, sizes)
        print(f"# wrote plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
