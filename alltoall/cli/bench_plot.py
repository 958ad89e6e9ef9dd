"""``--plot FILE.png``: bus bandwidth and latency against message size, one
line per algorithm, log axes. matplotlib (the ``bench`` extra), Agg backend."""

from __future__ import annotations

from alltoall.cli.bench_report import BenchRun
from alltoall.cli.bench_traffic import format_size


def write_plot(run: BenchRun, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'alltoall[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, (bw_ax, lat_ax) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    markers = "osD^vx*+"
    for i, name in enumerate(run.algorithms):
        rows = run.rows_of(name)
        sizes = [r.size for r in rows]
        style = {"marker": markers[i % len(markers)], "label": name, "linewidth": 1.5, "markersize": 4}
        bw_ax.plot(sizes, [r.busbw for r in rows], **style)
        lat_ax.plot(sizes, [r.time_us for r in rows], **style)
    size_ticks = FuncFormatter(lambda v, _pos: format_size(int(v)) if v >= 1 else "")
    for ax, ylabel, values in ((bw_ax, "bus bandwidth (GB/s)", [r.busbw for r in run.rows]),
                               (lat_ax, "time per call (us, max over ranks)", [r.time_us for r in run.rows])):
        ax.set_xscale("log", base=2)
        if any(v > 0 for v in values):  # a world of one rank has busbw 0
            ax.set_yscale("log")
        ax.xaxis.set_major_formatter(size_ticks)
        ax.set_xlabel("size per rank (bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend()
    bw_ax.set_title("busbw = algbw (n-1)/n")
    lat_ax.set_title("latency")
    fig.suptitle(f"alltoall-bench: {run.topology}, {run.backend} on {run.device}, {run.dtype}, "
                 f"splits {run.splits}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
