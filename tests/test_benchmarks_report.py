"""The benchmark results pipeline: merge, tables, chart (on synthetic figures).

No timing here: the figures are made up; what is tested is that a run's figures land
in results.json without losing the other primitives', that docs/performance.md's
tables are regenerated between their markers, and that the chart is a PNG.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from benchmarks import _results, chart, report
from benchmarks._results import Check, Figure

# matplotlib is in the `bench` extra only (the chart is all it is for): without it the
# tests that draw are skipped, and the rest of the publishing step is still tested.
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed (only the chart needs it: pip install -e '.[bench]')",
)


def barrier(config: str, aiosync: float) -> Figure:
    return Figure(
        "Barrier",
        "place_and_sync() round trip",
        config,
        "µs per round trip",
        {"floor": 10.0, "aiosync": aiosync, "mp.Barrier": 60.0},
        [Check("aiosync / floor", aiosync / 10.0, 1.25)],
    )


def seqrecord() -> Figure:
    return Figure(
        "SeqRecord",
        "reading",
        "pinned",
        "ns per read",
        {"floor": 70.0, "read_nowait()": 90.0},
        [Check("Lock read / read_nowait", 3.2, 2.5, at_most=False)],
    )


def test_checks_describe_their_verdict() -> None:
    assert Check("a / b", 1.2, 1.25).describe() == "a / b 1.20 (<= 1.25: met)"
    assert Check("a / b", 1.254, 1.25).describe() == "a / b 1.254 (<= 1.25: MISSED)"
    assert Check("x", 2.0, 2.5, at_most=False).describe() == "x 2.00 (>= 2.5: MISSED)"


def test_a_partial_run_keeps_the_other_primitives(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    _results.save([barrier("pinned, asyncio", 15.0), seqrecord()], quick=False, path=path)
    data = _results.save([barrier("pinned, asyncio", 12.0)], quick=True, path=path)
    assert json.loads(path.read_text()) == data
    found = _results.figures(data)
    assert [(f.primitive, f.values.get("aiosync")) for f in found] == [
        ("SeqRecord", None),
        ("Barrier", 12.0),  # replaced, not added
    ]
    assert data["runs"]["Barrier"]["quick"] is True
    assert data["runs"]["SeqRecord"]["quick"] is False


def test_tables_go_between_the_markers(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    page.write_text(f"# Title\n\nbefore\n\n{report.BEGIN}\nold stuff\n{report.END}\n\nafter\n")
    data = _results.merge(
        {"runs": {}, "figures": []},
        [barrier("pinned, asyncio", 15.0), barrier("pinned, uvloop", 11.0), seqrecord()],
        quick=False,
    )
    report.update(page, data)
    text = page.read_text()
    assert text.startswith("# Title\n\nbefore\n\n")
    assert text.endswith(f"{report.END}\n\nafter\n")
    assert "old stuff" not in text
    assert "### Barrier: place_and_sync() round trip" in text
    assert "| configuration | floor | aiosync | mp.Barrier | ratio (target) |" in text
    assert (
        "| pinned, asyncio | 10.0 | 15.0 | 60.0 | aiosync / floor 1.50 (<= 1.25: MISSED) |" in text
    )
    assert "| pinned, uvloop | 10.0 | 11.0 | 60.0 | aiosync / floor 1.10 (<= 1.25: met) |" in text
    assert text.index("### Barrier") < text.index("### SeqRecord")
    report.update(page, data)  # idempotent
    assert page.read_text() == text


def test_a_page_without_markers_is_refused(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    page.write_text("# no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.update(page, {"runs": {}, "figures": []})


@needs_matplotlib
def test_the_chart_is_a_png(tmp_path: Path) -> None:
    data = _results.merge(
        {"runs": {}, "figures": []},
        [barrier("pinned, asyncio", 15.0), barrier("unpinned, uvloop", 9.0), seqrecord()],
        quick=False,
    )
    png = chart.draw(data, tmp_path / "chart.png")
    content = png.read_bytes()
    assert content.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(content) > 10_000


def test_the_published_results_make_a_report() -> None:
    """The committed results.json is well formed and covers every primitive."""
    data = _results.load()
    primitives = {f.primitive for f in _results.figures(data)}
    assert primitives == {"Barrier", "BarrierGroup", "Completion", "SeqRecord", "Lock", "Semaphore"}
    assert set(data["runs"]) == primitives
    assert "### Completion" in report.tables(data)


def test_a_block_can_hold_one_primitive(tmp_path: Path) -> None:
    data = _results.merge(
        {"runs": {}, "figures": []},
        [barrier("pinned, asyncio", 15.0), seqrecord()],
        quick=False,
    )
    page = tmp_path / "seqc.md"
    page.write_text(
        f"# SeqRecord\n\n<!-- results:begin SeqRecord -->\nold\n{report.END}\n\n"
        f"and all:\n\n{report.BEGIN}\n{report.END}\n"
    )
    report.update(page, data)
    text = page.read_text()
    one, _, every = text.partition("and all:")
    assert one.startswith("# SeqRecord\n\n<!-- results:begin SeqRecord -->\n\n### SeqRecord")
    assert "old" not in one
    assert "### Barrier" not in one
    assert "### Barrier" in every
    assert "### SeqRecord" in every
    report.update(page, data)  # idempotent, the primitive kept in the marker
    assert page.read_text() == text


def test_a_block_of_a_primitive_never_measured_is_refused(tmp_path: Path) -> None:
    data = _results.merge({"runs": {}, "figures": []}, [seqrecord()], quick=False)
    page = tmp_path / "lock.md"
    text = f"<!-- results:begin Lock -->\n{report.END}\n"
    page.write_text(text)
    with pytest.raises(ValueError, match="no figures of Lock"):
        report.update(page, data)
    assert page.read_text() == text  # untouched


def test_the_committed_pages_agree_with_the_committed_results() -> None:
    """Running the report on the committed results.json changes no page."""
    data = _results.load()
    for page in report.PAGES:
        text = page.read_text()
        assert report.BLOCK.search(text), f"{page.name} has no generated block"
        assert report.render(text, data, page.name) == text, (
            f"{page.name} disagrees with benchmarks/results.json: run python -m benchmarks.report"
        )


# A time in the benchmarks' units: "87 ns", "13.0 µs", "87-88 ns" (an en dash too).
# Milliseconds are left alone: the docs give backoff caps and sample output in them.
TIME = re.compile(r"\d[\d.,]*(?:[-\u2013]\d[\d.,]*)?\s?(?:ns|µs)\b")


def test_no_page_quotes_a_time_outside_a_generated_block() -> None:
    """A measured time lives in a block rewritten from results.json, or not at all.

    (docs/performance.md's run-to-run study is ratios of dated runs, not times.)
    """
    assert TIME.findall("87 ns, 13.0 µs, 87\u201388 ns, 10 ms") == [
        "87 ns",
        "13.0 µs",
        "87\u201388 ns",
    ]
    pages = [*sorted((_results.ROOT / "docs").glob("*.md")), _results.ROOT / "README.md"]
    for page in pages:
        outside = report.BLOCK.sub("", page.read_text())
        assert not TIME.findall(outside), f"{page.name} quotes a time outside a generated block"
