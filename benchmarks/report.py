"""Write the benchmark tables of docs/performance.md from benchmarks/results.json.

The tables go between the ``<!-- results:begin -->`` and ``<!-- results:end -->``
markers, so the page never drifts from the last measured run. `python -m benchmarks`
calls this after every run; to redo it by hand: ``python -m benchmarks.report``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ._results import ROOT, Figure, figures, load

PAGE = ROOT / "docs" / "performance.md"
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
ORDER = ("Barrier", "BarrierGroup", "Completion", "SeqRecord")


def _number(value: float) -> str:
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def _busy(busy: dict[str, float] | None) -> str:
    if busy is None:
        return ""
    return (
        f"; meanwhile other processes used {busy['others']:.2f} CPUs on average"
        f" and other virtual machines {busy['steal']:.2f}"
    )


def grouped(found: list[Figure]) -> dict[tuple[str, str], list[Figure]]:
    """Figures by (primitive, measure), primitives in ORDER, measures as recorded."""
    groups: dict[tuple[str, str], list[Figure]] = {}
    rank = {p: i for i, p in enumerate(ORDER)}
    for figure in sorted(found, key=lambda f: rank.get(f.primitive, len(ORDER))):
        groups.setdefault((figure.primitive, figure.measure), []).append(figure)
    return groups


def tables(data: dict[str, Any]) -> str:
    parts: list[str] = []
    for (primitive, measure), group in grouped(figures(data)).items():
        contenders = list(dict.fromkeys(name for f in group for name in f.values))
        about = data["runs"].get(primitive, {})
        parts.append(f"### {primitive}: {measure}\n")
        if about:
            quick = " (a quick run: fewer rounds)" if about.get("quick") else ""
            busy = _busy(about.get("busy"))
            parts.append(
                f"{group[0].unit}; measured {about['date']}, Python {about['python']}, "
                f"{about['machine']}{busy}{quick}.\n"
            )
        parts.append("| configuration | " + " | ".join(contenders) + " | ratio (target) |")
        parts.append("|---" * (len(contenders) + 2) + "|")
        for f in group:
            cells = [_number(f.values[c]) if c in f.values else "" for c in contenders]
            checks = "; ".join(c.describe() for c in f.checks)
            parts.append(f"| {f.config} | " + " | ".join(cells) + f" | {checks} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def update(page: Path = PAGE, data: dict[str, Any] | None = None) -> None:
    """Rewrite the generated part of `page` from `data` (default: results.json)."""
    text = page.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{page} has no {BEGIN} ... {END} markers")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    body = tables(load() if data is None else data)
    page.write_text(f"{head}{BEGIN}\n\n{body}\n{END}{tail}")


def main() -> int:
    update()
    print(f"report: tables written to {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
