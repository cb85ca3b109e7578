"""The whole benchmark publishing step on synthetic figures, in a tmp dir.

No timing here: what the benchmarks would `record` is made up. Checked: a run's
figures become results.json (with each target's verdict), the page's tables and a PNG
of the expected size; a primitive the report and chart have never heard of is
published like the others; without matplotlib the chart is skipped with a note and
everything else still happens.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

from benchmarks import _results, chart, report
from benchmarks.__main__ import publish
from benchmarks._results import Check, Figure

# matplotlib is in the `bench` extra only (the chart is all it is for): without it the
# tests that draw are skipped, and the rest of the publishing step is still tested.
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed (only the chart needs it: pip install -e '.[bench]')",
)

PAGE = f"# Performance\n\n{report.BEGIN}\n{report.END}\n\nthe end\n"
# Pixels of a chart of three rows (Completion, Condition, Timer) of two panels each.
CHART_OF_THREE = (1500, round((3.3 * 3 + 0.8) * 100))


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, after checking its signature and IHDR chunk."""
    content = path.read_bytes()
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", content[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", content[16:24])
    assert content.endswith(b"IEND\xaeB`\x82")
    return width, height


def record_a_run() -> list[Figure]:
    """What the benchmarks of one run would record, including a primitive of the future."""
    _results.RECORDED.clear()
    for config, aiosync in (("pinned, asyncio", 12.0), ("unpinned, uvloop", 14.0)):
        _results.record(
            "Completion",
            "hand-off",
            config,
            "µs per round trip",
            {"floor": 10.0, "aiosync": aiosync},
            [Check("aiosync / floor", aiosync / 10.0, 1.25)],
        )
    _results.record(
        "Condition",  # in no list of the report or the chart
        "acquire() round trip",
        "pinned, uvloop",
        "µs",
        {"floor": 3.0, "aiosync": 3.3, "peer": 30.0},
        [
            Check("aiosync / floor", 1.1, 1.25),
            Check("peer / aiosync", 30 / 3.3, 4, at_most=False),
        ],
    )
    _results.record("Timer", "tick", "unpinned", "ns", {"aiosync": 80.0})  # no target
    found = list(_results.RECORDED)
    _results.RECORDED.clear()
    return found


