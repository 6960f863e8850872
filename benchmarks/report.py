"""What every benchmark report starts with: the date, the machine and the library versions."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from byol_core.runtime import cpu_bf16_kind


def machine_description() -> str:
    cpu = platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in info.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return (
        f"{cpu} ({cpu_bf16_kind()}), {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads"
    )


def load_average() -> str:
    """The 1-minute load average: on a shared machine, how quiet the measurement was."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def header() -> str:
    return (
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine_description()}, "
        f"torch {torch.__version__}, Python {platform.python_version()}; "
        f"load average {load_average()} at the start."
    )


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each function over ``repeats`` rounds that call every function in
    turn (after one warm-up call each): load that comes and goes hits every row alike."""
    timings: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in timings.items()}


def hand_kept(path: Path, heading: str) -> str:
    """What a generated document keeps by hand: its text from the first line that starts with
    ``heading`` to the end (with the newline before it), or "" when there is none."""
    text = path.read_text() if path.exists() else ""
    at = text.find("\n" + heading)
    return text[at:] if at >= 0 else ""
