"""Plot the table of runs compared in docs/benchmarks.md: the targets' ratios run by run.

The table (kept by hand, one column a run) is the single record; this reads it and draws
docs/benchmark-runs.png, so the figure cannot drift from the numbers.

    python -m benchmarks.plot_runs [--doc docs/benchmarks.md] [--out docs/benchmark-runs.png]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

from benchmarks.augmentation import SPEEDUP_TARGET
from benchmarks.step import BOUND_TARGET, TARGETS

TABLE_HEAD = "| figure |"
# (row label in the table, legend, target, panel)
SERIES = (
    ("ours over lightly", "over lightly", TARGETS["lightly"], 0),
    ("ours over byol-pytorch", "over byol-pytorch", TARGETS["byol-pytorch"], 0),
    ("ours over our bound", "over our bound (lower is better)", BOUND_TARGET, 0),
    ("augmentation: ours over torchvision's DataLoader", "augmentation", SPEEDUP_TARGET, 1),
)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
# A cell's note of the same figure in other runs of that day, e.g. "3.18x (2.66-2.81x in ...)".
_RANGE = re.compile(r"\((\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)x")
Table = dict[str, list[float | None]]


def read_table(text: str) -> tuple[list[str], Table, dict[str, list[tuple[float, float] | None]]]:
    """The runs (column headings), every row's leading number per run (None: not run) and the
    ranges that cells quote for other runs of the same figure."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(TABLE_HEAD))
    except StopIteration:
        raise ValueError(f"no table starting with {TABLE_HEAD!r}") from None

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    runs = cells(lines[start])[1:]
    rows: Table = {}
    ranges: dict[str, list[tuple[float, float] | None]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        label, *values = cells(line)
        if len(values) != len(runs):
            raise ValueError(f"row {label!r} has {len(values)} cells for {len(runs)} runs")
        numbers = [_NUMBER.match(v) for v in values]
        rows[label] = [float(m.group()) if m else None for m in numbers]
        quoted = [_RANGE.search(v) for v in values]
        ranges[label] = [(float(m[1]), float(m[2])) if m else None for m in quoted]
    return runs, rows, ranges


def _tick(number: int, run: str) -> str:
    """A run's column header as a narrow tick label: one line per comma-separated part, and
    the date apart from the time (ten columns of "2026-12-06 20:59" side by side overlap)."""
    return re.sub(r"(\d{4}-\d{2}-\d{2}) ", "\\1\n", f"{number}: {run}").replace(", ", "\n")


def plot_runs(
    runs: list[str],
    rows: Table,
    ranges: dict[str, list[tuple[float, float] | None]],
    path: Path,
) -> Path:
    # Wider as runs are added: each run's tick label needs about 0.8 in of the left panel.
    width = max(13.0, 1.2 * len(runs) + 1.0)
    fig, axes = plt.subplots(1, 2, figsize=(width, 4.6), gridspec_kw={"width_ratios": [2, 1]})
    xs = list(range(len(runs)))
    for label, legend, target, panel in SERIES:
        ax = axes[panel]
        points = [(x, y) for x, y in zip(xs, rows[label], strict=True) if y is not None]
        line = ax.plot(*zip(*points, strict=True), marker="o", label=legend)[0]
        ax.axhline(target, color=line.get_color(), linestyle="--", linewidth=1, alpha=0.7)
        for x, span in zip(xs, ranges[label], strict=True):
            if span:  # the same figure in other runs that day: a bar beside the point
                ax.vlines(x + 0.12, *span, color=line.get_color(), linewidth=3, alpha=0.5)
    axes[0].set_title(
        "training step: ratios (dashed: targets; bars: other runs or processes that day)",
        fontsize=10,
    )
    axes[1].set_title(f"augmentation over torchvision (target {SPEEDUP_TARGET:.0f}x)", fontsize=10)
    axes[0].set_xticks(xs, [_tick(i + 1, run) for i, run in enumerate(runs)])
    axes[0].tick_params(axis="x", labelsize=6)
    axes[1].set_xticks(xs, [str(i + 1) for i in xs])
    axes[1].set_xlabel("run (numbered as on the left)")
    for ax in axes:
        ax.set_ylabel("x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("docs/benchmarks.md, the runs compared (one column a run)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmark-runs.png"))
    args = parser.parse_args()
    try:
        runs, rows, ranges = read_table(args.doc.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"plot_runs: {exc}") from None
    print(plot_runs(runs, rows, ranges, args.out))


if __name__ == "__main__":
    main()
