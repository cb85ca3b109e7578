"""What the benchmarks measured, in a form the report and the chart can use.

Each benchmark calls `record` once per measured configuration: the contenders' values
(say floor, aiosync and mp.Barrier round trips in µs, pinned, on uvloop) and the
ratios checked against their targets. `python -m benchmarks` then merges the run into
``benchmarks/results.json`` primitive by primitive (a partial run keeps the others'
figures), rewrites the tables of ``docs/performance.md`` (`benchmarks.report`) and
draws ``docs/performance.png`` (`benchmarks.chart`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"


@dataclass
class Check:
    """A ratio of two values of a `Figure`, against its target."""

    label: str  # e.g. "aiosync / floor"
    ratio: float
    target: float
    at_most: bool = True

    @property
    def met(self) -> bool:
        return self.ratio <= self.target if self.at_most else self.ratio >= self.target

    def describe(self) -> str:
        sign = "<=" if self.at_most else ">="
        verdict = "met" if self.met else "MISSED"
        shown = f"{self.ratio:.2f}"
        if float(shown) == self.target:  # "1.25 (<= 1.25: MISSED)" would puzzle
            shown = f"{self.ratio:.3f}"
        return f"{self.label} {shown} ({sign} {self.target:g}: {verdict})"


@dataclass
class Figure:
    """The contenders of one measurement in one configuration."""

    primitive: str  # "Barrier", "BarrierGroup", "Completion", "SeqRecord"
    measure: str  # what was timed, e.g. "place_and_sync() round trip"
    config: str  # e.g. "pinned, uvloop"
    unit: str  # e.g. "µs per round trip"
    values: dict[str, float]  # contender -> value, floor or baseline first
    checks: list[Check] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figure:
        # "met" is stored for readers of the file; it is recomputed, never trusted.
        checks = [
            Check(c["label"], float(c["ratio"]), float(c["target"]), bool(c["at_most"]))
            for c in data.get("checks", [])
        ]
        return cls(
            primitive=data["primitive"],
            measure=data["measure"],
            config=data["config"],
            unit=data["unit"],
            values={k: float(v) for k, v in data["values"].items()},
            checks=checks,
        )


RECORDED: list[Figure] = []


@dataclass(frozen=True)
class Usage:
    """CPU seconds so far: the whole machine's, and this process's with its children.

    On a shared machine the difference between two of them says how much CPU other
    work took while a benchmark ran (a benchmark's own processes, up to five at once
    for SeqRecord, are not counted, unlike in the load average).
    """

    wall: float
    busy: float  # every process on the machine, ours included (/proc/stat)
    steal: float  # what the hypervisor gave other virtual machines instead
    ours: float  # this process and the children it waited for

    @classmethod
    def now(cls) -> Usage:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
        hz = os.sysconf("SC_CLK_TCK")
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(
            wall=time.monotonic(),
            busy=(user + nice + system + irq + softirq) / hz,
            steal=steal / hz,
            ours=own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
        )

    def others_since(self, start: Usage) -> dict[str, float]:
        """CPUs (on average, since `start`) used by other work and by other VMs."""
        wall = self.wall - start.wall
        if wall <= 0:
            return {"others": 0.0, "steal": 0.0}
        others = (self.busy - start.busy) - (self.ours - start.ours)
        steal = self.steal - start.steal
        return {"others": round(max(0.0, others) / wall, 2), "steal": round(steal / wall, 2)}


def record(
    primitive: str,
    measure: str,
    config: str,
    unit: str,
    values: dict[str, float],
    checks: list[Check] | None = None,
) -> None:
    """Keep one figure of this run (see the module docstring)."""
    RECORDED.append(Figure(primitive, measure, config, unit, dict(values), checks or []))


def load(path: Path = RESULTS) -> dict[str, Any]:
    if not path.exists():
        return {"runs": {}, "figures": []}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def figures(data: dict[str, Any]) -> list[Figure]:
    return [Figure.from_json(f) for f in data["figures"]]


def merge(
    data: dict[str, Any],
    new: list[Figure],
    quick: bool,
    busy: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """`data` with every primitive measured in `new` replaced by the new figures.

    `busy` maps a primitive to what other work took while its benchmark ran
    (`Usage.others_since`).
    """
    fresh = {f.primitive for f in new}
    kept = [Figure.from_json(f) for f in data["figures"] if f["primitive"] not in fresh]
    runs = dict(data["runs"])
    about: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0],
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "cpus": os.cpu_count(),
        "quick": quick,
    }
    for primitive in fresh:
        runs[primitive] = dict(about)
        if busy and primitive in busy:
            runs[primitive]["busy"] = busy[primitive]
    return {"runs": runs, "figures": [_as_json(f) for f in kept + new]}


def _as_json(figure: Figure) -> dict[str, Any]:
    data = asdict(figure)
    for check, stored in zip(figure.checks, data["checks"], strict=True):
        stored["met"] = check.met
    return data


def save(
    new: list[Figure],
    quick: bool,
    path: Path = RESULTS,
    busy: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    data = merge(load(path), new, quick, busy)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return data
