"""`make bench`: run every benchmark module (benchmarks/bench_*.py) in turn.

Then merge what they measured into benchmarks/results.json, rewrite the tables of
docs/performance.md and of every other page that shows figures (`report.PAGES`) and
redraw docs/performance.png (skipped, with a note, when
matplotlib is not installed, or with --no-chart).

Usage: python -m benchmarks [--quick] [--no-chart] [NAME ...]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path

from . import _results, chart, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--no-chart", action="store_true", help="do not redraw the chart")
    parser.add_argument("names", nargs="*", help="only these (e.g. barrier group completion seqc)")
    args = parser.parse_args(argv)
    busy: dict[str, dict[str, float]] = {}  # primitive -> CPUs other work took meanwhile
    here = Path(__file__).parent
    modules = sorted(
        m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")
    )
    unknown = set(args.names) - {m.removeprefix("bench_") for m in modules}
    if unknown:
        parser.error(f"no benchmark {', '.join(sorted(unknown))} (benchmarks/bench_NAME.py)")
    for name in modules:
        if args.names and name.removeprefix("bench_") not in args.names:
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"\n=== {name} ===", flush=True)
        first, start = len(_results.RECORDED), _results.Usage.now()
        module.main(["--quick"] if args.quick else [])
        others = _results.Usage.now().others_since(start)
        for figure in _results.RECORDED[first:]:
            busy[figure.primitive] = others
    sys.stdout.flush()
    if _results.RECORDED:
        publish(_results.RECORDED, args.quick, draw=not args.no_chart, busy=busy)


def publish(
    found: list[_results.Figure],
    quick: bool,
    draw: bool = True,
    results: Path = _results.RESULTS,
    pages: Sequence[Path] = report.PAGES,
    png: Path = chart.PNG,
    busy: dict[str, dict[str, float]] | None = None,
) -> None:
    """Merge `found` into results.json, rewrite the pages' tables, redraw the chart."""
    data = _results.save(found, quick, results, busy)
    print(f"\nresults: {_shown(results)}")
    report.update_all(pages, data)
    print(f"report: {', '.join(_shown(page) for page in pages)}")
    if not draw:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("chart: skipped (matplotlib is not installed: pip install -e '.[bench]')")
        return
    print(f"chart: {_shown(chart.draw(data, png))}")


def _shown(path: Path) -> str:
    return str(path.relative_to(_results.ROOT) if path.is_relative_to(_results.ROOT) else path)


if __name__ == "__main__":
    main()
