"""Draw docs/performance.png from benchmarks/results.json (needs matplotlib).

One panel per primitive and measurement: the contenders side by side (the floor or
the peer it is compared with, and aiosync) in every configuration (pinned or not,
asyncio or uvloop), with the first checked ratio written above each group, green
when its target is met and red when it is missed. `python -m benchmarks` redraws it
after every run; by hand: ``python -m benchmarks.chart``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ._results import ROOT, figures, load
from .report import grouped

PNG = ROOT / "docs" / "performance.png"
COLORS = ["#9e9e9e", "#3f51b5", "#ff9800", "#009688", "#e91e63", "#795548"]


def draw(data: dict[str, Any], path: Path = PNG) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no screen
    import matplotlib.pyplot as plt

    groups = grouped(figures(data))
    if not groups:
        raise ValueError("no benchmark figures to draw")
    rows = len(groups)
    fig, axes = plt.subplots(rows, 1, figsize=(12, 3.4 * rows), squeeze=False)
    for ax, ((primitive, measure), group) in zip(axes.flat, groups.items(), strict=False):
        contenders = list(dict.fromkeys(name for f in group for name in f.values))
        width = 0.8 / len(contenders)
        for k, name in enumerate(contenders):
            xs = [i + (k - (len(contenders) - 1) / 2) * width for i in range(len(group))]
            ys = [f.values.get(name, 0.0) for f in group]
            ax.bar(xs, ys, width, label=name, color=COLORS[k % len(COLORS)])
        top = max(v for f in group for v in f.values.values())
        for i, f in enumerate(group):
            if f.checks:
                check = f.checks[0]
                ax.text(
                    i,
                    max(f.values.values()) + top * 0.03,
                    f"{check.ratio:.2f}x",
                    ha="center",
                    fontsize=8,
                    color="#2e7d32" if check.met else "#c62828",
                )
        ax.set_ylim(0, top * 1.18)
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([f.config.replace(", ", "\n") for f in group], fontsize=8)
        ax.set_title(f"{primitive}: {measure}", fontsize=10)
        ax.set_ylabel(group[0].unit, fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
        if group[0].checks:
            check = group[0].checks[0]
            sign = "<=" if check.at_most else ">="
            ax.text(
                1.0,
                1.0,
                f"{check.label} {sign} {check.target:g}",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=7,
                color="#555555",
            )
    fig.suptitle("aiosync against its floors and peers (lower is better)", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    path = draw(load())
    print(f"chart: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
