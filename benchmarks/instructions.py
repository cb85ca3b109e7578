"""Instructions per round trip, counted by valgrind's callgrind: a figure that does not
depend on how busy the machine is (the same binary and inputs give the same count).

Usage: python -m benchmarks.instructions [--kinds asyncio,uvloop] [NAME ...]
(NAME: barrier, completion, lock, group1, group4; default all)

For each primitive and loop, aiosync's round trip and the raw floor's run under callgrind
twice, with 500 and 1,500 round trips, both processes pinned to CPU 0; the difference,
divided by 1,000, is each process's cost of one round trip without start-up and
warm-up. A Lock's round trip is two hand-offs (`bench_lock.LockTurns`); its floor is
the Completion's raw eventfd ping-pong, as in `bench_lock`. ``groupN``:
`BarrierGroup.place_and_sync()` with N children against the group floor
(benchmarks.bench_group, its pidfd watch off: valgrind has no pidfd_open); the child
figure is the N children's together. Takes about a minute per line. Needs valgrind
(Debian's package); not part of `make bench`, and nothing is written to results.json.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import _common, bench_barrier, bench_completion, bench_group, bench_lock

# name -> contender -> run(kind, rounds): `rounds` round trips in a forked pair
Run = Callable[[str, int], object]


def _round_trips(make: Callable[[], _common.Contender]) -> Run:
    return lambda kind, rounds: _common.round_trip(make, kind, rounds)


CONTENDERS: dict[str, dict[str, Run]] = {
    "barrier": {
        "aiosync": _round_trips(bench_barrier.AiosyncBarrier),
        "floor": _round_trips(bench_barrier.RawFloor),
    },
    "completion": {
        "aiosync": _round_trips(bench_completion.AiosyncHandoff),
        "floor": _round_trips(bench_completion.RawFloor),
    },
    "lock": {
        "aiosync": bench_lock.turns,
        "floor": _round_trips(bench_completion.RawFloor),
    },
}
GROUPS = {"group1": 1, "group4": 4}  # name -> N children
ROUNDS = (500, 1500)


def child_main(name: str, contender: str, kind: str, rounds: int) -> None:
    """Run under callgrind: `rounds` round trips, parent and forked child on CPU 0."""
    os.sched_setaffinity(0, {0})
    if name in GROUPS:
        bench_group.WATCH_PIDS = False
        make = bench_group.CONTENDERS[contender]
        bench_group.run_group(make, GROUPS[name], kind, rounds)
    else:
        CONTENDERS[name][contender](kind, rounds)


def totals(directory: str) -> list[int]:
    """Instructions of each process that wrote an output file, parent (lowest pid) first."""
    counts = []
    paths = sorted(glob.glob(f"{directory}/out.*"), key=lambda p: int(p.rsplit(".", 1)[1]))
    for path in paths:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    counts.append(int(line.split()[1]))
                    break
    return counts


def count(name: str, contender: str, kind: str) -> tuple[float, float]:
    """(parent, child) instructions per round trip."""
    runs = []
    for rounds in ROUNDS:
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(
                [
                    "valgrind",
                    "--tool=callgrind",
                    f"--callgrind-out-file={out}/out.%p",
                    sys.executable,
                    "-m",
                    "benchmarks.instructions",
                    "--child",
                    name,
                    contender,
                    kind,
                    str(rounds),
                ],
                cwd=Path(__file__).resolve().parents[1],
                capture_output=True,
                check=True,
            )
            runs.append(totals(out))
    (parent0, *children0), (parent1, *children1) = runs
    trips = ROUNDS[1] - ROUNDS[0]
    if name in GROUPS:  # the group bench adds a warm-up of a tenth of its rounds
        low, high = (r + bench_group.warmup(r) for r in ROUNDS)
        trips = high - low
    return (parent1 - parent0) / trips, (sum(children1) - sum(children0)) / trips


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions")
    parser.add_argument("--kinds", default="asyncio,uvloop")
    parser.add_argument("--child", nargs=4, metavar=("NAME", "CONTENDER", "KIND", "ROUNDS"))
    names = [*CONTENDERS, *GROUPS]
    parser.add_argument("names", nargs="*", help=f"{', '.join(names)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(names)
    if unknown and not args.child:
        parser.error(f"unknown: {', '.join(sorted(unknown))} ({', '.join(names)})")
    if args.child:
        name, contender, kind, rounds = args.child
        child_main(name, contender, kind, int(rounds))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    print("instructions per round trip and process (parent / child), callgrind, CPU 0")
    for name in args.names or names:
        for kind in args.kinds.split(","):
            floor = count(name, "floor", kind)
            ours = count(name, "aiosync", kind)
            # A group's children run the same program against both: the parent's ratio.
            ratio = ours[0] / floor[0] if name in GROUPS else sum(ours) / sum(floor)
            print(
                f"{name:<10} {kind:<7}  aiosync {ours[0] / 1000:5.1f}k / {ours[1] / 1000:5.1f}k"
                f"   floor {floor[0] / 1000:5.1f}k / {floor[1] / 1000:5.1f}k   x {ratio:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
