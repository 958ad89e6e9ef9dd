"""alltoall-bench's model section: what "auto" chose at each size and, with a
cost profile, the predicted time of every modelled algorithm beside the
measured one (the validation of docs/performance.md).

One block per transport of ``--transports`` (runners "flat", "flat-c10d",
...): each Communicator predicts with its own phases' link classes.
Measured and predicted times are both the slowest rank's. "auto" is
predicted as the algorithm it picked. Each row ends with auto's pick
against the fastest measured algorithm it could have picked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import alltoall
from alltoall.cli.bench_run import Measurement

# The algorithms the model predicts from a Communicator's own plans, and the
# ones "auto" picks among.
MODELLED = ("flat", "hierarchical", "auto")
PICKABLE = ("flat", "hierarchical")


def runner(algorithm: str, suffix: str) -> str:
    """The bench's runner name: "flat" for the first transport, "flat-c10d" after."""
    return algorithm + suffix


@dataclass
class ModelSection:
    profile: str | None  # "name (hash ...)", or None without a profile
    # transport suffix ("" for the first transport, "-c10d", ...) -> size -> what auto picked
    auto: dict[str, dict[int, str]]
    # size -> runner name -> predicted us
    predicted: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_json(self, rows: list[Measurement]) -> dict:
        measured = {(r.algorithm, r.size): r.time_us for r in rows}
        return {
            "profile": self.profile,
            "auto_choice": {runner("auto", suffix): {str(s): a for s, a in picks.items()}
                            for suffix, picks in self.auto.items()},
            "predictions": [
                {"size_bytes": size, "algorithm": name, "predicted_us": us,
                 "measured_us": measured.get((name, size))}
                for size, per in self.predicted.items() for name, us in per.items()
            ],
        }


def evaluate(comms: dict[str, alltoall.Communicator], sizes: list[int], element_size: int,
             uniform: bool) -> ModelSection:
    """What auto picks at each size (bytes per rank) on each transport's
    Communicator and, with a profile, the predictions. Local: no communication."""
    first = next(iter(comms.values()))
    section = ModelSection(None if first.profile is None else f"{first.profile.name} (hash {first.profile.hash})",
                           {})
    for i, (transport, comm) in enumerate(comms.items()):
        suffix = "" if i == 0 else f"-{transport}"
        picks: dict[int, str] = {}
        for size in sizes:
            per_peer = (size // element_size // comm.size) * element_size
            picks[size] = comm.resolve("auto", per_peer if uniform else None)
            if comm.profile is not None:
                per = comm.predict(size)
                per["auto"] = per[picks[size]]
                section.predicted.setdefault(size, {}).update({runner(a, suffix): us for a, us in per.items()})
        section.auto[suffix] = picks
    return section


def _block(section: ModelSection, suffix: str, measured: dict[tuple[str, int], float]) -> tuple[list[str], float,
                                                                                                float]:
    names = [runner(n, suffix) for n in MODELLED
             if any((runner(n, suffix), s) in measured for s in section.predicted)]
    head = "".join(f"  {n + ' pred':>22}  {'meas':>9}  {'err':>5}" for n in names)
    out = [f"#{'size (B)':>11}  {'auto' + suffix + ' chose':>17}{head}  {'pick/best':>9}"]
    worst_err, worst_pick = 0.0, 0.0
    for size, per in section.predicted.items():
        cells = []
        for name in names:
            got = measured.get((name, size))
            if got is None or name not in per:
                cells.append(f"  {per.get(name, float('nan')):>22.1f}  {'-':>9}  {'-':>5}")
                continue
            err = per[name] / got - 1 if got > 0 else 0.0
            worst_err = max(worst_err, abs(err))
            cells.append(f"  {per[name]:>22.1f}  {got:>9.1f}  {err:>+5.0%}")
        pick = section.auto[suffix][size]
        pickable = [measured[(runner(n, suffix), size)] for n in PICKABLE if (runner(n, suffix), size) in measured]
        picked = measured.get((runner(pick, suffix), size))
        ratio = picked / min(pickable) if pickable and picked else None
        if ratio is not None:
            worst_pick = max(worst_pick, ratio)
        out.append(f"#{size:>11}  {pick:>17}{''.join(cells)}  " + (f"{ratio:>9.3f}" if ratio else f"{'-':>9}"))
    return out, worst_err, worst_pick


def lines(section: ModelSection, rows: list[Measurement]) -> list[str]:
    """The section as table lines (all comments, so parse_table skips them)."""
    out = ["#"]
    if section.profile is None:
        out.append("# auto (no cost profile: the fixed rule of alltoall/ops/selection.py) chose:")
        suffixes = list(section.auto)
        out.append(f"#{'size (B)':>11}" + "".join(f"  {runner('auto', s):>14}" for s in suffixes))
        for size in next(iter(section.auto.values())):
            out.append(f"#{size:>11}" + "".join(f"  {section.auto[s][size]:>14}" for s in suffixes))
        return out
    measured = {(r.algorithm, r.size): r.time_us for r in rows}
    out.append(f"# Model: profile {section.profile}; predicted and measured us per call (slowest rank), "
               "err = predicted / measured - 1; pick/best = measured time of auto's pick over the fastest "
               "of flat and hierarchical")
    worst_err, worst_pick = 0.0, 0.0
    for suffix in section.auto:
        block, err, pick = _block(section, suffix, measured)
        out += block
        worst_err, worst_pick = max(worst_err, err), max(worst_pick, pick)
    out.append(f"# Worst |err| {worst_err:.0%}; worst pick/best {worst_pick:.3f}")
    return out
