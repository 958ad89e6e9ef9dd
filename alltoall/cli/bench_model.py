"""alltoall-bench's model section: what "auto" chose at each size and, with a
cost profile, the predicted time of every modelled algorithm beside the
measured one (the validation of docs/performance.md).

Measured and predicted times are both the slowest rank's. "auto" is
predicted as the algorithm it picked. The table ends with auto's pick
against the fastest measured algorithm it could have picked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import alltoall
from alltoall.cli.bench_run import Measurement

# The algorithms the model predicts from the Communicator's own plans, and the
# ones "auto" picks among.
MODELLED = ("flat", "hierarchical", "auto")
PICKABLE = ("flat", "hierarchical")


@dataclass
class ModelSection:
    profile: str | None  # "name (hash ...)", or None without a profile
    auto: dict[int, str]  # size -> what auto picked
    predicted: dict[int, dict[str, float]] = field(default_factory=dict)  # size -> algorithm -> us

    def to_json(self, rows: list[Measurement]) -> dict:
        measured = {(r.algorithm, r.size): r.time_us for r in rows}
        return {
            "profile": self.profile,
            "auto_choice": {str(s): a for s, a in self.auto.items()},
            "predictions": [
                {"size_bytes": size, "algorithm": name, "predicted_us": us,
                 "measured_us": measured.get((name, size))}
                for size, per in self.predicted.items() for name, us in per.items()
            ],
        }


def evaluate(comm: alltoall.Communicator, sizes: list[int], element_size: int, uniform: bool) -> ModelSection:
    """What auto picks at each size (bytes per rank) and, with a profile, the
    predictions. Local: no communication."""
    auto: dict[int, str] = {}
    for size in sizes:
        per_peer = (size // element_size // comm.size) * element_size
        auto[size] = comm.resolve("auto", per_peer if uniform else None)
    if comm.profile is None:
        return ModelSection(None, auto)
    section = ModelSection(f"{comm.profile.name} (hash {comm.profile.hash})", auto)
    for size in sizes:
        per = comm.predict(size)
        per["auto"] = per[auto[size]]
        section.predicted[size] = per
    return section


def lines(section: ModelSection, rows: list[Measurement]) -> list[str]:
    """The section as table lines (all comments, so parse_table skips them)."""
    out = ["#"]
    if section.profile is None:
        out.append("# auto (no cost profile: the fixed rule of alltoall/ops/selection.py) chose:")
        out += [f"#{size:>11}  {name}" for size, name in section.auto.items()]
        return out
    measured = {(r.algorithm, r.size): r.time_us for r in rows}
    out.append(f"# Model: profile {section.profile}; predicted and measured us per call (slowest rank), "
               "error = predicted / measured - 1")
    names = [n for n in MODELLED if any((n, s) in measured for s in section.predicted)]
    head = "".join(f"  {n + ' pred':>17}  {'meas':>9}  {'err':>6}" for n in names)
    out.append(f"#{'size (B)':>11}  {'auto chose':>12}{head}  {'pick/best':>9}")
    worst_err, worst_pick = 0.0, 0.0
    for size, per in section.predicted.items():
        cells = []
        for name in names:
            got = measured.get((name, size))
            if got is None:
                cells.append(f"  {per[name]:>17.1f}  {'-':>9}  {'-':>6}")
                continue
            err = per[name] / got - 1 if got > 0 else 0.0
            worst_err = max(worst_err, abs(err))
            cells.append(f"  {per[name]:>17.1f}  {got:>9.1f}  {err:>+6.0%}")
        pickable = [measured[(n, size)] for n in PICKABLE if (n, size) in measured]
        picked = measured.get((section.auto[size], size))
        ratio = picked / min(pickable) if pickable and picked else None
        if ratio is not None:
            worst_pick = max(worst_pick, ratio)
        out.append(f"#{size:>11}  {section.auto[size]:>12}{''.join(cells)}  "
                   + (f"{ratio:>9.3f}" if ratio is not None else f"{'-':>9}"))
    out.append(f"# Worst |error| {worst_err:.0%}; worst pick/best {worst_pick:.3f} "
               "(measured time of auto's pick over the fastest of flat and hierarchical)")
    return out
