"""Write the benchmark tables of the docs from benchmarks/results.json.

Every page that shows a measured figure takes it from there: the tables go between
``<!-- results:begin -->`` and ``<!-- results:end -->`` markers (every primitive's
tables), or ``<!-- results:begin SeqRecord -->`` and the same end marker (one
primitive's), so no page drifts from the last measured run. The pages are `PAGES`:
docs/performance.md has them all, docs/seqc.md SeqRecord's. `python -m benchmarks`
rewrites them after every run; to redo it by hand: ``python -m benchmarks.report``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._results import ROOT, Figure, figures, load

PAGE = ROOT / "docs" / "performance.md"
PAGES = (PAGE, ROOT / "docs" / "seqc.md")
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
# A generated block: its begin marker (naming a primitive, or none for all of them),
# whatever is there now, and the end marker.
BLOCK = re.compile(r"<!-- results:begin(?: (?P<only>\w+))? -->.*?<!-- results:end -->", re.S)
ORDER = ("Barrier", "BarrierGroup", "Completion", "SeqRecord", "Lock", "Semaphore")


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


def tables(data: dict[str, Any], only: str | None = None) -> str:
    """Markdown tables of every figure in `data`, or of primitive `only`'s."""
    parts: list[str] = []
    found = [f for f in figures(data) if only is None or f.primitive == only]
    for (primitive, measure), group in grouped(found).items():
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


def render(text: str, data: dict[str, Any], name: str = "page") -> str:
    """`text` with every generated block rewritten from `data`.

    Raises:
        ValueError: `text` has no block, or a block names a primitive `data` has no
            figures of (`name` says which page, in the message).
    """

    def block(match: re.Match[str]) -> str:
        only = match["only"]
        body = tables(data, only)
        if not body.strip():
            raise ValueError(f"{name}: no figures of {only or 'any primitive'} in the results")
        begin = f"<!-- results:begin {only} -->" if only else BEGIN
        return f"{begin}\n\n{body}\n{END}"

    if not BLOCK.search(text):
        raise ValueError(f"{name} has no {BEGIN} ... {END} markers")
    return BLOCK.sub(block, text)


def update(page: Path = PAGE, data: dict[str, Any] | None = None) -> None:
    """Rewrite the generated blocks of `page` from `data` (default: results.json)."""
    text = page.read_text()
    new = render(text, load() if data is None else data, str(page))
    if new != text:
        page.write_text(new)


def update_all(pages: Sequence[Path] = PAGES, data: dict[str, Any] | None = None) -> None:
    """`update` every page of `pages`, all from the same results."""
    data = load() if data is None else data
    for page in pages:
        update(page, data)


def main() -> int:
    update_all()
    print(f"report: tables written to {', '.join(str(p.relative_to(ROOT)) for p in PAGES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
