"""Draw docs/performance.png from benchmarks/results.json (needs matplotlib).

One row per primitive and measurement, two panels per row:

- left, what was timed: the contenders side by side (the floor or the baseline first,
  aiosync, the peers) in every configuration (pinned or not, asyncio or uvloop), on a
  log scale when the times span more than `LOG_SPREAD` x (1 child against 64);
- right, what is judged: every checked ratio of that configuration as a bar on a log
  scale, its target drawn across the bar as a black line, the ratio written above it,
  green when the target is met and red when it is missed.

The left panel shows the sizes (a peer 8 x slower dwarfs the floor), the right one the
small gaps the targets are about. `python -m benchmarks` redraws it after every run;
by hand: ``python -m benchmarks.chart``. Nothing here knows the primitives: a new
benchmark only has to `record` its figures.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ._results import ROOT, Figure, figures, load
from .report import grouped

PNG = ROOT / "docs" / "performance.png"
# Contenders: the first (the floor or the baseline) grey, aiosync's usual place blue.
CONTENDER_COLORS = ["#9e9e9e", "#3f51b5", "#ff9800", "#009688", "#e91e63", "#795548"]
CHECK_COLORS = ["#7986cb", "#ffb74d", "#4db6ac", "#f06292", "#a1887f", "#90a4ae"]
MET = "#2e7d32"
MISSED = "#c62828"
# Ratio ticks on the log axis (the ones in the drawn range), fine for a narrow range.
FINE_TICKS = (0.25, 0.5, 0.75, 1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8)
COARSE_TICKS = (0.0625, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
# Times spread wider than this (largest / smallest) are drawn on a log scale.
LOG_SPREAD = 30


def _names(group: list[Figure]) -> list[str]:
    return list(dict.fromkeys(name for f in group for name in f.values))


def _check_labels(group: list[Figure]) -> list[str]:
    return list(dict.fromkeys(c.label for f in group for c in f.checks))


def _config_labels(group: list[Figure]) -> list[str]:
    return [f.config.replace(", ", "\n").replace(" (", "\n(") for f in group]


def _draw_values(ax: Any, group: list[Figure]) -> None:
    names = _names(group)
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(group))]
        ys = [f.values.get(name, 0.0) for f in group]
        ax.bar(xs, ys, width, label=name, color=CONTENDER_COLORS[k % len(CONTENDER_COLORS)])
    values = [v for f in group for v in f.values.values() if v > 0]
    top = max(values)
    if top / min(values) > LOG_SPREAD:  # say 10 µs and 5 ms: a log scale shows both
        ax.set_yscale("log")
        ax.set_ylim(min(values) / 1.5, top * 6)  # room for the legend
        ax.set_ylabel(f"{group[0].unit} (log scale)", fontsize=8)
    else:
        ax.set_ylim(0, top * 1.3)  # room for the legend
        ax.set_ylabel(group[0].unit, fontsize=8)
    ax.legend(fontsize=7, loc="upper left", ncol=min(len(names), 3), frameon=False)


def _draw_ratios(ax: Any, group: list[Figure]) -> None:
    import matplotlib.ticker as ticker

    labels = _check_labels(group)
    if not labels:
        ax.text(0.5, 0.5, "no target", transform=ax.transAxes, ha="center", color="#777777")
        ax.set_yticks([])
        return
    width = 0.8 / len(labels)
    shown: list[float] = []
    for k, label in enumerate(labels):
        color = CHECK_COLORS[k % len(CHECK_COLORS)]
        in_legend = False  # one legend entry per check
        for i, f in enumerate(group):
            check = next((c for c in f.checks if c.label == label), None)
            if check is None:
                continue
            x = i + (k - (len(labels) - 1) / 2) * width
            sign = "≤" if check.at_most else "≥"
            name = "_nolegend_" if in_legend else f"{label} {sign} {check.target:g}"
            in_legend = True
            ax.bar(x, check.ratio, width, color=color, label=name)
            ax.hlines(check.target, x - width * 0.58, x + width * 0.58, color="black", lw=1.6)
            ax.text(
                x,
                max(check.ratio, check.target) * 1.06,
                f"{check.ratio:.2f}",
                ha="center",
                va="bottom",
                fontsize=6.5,
                color=MET if check.met else MISSED,
                fontweight="bold",
            )
            shown += [check.ratio, check.target]
    low, high = min(shown), max(shown)
    bottom, top = low / 1.6, high * 2.2
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)  # room for the numbers and the legend
    ax.axhline(1.0, color="#bdbdbd", lw=0.8, zorder=0)
    ticks = [t for t in (FINE_TICKS if top / bottom < 8 else COARSE_TICKS) if bottom <= t <= top]
    if len(ticks) < 2:  # a narrow range: the ends
        ticks = [round(bottom, 2), round(top, 2)]
    ax.yaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("ratio (log scale)", fontsize=8)
    handles, names = ax.get_legend_handles_labels()
    handles.append(ax.plot([], [], color="black", lw=1.6)[0])
    names.append("target")
    ax.legend(handles, names, fontsize=7, loc="upper left", ncol=min(len(names), 2), frameon=False)


def _measured(data: dict[str, Any]) -> str:
    runs = data.get("runs", {}).values()
    dates = sorted({r["date"] for r in runs})
    machines = sorted({r["machine"] for r in runs})
    if not dates:
        return ""
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    quick = ", some quick runs" if any(r.get("quick") for r in runs) else ""
    others = [r["busy"]["others"] for r in runs if "busy" in r]
    busy = f", other processes using up to {max(others):.2f} CPUs" if others else ""
    return f"measured {when} on {'; '.join(machines)}{busy}{quick}"


def draw(data: dict[str, Any], path: Path = PNG) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no screen
    import matplotlib.pyplot as plt

    groups = grouped(figures(data))
    if not groups:
        raise ValueError("no benchmark figures to draw")
    rows = len(groups)
    fig, axes = plt.subplots(
        rows,
        2,
        figsize=(15, 3.3 * rows + 0.8),
        squeeze=False,
        gridspec_kw={"width_ratios": (1.15, 1)},
    )
    for (values_ax, ratios_ax), ((primitive, measure), group) in zip(
        axes, groups.items(), strict=True
    ):
        _draw_values(values_ax, group)
        _draw_ratios(ratios_ax, group)
        values_ax.set_title(f"{primitive}: {measure}", fontsize=10, loc="left")
        ratios_ax.set_title("ratios and their targets", fontsize=9, loc="left", color="#555")
        for ax in (values_ax, ratios_ax):
            ax.set_xticks(range(len(group)))
            ax.set_xticklabels(_config_labels(group), fontsize=7.5)
            ax.set_xlim(-0.6, len(group) - 0.4)
            ax.tick_params(axis="y", labelsize=8)
            ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(
        "aiosync against its floors and peers: times (left, lower is better) and the "
        "ratios the targets judge (right, green met, red missed)",
        fontsize=11,
    )
    fig.text(0.5, 0.005, _measured(data), ha="center", va="bottom", fontsize=8, color="#555")
    fig.tight_layout(rect=(0, 0.015, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("chart: skipped (matplotlib is not installed: pip install -e '.[bench]')")
        return 1
    path = draw(load())
    print(f"chart: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
