"""alltoall-bench output: the nccl-tests style table, the closing summary,
and the JSON and CSV files. Pure formatting; rank 0 calls it.

The JSON layout is documented in docs/bench.md and checked by
docs/bench.schema.json.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field

from alltoall.cli.bench_model import ModelSection
from alltoall.cli.bench_model import lines as model_lines
from alltoall.cli.bench_run import Measurement

SCHEMA_ID = "alltoall-bench/1"
BASELINE = "torch"

_HEAD = ("#{:>11}  {:>12}  {:>8}  {:>10}  {:>9}  {:>9}  {:>6}")
_ROW = (" {:>11d}  {:>12d}  {:>8}  {:>10.1f}  {:>9.4f}  {:>9.4f}  {:>6}")


@dataclass
class BenchRun:
    """Everything a report needs: the setting, the rows, what was skipped."""

    argv: list[str]
    world_size: int
    launcher: str
    backend: str
    device: str
    topology: str
    local_size: int | None
    tp: int
    build: list[str]
    dtype: str
    element_size: int
    splits: str
    receive_imbalance: float
    iterations: int
    rounds: int
    warmup: int
    checks: int
    seed: int
    threads: int
    algorithms: dict[str, str]  # name -> description, for those that ran
    skipped: dict[str, str]  # name -> reason
    rows: list[Measurement] = field(default_factory=list)
    model: ModelSection | None = None

    def rows_of(self, algorithm: str) -> list[Measurement]:
        return [r for r in self.rows if r.algorithm == algorithm]

    @property
    def sizes(self) -> list[int]:
        return sorted({r.size for r in self.rows})

    @property
    def wrong_total(self) -> int:
        return sum(r.wrong or 0 for r in self.rows)

    def average_busbw(self, algorithm: str) -> float:
        rows = self.rows_of(algorithm)
        return sum(r.busbw for r in rows) / len(rows) if rows else 0.0

    def speedups(self) -> dict[str, dict[int, float]]:
        """time(torch) / time(algorithm) at every size: > 1 is faster than the
        baseline. Empty when the baseline did not run."""
        base = {r.size: r.time_us for r in self.rows_of(BASELINE)}
        if not base:
            return {}
        return {name: {r.size: base[r.size] / r.time_us for r in self.rows_of(name) if r.time_us > 0}
                for name in self.algorithms}


def header_lines(run: BenchRun) -> list[str]:
    place = {"self": f"{run.world_size} local processes", "mpi": "mpiexec (mpi4py)", "slurm": "srun"}.get(
        run.launcher, run.launcher)
    lines = [
        "# alltoall-bench: all-to-all, out-of-place, nccl-tests alltoall_perf conventions",
        *(f"# {line}" for line in run.build),
        f"# world: {run.world_size} ranks, launched by {place}, backend {run.backend} on {run.device}, "
        f"{run.threads} thread(s) per process",
        f"# topology: {run.topology}" + (f" (--local-size {run.local_size})" if run.local_size else ""),
        f"# dtype {run.dtype} ({run.element_size} B), splits {run.splits}"
        + ("" if run.splits == "uniform" else f" (busiest receiver gets {run.receive_imbalance:.2f}x the mean)")
        + f", tp {run.tp}",
        f"# iterations {run.iterations} in {run.rounds} round(s), warm-ups {run.warmup}, "
        f"check iterations {run.checks}, seed {run.seed}; "
        "time = max over ranks of each rank's mean per call",
    ]
    for name, reason in run.skipped.items():
        lines.append(f"# skipped {name}: {reason}")
    return lines


def table_lines(run: BenchRun, algorithm: str) -> list[str]:
    lines = [
        "#",
        f"# algorithm: {algorithm}  ({run.algorithms[algorithm]})",
        _HEAD.format("size", "count", "type", "time", "algbw", "busbw", "#wrong"),
        _HEAD.format("(B)", "(elements)", "", "(us)", "(GB/s)", "(GB/s)", ""),
    ]
    for r in run.rows_of(algorithm):
        wrong = "N/A" if r.wrong is None else str(r.wrong)
        lines.append(_ROW.format(r.size, r.count, run.dtype, r.time_us, r.algbw, r.busbw, wrong))
    return lines


def summary_lines(run: BenchRun) -> list[str]:
    lines = ["#", "# Summary", "# Avg bus bandwidth (GB/s):"]
    for name in run.algorithms:
        lines.append(f"#   {name:<18} {run.average_busbw(name):.4f}")
    speedups = run.speedups()
    if speedups:
        names = [n for n in run.algorithms if n != BASELINE]
        lines.append(f"# Speed-up against {BASELINE} (time of {BASELINE} / time; > 1 is faster), "
                     f"and time minus {BASELINE}'s (us):")
        lines.append("#" + f"{'size (B)':>11}" + "".join(f"  {n:>18}" for n in names))
        base = {r.size: r.time_us for r in run.rows_of(BASELINE)}
        for size in run.sizes:
            cells = []
            for name in names:
                ratio = speedups[name].get(size)
                row = next((r for r in run.rows_of(name) if r.size == size), None)
                if ratio is None or row is None:
                    cells.append(f"  {'-':>18}")
                else:
                    cells.append(f"  {f'{ratio:.3f}x {row.time_us - base[size]:+.0f}':>18}")
            lines.append(f"#{size:>11}" + "".join(cells))
    else:
        lines.append(f"# No speed-ups: the baseline '{BASELINE}' did not run.")
    checked = any(r.wrong is not None for r in run.rows)
    if checked:
        status = "OK" if run.wrong_total == 0 else "FAILED"
        lines.append(f"# Wrong elements: {run.wrong_total} {status}")
    else:
        lines.append("# Wrong elements: N/A (check iterations = 0)")
    return lines


def report_text(run: BenchRun) -> str:
    lines = header_lines(run)
    for name in run.algorithms:
        lines += table_lines(run, name)
    lines += summary_lines(run)
    if run.model is not None:
        lines += model_lines(run.model, run.rows)
    return "\n".join(lines) + "\n"


def to_json(run: BenchRun) -> dict:
    """The document ``--json`` writes (schema: docs/bench.schema.json)."""
    speedups = run.speedups()
    return {
        "schema": SCHEMA_ID,
        "command": run.argv,
        "world_size": run.world_size,
        "launcher": run.launcher,
        "backend": run.backend,
        "device": run.device,
        "topology": run.topology,
        "local_size": run.local_size,
        "tp": run.tp,
        "build": run.build,
        "threads_per_process": run.threads,
        "dtype": run.dtype,
        "element_size": run.element_size,
        "splits": run.splits,
        "receive_imbalance": run.receive_imbalance,
        "iterations": run.iterations,
        "rounds": run.rounds,
        "warmup": run.warmup,
        "check_iterations": run.checks,
        "seed": run.seed,
        "baseline": BASELINE,
        "algorithms": [
            {"name": name, "status": "ran", "description": desc, "reason": None,
             "average_busbw_gbps": run.average_busbw(name),
             "results": [_row_json(r, speedups.get(name, {}).get(r.size)) for r in run.rows_of(name)]}
            for name, desc in run.algorithms.items()
        ] + [
            {"name": name, "status": "skipped", "description": None, "reason": reason,
             "average_busbw_gbps": None, "results": []}
            for name, reason in run.skipped.items()
        ],
        "wrong_total": run.wrong_total if any(r.wrong is not None for r in run.rows) else None,
        **({"model": run.model.to_json(run.rows)} if run.model is not None else {}),
    }


def _row_json(r: Measurement, speedup: float | None) -> dict:
    return {
        "size_bytes": r.size, "count": r.count, "time_us": r.time_us, "time_us_avg": r.time_us_avg,
        "time_us_min": r.time_us_min, "algbw_gbps": r.algbw, "busbw_gbps": r.busbw, "wrong": r.wrong,
        "speedup_vs_baseline": speedup,
    }


def write_json(run: BenchRun, path: str) -> None:
    with open(path, "w") as f:
        json.dump(to_json(run), f, indent=2)
        f.write("\n")


CSV_FIELDS = ["algorithm", "size_bytes", "count", "dtype", "time_us", "time_us_avg", "time_us_min",
              "algbw_gbps", "busbw_gbps", "wrong"]


def write_csv(run: BenchRun, path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in run.rows:
            writer.writerow([r.algorithm, r.size, r.count, run.dtype, f"{r.time_us:.3f}", f"{r.time_us_avg:.3f}",
                             f"{r.time_us_min:.3f}", f"{r.algbw:.6f}", f"{r.busbw:.6f}",
                             "" if r.wrong is None else r.wrong])


def parse_table(text: str) -> dict[str, list[dict]]:
    """Rows per algorithm from the text table (what the tests and scripts
    read back): size, count, type, time_us, algbw, busbw, wrong (None for N/A)."""
    tables: dict[str, list[dict]] = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("# algorithm: "):
            current = line[len("# algorithm: "):].split()[0]
            tables[current] = []
        elif line.startswith("#") or not line.strip():
            continue
        elif current is not None:
            size, count, dtype, time_us, algbw, busbw, wrong = line.split()
            tables[current].append({
                "size": int(size), "count": int(count), "type": dtype, "time_us": float(time_us),
                "algbw": float(algbw), "busbw": float(busbw), "wrong": None if wrong == "N/A" else int(wrong),
            })
    return tables