@needs_matplotlib
def test_a_run_is_published(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results, page, png = tmp_path / "results.json", tmp_path / "perf.md", tmp_path / "c.png"
    page.write_text(PAGE)
    busy = {"Condition": {"others": 0.5, "steal": 0.25}, "Timer": {"others": 1.5, "steal": 0.0}}
    publish(record_a_run(), quick=True, results=results, pages=[page], png=png, busy=busy)

    data = json.loads(results.read_text())
    assert set(data["runs"]) == {"Completion", "Condition", "Timer"}
    about = data["runs"]["Condition"]
    assert about["quick"] is True
    assert about["cpus"] >= 1
    assert about["python"] == sys.version.split()[0]
    assert about["busy"] == {"others": 0.5, "steal": 0.25}
    assert "busy" not in data["runs"]["Completion"]  # not given
    rows = {(f["primitive"], f["config"]): f for f in data["figures"]}
    assert len(rows) == 4
    assert [c["met"] for c in rows["Completion", "pinned, asyncio"]["checks"]] == [True]
    assert [c["met"] for c in rows["Completion", "unpinned, uvloop"]["checks"]] == [False]
    assert [c["met"] for c in rows["Condition", "pinned, uvloop"]["checks"]] == [True, True]
    assert rows["Timer", "unpinned"]["checks"] == []

    text = page.read_text()
    assert text.startswith("# Performance\n\n")
    assert text.endswith(f"{report.END}\n\nthe end\n")
    assert "### Condition: acquire() round trip" in text
    assert "| configuration | floor | aiosync | peer | ratio (target) |" in text
    assert "| pinned, uvloop | 3 | 3.3 | 30.0 | aiosync / floor 1.10 (<= 1.25: met); " in text
    assert "| unpinned, uvloop | 10.0 | 14.0 | aiosync / floor 1.40 (<= 1.25: MISSED) |" in text
    assert "| unpinned | 80.0 |  |" in text
    assert (
        "; meanwhile other processes used 0.50 CPUs on average and other virtual machines"
        " 0.25 (a quick run: fewer rounds).\n"
    ) in text

    assert png_size(png) == CHART_OF_THREE
    footer = chart._measured(data)
    assert footer.endswith(", other processes using up to 1.50 CPUs, some quick runs")
    assert capsys.readouterr().out.splitlines()[-1] == f"chart: {png}"


@needs_matplotlib
def test_a_partial_run_redraws_from_the_merged_results(tmp_path: Path) -> None:
    results, page, png = tmp_path / "results.json", tmp_path / "perf.md", tmp_path / "c.png"
    page.write_text(PAGE)
    publish(record_a_run(), quick=False, results=results, pages=[page], png=png)
    first = png.read_bytes()
    again = [Figure("Timer", "tick", "unpinned", "ns", {"aiosync": 90.0})]
    publish(again, quick=True, results=results, pages=[page], png=png)

    data = json.loads(results.read_text())
    assert "busy" not in data["runs"]["Timer"]  # not given this time
    assert data["runs"]["Timer"]["quick"] is True
    assert data["runs"]["Condition"]["quick"] is False
    assert {f["primitive"] for f in data["figures"]} == {"Completion", "Condition", "Timer"}
    text = page.read_text()
    assert "| unpinned | 90.0 |  |" in text
    assert "| unpinned | 80.0 |" not in text
    assert "### Condition" in text
    assert png_size(png) == CHART_OF_THREE  # still every primitive's row
    assert png.read_bytes() != first


def test_a_stored_verdict_is_recomputed_not_trusted(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    _results.save(record_a_run(), quick=False, path=results)
    data = json.loads(results.read_text())
    for f in data["figures"]:
        for c in f["checks"]:
            c["met"] = not c["met"]  # a hand edit
    results.write_text(json.dumps(data))
    merged = _results.save([], quick=False, path=results)
    verdicts = [c["met"] for f in merged["figures"] for c in f["checks"]]
    assert verdicts == [True, False, True, True]


def test_what_other_work_took_meanwhile() -> None:
    start = _results.Usage(wall=100.0, busy=1000.0, steal=50.0, ours=20.0)
    # 10 s: the machine was busy for 16 CPU seconds, 12 of them ours; 1 s stolen.
    end = _results.Usage(wall=110.0, busy=1016.0, steal=51.0, ours=32.0)
    assert end.others_since(start) == {"others": 0.4, "steal": 0.1}
    # Clock ticks are coarser than rusage: never a negative share.
    end = _results.Usage(wall=110.0, busy=1011.99, steal=50.0, ours=32.0)
    assert end.others_since(start) == {"others": 0.0, "steal": 0.0}
    now = _results.Usage.now()  # read from /proc/stat and getrusage
    assert now.busy > 0
    assert now.steal >= 0
    assert now.ours > 0
    later = _results.Usage.now()
    assert later.wall >= now.wall
    assert later.busy >= now.busy
    assert later.ours >= now.ours


def test_without_matplotlib_the_chart_is_skipped_with_a_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    results, page, png = tmp_path / "results.json", tmp_path / "perf.md", tmp_path / "c.png"
    page.write_text(PAGE)
    publish(record_a_run(), quick=False, results=results, pages=[page], png=png)
    assert results.exists()
    assert "### Completion: hand-off" in page.read_text()
    assert not png.exists()
    out = capsys.readouterr().out
    assert "chart: skipped (matplotlib is not installed" in out
    assert chart.main() == 1
    assert "chart: skipped" in capsys.readouterr().out


def test_no_chart_means_no_chart(tmp_path: Path) -> None:
    results, page, png = tmp_path / "results.json", tmp_path / "perf.md", tmp_path / "c.png"
    page.write_text(PAGE)
    publish(record_a_run(), quick=False, draw=False, results=results, pages=[page], png=png)
    assert results.exists()
    assert not png.exists()


@needs_matplotlib
def test_times_spread_wide_are_drawn_on_a_log_scale() -> None:
    """1 child against 64: on a linear axis the small group's bars would not show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def group(*sizes: int) -> list[Figure]:
        return [
            Figure("Group", "sync", f"N={n}", "µs", {"floor": 10.0 * n, "aiosync": 12.0 * n})
            for n in sizes
        ]

    fig, (wide, narrow) = plt.subplots(1, 2)
    try:
        chart._draw_values(wide, group(1, 4, 16, 64))  # 10 to 768: more than LOG_SPREAD
        chart._draw_values(narrow, group(1, 2))  # 10 to 24
        assert wide.get_yscale() == "log"
        assert wide.get_ylim()[0] < 10.0
        assert "log scale" in wide.get_ylabel()
        assert narrow.get_yscale() == "linear"
        assert narrow.get_ylim()[0] == 0
    finally:
        plt.close(fig)
