"""`make bench`: run every benchmark module (benchmarks/bench_*.py) in turn.

Usage: python -m benchmarks [--quick] [NAME ...]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("names", nargs="*", help="only these (e.g. barrier completion seqc)")
    args = parser.parse_args(argv)
    here = Path(__file__).parent
    modules = sorted(
        m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_")
    )
    for name in modules:
        if args.names and name.removeprefix("bench_") not in args.names:
            continue
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"\n=== {name} ===", flush=True)
        module.main(["--quick"] if args.quick else [])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
